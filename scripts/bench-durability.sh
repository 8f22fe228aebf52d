#!/usr/bin/env bash
# What Redis's persistence costs the HTTP reserve path, in one run: the same
# server build (HTTP role, buyer rate limit off) against three Redis servers
# of this script's own that differ only in persistence:
#   always    appendonly yes, appendfsync always   (loses nothing acknowledged)
#   everysec  appendonly yes, appendfsync everysec (a host crash: about the last second)
#   none      appendonly no, save ""               (loses everything on a restart)
# None of them snapshots (save "" on all three), so only the AOF differs.
# REPS rounds, each running the three once (order rotated per round), wrk
# for SECS seconds with 20,000 buyer tokens; orders counted from each sale's
# counters in its Redis, not from wrk's request count.
# Loopback only, bounded in time (about 1 + 3 x REPS x SECS/60 minutes).
#
#   scripts/bench-durability.sh            # SECS=5 REPS=3
#
# Each Redis runs in the foreground (--daemonize no) in the background of
# this script, on a free port in its own temporary folder (--dir, on the
# filesystem of TMPDIR: its fsync is what "always" pays), and is stopped by
# its PID at the end. MariaDB (scripts/services.sh) holds a throwaway
# database, dropped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS="${SECS:-5}"
REPS="${REPS:-3}"
# Also installs redis-server when missing; leaves running services alone.
scripts/services.sh >/dev/null
if ! command -v wrk >/dev/null; then
    sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd=sudo
    $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -q wrk >/dev/null
fi
cargo build --quiet --release --bin flashsale
bin=target/release/flashsale
work=$(mktemp -d)
tag="fsdurab_$$"
export DATABASE_URL="mysql://root@127.0.0.1:3306/$tag"
export FLASHSALE_KEY_PREFIX="$tag" FLASHSALE_JWT_SECRET=bench-jwt-secret-of-at-least-32-bytes
export FLASHSALE_ADMIN_TOKEN=bench-admin-token-of-at-least-32-bytes
export FLASHSALE_PAYMENT_SECRET=bench-payment-secret-of-at-least-32-bytes RUST_LOG=warn
# Two of the three Redis servers lose acknowledged writes: serve must start
# on them (it logs a warning each), whatever the caller's environment says.
unset FLASHSALE_REQUIRE_DURABLE_REDIS REDIS_URL

configs=(always everysec none)
declare -A persist=(
    [always]="--appendonly yes --appendfsync always"
    [everysec]="--appendonly yes --appendfsync everysec"
    [none]="--appendonly no"
)
declare -A rport=() hport=() rpid=() spid=()

