-- Append one delta event to each of several running jobs' logs: the coalesced text of one flush
-- tick for the whole process, in one call. A job that is gone or already terminal is skipped, so
-- text never follows a terminal event.
-- KEYS: job state hash and job event stream, a pair per job (2i-1, 2i)
-- ARGV: per job, its event JSON without the closing brace and without seq
-- Returns, per job, {seq, entry id} of its event, or 0 when it was skipped.
local out = {}
for i = 1, #ARGV do
  local job, events = KEYS[2 * i - 1], KEYS[2 * i]
  local status = redis.call('HGET', job, 'status')
  if not status or status == 'completed' or status == 'failed' or status == 'cancelled' then
    out[i] = 0
  else
    local seq = redis.call('HINCRBY', job, 'seq', 1)
    out[i] = {seq, redis.call('XADD', events, '*', 'e', ARGV[i] .. ',"seq":' .. seq .. '}')}
  end
end
return out
