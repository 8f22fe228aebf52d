-- load_sale.lua: put a sale (already persisted in MySQL) into Redis, once.
--
-- Loading twice must never reset a live sale's counters, so an existing sale
-- hash is left exactly as it is. A sale that Redis lost resumes from MySQL's
-- settled state: its counters and last order seq come in ARGV, and its flow
-- stream is moved past the reconciler's cursor, so that new records sort
-- after everything MySQL already holds (Redis's clock may be behind it).
--
-- KEYS[1]  sale hash
-- KEYS[2]  flow stream
-- ARGV[1]  the reconciler's cursor "<ms>-<seq>", or "" for a new sale
-- ARGV[2..] field, value, field, value, ... (the whole sale hash)
--
-- (Helpers from prelude.lua.)
--
-- Returns: 1 when the sale was loaded, 0 when it was there already.

if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
local fields = {}
for i = 2, #ARGV do
  fields[#fields + 1] = ARGV[i]
end
redis.call('HSET', KEYS[1], unpack(fields))
local cursor = ARGV[1]
if cursor ~= '' then
  local ms, seq = string.match(cursor, '^(%d+)-(%d+)$')
  -- An entry just past the cursor, removed at once: the stream keeps it as
  -- its last generated id, so every later id sorts after the cursor.
  local floor = string.format('%d-%d', tonumber(ms), tonumber(seq) + 1)
  local last = last_generated_id(KEYS[2])
  if last == '' then
    last = '0-0'
  end
  local lm, ls = string.match(last, '^(%d+)-(%d+)$')
  lm, ls = tonumber(lm), tonumber(ls)
  if lm < tonumber(ms) or (lm == tonumber(ms) and ls <= tonumber(seq)) then
    redis.call('XADD', KEYS[2], floor, 'ev', 'floor')
    redis.call('XDEL', KEYS[2], floor)
  end
  redis.call('HSET', KEYS[1], 'settled', cursor)
end
return 1
