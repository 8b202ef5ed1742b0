-- A job's run ended (or it was cancelled): give back its queue slot, user and model leases,
-- forget it if it was still parked or being published, then dispatch what that freed.
-- ARGV 9.. : job, queue, user, model guard key
-- Returns {job, dedup, body, ...} to publish.
local job, q, u = ARGV[9], ARGV[10], ARGV[11]
forget(job)
release(job, q, u, ARGV[12])
local out = {}
dispatch_all(out, q)
return out
