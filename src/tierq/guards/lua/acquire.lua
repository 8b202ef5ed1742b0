-- Take (or refresh) a lease on a limited guard. One key, so it also works on Redis Cluster.
-- KEYS: 1 the guard: zset holder -> lease expiry in ms (Redis server clock)
-- ARGV: 1 holder id (the job id), 2 limit, 3 ttl ms
-- Returns {acquired (1/0), live holders after the call}. Idempotent per holder: a holder that
-- already has a lease keeps its one slot and gets a fresh expiry.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local ttl = tonumber(ARGV[3])
local acquired = 0
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
  acquired = 1
elseif redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
  acquired = 1
end
local count = redis.call('ZCARD', KEYS[1])
if count > 0 then
  local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
  redis.call('PEXPIREAT', KEYS[1], tonumber(last[2]) + 1000)
end
return {acquired, count}
