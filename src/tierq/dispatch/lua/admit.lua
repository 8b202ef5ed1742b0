-- Admit a job, then park it (this file runs with park.lua appended): the user's share of the
-- queue (ARGV 20) and the queue's admission depth (ARGV 19) are leases like the guards (job id
-- -> expiry ms, counted live, TTL ARGV 21 ms; the admission sweep renews the leases of jobs that
-- exist unfinished and drops the others). A refused job leaves nothing behind.
-- ARGV 9..18: as park.lua; 19 admission depth, 20 user's share, 21 admission ttl ms
-- Returns {"full", "user" | "queue"} when refused, else what park.lua returns.
ADMITTING = true
do
  local adm = P .. ':admission:' .. ARGV[10]
  local share = P .. ':pending:' .. ARGV[10] .. ':' .. ARGV[11]
  local ttl = tonumber(ARGV[21])
  if live(share) >= tonumber(ARGV[20]) then return {'full', 'user'} end
  if live(adm) >= tonumber(ARGV[19]) then return {'full', 'queue'} end
  for _, key in ipairs({share, adm}) do
    redis.call('ZADD', key, NOW + ttl, ARGV[9])
    redis.call('PEXPIRE', key, ttl + GRACE)
  end
end
