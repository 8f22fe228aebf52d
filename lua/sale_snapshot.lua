-- sale_snapshot.lua: read a sale and Redis's clock in one atomic step, so the
-- sale's state (upcoming, open, sold_out, ended) is judged by the same clock
-- that the reserve script uses.
--
-- KEYS[1]  sale hash
--
-- Returns: {now_ms, field, value, field, value, ...} (only now_ms when the
--          sale does not exist)

local t = redis.call('TIME')
local now = string.format('%d', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
local out = redis.call('HGETALL', KEYS[1])
table.insert(out, 1, now)
return out
