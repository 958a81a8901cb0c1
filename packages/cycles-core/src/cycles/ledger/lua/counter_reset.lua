-- counters.reset_counter: one counter's count to 0 at once (RESET SEMANTICS). A tumbling window
-- keeps its expiry; a per_run counter's TTL is refreshed (from the TTL its value keeps).
-- Reservations are untouched.
-- KEYS: base
-- ARGV: now, counter name, per_run 0/1
local k = base .. 'q:' .. ARGV[2]
local v = redis.call('GET', k)
if not v then
  return err('NOT_FOUND')
end
local n, exp, rest = string.match(v, '^(%d+),(%d+)(.*)$')
n, exp = tonumber(n), tonumber(exp)
if exp <= now then
  return err('NOT_FOUND')
end
local ttl = tonumber(string.match(rest, '^,%d+,(%d+),%d+') or '')
local kept = string.match(rest, '^(,%d+,%d+,%d+)')
if kept then -- the threshold may be announced again (counters.reset_value)
  rest = kept .. ',0'
end
if ARGV[3] == '1' and ttl then
  exp = now + ttl
  redis.call('SET', k, '0,' .. fmt(exp) .. rest, 'PX', ttl + KEY_SAFETY_MS)
  redis.call('ZADD', QEXPIRY, exp, ARGV[2])
else
  redis.call('SET', k, '0,' .. fmt(exp) .. rest, 'KEEPTTL')
end
redis.call('ZADD', QINDEX, 0, ARGV[2])
return ok(enc({fmt(n), '0,' .. fmt(exp) .. rest}))
