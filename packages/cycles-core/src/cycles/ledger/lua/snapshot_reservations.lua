-- Read every reservation of the slot, after expiring all the overdue ones (as listing does in rules).
-- KEYS: base
-- ARGV: now
local _, seen
repeat
  _, seen = expire_due(1000)
until seen < 1000
local out = {}
for _, rid in ipairs(redis.call('ZRANGE', IDX, 0, -1)) do
  local row = reservation_json(rid)
  if row then
    out[#out + 1] = row
  else
    redis.call('ZREM', IDX, rid)
  end
end
return ok(enc(out))
