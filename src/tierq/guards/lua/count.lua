-- Count the live leases of a guard. Read-only, one key.
-- KEYS: 1 the guard zset
-- ARGV: none
-- Returns the number of leases whose expiry is after now.
return redis.call('ZCOUNT', KEYS[1], '(' .. now_ms(), '+inf')
