-- Set fields on a job's state record only while the record exists (a late writer must never
-- bring back a record that was deleted or expired, e.g. one taken back after a failed submit).
-- KEYS: 1 job state hash
-- ARGV: field/value pairs
-- Returns 1 when set, 0 when the record is gone.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
