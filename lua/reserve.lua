-- reserve.lua: reserve `qty` units of one sale for one buyer, atomically.
--
-- Everything a reservation touches changes in this one call: the stock
-- counters, the buyer's units, the order, its payment deadline and the flow
-- record for the reconciler. The sale window and the deadline are judged by
-- Redis's own clock, never the caller's.
--
-- KEYS[1..5]  sale, buyers, orders, deadlines, flow (see prelude.lua)
-- KEYS[6]     idempotency hash ("<user>:<key>" -> order seq)
-- ARGV[1]     buyer's user id (decimal)
-- ARGV[2]     quantity (>= 1)
-- ARGV[3]     idempotency key, or "" for none
-- ARGV[4]     flow backlog bound: at this many records waiting for MySQL,
--             new reservations are refused
--
-- Returns: {"ok", seq, packed_order}   a new pending order
--          {"dup", seq, packed_order}  the order this idempotency key made before
--          {"<error code>"}            not_found | sale_not_started | sale_ended
--                                      | sold_out | limit_exceeded | backlog_full

local sale = redis.call('HMGET', KEYS[1], 'start_ms', 'end_ms', 'avail', 'limit', 'price', 'window_ms')
if not sale[1] then
  return {'not_found'}
end

local user, qty, idem = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local idem_field = user .. ':' .. idem
if idem ~= '' then
  local seq = redis.call('HGET', KEYS[6], idem_field)
  if seq then
    return {'dup', seq, redis.call('HGET', KEYS[3], seq)}
  end
end

local now = now_ms()
if now < tonumber(sale[1]) then
  return {'sale_not_started'}
end
if now >= tonumber(sale[2]) then
  return {'sale_ended'}
end
if tonumber(sale[3]) < qty then
  return {'sold_out'}
end
local held = tonumber(redis.call('HGET', KEYS[2], user) or '0')
if held + qty > tonumber(sale[4]) then
  return {'limit_exceeded'}
end
if redis.call('XLEN', KEYS[5]) >= tonumber(ARGV[4]) then
  return {'backlog_full'}
end

redis.call('HINCRBY', KEYS[1], 'avail', -qty)
redis.call('HINCRBY', KEYS[1], 'pending', qty)
redis.call('HINCRBY', KEYS[2], user, qty)
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
local deadline = now + tonumber(sale[6])
redis.call('ZADD', KEYS[4], deadline, seq)
if idem ~= '' then
  redis.call('HSET', KEYS[6], idem_field, seq)
end
local order = {
  status = 'pending', user = user, qty = qty, amount = tonumber(sale[5]) * qty,
  created = int(now), deadline = deadline, paid = '', closed = '', refunded = '',
  flow = '', payment_id = '',
}
return {'ok', seq, save(seq, order, 'reserve')}
