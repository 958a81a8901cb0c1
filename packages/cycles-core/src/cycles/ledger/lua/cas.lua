-- Global sweep index: after sweeping a slot, move its score to the slot's next deadline (or drop
-- it), unless a reserve published a newer deadline meanwhile (the version moved).
-- KEYS: global base
-- ARGV: now, tag, version seen, next deadline ('' when none)
local tag, seen, nxt = ARGV[2], tonumber(ARGV[3]), ARGV[4]
if tonumber(redis.call('HGET', base .. 'duev', tag) or '0') ~= seen then
  return ok('0')
end
if nxt == '' then
  redis.call('ZREM', base .. 'due', tag)
else
  redis.call('ZADD', base .. 'due', tonumber(nxt), tag)
end
return ok('1')
