-- settle.lua: after a MySQL commit, record how far the sale's flow records
-- are settled and delete them from the stream. Called by the reconciler; a
-- repeated or late call never moves the mark back.
--
-- KEYS[1]  sale hash (field `settled`: the last flow id MySQL committed)
-- KEYS[2]  flow stream
-- ARGV[1]  the committed cursor's ms
-- ARGV[2]  the committed cursor's seq
--
-- Returns: the number of records deleted.

local ms, seq = tonumber(ARGV[1]), tonumber(ARGV[2])
local cur = redis.call('HGET', KEYS[1], 'settled')
local newer = true
if cur then
  local cm, cs = string.match(cur, '^(%d+)-(%d+)$')
  cm, cs = tonumber(cm), tonumber(cs)
  newer = ms > cm or (ms == cm and seq > cs)
end
if newer and redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'settled', string.format('%d-%d', ms, seq))
end
return redis.call('XTRIM', KEYS[2], 'MINID', string.format('%d-%d', ms, seq + 1))
