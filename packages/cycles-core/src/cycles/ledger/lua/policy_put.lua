-- rules.update_policy's write, as a compare-and-set: redis.py computed the new policy from the one
-- it read (quotas.apply_edit); the version bump makes every client reload its cached policies.
-- KEYS: base
-- ARGV: now, scope, the policy that was read ('' none), the new policy ('' removes it)
local current = redis.call('HGET', POLICY, ARGV[2]) or ''
if current ~= ARGV[3] then
  return err('CONFLICT')
end
if ARGV[4] == '' then
  redis.call('HDEL', POLICY, ARGV[2])
else
  redis.call('HSET', POLICY, ARGV[2], ARGV[4])
end
redis.call('HINCRBY', POLICY, '~v', 1)
return ok('null')
