-- Where every parked job stands now, for the ones whose followers should hear it: the order the
-- round robin will send them in (the head user's turn first, then each user's weight per
-- round), and what holds each. A job is reported when what holds it changed, or its position
-- fell to at most ARGV[10] times the one it was last told (a meaningful move). Looks at the
-- first 200 users of each queue, 100 jobs of each line, and ARGV[9] positions at most.
-- Returns {job, reason, position, ...}.
local limit, ratio = tonumber(ARGV[9]), tonumber(ARGV[10])
local out = {}
local queues = redis.call('SMEMBERS', ACTIVE)
table.sort(queues, function(a, b) return a > b end)
for _, q in ipairs(queues) do
  local _, paused = queue_conf(q)
  local users = redis.call('LRANGE', rr_key(q), 0, 199)
  local lines, quota, taken = {}, {}, {}
  for i, u in ipairs(users) do
    lines[i] = redis.call('LRANGE', parked_key(q, u), 0, 99)
    local ulimit, weight = user_conf(q, u)
    quota[i] = {weight, ulimit}
    taken[i] = 0
  end
  local credit = tonumber(redis.call('HGET', credit_key(q), users[1] or '')) or nil
  local pos, round, more = 0, 0, true
  while more and pos < limit do
    more = false
    for i, u in ipairs(users) do
      local n = quota[i][1]
      if round == 0 and i == 1 and credit then n = credit end
      while n > 0 and taken[i] < #lines[i] and pos < limit do
        taken[i] = taken[i] + 1
        n = n - 1
        local job = lines[i][taken[i]]
        local reason = hold(paused, u, quota[i][2], meta_of(job))
        local told = fields(redis.call('HGET', POS, job) or '')
        local before = tonumber(told[1])
        if told[2] ~= reason or before == nil or pos <= math.floor(before * ratio) and pos < before then
          redis.call('HSET', POS, job, pos .. '\t' .. reason .. '\t')
          out[#out + 1] = job
          out[#out + 1] = reason
          out[#out + 1] = pos
        end
        pos = pos + 1
      end
      if taken[i] < #lines[i] then more = true end
    end
    round = round + 1
  end
end
return out
