-- Admit, park and record a new job in one call (admit.lua and park.lua follow this file): once
-- the job is admitted, its state record and first events are written as create.lua writes them
-- (events/lua). A refused job leaves nothing. For a single Redis only: the record's keys are
-- not under the dispatcher's hash tag, so on Cluster the submit records the job in a second
-- call (create.lua).
-- ARGV 9..26: as admit.lua; 27 the job's state hash, 28 its event stream, 29 the `queued` event
--   as JSON without `seq` and its closing brace, 30 the `waiting` event likewise, up to (not
--   including) its `guard`, 31.. the record's field/value pairs
RECORD = function(out)
  local reason = out[1]  -- '' when dispatched at once, else what holds the job (park.lua)
  local seq = 1
  if reason ~= '' then seq = 2 end
  redis.call('HSET', ARGV[27], 'status', 'queued', 'seq', seq, unpack(ARGV, 31))
  redis.call('XADD', ARGV[28], '*', 'e', ARGV[29] .. ',"seq":1}')
  if reason ~= '' then
    redis.call('XADD', ARGV[28], '*', 'e',
      ARGV[30] .. ',"guard":"' .. reason .. '","position":' .. out[2] .. ',"seq":2}')
  end
end
