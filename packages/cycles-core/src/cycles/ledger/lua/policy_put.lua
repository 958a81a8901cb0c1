-- rules.update_policy's write, as a compare-and-set: redis.py computed the new policy from the one
-- it read (quotas.apply_edit); the version bump makes every client reload its cached policies.
-- KEYS: base
-- ARGV: now, scope, the policy that was read ('' none), the new policy ('' removes it), and
--       optionally '=' .. the version read (a named policy: its name was checked unique against
--       every policy of the tenant at that version, so any write since is a conflict)
local current = redis.call('HGET', POLICY, ARGV[2]) or ''
if current ~= ARGV[3] then
  return err('CONFLICT')
end
if ARGV[5] and ARGV[5] ~= '' and '=' .. (redis.call('HGET', POLICY, '~v') or '') ~= ARGV[5] then
  return err('CONFLICT')
end
if ARGV[4] == '' then
  redis.call('HDEL', POLICY, ARGV[2])
else
  redis.call('HSET', POLICY, ARGV[2], ARGV[4])
end
redis.call('HINCRBY', POLICY, '~v', 1)
return ok('null')
