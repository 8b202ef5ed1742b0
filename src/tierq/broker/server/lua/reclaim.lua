-- Make in-flight messages whose lease ended (or all of them, at start-up) due again now.
-- KEYS: 1 inflight, 2 due
-- ARGV: 1 lease cutoff ms ("+inf" for all), 2 now ms
-- Returns the number of messages reclaimed.
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('ZADD', KEYS[2], ARGV[2], id)
end
return #ids
