-- Jobs whose publish QStash accepted: dispatch forgets them (their leases stay, for the run).
-- ARGV 9.. : job ids. A job no longer being published (requeued meanwhile) is left alone.
for i = 9, #ARGV do
  if redis.call('ZREM', DISPATCHING, ARGV[i]) == 1 then
    redis.call('HDEL', JOBS, ARGV[i], ARGV[i] .. ':b')
  end
end
return 0
