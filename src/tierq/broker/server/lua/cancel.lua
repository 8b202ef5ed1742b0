-- Cancel one message of a user. A message in flight is marked; its attempt's end cancels it.
-- KEYS: 1 msg, 2 due, 3 inflight, 4 events, 5 user msgs, 6 queue, 7 pending, 8 active
-- ARGV: 1 id, 2 user, 3 now ms, 4 events maxlen
-- Returns 0 unknown (or another user's), 1 cancelled, 2 cancel requested (in flight).
local id = ARGV[1]
local f = redis.call('HMGET', KEYS[1], 'u', 'ev', 'q', 'c')
if f[1] ~= ARGV[2] then return 0 end
if redis.call('ZSCORE', KEYS[3], id) then
  if f[4] ~= '1' then
    redis.call('HSET', KEYS[1], 'c', '1')
    log(KEYS[4], ARGV[4], stamp(f[2], ARGV[3], 'CANCEL_REQUESTED'))
  end
  return 2
end
redis.call('ZREM', KEYS[2], id)
if f[3] ~= '' then
  redis.call('LREM', KEYS[7], 0, id)
  if redis.call('SREM', KEYS[8], id) == 1 then fill(KEYS[6], KEYS[7], KEYS[8], KEYS[2], ARGV[3]) end
end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[5], id)
log(KEYS[4], ARGV[4], stamp(f[2], ARGV[3], 'CANCEL_REQUESTED'))
log(KEYS[4], ARGV[4], stamp(f[2], ARGV[3], 'CANCELED'))
return 1
