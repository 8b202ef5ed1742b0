-- Prelude shared by the lease scripts (prepended by leases.py; defines helpers, touches nothing).
-- A lease is live while its score (expiry ms) is greater than now; now comes from the Redis
-- server's TIME, so every replica of tierq judges expiry by one clock.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Give the guard key a TTL that outlives its longest lease by grace_ms, so an idle guard never
-- lingers; taken from the largest expiry, a short lease never cuts a longer one's key short.
local function keep_key_until_last_lease(key, now, grace_ms)
  local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  if last[2] then
    redis.call('PEXPIRE', key, tonumber(last[2]) - now + grace_ms)
  end
end
