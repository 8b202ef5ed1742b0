-- Store a queue snapshot unless a newer one is there already (a poll that started earlier
-- but finished later must not replace what a change's fresh snapshot showed).
-- KEYS[1]  the snapshot (string: JSON with "at_ms")
-- ARGV[1]  the new snapshot's at_ms (when its poll started, ms)
-- ARGV[2]  the new snapshot (JSON)
-- ARGV[3]  how long it is kept (ms)
-- Returns 1 when stored, 0 when the stored one is newer.
local current = redis.call('GET', KEYS[1])
if current then
  local ok, decoded = pcall(cjson.decode, current)
  if ok and type(decoded) == 'table' and tonumber(decoded['at_ms'])
      and tonumber(decoded['at_ms']) > tonumber(ARGV[1]) then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
