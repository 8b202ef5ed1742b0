-- Park a job in its user's line of its queue, then dispatch that queue.
-- ARGV 9.. : job, queue, user, model guard key, model limit, user limit, weight, dedup id,
--            "1" to park at the front (a job going back), worker body, the model's requests
--            and tokens per minute (0: no quota), the job's estimated tokens
-- Returns {reason, position, job, dedup, body, ...}: reason "" when this job was dispatched,
-- else what holds it ("paused", "user", "model", "rate", "queue") and how many jobs go before.
local job, q, u, model_key = ARGV[9], ARGV[10], ARGV[11], ARGV[12]
local model_limit, user_limit, weight = ARGV[13], ARGV[14], ARGV[15]
local m = {q, u, model_key, model_limit, ARGV[16], ARGV[19], ARGV[20], ARGV[21]}
if not ADMITTING then forget(job) end  -- a job just admitted is new to dispatch
remember(job, m, ARGV[18])
local out = {'', 0}
local par, paused = queue_conf(q)
-- Nobody waits in this queue and the job fits: it goes out at once, never parked.
if not paused and redis.call('LLEN', rr_key(q)) == 0 and live(slots_key(q)) < par
    and live(user_key(u)) < tonumber(user_limit) and live(model_key) < model_cap(model_key, model_limit)
    and model_rate_wait(m) == 0 then
  dispatch(job, q, u, m, ARGV[18], out)
  return finish(out)
end
redis.call('HSET', uconf_key(q), u, user_limit .. '\t' .. weight .. '\t')
park(job, q, u, ARGV[17] == '1')
dispatch_queue(q, out)
if redis.call('ZSCORE', DISPATCHING, job) then return finish(out) end
local reason = hold(paused, u, tonumber(user_limit), m)
-- Jobs before it: those ahead in its own line, and what the other users send in the rounds
-- it must wait (their weight per round), looking at most at 200 users.
local index = 0
if ARGV[17] ~= '1' then index = redis.call('LLEN', parked_key(q, u)) - 1 end
local rounds = math.floor(index / tonumber(weight)) + 1
local ahead = index
for _, v in ipairs(redis.call('LRANGE', rr_key(q), 0, 199)) do
  if v ~= u then
    local _, w = user_conf(q, v)
    ahead = ahead + math.min(redis.call('LLEN', parked_key(q, v)), rounds * w)
  end
end
redis.call('HSET', POS, job, ahead .. '\t' .. reason .. '\t')
out[1], out[2] = reason, ahead
return finish(out)
