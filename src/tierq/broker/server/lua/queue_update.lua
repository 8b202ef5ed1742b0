-- Create or change a queue (upsert, pause, resume), then start what its free slots allow.
-- KEYS: 1 queue, 2 pending, 3 active, 4 due, 5 queues
-- ARGV: 1 name, 2 parallelism or "", 3 paused "1"/"0" or "", 4 now ms, 5 max queues,
--       6 "1" to create when missing, "0" to require it to exist
-- Returns 1 done, 0 unknown queue, -1 queue limit reached.
if redis.call('EXISTS', KEYS[1]) == 0 then
  if ARGV[6] ~= '1' then return 0 end
  if redis.call('SCARD', KEYS[5]) >= tonumber(ARGV[5]) then return -1 end
  redis.call('HSET', KEYS[1], 'name', ARGV[1], 'parallelism', 1, 'paused', 0, 'createdAt', ARGV[4])
  redis.call('SADD', KEYS[5], ARGV[1])
end
if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], 'parallelism', ARGV[2]) end
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'paused', ARGV[3]) end
redis.call('HSET', KEYS[1], 'updatedAt', ARGV[4])
fill(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[4])
return 1
