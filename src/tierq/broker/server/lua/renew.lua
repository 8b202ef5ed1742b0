-- Extend the leases of attempts still running in this broker, where each is still the current
-- attempt of its message (a lapsed lease may have been reclaimed and claimed again meanwhile).
-- KEYS: 1 inflight
-- ARGV: 1 lease until ms, 2 message key prefix, then pairs: message id, attempt
-- Returns the number of leases renewed.
local renewed = 0
for i = 3, #ARGV, 2 do
  local id = ARGV[i]
  if redis.call('ZSCORE', KEYS[1], id) and redis.call('HGET', ARGV[2] .. id, 'a') == ARGV[i + 1] then
    redis.call('ZADD', KEYS[1], ARGV[1], id)
    renewed = renewed + 1
  end
end
return renewed
