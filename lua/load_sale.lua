-- load_sale.lua: put a sale (already persisted in MySQL) into Redis, once.
--
-- Loading twice must never reset a live sale's counters, so an existing sale
-- hash is left exactly as it is.
--
-- KEYS[1]  sale hash
-- ARGV     field, value, field, value, ... (the whole sale hash)
--
-- Returns: 1 when the sale was loaded, 0 when it was there already.

if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
