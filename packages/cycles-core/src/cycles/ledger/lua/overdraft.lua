-- rules.set_overdraft_limit: change only a budget's overdraft limit. Its amounts and period are
-- left as they are, so a funding that lands beside it is never undone.
-- KEYS: base
-- ARGV: now, scope, unit, limit
local scope, unit, limit = ARGV[2], ARGV[3], tonumber(ARGV[4])

local b, reply = funding_target(scope, unit)
if not b then
  return reply
end
b.o = limit
if b.d > b.o then -- the spec: is_over_limit is recalculated with the limit
  b.x = true
end
reconcile_over_limit(b)
put_budgets({b})
return ok(enc(budget_json(b)))
