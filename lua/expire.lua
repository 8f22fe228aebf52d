-- expire.lua: claim a batch of due payment deadlines of one sale and close
-- every order among them that is still pending, returning its units.
--
-- Claiming (ZREM) and closing happen in one call, so any number of workers in
-- any number of processes can run this without locks, and a worker that dies
-- between calls leaves nothing half done.
--
-- KEYS[1..5]  sale, buyers, orders, deadlines, flow (see prelude.lua)
-- ARGV[1]     most entries to claim
--
-- Returns: {claimed, closed, still_due, next_deadline_ms or -1, now_ms,
--           lateness_ms of each closed order...}

local limit = tonumber(ARGV[1])
local now = now_ms()
local due = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now, 'LIMIT', 0, limit)
local out = {#due, 0, 0, -1, now}
for _, seq in ipairs(due) do
  redis.call('ZREM', KEYS[4], seq)
  local packed = redis.call('HGET', KEYS[3], seq)
  if packed then
    local o = unpack_order(packed)
    if o.status == 'pending' then
      release(seq, o, 'closed', now)
      out[2] = out[2] + 1
      table.insert(out, now - o.deadline)
    end
  end
end
out[3] = redis.call('ZCOUNT', KEYS[4], '-inf', now)
local next = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')
if next[2] then
  out[4] = tonumber(next[2])
end
return out
