-- audit_snapshot.lua: one atomic read of a sale's counters, its clock and
-- where its flow stream stands, for the audit. Nothing is written.
--
-- KEYS[1]  sale hash
-- KEYS[2]  flow stream
-- KEYS[3]  due-queue index (its buckets are KEYS[3]..':'..n)
-- KEYS[4]  refund dead-letter hash
-- KEYS[5..] every bucket of the due-queue (the caller reads the index
--          first); when the index holds another, the call fails with
--          "NEEDBUCKETS <n> ..." and the caller asks again declaring them
--
-- (Helpers from prelude.lua.)
--
-- Returns: {now_ms, last_generated_flow_id or "", flow_len, due_entries,
--           dead_refunds, field, value, field, value, ...} (the sale hash),
--          or {} when the sale does not exist.

if redis.call('EXISTS', KEYS[1]) == 0 then
  return {}
end
local now = int(now_ms())
local due = 0
local declared, need = {}, {}
for i = 5, #KEYS do
  declared[KEYS[i]] = true
end
local buckets = redis.call('ZRANGE', KEYS[3], 0, -1)
for _, bucket in ipairs(buckets) do
  if not declared[KEYS[3] .. ':' .. bucket] then
    need[#need + 1] = bucket
  end
end
if #need > 0 then
  error({err = 'NEEDBUCKETS ' .. table.concat(need, ' ')})
end
for _, bucket in ipairs(buckets) do
  due = due + redis.call('ZCARD', KEYS[3] .. ':' .. bucket)
end
local out = {now, last_generated_id(KEYS[2]), redis.call('XLEN', KEYS[2]), due,
  redis.call('HLEN', KEYS[4])}
local fields = redis.call('HGETALL', KEYS[1])
for _, v in ipairs(fields) do
  table.insert(out, v)
end
return out