stop() { # pid: SIGTERM, then SIGKILL after 10 s
    kill "$1" 2>/dev/null || return 0
    for _ in $(seq 100); do
        kill -0 "$1" 2>/dev/null || break
        sleep 0.1
    done
    kill -9 "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}
cleanup() {
    local status=$? c
    if [ "$status" != 0 ]; then
        for f in "$work"/*/*.log; do
            [ -f "$f" ] && { echo "== $f"; tail -n 20 "$f"; }
        done >&2
    fi
    # The servers first, while their Redis still answers.
    for c in "${configs[@]}"; do if [ -n "${spid[$c]:-}" ]; then stop "${spid[$c]}"; fi; done
    for c in "${configs[@]}"; do if [ -n "${rpid[$c]:-}" ]; then stop "${rpid[$c]}"; fi; done
    mariadb -h 127.0.0.1 -uroot -e "DROP DATABASE IF EXISTS \`$tag\`" || true
    rm -rf "$work"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
rcli() { # config, redis-cli arguments...
    local c=$1; shift
    redis-cli -h 127.0.0.1 -p "${rport[$c]}" "$@" | tr -d '\r'
}

"$bin" migrate >/dev/null
"$bin" token --user 1 --count 20000 > "$work/tokens.txt"
for c in "${configs[@]}"; do
    mkdir -p "$work/$c"
    rport[$c]=$(free_port)
    # shellcheck disable=SC2086 # persist[] holds several arguments
    redis-server --daemonize no --port "${rport[$c]}" --bind 127.0.0.1 --dir "$work/$c" \
        --save "" --maxmemory-policy noeviction ${persist[$c]} > "$work/$c/redis.log" 2>&1 &
    rpid[$c]=$!
    for _ in $(seq 100); do [ "$(rcli "$c" ping 2>/dev/null)" = PONG ] && break; sleep 0.1; done
    [ "$(rcli "$c" ping)" = PONG ]
done
for c in "${configs[@]}"; do # one after another: each runs migrations on start
    hport[$c]=$(free_port)
    REDIS_URL="redis://127.0.0.1:${rport[$c]}" FLASHSALE_ROLES=http \
        FLASHSALE_LISTEN="127.0.0.1:${hport[$c]}" FLASHSALE_BUYER_RATE_PER_SEC=0 \
        "$bin" serve > "$work/$c/serve.log" 2>&1 &
    spid[$c]=$!
    for _ in $(seq 100); do curl -sf "http://127.0.0.1:${hport[$c]}/healthz" >/dev/null && break; sleep 0.1; done
    curl -sf "http://127.0.0.1:${hport[$c]}/healthz" >/dev/null
done

mk_sale() { REDIS_URL="redis://127.0.0.1:${rport[$1]}" "$bin" sale create --sku "D-$1" \
    --title durability --price-cents 100 --stock 10000000 --per-user-limit 1000000 \
    --payment-window-secs 3600; }
run() { # config -> "orders/s requests/s non-2xx"
    local c=$1 sale made orders
    sale=$(mk_sale "$c")
    SALE_ID="$sale" TOKENS="$work/tokens.txt" wrk -t2 -c50 -d"${SECS}s" -s loadtest/wrk/reserve.lua \
        "http://127.0.0.1:${hport[$c]}" > "$work/wrk.txt"
    # Units reserved (each order is one unit): the sale's counters, then
    # the orders themselves as a check.
    made=$(rcli "$c" HGET "$tag:{s$sale}:sale" pending)
    # (One hash of 64 orders per bucket: buckets 0 .. order counter / 64.)
    orders=$(for b in $(seq 0 $(( $(rcli "$c" HGET "$tag:{s$sale}:sale" seq) / 64 ))); do
        echo "HLEN $tag:{s$sale}:orders:$b"; done | rcli "$c" | awk '{s += $1} END {print s + 0}')
    if [ "$made" != "$orders" ]; then
        echo "bench-durability: sale $sale ($c): pending $made but $orders orders" >&2
        exit 1
    fi
    # Per second of wrk's own measured duration (a little over SECS).
    python3 - "$work/wrk.txt" "$made" <<'PY'
import re, sys
t = open(sys.argv[1]).read()
n, took, unit = re.search(r"(\d+) requests in ([\d.]+)(ms|s|m)\b", t).groups()
secs = float(took) * {"ms": 0.001, "s": 1, "m": 60}[unit]
bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", t)
errs = re.search(r"Socket errors:.*", t)
if errs:
    sys.stderr.write(f"wrk: {errs.group(0)}\n")
print(round(int(sys.argv[2]) / secs), round(int(n) / secs), bad.group(1) if bad else 0)
PY
}

declare -A rates=() reqs=() bad=()
for r in $(seq 0 $((REPS - 1))); do
    for i in 0 1 2; do # rotated each round: always, everysec, none; everysec, none, always; ...
        c=${configs[$(((i + r) % 3))]}
        out=$(run "$c")
        read -r o q b <<< "$out"
        rates[$c]="${rates[$c]:-}${rates[$c]:+ }$o"
        reqs[$c]="${reqs[$c]:-}${reqs[$c]:+ }$q"
        bad[$c]=$((${bad[$c]:-0} + b))
    done
done
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
declare -A med=() req_med=()
for c in "${configs[@]}"; do
    # shellcheck disable=SC2086 # space-separated runs
    med[$c]=$(median ${rates[$c]})
    # shellcheck disable=SC2086
    req_med[$c]=$(median ${reqs[$c]})
done
ratio() { python3 -c "print(f'{$1 / $2:.2f}')"; }
info() { rcli "$1" INFO persistence | awk -F: -v k="$2" '$1 == k {print $2}'; }
setting() { rcli "$1" CONFIG GET "$2" | sed -n 2p; }
metric() { # config, name -> the server's counter
    curl -s "http://127.0.0.1:${hport[$1]}/metrics" | awk -v m="flashsale_$2_total" '$1 == m {print $2}'
}
batch() { python3 -c "print(f'{$(metric "$1" reserve_script_reservations) / $(metric "$1" reserve_script_calls):.1f}')"; }
warned() { grep -c 'can lose acknowledged writes' "$work/$1/serve.log" || true; }
row() { # config, label, ratio cell
    echo "| $2 | ${med[$1]} (${rates[$1]}) | ${req_med[$1]} | ${bad[$1]} | $(batch "$1") | $3 |"
}
aof_row() { # config; appendfsync and the AOF's counters mean nothing without appendonly
    local mb fsync="-" delayed="-"
    mb=$(du -sm "$work/$1" | cut -f1)
    if [ "$(setting "$1" appendonly)" = yes ]; then
        fsync=$(setting "$1" appendfsync); delayed=$(info "$1" aof_delayed_fsync)
    fi
    echo "| $1 | $(setting "$1" appendonly) / $fsync / \"$(setting "$1" save)\" | $mb | $(info "$1" aof_rewrites) | $delayed | $(warned "$1") |"
}

cat <<TABLE
machine: $(nproc) cores; Redis $(redis-server --version | cut -d' ' -f3 | cut -d= -f2); Redis dirs on $(df --output=fstype "$work" | tail -1) ($(df --output=source "$work" | tail -1)); command: scripts/bench-durability.sh (SECS=$SECS, REPS=$REPS)

| Redis persistence | HTTP reserve, orders/s (median of $REPS; runs) | wrk requests/s (median) | non-2xx answers (all runs) | reservations per script call | ratio to none |
| --- | ---: | ---: | ---: | ---: | ---: |
$(row always "appendonly yes, appendfsync always" "$(ratio "${med[always]}" "${med[none]}")")
$(row everysec "appendonly yes, appendfsync everysec" "$(ratio "${med[everysec]}" "${med[none]}")")
$(row none "none (appendonly no, save \"\")" "1.00")

| Redis | appendonly / appendfsync / save (CONFIG GET) | dir size at the end, MB | AOF rewrites | delayed fsyncs | serve's start-up warnings |
| --- | --- | ---: | ---: | ---: | ---: |
$(aof_row always)
$(aof_row everysec)
$(aof_row none)
TABLE
