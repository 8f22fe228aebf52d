-- retire.lua: retire an ended sale with no work left. A sale with any work
-- left is refused and nothing changes. Otherwise the sale hash is marked
-- `retired` (refund.lua then answers "retired", so MySQL alone carries the
-- sale's later changes; no other script can write to a sale in this state:
-- it has ended, holds no pending order and nothing is due) and every key of
-- the sale gets an expiry of the retention. The reconciler calls it inside
-- the MySQL transaction that sets `retired_at`, and commits only on "ok".
-- Calling it again on a retired sale renews the expiries and nothing else.
--
-- KEYS[1]  sale hash
-- KEYS[2]  buyers hash
-- KEYS[3]  idempotency hash
-- KEYS[4]  the orders' base name (the orders live in buckets, see
--          prelude.lua)
-- KEYS[5]  due-queue index (no entry: every bucket is gone)
-- KEYS[6]  flow stream
-- KEYS[7]  refund dead-letter hash
-- KEYS[8]  calls hash (reserve.lua)
-- KEYS[9..] every orders bucket of the sale, KEYS[4]..':'..n for n = 0 ..
--          floor(seq / 64) (seq: the sale's order counter); when one is
--          missing, the call fails with "NEEDBUCKETS <n> ..." and changes
--          nothing
-- ARGV[1]  MySQL's reconciler cursor "<ms>-<seq>" ("0-0": nothing applied yet)
-- ARGV[2]  retention in seconds (>= 1)
--
-- (Helpers from prelude.lua.)
--
-- Returns: {"ok"}            retired, by this call or before
--          {"busy", reason}  work is left; reason: not_ended | pending |
--                            refunds | due | flow | unsettled
--          {"not_found"}     Redis does not hold the sale

check_layout()

if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'not_found'}
end
local bucket_prefix = KEYS[4] .. ':'
local declared = {}
for i = 9, #KEYS do
  if string.sub(KEYS[i], 1, #bucket_prefix) ~= bucket_prefix then
    error({err = 'flashsale: KEYS[' .. i .. '] is not an orders bucket of this sale'})
  end
  declared[string.sub(KEYS[i], #bucket_prefix + 1)] = true
end
local top = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
if top > 0 then
  local need = {}
  for b = 0, math.floor(top / DUE_BUCKET) do
    if not declared[int(b)] then
      need[#need + 1] = int(b)
    end
  end
  if #need > 0 then
    error({err = 'NEEDBUCKETS ' .. table.concat(need, ' ')})
  end
end
local s = redis.call('HMGET', KEYS[1], 'end_ms', 'pending', 'refunds_waiting', 'refunds_dead',
  'settled')
local function num(v)
  return tonumber(v or '0') or 0
end
if now_ms() < num(s[1]) then
  return {'busy', 'not_ended'}
end
if num(s[2]) ~= 0 then
  return {'busy', 'pending'}
end
if num(s[3]) ~= 0 or num(s[4]) ~= 0 or redis.call('EXISTS', KEYS[7]) == 1 then
  return {'busy', 'refunds'}
end
if redis.call('EXISTS', KEYS[5]) == 1 then
  return {'busy', 'due'}
end
if redis.call('XLEN', KEYS[6]) > 0 then
  return {'busy', 'flow'}
end
-- Everything the stream ever generated is in MySQL: Redis's settled mark is
-- MySQL's cursor, and no record came after it. A sale loaded from MySQL's
-- settled state keeps a floor entry id just past the cursor (load_sale.lua).
local cursor = ARGV[1]
local settled = s[5] or '0-0'
local last = last_generated_id(KEYS[6])
if last == '' then
  last = '0-0'
end
local cm, cs = string.match(cursor, '^(%d+)-(%d+)$')
local floor = string.format('%d-%d', tonumber(cm), tonumber(cs) + 1)
if settled ~= cursor or (last ~= cursor and last ~= floor) then
  return {'busy', 'unsettled'}
end

if redis.call('HEXISTS', KEYS[1], 'retired') == 0 then
  redis.call('HSET', KEYS[1], 'retired', int(now_ms()))
end
for i = 1, #KEYS do
  redis.call('EXPIRE', KEYS[i], ARGV[2])
end
return {'ok'}
