#!/usr/bin/env bash
# Expiry under reservations, per claim setting: loadtest/bench.sh's step 8
# alone, a server with roles http,expiry restarted for each setting.
#   (a) the reserve flood at full speed on a sale with a 1 s payment window:
#       how late the expiry role closes its orders (Redis's clock);
#   (b) DRAIN_ORDERS unpaid orders falling due at once while wrk reserves at
#       half of (a)'s rate: the reserve p50/p99 meanwhile, and the drain.
# Settings are FLASHSALE_EXPIRY_BATCH:FLASHSALE_EXPIRY_BUSY_BATCH pairs, run
# in turn in every repetition (a slow minute hits them alike):
#
#   scripts/bench-expiry-load.sh 3 256:64 128:128     (release build first)
#
# Each line also says where the CPU went in each wrk window (Redis, the
# server, the rest: wrk and the others), in percent of one core.
#
# Needs wrk, Redis and MariaDB (scripts/services.sh); SECS (default 10),
# DRAIN_ORDERS (default 300000), EXP_PORT (default 18194).
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${1:?usage: scripts/bench-expiry-load.sh REPS BATCH:BUSY...}; shift
SECS=${SECS:-10}; CONC=50; EXP_PORT=${EXP_PORT:-18194}; DRAIN_ORDERS=${DRAIN_ORDERS:-300000}
bin=target/release/flashsale
scripts/services.sh >/dev/null
command -v wrk >/dev/null || {
    echo "bench-expiry-load: wrk is needed (loadtest/bench.sh installs it, or: apt-get install wrk)" >&2; exit 1; }
[ -x "$bin" ] && [ -x target/release/examples/bench_expiry ] || {
    echo "bench-expiry-load: build first: cargo build --release --bin flashsale --example bench_expiry" >&2; exit 1; }
work=$(mktemp -d); tag="fsload_$$"
export REDIS_URL=redis://127.0.0.1:6379 DATABASE_URL="mysql://root@127.0.0.1:3306/$tag"
export FLASHSALE_KEY_PREFIX="$tag" FLASHSALE_JWT_SECRET=bench-jwt-secret-of-at-least-32-bytes FLASHSALE_ADMIN_TOKEN=bench-admin-token-of-at-least-32-bytes
export FLASHSALE_PAYMENT_SECRET=bench-payment-secret-of-at-least-32-bytes RUST_LOG=warn
srv=""
cleanup() { [ -n "$srv" ] && kill "$srv" 2>/dev/null || true; redis-cli --scan --pattern "$tag:*" | xargs -r -n 500 redis-cli del >/dev/null || true; mariadb -uroot -e "DROP DATABASE IF EXISTS \`$tag\`" || true; rm -rf "$work"; }
trap cleanup EXIT
"$bin" token --user 1 --count 20000 > "$work/tokens.txt"
wrk1() { env "$@" wrk -t2 -c$CONC -d${SECS}s --latency -s loadtest/wrk/reserve.lua "http://127.0.0.1:$EXP_PORT" > "$work/w.txt"; python3 - "$work/w.txt" <<'PY'
import re,sys
t=open(sys.argv[1]).read()
def ms(p):
    m=re.search(p+r"%\s+([\d.]+)(us|ms|s|m)\b",t); n,u=m.groups(); return float(n)*{"us":0.001,"ms":1,"s":1000,"m":60000}[u]
r=float(re.search(r'Requests/sec:\s+([\d.]+)',t).group(1))
print(f"{r:.0f} {ms('50'):.2f} {ms('99'):.2f}")
PY
}
mk() { "$bin" sale create --sku "B-$1" --title bench --price-cents 100 --stock "$1" --per-user-limit "$2" --payment-window-secs "$3"; }
wait_closed() { for _ in $(seq 900); do [ "$(redis-cli HGET "$tag:{s$1}:sale" pending | tr -d '\r')" = 0 ] && return 0; sleep 0.1; done; echo "still pending" >&2; }
field() { sed -n "s/.*\b$1=\([0-9.]*\).*/\1/p"; }
# Where the CPU went during a wrk window: cpu_mark before, cpu_since after
# prints "cpu_redis=..% cpu_server=..% cpu_rest=..% cpu_idle=..%" (percent
# of one core; the cores' total is nproc x 100: the rest is wrk, MariaDB
# and everything else).
redis_pid=$(redis-cli INFO server | tr -d '\r' | sed -n 's/^process_id://p')
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
machine() { awk '/^cpu /{print $2 + $3 + $4 + $7 + $8, $5 + $6}' /proc/stat; }
cpu_mark() { mark="$(ticks "$redis_pid") $(ticks "$srv") $(machine) $(date +%s.%N)"; }
cpu_since() {
    python3 - $mark "$(ticks "$redis_pid")" "$(ticks "$srv")" $(machine) "$(date +%s.%N)" "$(getconf CLK_TCK)" <<'PY'
import sys
r0, s0, b0, i0, t0, r1, s1, b1, i1, t1, hz = map(float, sys.argv[1:])
pct = lambda d: round(100 * d / hz / (t1 - t0))
print(f"cpu_redis={pct(r1 - r0)}% cpu_server={pct(s1 - s0)}% cpu_rest={pct((b1 - b0) - (r1 - r0) - (s1 - s0))}% cpu_idle={pct(i1 - i0)}%")
PY
}
for rep in $(seq "$REPS"); do
  for cfg in "$@"; do
    b=${cfg%:*}; bb=${cfg#*:}
    FLASHSALE_ROLES=http,expiry FLASHSALE_LISTEN="127.0.0.1:$EXP_PORT" FLASHSALE_EXPIRY_BATCH=$b FLASHSALE_EXPIRY_BUSY_BATCH=$bb "$bin" serve > "$work/srv.log" 2>&1 &
    srv=$!
    for _ in $(seq 100); do curl -sf "http://127.0.0.1:$EXP_PORT/healthz" >/dev/null && break; sleep 0.1; done
    fs=$(mk 10000000 1000000 1)
    cpu_mark
    read -r frps fp50 fp99 <<< "$(wrk1 SALE_ID=$fs TOKENS=$work/tokens.txt)"
    fcpu=$(cpu_since)
    wait_closed "$fs"
    fl=$(target/release/examples/bench_expiry --lateness-of "$fs")
    ds=$(mk "$DRAIN_ORDERS" 1 1); hs=$(mk 10000000 1000000 3600)
    target/release/examples/bench_expiry --load-due "$ds" --orders "$DRAIN_ORDERS" --due-in-ms "$(( DRAIN_ORDERS / 40 > 3000 ? DRAIN_ORDERS / 40 : 3000 ))" > /dev/null
    delay=$(python3 -c "print(max(1, round($CONC * 1000 / ($frps / 2))))")
    cpu_mark
    read -r drps dp50 dp99 <<< "$(wrk1 SALE_ID=$hs TOKENS=$work/tokens.txt DELAY_MS=$delay)"
    dcpu=$(cpu_since)
    wait_closed "$ds"
    dl=$(target/release/examples/bench_expiry --lateness-of "$ds")
    echo "rep=$rep batch=$b busy=$bb flood_rps=$frps flood_p99=$fp99 flood_late_p50=$(field late_p50_ms <<< "$fl") flood_late_p99=$(field late_p99_ms <<< "$fl") $fcpu | drain_rps=$drps drain_res_p50=$dp50 drain_res_p99=$dp99 drain_per_sec=$(field drain_per_sec <<< "$dl") drain_late_p99=$(field late_p99_ms <<< "$dl") $dcpu"
    kill "$srv"; wait "$srv" 2>/dev/null || true; srv=""
  done
done
