-- Create a job's state record and log its first event (queued), unless the job exists.
-- KEYS: 1 job state hash, 2 job event stream
-- ARGV: 1 event JSON without its closing brace and without seq, 2.. field/value pairs
-- Returns the log entry id, or false when the job already exists.
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
redis.call('HSET', KEYS[1], 'status', 'queued', 'seq', 1, unpack(ARGV, 2))
return redis.call('XADD', KEYS[2], '*', 'e', ARGV[1] .. ',"seq":1}')
