-- The sweep's work in one slot: expire what is due (at most `limit`), purge what finished long
-- ago, and report the earliest time left in the index (the slot's new score in the sweep index).
-- KEYS: base
-- ARGV: now, limit
local expired = expire_due(tonumber(ARGV[2]))
local first = redis.call('ZRANGE', IDX, 0, 0, 'WITHSCORES')
local next_time = NULL
if first[2] then
  next_time = tonumber(first[2])
  local hint = redis.call('HGET', BUDGETS, '~hint')
  local ts = hint and string.match(hint, ',(.+)$') or '0'
  redis.call('HSET', BUDGETS, '~hint', fmt(next_time) .. ',' .. ts)
else
  redis.call('HDEL', BUDGETS, '~hint')
end
return ok(enc({expired, next_time}))
