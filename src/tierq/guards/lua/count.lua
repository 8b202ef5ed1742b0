-- Live (unexpired) holders of a guard, read-only. One key.
-- KEYS: 1 the guard zset
-- Returns the count.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
