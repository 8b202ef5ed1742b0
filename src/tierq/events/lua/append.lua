-- Append one event to a job's log and update its state record, atomically.
-- Rejected when the job is gone or already terminal (so a redelivery never duplicates a terminal
-- event), except that mode "revive" may restart a job whose last state is "failed" (DLQ retry);
-- mode "queued" appends only while the job is queued (not yet started or finished); mode
-- "start:<n>" (with "revive" in it too, when reviving) appends only while the job has had n runs:
-- of two deliveries that start the same run at once, one wins and the other gets "taken";
-- "fresh" in it (a start that did not read the job first) also refuses a job whose cancel was
-- requested ("cancel_requested": the caller reads the job and ends it as cancelled).
-- KEYS: 1 job state hash, 2 job event stream
-- ARGV: 1 event JSON without its closing brace and without seq, 2 new status or "",
--       3 "1" when this event is terminal, 4 retention ms, 5 mode (see above),
--       6.. field/value pairs to set on the state record
-- Returns {entry id, seq} when appended, {"", current status or "missing" or "taken" or
-- "cancel_requested"} when not.
local state = redis.call('HMGET', KEYS[1], 'status', 'attempts', 'cancelRequested')
local status = state[1]
if not status then return {'', 'missing'} end
local terminal = status == 'completed' or status == 'failed' or status == 'cancelled'
local revive = string.find(ARGV[5], 'revive', 1, true)
if terminal and not (revive and status == 'failed') then return {'', status} end
if ARGV[5] == 'queued' and status ~= 'queued' then return {'', status} end
local runs = string.match(ARGV[5], 'start:(%d+)')
if runs and (state[2] or '0') ~= runs then return {'', 'taken'} end
if state[3] and string.find(ARGV[5], 'fresh', 1, true) then return {'', 'cancel_requested'} end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
local id = redis.call('XADD', KEYS[2], '*', 'e', ARGV[1] .. ',"seq":' .. seq .. '}')
-- one HSET for the new status, the fields and (terminal) the terminal event's seq
local set = {}
for i = 6, #ARGV do set[#set + 1] = ARGV[i] end
if ARGV[2] ~= '' then set[#set + 1] = 'status'; set[#set + 1] = ARGV[2] end
if ARGV[3] == '1' then set[#set + 1] = 'terminalSeq'; set[#set + 1] = seq end
if #set > 0 then redis.call('HSET', KEYS[1], unpack(set)) end
if ARGV[3] == '1' then
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
elseif terminal then
  redis.call('PERSIST', KEYS[1])
  redis.call('PERSIST', KEYS[2])
  redis.call('HDEL', KEYS[1], 'terminalSeq')
end
return {id, seq}
