-- Extend a live lease. One key.
-- KEYS: 1 the guard zset
-- ARGV: 1 holder id, 2 ttl ms
-- Returns 1 when renewed, 0 when the lease was lost (expired or released).
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) <= now then
  if score then redis.call('ZREM', KEYS[1], ARGV[1]) end
  return 0
end
local expiry = now + tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], expiry, ARGV[1])
if redis.call('PTTL', KEYS[1]) < expiry - now + 1000 then
  redis.call('PEXPIREAT', KEYS[1], expiry + 1000)
end
return 1
