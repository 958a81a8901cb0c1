-- Global sweep index: lower a slot's score to `score` (or add it), and bump its version so a sweep
-- that read the old entry does not overwrite this one (see cas.lua).
-- KEYS: global base "<prefix>:{!}:"
-- ARGV: now, tag, score
local tag, score = ARGV[2], tonumber(ARGV[3])
local current = redis.call('ZSCORE', base .. 'due', tag)
if not current or tonumber(current) > score then
  redis.call('ZADD', base .. 'due', score, tag)
end
redis.call('HINCRBY', base .. 'duev', tag, 1)
return ok('0')
