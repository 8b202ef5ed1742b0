-- A job's run ended (or it was cancelled): give back its queue slot, user and model leases,
-- forget it if it was still parked or being published, correct the rate quotas by what the
-- job really used, then dispatch what that freed.
-- ARGV 9.. : job, queue, user, model guard key; optional 13, 14 the user's requests and tokens
--   per minute, 15, 16 the model's (0: no quota), 17 tokens used minus the job's estimate
-- Returns {job, dedup, body, ...} to publish.
local job, q, u = ARGV[9], ARGV[10], ARGV[11]
forget(job)
release(job, q, u, ARGV[12])
local delta = tonumber(ARGV[17] or '0') or 0
if delta ~= 0 then
  local user_rpm, user_tpm = tonumber(ARGV[13]) or 0, tonumber(ARGV[14]) or 0
  local model_rpm, model_tpm = tonumber(ARGV[15]) or 0, tonumber(ARGV[16]) or 0
  if user_tpm > 0 then quota_take(P .. ':rate:user:' .. u, user_rpm, user_tpm, 0, delta) end
  if model_tpm > 0 then quota_take(ARGV[12] .. ':rate', model_rpm, model_tpm, 0, delta) end
end
local out = {}
dispatch_all(out, q)
return out
