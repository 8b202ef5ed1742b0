-- The fair dispatcher's library, prepended (after the lease clock prelude) to each dispatch
-- script. Every key lives under P, one hash tag, so a script may touch any of them on Cluster.
-- Common ARGV: 1 P (key prefix with its hash tag), 2 lease ttl ms, 3 key grace ms,
--   4 ms a dispatched job has to be confirmed as published, 5 most jobs dispatched per call,
--   6 look-ahead in a user's line, 7 most users examined per queue per call,
--   8 configured queues "name=parallelism=paused;..." (operators' HSETs on queue:<q> win).
-- Script-specific ARGV start at 9.
-- Every dispatch lease has the same TTL, so the one just taken or refreshed always expires last:
-- its key's TTL is set from it directly. Leases are counted live (score > now) with ZCOUNT;
-- expired members (a crashed holder's) are cleared by the lease heartbeat's renew script and go
-- with the key's own TTL.
local P = ARGV[1]
local TTL, GRACE, DEADLINE = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local BUDGET, LOOKAHEAD, MAX_SCAN = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local DEFAULTS = {}
for q, par, paused in string.gmatch(ARGV[8], '([^=;]+)=(%d+)=(%d)') do
  DEFAULTS[q] = {tonumber(par), paused == '1'}
end
local NOW = now_ms()
local ADMITTING = false  -- admit.lua: the job is new (park.lua runs after it)
local TAIL = nil  -- admit.lua: the user's quotas, appended to what park.lua returns
local RECORD = nil  -- admit_record.lua: writes the job's record once it is admitted
local function finish(out)
  if RECORD then RECORD(out) end
  if TAIL then out[#out + 1] = TAIL end
  return out
end
local ACTIVE, JOBS = P .. ':active', P .. ':jobs'  -- JOBS: <job> meta, <job>:b worker body
local DISPATCHING, PARKED_N = P .. ':dispatching', P .. ':parked'
local POS = P .. ':pos'  -- hash job -> "position\treason\t" last told to its followers
local function slots_key(q) return P .. ':slots:' .. q end
local function user_key(u) return P .. ':guard:user:' .. u end
local function parked_key(q, u) return P .. ':parked:' .. q .. ':' .. u end
local function rr_key(q) return P .. ':rr:' .. q end
local function credit_key(q) return P .. ':credit:' .. q end
local function uconf_key(q) return P .. ':uconf:' .. q end
local function pusers_key(q) return P .. ':pusers:' .. q end
local function queue_key(q) return P .. ':queue:' .. q end

-- "a\tb\t" -> {"a", "b"}
local function fields(s)
  local out = {}
  for part in string.gmatch(s, '([^\t]*)\t') do out[#out + 1] = part end
  return out
end

-- Live leases on a guard, counted once per script run (and kept up to date by take).
local counted = {}
local function live(key)
  if not counted[key] then counted[key] = redis.call('ZCOUNT', key, '(' .. NOW, '+inf') end
  return counted[key]
end

-- Rate quotas: per subject (a user, a model+tier) one hash with two token buckets, requests
-- (r) and tokens (k), and the ms of their last update (t). A bucket holds at most its limit
-- and refills at its limit per minute; a level may go below zero (a job that used more tokens
-- than estimated); what a job needs is at most the limit (one larger than the quota goes once
-- the bucket is full). A limit of 0 is no quota. Levels are read once per script run.
local quotas = {}
local function refilled(level, limit, since)
  if not level then return limit end
  return math.min(limit, tonumber(level) + since * limit / 60000)
end

-- {r = requests level, k = tokens level, rpm, tpm} of the subject at `key`, refilled to now
local function quota(key, rpm, tpm)
  if not quotas[key] then
    local b = redis.call('HMGET', key, 'r', 'k', 't')
    local since = math.max(0, NOW - (tonumber(b[3]) or NOW))
    quotas[key] = {r = refilled(b[1], rpm, since), k = refilled(b[2], tpm, since),
                   rpm = rpm, tpm = tpm}
  end
  return quotas[key]
end

-- ms until the subject may take `requests` and `tokens` (0: now)
local function quota_wait(key, rpm, tpm, requests, tokens)
  local q = quota(key, rpm, tpm)
  local wait = 0
  for _, b in ipairs({{q.r, rpm, requests}, {q.k, tpm, tokens}}) do
    local level, limit, need = b[1], b[2], math.min(b[3], b[2])
    if limit > 0 and need > 0 and level < need then
      wait = math.max(wait, math.ceil((need - level) * 60000 / limit))
    end
  end
  return wait
end

-- Take `requests` and `tokens` (negative: give back) and store the subject; the hash is
-- forgotten once both buckets would be full again (a minute at least).
local function quota_take(key, rpm, tpm, requests, tokens)
  local q = quota(key, rpm, tpm)
  local full_ms = 60000
  if rpm > 0 then
    q.r = math.min(rpm, q.r - requests)
    full_ms = math.max(full_ms, math.ceil((rpm - q.r) * 60000 / rpm))
  end
  if tpm > 0 then
    q.k = math.min(tpm, q.k - tokens)
    full_ms = math.max(full_ms, math.ceil((tpm - q.k) * 60000 / tpm))
  end
  redis.call('HSET', key, 'r', q.r, 'k', q.k, 't', NOW)
  redis.call('PEXPIRE', key, full_ms + GRACE)
end

-- The model's quota for meta m (m[6], m[7]: requests and tokens per minute; m[8]: the job's
-- estimated tokens), under the model guard's key.
local function model_rate_wait(m)
  local rpm, tpm = tonumber(m[6]) or 0, tonumber(m[7]) or 0
  if rpm == 0 and tpm == 0 then return 0 end
  return quota_wait(m[3] .. ':rate', rpm, tpm, 1, tonumber(m[8]) or 0)
end

local function model_rate_take(m)
  local rpm, tpm = tonumber(m[6]) or 0, tonumber(m[7]) or 0
  if rpm == 0 and tpm == 0 then return end
  quota_take(m[3] .. ':rate', rpm, tpm, 1, tonumber(m[8]) or 0)
end

-- A model's running-job limit: the configured one ("8"), or for a model with adaptive limits
-- ("8a") what the upstream's answers brought it down to (aimd.lua), under the configured one.
local caps = {}
local function model_cap(key, limit)
  local n = tonumber(limit)
  if n then return n end
  if caps[key] == nil then
    local configured = tonumber(string.sub(limit, 1, -2))
    local now = tonumber(redis.call('HGET', P .. ':aimd', key))
    caps[key] = now and math.min(configured, math.max(1, math.floor(now))) or configured
  end
  return caps[key]
end

local function holds(key, job)
  local score = redis.call('ZSCORE', key, job)
  return score and tonumber(score) > NOW
end

-- Take (or refresh) job's lease; `new` when it did not hold a live one.
local function take(key, job, new)
  if new and counted[key] then counted[key] = counted[key] + 1 end
  redis.call('ZADD', key, NOW + TTL, job)
  redis.call('PEXPIRE', key, TTL + GRACE)
end

local function queue_conf(q)
  local st = redis.call('HMGET', queue_key(q), 'parallelism', 'paused')
  local d = DEFAULTS[q] or {0, false}
  local paused = d[2]
  if st[2] then paused = st[2] == '1' end
  return tonumber(st[1]) or d[1], paused
end

-- A user's running-jobs limit and weight in queue q (as of their latest parked job).
local function user_conf(q, u)
  local f = fields(redis.call('HGET', uconf_key(q), u) or '1\t1\t')
  return tonumber(f[1]), tonumber(f[2])
end

-- meta of a job (see remember)
local function meta_of(job)
  local raw = redis.call('HGET', JOBS, job)
  if raw then return fields(raw) end
  return nil
end

-- meta: {queue, user, model guard key, model limit, dedup id, model rpm, model tpm, tokens}
local function remember(job, m, body)
  redis.call('HSET', JOBS, job, table.concat(m, '\t') .. '\t', job .. ':b', body)
end

-- Put a job in its user's line of its queue (at the back, or the front when it is going back
-- to where it was) and the user in the queue's rotation if they were not in it.
local function park(job, q, u, front)
  if front then
    redis.call('LPUSH', parked_key(q, u), job)
  else
    redis.call('RPUSH', parked_key(q, u), job)
  end
  if tonumber(redis.call('ZINCRBY', pusers_key(q), 1, u)) == 1 then
    redis.call('RPUSH', rr_key(q), u)
  end
  redis.call('HINCRBY', PARKED_N, q, 1)
  redis.call('SADD', ACTIVE, q)
end

-- n jobs of u left q's line: counts follow, and a user with none left leaves the rotation
-- (from its head when at_head). Returns how many u still has parked in q.
local function unparked(q, u, n, at_head)
  local left = tonumber(redis.call('ZINCRBY', pusers_key(q), -n, u))
  redis.call('HINCRBY', PARKED_N, q, -n)
  if left <= 0 then
    redis.call('ZREM', pusers_key(q), u)
    redis.call('HDEL', credit_key(q), u)
    redis.call('HDEL', uconf_key(q), u)
    if at_head then
      redis.call('LPOP', rr_key(q))
    else
      redis.call('LREM', rr_key(q), 1, u)
    end
    if redis.call('LLEN', rr_key(q)) == 0 then redis.call('SREM', ACTIVE, q) end
  end
  return left
end

-- Drop everything dispatch keeps about a job (parked or being published): it runs, or ended.
local function forget(job)
  local m = meta_of(job)
  if not m then return end
  if redis.call('ZREM', DISPATCHING, job) == 0 then  -- parked, then
    if redis.call('LREM', parked_key(m[1], m[2]), 1, job) > 0 then
      unparked(m[1], m[2], 1, false)
    end
    redis.call('HDEL', POS, job)
  end
  redis.call('HDEL', JOBS, job, job .. ':b')
end

local function release(job, q, u, model_key)
  redis.call('ZREM', slots_key(q), job)
  redis.call('ZREM', user_key(u), job)
  redis.call('ZREM', model_key, job)
end

-- A job being published goes back to the front of its line, its leases given back.
local function unsend(job)
  local m = meta_of(job)
  redis.call('ZREM', DISPATCHING, job)
  if not m then return end
  release(job, m[1], m[2], m[3])
  park(job, m[1], m[2], true)
end

-- The first job of u's line in q (within the look-ahead) that may run now: u is under its
-- limit and the job's model+tier has room. Returns job, meta, or nil and what holds u back.
local blocked = {}
local function pick(q, u, ulimit)
  if live(user_key(u)) >= ulimit then return nil, nil, 'user' end
  for _, job in ipairs(redis.call('LRANGE', parked_key(q, u), 0, LOOKAHEAD - 1)) do
    local m = meta_of(job)
    if m and not blocked[m[3]] then
      if live(m[3]) < model_cap(m[3], m[4]) and model_rate_wait(m) == 0 then return job, m end
      blocked[m[3]] = true
    end
  end
  return nil, nil, 'model'
end

-- Take the job's three leases and mark it as being published (its body goes out in `out`).
local function dispatch(job, q, u, m, body, out)
  local dedup = m[5]
  take(slots_key(q), job, true)
  take(user_key(u), job, true)
  take(m[3], job, true)
  model_rate_take(m)
  redis.call('ZADD', DISPATCHING, NOW + DEADLINE, job)
  out[#out + 1] = job
  out[#out + 1] = dedup
  out[#out + 1] = body
end

local function send(job, q, u, m, out)
  redis.call('LREM', parked_key(q, u), 1, job)
  redis.call('HDEL', POS, job)
  dispatch(job, q, u, m, redis.call('HGET', JOBS, job .. ':b') or '', out)
end

-- Weighted deficit round robin over the users of q: the user at the head of the rotation
-- sends up to `weight` jobs in its turn, then moves to the back; a user held back by its own
-- limit or its models' passes its turn (keeping what is left of it); a queue without a free
-- slot (or paused) sends nothing. Appends {job, dedup id, body} triples to out.
local function dispatch_queue(q, out)
  local rr, credits = rr_key(q), credit_key(q)
  local users = redis.call('LLEN', rr)
  if users == 0 then return end  -- nobody parked here
  local par, paused = queue_conf(q)
  if paused then return end
  local free = par - live(slots_key(q))
  local idle, scanned = 0, 0
  while free > 0 and BUDGET > 0 and idle < users and scanned < MAX_SCAN do
    scanned = scanned + 1
    local u = redis.call('LINDEX', rr, 0)
    local ulimit, weight = user_conf(q, u)
    local credit = tonumber(redis.call('HGET', credits, u)) or weight
    local got = 0
    while free > 0 and BUDGET > 0 and credit > 0 do
      local job, m = pick(q, u, ulimit)
      if not job then break end
      send(job, q, u, m, out)
      free, BUDGET, credit, got = free - 1, BUDGET - 1, credit - 1, got + 1
    end
    local left = 1
    if got > 0 then left = unparked(q, u, got, true) end
    if left <= 0 then
      users = users - 1
    elseif credit <= 0 or got == 0 then
      if credit <= 0 then credit = weight end
      redis.call('HSET', credits, u, credit)
      redis.call('LMOVE', rr, rr, 'LEFT', 'RIGHT')
    else
      redis.call('HSET', credits, u, credit)  -- stopped for want of a slot: keeps its turn
    end
    if got > 0 then idle = 0 else idle = idle + 1 end
  end
end

-- What holds a parked job of u (limit ulimit) whose meta is m, in a queue paused or not.
local function hold(paused, u, ulimit, m)
  if paused then return 'paused' end
  if live(user_key(u)) >= ulimit then return 'user' end
  if m and live(m[3]) >= model_cap(m[3], m[4]) then return 'model' end
  if m and model_rate_wait(m) > 0 then return 'rate' end
  return 'queue'
end

-- Every queue with parked jobs, paid ones first (first: a queue to serve before the others).
local function dispatch_all(out, first)
  if first then dispatch_queue(first, out) end
  local queues = redis.call('SMEMBERS', ACTIVE)
  table.sort(queues, function(a, b) return a > b end)
  for _, q in ipairs(queues) do
    if q ~= first then dispatch_queue(q, out) end
  end
end
