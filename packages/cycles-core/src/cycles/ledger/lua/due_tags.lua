-- Global sweep index: the slots with something due, with their versions, plus a few slots from the
-- tenant registry in round-robin order (a safety net for index updates lost with a crashed client).
-- KEYS: global base
-- ARGV: now, limit, round-robin count
local limit, rr = tonumber(ARGV[2]), tonumber(ARGV[3])
local due = {}
local hits = redis.call('ZRANGEBYSCORE', base .. 'due', '-inf', fmt(now), 'LIMIT', 0, limit)
for i, tag in ipairs(hits) do
  due[i] = {tag, tonumber(redis.call('HGET', base .. 'duev', tag) or '0')}
end
local others = {}
if rr > 0 then
  local cursor = redis.call('GET', base .. 'sweep_cursor') or '0'
  local page = redis.call('SSCAN', base .. 'tenants', cursor, 'COUNT', rr)
  redis.call('SET', base .. 'sweep_cursor', page[1])
  others = page[2]
end
return ok(enc({due, others}))
