-- rebuild_begin.lua: take a fenced sale for a rebuild from MySQL
-- (src/engine/rebuild.rs): its fence becomes `rebuilding`. Only a sale of
-- this token fenced for a reason a rebuild cures (missing, behind, or an
-- earlier rebuild that did not finish) is taken; a sale of another token
-- (foreign) never is.
--
-- KEYS[1]  sale hash
-- ARGV[1]  the sale's token (sales.redis_token)
--
-- Returns: {"ok", fence_before, seq, lost_hint} or {"refused", reason}
--          (reason: foreign | not_fenced | the fence that stays)

local s = redis.call('HMGET', KEYS[1], 'db', 'fence', 'seq', 'lost_hint')
if s[1] ~= ARGV[1] then
  return {'refused', 'foreign'}
end
if not s[2] then
  return {'refused', 'not_fenced'}
end
if s[2] ~= 'missing' and s[2] ~= 'behind' and s[2] ~= 'rebuilding' then
  return {'refused', s[2]}
end
redis.call('HSET', KEYS[1], 'fence', 'rebuilding')
return {'ok', s[2], s[3] or '0', s[4] or '0'}
