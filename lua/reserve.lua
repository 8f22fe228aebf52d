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
-- Every call carries an id, unique per process and call. What a call did
-- is kept in the calls hash, so that the same call arriving again (resent
-- after a dropped connection, or late after its caller gave up) changes
-- nothing and answers what the first one did. The reservation i of call c
-- that had no idempotency key can be found again with the retry key
-- "rk-<c>-<i>" (src/engine/combiner.rs hands it to a caller whose call
-- failed): a reservation with that key finds the order the call made for
-- the same buyer, or, when the call made none (or has not run yet), is a
-- new reservation under that key, which the late call then finds and does
-- not repeat. So each request reserves at most once, whatever the timing.
--
-- KEYS[1..5]  sale, buyers, orders, due-queue, flow (see prelude.lua)
-- KEYS[6]     idempotency hash ("<user>:<key>" -> order seq)
-- KEYS[7]     calls hash (call id -> "<first new seq>|<one letter per
--             reservation>", letters in OUTCOME below; kept only for calls
--             that made an order)
-- KEYS[8..]   the buckets (both keys of each: due-queue and orders, see
--             declare_buckets in prelude.lua) the caller expects the new
--             orders in; when a new order falls in another, or a key finds
--             an earlier order in another, the call writes nothing and
--             fails with "NEEDBUCKETS <n> ...", and the caller sends it
--             again declaring them (a caller that declares none, such as
--             redis-benchmark running this script as the reference, has the
--             buckets touched undeclared)
-- ARGV[1]     flow backlog bound: at this many records waiting for MySQL,
--             new reservations are refused
-- ARGV[2]     the call's id ([0-9a-f]+)
-- ARGV[3]     the highest order seq of the sale the caller has seen ("0":
--             none); a sale whose counter is below it is fenced (check_seen
--             in prelude.lua) and the call fails with "FENCED behind"
-- ARGV[4]     the sale's token as the caller knows it from MySQL ("": the
--             caller does not list the sale as live, and is served without
--             the check); a sale hash of another token is another
--             database's: the call fails with "FENCED foreign", writing
--             nothing
-- ARGV[5+3i], ARGV[6+3i], ARGV[7+3i]  (i = 0, 1, ...) one reservation:
--             buyer's user id (decimal), quantity (>= 1), idempotency key
--             or "" for none
--
-- Returns one reply per reservation, in order:
--          {"ok", seq, packed_order}   a new pending order (also when the
--                                      same call comes again)
--          {"dup", seq, packed_order}  the order this idempotency or retry
--                                      key made before
--          {"sold_out", avail}         not enough units: avail is what is
--                                      left ("0": the sale is sold out)
--          {"<error code>"}            not_found | sale_not_started | sale_ended
--                                      | sale_paused | limit_exceeded
--                                      | backlog_full
-- Flow records of new orders carry `k`, the key the order was made under
-- (the idempotency key, or the retry key): MySQL keeps it, so a sale
-- rebuilt from MySQL still finds an order by its key.
-- A fenced sale fails the call with the error "FENCED <reason>".

