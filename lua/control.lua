-- control.lua: an admin's sale control (src/sales.rs `control`): pause,
-- resume or end the sale. Reservations read `paused` and `end_ms` in the
-- same hash (reserve.lua), so a control holds for every instance from the
-- moment this returns; payments, cancels, expiry and refunds never read
-- them and go on. The caller holds the sale's row in MySQL locked from
-- before this call until MySQL has recorded what it did.
--
-- KEYS[1]  sale hash
-- ARGV[1]  the sale's token (sales.redis_token)
-- ARGV[2]  pause | resume | end
--
-- End sets the sale's end to now by Redis's clock (the clock every sale
-- window is judged by), or keeps an earlier end.
--
-- (Helpers from prelude.lua.)
--
-- Returns: {"ok", end_ms} (the sale's end after the control);
--          {"ended"} for pause or resume of a sale that has ended
--          (by Redis's clock) or retired: nothing changes; {"not_found"}
--          when Redis does not hold the sale. A fenced sale, or one of
--          another token, fails with "FENCED <reason>".

check_layout()
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'not_found'}
end
local s = redis.call('HMGET', KEYS[1], 'db', 'end_ms', 'retired')
if s[1] ~= ARGV[1] then
  fenced('foreign')
end
local action = ARGV[2]
local now, end_ms = now_ms(), tonumber(s[2])
local ended = s[3] or now >= end_ms
if action == 'end' then
  if not ended then
    end_ms = now
    redis.call('HSET', KEYS[1], 'end_ms', int(end_ms))
  end
  redis.call('HDEL', KEYS[1], 'paused')
  return {'ok', int(end_ms)}
end
if ended then
  return {'ended'}
end
if action == 'pause' then
  redis.call('HSET', KEYS[1], 'paused', '1')
elseif action == 'resume' then
  redis.call('HDEL', KEYS[1], 'paused')
else
  error('flashsale: unknown sale control ' .. action)
end
return {'ok', int(end_ms)}
