-- Jobs whose publish failed go back to the front of their lines, their leases given back.
-- ARGV 9.. : job ids (ones not being published any more are skipped).
for i = 9, #ARGV do
  if redis.call('ZSCORE', DISPATCHING, ARGV[i]) then unsend(ARGV[i]) end
end
return 0
