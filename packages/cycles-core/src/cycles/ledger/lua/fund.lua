-- rules.fund_budget: add funds; debt is repaid first (it becomes spent).
-- KEYS: base
-- ARGV: now, scope, unit, amount
local scope, unit, amount = ARGV[2], ARGV[3], tonumber(ARGV[4])

local b, reply = funding_target(scope, unit)
if not b then
  return reply
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
