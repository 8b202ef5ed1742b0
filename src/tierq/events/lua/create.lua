-- Create a job's state record and log its first event (queued), and a second one when given
-- (the `waiting` of a job parked at submit), unless the job exists.
-- KEYS: 1 job state hash, 2 job event stream
-- ARGV: 1 first event JSON without its closing brace and without seq, 2 the second one or "",
--       3.. field/value pairs
-- Returns the first event's log entry id, or false when the job already exists.
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local seq = 1
if ARGV[2] ~= '' then seq = 2 end
redis.call('HSET', KEYS[1], 'status', 'queued', 'seq', seq, unpack(ARGV, 3))
local id = redis.call('XADD', KEYS[2], '*', 'e', ARGV[1] .. ',"seq":1}')
if ARGV[2] ~= '' then redis.call('XADD', KEYS[2], '*', 'e', ARGV[2] .. ',"seq":2}') end
return id
