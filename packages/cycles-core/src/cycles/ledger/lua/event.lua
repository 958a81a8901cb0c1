-- rules.event: post-only accounting, charged under the event's overage policy.
-- KEYS: base, idempotency key
-- ARGV: now, unit, actual, overage_policy, fingerprint, event id, include balances (0/1), derived scopes...
local unit, actual, policy, fingerprint, event_id = ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5], ARGV[6]
local scopes = {}
for i = 8, #ARGV do
  scopes[#scopes + 1] = ARGV[i]
end

expire_due(LAZY_EXPIRY)
local rec = idem_get(KEYS[2], fingerprint)
if rec then
  if rec.mismatch then
    return err('IDEMPOTENCY_MISMATCH')
  end
  return replay(rec.payload)
end
local rows = load_budgets(scopes, unit)
local due = period_due(rows)
if due then
  return due
end
if #rows == 0 then
  return err(unpack(missing_budget(scopes)))
end
local denial = status_denial(rows)
if denial then
  return err(unpack(denial))
end
local charged
charged, denial = settle(rows, 0, actual, policy, true)
if denial then
  return err(unpack(denial))
end
local payload = enc({event_id, charged, ARGV[7] == '1' and budgets_json(rows) or NULL})
idem_put(KEYS[2], fingerprint, '', payload)
return ok(payload)
