-- rebuild_write.lua: store orders of a fenced sale that is being rebuilt
-- (src/engine/rebuild.rs), in the orders buckets' short form (store_order in
-- prelude.lua). The sale hash must carry its terms (start_ms, window_ms,
-- price, layout) already: the rebuild writes them first.
--
-- KEYS[1..5]  sale, buyers, orders, due-queue, flow (see prelude.lua)
-- KEYS[6..]   the orders buckets of the orders written (see declare_buckets
--             in prelude.lua)
-- ARGV[1]     the fence this rebuild holds ("rebuilding:<id>")
-- ARGV[2k], ARGV[2k+1]  (k = 1, 2, ...) order seq, packed order
--
-- Returns: the number of orders stored; an error when the sale's fence is
-- not ARGV[1] any more (nothing is written then).

if redis.call('HGET', KEYS[1], 'fence') ~= ARGV[1] then
  return redis.error_reply('flashsale: the sale is not being rebuilt')
end
declare_buckets(6)
local n = 0
for i = 2, #ARGV, 2 do
  store_order(ARGV[i], unpack_order(ARGV[i + 1]))
  n = n + 1
end
return n