local n = math.floor((#ARGV - 4) / 3)
declare_buckets(8, true)

-- The buckets this call must declare and did not: those of its new orders,
-- and those of earlier orders it reads (a key finds an order of any
-- bucket). Reads come before any write, so a call that needs more fails
-- having written nothing.
local need, needed = {}, {}
local function need_bucket(b)
  if not needed[b] then
    needed[b] = true
    need[#need + 1] = b
  end
end
local function check_need()
  if #need > 0 then
    error({err = 'NEEDBUCKETS ' .. table.concat(need, ' ')})
  end
end

-- load_order, or nothing when the order's bucket is not declared (noted
-- in `need`: the call fails before it writes).
local function peek_order(seq)
  local b = due_bucket(seq)
  if not orders_declared(b) then
    need_bucket(b)
    return nil, nil
  end
  return load_order(seq)
end
local call_id = ARGV[2]
local replies = {}
local function refuse_all(code)
  for i = 1, n do
    replies[i] = {code}
  end
  return replies
end

-- The letters of a call's record: o made an order, d found an earlier one,
-- the rest are refusals.
local OUTCOME = {sale_not_started = 'n', sale_ended = 'e', sale_paused = 'p',
  limit_exceeded = 'l', backlog_full = 'b', sold_out = 's'}
local REFUSAL = {}
for code, letter in pairs(OUTCOME) do
  REFUSAL[letter] = code
end

-- The seq of the order made by reservation `index` of a call record, or nil.
local function made_by(record, index)
  local first, letters = string.match(record, '^(%d+)|(.*)$')
  if string.sub(letters, index, index) ~= 'o' then
    return nil
  end
  local _, before = string.gsub(string.sub(letters, 1, index - 1), 'o', 'o')
  return int(tonumber(first) + before)
end

-- The order seq that `user`'s key made before, or nil. A buyer's own key
-- (`own`) may be the retry key of another call: then that call's record
-- is looked at too.
local function made_before(user, key, own)
  local made = redis.call('HGET', KEYS[6], user .. ':' .. key)
  if made or not own then
    return made
  end
  local call, index = string.match(key, '^rk%-(%x+)%-(%d+)$')
  local record = call and redis.call('HGET', KEYS[7], call)
  if not record then
    return nil
  end
  made = made_by(record, tonumber(index))
  local o = made and peek_order(made)
  if o and o.user == user then
    return made
  end
  return nil
end

-- The key a reservation is judged under: the buyer's idempotency key, or
-- for none this call's retry key of it (found only if a retry came first).
local function key_of(i)
  local idem = ARGV[3 * i + 4]
  if idem ~= '' then
    return idem, true
  end
  return 'rk-' .. call_id .. '-' .. i, false
end

local sale = redis.call('HMGET', KEYS[1], 'start_ms', 'end_ms', 'avail', 'limit', 'price', 'window_ms',
  'seq', 'layout', 'fence', 'db', 'paused', 'pending', 'flows')
local token = ARGV[4]
if sale[9] then
  -- What this caller has seen still counts toward the rebuild: in this
  -- database's sale, and in a fence-only hash a reserve call left for a
  -- missing sale (no token and no layout yet: below), which the guard
  -- adopts as this sale's and the rebuild reads the hint of. Dropping the
  -- report there would let the rebuild count fewer orders than callers
  -- were acknowledged.
  if (token ~= '' and sale[10] == token) or (not sale[10] and not sale[8]) then
    keep_hint(KEYS[1], ARGV[3])
  end
  fenced(sale[9])
end
if token ~= '' and sale[10] ~= token then
  -- Another database's sale (a sale hash without a token is the guard's
  -- to judge). A caller without a token (it does not list the sale as
  -- live yet: created elsewhere a moment ago) cannot tell, and is served.
  if sale[10] then
    fenced('foreign')
  end
end
if not sale[1] then
  if (tonumber(ARGV[3]) or 0) > 0 then
    -- This caller was given orders of the sale, so it existed: Redis lost
    -- it. A fence-only hash keeps the highest id given out (the guard adds
    -- the token and the rebuild counts the lost orders up to it).
    keep_hint(KEYS[1], ARGV[3])
    set_fence(KEYS[1], 'missing')
    fenced('missing')
  end
  return refuse_all('not_found')
end
if sale[8] ~= LAYOUT then
  layout_error()
end
check_seen(KEYS[1], ARGV[3], sale[7])

-- The same call again: answer what it did the first time.
local record = redis.call('HGET', KEYS[7], call_id)
if record then
  local letters = string.match(record, '|(.*)$')
  for i = 1, n do
    local letter = string.sub(letters, i, i)
    if letter == 'o' then
      local seq = made_by(record, i)
      local _, packed = peek_order(seq)
      replies[i] = {'ok', seq, packed}
    elseif letter == 'd' then
      local user = ARGV[3 * i + 2]
      local seq = made_before(user, key_of(i))
      local packed = seq and select(2, peek_order(seq))
      replies[i] = {'dup', seq, packed}
    elseif letter == 's' then
      replies[i] = {'sold_out', '-1'}
    else
      replies[i] = {REFUSAL[letter]}
    end
  end
  check_need()
  return replies
end

local now = now_ms()
local too_early, too_late = now < tonumber(sale[1]), now >= tonumber(sale[2])
-- An admin's pause (control.lua): no new order until resumed; a buyer's
-- key that made an order before still finds it.
local paused = sale[11] == '1'
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
local letters = {}
for i = 1, n do
  local user, qty = ARGV[3 * i + 2], tonumber(ARGV[3 * i + 3])
  local key, own_key = key_of(i)
  local idem_field = user .. ':' .. key
  local made = made_before(user, key, own_key)
  if made then
    local _, packed = peek_order(made)
    replies[i] = {'dup', made, packed}
  elseif claimed[idem_field] then
    replies[i] = {'dup'}
    echoes[#echoes + 1] = {replies[i], claimed[idem_field]}
  elseif too_early then
    replies[i] = {'sale_not_started'}
  elseif too_late then
    replies[i] = {'sale_ended'}
  elseif paused then
    replies[i] = {'sale_paused'}
  else
    if held[user] == nil then
      held[user] = tonumber(redis.call('HGET', KEYS[2], user) or '0')
    end
    -- The buyer's limit first: one buyer's oversized ask is theirs to be
    -- refused, and never reads as the sale being sold out.
    if held[user] + qty > limit then
      replies[i] = {'limit_exceeded'}
    elseif avail < qty then
      replies[i] = {'sold_out', int(avail)}
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
      local order = {i = i, id = int(seq), user = user, qty = qty, key = key}
      if own_key then
        order.idem_field = idem_field
        claimed[idem_field] = order
      end
      accepted[#accepted + 1] = order
      replies[i] = {'ok', order.id}
    end
  end
  local tag = replies[i][1]
  letters[i] = tag == 'ok' and 'o' or tag == 'dup' and 'd' or OUTCOME[tag]
end

for _, a in ipairs(accepted) do
  local b = due_bucket(a.id)
  if not bucket_declared(b) then
    need_bucket(b)
  end
end
check_need()
if #accepted == 0 then
  return replies
end
-- The counters first, in one write (this call read them and nothing else
-- runs meanwhile): stock, the order seq and the flow record numbers the
-- new orders take (flows .. flows + #accepted).
local flows = tonumber(sale[13] or '0')
redis.call('HSET', KEYS[1], 'avail', int(avail), 'pending', int(tonumber(sale[12] or '0') + reserved),
  'seq', int(seq), 'flows', int(flows + #accepted))
redis.call('HSET', KEYS[7], call_id, accepted[1].id .. '|' .. table.concat(letters))
local held_pairs, idem_pairs = {}, {}
for _, user in ipairs(buyers) do
  held_pairs[#held_pairs + 1] = user
  held_pairs[#held_pairs + 1] = int(held[user])
end
redis.call('HSET', KEYS[2], unpack(held_pairs))
for _, a in ipairs(accepted) do
  if a.idem_field then
    idem_pairs[#idem_pairs + 1] = a.idem_field
    idem_pairs[#idem_pairs + 1] = a.id
  end
end
if #idem_pairs > 0 then
  redis.call('HSET', KEYS[6], unpack(idem_pairs))
end
local made = {}
for k, a in ipairs(accepted) do
  local o = {
    status = 'pending', user = a.user, qty = a.qty, amount = price * a.qty,
    created = int(now), deadline = deadline, paid = '', closed = '',
    refunded = '', flow = '', payment_id = '',
  }
  record_flow(o, a.id, 'reserve', nil, a.key, nil, flows + k)
  made[k] = {a.id, o}
  a.packed = pack_order(o)
  replies[a.i][3] = a.packed
end
store_orders(made)
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
