-- read_orders.lua: orders of one sale in their packed form, for readers
-- outside the scripts (the API's order lookup, the audit, tools). The orders
-- hash keeps a shorter form (see store_order in prelude.lua); this expands it.
--
-- KEYS[1..5]  sale, buyers, orders, due-queue, flow (see prelude.lua)
-- ARGV[1..]   order seqs
--
-- Returns one packed order per seq, nil where there is none. Nothing is written.

check_sale()

local out = {}
for i, seq in ipairs(ARGV) do
  local _, packed = load_order(seq)
  out[i] = packed or false
end
return out
