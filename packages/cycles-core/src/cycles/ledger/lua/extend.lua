-- rules.extend
-- KEYS: base
-- ARGV: now, reservation id, tenant ('' | '=tenant'), idempotency key, fingerprint, extend_by_ms
local rid, tenant, key, fingerprint = ARGV[2], opt(ARGV[3]), ARGV[4], ARGV[5]
local extend_by = tonumber(ARGV[6])

expire_due(LAZY_EXPIRY)
local row, e = load_checked(rid, tenant)
if not row then
  return e
end
local ikey = idem_key('extend', tenant or row.tenant or '', key)
local rec = idem_get(ikey, fingerprint)
if rec then
  if rec.mismatch then
    return err('IDEMPOTENCY_MISMATCH')
  end
  return replay(rec.payload, row.st)
end
if row.st == 'COMMITTED' or row.st == 'RELEASED' then
  return err('FINALIZED', row.st)
end
if row.st == 'EXPIRED' or now > row.expires then
  if row.st == 'ACTIVE' and now > row.expires + row.grace then
    expire_row(row)
  end
  return err('EXPIRED', row.expires, row.grace)
end
if row.ext >= MAX_EXTENSIONS then
  return err('MAX_EXTENSIONS', row.ext)
end
local expires = row.expires + extend_by
redis.call('HSET', rkey(rid), 'expires', expires, 'ext', row.ext + 1)
redis.call('ZADD', IDX, expires + row.grace, rid)
keep_key(rid, expires + row.grace)
local payload = enc({expires})
idem_put(ikey, fingerprint, '', payload)
return ok(payload)
