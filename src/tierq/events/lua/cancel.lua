-- Cancel a job. A queued job (no worker holds it) is cancelled now: its terminal event is logged.
-- A waiting or running job is marked and announced on the cancel channel; its worker stops it.
-- KEYS: 1 job state hash, 2 job event stream
-- ARGV: 1 cancelled event JSON without closing brace and seq, 2 retention ms, 3 cancel channel,
--       4 job id, 5 finished-at ms
-- Returns "cancelled", "requested", "missing", or the terminal status the job already has.
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'missing' end
if status == 'completed' or status == 'failed' or status == 'cancelled' then return status end
if status == 'queued' then
  local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
  redis.call('XADD', KEYS[2], '*', 'e', ARGV[1] .. ',"seq":' .. seq .. '}')
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'terminalSeq', seq, 'finishedAt', ARGV[5])
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
  return 'cancelled'
end
redis.call('HSET', KEYS[1], 'cancelRequested', '1')
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 'requested'
