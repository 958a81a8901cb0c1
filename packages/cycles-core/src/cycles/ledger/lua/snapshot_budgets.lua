-- Read every budget of the slot, after lazy expiry.
-- KEYS: base
-- ARGV: now
expire_due(LAZY_EXPIRY)
local all = redis.call('HGETALL', BUDGETS)
local values = {}
for i = 1, #all, 2 do
  values[all[i]] = all[i + 1]
end
local out, rows = {}, {}
for field, packed in pairs(values) do
  local scope, unit = string.match(field, '^(.+)|([A-Z_]+)$')
  if scope then
    local b = parse_budget(scope, unit, packed, values[field .. '|caps'], values[field .. '|period'])
    out[#out + 1] = {unit, budget_json(b)}
    rows[#rows + 1] = b
  end
end
local due = period_due(rows)
if due then
  return due
end
return ok(enc(out))
