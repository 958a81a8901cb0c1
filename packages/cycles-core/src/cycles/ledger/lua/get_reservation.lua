-- rules.get_reservation
-- KEYS: base
-- ARGV: now, reservation id, tenant ('' | '=tenant')
local rid = ARGV[2]

expire_due(LAZY_EXPIRY)
local row, e = load_checked(rid, opt(ARGV[3]))
if not row then
  return e
end
if row.st == 'ACTIVE' and now > row.expires + row.grace then
  expire_row(row)
end
if row.st == 'EXPIRED' then
  return err('EXPIRED', row.expires, row.grace)
end
return ok(enc(reservation_json(rid)))
