-- prelude.lua: helpers prepended to every order script (see engine/scripts.rs).
--
-- Order scripts share one KEYS layout, so the helpers below can name keys:
--   KEYS[1] sale hash, KEYS[2] buyers hash, KEYS[3] the orders' base name
--   (never a key itself: the orders live in buckets KEYS[3]..':'..n, see
--   the due-queue below), KEYS[4] due-queue index, KEYS[5] flow stream
--   (KEYS[6]+ are script-specific).
-- A packed order (the form replies and flow records carry) is
--   status|user|qty|amount|created|deadline|paid|closed|refunded|flow|payment_id
-- (times in ms by Redis's clock, empty when unset; flow is the id of the order's
-- last flow record; payment_id last, it may hold '|'). The orders buckets keep a
-- shorter form of it (see store_order) that load_order expands again.
-- The sale hash keeps unit counters (avail, pending, paid, cancelled, closed,
-- refunded, restocked) so that avail + pending + paid + refunded - restocked
-- = total at every moment, and `settled`, the last flow id MySQL committed.
-- (src/units.rs lists the counters with their MySQL names; a test there
-- checks this list.)
-- The buyers hash holds each buyer's units in pending, paid and
-- refund_pending orders.

-- The Redis layout these scripts read and write: the due-queue and the
-- orders in buckets of 64 order seqs, and the short stored order form below. A sale hash carries it in its
-- `layout` field (src/engine/keys.rs); a sale written by another layout is
-- refused with an error before anything is read or written, never misread.
local LAYOUT = '3'

local function layout_error()
  error({err = 'flashsale: sale ' .. KEYS[1] .. ' was written by another Redis layout than ' ..
    LAYOUT .. '; settle it with the build that made it'})
end


local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- %d keeps large integers out of Lua's exponent notation.
local function int(n)
  return string.format('%d', n)
end

-- A fenced sale (Redis lost some of it or went back in time; its `fence`
-- field says why: missing, behind, foreign, rebuilding:<id>) takes no write
-- and answers no read until it is rebuilt from MySQL (src/workers/guard.rs).
-- The error reply "FENCED <reason>" is answered 503 with Retry-After.
local function fenced(reason)
  error({err = 'FENCED ' .. reason})
end

-- Fences the sale whose hash is `sale` for `reason` (with the time,
-- `fenced_at`), unless it is.
local function set_fence(sale, reason)
  if not redis.call('HGET', sale, 'fence') then
    redis.call('HSET', sale, 'fence', reason, 'fenced_at', int(now_ms()))
  end
end

-- Keeps the highest order seq a caller was given for the sale (hash
-- `sale`) in
-- `lost_hint`: the rebuild counts lost orders up to it and moves the
-- counter past it, so an id a caller saw is never given out again.
local function keep_hint(sale, seen)
  seen = tonumber(seen) or 0
  if seen > tonumber(redis.call('HGET', sale, 'lost_hint') or '0') then
    redis.call('HSET', sale, 'lost_hint', int(seen))
  end
end

-- Refuses a fenced sale, and a sale of another layout (a missing sale
-- passes: scripts answer not_found for it).
local function check_layout()
  local s = redis.call('HMGET', KEYS[1], 'layout', 'fence')
  if s[2] then
    fenced(s[2])
  end
  if s[1] ~= LAYOUT and redis.call('EXISTS', KEYS[1]) == 1 then
    layout_error()
  end
end

-- As check_layout, for scripts that address one order: a sale Redis does
-- not hold at all is the error reply "NOSALE", which the engine answers as
-- not found for a sale MySQL does not list as live, and as fenced (503)
-- for one it does (Redis lost it).
local function check_sale()
  check_layout()
  if redis.call('EXISTS', KEYS[1]) == 0 then
    error({err = 'NOSALE'})
  end
end

