-- refund.lua: refund a paid order, at once when MySQL has all of its flow
-- records (the order is settled), otherwise accept it: the order becomes
-- refund_pending and a retry is queued in the sale's due-queue, where the expiry workers carry
-- it out once the order settles.
--
-- KEYS[1..5]  sale, buyers, orders, due-queue, flow (see prelude.lua)
-- KEYS[6]     refund dead-letter hash (asking again takes a refund out of it)
-- KEYS[7..8]  the order's bucket: its due-queue and orders keys (see
--             declare_buckets in prelude.lua)
-- ARGV[1]     order seq
-- ARGV[2]     the caller's user id, or "" for the admin
-- ARGV[3]     first retry delay in ms
--
-- Returns: {"ok", packed, n}          refunded; n is "1" when by this call
--          {"accepted", packed}       refund_pending (now, or before)
--          {"order_not_paid", packed} pending, cancelled or closed
--          {"not_found"}              no such order, or not the caller's
--          {"retired"}                the sale is retired: MySQL alone refunds
--                                     its orders now (see retire.lua)

check_sale()
declare_buckets(7)

if redis.call('HEXISTS', KEYS[1], 'retired') == 1 then
  return {'retired'}
end

local seq, user, delay = ARGV[1], ARGV[2], tonumber(ARGV[3])
local o, packed = load_order(seq)
if not o then
  return {'not_found'}
end
if user ~= '' and o.user ~= user then
  return {'not_found'}
end
if o.status == 'refunded' then
  return {'ok', packed, '0'}
elseif o.status == 'refund_pending' then
  if redis.call('HDEL', KEYS[6], seq) == 1 then
    -- Dead-lettered: asking again puts it back on the retry queue.
    local now = now_ms()
    redis.call('HINCRBY', KEYS[1], 'refunds_dead', -1)
    redis.call('HINCRBY', KEYS[1], 'refunds_waiting', 1)
    due_add(seq, refund_member(seq, 0, int(now)), now + delay)
  end
  return {'accepted', packed}
elseif o.status ~= 'paid' then
  return {'order_not_paid', packed}
end

local now = now_ms()
if settled(o) then
  return {'ok', refund_now(seq, o, now), '1'}
end
o.status = 'refund_pending'
redis.call('HINCRBY', KEYS[1], 'refunds_waiting', 1)
due_add(seq, refund_member(seq, 0, int(now)), now + delay)
return {'accepted', save(seq, o, 'refund_request')}
