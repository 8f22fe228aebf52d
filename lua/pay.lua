-- pay.lua: apply a successful payment to a pending order, unless its
-- deadline has passed by Redis's clock (then the order is closed here and
-- now, whether or not an expiry worker got to it: the deadline decides).
--
-- KEYS[1..5]  sale, buyers, orders, due-queue, flow (see prelude.lua)
-- KEYS[6..7]  the order's bucket: its due-queue and orders keys (see
--             declare_buckets in prelude.lua)
-- ARGV[1]     order seq
-- ARGV[2]     the gateway's payment id
-- ARGV[3]     amount paid, in cents
--
-- Returns: {"ok", packed}                 now paid
--          {"dup", packed}                paid before with this payment id
--          {"order_expired", packed, c}   past the deadline; c is "1" when this
--                                         call closed it, "0" when it was closed before;
--                                         either way the payment is recorded (a
--                                         late_pay flow record: the gateway must refund it)
--          {"order_not_pending", packed}  cancelled, or paid with another payment id
--                                         (recorded as a late_pay record too)
--          {"amount_mismatch", packed}    nothing changed
--          {"not_found"}

check_sale()
declare_buckets(6)

local seq, payment_id, amount = ARGV[1], ARGV[2], tonumber(ARGV[3])
local o, packed = load_order(seq)
if not o then
  return {'not_found'}
end

-- A payment after the deadline (or for an order no longer pending): the
-- money was taken and must go back. The
-- record carries it to MySQL (late_payments) and downstream (payment.late);
-- the order itself stays closed. Returns the packed order.
local function late(closed)
  return save(seq, closed, 'late_pay', nil, nil, {'p', payment_id, 'a', int(amount)})
end

if o.status ~= 'pending' then
  if o.paid ~= '' and o.payment_id == payment_id then
    return {'dup', packed}
  elseif o.status == 'closed' then
    return {'order_expired', late(o), '0'}
  end
  -- Cancelled, or paid (refunded) under another payment id: this money was
  -- taken for nothing too, and is recorded the same way.
  return {'order_not_pending', late(o)}
end

local now = now_ms()
if now >= o.deadline then
  release(seq, o, 'closed', now)
  return {'order_expired', late(o), '1'}
end
if amount ~= o.amount then
  return {'amount_mismatch', packed}
end

o.status = 'paid'
o.paid = int(now)
o.payment_id = payment_id
redis.call('HINCRBY', KEYS[1], 'pending', -o.qty)
redis.call('HINCRBY', KEYS[1], 'paid', o.qty)
due_remove(seq, seq)
return {'ok', save(seq, o, 'pay')}
