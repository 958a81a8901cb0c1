-- periods.rollover with the window redis.py computed from the budget's period (Lua has no time-zone
-- calendar), re-checked against this script's clock: a stale or repeated roll changes nothing.
-- KEYS: base
-- ARGV: now, then for each budget: field ("<scope>|<unit>"), end of the stored period, start and end
--       of the new one, whole periods skipped in between
local i = 2
while i + 4 <= #ARGV do
  local field, old_end = ARGV[i], tonumber(ARGV[i + 1])
  local s, e, skipped = tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3]), tonumber(ARGV[i + 4])
  i = i + 5
  local scope, unit = string.match(field, '^(.+)|([A-Z_]+)$')
  local b = scope and load_budget(scope, unit)
  if b and b.period then
    local p = cjson.decode(b.period)
    if p[8] == old_end and now >= old_end then
      if not (s <= now and now < e and s >= old_end) then
        return err('PERIOD_WINDOW', field, s, e)
      end
      local carry = 0
      if p[4] ~= 'NONE' then
        carry = math.max(0, b.a - b.s - b.d) + skipped * p[5]
        if p[4] == 'CAP_AT_ALLOCATED' then
          carry = math.min(carry, p[5])
        end
      end
      b.a = p[5] + carry
      local repay = math.min(b.d, b.a)
      b.s = repay
      b.d = b.d - repay
      reconcile_over_limit(b)
      p[7], p[8] = s, e
      put_budgets({b}, b.field .. '|period', period_text(p))
    end
  end
end
return ok('null')
