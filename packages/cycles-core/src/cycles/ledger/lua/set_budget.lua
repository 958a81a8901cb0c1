-- rules.set_budget: create a budget or change its allocation; spent, reserved and debt are kept.
-- KEYS: base
-- ARGV: now, scope, unit, amount, overdraft_limit ('' keeps it), caps json ('' keeps them, 'null' clears),
--       period ('' keeps it, 'none' removes it, else a new periods.PeriodState JSON)
local scope, unit, amount, overdraft, caps = ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5], ARGV[6]
local period_arg = ARGV[7] or ''

expire_due(LAZY_EXPIRY)
local b = load_budget(scope, unit)
if b == nil then
  b = {scope = scope, unit = unit, field = scope .. '|' .. unit, a = 0, s = 0, r = 0, d = 0, o = 0, x = false,
       st = 'ACTIVE', caps = nil}
  if redis.call('EXISTS', BUDGETS) == 0 then -- a fresh slot: nothing written before the index
    redis.call('SET', base .. 'bixv', '1')
  end
  redis.call('ZADD', BUDGET_INDEX, 0, scope .. '\0' .. unit)
end
if b.st == 'CLOSED' then
  return err('BUDGET_CLOSED', scope)
end
local due = period_due({b})
if due then
  return due
end
-- rules.configure_period: the same period again keeps its window; another one starts now.
if period_arg == 'none' then
  b.period = nil
  redis.call('HDEL', BUDGETS, b.field .. '|period')
elseif period_arg ~= '' or b.period then
  local p = cjson.decode(period_arg ~= '' and period_arg or b.period)
  if period_arg ~= '' and b.period then
    local cur = cjson.decode(b.period)
    if cur[1] == p[1] and cur[2] == p[2] and cur[3] == p[3] then
      p[6], p[7], p[8] = cur[6], cur[7], cur[8]
    end
  end
  p[5] = amount
  b.period = period_text(p)
  redis.call('HSET', BUDGETS, b.field .. '|period', b.period)
end
b.a = amount
if overdraft ~= '' then
  b.o = tonumber(overdraft)
end
reconcile_over_limit(b)
if caps == 'null' then
  b.caps = nil
  redis.call('HDEL', BUDGETS, b.field .. '|caps')
  put_budgets({b})
elseif caps ~= '' then
  b.caps = caps
  put_budgets({b}, b.field .. '|caps', caps)
else
  put_budgets({b})
end
return ok(enc(budget_json(b)))
