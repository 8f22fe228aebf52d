#!/usr/bin/env bash
# Two builds of flashsale side by side on the reserve path and the sold-out
# flood, interleaved (A, B, A, B, ...) so a slow minute hits both: the same
# wrk settings as loadtest/bench.sh (-t2 -c50), one fresh server per
# measurement with the HTTP role alone, its own database and key prefix.
#
#   scripts/bench-ab.sh OLD_BINARY NEW_BINARY [ROUNDS] [SECS]
#
# e.g. build a commit into a worktree, copy its target/release/flashsale
# aside, build this one, and compare them.
set -euo pipefail
a=$(realpath "${1:?usage: scripts/bench-ab.sh OLD_BINARY NEW_BINARY [ROUNDS] [SECS]}")
b=$(realpath "${2:?usage: scripts/bench-ab.sh OLD_BINARY NEW_BINARY [ROUNDS] [SECS]}")
rounds="${3:-2}"
secs="${4:-8}"
cd "$(dirname "$0")/.."
scripts/services.sh >/dev/null
tag="fsab_$$"; port="${AB_PORT:-18191}"; work=$(mktemp -d)
export REDIS_URL=redis://127.0.0.1:6379 DATABASE_URL="mysql://root@127.0.0.1:3306/$tag"
export FLASHSALE_KEY_PREFIX="$tag" FLASHSALE_JWT_SECRET=bench-jwt-secret-of-at-least-32-bytes FLASHSALE_ADMIN_TOKEN=bench-admin-token-of-at-least-32-bytes
export FLASHSALE_PAYMENT_SECRET=bench-payment-secret-of-at-least-32-bytes FLASHSALE_LISTEN="127.0.0.1:$port" RUST_LOG=warn
server=""
trap '[ -n "$server" ] && kill $server 2>/dev/null; redis-cli --scan --pattern "$tag:*" | xargs -r -n 500 redis-cli del >/dev/null; mariadb -h 127.0.0.1 -uroot -e "DROP DATABASE IF EXISTS \`$tag\`"; rm -rf $work' EXIT
"$a" migrate >/dev/null
"$a" token --user 1 --count 20000 > "$work/tokens.txt"
TOKEN=$(head -1 "$work/tokens.txt")
for round in $(seq "$rounds"); do
  for side in A B; do
    bin=$a; [ "$side" = B ] && bin=$b
    FLASHSALE_ROLES=http "$bin" serve > "$work/server.log" 2>&1 &
    server=$!
    for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.1; done
    sale=$("$bin" sale create --sku P --title ab --price-cents 100 --stock 10000000 --per-user-limit 1000000 --payment-window-secs 3600)
    soldout=$("$bin" sale create --sku S --title ab --price-cents 100 --stock 1 --per-user-limit 1)
    sleep 1.2
    curl -s -X POST "http://127.0.0.1:$port/api/v1/sales/$soldout/orders" -H "Authorization: Bearer $TOKEN" >/dev/null
    r=$(SALE_ID=$sale TOKENS="$work/tokens.txt" wrk -t2 -c50 -d"${secs}s" -s loadtest/wrk/reserve.lua "http://127.0.0.1:$port" | grep Requests/sec | awk '{print $2}')
    made=$(redis-cli HGET "$tag:{s$sale}:sale" seq)
    s=$(SALE_ID=$soldout TOKENS="$work/tokens.txt" wrk -t2 -c50 -d"${secs}s" -s loadtest/wrk/reserve.lua "http://127.0.0.1:$port" | grep Requests/sec | awk '{print $2}')
    rss=$(grep VmHWM /proc/$server/status | awk '{print $2}')
    echo "round $round $side ($bin): reserve wrk $r req/s ($made orders, $((made / secs))/s), sold-out $s req/s, peak RSS $((rss / 1024)) MB"
    kill $server; wait $server 2>/dev/null || true; server=""
  done
done
