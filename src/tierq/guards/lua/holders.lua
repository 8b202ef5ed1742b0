-- List the live holders of a guard. Read-only, one key.
-- KEYS: 1 the guard zset
-- ARGV: none
-- Returns the holder ids whose lease expires after now, soonest expiry first.
return redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now_ms(), '+inf')
