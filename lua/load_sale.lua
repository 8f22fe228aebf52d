-- load_sale.lua: put a new sale (already persisted in MySQL) into Redis, once.
--
-- Loading twice must never reset a live sale's counters, so an existing sale
-- hash of the same token is left exactly as it is. A sale hash of another
-- token belongs to another database (or an earlier one) under the same key
-- prefix: it is never adopted, and the sale is not loaded. A fence-only hash
-- that the guard or a reserve call left (`fence` = missing: the sale was
-- listed before it was loaded) is replaced. A sale that Redis lost is not
-- loaded here but rebuilt from MySQL (src/engine/rebuild.rs).
--
-- KEYS[1]  sale hash
-- ARGV[1]  the sale's token (sales.redis_token)
-- ARGV[2..] field, value, field, value, ... (the whole sale hash but `db`)
--
-- Returns: 1 when the sale was loaded, 0 when it was there already, -1 when
-- Redis holds keys of another token under its name.

local token = ARGV[1]
if redis.call('EXISTS', KEYS[1]) == 1 then
  local s = redis.call('HMGET', KEYS[1], 'db', 'fence', 'layout')
  if s[1] ~= token and (s[1] or s[3]) then
    return -1
  end
  if not (s[2] == 'missing' and not s[3]) then
    return 0
  end
  redis.call('DEL', KEYS[1])
end
local fields = {}
for i = 2, #ARGV do
  fields[#fields + 1] = ARGV[i]
end
redis.call('HSET', KEYS[1], 'db', token, unpack(fields))
return 1
