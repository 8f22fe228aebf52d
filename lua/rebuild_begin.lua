-- rebuild_begin.lua: take a fenced sale for a rebuild from MySQL
-- (src/engine/rebuild.rs): its fence becomes `rebuilding:<id>`, the id of
-- this rebuild, which every later step checks, so a rebuild that lost the
-- sale to another (say its MySQL lock went with its connection) writes
-- nothing more. Only a sale of this token fenced for a reason a rebuild
-- cures (missing, behind, or an earlier rebuild that did not finish) is
-- taken; a sale of another token (foreign) never is. The sale's terms are
-- written into its hash first, so its orders can be read even when the
-- hash itself was lost.
--
-- KEYS[1]  sale hash
-- ARGV[1]  the sale's token (sales.redis_token)
-- ARGV[2]  this rebuild's id
-- ARGV[3..] field, value, ... the terms (layout, start_ms, window_ms, price)
--
-- (Helpers from prelude.lua.)
--
-- Returns: {"ok", fence_before, seq, lost_hint, flows} or {"refused", reason}
--          (reason: foreign | not_fenced | the fence that stays)

local s = redis.call('HMGET', KEYS[1], 'db', 'fence', 'seq', 'lost_hint', 'flows', 'fenced_at')
if s[1] ~= ARGV[1] then
  return {'refused', 'foreign'}
end
if not s[2] then
  return {'refused', 'not_fenced'}
end
if s[2] ~= 'missing' and s[2] ~= 'behind' and string.sub(s[2], 1, 11) ~= 'rebuilding:' then
  return {'refused', s[2]}
end
redis.call('HSET', KEYS[1], 'fence', 'rebuilding:' .. ARGV[2])
if not s[6] then
  redis.call('HSET', KEYS[1], 'fenced_at', int(now_ms()))
end
local terms = {}
for i = 3, #ARGV do
  terms[#terms + 1] = ARGV[i]
end
if #terms > 0 then
  redis.call('HSET', KEYS[1], unpack(terms))
end
return {'ok', s[2], s[3] or '0', s[4] or '0', s[5] or '0'}
