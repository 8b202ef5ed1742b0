-- Extend a live lease; a lost one (expired or released) is never brought back. One key.
-- KEYS: 1 the guard zset
-- ARGV: 1 holder id, 2 ttl ms, 3 key grace ms
-- Returns 1 when renewed, 0 when the lease was lost. Expired leases are removed first.
local key, holder = KEYS[1], ARGV[1]
local ttl, grace = tonumber(ARGV[2]), tonumber(ARGV[3])
local now = now_ms()
redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
if not redis.call('ZSCORE', key, holder) then
  return 0
end
redis.call('ZADD', key, 'XX', now + ttl, holder)
keep_key_until_last_lease(key, now, grace)
return 1
