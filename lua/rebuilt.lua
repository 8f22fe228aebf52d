-- rebuilt.lua: the last step of a rebuild (src/engine/rebuild.rs): the
-- sale hash gets its terms, counters, order counter and settled mark, the
-- flow stream is moved past MySQL's cursor, and the fence is lifted, all
-- at once. Everything else (orders, buyers, keys, due-queue) is written
-- while the sale is still fenced.
--
-- KEYS[1]  sale hash
-- KEYS[2]  flow stream
-- ARGV[1]  the sale's token (sales.redis_token)
-- ARGV[2]  the fence this rebuild holds ("rebuilding:<id>")
-- ARGV[3]  the highest order seq a caller had seen (`lost_hint`) when the
--          rebuild read it
-- ARGV[4]  MySQL's cursor "<ms>-<seq>" ("0-0": none)
-- ARGV[5]  the least time in ms a sale stays fenced: every process that
--          calls meanwhile reports the ids it handed out (`lost_hint`)
-- ARGV[6..] field, value, ... (the sale hash's other fields)
--
-- (Helpers from prelude.lua.)
--
-- Returns: {"ok"}; {"again", hint} when a caller has since reported a
-- higher seq seen (the rebuild counts the lost orders again and retries);
-- {"wait", ms} while the fence is younger than ARGV[5];
-- an error when the fence is not ARGV[2] or the token differs.

local s = redis.call('HMGET', KEYS[1], 'db', 'fence', 'lost_hint', 'fenced_at')
if s[1] ~= ARGV[1] or s[2] ~= ARGV[2] then
  return redis.error_reply('flashsale: the sale is not being rebuilt by this call')
end
local hint = tonumber(s[3] or '0')
if hint > tonumber(ARGV[3]) then
  return {'again', string.format('%d', hint)}
end
local young = tonumber(s[4] or '0') + tonumber(ARGV[5]) - now_ms()
if young > 0 then
  return {'wait', int(young)}
end
local cursor = ARGV[4]
if cursor ~= '0-0' then
  local ms, seq = string.match(cursor, '^(%d+)-(%d+)$')
  local last = last_generated_id(KEYS[2])
  if last == '' or not flow_le(cursor, last) then
    -- An entry just past the cursor, removed at once: the stream keeps it
    -- as its last generated id, so every later id sorts after the cursor.
    local floor = string.format('%d-%d', tonumber(ms), tonumber(seq) + 1)
    redis.call('XADD', KEYS[2], floor, 'ev', 'floor')
    redis.call('XDEL', KEYS[2], floor)
  end
end
redis.call('DEL', KEYS[1])
local fields = {}
for i = 6, #ARGV do
  fields[#fields + 1] = ARGV[i]
end
redis.call('HSET', KEYS[1], 'db', ARGV[1], unpack(fields))
return {'ok'}
