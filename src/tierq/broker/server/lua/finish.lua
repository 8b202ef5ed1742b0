-- Record the outcome of one delivery attempt, atomically, if it still holds its lease (it is in
-- flight and is the message's current attempt). Safe to repeat: a second call finds no lease.
-- retry: count the retry and schedule it; delivered/failed: drop the message (failed: into the
-- DLQ with the response that failed it), free its queue slot and start the next, create any
-- callback messages. A message whose cancel was requested meanwhile ends CANCELED instead.
-- KEYS: 1 msg, 2 inflight, 3 due, 4 events, 5 user msgs, 6 queue, 7 pending, 8 active,
--       9 dlq index, 10 dlq entry
-- ARGV: 1 id, 2 outcome (delivered|retry|failed), 3 now ms, 4 next due ms, 5 events maxlen,
--       6 dlq id, 7 response json, 8 user, 9 attempt, 10 n events, 11.. events, then 7 per
--       follow-up message:
--       key, id, meta, body, url, event base, due ms
-- Returns 1 when recorded, 0 when the lease was lost (the message was reclaimed or is gone).
local id = ARGV[1]
if not redis.call('ZSCORE', KEYS[2], id) then return 0 end
local state = redis.call('HMGET', KEYS[1], 'c', 'q', 'ev', 'm', 'b', 'r', 'a')
if state[4] and state[7] ~= ARGV[9] then return 0 end  -- another attempt holds the lease
redis.call('ZREM', KEYS[2], id)
if not state[4] then return 0 end
local now = ARGV[3]
local outcome = ARGV[2]
if state[1] == '1' then
  log(KEYS[4], ARGV[5], stamp(state[3], now, 'CANCELED'))
  outcome = 'cancelled'
else
  local n = tonumber(ARGV[10])
  for i = 1, n do log(KEYS[4], ARGV[5], ARGV[10 + i]) end
  if outcome == 'retry' then
    redis.call('HINCRBY', KEYS[1], 'r', 1)
    redis.call('ZADD', KEYS[3], ARGV[4], id)
    return 1
  end
  local i = 11 + n
  while i + 6 <= #ARGV do
    redis.call('HSET', ARGV[i], 'm', ARGV[i + 2], 'b', ARGV[i + 3], 'u', ARGV[8], 'q', '',
      'r', 0, 'url', ARGV[i + 4], 'ev', ARGV[i + 5])
    redis.call('SADD', KEYS[5], ARGV[i + 1])
    redis.call('ZADD', KEYS[3], ARGV[i + 6], ARGV[i + 1])
    log(KEYS[4], ARGV[5], stamp(ARGV[i + 5], now, 'CREATED'))
    i = i + 7
  end
end
if outcome == 'failed' then
  redis.call('HSET', KEYS[10], 'm', state[4], 'b', state[5], 'resp', ARGV[7], 'r', state[6])
  redis.call('ZADD', KEYS[9], now, ARGV[6])
end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[5], id)
if state[2] ~= '' and redis.call('SREM', KEYS[8], id) == 1 then
  fill(KEYS[6], KEYS[7], KEYS[8], KEYS[3], now)
end
return 1
