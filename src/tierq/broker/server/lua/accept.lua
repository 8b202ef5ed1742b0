-- Accept one message: deduplicate, store, schedule it (directly, or through its queue), log CREATED.
-- Optionally consumes a DLQ entry in the same step (DLQ retry), so nothing is lost or doubled.
-- KEYS: 1 msg, 2 due, 3 events, 4 user msgs, 5 dedup, 6 queue, 7 pending, 8 active, 9 queues,
--       10 dlq index, 11 dlq entry
-- ARGV: 1 id, 2 meta json, 3 body, 4 user, 5 queue name or "", 6 due ms, 7 now ms,
--       8 dedup ttl ms ("0": no dedup), 9 event base (JSON without its closing brace),
--       10 events maxlen, 11 url, 12 dlq id to consume or "", 13 max queues
-- Returns {1, id} stored; {0, existing id} duplicate; {-1, dlq id} DLQ entry gone; {-2, ""} queue
-- limit reached. Safe to repeat (ids are fresh per request): a message already stored is {1, id}.
local id = ARGV[1]
if redis.call('EXISTS', KEYS[1]) == 1 then return {1, id} end
if ARGV[12] ~= '' then
  if redis.call('ZREM', KEYS[10], ARGV[12]) == 0 then return {-1, ARGV[12]} end
  redis.call('DEL', KEYS[11])
end
if ARGV[8] ~= '0' then
  local existing = redis.call('GET', KEYS[5])
  if existing then return {0, existing} end
end
local qname = ARGV[5]
if qname ~= '' and redis.call('EXISTS', KEYS[6]) == 0 then
  if redis.call('SCARD', KEYS[9]) >= tonumber(ARGV[13]) then return {-2, ''} end
  redis.call('HSET', KEYS[6], 'name', qname, 'parallelism', 1, 'paused', 0,
    'createdAt', ARGV[7], 'updatedAt', ARGV[7])
  redis.call('SADD', KEYS[9], qname)
end
if ARGV[8] ~= '0' then redis.call('SET', KEYS[5], id, 'PX', ARGV[8]) end
redis.call('HSET', KEYS[1], 'm', ARGV[2], 'b', ARGV[3], 'u', ARGV[4], 'q', qname, 'r', 0,
  'url', ARGV[11], 'ev', ARGV[9])
redis.call('SADD', KEYS[4], id)
log(KEYS[3], ARGV[10], stamp(ARGV[9], ARGV[7], 'CREATED'))
if qname == '' then
  redis.call('ZADD', KEYS[2], ARGV[6], id)
else
  redis.call('RPUSH', KEYS[7], id)
  fill(KEYS[6], KEYS[7], KEYS[8], KEYS[2], ARGV[7])
end
return {1, id}
