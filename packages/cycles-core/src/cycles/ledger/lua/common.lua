-- The library of the Cycles scripts. redis.py links into each operation script the definitions
-- below that it uses (directly or through one another), then the operation itself.
-- It mirrors cycles/ledger/rules.py (expiry, evaluation order, overage policies, idempotency);
-- the contract and differential tests hold both to the same behaviour.
--
-- KEYS[1] is the slot base "<prefix>:{<tag>}:". Every key a script touches is that base plus a
-- suffix, so all of them share the tenant's hash tag and live in one Redis Cluster slot:
--   budgets       hash: "<scope>|<unit>" -> "allocated,spent,reserved,debt,overdraft_limit,over_limit,status",
--                 "<scope>|<unit>|caps" -> caps JSON, "~hint" -> "<score>,<published at>" (see hint_for),
--                 "<scope>|<unit>|period" -> a recurring budget's period (periods.PeriodState JSON)
--   r:<id>        hash: a reservation (see RFIELDS)
--   idx           zset: reservation id -> its deadline while ACTIVE, its purge time once finished
--   ix:<owner>    zset (all scores 0): "<created_at_ms, 13 digits>:<id>" of each reservation the
--                 owner ('' for none) holds in the slot, for keyset-paged listing (read by redis.py)
--   active        hash: owner -> how many ACTIVE reservations it holds in the slot
--   bix           zset (all scores 0): "<scope>\0<unit>" of each budget, for keyset-paged balances
--   i:<endpoint>:<tenant>:<key>   string: an idempotency record
-- A slot's budgets are one hash so that the derived scopes of an operation are read with one
-- HMGET and written with one HSET: in these scripts the cost is mostly the number of calls.
-- ARGV[1] is the time in ms, or '' to use the server clock (TIME), the authoritative one.
--
-- Numbers: Lua 5.1 numbers are doubles, exact for integers up to 2^53; redis.py refuses larger
-- amounts. Numbers written into strings go through string.format('%d'), never tostring() (%.14g).
-- Replies are JSON arrays: ["OK", now, payload, extra] | ["R", now, payload, extra] (an idempotent
-- replay) | ["E", error_tag, args...]. Payloads are what idempotency records keep.

local base = KEYS[1]
local now
if ARGV[1] ~= '' then
  now = tonumber(ARGV[1])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local MAX_EXTENSIONS = @MAX_EXTENSIONS@
local RETENTION_MS = @RETENTION_MS@
local LAZY_EXPIRY = @LAZY_EXPIRY@
local UNITS = {@UNITS@}
local MAX_AMOUNT = 9007199254740991
local KEY_SAFETY_MS = 3600000
local BUDGETS = base .. 'budgets'
local POLICY = base .. 'policy'
local IDX = base .. 'idx'
local ACTIVE = base .. 'active'
local BUDGET_INDEX = base .. 'bix'

local NULL = {}

local function fmt(n)
  return string.format('%d', n)
end

local function esc(c)
  return string.format('\\u%04x', string.byte(c))
end

local enc
enc = function(v)
  local t = type(v)
  if t == 'number' then
    return string.format('%d', v)
  elseif t == 'string' then
    if string.find(v, '[%c"\\]') then
      v = string.gsub(v, '[%c"\\]', esc)
    end
    return '"' .. v .. '"'
  elseif t == 'boolean' then
    return v and 'true' or 'false'
  elseif v == NULL then
    return 'null'
  elseif v.json then
    return v.json
  end
  local parts = {}
  for i = 1, #v do
    parts[i] = enc(v[i])
  end
  return '[' .. table.concat(parts, ',') .. ']'
end

local function raw(s)
  if s == nil or s == false or s == '' then
    return NULL
  end
  return {json = s}
end

local function ok(payload, extra)
  return '["OK",' .. fmt(now) .. ',' .. payload .. ',' .. enc(extra == nil and NULL or extra) .. ']'
end

local function err(...)
  return enc({'E', ...})
end

