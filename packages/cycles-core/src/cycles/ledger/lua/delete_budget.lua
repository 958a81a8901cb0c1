-- rules.delete_budget: delete a scope's budgets (one unit, or all of them), with their caps, period
-- and place in the budget index; refused while reserved, or while in debt unless forced.
-- KEYS: base
-- ARGV: now, scope, force ('1' writes debt off), units...
local scope, force = ARGV[2], ARGV[3] == '1'

expire_due(LAZY_EXPIRY)
local rows = load_scope_units(scope, 4)
if #rows == 0 then
  return err('SCOPE_NOT_FOUND')
end
local due = period_due(rows)
if due then
  return due
end
for _, b in ipairs(rows) do
  if b.r > 0 then
    return err('IN_USE', b.unit, b.r)
  end
  if b.d > 0 and not force then
    return err('DEBT_BLOCKS_DELETE', b.unit, b.d)
  end
end
local out, fields, members = {}, {}, {}
for i, b in ipairs(rows) do
  out[i] = {b.unit, budget_json(b)}
  fields[#fields + 1] = b.field
  fields[#fields + 1] = b.field .. '|caps'
  fields[#fields + 1] = b.field .. '|period'
  members[i] = scope .. '\0' .. b.unit
end
redis.call('HDEL', BUDGETS, unpack(fields))
redis.call('ZREM', BUDGET_INDEX, unpack(members))
return ok(enc(out))
