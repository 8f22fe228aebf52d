-- rebuild_read.lua: a page of a sale's orders in their packed form, for
-- the rebuild of a fenced sale (src/engine/rebuild.rs), which merges what
-- the surviving Redis holds with MySQL. Unlike read_orders.lua it reads a
-- fenced sale. Nothing is written.
--
-- KEYS[1..5]  sale, buyers, orders, due-queue, flow (see prelude.lua)
-- ARGV[1]     HSCAN cursor of the orders hash ("0" to start)
-- ARGV[2]     about how many orders to return
--
-- Returns: {next_cursor, seq, packed, seq, packed, ...} ("0": the last page)

local page = redis.call('HSCAN', KEYS[3], ARGV[1], 'COUNT', ARGV[2])
local out = {page[1]}
local entries = page[2]
for i = 1, #entries, 2 do
  local _, packed = load_order(entries[i])
  if packed then
    out[#out + 1] = entries[i]
    out[#out + 1] = packed
  end
end
return out
