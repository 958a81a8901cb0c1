-- rules.set_budget_status: freeze, unfreeze or close a scope's budgets (one unit, or all of them).
-- KEYS: base
-- ARGV: now, scope, status, units...
local scope, status = ARGV[2], ARGV[3]

expire_due(LAZY_EXPIRY)
local rows = load_scope_units(scope, 4)
if #rows == 0 then
  return err('SCOPE_NOT_FOUND')
end
for _, b in ipairs(rows) do
  if b.st == 'CLOSED' and status ~= 'CLOSED' then
    return err('CLOSED_FOR_GOOD', scope)
  end
end
local out = {}
for i, b in ipairs(rows) do
  b.st = status
  out[i] = {b.unit, budget_json(b)}
end
put_budgets(rows)
return ok(enc(out))
