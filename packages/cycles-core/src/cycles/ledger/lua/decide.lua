-- rules.decide: evaluate without reserving; only the idempotency record is written.
-- KEYS: base, idempotency key
-- ARGV: now, unit, amount, fingerprint, policy version, quota counters json, priority headroom pct,
--       derived scopes...
local unit, amount, fingerprint = ARGV[2], tonumber(ARGV[3]), ARGV[4]
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
local qdenial = quota_gate(ARGV[5], ARGV[6], scopes)
if qdenial then
  return qdenial
end
local rows = load_budgets(scopes, unit)
local due = period_due(rows)
if due then
  return due
end
local denial = verdict(scopes, rows, amount, tonumber(ARGV[7]))
if denial and denial[1] == 'UNIT_MISMATCH_SCOPE' then
  return err(unpack(denial))
end
local payload = enc({caps_list(rows), denial or NULL})
idem_put(KEYS[2], fingerprint, '', payload)
return ok(payload)
