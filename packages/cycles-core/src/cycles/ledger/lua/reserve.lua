-- rules.reserve (and its dry run).
-- KEYS: base, idempotency key
-- ARGV: now, unit, amount, ttl_ms, grace_period_ms, overage_policy, dry_run (0/1), reservation id,
--       fingerprint, owner ('' | '=tenant'), info json, include balances (0/1), policy version,
--       quota counters json (see quota_gate), priority headroom pct,
--       max ACTIVE reservations of the owner (0: no limit), derived scopes...
local unit, amount = ARGV[2], tonumber(ARGV[3])
local ttl, grace, policy, dry = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6], ARGV[7] == '1'
local rid, fingerprint, owner = ARGV[8], ARGV[9], opt(ARGV[10])
local scopes = {}
local active_limit = tonumber(ARGV[16])
for i = 17, #ARGV do
  scopes[#scopes + 1] = ARGV[i]
end

expire_due(LAZY_EXPIRY)
local rec = idem_get(KEYS[2], fingerprint)
if rec then
  if rec.mismatch then
    return err('IDEMPOTENCY_MISMATCH')
  end
  local status = ''
  if rec.aux ~= '' then
    status = redis.call('HGET', rkey(rec.aux), 'status') or ''
  end
  return replay(rec.payload, status)
end

local qdenial, counters = quota_gate(ARGV[13], ARGV[14], scopes)
if qdenial then
  return qdenial
end
local rows, hint = load_budgets(scopes, unit, '~hint')
local due = period_due(rows)
if due then
  return due
end
local pct = tonumber(ARGV[15])
local denial = verdict(scopes, rows, amount, pct)
if denial and (denial[1] == 'BUDGET_EXCEEDED' or denial[1] == 'HEADROOM') and not dry then
  -- Lazy expiry: budget held by dead clients goes back before we say no.
  if expire_due(1000) > 0 then
    rows, hint = load_budgets(scopes, unit, '~hint')
    denial = verdict(scopes, rows, amount, pct)
  end
end

if dry then
  if denial and denial[1] == 'UNIT_MISMATCH_SCOPE' then
    return err(unpack(denial))
  end
  local payload = enc({NULL, NULL, budgets_json(rows), denial or NULL, caps_list(rows)})
  idem_put(KEYS[2], fingerprint, '', payload)
  return ok(payload)
end
if denial then
  return err(unpack(denial))
end
local active = math.max(0, tonumber(redis.call('HGET', ACTIVE, owner or '') or '0'))
if active_limit > 0 and active >= active_limit then
  return err('LIMIT_EXCEEDED', active)
end

local expires = now + ttl
local deadline = expires + grace
local budgeted = {}
for i, b in ipairs(rows) do
  b.r = b.r + amount
  budgeted[i] = b.scope
end
local new_hint, publish = hint_for(deadline, hint)
if new_hint then
  put_budgets(rows, '~hint', new_hint)
else
  put_budgets(rows)
end
local rk = rkey(rid)
if owner ~= nil then
  redis.call('HSET', rk, 'status', 'ACTIVE', 'unit', unit, 'amount', amount, 'budgeted', table.concat(budgeted, ' '),
    'created', now, 'expires', expires, 'grace', grace, 'policy', policy, 'ext', 0, 'info', ARGV[11],
    'tenant', owner)
else
  redis.call('HSET', rk, 'status', 'ACTIVE', 'unit', unit, 'amount', amount, 'budgeted', table.concat(budgeted, ' '),
    'created', now, 'expires', expires, 'grace', grace, 'policy', policy, 'ext', 0, 'info', ARGV[11])
end
if redis.call('ZCARD', IDX) == 0 then -- a fresh slot: nothing written before the listing index
  redis.call('SET', base .. 'ixv', '1')
end
redis.call('ZADD', IDX, deadline, rid)
local crossed = quota_count(counters, rid)
redis.call('ZADD', owner_index(owner), 0, index_member(now, rid))
redis.call('HSET', ACTIVE, owner or '', active + 1)
keep_key(rid, deadline)
local payload -- the hot path formats its reply directly (enc() costs about 2 us here)
if ARGV[12] == '1' then
  payload = enc({rid, expires, budgets_json(rows), NULL, caps_list(rows)})
else
  payload = string.format('["%s",%d,null,null,%s]', rid, expires, enc(caps_list(rows)))
end
idem_put(KEYS[2], fingerprint, rid, payload)
if #crossed > 0 then -- quota thresholds reached (redis.py announces them): a fifth element
  return string.sub(ok(payload, publish), 1, -2) .. ',' .. enc(crossed) .. ']'
end
return ok(payload, publish)
