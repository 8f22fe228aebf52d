-- rebuild_read.lua: the orders of some buckets of a sale in their packed
-- form, for the rebuild of a fenced sale (src/engine/rebuild.rs), which
-- merges what the surviving Redis holds with MySQL. Unlike read_orders.lua
-- it reads a fenced sale. Nothing is written.
--
-- KEYS[1..5]  sale, buyers, orders, due-queue, flow (see prelude.lua)
-- KEYS[6..]   the orders buckets to read (see declare_buckets in
--             prelude.lua); each holds 64 orders at most
--
-- Returns: {seq, packed, seq, packed, ...}, every order of those buckets

declare_buckets(6)
local out = {}
for i = 6, #KEYS do
  local entries = redis.call('HGETALL', KEYS[i])
  for j = 1, #entries, 2 do
    local _, packed = unstore_order(entries[j + 1])
    if packed then
      out[#out + 1] = entries[j]
      out[#out + 1] = packed
    end
  end
end
return out
