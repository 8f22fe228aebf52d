-- read_orders.lua: orders of one sale in their packed form, for readers
-- outside the scripts (the API's order lookup, the audit, tools). The orders
-- buckets keep a shorter form (see store_order in prelude.lua); this expands it.
--
-- KEYS[1..5]  sale, buyers, orders, due-queue, flow (see prelude.lua)
-- KEYS[6..]   the orders buckets of the seqs asked for (see declare_buckets
--             in prelude.lua; a seq of a bucket not declared is an error)
-- ARGV[1..]   order seqs
--
-- Returns one packed order per seq, nil where there is none. Nothing is written.

check_sale()
declare_buckets(6)

local out = {}
for i, seq in ipairs(ARGV) do
  local _, packed = load_order(seq)
  out[i] = packed or false
end
return out
