-- Admit a job, then park it (this file runs with park.lua appended): the user's rate quotas
-- (requests and estimated tokens per minute, token buckets), the user's share of the queue
-- (ARGV 23) and the queue's admission depth (ARGV 22). The share and the admission are leases
-- like the guards (job id -> expiry ms, counted live, TTL ARGV 24 ms; the admission sweep
-- renews the leases of jobs that exist unfinished and drops the others). A refused job leaves
-- nothing behind.
-- ARGV 9..21: as park.lua; 22 admission depth, 23 user's share, 24 admission ttl ms,
--   25 the user's requests per minute, 26 their tokens per minute (0: no quota)
-- Returns {"full", "user" | "queue"} or {"full", "requests" | "tokens", ms to wait} when
-- refused, else what park.lua returns followed by the user's quotas after this job:
-- "requests limit\tremaining\tms until full\ttokens limit\tremaining\tms until full\t".
ADMITTING = true
do
  local q, u, tokens = ARGV[10], ARGV[11], tonumber(ARGV[21])
  local adm = P .. ':admission:' .. q
  local share = P .. ':pending:' .. q .. ':' .. u
  local rpm, tpm = tonumber(ARGV[25]), tonumber(ARGV[26])
  local rate_key = P .. ':rate:user:' .. u
  if rpm > 0 or tpm > 0 then
    local wait = quota_wait(rate_key, rpm, tpm, 1, 0)
    if wait > 0 then return {'full', 'requests', wait} end
    wait = quota_wait(rate_key, rpm, tpm, 0, tokens)
    if wait > 0 then return {'full', 'tokens', wait} end
  end
  if live(share) >= tonumber(ARGV[23]) then return {'full', 'user'} end
  if live(adm) >= tonumber(ARGV[22]) then return {'full', 'queue'} end
  local ttl = tonumber(ARGV[24])
  for _, key in ipairs({share, adm}) do
    redis.call('ZADD', key, NOW + ttl, ARGV[9])
    redis.call('PEXPIRE', key, ttl + GRACE)
  end
  local tail = {'0\t0\t0\t0\t0\t0\t'}
  if rpm > 0 or tpm > 0 then
    quota_take(rate_key, rpm, tpm, 1, tokens)
    local qt = quotas[rate_key]
    tail = {}
    for _, b in ipairs({{qt.r, rpm}, {qt.k, tpm}}) do
      local level, limit = b[1], b[2]
      if limit > 0 then
        tail[#tail + 1] = limit .. '\t' .. math.max(0, math.floor(level)) .. '\t'
            .. math.ceil((limit - level) * 60000 / limit) .. '\t'
      else
        tail[#tail + 1] = '0\t0\t0\t'
      end
    end
  end
  TAIL = table.concat(tail)
end
