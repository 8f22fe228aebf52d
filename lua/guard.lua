-- guard.lua: whether Redis's copy of a sale is this database's, there at
-- all, and not behind what MySQL has settled; fences the sale when not.
-- The reconciler calls it for every live sale (the list MySQL keeps) on
-- every step (src/workers/guard.rs), before it applies the sale's records.
--
-- KEYS[1]  sale hash (fields `db`: the sale's token; `fence`; `seq`)
-- KEYS[2]  flow stream
-- ARGV[1]  the sale's token in MySQL (sales.redis_token)
-- ARGV[2]  the highest order seq MySQL holds for the sale
-- ARGV[3]  the reconciler's cursor in MySQL, "<ms>-<seq>" ("0-0": none)
-- ARGV[4]  the highest order seq the calling process handed out ("0":
--          none): a counter below it is behind too, and the seq is kept in
--          `lost_hint`, up to which the rebuild counts lost orders
--
-- A missing sale hash becomes a fence-only hash ({fence = missing, db =
-- token}) so that every process answers 503 for it, not 404 (one a reserve
-- call left without a token gets it); a sale whose
-- order counter or flow position is behind MySQL's is fenced `behind`; a
-- sale of another token is fenced `foreign` and never adopted.
--
-- (Helpers from prelude.lua.)
--
-- Returns: {"ok"} or {"fenced", reason} (missing | behind | foreign |
--          rebuilding, or the reason an earlier fence gave).

local token, mysql_seq, cursor, seen = ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local function keep_hint()
  if seen > tonumber(redis.call('HGET', KEYS[1], 'lost_hint') or '0') then
    redis.call('HSET', KEYS[1], 'lost_hint', ARGV[4])
  end
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'fence', 'missing', 'db', token)
  keep_hint()
  return {'fenced', 'missing'}
end
local s = redis.call('HMGET', KEYS[1], 'db', 'fence', 'seq', 'layout')
if not s[1] and not s[4] and s[2] == 'missing' then
  -- A fence-only hash a reserve call left (reserve.lua): this sale's.
  redis.call('HSET', KEYS[1], 'db', token)
  return {'fenced', 'missing'}
end
if s[1] ~= token then
  if s[2] ~= 'foreign' then
    redis.call('HSET', KEYS[1], 'fence', 'foreign')
  end
  return {'fenced', 'foreign'}
end
if s[2] then
  keep_hint()
  return {'fenced', s[2]}
end
local counter = tonumber(s[3] or '0')
local behind = counter < mysql_seq or counter < seen
if not behind and cursor ~= '0-0' then
  local last = last_generated_id(KEYS[2])
  behind = last == '' or not flow_le(cursor, last)
end
if behind then
  keep_hint()
  redis.call('HSET', KEYS[1], 'fence', 'behind')
  return {'fenced', 'behind'}
end
return {'ok'}
