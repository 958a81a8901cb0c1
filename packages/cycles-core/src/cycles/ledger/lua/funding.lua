-- rules.fund + rules.apply_funding: one funding operation of the governance spec, atomic.
-- KEYS: base
-- ARGV: now, scope, unit, operation, amount, spent ('' for none), idempotency key ('' for none),
--       fingerprint, idempotency tenant
-- Payload (what a replay returns): [funded at, budget before, budget after] (budget_json rows).
local scope, unit, op, amount = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local spent_arg, key, fingerprint = ARGV[6], ARGV[7], ARGV[8]

local ikey
if key ~= '' then
  ikey = idem_key('fund', ARGV[9], key)
  local rec = idem_get(ikey, fingerprint)
  if rec then
    if rec.mismatch then
      return err('IDEMPOTENCY_MISMATCH')
    end
    return replay(rec.payload)
  end
end
local b, reply = funding_target(scope, unit)
if not b then
  return reply
end
if b.st == 'FROZEN' then
  return err('BUDGET_FROZEN', scope)
end
local a, s, d = b.a, b.s, b.d
if op == 'CREDIT' then
  a = a + amount
elseif op == 'DEBIT' then
  if remaining(b) - amount < 0 then
    return err('DEBIT_SHORT', remaining(b), amount)
  end
  a = a - amount
elseif op == 'RESET' then
  a = amount
elseif op == 'RESET_SPENT' then
  a, s = amount, (spent_arg ~= '' and tonumber(spent_arg) or 0)
else -- REPAY_DEBT: the consumption that ran into debt is paid for, and becomes spent
  if amount > d then
    return err('REPAY_EXCEEDS', d, amount)
  end
  a, s, d = a + amount, s + amount, d - amount
end
if math.max(a, s) > MAX_AMOUNT then
  return err('TOO_LARGE', math.max(a, s))
end
local before = budget_json(b)
b.a, b.s, b.d = a, s, d
if b.s + b.r > b.a then
  b.x = true -- a ceiling below what is already used: no new work until funded
else
  reconcile_over_limit(b)
end
put_budgets({b})
local payload = enc({now, before, budget_json(b)})
if ikey then
  idem_put(ikey, fingerprint, '', payload)
end
return ok(payload)
