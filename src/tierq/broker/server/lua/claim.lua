-- Claim due messages for delivery: move them from due to in-flight under a lease, log ACTIVE.
-- Each claim is a new attempt of its message (field 'a' counts them): only that attempt may
-- renew the lease or record the outcome, so a stale attempt can never apply its result twice.
-- KEYS: 1 due, 2 inflight, 3 events
-- ARGV: 1 now ms, 2 max count, 3 lease ms, 4 message key prefix, 5 events maxlen
-- Returns a flat list: id, meta json, body, retries so far, attempt — for each claimed message.
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
local out = {}
local lease_until = tonumber(ARGV[1]) + tonumber(ARGV[3])
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
  local key = ARGV[4] .. id
  local f = redis.call('HMGET', key, 'm', 'b', 'r', 'ev')
  if f[1] then
    redis.call('ZADD', KEYS[2], lease_until, id)
    log(KEYS[3], ARGV[5], stamp(f[4], ARGV[1], 'ACTIVE'))
    out[#out + 1] = id
    out[#out + 1] = f[1]
    out[#out + 1] = f[2]
    out[#out + 1] = f[3]
    out[#out + 1] = redis.call('HINCRBY', key, 'a', 1)
  end
end
return out
