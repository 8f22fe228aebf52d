-- rebuild_clear.lua: empty what a rebuild writes anew (src/engine/rebuild.rs),
-- after it has read what Redis held: every key of the sale but its hash
-- (which holds the fence), its flow stream (whose records are in MySQL; it
-- keeps its position) and its refund dead-letter (kept as it is).
--
-- KEYS[1]  sale hash
-- KEYS[2..] the keys to delete (buyers, idempotency keys, calls, the
--          orders buckets, the due-queue index and its buckets)
-- ARGV[1]  the fence this rebuild holds ("rebuilding:<id>")
--
-- Returns: the number of keys deleted; an error when the fence is not
-- ARGV[1] (nothing is deleted then).

if redis.call('HGET', KEYS[1], 'fence') ~= ARGV[1] then
  return redis.error_reply('flashsale: the sale is not being rebuilt by this call')
end
local n = 0
for i = 2, #KEYS do
  n = n + redis.call('DEL', KEYS[i])
end
return n
