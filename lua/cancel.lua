-- cancel.lua: the buyer gives up a pending order; its units go back on sale.
-- At or past the deadline the order is closed instead (the deadline decides).
--
-- A cancel that made the cancellation is kept in the calls hash under its
-- call id, so the same call arriving again (resent after a dropped
-- connection) answers "ok" as the first one did, not "not pending".
--
-- KEYS[1..5]  sale, buyers, orders, due-queue, flow (see prelude.lua)
-- KEYS[6]     calls hash (reserve.lua; "c<call id>" -> order seq here)
-- KEYS[7..8]  the order's bucket: its due-queue and orders keys (see
--             declare_buckets in prelude.lua)
-- ARGV[1]     order seq
-- ARGV[2]     the caller's user id (only the owner may cancel)
-- ARGV[3]     the call's id ([0-9a-f]+)
--
-- Returns: {"ok", packed}                 now cancelled
--          {"order_not_pending", packed, c}  not pending; c is "1" when this call
--                                            closed it (it was overdue), else "0"
--          {"not_found"}                  no such order, or not the caller's

check_sale()
declare_buckets(7)

local seq, user, call = ARGV[1], ARGV[2], 'c' .. ARGV[3]
local o, packed = load_order(seq)
if not o then
  return {'not_found'}
end
if o.user ~= user then
  return {'not_found'}
end
if o.status ~= 'pending' then
  if o.status == 'cancelled' and redis.call('HGET', KEYS[6], call) == seq then
    return {'ok', packed}
  end
  return {'order_not_pending', packed, '0'}
end
local now = now_ms()
if now >= o.deadline then
  return {'order_not_pending', release(seq, o, 'closed', now), '1'}
end
redis.call('HSET', KEYS[6], call, seq)
return {'ok', release(seq, o, 'cancelled', now)}
