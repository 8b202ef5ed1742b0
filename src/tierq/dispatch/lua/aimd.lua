-- Adaptive model limit (AIMD): the upstream's answer to one attempt moves the model's
-- effective running-job limit: "decrease" (an upstream 429) or "slow" (its rate-limit headers
-- ran low) multiply it by ARGV[13]; "increase" (a success) adds 1/limit. It stays between
-- ARGV[11] and the configured ARGV[10]; at the configured limit nothing is kept.
-- ARGV 9.. : model guard key, configured limit, lowest limit, action, factor
-- Returns the effective limit (a number, maybe fractional) as a string.
local key, configured, lowest = ARGV[9], tonumber(ARGV[10]), tonumber(ARGV[11])
local action, factor = ARGV[12], tonumber(ARGV[13])
local now = tonumber(redis.call('HGET', P .. ':aimd', key)) or configured
if action == 'increase' then
  now = now + 1 / math.max(1, now)
else
  now = now * factor
end
now = math.max(lowest, math.min(configured, now))
if now >= configured then
  redis.call('HDEL', P .. ':aimd', key)
else
  redis.call('HSET', P .. ':aimd', key, now)
end
return tostring(now)
