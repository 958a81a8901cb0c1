-- periods.rollover with the window redis.py computed from the budget's period (Lua has no time-zone
-- calendar), re-checked against this script's clock: a stale or repeated roll changes nothing.
-- KEYS: base
-- ARGV: now, then for each budget: field ("<scope>|<unit>"), end of the stored period, start and end
--       of the new one, whole periods skipped in between
local function carry_of(policy, base, unused)
  if policy == 'NONE' then
    return 0
  end
  unused = math.max(0, unused)
  if policy == 'CAP_AT_ALLOCATED' then
    return math.min(unused, base)
  end
  return unused
end

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
      -- periods.rollover: as if the boundaries passed one at a time (debt repaid from each allocation)
      local base, policy, steps = p[5], p[4], skipped + 1
      local a, sp, d = b.a, b.s, b.d
      if steps > 0 and d > 0 then -- the first boundary: what the ended period left unused may carry
        a = base + carry_of(policy, base, a - sp - d)
        sp = math.min(d, a)
        d = d - sp
        steps = steps - 1
      end
      if steps > 0 and d > 0 and base > 0 then -- later ones: nothing is unused while in debt
        local full = math.min(steps, math.floor(d / base))
        if full > 0 then
          a, sp, d, steps = base, base, d - full * base, steps - full
        end
        if steps > 0 and d > 0 then -- less than an allocation left: the next one repays it
          a, sp, d, steps = base, d, 0, steps - 1
        end
      elseif steps > 0 and d > 0 then -- no allocation: later periods have nothing, and the debt stays
        a, sp, steps = 0, 0, 0
      end
      if steps > 0 and d == 0 then -- the remaining boundaries, debt-free, in closed form
        local first = base + carry_of(policy, base, a - sp)
        if policy == 'CARRY_FORWARD' then
          a = first + (steps - 1) * base
        elseif policy == 'CAP_AT_ALLOCATED' then
          a = (steps == 1) and first or (base + math.min(first, base))
        else
          a = base
        end
        sp = 0
      end
      b.a, b.s, b.d = a, sp, d
      reconcile_over_limit(b)
      p[7], p[8] = s, e
      put_budgets({b}, b.field .. '|period', period_text(p))
    end
  end
end
return ok('null')
