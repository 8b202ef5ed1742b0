-- A delivery takes its job's queue slot, user and model leases: all of them (each already held
-- by the job, or with room under its limit) or none. The job is no longer parked. Leases taken
-- at dispatch are refreshed only when less than ARGV[15] ms of them is left (the run's
-- heartbeat renews them from then on).
-- ARGV 9.. : job, queue, user, model guard key, model limit, user limit, fresh-enough ms
-- Returns "ok" (or "ok:sent", see below), or what is full: "user", "model" or "queue".
local job, q, u, model_key = ARGV[9], ARGV[10], ARGV[11], ARGV[12]
local keys = {slots_key(q), user_key(u), model_key}
local fresh, held = true, true
for _, key in ipairs(keys) do
  local score = redis.call('ZSCORE', key, job)
  if not (score and tonumber(score) > NOW + tonumber(ARGV[15])) then fresh = false end
  if not (score and tonumber(score) > NOW) then held = false end
end
if not fresh then
  local par = queue_conf(q)
  local limits = {par, tonumber(ARGV[14]), model_cap(model_key, ARGV[13])}
  local names = {'queue', 'user', 'model'}
  for _, i in ipairs({2, 3, 1}) do
    if not holds(keys[i], job) and live(keys[i]) >= limits[i] then return names[i] end
  end
  for _, key in ipairs(keys) do take(key, job, false) end
end
-- "ok:sent": the job held its leases already (dispatch took them: it was admitted and sent,
-- even if its record is not written yet — a submit records a job just after admitting it)
forget(job)
if held then return 'ok:sent' end
return 'ok'
