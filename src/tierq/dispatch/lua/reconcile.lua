-- The periodic safety net: jobs whose publish was never confirmed in time (their publisher
-- died) go back to their lines; then every queue with parked jobs is dispatched (covering a
-- lost wake-up). Safe to run from any number of processes at once.
-- Returns {job, dedup, body, ...} to publish.
local expired = redis.call('ZRANGEBYSCORE', DISPATCHING, '-inf', NOW, 'LIMIT', 0, BUDGET)
for _, job in ipairs(expired) do unsend(job) end
local out = {}
dispatch_all(out, nil)
return out
