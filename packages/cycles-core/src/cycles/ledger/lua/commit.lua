-- rules.commit
-- KEYS: base
-- ARGV: now, reservation id, tenant ('' | '=tenant'), idempotency key, fingerprint, unit, actual,
--       committed metadata json (''), include balances (0/1)
local rid, tenant, key, fingerprint = ARGV[2], opt(ARGV[3]), ARGV[4], ARGV[5]
local unit, actual = ARGV[6], tonumber(ARGV[7])

expire_due(LAZY_EXPIRY)
local row, ikey = settle_prologue('commit', rid, tenant, key, fingerprint)
if not row then
  return ikey
end
if unit ~= row.unit then
  return err('UNIT_MISMATCH_COMMIT', row.unit)
end
local rows = load_budgets(held_scopes(row.budgeted), row.unit)
local due = period_due(rows)
if due then
  return due
end
local charged, denial = settle(rows, row.amount, actual, row.policy, false)
if denial then
  if denial[1] == 'COMMIT_REJECTED' then -- its message names the reservation's scope_path
    denial[4] = raw(redis.call('HGET', rkey(rid), 'info'))
  end
  return err(unpack(denial))
end
local rk = rkey(rid)
redis.call('HSET', rk, 'status', 'COMMITTED', 'committed', charged, 'finalized', now)
if ARGV[8] ~= '' then
  redis.call('HSET', rk, 'cmeta', ARGV[8])
end
finish(rid, now)
local payload
if ARGV[9] == '1' then
  payload = enc({charged, row.amount, row.unit, budgets_json(rows)})
else
  payload = string.format('[%d,%d,"%s",null]', charged, row.amount, row.unit)
end
idem_put(ikey, fingerprint, '', payload)
return ok(payload)
