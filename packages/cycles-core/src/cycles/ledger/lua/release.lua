-- rules.release
-- KEYS: base
-- ARGV: now, reservation id, tenant ('' | '=tenant'), idempotency key, fingerprint, include balances (0/1)
local rid, tenant, key, fingerprint = ARGV[2], opt(ARGV[3]), ARGV[4], ARGV[5]

expire_due(LAZY_EXPIRY)
local row, ikey = settle_prologue('release', rid, tenant, key, fingerprint)
if not row then
  return ikey
end
local rows = release_hold(row.budgeted, row.unit, row.amount)
redis.call('HSET', rkey(rid), 'status', 'RELEASED', 'finalized', now)
quota_uncount(rid)
finish(rid, now)
local payload = enc({row.amount, row.unit, ARGV[6] == '1' and budgets_json(rows) or NULL})
idem_put(ikey, fingerprint, '', payload)
return ok(payload)
