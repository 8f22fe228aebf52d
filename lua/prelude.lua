-- prelude.lua: helpers prepended to every order script (see engine/scripts.rs).
--
-- Order scripts share one KEYS layout, so the helpers below can name keys:
--   KEYS[1] sale hash, KEYS[2] buyers hash, KEYS[3] orders hash,
--   KEYS[4] deadlines zset, KEYS[5] flow stream (KEYS[6]+ are script-specific).
-- A packed order is status|user|qty|amount|created|deadline|paid|closed|refunded|payment_id
-- (times in ms by Redis's clock, empty when unset; payment_id last, it may hold '|').

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- %d keeps large integers out of Lua's exponent notation.
local function int(n)
  return string.format('%d', n)
end

local function unpack_order(packed)
  local f = {}
  local rest = packed
  for i = 1, 9 do
    local bar = string.find(rest, '|', 1, true)
    f[i] = string.sub(rest, 1, bar - 1)
    rest = string.sub(rest, bar + 1)
  end
  return {
    status = f[1], user = f[2], qty = tonumber(f[3]), amount = tonumber(f[4]),
    created = f[5], deadline = tonumber(f[6]), paid = f[7], closed = f[8],
    refunded = f[9], payment_id = rest,
  }
end

local function pack_order(o)
  return table.concat({o.status, o.user, int(o.qty), int(o.amount), o.created,
    int(o.deadline), o.paid, o.closed, o.refunded, o.payment_id}, '|')
end

-- Stores the order and writes its flow record: the event and the order's
-- whole state after it, which is all the reconciler needs.
local function save(seq, o, event)
  local packed = pack_order(o)
  redis.call('HSET', KEYS[3], seq, packed)
  redis.call('XADD', KEYS[5], '*', 'ev', event, 'o', seq, 's', packed)
  return packed
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
  redis.call('ZREM', KEYS[4], seq)
  return save(seq, o, status == 'closed' and 'close' or 'cancel')
end
