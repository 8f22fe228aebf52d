-- audit_snapshot.lua: one atomic read of a sale's counters, its clock and
-- where its flow stream stands, for the audit. Nothing is written.
--
-- KEYS[1]  sale hash
-- KEYS[2]  flow stream
-- KEYS[3]  deadlines (due-queue)
-- KEYS[4]  refund dead-letter hash
--
-- Returns: {now_ms, last_generated_flow_id or "", flow_len, due_entries,
--           dead_refunds, field, value, field, value, ...} (the sale hash),
--          or {} when the sale does not exist.

if redis.call('EXISTS', KEYS[1]) == 0 then
  return {}
end
local t = redis.call('TIME')
local now = string.format('%d', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
local last = ''
if redis.call('EXISTS', KEYS[2]) == 1 then
  local info = redis.call('XINFO', 'STREAM', KEYS[2])
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then
      last = info[i + 1]
    end
  end
end
local out = {now, last, redis.call('XLEN', KEYS[2]), redis.call('ZCARD', KEYS[3]),
  redis.call('HLEN', KEYS[4])}
local fields = redis.call('HGETALL', KEYS[1])
for _, v in ipairs(fields) do
  table.insert(out, v)
end
return out
