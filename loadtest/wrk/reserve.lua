-- wrk script for the seckill endpoint: POST /api/v1/sales/<SALE_ID>/orders
-- with buyer tokens read from TOKENS (one JWT per line, made with
-- `flashsale token --user 1 --count N`), taken in turn by each thread.
-- DELAY_MS (optional) paces each connection, for a rate below the maximum.
-- LAT_OUT (optional) names a file for the latency distribution at the end:
-- lines "<percentile> <microseconds>" (loadtest/chart.py draws them).
-- SALE_IDS (instead of SALE_ID) spreads the requests over several sales in
-- turn, e.g. sales on every shard of a Redis Cluster.
--
--   SALE_ID=1 TOKENS=tokens.txt wrk -t2 -c50 -d10s --latency -s reserve.lua http://127.0.0.1:8080
--   SALE_IDS=1,2,3 TOKENS=tokens.txt wrk ... -s reserve.lua http://127.0.0.1:8080

local tokens = {}
for line in io.lines(os.getenv("TOKENS")) do
  tokens[#tokens + 1] = line
end
local paths = {}
for id in string.gmatch(os.getenv("SALE_IDS") or os.getenv("SALE_ID"), "[^,%s]+") do
  paths[#paths + 1] = "/api/v1/sales/" .. id .. "/orders"
end
local pace = tonumber(os.getenv("DELAY_MS") or "0")
local counter = 0
local offset = 0

function setup(thread)
  thread:set("offset", offset)
  offset = offset + math.floor(#tokens / 4)
end

function init(args)
  counter = offset or 0
end

function request()
  counter = counter + 1
  local token = tokens[(counter % #tokens) + 1]
  local path = paths[(counter % #paths) + 1]
  return wrk.format("POST", path, {
    ["Authorization"] = "Bearer " .. token,
    ["Content-Type"] = "application/json",
  }, '{"qty":1}')
end

if pace > 0 then
  function delay()
    return pace
  end
end

function done(summary, latency, requests)
  local out = os.getenv("LAT_OUT")
  if not out or out == "" or out == "/dev/null" then
    return
  end
  local f = io.open(out, "w")
  for _, p in ipairs({0, 10, 25, 50, 75, 90, 95, 99, 99.5, 99.9, 99.95, 99.99, 100}) do
    f:write(string.format("%g %d\n", p, latency:percentile(p)))
  end
  f:close()
end
