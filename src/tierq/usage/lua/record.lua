-- Add to one (user, model) row of a day's usage ledger.
-- KEYS: 1 the day's hash (field "user\tmodel" -> "jobs prompt completion run_ms failures")
-- ARGV: 1 field, 2..6 the increments, 7 when the day is forgotten (unix ms; 0: its expiry was
--   set a moment ago, leave it)
local row = {0, 0, 0, 0, 0}
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current then
  local i = 1
  for n in string.gmatch(current, '%-?%d+') do row[i] = tonumber(n); i = i + 1 end
end
for i = 1, 5 do row[i] = row[i] + tonumber(ARGV[i + 1]) end
redis.call('HSET', KEYS[1], ARGV[1], table.concat(row, ' '))
if ARGV[7] ~= '0' then redis.call('PEXPIREAT', KEYS[1], ARGV[7]) end
return 1