-- Refuses to write when Redis is behind what this caller has seen: the
-- order counter of the sale (hash `sale`) is below the highest order seq
-- the caller was given for it (`seen`), so Redis lost orders (a restart from an older
-- snapshot, a replica promoted while it lagged). The sale is fenced here,
-- before it can give an order id out twice.
local function check_seen(sale, seen, counter)
  if (tonumber(seen) or 0) > (tonumber(counter) or 0) then
    keep_hint(sale, seen)
    set_fence(sale, 'behind')
    fenced('behind')
  end
end

-- The due-queue holds payment deadlines (member: the order seq) and refund
-- retries (member: "r<seq>:<attempt>:<requested_ms>"), scored by when they
-- fall due, in ms by Redis's clock. It is kept in buckets of DUE_BUCKET
-- consecutive order seqs: the entries of order seq live in the sorted set
-- KEYS[4]..':'..floor(seq / DUE_BUCKET), and KEYS[4] itself holds every
-- non-empty bucket scored by its earliest entry. An order has one entry at
-- most, so a bucket stays small enough for Redis's compact (listpack)
-- encoding: about 15 bytes an entry, where one large sorted set takes ~100.
-- (Mirrored in src/engine/keys.rs.)
local DUE_BUCKET = 64

local function due_bucket(seq)
  return string.format('%d', math.floor(tonumber(seq) / DUE_BUCKET))
end

-- The orders are kept in buckets the same way: order seq lives in the hash
-- KEYS[3]..':'..floor(seq / DUE_BUCKET), field seq, value its stored form
-- (store_order below): the same bucket number as its due-queue entry, so
-- one declared bucket number covers both. 64 orders of a few dozen bytes
-- keep a bucket in Redis's compact (listpack) hash encoding (defaults
-- hash-max-listpack-entries 128, hash-max-listpack-value 64 bytes): about
-- 40 bytes an order, where one large hash of every order takes ~87. A
-- paid order with a long payment id may pass 64 bytes and turn its bucket
-- into a regular hashtable; that costs memory for that bucket only, and
-- is accepted.

