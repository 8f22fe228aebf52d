-- cancel.lua: the buyer gives up a pending order; its units go back on sale.
-- At or past the deadline the order is closed instead (the deadline decides).
--
-- KEYS[1..5]  sale, buyers, orders, due-queue, flow (see prelude.lua)
-- KEYS[6]     the due-queue bucket of the order (see prelude.lua)
-- ARGV[1]     order seq
-- ARGV[2]     the caller's user id (only the owner may cancel)
--
-- Returns: {"ok", packed}                 now cancelled
--          {"order_not_pending", packed, c}  not pending; c is "1" when this call
--                                            closed it (it was overdue), else "0"
--          {"not_found"}                  no such order, or not the caller's

check_sale()
declare_buckets(6)

local seq, user = ARGV[1], ARGV[2]
local o, packed = load_order(seq)
if not o then
  return {'not_found'}
end
if o.user ~= user then
  return {'not_found'}
end
if o.status ~= 'pending' then
  return {'order_not_pending', packed, '0'}
end
local now = now_ms()
if now >= o.deadline then
  return {'order_not_pending', release(seq, o, 'closed', now), '1'}
end
return {'ok', release(seq, o, 'cancelled', now)}
