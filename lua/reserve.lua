-- reserve.lua: reserve `qty` units of one sale for one buyer, atomically.
--
-- Everything the sale's reservation touches changes in this one call: the stock
-- counters, the buyer's units, the order, its payment deadline and the flow
-- record that the reconciler will carry to MySQL. The sale window and the
-- deadline are judged by Redis's own clock (TIME), never the caller's.
--
-- KEYS[1]  sale hash        (fields: start_ms end_ms avail pending limit price window_ms seq ...)
-- KEYS[2]  buyers hash      (user id -> units held in pending and paid orders)
-- KEYS[3]  idempotency hash ("<user>:<key>" -> order seq)
-- KEYS[4]  orders hash      (order seq -> packed order, see engine/order.rs)
-- KEYS[5]  deadlines zset   (order seq scored by payment deadline in ms)
-- KEYS[6]  flow stream      (one entry per change, read by the reconciler)
-- ARGV[1]  buyer's user id (decimal)
-- ARGV[2]  quantity (>= 1)
-- ARGV[3]  idempotency key, or "" for none
--
-- Returns: {"ok", seq, packed_order}   a new pending order
--          {"dup", seq, packed_order}  the order this idempotency key already made
--          {"<error code>"}            not_found | sale_not_started | sale_ended
--                                      | sold_out | limit_exceeded

local sale = redis.call('HMGET', KEYS[1], 'start_ms', 'end_ms', 'avail', 'limit', 'price', 'window_ms')
if not sale[1] then
  return {'not_found'}
end

local user, qty, idem = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local idem_field = user .. ':' .. idem
if idem ~= '' then
  local seq = redis.call('HGET', KEYS[3], idem_field)
  if seq then
    return {'dup', seq, redis.call('HGET', KEYS[4], seq)}
  end
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
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

-- %d keeps large integers out of Lua's exponent notation.
local amount = string.format('%d', tonumber(sale[5]) * qty)
local deadline = string.format('%d', now + tonumber(sale[6]))
now = string.format('%d', now)

redis.call('HINCRBY', KEYS[1], 'avail', -qty)
redis.call('HINCRBY', KEYS[1], 'pending', qty)
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
redis.call('HINCRBY', KEYS[2], user, qty)
-- Packed order: status|user|qty|amount|created|deadline|paid|closed|refunded|payment_id
local order = table.concat({'pending', user, qty, amount, now, deadline, '', '', '', ''}, '|')
redis.call('HSET', KEYS[4], seq, order)
redis.call('ZADD', KEYS[5], deadline, seq)
if idem ~= '' then
  redis.call('HSET', KEYS[3], idem_field, seq)
end
redis.call('XADD', KEYS[6], '*', 'ev', 'reserve', 'o', seq, 'u', user, 'q', qty,
  'a', amount, 't', now, 'd', deadline)
return {'ok', seq, order}
