-- Delete a queue: its messages not yet started are cancelled; started ones finish normally.
-- KEYS: 1 queue, 2 pending, 3 active, 4 queues, 5 events, 6 user msgs
-- ARGV: 1 name, 2 now ms, 3 events maxlen, 4 message key prefix
-- Returns 1 deleted, 0 unknown queue.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
for _, id in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
  local ev = redis.call('HGET', ARGV[4] .. id, 'ev')
  redis.call('DEL', ARGV[4] .. id)
  redis.call('SREM', KEYS[6], id)
  if ev then log(KEYS[5], ARGV[3], stamp(ev, ARGV[2], 'CANCELED')) end
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('SREM', KEYS[4], ARGV[1])
return 1
