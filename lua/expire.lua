-- expire.lua: work off the due entries of one sale's due-queue (the deadline
-- set): close every order among them still pending past its payment
-- deadline, and retry refunds waiting for their order to settle.
--
-- Claiming (ZREM) and acting happen in one call, so any number of workers in
-- any number of processes can run this without locks, and a worker that dies
-- between calls leaves nothing half done. Members are an order seq (its
-- payment deadline) or "r<seq>:<attempt>:<requested_ms>" (a refund retry);
-- buckets are worked off earliest first (see the due-queue in prelude.lua).
--
-- KEYS[1..5]  sale, buyers, orders, due-queue, flow (see prelude.lua)
-- KEYS[6]     refund dead-letter hash (seq -> "<requested_ms>|<attempts>")
-- KEYS[7..]   the buckets this call may work, both keys of each (due-queue
--             and orders; see declare_buckets in prelude.lua): the caller
--             declares the first ones of the index, as the last call
--             answered them; a due bucket not declared is left to the next
--             call
-- ARGV[1]     most entries to claim
-- ARGV[2]     refund retry: first delay in ms (doubles per attempt)
-- ARGV[3]     refund retry: longest delay in ms
-- ARGV[4]     refund retry: age in ms after which a refund is dead-lettered
--
-- Returns: {claimed, closed, still_due, next_due_ms or -1, now_ms, refunded,
--           dead_lettered, refunds_waiting,
--           lateness_ms of each closed order..., wait_ms of each refund...,
--           the first 16 buckets of the index (to declare next call)...}
--          (still_due counts the due entries of the 16 earliest due buckets
--          only, an undeclared one as 1: exact up to about a thousand, a
--          lower bound beyond)

check_layout()
declare_buckets(7)
-- A sale hash without its terms (Redis lost the sale, or a fence-only hash
-- stands in for it) has nothing to expire until it is rebuilt.
if not redis.call('HGET', KEYS[1], 'layout') then
  fenced('missing')
end

local limit, first, longest, max_age =
  tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local now = now_ms()
local claimed = 0
local lateness, waits, dead = {}, {}, 0

local function retry_refund(member)
  local seq, attempt, requested = string.match(member, '^r(%d+):(%d+):(%d+)$')
  attempt, requested = tonumber(attempt), tonumber(requested)
  local o = load_order(seq)
  if not o or o.status ~= 'refund_pending' then
    return
  end
  if settled(o) then
    refund_now(seq, o, now)
    table.insert(waits, now - requested)
  elseif now - requested >= max_age then
    -- Visible, not forgotten: the order stays refund_pending, nothing else moves.
    redis.call('HSET', KEYS[6], seq, int(requested) .. '|' .. (attempt + 1))
    redis.call('HINCRBY', KEYS[1], 'refunds_waiting', -1)
    redis.call('HINCRBY', KEYS[1], 'refunds_dead', 1)
    dead = dead + 1
  else
    -- Capped exponential backoff, with a spread that differs per order.
    local delay = math.min(longest, first * 2 ^ (attempt + 1))
    local spread = (now + tonumber(seq) * 7919) % (math.floor(delay / 4) + 1)
    due_add(seq, refund_member(seq, attempt + 1, int(requested)), now + delay + spread)
  end
end

-- Orders to close, found while claiming ({seq, order}); closed together
-- after the claim with the writes of release() in prelude.lua, each kind at
-- once: the sale's counters first, then the buyers' units, the flow records
-- and the orders (their deadline entries are claimed already).
local closing, closing_units = {}, 0

-- Works off the claimed members of one bucket: refund retries one by one,
-- deadlines by reading their orders at once.
local function work_off(members)
  local seqs = {}
  for _, member in ipairs(members) do
    if string.sub(member, 1, 1) == 'r' then
      retry_refund(member)
    else
      seqs[#seqs + 1] = member
    end
  end
  for i, o in ipairs(load_orders(seqs)) do
    if o and o.status == 'pending' then
      closing[#closing + 1] = {seqs[i], o}
      closing_units = closing_units + o.qty
    end
  end
end

local function close_claimed()
  if #closing == 0 then
    return
  end
  redis.call('HINCRBY', KEYS[1], 'avail', closing_units)
  redis.call('HINCRBY', KEYS[1], 'pending', -closing_units)
  redis.call('HINCRBY', KEYS[1], 'closed', closing_units)
  local n = take_flow_numbers(#closing)
  -- Each buyer's units, read once, less what this call closes.
  local users, units = {}, {}
  for _, c in ipairs(closing) do
    local o = c[2]
    if not units[o.user] then
      users[#users + 1] = o.user
      units[o.user] = 0
    end
    units[o.user] = units[o.user] - o.qty
  end
  local held = redis.call('HMGET', KEYS[2], unpack(users))
  local keep, gone = {}, {}
  for i, user in ipairs(users) do
    local left = tonumber(held[i] or '0') + units[user]
    if left > 0 then
      keep[#keep + 1] = user
      keep[#keep + 1] = int(left)
    else
      gone[#gone + 1] = user
    end
  end
  if #keep > 0 then
    redis.call('HSET', KEYS[2], unpack(keep))
  end
  if #gone > 0 then
    redis.call('HDEL', KEYS[2], unpack(gone))
  end
  for i, c in ipairs(closing) do
    local o = c[2]
    o.status = 'closed'
    o.closed = int(now)
    record_flow(o, c[1], 'close', nil, nil, nil, n + i)
    table.insert(lateness, now - o.deadline)
  end
  store_orders(closing)
end

while claimed < limit do
  local head = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')
  if not head[1] or tonumber(head[2]) > now then
    break
  end
  local bucket = head[1]
  if not bucket_declared(bucket) then
    break
  end
  local key = due_key(bucket)
  local due = redis.call('ZRANGEBYSCORE', key, '-inf', now, 'LIMIT', 0, limit - claimed)
  if #due > 0 then
    redis.call('ZREM', key, unpack(due))
  end
  work_off(due)
  claimed = claimed + #due
  due_reindex(bucket)
end
close_claimed()

local next_due = -1
local head = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')
if head[2] then
  next_due = tonumber(head[2])
end
local still_due = 0
for _, bucket in ipairs(redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now, 'LIMIT', 0, 16)) do
  if due_declared(bucket) then
    still_due = still_due + redis.call('ZCOUNT', due_key(bucket), '-inf', now)
  else
    still_due = still_due + 1
  end
end
local out = {claimed, #lateness, still_due, next_due, now,
  #waits, dead, tonumber(redis.call('HGET', KEYS[1], 'refunds_waiting') or '0')}
for _, l in ipairs(lateness) do
  table.insert(out, l)
end
for _, w in ipairs(waits) do
  table.insert(out, w)
end
for _, b in ipairs(redis.call('ZRANGE', KEYS[4], 0, 15)) do
  table.insert(out, tonumber(b))
end
return out
