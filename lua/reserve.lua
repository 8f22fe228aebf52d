-- reserve.lua: reserve units of one sale for one or more buyers, atomically.
--
-- The engine combines the reservations that arrive together for one sale
-- into one call; each is judged in turn, exactly as if it had come alone,
-- and everything it touches changes in this call: the stock counters, the
-- buyer's units, the order, its payment deadline and the flow record for
-- the reconciler. The sale window and the deadline are judged by Redis's
-- own clock, never the caller's. One call with one reservation is the
-- plain, unbatched reserve.
--
-- KEYS[1..5]  sale, buyers, orders, due-queue, flow (see prelude.lua)
-- KEYS[6]     idempotency hash ("<user>:<key>" -> order seq)
-- ARGV[1]     flow backlog bound: at this many records waiting for MySQL,
--             new reservations are refused
-- ARGV[2+3i], ARGV[3+3i], ARGV[4+3i]  (i = 0, 1, ...) one reservation:
--             buyer's user id (decimal), quantity (>= 1), idempotency key
--             or "" for none
--
-- Returns one reply per reservation, in order:
--          {"ok", seq, packed_order}   a new pending order
--          {"dup", seq, packed_order}  the order this idempotency key made before
--          {"<error code>"}            not_found | sale_not_started | sale_ended
--                                      | sold_out | limit_exceeded | backlog_full

local n = math.floor((#ARGV - 1) / 3)
local replies = {}
local function refuse_all(code)
  for i = 1, n do
    replies[i] = {code}
  end
  return replies
end

local sale = redis.call('HMGET', KEYS[1], 'start_ms', 'end_ms', 'avail', 'limit', 'price', 'window_ms',
  'seq', 'layout')
if not sale[1] then
  return refuse_all('not_found')
end
if sale[8] ~= LAYOUT then
  layout_error()
end
local now = now_ms()
local too_early, too_late = now < tonumber(sale[1]), now >= tonumber(sale[2])
local avail, limit, price = tonumber(sale[3]), tonumber(sale[4]), tonumber(sale[5])
local deadline = now + tonumber(sale[6])
local seq = tonumber(sale[7] or '0')
local room = tonumber(ARGV[1]) - redis.call('XLEN', KEYS[5])

-- Two passes. The first judges every reservation with reads only; the
-- second writes. Redis does not roll back a script that fails part-way, so
-- nothing that reads stored data (an earlier order) comes after the first
-- write, and the stock counters move before the orders they cover.

-- Units each buyer of this call holds, read once, kept up to date here.
local held = {}
-- Buyers whose units change, in order of first reservation (and as a set).
local buyers = {}
local reserved = 0
-- The reservations that make an order: {i, id, user, qty, idem_field}.
local accepted = {}
-- Idempotency fields claimed by an order of this call, and the replies of
-- later reservations with the same key (filled in once the order is made).
local claimed, echoes = {}, {}
for i = 1, n do
  local user, qty, idem = ARGV[3 * i - 1], tonumber(ARGV[3 * i]), ARGV[3 * i + 1]
  local idem_field = user .. ':' .. idem
  local made = idem ~= '' and redis.call('HGET', KEYS[6], idem_field)
  if made then
    local _, packed = load_order(made)
    replies[i] = {'dup', made, packed}
  elseif idem ~= '' and claimed[idem_field] then
    replies[i] = {'dup'}
    echoes[#echoes + 1] = {replies[i], claimed[idem_field]}
  elseif too_early then
    replies[i] = {'sale_not_started'}
  elseif too_late then
    replies[i] = {'sale_ended'}
  elseif avail < qty then
    replies[i] = {'sold_out'}
  else
    if held[user] == nil then
      held[user] = tonumber(redis.call('HGET', KEYS[2], user) or '0')
    end
    if held[user] + qty > limit then
      replies[i] = {'limit_exceeded'}
    elseif room <= 0 then
      replies[i] = {'backlog_full'}
    else
      avail = avail - qty
      reserved = reserved + qty
      if not buyers[user] then
        buyers[user] = true
        buyers[#buyers + 1] = user
      end
      held[user] = held[user] + qty
      room = room - 1
      seq = seq + 1
      local order = {i = i, id = int(seq), user = user, qty = qty}
      if idem ~= '' then
        order.idem_field = idem_field
        claimed[idem_field] = order
      end
      accepted[#accepted + 1] = order
      replies[i] = {'ok', order.id}
    end
  end
end

if #accepted == 0 then
  return replies
end
redis.call('HINCRBY', KEYS[1], 'avail', -reserved)
redis.call('HINCRBY', KEYS[1], 'pending', reserved)
redis.call('HSET', KEYS[1], 'seq', int(seq))
for _, user in ipairs(buyers) do
  redis.call('HSET', KEYS[2], user, int(held[user]))
end
for _, a in ipairs(accepted) do
  if a.idem_field then
    redis.call('HSET', KEYS[6], a.idem_field, a.id)
  end
  a.packed = save(a.id, {
    status = 'pending', user = a.user, qty = a.qty, amount = price * a.qty,
    created = int(now), deadline = deadline, paid = '', closed = '',
    refunded = '', flow = '', payment_id = '',
  }, 'reserve')
  replies[a.i][3] = a.packed
end
for _, e in ipairs(echoes) do
  e[1][2], e[1][3] = e[2].id, e[2].packed
end
-- One deadline for all (one clock reading): one ZADD per bucket touched.
local i = 1
while i <= #accepted do
  local bucket = due_bucket(accepted[i].id)
  local entries = {}
  while i <= #accepted and due_bucket(accepted[i].id) == bucket do
    entries[#entries + 1] = deadline
    entries[#entries + 1] = accepted[i].id
    i = i + 1
  end
  redis.call('ZADD', due_key(bucket), unpack(entries))
  redis.call('ZADD', KEYS[4], 'LT', deadline, bucket)
end
return replies
