-- rules.set_budget: create a budget or change its allocation; spent, reserved and debt are kept.
-- KEYS: base
-- ARGV: now, scope, unit, amount, overdraft_limit ('' keeps it), caps json ('' keeps them, 'null' clears)
local scope, unit, amount, overdraft, caps = ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5], ARGV[6]

expire_due(LAZY_EXPIRY)
local b = load_budget(scope, unit)
if b == nil then
  b = {scope = scope, unit = unit, field = scope .. '|' .. unit, a = 0, s = 0, r = 0, d = 0, o = 0, x = false,
       st = 'ACTIVE', caps = nil}
  if redis.call('EXISTS', BUDGETS) == 0 then -- a fresh slot: nothing written before the index
    redis.call('SET', base .. 'bixv', '1')
  end
  redis.call('ZADD', BUDGET_INDEX, 0, scope .. '\0' .. unit)
end
if b.st == 'CLOSED' then
  return err('BUDGET_CLOSED', scope)
end
b.a = amount
if overdraft ~= '' then
  b.o = tonumber(overdraft)
end
reconcile_over_limit(b)
if caps == 'null' then
  b.caps = nil
  redis.call('HDEL', BUDGETS, b.field .. '|caps')
  put_budgets({b})
elseif caps ~= '' then
  b.caps = caps
  put_budgets({b}, b.field .. '|caps', caps)
else
  put_budgets({b})
end
return ok(enc(budget_json(b)))