-- A call touches only the buckets it declares in its KEYS (Redis Cluster
-- and proxies route and check by declared keys): a script calls
-- declare_buckets(i) with the position of its first bucket key, and
-- due_key and orders_key refuse any bucket not declared, with an error and
-- before any write of the bucket. A caller declares bucket n by naming
-- both of its keys, KEYS[4]..':'..n and KEYS[3]..':'..n (src/engine/keys.rs
-- `bucket_keys`), or only the orders bucket for a script that reads or
-- writes orders alone.
local declared_due, declared_orders = {}, {}
local undeclared_ok = false
local function declare_buckets(first, optional)
  local due_prefix, orders_prefix = KEYS[4] .. ':', KEYS[3] .. ':'
  -- A caller that cannot know the buckets (redis-benchmark running the
  -- reserve script as a reference) declares none; the service always does.
  undeclared_ok = optional and #KEYS < first
  for i = first, #KEYS do
    local key = KEYS[i]
    if string.sub(key, 1, #due_prefix) == due_prefix then
      declared_due[string.sub(key, #due_prefix + 1)] = key
    elseif string.sub(key, 1, #orders_prefix) == orders_prefix then
      declared_orders[string.sub(key, #orders_prefix + 1)] = key
    else
      error({err = 'flashsale: KEYS[' .. i .. '] is not a due-queue or orders bucket of this sale'})
    end
  end
end

local function due_key(bucket)
  local key = declared_due[bucket]
  if not key and undeclared_ok then
    return KEYS[4] .. ':' .. bucket
  end
  if not key then
    error({err = 'flashsale: due-queue bucket ' .. bucket .. ' is not declared in KEYS'})
  end
  return key
end

-- The orders bucket (a hash) of bucket number `bucket` (see due_key).
local function orders_key(bucket)
  local key = declared_orders[bucket]
  if not key and undeclared_ok then
    return KEYS[3] .. ':' .. bucket
  end
  if not key then
    error({err = 'flashsale: orders bucket ' .. bucket .. ' is not declared in KEYS'})
  end
  return key
end

-- Whether due-queue bucket `b` is declared in this call's KEYS.
local function due_declared(b)
  return declared_due[b] ~= nil or undeclared_ok
end

-- Whether orders bucket `b` is declared in this call's KEYS.
local function orders_declared(b)
  return declared_orders[b] ~= nil or undeclared_ok
end

-- Whether both keys of bucket `b` are declared.
local function bucket_declared(b)
  return due_declared(b) and orders_declared(b)
end

-- Scores bucket b in the index by its earliest entry, or drops it when empty.
local function due_reindex(b)
  local head = redis.call('ZRANGE', due_key(b), 0, 0, 'WITHSCORES')
  if head[1] then
    redis.call('ZADD', KEYS[4], head[2], b)
  else
    redis.call('ZREM', KEYS[4], b)
  end
end

-- Queues `member` of order `seq`, due at `at` (ms).
local function due_add(seq, member, at)
  local b = due_bucket(seq)
  redis.call('ZADD', due_key(b), at, member)
  redis.call('ZADD', KEYS[4], 'LT', at, b)
end

-- Takes `member` of order `seq` off the queue; 1 if it was there, else 0.
local function due_remove(seq, member)
  local b = due_bucket(seq)
  local removed = redis.call('ZREM', due_key(b), member)
  if removed == 1 then
    due_reindex(b)
  end
  return removed
end

-- The first n '|'-separated fields of s, and the rest after them.
local function split_fields(s, n)
  local f = {}
  local rest = s
  for i = 1, n do
    local bar = string.find(rest, '|', 1, true)
    f[i] = string.sub(rest, 1, bar - 1)
    rest = string.sub(rest, bar + 1)
  end
  return f, rest
end

local function unpack_order(packed)
  local f, rest = split_fields(packed, 10)
  return {
    status = f[1], user = f[2], qty = tonumber(f[3]), amount = tonumber(f[4]),
    created = f[5], deadline = tonumber(f[6]), paid = f[7], closed = f[8],
    refunded = f[9], flow = f[10], payment_id = rest,
  }
end

-- Orders as their orders bucket keeps them: one status letter glued to the
-- user, times in ms since the sale's start, and the flow id's time in ms
-- since the order was created (0 for a new order's reserve record, most
-- often):
--   <letter><user>|qty|created|paid|closed|refunded|flow|payment_id
-- The amount (price x qty) and the deadline (created + payment window)
-- follow from the sale's terms. A pending order of a 12-digit user id takes
-- about 30 bytes instead of 75: 64 of them fit a listpack of 2.5 KB.
local STATUS_LETTER = {pending = 'p', paid = 'a', cancelled = 'c', closed = 'x',
  refund_pending = 'w', refunded = 'r'}
local STATUS_NAME = {p = 'pending', a = 'paid', c = 'cancelled', x = 'closed',
  w = 'refund_pending', r = 'refunded'}

local terms
local function sale_terms()
  if not terms then
    local t = redis.call('HMGET', KEYS[1], 'start_ms', 'window_ms', 'price', 'layout')
    if t[4] ~= LAYOUT then
      layout_error()
    end
    terms = {start = tonumber(t[1]), window = tonumber(t[2]), price = tonumber(t[3])}
  end
  return terms
end

local function since_start(ms)
  if ms == '' then
    return ''
  end
  return int(tonumber(ms) - sale_terms().start)
end

local function from_start(rel)
  if rel == '' then
    return ''
  end
  return int(tonumber(rel) + sale_terms().start)
end

-- The stored form of order `o`.
local function stored_form(o)
  local fm, fs = '', ''
  if o.flow ~= '' then
    fm, fs = string.match(o.flow, '^(%d+)-(%d+)$')
    fm = int(tonumber(fm) - tonumber(o.created)) .. '-' .. fs
  end
  return table.concat({STATUS_LETTER[o.status] .. o.user, int(o.qty),
    since_start(o.created), since_start(o.paid), since_start(o.closed),
    since_start(o.refunded), fm, o.payment_id}, '|')
end

local function store_order(seq, o)
  redis.call('HSET', orders_key(due_bucket(seq)), seq, stored_form(o))
end

local function pack_order(o)
  return table.concat({o.status, o.user, int(o.qty), int(o.amount), o.created,
    int(o.deadline), o.paid, o.closed, o.refunded, o.flow, o.payment_id}, '|')
end

-- The order in `stored` (its stored form; nil gives nil) and, unless
-- `unpacked`, its packed form.
local function unstore_order(stored, unpacked)
  if not stored then
    return nil, nil
  end
  local f, rest = split_fields(stored, 7)
  local t = sale_terms()
  local qty = tonumber(f[2])
  local created = from_start(f[3])
  local flow = ''
  if f[7] ~= '' then
    local fm, fs = string.match(f[7], '^(-?%d+)-(%d+)$')
    flow = int(tonumber(created) + tonumber(fm)) .. '-' .. fs
  end
  local o = {
    status = STATUS_NAME[string.sub(f[1], 1, 1)], user = string.sub(f[1], 2), qty = qty,
    amount = t.price * qty, created = created, deadline = tonumber(created) + t.window,
    paid = from_start(f[4]), closed = from_start(f[5]), refunded = from_start(f[6]),
    flow = flow, payment_id = rest,
  }
  if unpacked then
    return o
  end
  return o, pack_order(o)
end

-- The order `seq` (nil when there is none) and its packed form.
local function load_order(seq)
  return unstore_order(redis.call('HGET', orders_key(due_bucket(seq)), seq))
end

-- `list` split by the bucket of `seq_of(entry)`: {{bucket, {entry, ...}},
-- ...}, buckets in order of first appearance.
local function by_bucket(list, seq_of)
  local groups, at = {}, {}
  for _, e in ipairs(list) do
    local b = due_bucket(seq_of(e))
    if not at[b] then
      groups[#groups + 1] = {b, {}}
      at[b] = #groups
    end
    local g = groups[at[b]][2]
    g[#g + 1] = e
  end
  return groups
end

-- The orders of `seqs` (a list; nil where there is none), read with one
-- HMGET per bucket (the orders only: no packed forms).
local function load_orders(seqs)
  local out = {}
  if #seqs == 0 then
    return out
  end
  local index = {}
  for i = 1, #seqs do
    index[i] = i
  end
  for _, g in ipairs(by_bucket(index, function(i) return seqs[i] end)) do
    local fields = {}
    for j, i in ipairs(g[2]) do
      fields[j] = seqs[i]
    end
    local stored = redis.call('HMGET', orders_key(g[1]), unpack(fields))
    for j, i in ipairs(g[2]) do
      out[i] = unstore_order(stored[j] or nil, true)
    end
  end
  return out
end

-- Writes the order's flow record (the event and the order's whole state
-- after it, which is all the reconciler needs; `restocked` adds r=1|0 to a
-- refund; `key` adds k=<the key a new order was made under> to a reserve;
-- `extra` adds more field/value pairs, as a late payment's p=<payment id>
-- and a=<amount>) and sets the order's `flow` to the record's id; save()
-- below also stores the order and returns its packed form.
-- `n` numbers the sale's records 1, 2, 3, ... (the sale hash's `flows`):
-- MySQL keeps the last one applied, so a Redis that went back in time
-- shows by its numbers, whatever its clock says (workers/guard.rs). A
-- script writing many records takes their numbers at once with
-- take_flow_numbers and passes each; otherwise the next one is taken.
local function record_flow(o, seq, event, restocked, key, extra, n)
  n = n or redis.call('HINCRBY', KEYS[1], 'flows', 1)
  local fields = {'ev', event, 'o', seq, 's', pack_order(o), 'n', int(n)}
  if key then
    fields[#fields + 1] = 'k'
    fields[#fields + 1] = key
  end
  if restocked ~= nil then
    fields[#fields + 1] = 'r'
    fields[#fields + 1] = restocked and '1' or '0'
  end
  if extra then
    for i = 1, #extra do
      fields[#fields + 1] = extra[i]
    end
  end
  o.flow = redis.call('XADD', KEYS[5], '*', unpack(fields))
end

local function save(seq, o, event, restocked, key, extra)
  record_flow(o, seq, event, restocked, key, extra)
  store_order(seq, o)
  return pack_order(o)
end

-- Orders `seq` -> `o` of a list {{seq, o}, ...} stored with one write per
-- bucket.
local function store_orders(list)
  for _, g in ipairs(by_bucket(list, function(e) return e[1] end)) do
    local pairs_ = {}
    for _, e in ipairs(g[2]) do
      pairs_[#pairs_ + 1] = e[1]
      pairs_[#pairs_ + 1] = stored_form(e[2])
    end
    redis.call('HSET', orders_key(g[1]), unpack(pairs_))
  end
end

-- Takes `count` flow record numbers for the records a script is about to
-- write (before any of them, as a counter moves before what it counts):
-- returns the number before the first, so record i (1-based) is that + i.
local function take_flow_numbers(count)
  return redis.call('HINCRBY', KEYS[1], 'flows', count) - count
end

-- Whether stream id a <= stream id b ("<ms>-<seq>"). b is false (Redis nil)
-- while nothing of the sale is settled.
local function flow_le(a, b)
  if not b then
    return false
  end
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  am, bm = tonumber(am), tonumber(bm)
  if am ~= bm then
    return am < bm
  end
  return tonumber(as) <= tonumber(bs)
end

-- Whether MySQL has every flow record of the order.
local function settled(o)
  return flow_le(o.flow, redis.call('HGET', KEYS[1], 'settled'))
end

-- Refunds a paid (or refund-pending) order now: its units leave the buyer's
-- count, and while the sale is open they go back on sale. Returns the
-- packed order.
local function refund_now(seq, o, now)
  local was_waiting = o.status == 'refund_pending'
  o.status = 'refunded'
  o.refunded = int(now)
  redis.call('HINCRBY', KEYS[1], 'paid', -o.qty)
  redis.call('HINCRBY', KEYS[1], 'refunded', o.qty)
  if was_waiting then
    redis.call('HINCRBY', KEYS[1], 'refunds_waiting', -1)
  end
  -- The buyer no longer holds the units (their per-user limit frees up).
  if redis.call('HINCRBY', KEYS[2], o.user, -o.qty) <= 0 then
    redis.call('HDEL', KEYS[2], o.user)
  end
  local ends = tonumber(redis.call('HGET', KEYS[1], 'end_ms'))
  local restock = now < ends
  if restock then
    redis.call('HINCRBY', KEYS[1], 'avail', o.qty)
    redis.call('HINCRBY', KEYS[1], 'restocked', o.qty)
  end
  return save(seq, o, 'refund', restock)
end

-- The due-queue member of a refund retry: "r<seq>:<attempt>:<requested_ms>".
local function refund_member(seq, attempt, requested)
  return 'r' .. seq .. ':' .. attempt .. ':' .. requested
end

-- Ends a pending order without payment (status 'cancelled' or 'closed'):
-- its units go back on sale and off the buyer's count, its deadline entry
-- goes. Returns the packed order.
local function release(seq, o, status, now)
  o.status = status
  o.closed = int(now)
  redis.call('HINCRBY', KEYS[1], 'avail', o.qty)
  redis.call('HINCRBY', KEYS[1], 'pending', -o.qty)
  redis.call('HINCRBY', KEYS[1], status, o.qty)
  if redis.call('HINCRBY', KEYS[2], o.user, -o.qty) <= 0 then
    redis.call('HDEL', KEYS[2], o.user)
  end
  due_remove(seq, seq)
  return save(seq, o, status == 'closed' and 'close' or 'cancel')
end

-- The last id a stream generated ('' when it never had an entry): unlike its
-- last entry, it survives trimming and deletion.
local function last_generated_id(stream)
  if redis.call('EXISTS', stream) == 0 then
    return ''
  end
  local info = redis.call('XINFO', 'STREAM', stream)
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then
      return info[i + 1]
    end
  end
  return ''
end
