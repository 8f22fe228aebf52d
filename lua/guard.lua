-- guard.lua: whether Redis's copy of a sale is this database's, there at
-- all, and not behind what MySQL has settled; fences the sale when not.
-- The reconciler calls it for every live sale (the list MySQL keeps) on
-- its guard passes (src/workers/guard.rs), before it applies records.
--
-- KEYS[1]  sale hash (fields `db`: the sale's token; `fence`; `seq`: the
--          order counter; `flows`: the number of the last flow record)
-- KEYS[2]  flow stream
-- ARGV[1]  the sale's token in MySQL (sales.redis_token)
-- ARGV[2]  the highest order seq MySQL holds for the sale
-- ARGV[3]  the reconciler's cursor in MySQL, "<ms>-<seq>" ("0-0": none)
-- ARGV[4]  the highest order seq the calling process handed out ("0":
--          none): a counter below it is behind too, and it is kept in
--          `lost_hint`, up to which the rebuild counts lost orders
-- ARGV[5]  the number of the last flow record MySQL applied ("0": none)
-- ARGV[6..9]  the sale's start_ms, end_ms, total and price in MySQL
--
-- A missing sale hash becomes a fence-only hash ({fence = missing, db =
-- token}) so that every process answers 503 for it, not 404 (one a reserve
-- call left without a token gets it). A sale whose order counter or flow
-- number is behind MySQL's is fenced `behind`. A sale of another token is
-- fenced `foreign` and never adopted; a sale hash written before sales had
-- tokens (no `db`) is adopted only when its terms and settled mark are
-- MySQL's.
--
-- (Helpers from prelude.lua.)
--
-- Returns: {"ok"} or {"fenced", reason} (missing | behind | foreign |
--          rebuilding:<id>, or the reason an earlier fence gave).

local token, mysql_seq, cursor, seen, mysql_n =
  ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'db', token)
  set_fence(KEYS[1], 'missing')
  keep_hint(KEYS[1], seen)
  return {'fenced', 'missing'}
end
local s = redis.call('HMGET', KEYS[1], 'db', 'fence', 'seq', 'layout', 'flows', 'settled',
  'start_ms', 'end_ms', 'total', 'price')
if not s[1] and not s[4] and s[2] then
  -- A fence-only hash a reserve call left (reserve.lua): this sale's. The
  -- rebuild may take it as soon as this returns: what this process saw
  -- counts, as on any fenced sale below.
  redis.call('HSET', KEYS[1], 'db', token)
  keep_hint(KEYS[1], seen)
  return {'fenced', s[2]}
end
if not s[1] and s[4] then
  local same_terms = s[7] == ARGV[6] and s[8] == ARGV[7] and s[9] == ARGV[8] and s[10] == ARGV[9]
  local same_mark = (s[6] or '0-0') == cursor
  if same_terms and same_mark then
    redis.call('HSET', KEYS[1], 'db', token)
    s[1] = token
  end
end
if s[1] ~= token then
  if s[2] ~= 'foreign' then
    redis.call('HSET', KEYS[1], 'fence', 'foreign', 'fenced_at', int(now_ms()))
  end
  return {'fenced', 'foreign'}
end
if s[2] then
  keep_hint(KEYS[1], seen)
  return {'fenced', s[2]}
end
local counter = tonumber(s[3] or '0')
local behind = counter < mysql_seq or counter < seen or tonumber(s[5] or '0') < mysql_n
if not behind and cursor ~= '0-0' then
  local last = last_generated_id(KEYS[2])
  behind = last == '' or not flow_le(cursor, last)
end
if behind then
  keep_hint(KEYS[1], seen)
  set_fence(KEYS[1], 'behind')
  return {'fenced', 'behind'}
end
return {'ok'}
