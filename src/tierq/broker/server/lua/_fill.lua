-- Shared prelude: start queued messages while the queue has free slots.
-- fill(queue hash, pending list, active set, due zset, now ms): a paused or deleted queue starts
-- nothing; otherwise ids move FIFO from pending into active and become due now.
local function fill(qkey, pending, active, due, now)
  local conf = redis.call('HMGET', qkey, 'parallelism', 'paused')
  if not conf[1] or conf[2] == '1' then return 0 end
  local limit = tonumber(conf[1])
  local started = 0
  while redis.call('SCARD', active) < limit do
    local id = redis.call('LPOP', pending)
    if not id then break end
    redis.call('SADD', active, id)
    redis.call('ZADD', due, now, id)
    started = started + 1
  end
  return started
end

local function log(stream, maxlen, event)
  redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'e', event)
end

local function stamp(base, now, state)
  return base .. ',"time":' .. now .. ',"state":"' .. state .. '"}'
end
