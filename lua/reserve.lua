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

local sale = redis.call('HMGET', KEYS[1], 'start_ms', 'end_ms', 'avail', 'limit', 'price', 'window_ms', 'seq')
if not sale[1] then
  return refuse_all('not_found')
end
local now = now_ms()
local too_early, too_late = now < tonumber(sale[1]), now >= tonumber(sale[2])
local avail, limit, price = tonumber(sale[3]), tonumber(sale[4]), tonumber(sale[5])
local deadline = now + tonumber(sale[6])
local seq = tonumber(sale[7] or '0')
local room = tonumber(ARGV[1]) - redis.call('XLEN', KEYS[5])

-- Units each buyer of this call holds, read once, kept up to date here.
local held = {}
-- Buyers whose units change, in order of first reservation (and as a set).
local buyers = {}
local reserved = 0
local due = {}
for i = 1, n do
  local user, qty, idem = ARGV[3 * i - 1], tonumber(ARGV[3 * i]), ARGV[3 * i + 1]
  local idem_field = user .. ':' .. idem
  local made = idem ~= '' and redis.call('HGET', KEYS[6], idem_field)
  if made then
    local _, packed = load_order(made)
    replies[i] = {'dup', made, packed}
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
      local id = int(seq)
      if idem ~= '' then
        redis.call('HSET', KEYS[6], idem_field, id)
      end
      due[#due + 1] = id
      local order = {
        status = 'pending', user = user, qty = qty, amount = price * qty,
        created = int(now), deadline = deadline, paid = '', closed = '',
        refunded = '', flow = '', payment_id = '',
      }
      replies[i] = {'ok', id, save(id, order, 'reserve')}
    end
  end
end

if reserved > 0 then
  redis.call('HINCRBY', KEYS[1], 'avail', -reserved)
  redis.call('HINCRBY', KEYS[1], 'pending', reserved)
  redis.call('HSET', KEYS[1], 'seq', int(seq))
  for _, user in ipairs(buyers) do
    redis.call('HSET', KEYS[2], user, int(held[user]))
  end
  -- One deadline for all (one clock reading): one ZADD per bucket touched.
  local i = 1
  while i <= #due do
    local bucket = due_bucket(due[i])
    local entries = {}
    while i <= #due and due_bucket(due[i]) == bucket do
      entries[#entries + 1] = deadline
      entries[#entries + 1] = due[i]
      i = i + 1
    end
    redis.call('ZADD', due_key(bucket), unpack(entries))
    redis.call('ZADD', KEYS[4], 'LT', deadline, bucket)
  end
end
return replies
