-- audit_fix.lua: apply one repair to a sale in Redis, only if what the
-- audit saw is still so (compare-and-set), so a repair never overwrites a
-- change that live traffic made after the audit looked.
--
-- KEYS[1..5]  sale, buyers, orders, due-queue, flow (see prelude.lua)
-- KEYS[6]     refund dead-letter hash
-- KEYS[7..8]  for a repair of one order (restore_order, drop_deadline,
--             mark_settled, requeue_refund, add_deadline): its bucket, both
--             keys (due-queue and orders; see declare_buckets in prelude.lua)
-- ARGV[1]     the repair (built by `Repair` in src/engine/audit.rs, whose tests
--             check that it names the same repairs as this script):
--   "counters"       ARGV[2] the flow stream's last-generated id the audit saw,
--                    ARGV[3..] field, value pairs to set in the sale hash
--   "buyer"          ARGV[2] the flow id as above, ARGV[3] user, ARGV[4] units
--   "restore_order"  ARGV[2] seq, ARGV[3] packed order (only if missing;
--                    a pending one gets its deadline entry back)
--   "drop_deadline"  ARGV[2] member (only if its order is not waiting on it)
--   "mark_settled"   ARGV[2] seq, ARGV[3] packed order the audit saw,
--                    ARGV[4] flow id to record as the order's last
--   "requeue_refund" ARGV[2] seq (a dead-lettered refund goes back to the queue)
--   "add_deadline"   ARGV[2] seq (a pending order without its deadline entry)
--
-- Returns: 1 when applied, 0 when the state had moved on (audit again).

check_layout()
declare_buckets(7)

local op = ARGV[1]
if op == 'counters' then
  if last_generated_id(KEYS[5]) ~= ARGV[2] then
    return 0
  end
  for i = 3, #ARGV, 2 do
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
  return 1
elseif op == 'buyer' then
  if last_generated_id(KEYS[5]) ~= ARGV[2] then
    return 0
  end
  if tonumber(ARGV[4]) > 0 then
    redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
  else
    redis.call('HDEL', KEYS[2], ARGV[3])
  end
  return 1
elseif op == 'restore_order' then
  if redis.call('HEXISTS', orders_key(due_bucket(ARGV[2])), ARGV[2]) == 1 then
    return 0
  end
  local o = unpack_order(ARGV[3])
  store_order(ARGV[2], o)
  if o.status == 'pending' then
    due_add(ARGV[2], ARGV[2], o.deadline)
  end
  return 1
elseif op == 'drop_deadline' then
  local member = ARGV[2]
  local seq = string.match(member, '^r(%d+):') or member
  local o = load_order(seq)
  local waiting = 'pending'
  if string.sub(member, 1, 1) == 'r' then
    waiting = 'refund_pending'
  end
  if o and o.status == waiting then
    return 0
  end
  return due_remove(seq, member)
elseif op == 'mark_settled' then
  local o, packed = load_order(ARGV[2])
  if packed ~= ARGV[3] then
    return 0
  end
  o.flow = ARGV[4]
  store_order(ARGV[2], o)
  return 1
elseif op == 'requeue_refund' then
  if redis.call('HDEL', KEYS[6], ARGV[2]) == 0 then
    return 0
  end
  local now = now_ms()
  redis.call('HINCRBY', KEYS[1], 'refunds_dead', -1)
  redis.call('HINCRBY', KEYS[1], 'refunds_waiting', 1)
  due_add(ARGV[2], refund_member(ARGV[2], 0, int(now)), now)
  return 1
elseif op == 'add_deadline' then
  local o = load_order(ARGV[2])
  if not o or redis.call('ZSCORE', due_key(due_bucket(ARGV[2])), ARGV[2]) then
    return 0
  end
  if o.status ~= 'pending' then
    return 0
  end
  due_add(ARGV[2], ARGV[2], o.deadline)
  return 1
end
return redis.error_reply('unknown repair ' .. tostring(op))
