-- fence.lua: fence a sale that the reconciler found behind MySQL (a flow
-- record numbered at or below the last one MySQL applied: Redis went back
-- in time), unless it is fenced already (src/workers/reconciler.rs).
--
-- KEYS[1]  sale hash
-- ARGV[1]  the reason ("behind")
--
-- (Helpers from prelude.lua.)
--
-- Returns: 1 when this call fenced it, 0 when it was fenced already or
-- Redis does not hold it.

if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('HGET', KEYS[1], 'fence') then
  return 0
end
set_fence(KEYS[1], ARGV[1])
return 1
