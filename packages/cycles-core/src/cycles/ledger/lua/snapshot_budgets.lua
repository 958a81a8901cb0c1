-- Read every budget of the slot, after lazy expiry.
-- KEYS: base
-- ARGV: now
expire_due(LAZY_EXPIRY)
local all = redis.call('HGETALL', BUDGETS)
local values = {}
for i = 1, #all, 2 do
  values[all[i]] = all[i + 1]
end
local out = {}
for field, packed in pairs(values) do
  local scope, unit = string.match(field, '^(.+)|([A-Z_]+)$')
  if scope then
    out[#out + 1] = {unit, budget_json(parse_budget(scope, unit, packed, values[field .. '|caps']))}
  end
end
return ok(enc(out))
