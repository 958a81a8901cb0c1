-- Read one scope's budgets (all units asked for), after lazy expiry.
-- KEYS: base
-- ARGV: now, scope, units...
expire_due(LAZY_EXPIRY)
local out, rows = {}, {}
for i = 3, #ARGV do
  local b = load_budget(ARGV[2], ARGV[i])
  if b then
    out[#out + 1] = {b.unit, budget_json(b)}
    rows[#rows + 1] = b
  end
end
local due = period_due(rows)
if due then
  return due
end
return ok(enc(out))
