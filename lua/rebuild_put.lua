-- rebuild_put.lua: write one part of a sale being rebuilt (src/engine/rebuild.rs):
-- fields of a hash (buyers' units, idempotency keys) or members of a sorted
-- set (a due-queue bucket, the due-queue index), while this rebuild holds
-- the sale's fence.
--
-- KEYS[1]  sale hash
-- KEYS[2]  the hash or sorted set to write
-- ARGV[1]  the fence this rebuild holds ("rebuilding:<id>")
-- ARGV[2]  "hash" (then field, value, ...) or "zset" (then score, member, ...)
--
-- Returns: the number of pairs written; an error when the fence is not
-- ARGV[1] (nothing is written then).

if redis.call('HGET', KEYS[1], 'fence') ~= ARGV[1] then
  return redis.error_reply('flashsale: the sale is not being rebuilt by this call')
end
local pairs_ = {}
for i = 3, #ARGV do
  pairs_[#pairs_ + 1] = ARGV[i]
end
if #pairs_ == 0 then
  return 0
end
if ARGV[2] == 'hash' then
  redis.call('HSET', KEYS[2], unpack(pairs_))
else
  redis.call('ZADD', KEYS[2], unpack(pairs_))
end
return #pairs_ / 2
