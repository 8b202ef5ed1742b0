-- Append one delta event to a running job's log (the coalesced text of one flush tick).
-- Rejected when the job is gone or already terminal, so text never follows a terminal event.
-- KEYS: 1 job state hash, 2 job event stream
-- ARGV: 1 event JSON without its closing brace and without seq
-- Returns the seq given to the event, or 0 when rejected.
local status = redis.call('HGET', KEYS[1], 'status')
if not status or status == 'completed' or status == 'failed' or status == 'cancelled' then
  return 0
end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
redis.call('XADD', KEYS[2], '*', 'e', ARGV[1] .. ',"seq":' .. seq .. '}')
return seq
