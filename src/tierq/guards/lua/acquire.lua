-- Take a lease on a limited guard, or refresh the one the holder already has.
-- One key, so it also works on Redis Cluster.
-- KEYS: 1 the guard: zset holder -> lease expiry ms (Redis server clock)
-- ARGV: 1 holder id (the job id), 2 limit, 3 ttl ms, 4 key grace ms
-- Returns {acquired 1/0, live leases after the call}. Expired leases are removed first. A holder
-- that already has a live lease keeps its one slot with a fresh expiry (idempotent per job id).
local key, holder = KEYS[1], ARGV[1]
local limit, ttl, grace = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local now = now_ms()
redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
local acquired = 0
if redis.call('ZSCORE', key, holder) or redis.call('ZCARD', key) < limit then
  redis.call('ZADD', key, now + ttl, holder)
  keep_key_until_last_lease(key, now, grace)
  acquired = 1
end
return {acquired, redis.call('ZCARD', key)}