-- ---- budgets ---------------------------------------------------------------------------------

-- A budget row from its packed value (nil when there is no such budget).
local function parse_budget(scope, unit, packed, caps, period)
  if not packed then
    return nil
  end
  local a, s, r, d, o, x, st = string.match(packed, '^([^,]+),([^,]+),([^,]+),([^,]+),([^,]+),([^,]+),(.+)$')
  return {
    scope = scope, unit = unit, field = scope .. '|' .. unit,
    a = tonumber(a), s = tonumber(s), r = tonumber(r), d = tonumber(d), o = tonumber(o),
    x = x == '1', st = st, caps = caps or nil, period = period or nil,
  }
end

-- The budgets that exist among `scopes` in `unit`, in scope order (one HMGET). With `extra`
-- fields, their values come back too, after the rows.
local function load_budgets(scopes, unit, ...)
  local fields = {}
  for i, scope in ipairs(scopes) do
    local field = scope .. '|' .. unit
    fields[3 * i - 2] = field
    fields[3 * i - 1] = field .. '|caps'
    fields[3 * i] = field .. '|period'
  end
  local n = #fields
  for i, extra in ipairs({...}) do
    fields[n + i] = extra
  end
  local values = redis.call('HMGET', BUDGETS, unpack(fields))
  local rows = {}
  for i, scope in ipairs(scopes) do
    local b = parse_budget(scope, unit, values[3 * i - 2], values[3 * i - 1], values[3 * i])
    if b then
      rows[#rows + 1] = b
    end
  end
  return rows, unpack(values, n + 1)
end

local function load_budget(scope, unit)
  return (load_budgets({scope}, unit))[1]
end

-- The budgets of `scope` that exist in the units ARGV[first], ARGV[first + 1], ... (in that order).
local function load_scope_units(scope, first)
  local rows = {}
  for i = first, #ARGV do
    local b = load_budget(scope, ARGV[i])
    if b then
      rows[#rows + 1] = b
    end
  end
  return rows
end

local function remaining(b)
  return b.a - b.s - b.r - b.d
end

local function pack_budget(b)
  return string.format('%d,%d,%d,%d,%d,%d,%s', b.a, b.s, b.r, b.d, b.o, b.x and 1 or 0, b.st)
end

-- Write budget rows (one HSET), plus any extra field/value pairs.
local function put_budgets(rows, ...)
  local args = {...}
  for _, b in ipairs(rows) do
    args[#args + 1] = b.field
    args[#args + 1] = pack_budget(b)
  end
  if #args > 0 then
    redis.call('HSET', BUDGETS, unpack(args))
  end
end

local function budget_json(b)
  return {b.scope, b.a, b.s, b.r, b.d, b.o, b.x and 1 or 0, b.st, b.caps or NULL, raw(b.period)}
end

-- periods.py: a budget whose period has ended rolls over before anything reads or charges it. The
-- new window needs the calendar of a time zone, which Lua lacks: refuse with PERIOD_ROLL (nothing
-- written by the operation yet); redis.py computes the window, runs roll.lua, then this script again.
local function period_due(rows)
  local due = {}
  for _, b in ipairs(rows) do
    if b.period and now >= cjson.decode(b.period)[8] then
      due[#due + 1] = b.field
      due[#due + 1] = {json = b.period}
    end
  end
  if #due > 0 then
    return err('PERIOD_ROLL', now, unpack(due))
  end
  return nil
end

-- periods.PeriodState.dumps, byte for byte (cjson would print large integers as %.14g).
local function period_text(p)
  return '[' .. enc(p[1]) .. ',' .. enc(p[2]) .. ',' .. fmt(p[3]) .. ',' .. enc(p[4]) .. ',' .. fmt(p[5]) .. ','
    .. fmt(p[6]) .. ',' .. fmt(p[7]) .. ',' .. fmt(p[8]) .. ']'
end

local function budgets_json(rows)
  local out = {}
  for i = 1, #rows do
    out[i] = budget_json(rows[i])
  end
  return out
end

-- The caps of the budgets that have some, in scope order (redis.py merges them as rules does).
local function caps_list(rows)
  local out = {}
  for _, b in ipairs(rows) do
    if b.caps then
      out[#out + 1] = b.caps
    end
  end
  return out
end

-- The units a scope has budgets in (rules: Txn.budget_units), in the fixed UNITS order.
local function budget_units(scope)
  local fields = {}
  for i, u in ipairs(UNITS) do
    fields[i] = scope .. '|' .. u
  end
  local values = redis.call('HMGET', BUDGETS, unpack(fields))
  local units = {}
  for i, u in ipairs(UNITS) do
    if values[i] then
      units[#units + 1] = u
    end
  end
  return units
end

-- rules._missing_budget: UNIT_MISMATCH when a derived scope has a budget in another unit.
local function missing_budget(scopes)
  for i = 1, #scopes do
    local units = budget_units(scopes[i])
    if #units > 0 then
      return {'UNIT_MISMATCH_SCOPE', scopes[i], units}
    end
  end
  return {'BUDGET_NOT_FOUND'}
end

-- rules._status_denial
local function status_denial(rows)
  for _, b in ipairs(rows) do
    if b.st == 'CLOSED' then
      return {'BUDGET_CLOSED', b.scope}
    end
  end
  for _, b in ipairs(rows) do
    if b.st == 'FROZEN' then
      return {'BUDGET_FROZEN', b.scope}
    end
  end
  return nil
end

-- rules.evaluate over rows already loaded: status, over-limit, debt, remaining, then the headroom
-- a prioritised reservation leaves (pct of each allocation; quotas.PRIORITY_HEADROOM_PCT).
local function verdict(scopes, rows, amount, pct)
  if #rows == 0 then
    return missing_budget(scopes)
  end
  local denial = status_denial(rows)
  if denial then
    return denial
  end
  for _, b in ipairs(rows) do
    if b.x then
      return {'OVER_LIMIT', b.scope, b.d, b.o}
    end
  end
  for _, b in ipairs(rows) do
    if b.d > 0 and b.o == 0 then
      return {'DEBT_OUTSTANDING', b.scope, b.d}
    end
  end
  for _, b in ipairs(rows) do
    local rem = remaining(b)
    if rem < amount then
      return {'BUDGET_EXCEEDED', b.scope, rem, amount}
    end
  end
  if pct and pct > 0 then
    for _, b in ipairs(rows) do
      local rem = remaining(b)
      -- allocated * pct // 100 without leaving exact doubles for large allocations
      if rem - amount < math.floor(b.a / 100) * pct + math.floor((b.a % 100) * pct / 100) then
        return {'HEADROOM', b.scope, rem, amount, pct}
      end
    end
  end
  return nil
end

-- rules._settle_budgets: move `held` to spent at `actual`; checks first, writes after.
-- is_event: an event has nothing reserved; REJECT then refuses only what does not fit.
-- Returns charged, or nil and an error.
local function settle(rows, held, actual, policy, is_event)
  local delta = actual - held
  local charged = actual
  if delta > 0 and policy == 'REJECT' and not is_event then
    -- REJECT on commit refuses any overage: the client had to reserve a buffer.
    return nil, {'COMMIT_REJECTED', actual, held}
  end
  if delta > 0 then
    local short = {}
    local worst, worst_rem
    for _, b in ipairs(rows) do
      local rem = remaining(b)
      if rem < delta then
        short[#short + 1] = b
        if worst == nil or rem < worst_rem then
          worst, worst_rem = b, rem
        end
      end
    end
    if #short > 0 then
      if policy == 'REJECT' then -- events: refuse what does not fit
        return nil, {'EVENT_REJECTED', worst.scope, worst_rem, delta}
      end
      if policy == 'ALLOW_WITH_OVERDRAFT' then
        for _, b in ipairs(short) do
          local shortfall = delta - math.max(0, remaining(b))
          if b.d + shortfall > b.o then
            return nil, {'OVERDRAFT', b.scope, b.d, shortfall, b.o}
          end
        end
        for _, b in ipairs(rows) do
          local shortfall = math.max(0, delta - math.max(0, remaining(b)))
          b.r = math.max(0, b.r - held)
          b.s = b.s + actual - shortfall
          b.d = b.d + shortfall
          if b.d > b.o then
            b.x = true
          end
        end
        put_budgets(rows)
        return actual
      end
      -- ALLOW_IF_AVAILABLE: charge what every scope can cover; flag the ones that could not.
      local capped
      for _, b in ipairs(rows) do
        local rem = remaining(b)
        if capped == nil or rem < capped then
          capped = rem
        end
      end
      charged = held + math.min(delta, math.max(0, capped))
      for _, b in ipairs(short) do
        b.x = true
      end
    end
  end
  for _, b in ipairs(rows) do
    b.r = math.max(0, b.r - held)
    b.s = b.s + charged
  end
  put_budgets(rows)
  return charged
end

-- rules._reconcile_over_limit
local function reconcile_over_limit(b)
  if b.x and b.d <= b.o and remaining(b) >= 0 then
    b.x = false
  end
end

-- ---- reservations ----------------------------------------------------------------------------

local function rkey(rid)
  return base .. 'r:' .. rid
end

-- A reservation hash: status, tenant (absent for none), unit, amount, budgeted (the scopes held,
-- space-separated), created, expires, grace, policy, ext (extensions), committed, finalized, info
-- (redis.py's JSON [subject, action, metadata, idempotency key], opaque here), cmeta.
local RFIELDS = {'status', 'tenant', 'unit', 'amount', 'budgeted', 'created', 'expires', 'grace', 'policy',
  'committed', 'finalized', 'ext', 'info', 'cmeta'}

local function load_reservation(rid)
  local f = redis.call('HMGET', rkey(rid), 'status', 'tenant', 'unit', 'amount', 'budgeted', 'expires', 'grace',
    'policy', 'ext')
  if not f[1] then
    return nil
  end
  return {
    id = rid, st = f[1], tenant = f[2] or nil, unit = f[3], amount = tonumber(f[4]), budgeted = f[5],
    expires = tonumber(f[6]), grace = tonumber(f[7]), policy = f[8], ext = tonumber(f[9]),
  }
end

-- The full row, as redis.py's decoder reads it (positional, raw JSON embedded).
local function reservation_json(rid)
  local f = redis.call('HMGET', rkey(rid), unpack(RFIELDS))
  if not f[1] then
    return nil
  end
  local function num(v)
    if v then return tonumber(v) end
    return NULL
  end
  local function str(v)
    if v then return v end
    return NULL
  end
  return {
    rid, f[1], str(f[2]), f[3], tonumber(f[4]), f[5], tonumber(f[6]), tonumber(f[7]), tonumber(f[8]), f[9],
    num(f[10]), num(f[11]), tonumber(f[12]), raw(f[13]), raw(f[14]),
  }
end

-- The key outlives the reservation's deadline by the retention (rules.purge) plus an hour, a
-- safety net for a slot nothing ever visits again; normally the index purges it first.
local function keep_key(rid, deadline)
  redis.call('PEXPIRE', rkey(rid), math.max(KEY_SAFETY_MS, deadline + RETENTION_MS + KEY_SAFETY_MS - now))
end

-- The listing index of an owner's reservations in this slot, and a reservation's entry there.
local function owner_index(owner)
  return base .. 'ix:' .. (owner or '')
end

local function index_member(created, rid)
  return string.format('%013d', created) .. ':' .. rid
end

-- A finished reservation stays readable for RETENTION_MS after it finished, then is purged.
-- It no longer counts against its owner's ACTIVE limit.
local function finish(rid, finished_at)
  redis.call('ZADD', IDX, finished_at + RETENTION_MS, rid)
  redis.call('HINCRBY', ACTIVE, redis.call('HGET', rkey(rid), 'tenant') or '', -1)
end

-- The scopes a reservation holds (stored space-separated).
local function held_scopes(budgeted)
  local scopes = {}
  for scope in string.gmatch(budgeted, '%S+') do
    scopes[#scopes + 1] = scope
  end
  return scopes
end

-- The budgets a reservation held get its amount back (one HMGET, one HSET).
local function release_hold(budgeted, unit, amount)
  local rows = load_budgets(held_scopes(budgeted), unit)
  for _, b in ipairs(rows) do
    b.r = math.max(0, b.r - amount)
  end
  put_budgets(rows)
  return rows
end

-- ---- action quotas (rules.gate_quotas / count_quotas / uncount_quotas) ---------------------------
-- "<p>:{t}:policy" hash: scope -> its quotas.ScopePolicy JSON, "~v" -> a version bumped on every
-- change. Which counters apply is decided in Python (quotas.plan, over the policies it caches by
-- version); a script checks that version, then the counters, atomically with the budget.
-- Counters are "<p>:{t}:q:<scope>|<kind or __risk__:class>|<window>|<bucket>" =
-- "<count>,<expires at>,<limit>,<ttl ms>,<last increment at>" (rules' "qc|" entries,
-- counters.CounterValue: the script's clock decides when a count lapses), with a key TTL an hour
-- longer for cleanup. Operators list them in name order from QINDEX (zset, all scores 0) and
-- QEXPIRY (zset: name -> expiry when indexed) lets writers drop lapsed names, as
-- rules.purge_quota_counters does with the "qx|" entries.
local QINDEX = base .. 'qix'
local QEXPIRY = base .. 'qixe'

-- The live count of a counter key (0 once lapsed), its expiry, and the rest of its value
-- (',<limit>,<ttl>,<last>' or '' for a value written before those were kept).
local function quota_read(k)
  local v = redis.call('GET', k)
  if not v then
    return 0, 0, ''
  end
  local n, exp, rest = string.match(v, '^(%d+),(%d+)(.*)$')
  n, exp = tonumber(n), tonumber(exp)
  if exp <= now then
    return 0, exp, rest
  end
  return n, exp, rest
end

-- Forget up to two names whose counters lapsed (a re-counted one is indexed at its new expiry):
-- every new counter pays for the cleanup of two old ones, so the index tracks the live counters.
local function quota_prune()
  local due = redis.call('ZRANGEBYSCORE', QEXPIRY, '-inf', now, 'LIMIT', 0, 2)
  for _, name in ipairs(due) do
    local _, exp = quota_read(base .. 'q:' .. name)
    if exp > now then
      redis.call('ZADD', QEXPIRY, exp, name)
    else
      redis.call('ZREM', QINDEX, name)
      redis.call('ZREM', QEXPIRY, name)
      redis.call('DEL', base .. 'q:' .. name)
    end
  end
end

-- '' or an error reply (POLICY: the caller's policies are stale, here are the current ones;
-- QUOTA: the counts, some at their limit), and the counters to increment on a grant.
local function quota_gate(version, plan, scopes)
  local v = redis.call('HGET', POLICY, '~v')
  if not v then
    return nil, {}
  end
  if v ~= version then
    local docs = redis.call('HMGET', POLICY, unpack(scopes))
    local out = {}
    for i = 1, #scopes do
      out[i] = docs[i] or NULL
    end
    return err('POLICY', v, out), nil
  end
  if plan == '' then
    return nil, {}
  end
  local counters = cjson.decode(plan) -- [[counter, limit, ttl ms, per_run 0/1], ...]
  local counts, over = {}, false
  for i, c in ipairs(counters) do
    counts[i] = quota_read(base .. 'q:' .. c[1])
    if counts[i] >= c[2] then
      over = true
    end
  end
  if over then
    return err('QUOTA', counts), nil
  end
  return nil, counters
end

-- +1 on every counter, TTL refreshed; the per_run ones are remembered on the reservation.
-- Returns the counters that reached their threshold count (c[5]) in this window instance for the
-- first time, as {index, used} (rules.count_quotas: once per window, marked in the value).
local function quota_count(counters, rid)
  local runs, created, crossed = {}, false, {}
  for i, c in ipairs(counters) do
    local k = base .. 'q:' .. c[1]
    local n, was, rest = quota_read(k)
    local alerted = was > now and string.match(rest, '^,%d+,%d+,%d+,1$') ~= nil -- a new window starts over
    local flag = alerted
    if not alerted and c[5] and c[5] > 0 and n + 1 >= c[5] then
      crossed[#crossed + 1] = {i - 1, n + 1}
      flag = true
    end
    local exp = now + c[3]
    redis.call('SET', k, fmt(n + 1) .. ',' .. fmt(exp) .. ',' .. fmt(c[2]) .. ',' .. fmt(c[3]) .. ',' .. fmt(now)
      .. (flag and ',1' or ',0'), 'PX', c[3] + KEY_SAFETY_MS)
    if n == 0 then -- new (or lapsed): listed from now on; a refreshed one is re-indexed when reached
      redis.call('ZADD', QINDEX, 0, c[1])
      redis.call('ZADD', QEXPIRY, exp, c[1])
      created = true
    end
    if c[4] == 1 then
      runs[#runs + 1] = c[1]
    end
  end
  if created then
    quota_prune()
  end
  if #runs > 0 then
    redis.call('HSET', rkey(rid), 'qk', table.concat(runs, '\30'))
  end
  return crossed
end

-- PER_RUN COUNTER LIFECYCLE: a released or expired reservation gives its per_run counts back.
local function quota_uncount(rid)
  local qk = redis.call('HGET', rkey(rid), 'qk')
  if qk then
    for counter in string.gmatch(qk, '[^\30]+') do
      local k = base .. 'q:' .. counter
      local n, exp, rest = quota_read(k)
      if n > 0 then
        redis.call('SET', k, fmt(n - 1) .. ',' .. fmt(exp) .. rest, 'KEEPTTL')
      end
    end
  end
end

-- rules._expire: the amount goes back to every scope the reservation held.
local function expire_row(row)
  release_hold(row.budgeted, row.unit, row.amount)
  quota_uncount(row.id)
  redis.call('HSET', rkey(row.id), 'status', 'EXPIRED')
  row.st = 'EXPIRED'
  finish(row.id, row.expires + row.grace)
end

-- rules.expire_due over this slot, for the entries of the index whose time has come: ACTIVE
-- reservations past their deadline expire (counted), finished ones past retention are purged.
-- Returns how many expired, and how many entries it looked at.
local function expire_due(limit)
  if limit <= 0 then
    return 0, 0
  end
  local ids = redis.call('ZRANGEBYSCORE', IDX, '-inf', '(' .. fmt(now), 'LIMIT', 0, limit)
  local n = 0
  for _, rid in ipairs(ids) do
    local row = load_reservation(rid)
    if row == nil then
      redis.call('ZREM', IDX, rid)
    elseif row.st == 'ACTIVE' then
      if now > row.expires + row.grace then
        expire_row(row)
        n = n + 1
      end
    else
      local f = redis.call('HMGET', rkey(rid), 'tenant', 'created')
      if f[2] then
        redis.call('ZREM', owner_index(f[1]), index_member(tonumber(f[2]), rid))
      end
      redis.call('DEL', rkey(rid))
      redis.call('ZREM', IDX, rid)
    end
  end
  return n, #ids
end

-- ---- idempotency -----------------------------------------------------------------------------
-- A record is "<fingerprint>\n<aux>\n<payload>", kept RETENTION_MS (key TTL). aux is the
-- reservation id a replay needs to recompute remaining_ttl_ms (reserve), else ''.

local function idem_get(key, fingerprint)
  local rec = redis.call('GET', key)
  if not rec then
    return nil
  end
  local i = string.find(rec, '\n', 1, true)
  local j = string.find(rec, '\n', i + 1, true)
  if string.sub(rec, 1, i - 1) ~= fingerprint then
    return {mismatch = true}
  end
  return {aux = string.sub(rec, i + 1, j - 1), payload = string.sub(rec, j + 1)}
end

local function idem_put(key, fingerprint, aux, payload)
  redis.call('SET', key, fingerprint .. '\n' .. aux .. '\n' .. payload, 'PX', RETENTION_MS)
end

local function replay(payload, extra)
  return '["R",' .. fmt(now) .. ',' .. payload .. ',' .. enc(extra == nil and NULL or extra) .. ']'
end

local function idem_key(endpoint, idem_tenant, key)
  return base .. 'i:' .. endpoint .. ':' .. idem_tenant .. ':' .. key
end

-- '' is "no tenant" (None); '=x' is tenant x.
local function opt(v)
  if v == '' then
    return nil
  end
  return string.sub(v, 2)
end

-- rules._load_reservation + rules._check_tenant. Returns row, or nil and an error reply.
local function load_checked(rid, tenant)
  local row = load_reservation(rid)
  if not row then
    return nil, err('RESERVATION_NOT_FOUND')
  end
  if tenant ~= nil and row.tenant ~= tenant then
    return nil, err('FORBIDDEN')
  end
  return row
end

-- rules._ensure_settleable. Returns an error reply, or nil.
local function settleable(row)
  if row.st == 'COMMITTED' or row.st == 'RELEASED' then
    return err('FINALIZED', row.st)
  end
  if row.st == 'EXPIRED' then
    return err('EXPIRED', row.expires, row.grace)
  end
  if now > row.expires + row.grace then
    expire_row(row)
    return err('EXPIRED', row.expires, row.grace)
  end
  return nil
end

-- rules._settle_prologue: what commit and release check first. Returns the row and its idempotency
-- key, or nil and the reply to send (an error, or the replay of an earlier success).
local function settle_prologue(endpoint, rid, tenant, key, fingerprint)
  local row, e = load_checked(rid, tenant)
  if not row then
    return nil, e
  end
  local ikey = idem_key(endpoint, tenant or row.tenant or '', key)
  local rec = idem_get(ikey, fingerprint)
  if rec then
    if rec.mismatch then
      return nil, err('IDEMPOTENCY_MISMATCH')
    end
    return nil, replay(rec.payload)
  end
  e = settleable(row)
  if e then
    return nil, e
  end
  return row, ikey
end

-- ---- funding ----------------------------------------------------------------------------------

-- rules._funding_target: the budget a funding applies to, after lazy expiry and its period's
-- rollover, and not closed. Returns it, or nil and the reply to send.
local function funding_target(scope, unit)
  expire_due(LAZY_EXPIRY)
  local b = load_budget(scope, unit)
  if b == nil then
    return nil, err(unpack(missing_budget({scope})))
  end
  local due = period_due({b})
  if due then
    return nil, due
  end
  if b.st == 'CLOSED' then
    return nil, err('BUDGET_CLOSED', scope)
  end
  return b
end

-- ---- the slot's entry in the global sweep index ----------------------------------------------
-- redis.py keeps "<prefix>:{!}:due", one entry per slot scored at or below the earliest time
-- something in the slot falls due, so a sweep visits only slots with work. The budgets field
-- "~hint" = "<score last published>,<when>". A reserve publishes when its deadline is earlier
-- than that score, and at most once a second otherwise (repairing an update lost with a client).
-- Returns the new "~hint" value and the score to publish, or nil.
local function hint_for(deadline, hint)
  local at, ts
  if hint then
    local a, t = string.match(hint, '^([^,]+),(.+)$')
    at, ts = tonumber(a), tonumber(t)
  end
  if at == nil or deadline < at or now - ts >= 1000 then
    if at == nil or deadline < at then
      at = deadline
    end
    return fmt(at) .. ',' .. fmt(now), at
  end
  return nil
end
