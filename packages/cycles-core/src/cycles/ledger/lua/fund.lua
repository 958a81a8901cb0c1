-- rules.fund_budget: add funds; debt is repaid first (it becomes spent).
-- KEYS: base
-- ARGV: now, scope, unit, amount
local scope, unit, amount = ARGV[2], ARGV[3], tonumber(ARGV[4])

expire_due(LAZY_EXPIRY)
local b = load_budget(scope, unit)
if b == nil then
  return err(unpack(missing_budget({scope})))
end
local due = period_due({b})
if due then
  return due
end
if b.st == 'CLOSED' then
  return err('BUDGET_CLOSED', scope)
end
if b.a + amount > MAX_AMOUNT then
  return err('TOO_LARGE', b.a + amount)
end
local repay = math.min(b.d, amount)
b.d = b.d - repay
b.s = b.s + repay
b.a = b.a + amount
reconcile_over_limit(b)
put_budgets({b})
return ok(enc(budget_json(b)))
