#!/usr/bin/env bash
# What the per-buyer rate limit costs and what it does, in one run:
#   1. the HTTP reserve rate with the default limit (10/s, burst 20) against
#      the same server build with the limit off (FLASHSALE_BUYER_RATE_PER_SEC=0),
#      REPS interleaved runs each, 20,000 buyer tokens (each under the limit);
#   2. one buyer flooding with one token over 50 connections: requests sent,
#      orders made, 429s, against what the limit allows (burst + rate x time).
# Loopback only, bounded in time (about 1 + 2 x REPS x SECS/60 minutes).
#
#   scripts/bench-limits.sh            # SECS=5 REPS=3
set -euo pipefail
cd "$(dirname "$0")/.."
SECS="${SECS:-5}"
REPS="${REPS:-3}"
ON_PORT="${ON_PORT:-18183}"
OFF_PORT="${OFF_PORT:-18184}"
scripts/services.sh >/dev/null
if ! command -v wrk >/dev/null; then
    sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd=sudo
    $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -q wrk >/dev/null
fi
cargo build --quiet --release --bin flashsale
bin=target/release/flashsale
work=$(mktemp -d)
tag="fslimits_$$"
export REDIS_URL=redis://127.0.0.1:6379 DATABASE_URL="mysql://root@127.0.0.1:3306/$tag"
export FLASHSALE_KEY_PREFIX="$tag" FLASHSALE_JWT_SECRET=bench-jwt-secret-of-at-least-32-bytes
export FLASHSALE_ADMIN_TOKEN=bench-admin-token-of-at-least-32-bytes
export FLASHSALE_PAYMENT_SECRET=bench-payment-secret-of-at-least-32-bytes RUST_LOG=warn
on=""; off=""
cleanup() {
    [ -n "$on" ] && kill "$on" 2>/dev/null || true
    [ -n "$off" ] && kill "$off" 2>/dev/null || true
    redis-cli --scan --pattern "$tag:*" | xargs -r -n 500 redis-cli del >/dev/null || true
    mariadb -h 127.0.0.1 -uroot -e "DROP DATABASE IF EXISTS \`$tag\`" || true
    rm -rf "$work"
}
trap cleanup EXIT
for p in "$ON_PORT" "$OFF_PORT"; do
    if curl -s -o /dev/null "http://127.0.0.1:$p/"; then
        echo "bench-limits: something already listens on 127.0.0.1:$p" >&2
        exit 1
    fi
done

"$bin" migrate >/dev/null
"$bin" token --user 1 --count 20000 > "$work/tokens.txt"
head -1 "$work/tokens.txt" > "$work/one.txt"
FLASHSALE_ROLES=http FLASHSALE_LISTEN="127.0.0.1:$ON_PORT" "$bin" serve > "$work/on.log" 2>&1 &
on=$!
FLASHSALE_ROLES=http FLASHSALE_LISTEN="127.0.0.1:$OFF_PORT" FLASHSALE_BUYER_RATE_PER_SEC=0 \
    "$bin" serve > "$work/off.log" 2>&1 &
off=$!
for p in "$ON_PORT" "$OFF_PORT"; do
    for _ in $(seq 100); do curl -sf "http://127.0.0.1:$p/healthz" >/dev/null && break; sleep 0.1; done
done
mk_sale() { "$bin" sale create --sku "L-$1" --title limits --price-cents 100 --stock 10000000 \
    --per-user-limit 1000000 --payment-window-secs 3600; }
# Orders made: the order counter (the orders live in buckets of 64).
orders() { redis-cli HGET "$tag:{s$1}:sale" seq | tr -d '\r'; }
run() { # port sale tokens -> orders made per second
    SALE_ID="$2" TOKENS="$3" wrk -t2 -c50 -d"${SECS}s" -s loadtest/wrk/reserve.lua \
        "http://127.0.0.1:$1" > "$work/wrk.txt"
    python3 -c "print(round($(orders "$2") / $SECS))"
}

on_rates=(); off_rates=()
for _ in $(seq "$REPS"); do
    on_rates+=("$(run "$ON_PORT" "$(mk_sale on)" "$work/tokens.txt")")
    off_rates+=("$(run "$OFF_PORT" "$(mk_sale off)" "$work/tokens.txt")")
done
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
on_med=$(median "${on_rates[@]}"); off_med=$(median "${off_rates[@]}")

flood=$(mk_sale flood)
SALE_ID="$flood" TOKENS="$work/one.txt" wrk -t2 -c50 -d"${SECS}s" -s loadtest/wrk/reserve.lua \
    "http://127.0.0.1:$ON_PORT" > "$work/flood.txt"
sent=$(grep -o '[0-9]* requests in' "$work/flood.txt" | cut -d' ' -f1)
made=$(orders "$flood")
limited=$(curl -s "http://127.0.0.1:$ON_PORT/metrics" \
    | awk '/^flashsale_rate_limited_total\{scope="buyer"\}/ {print $2}')

cat <<TABLE
machine: $(nproc) cores; $(redis-server --version | cut -d' ' -f3); command: scripts/bench-limits.sh (SECS=$SECS, REPS=$REPS)

| measurement | limit on (10/s, burst 20) | limit off | ratio on/off |
| --- | ---: | ---: | ---: |
| HTTP reserve, orders/s, 20,000 buyers (median of $REPS; runs) | $on_med (${on_rates[*]}) | $off_med (${off_rates[*]}) | $(python3 -c "print(f'{$on_med / $off_med:.2f}')") |

| one buyer, one token, 50 connections, ${SECS} s | figure |
| --- | ---: |
| requests sent | $sent |
| orders made | $made (the limit allows 20 + 10 x ${SECS} = $((20 + 10 * SECS))) |
| answered 429 rate_limited | $limited |
TABLE
