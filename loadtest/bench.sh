#!/usr/bin/env bash
# The whole-engine benchmark: every figure beside its reference, measured in
# one run on this machine, printed as Markdown tables (docs/BENCHMARKS.md
# keeps the latest). Load goes to loopback only, bounded in count and time.
#
#   loadtest/bench.sh            # about 15 minutes: the main table (REPS=3
#                                # repetitions, about 11 minutes), then the
#                                # topologies, failover and events tables
#   SECS=5 REPS=1 loadtest/bench.sh main   # shorter: only the main table,
#                                # shorter load phases, one repetition
#
# The main table puts each figure beside its reference (the bare Redis
# script, the bare axum handler on this HTTP stack, nginx, a MySQL hot row,
# the bare expiry claim script, BullMQ's drain of delayed jobs) measured in
# the same repetition, and measures expiry and reserving at once (expiry
# lateness under the reserve flood; reserve latency while DRAIN_ORDERS
# unpaid orders fall due at once); it gives medians with min-max and
# ratios of medians,
# and draws each phase's latency distribution and rate over time into
# CHART_OUT (default docs/bench-phases.svg, loadtest/chart.py).
#   loadtest/bench.sh topologies # only the Redis topologies table (about 3
#                                # minutes; or ONLY=topologies)
#   loadtest/bench.sh events     # only the downstream events table (about a
#                                # minute: relay rate, payment-to-points lag)
#
# The topologies table runs the HTTP reserve path on one node, Sentinel and
# Cluster sets of its own (scripts/redis-topology.sh, on free loopback
# ports, stopped by PID on exit), with and without WAIT 1, each beside the
# one-node WAIT 0 figure of the same run; then the failover drills measure
# how long buyers see no 201 when the sale's primary is killed (about 2
# more minutes).
#
# Needs wrk and nginx (installed from Debian's packages when missing),
# node and npm (BullMQ is installed from the npm registry into a scratch
# folder), Redis and MariaDB (scripts/services.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
SECTION="${1:-${ONLY:-all}}"
case "$SECTION" in
    all | main | topologies | events) ;;
    *) echo "usage: loadtest/bench.sh [all|main|topologies|events]  (or ONLY=...)" >&2; exit 2 ;;
esac
SECS="${SECS:-10}"
CONC=50
HTTP_PORT="${HTTP_PORT:-18180}"
NGINX_PORT="${NGINX_PORT:-18181}"
ONE_PORT="${ONE_PORT:-18182}"
BARE_PORT="${BARE_PORT:-18183}"
EXP_PORT="${EXP_PORT:-18184}"
REPS="${REPS:-3}"
EXPIRY_ORDERS="${EXPIRY_ORDERS:-200000}"
# The expiry worker's claim size with no reservations going on (the
# service's default unless FLASHSALE_EXPIRY_BATCH says otherwise).
EXPIRY_BATCH="${FLASHSALE_EXPIRY_BATCH:-256}"
EXPIRY_BUSY_BATCH="${FLASHSALE_EXPIRY_BUSY_BATCH:-64}"
DRAIN_ORDERS="${DRAIN_ORDERS:-$((30000 * ${SECS:-10}))}"
BULLMQ_CONCURRENCY="${BULLMQ_CONCURRENCY:-100}"
CHART_OUT="${CHART_OUT:-docs/bench-phases.svg}"
scripts/services.sh >/dev/null
command -v node >/dev/null && command -v npm >/dev/null \
    || { echo "bench: node and npm are needed (the BullMQ peer): apt-get install nodejs npm" >&2; exit 1; }
for tool in wrk nginx; do
    if ! command -v "$tool" >/dev/null; then
        pkg=$tool; [ "$tool" = nginx ] && pkg=nginx-light
        sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd=sudo
        $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$pkg" >/dev/null
    fi
done
if [ "$SECTION" = topologies ]; then
    cargo build --quiet --release --bin flashsale
elif [ "$SECTION" = events ]; then
    cargo build --quiet --release --example bench_events
else
    cargo build --quiet --release --bin flashsale --example bench_mysql_hotrow \
        --example bench_expiry --example bench_reconciler --example bench_events \
        --example bench_bare_409
fi
bin=target/release/flashsale
work=$(mktemp -d)
tag="fsbench_$$"
export REDIS_URL=redis://127.0.0.1:6379 DATABASE_URL="mysql://root@127.0.0.1:3306/$tag"
export FLASHSALE_KEY_PREFIX="$tag" FLASHSALE_JWT_SECRET=bench-jwt-secret-of-at-least-32-bytes FLASHSALE_ADMIN_TOKEN=bench-admin-token-of-at-least-32-bytes
export FLASHSALE_PAYMENT_SECRET=bench-payment-secret-of-at-least-32-bytes FLASHSALE_LISTEN="127.0.0.1:$HTTP_PORT" RUST_LOG=warn
server=""
server1=""
server_exp=""
nginx_pid=""
bare_pid=""
topo_server=""
cleanup() {
    [ -n "$server" ] && kill "$server" 2>/dev/null || true
    [ -n "$server1" ] && kill "$server1" 2>/dev/null || true
    [ -n "$server_exp" ] && kill "$server_exp" 2>/dev/null || true
    [ -n "$nginx_pid" ] && kill "$nginx_pid" 2>/dev/null || true
    [ -n "$bare_pid" ] && kill "$bare_pid" 2>/dev/null || true
    [ -n "$topo_server" ] && kill "$topo_server" 2>/dev/null || true
    for d in "$work/topo-sentinel" "$work/topo-cluster"; do
        [ -f "$d/nodes" ] && scripts/redis-topology.sh stop "$d" >/dev/null || true
    done
    redis-cli --scan --pattern "$tag:*" | xargs -r -n 500 redis-cli del >/dev/null || true
    mariadb -h 127.0.0.1 -uroot -e "DROP DATABASE IF EXISTS \`$tag\`" || true
    rm -rf "$work"
}
trap cleanup EXIT

# wrk's summary -> "req/s p50_ms p99_ms"
wrk_run() { # label url [extra env...]
    local out="$work/wrk-$1.txt"; shift
    local url=$1; shift
    env "$@" wrk -t2 -c"$CONC" -d"${SECS}s" --latency -s loadtest/wrk/reserve.lua "$url" > "$out"
    python3 - "$out" <<'PY'
import re, sys
t = open(sys.argv[1]).read()
def ms(pct):
    m = re.search(pct + r"%\s+([\d.]+)(us|ms|s|m)\b", t)
    if not m:
        return float("nan")
    n, u = m.groups()
    return float(n) * {"us": 0.001, "ms": 1, "s": 1000, "m": 60000}[u]
m = re.search(r"Requests/sec:\s+([\d.]+)", t)
rps = float(m.group(1)) if m else float("nan")
p50, p99 = ms("50"), ms("99")
if m is None:
    sys.stderr.write(t)
print(f"{rps:.0f} {p50:.2f} {p99:.2f}")
PY
}

# ---------------------------------------------------------------------------
# Downstream events (examples/bench_events.rs, real RabbitMQ): the relay's
# rate with publisher confirms beside the reserve path's own rate and the
# broker's rate for the same messages without MySQL, all in this run; then
# the lag from a payment in Redis to its points entry in MySQL.
bench_events() {
    local out="$work/events.txt"
    target/release/examples/bench_events --events "${EVENTS:-50000}" --secs "$SECS" > "$out" \
        || { cat "$out" >&2; echo "bench: the events benchmark failed" >&2; return 1; }
    local v
    v() { sed -n "s/^$1=//p" "$out"; }
    echo
    echo "## Downstream events (outbox, relay, RabbitMQ, points consumer)"
    echo
    echo "command: loadtest/bench.sh events (examples/bench_events.rs); relay batch 500, persistent messages into one durable queue"
    echo
    echo "| measurement | figure | reference (same run) | ratio |"
    echo "| --- | ---: | ---: | ---: |"
    echo "| relay, events/s with publisher confirms ($(v relay_events) outbox rows the reconciler wrote) | $(v relay_events_per_sec) | reserve path alone (engine, 64 concurrent): $(v reserve_per_sec)/s | $(python3 -c "print(f'{$(v relay_events_per_sec) / $(v reserve_per_sec):.2f}')") |"
    echo "| the same relay figure | $(v relay_events_per_sec) | the broker alone: the same number of persistent messages published with confirms per batch, no MySQL: $(v broker_raw_per_sec)/s | $(python3 -c "print(f'{$(v relay_events_per_sec) / $(v broker_raw_per_sec):.2f}')") |"
    echo "| payment in Redis -> points entry in MySQL, $(v lag_rate) payments/s for ${SECS} s ($(v lag_payments) payments) | p50 $(v lag_p50_ms) ms, p99 $(v lag_p99_ms) ms, max $(v lag_max_ms) ms | | |"
}

if [ "$SECTION" = events ]; then
    bench_events
    exit 0
fi

"$bin" migrate >/dev/null
"$bin" token --user 1 --count 20000 > "$work/tokens.txt"
# The HTTP role alone, like the reference (one Redis script, nothing else);
# the reconciler's and the expiry's own rates are measured below, each
# against the same peak reserve rate.
for p in "$HTTP_PORT" "$ONE_PORT" "$NGINX_PORT" "$BARE_PORT" "$EXP_PORT"; do
    if curl -s -o /dev/null "http://127.0.0.1:$p/"; then
        echo "bench: something already listens on 127.0.0.1:$p (set HTTP_PORT, ONE_PORT, NGINX_PORT, BARE_PORT, EXP_PORT)" >&2
        exit 1
    fi
done
# ---------------------------------------------------------------------------
# Redis topologies: the HTTP reserve path (same binary, same wrk settings,
# one flashsale process with the HTTP role alone, started afresh for each
# row) on one node, Sentinel and a 3-primary Cluster, with WAIT 0 and
# WAIT 1. Every row spreads its requests over TOPO_SALES fresh sales (on the
# cluster: as many on each primary), so that the rows differ only in where
# Redis is. The one node is the Sentinel set's primary addressed through
# REDIS_URL: it has a replica (WAIT 1 is possible) and the same settings as
# the cluster's nodes (AOF, appendfsync everysec). Replicas and sentinels
# run in every row.
TOPO_SALES="${TOPO_SALES:-12}"
topo_field() { sed -n "s/^$2=//p" "$1/topology.env"; }
topo_ports() { awk -v r="$2" '$1 == r {print $2}' "$1/nodes"; }
topo_load() { cut -d' ' -f1-3 /proc/loadavg; }

# The environment of one row's processes, by kind (node|sentinel|cluster).
topo_env() {
    case $1 in
        node) echo "REDIS_URL=redis://127.0.0.1:$(topo_ports "$work/topo-sentinel" primary)" ;;
        sentinel) echo "FLASHSALE_REDIS_SENTINELS=$(topo_field "$work/topo-sentinel" FLASHSALE_REDIS_SENTINELS)"
                  echo "FLASHSALE_REDIS_SENTINEL_MASTER=$(topo_field "$work/topo-sentinel" FLASHSALE_REDIS_SENTINEL_MASTER)" ;;
        cluster) echo "FLASHSALE_REDIS_CLUSTER=$(topo_field "$work/topo-cluster" FLASHSALE_REDIS_CLUSTER)" ;;
    esac
}

# Creates the row's sales; on the cluster, until each primary holds
# TOPO_SALES/3 of them (extra ones stay unused). Prints the ids, comma-separated.
topo_sales() { # kind
    local kind=$1 id slot p n want=$TOPO_SALES ids="" tries=0
    local -a tenv primaries=()
    mapfile -t tenv < <(topo_env "$kind")
    if [ "$kind" = cluster ]; then
        mapfile -t primaries < <(topo_ports "$work/topo-cluster" primary)
        want=$((TOPO_SALES / ${#primaries[@]}))
        declare -A on=()
        for p in "${primaries[@]}"; do on[$p]=0; done
    fi
    while [ "$(echo "$ids" | tr ',' '\n' | grep -c .)" -lt "$TOPO_SALES" ]; do
        tries=$((tries + 1))
        [ "$tries" -le $((TOPO_SALES * 10)) ] || { echo "bench: could not spread $TOPO_SALES sales over the cluster" >&2; return 1; }
        id=$(env "${tenv[@]}" "$bin" sale create --sku "T-$kind" --title bench --price-cents 100 \
            --stock 10000000 --per-user-limit 1000000 --payment-window-secs 3600) || return 1
        [ -n "$id" ] || return 1
        if [ "$kind" = cluster ]; then
            slot=$(redis-cli -p "${primaries[0]}" CLUSTER KEYSLOT "$tag:{s$id}:sale" | tr -d '\r')
            for p in "${primaries[@]}"; do
                n=$(redis-cli -p "$p" CLUSTER COUNTKEYSINSLOT "$slot" | tr -d '\r')
                if [ "$n" -gt 0 ]; then
                    if [ "${on[$p]}" -lt "$want" ]; then
                        on[$p]=$((on[$p] + 1))
                        ids+="${ids:+,}$id"
                        echo "$id $slot $p" >> "$work/topo-cluster-sales.txt"
                    fi
                    break
                fi
            done
        else
            ids+="${ids:+,}$id"
        fi
    done
    echo "$ids"
}

# One measurement, appended to topo-rows.txt:
# "label|wait|round|req/s|p50|p99|reservations/s|statuses|wrk non-2xx".
topo_n=0
topo_row() { # label kind wait_replicas round
    local label=$1 kind=$2 waitn=$3 round=$4 ids rps p50 p99 made=0 id statuses non2xx f
    local -a tenv cli
    topo_n=$((topo_n + 1))
    f="topo$topo_n-$kind-wait$waitn"
    mapfile -t tenv < <(topo_env "$kind")
    env "${tenv[@]}" FLASHSALE_ROLES=http FLASHSALE_REDIS_WAIT_REPLICAS="$waitn" \
        "$bin" serve > "$work/$f.log" 2>&1 &
    topo_server=$!
    for _ in $(seq 100); do curl -sf "http://127.0.0.1:$HTTP_PORT/healthz" >/dev/null && break; sleep 0.1; done
    curl -sf "http://127.0.0.1:$HTTP_PORT/healthz" >/dev/null \
        || { echo "bench: the $label server did not start:" >&2; tail -20 "$work/$f.log" >&2; return 1; }
    ids=$(topo_sales "$kind")
    sleep 1.2 # the live list (read from MySQL once a second) holds them
    read -r rps p50 p99 <<< "$(wrk_run "$f" "http://127.0.0.1:$HTTP_PORT" SALE_IDS="$ids" TOKENS="$work/tokens.txt")"
    # Answers by status, from the server's own counters.
    statuses=$(curl -s "http://127.0.0.1:$HTTP_PORT/metrics" \
        | awk '/^flashsale_http_requests_total\{/ && /method="POST"/ && /orders/ {
                   match($0, /status="[0-9]+"/); s = substr($0, RSTART + 8, RLENGTH - 9); n[s] += $NF }
               END { for (s in n) printf "%s%s:%d", (k++ ? " " : ""), s, n[s] }')
    kill "$topo_server"; wait "$topo_server" 2>/dev/null || true; topo_server=""
    non2xx=$(grep -o 'Non-2xx or 3xx responses: [0-9]*' "$work/wrk-$f.txt" | grep -o '[0-9]*$' || echo 0)
    if [ "$kind" = cluster ]; then
        cli=(redis-cli -c -p "$(topo_ports "$work/topo-cluster" primary | head -1)")
    else
        cli=(redis-cli -p "$(topo_ports "$work/topo-sentinel" primary)")
    fi
    for id in ${ids//,/ }; do
        made=$((made + $("${cli[@]}" HGET "$tag:{s$id}:sale" seq | tr -d '\r')))
    done
    echo "$label|$waitn|$round|$rps|$p50|$p99|$(python3 -c "print(round($made / $SECS))")|$statuses|$non2xx" >> "$work/topo-rows.txt"
}

# TOPO_ROUNDS rounds (default 2), every other one in reverse order, so that
# the one-node WAIT 0 reference runs first and last and a machine whose
# speed drifts during the section moves every configuration alike; each
# figure is the mean over the rounds, with each round's beside it.
TOPO_ROUNDS="${TOPO_ROUNDS:-2}"
bench_topologies() {
    local t0=$SECONDS load0 p ports round i label kind waitn
    local -a rows=("one node|node|0" "one node|node|1" "Sentinel|sentinel|0" "Sentinel|sentinel|1"
        "Cluster, 3 primaries|cluster|0" "Cluster, 3 primaries|cluster|1")
    load0=$(topo_load)
    : > "$work/topo-rows.txt"
    scripts/redis-topology.sh start sentinel "$work/topo-sentinel" >/dev/null
    scripts/redis-topology.sh start cluster "$work/topo-cluster" 5000 >/dev/null
    local t_up=$((SECONDS - t0))
    for round in $(seq "$TOPO_ROUNDS"); do
        for i in $(seq 0 $((${#rows[@]} - 1))); do
            [ $((round % 2)) = 0 ] && i=$((${#rows[@]} - 1 - i))
            IFS='|' read -r label kind waitn <<< "${rows[$i]}"
            topo_row "$label" "$kind" "$waitn" "$round"
        done
    done
    # Where the cluster rows' sales were: sales, orders and keys on each primary.
    ports=""
    for p in $(topo_ports "$work/topo-cluster" primary); do
        local orders=0 id
        for id in $(awk -v p="$p" '$3 == p {print $1}' "$work/topo-cluster-sales.txt"); do
            orders=$((orders + $(redis-cli -p "$p" HGET "$tag:{s$id}:sale" seq | tr -d '\r')))
        done
        ports+="${ports:+; }127.0.0.1:$p: $(awk -v p="$p" '$3 == p' "$work/topo-cluster-sales.txt" | wc -l) sales, $orders orders, DBSIZE $(redis-cli -p "$p" DBSIZE | tr -d '\r')"
    done
    scripts/redis-topology.sh stop "$work/topo-cluster" >/dev/null
    scripts/redis-topology.sh stop "$work/topo-sentinel" >/dev/null
    cat <<TABLE

## Redis topologies: the HTTP reserve path

machine: $(nproc) cores; $(redis-server --version | cut -d' ' -f3); load average (1/5/15 min) $load0 before, $(topo_load) after
command: loadtest/bench.sh $SECTION (SECS=$SECS, TOPO_ROUNDS=$TOPO_ROUNDS); wrk -t2 -c$CONC -d${SECS}s, $(wc -l < "$work/tokens.txt") buyer tokens in turn, requests spread over $TOPO_SALES fresh sales per measurement
one flashsale process (HTTP role alone, this build), restarted for each measurement with its Redis settings; WAIT timeout: the default (FLASHSALE_REDIS_WAIT_TIMEOUT_MS=200)
one node = the Sentinel set's primary through REDIS_URL (1 replica attached); Sentinel = 1 primary + 1 replica + 3 sentinels; Cluster = 3 primaries + 3 replicas, node timeout 5000 ms
cluster sales, orders and keys on each primary (all cluster rounds): $ports
$TOPO_ROUNDS rounds, every other one in reverse order; figures: mean (each round, in run order); topologies started in $t_up s; section took $((SECONDS - t0)) s

| topology | WAIT replicas | reserve req/s (wrk) | p50 ms | p99 ms | reservations/s (orders made) | ratio to one node, WAIT 0 (means): req/s / p50 / p99 | answers by status (server's counters, all rounds) | wrk non-2xx |
| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |
TABLE
    python3 - "$work/topo-rows.txt" <<'PY'
import sys
rows = {}
for line in open(sys.argv[1]):
    label, wait, _round, rps, p50, p99, rate, statuses, non2xx = line.rstrip("\n").split("|")
    r = rows.setdefault((label, wait), {"rps": [], "p50": [], "p99": [], "rate": [], "st": {}, "non2xx": 0})
    for k, v in (("rps", rps), ("p50", p50), ("p99", p99), ("rate", rate)):
        r[k].append(float(v))
    for kv in statuses.split():
        code, n = kv.split(":")
        r["st"][code] = r["st"].get(code, 0) + int(n)
    r["non2xx"] += int(non2xx)
mean = lambda xs: sum(xs) / len(xs)
def show(xs, fmt):
    return fmt.format(mean(xs)) + (" (" + ", ".join(fmt.format(x) for x in xs) + ")" if len(xs) > 1 else "")
ref = rows[("one node", "0")]
for (label, wait), r in rows.items():
    ratio = " / ".join(f"{mean(r[k]) / mean(ref[k]):.2f}" for k in ("rps", "p50", "p99"))
    st = ", ".join(f"{c}: {n}" for c, n in sorted(r["st"].items())) or "none"
    print(f"| {label} | {wait} | {show(r['rps'], '{:.0f}')} | {show(r['p50'], '{:.2f}')} | {show(r['p99'], '{:.2f}')} "
          f"| {show(r['rate'], '{:.0f}')} | {ratio} | {st} | {r['non2xx']} |")
PY
}
# Failover as buyers see it: the drills of tests/api/failover.rs (their own
# topologies, node timeout / down-after 2000 ms): 2,000 buyers rush 200 units,
# the sale's primary is killed and restarted 3 s later; each drill prints the
# longest time buyers saw no 201.
bench_failover() {
    cargo build --quiet --tests
    local out="$work/failover.txt"
    cargo test --quiet --test api -- --ignored --nocapture --test-threads=1 \
        failover::cluster_wait_0_counts_what failover::cluster_wait_1 \
        failover::sentinel_wait_0_counts_what failover::sentinel_wait_1 > "$out" 2>&1 || {
        tail -40 "$out" >&2; echo "a failover drill failed" >&2; return 1; }
    echo
    echo "## Failover as buyers see it (kill -9 of the sale's primary mid-rush)"
    echo
    echo "command: loadtest/bench.sh (the drills of tests/api/failover.rs); node timeout / down-after 2000 ms; the node restarted 3 s after the kill"
    echo
    echo "| topology | WAIT | longest time without a 201 | acknowledged orders lost | answers by status |"
    echo "| --- | ---: | ---: | ---: | --- |"
    python3 - "$out" <<'PY'
import re, sys
t = open(sys.argv[1]).read()
lost = {(k, w): n for k, w, n in re.findall(r"(Cluster|Sentinel) WAIT (\d): (\d+) acknowledged order\(s\) lost", t)}
for kind, wait, answers, gap in re.findall(
        r"(Cluster|Sentinel) WAIT (\d): \d+ acknowledged \(\d+ before the kill\), answers (\{[^}]*\}), buyers saw no 201 for ([\d.]+\w+) at most", t):
    n = float(re.match(r"[\d.]+", gap).group())
    secs = n / 1e6 if gap.endswith("µs") else n / 1e3 if gap.endswith("ms") else n
    print(f"| {kind} | {wait} | {secs:.2f} s | {lost.get((kind, wait), '?')} | {answers} |")
PY
}



if [ "$SECTION" = topologies ]; then
    bench_topologies
    bench_failover
    exit 0
fi

FLASHSALE_ROLES=http "$bin" serve > "$work/server.log" 2>&1 &
server=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$HTTP_PORT/healthz" >/dev/null && break; sleep 0.1; done
mk_sale() { "$bin" sale create --sku "B-$1" --title bench --price-cents 100 --stock "$1" \
    --per-user-limit "$2" --payment-window-secs 3600; }
# sale_id stock per_user_limit payment_window_secs
mk_sale_window() { "$bin" sale create --sku "B-$1" --title bench --price-cents 100 --stock "$1" \
    --per-user-limit "$2" --payment-window-secs "$3"; }
# Waits (at most a minute) until the sale has no pending order left.
wait_closed() {
    for _ in $(seq 600); do
        [ "$(redis-cli HGET "$tag:{s$1}:sale" pending | tr -d '\r')" = 0 ] && return 0
        sleep 0.1
    done
    echo "bench: sale $1 still has pending orders after a minute" >&2
    return 1
}
# The value of name=value in a line of key=value pairs on stdin.
field() { sed -n "s/.*\b$1=\([0-9.]*\).*/\1/p"; }
# The reserve script's first 7 KEYS; redis-benchmark declares no bucket, so
# the script derives the orders and due-queue buckets it touches
# ($p:orders:<n>, $p:deadlines:<n>: undeclared, as a reference run may).
keys() { local p="$tag:{s$1}"; echo "$p:sale $p:buyers $p:orders $p:deadlines $p:flow $p:idem $p:calls"; }
# Orders a sale made: its order counter (orders are never deleted, and the
# script that stores them moves the counter in the same call).
made_of() { redis-cli HGET "$tag:{s$1}:sale" seq | tr -d '\r'; }
sha=$(redis-cli SCRIPT LOAD "$(cat lua/prelude.lua; echo; cat lua/reserve.lua)")
TOKEN=$(head -1 "$work/tokens.txt")

# The peers, started once: the bare axum handler (the service's own
# connection loop, a fixed 409) and nginx's `return 200`.
target/release/examples/bench_bare_409 --listen "127.0.0.1:$BARE_PORT" > "$work/bare.log" 2>&1 &
bare_pid=$!
cat > "$work/nginx.conf" <<NGX
worker_processes auto;
pid $work/nginx.pid;
error_log $work/nginx-error.log;
events { worker_connections 1024; }
http {
    access_log off;
    server { listen 127.0.0.1:$NGINX_PORT; location / { return 200 'ok'; } }
}
NGX
nginx -c "$work/nginx.conf" -p "$work" -g 'daemon off;' &
nginx_pid=$!
# BullMQ, the delayed-job queue a Node shop would close unpaid orders with,
# into a scratch folder (npm registry), beside a copy of the drain script.
mkdir -p "$work/bullmq"
cp loadtest/bullmq/package.json loadtest/bullmq/drain.mjs "$work/bullmq/"
(cd "$work/bullmq" && npm install --no-audit --no-fund --silent >/dev/null)
bullmq_version=$(cd "$work/bullmq" && node -p "require('bullmq/package.json').version")
sleep 0.5

# Every measurement appends "phase|rep|figure|p50|p99" to rows.txt; the
# table gives medians (min-max) over the REPS repetitions, which run the
# phases in turn, each beside its reference, so a slow minute of the
# machine hits both sides of a ratio alike.
rows="$work/rows.txt"
: > "$rows"
record() { echo "$1|$2|$3|${4:-}|${5:-}" >> "$rows"; }
# Where the time goes: lap NAME adds the seconds since the last lap to
# NAME's total (printed with the table), so a run that is too long shows
# which step to shorten.
laps="$work/laps.txt"
: > "$laps"
lap_t=$SECONDS
lap() { echo "$1 $((SECONDS - lap_t))" >> "$laps"; lap_t=$SECONDS; }

# The server's answered reserve requests, sampled once a second into
# rate-<label>.txt while a phase runs (the chart's rate over time).
sample_rate() { # label port
    while :; do
        printf '%s %s\n' "$(date +%s.%N)" "$(curl -s "http://127.0.0.1:$2/metrics" \
            | awk '/^flashsale_http_requests_total\{/ && /orders/ && /POST/ {n += $NF} END {print n + 0}')"
        sleep 1
    done > "$work/chart/rate-$1.txt"
}
mkdir -p "$work/chart"
# wrk with its latency distribution kept for the chart (first repetition).
wrk_phase() { # label rep url [env...]
    local label=$1 rep=$2 url=$3 sampler=""; shift 3
    local lat_out=/dev/null
    [ "$rep" = 1 ] && lat_out="$work/chart/lat-$label.txt"
    if [ "$rep" = 1 ] && [ "${url##*:}" = "$HTTP_PORT" -o "${url##*:}" = "$ONE_PORT" -o "${url##*:}" = "$EXP_PORT" ]; then
        sample_rate "$label" "${url##*:}" &
        sampler=$!
    fi
    wrk_run "$label-$rep" "$url" LAT_OUT="$lat_out" "$@"
    [ -n "$sampler" ] && { kill "$sampler"; wait "$sampler" 2>/dev/null || true; }
    return 0
}

rep_main() { # rep
    local rep=$1 raw_sale raw_token raw raw_made sale made rate rps p50 p99 sale1 half_delay sale2 soldout
    # 1. Raw limit: redis-benchmark -P 1 running the reserve script by
    #    EVALSHA on keys of the same shape (a sale of its own). Each call
    #    carries an id (a random 12-digit number, like the buyer) as the
    #    service's do.
    raw_sale=$(mk_sale 10000000 1000000)
    raw_token=$(redis-cli HGET "$tag:{s$raw_sale}:sale" db)
    raw=$(redis-benchmark -c "$CONC" -P 1 -n "$raw_n" -r 100000000 -q \
        EVALSHA "$sha" 7 $(keys "$raw_sale") 1000000000 __rand_int__ 0 "$raw_token" __rand_int__ 1 "" | tr -d '\r' \
        | grep -o '[0-9.]* requests per second' | cut -d' ' -f1)
    raw_made=$(made_of "$raw_sale")
    record raw "$rep" "$raw"
    # The next repetition's call count: SECS at this one's rate.
    raw_n=$(python3 -c "print(max(10000, round($raw * $SECS)))")
    lap raw
    # 2. The HTTP reserve path at full speed (wrk, pre-made tokens).
    sale=$(mk_sale 10000000 1000000)
    read -r rps p50 p99 <<< "$(wrk_phase reserve "$rep" "http://127.0.0.1:$HTTP_PORT" SALE_ID="$sale" TOKENS="$work/tokens.txt")"
    made=$(made_of "$sale")
    rate=$(python3 -c "print(round($made / $SECS))")
    record reserve "$rep" "$rate" "$p50" "$p99"
    record reserve_wrk "$rep" "$rps"
    if [ "$rep" = 1 ]; then
        memory "$sale" "$made" "$raw_sale" "$raw_made"
    fi
    lap reserve
    # 2b. One reservation per script call (before combining).
    sale1=$(mk_sale 10000000 1000000)
    read -r rps p50 p99 <<< "$(wrk_phase one_per_call "$rep" "http://127.0.0.1:$ONE_PORT" SALE_ID="$sale1" TOKENS="$work/tokens.txt")"
    record one_per_call "$rep" "$(python3 -c "print(round($(made_of "$sale1") / $SECS))")" "$p50" "$p99"
    lap one_per_call
    # 3. Half this repetition's rate (wrk paced per connection): latency.
    half_delay=$(python3 -c "print(max(1, round($CONC * 1000 / ($rate / 2))))")
    sale2=$(mk_sale 10000000 1000000)
    read -r rps p50 p99 <<< "$(wrk_phase half_rate "$rep" "http://127.0.0.1:$HTTP_PORT" SALE_ID="$sale2" TOKENS="$work/tokens.txt" DELAY_MS="$half_delay")"
    record half "$rep" "$rps" "$p50" "$p99"
    lap half_rate
    # 4. The sold-out flood, then the two floors with the same generator.
    soldout=$(mk_sale 1 1)
    curl -s -X POST "http://127.0.0.1:$HTTP_PORT/api/v1/sales/$soldout/orders" -H "Authorization: Bearer $TOKEN" >/dev/null
    read -r rps p50 p99 <<< "$(wrk_phase sold_out "$rep" "http://127.0.0.1:$HTTP_PORT" SALE_ID="$soldout" TOKENS="$work/tokens.txt")"
    record sold_out "$rep" "$rps" "$p50" "$p99"
    read -r rps p50 p99 <<< "$(wrk_phase bare_axum_409 "$rep" "http://127.0.0.1:$BARE_PORT" SALE_ID=1 TOKENS="$work/tokens.txt")"
    record bare "$rep" "$rps" "$p50" "$p99"
    read -r rps p50 p99 <<< "$(wrk_phase nginx_200 "$rep" "http://127.0.0.1:$NGINX_PORT" SALE_ID=0 TOKENS="$work/tokens.txt")"
    record nginx "$rep" "$rps" "$p50" "$p99"
    lap sold_out_and_floors
    # 5. Without Redis: MySQL hot row + order insert per transaction.
    record hotrow "$rep" "$(target/release/examples/bench_mysql_hotrow --concurrency 64 --secs "$SECS")"
    lap mysql_hot_row
    # 6. Expiry: one worker's drain beside the bare claim script (same run),
    #    then BullMQ's drain of as many delayed jobs due at once.
    target/release/examples/bench_expiry --orders "$EXPIRY_ORDERS" --batches "$EXPIRY_BATCH" --workers 1 \
        --burst-batch "$EXPIRY_BATCH" --stream-secs "$SECS" > "$work/expiry-$rep.txt"
    record expiry_bare "$rep" "$(grep "^| $EXPIRY_BATCH |" "$work/expiry-$rep.txt" | awk -F'|' '{gsub(/ /,"",$3); print $3}')"
    record expiry "$rep" "$(grep "^| $EXPIRY_BATCH |" "$work/expiry-$rep.txt" | awk -F'|' '{gsub(/ /,"",$4); print $4}')"
    local late
    late=$(sed -n 's/.*lateness p50 \([0-9]*\) ms, p99 \([0-9]*\) ms.*/\1 \2/p' "$work/expiry-$rep.txt")
    record expiry_late "$rep" "" "${late% *}" "${late#* }"
    local burst
    burst=$(grep '^burst:' "$work/expiry-$rep.txt")
    record expiry_burst "$rep" "$(sed -n 's/.*drain_per_sec=\([0-9]*\).*/\1/p' <<< "$burst")" \
        "$(sed -n 's/.*late_p50_ms=\([0-9]*\).*/\1/p' <<< "$burst")" "$(sed -n 's/.*late_p99_ms=\([0-9]*\).*/\1/p' <<< "$burst")"
    lap expiry
    local bull
    bull=$(cd "$work/bullmq" && JOBS="$EXPIRY_ORDERS" CONCURRENCY="$BULLMQ_CONCURRENCY" node drain.mjs)
    record bullmq "$rep" "$(sed -n 's/.*drain_per_sec=\([0-9]*\).*/\1/p' <<< "$bull")" \
        "$(sed -n 's/.*late_p50_ms=\([0-9]*\).*/\1/p' <<< "$bull")" "$(sed -n 's/.*late_p99_ms=\([0-9]*\).*/\1/p' <<< "$bull")"
    lap bullmq
    # 7. The reconciler against the peak reserve rate of its own run.
    target/release/examples/bench_reconciler --records 100000 --lag-secs "$SECS" > "$work/rec-$rep.txt"
    record reconciler "$rep" "$(grep 'records persisted' "$work/rec-$rep.txt" | awk -F'|' '{gsub(/ /,"",$3); print $3}')"
    lap reconciler
    # 8. Expiry and reserving at once, on a server running both roles: (a)
    #    the reserve flood at full speed on a sale with a 1 s payment window,
    #    so every order it makes falls due a second later while the flood
    #    goes on: how late the expiry role closes them; (b) DRAIN_ORDERS
    #    unpaid orders falling due at once while buyers reserve at half this
    #    repetition's rate: the reserve latency during the drain.
    local fsale dsale hsale closings
    fsale=$(mk_sale_window 10000000 1000000 1)
    read -r rps p50 p99 <<< "$(wrk_phase flood_expiry "$rep" "http://127.0.0.1:$EXP_PORT" SALE_ID="$fsale" TOKENS="$work/tokens.txt")"
    wait_closed "$fsale"
    closings=$(target/release/examples/bench_expiry --lateness-of "$fsale")
    record flood_reserve "$rep" "$(python3 -c "print(round($(made_of "$fsale") / $SECS))")" "$p50" "$p99"
    record flood_late "$rep" "$(field closed <<< "$closings")" "$(field late_p50_ms <<< "$closings")" "$(field late_p99_ms <<< "$closings")"
    lap flood_expiry
    dsale=$(mk_sale_window "$DRAIN_ORDERS" 1 1)
    hsale=$(mk_sale 10000000 1000000)
    target/release/examples/bench_expiry --load-due "$dsale" --orders "$DRAIN_ORDERS" \
        --due-in-ms "$(( DRAIN_ORDERS / 40 > 3000 ? DRAIN_ORDERS / 40 : 3000 ))" > /dev/null
    read -r rps p50 p99 <<< "$(wrk_phase drain_reserve "$rep" "http://127.0.0.1:$EXP_PORT" SALE_ID="$hsale" TOKENS="$work/tokens.txt" DELAY_MS="$half_delay")"
    wait_closed "$dsale"
    closings=$(target/release/examples/bench_expiry --lateness-of "$dsale")
    record drain_reserve "$rep" "$rps" "$p50" "$p99"
    record drain_during "$rep" "$(field drain_per_sec <<< "$closings")" "$(field late_p50_ms <<< "$closings")" "$(field late_p99_ms <<< "$closings")"
    lap drain_reserve
    echo "bench: repetition $rep of $REPS done" >&2
}

# Redis memory per pending order (measured once: it does not vary by run).
memory() { # http_sale made raw_sale raw_made
    local p="$tag:{s$1}" made=$2 rp="$tag:{s$3}" raw_made=$4
    mem() { redis-cli MEMORY USAGE "$1" SAMPLES 0 | tr -d '\r'; }
    # The sum over the keys matching a pattern.
    mem_all() {
        redis-cli --scan --pattern "$1" | sed 's/^/MEMORY USAGE /; s/$/ SAMPLES 0/' \
            | redis-cli | awk '{s += $1} END {print s + 0}'
    }
    # The due-queue is an index plus one small sorted set per 64 orders.
    mem_due() { mem_all "$1:deadlines*"; }
    # The orders are one small hash per 64 orders.
    mem_orders() { mem_all "$1:orders:*"; }
    per_order() { python3 -c "print(round(($(mem_orders "$1") + $(mem_due "$1") + $(mem "$1:buyers")) / $2))"; }
    bytes_settled=$(per_order "$p" "$made")
    bytes_with_flow=$(python3 -c "print(round($bytes_settled + $(mem "$p:flow") / $made))")
    bytes_calls=$(python3 -c "print(round($(mem "$p:calls") / $made))")
    bytes_calls_unique=$(python3 -c "print(round($(mem "$rp:calls") / $raw_made))")
    bytes_unique=$(per_order "$rp" "$raw_made")
    # Where the bytes of one order per buyer go, structure by structure.
    bytes_parts=$(python3 -c "print('orders %d + due-queue %d + buyers %d' % tuple(round(b / $raw_made) for b in ($(mem_orders "$rp"), $(mem_due "$rp"), $(mem "$rp:buyers"))))")
    raw_buyers=$(redis-cli HLEN "$rp:buyers" | tr -d '\r')
    mem_made=$made
    mem_raw_made=$raw_made
}

# The one-reservation-per-call server beside the main one.
FLASHSALE_ROLES=http FLASHSALE_RESERVE_BATCH=1 FLASHSALE_LISTEN="127.0.0.1:$ONE_PORT" \
    "$bin" serve > "$work/server1.log" 2>&1 &
server1=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$ONE_PORT/healthz" >/dev/null && break; sleep 0.1; done
# The server of step 8: both the HTTP and the expiry roles in one process.
FLASHSALE_ROLES=http,expiry FLASHSALE_LISTEN="127.0.0.1:$EXP_PORT" \
    "$bin" serve > "$work/server-exp.log" 2>&1 &
server_exp=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$EXP_PORT/healthz" >/dev/null && break; sleep 0.1; done
# redis-benchmark takes a call count, not a duration. The first repetition
# makes 25,000 calls per SECS (about 250,000 orders of one buyer each: the
# sale whose Redis bytes per order the table gives, the same size on any
# host); the next ones last about SECS at the rate just measured.
raw_n=$((25000 * SECS))
main_t0=$SECONDS
lap setup
for rep in $(seq "$REPS"); do
    rep_main "$rep"
done
main_secs=$((SECONDS - main_t0))
rss_kb=$(grep VmHWM "/proc/$server/status" | awk '{print $2}')
kill "$server1" "$server_exp" "$bare_pid" "$nginx_pid"; wait "$server1" "$server_exp" "$bare_pid" "$nginx_pid" 2>/dev/null || true
server1=""; server_exp=""; bare_pid=""; nginx_pid=""
kill "$server"; wait "$server" 2>/dev/null || true; server=""
python3 loadtest/chart.py "$work/chart" "$CHART_OUT"

cat <<HEAD
machine: $(nproc) cores, $(free -g | awk '/Mem/{print $2}') GiB; $(redis-server --version | cut -d' ' -f3); $(mariadb --version | grep -o 'Distrib [^,]*'); $(wrk --version 2>&1 | head -1 | cut -d' ' -f1-2); nginx $(nginx -v 2>&1 | cut -d/ -f2); node $(node --version), bullmq $bullmq_version
command: loadtest/bench.sh (SECS=$SECS, REPS=$REPS); load phases ${SECS} s each, wrk -t2 -c${CONC}; the main table took ${main_secs} s
figures: median over the $REPS repetitions (min-max); ratio: of the medians; each repetition runs every phase beside its reference
chart: $CHART_OUT (latency by percentile and requests/s over time of each phase, first repetition)
time by step (s, all repetitions): $(awk '{t[$1] += $2; if (!($1 in o)) o[$1] = n++} END {for (k in o) printf "%d %s %d\n", o[k], k, t[k]}' "$laps" | sort -n | awk '{printf "%s%s %d", (NR > 1 ? ", " : ""), $2, $3}')

HEAD
python3 - "$rows" <<PY
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    phase, rep, fig, p50, p99 = line.rstrip("\n").split("|")
    r = rows.setdefault(phase, {"fig": [], "p50": [], "p99": []})
    for k, v in (("fig", fig), ("p50", p50), ("p99", p99)):
        if v not in ("", "nan"):
            r[k].append(float(v))
def med(phase, k="fig"):
    xs = rows.get(phase, {}).get(k, [])
    return statistics.median(xs) if xs else float("nan")
def show(phase, k="fig", fmt="{:.0f}"):
    xs = rows.get(phase, {}).get(k, [])
    if not xs:
        return "n/a"
    m = fmt.format(statistics.median(xs))
    return m if len(xs) == 1 else f"{m} ({fmt.format(min(xs))}-{fmt.format(max(xs))})"
def lat(phase):
    return f"p50 {show(phase, 'p50', '{:.2f}')} ms, p99 {show(phase, 'p99', '{:.2f}')} ms"
def ratio(a, b):
    return f"{a / b:.2f}" if b == b and b else "n/a"
def verdict(ok):
    return "meets" if ok else "misses"
print("| measurement | figure | reference (same run) | ratio | target | verdict |")
print("| --- | ---: | ---: | ---: | ---: | --- |")
res, raw = med("reserve"), med("raw")
print(f"| HTTP reserve path, reservations/s (created orders counted) | {show('reserve')} (wrk {show('reserve_wrk')} req/s; {lat('reserve')}) | redis-benchmark -P 1 EVALSHA of the reserve script: {show('raw')} req/s | {ratio(res, raw)} | >= 1.5 | {verdict(res >= 1.5 * raw)} |")
one = med("one_per_call")
print(f"| the same, one reservation per script call (FLASHSALE_RESERVE_BATCH=1: before combining) | {show('one_per_call')} ({lat('one_per_call')}) | the same redis-benchmark figure | {ratio(one, raw)} | | |")
print(f"| reserve p99 at half the maximum rate | {show('half', 'p99', '{:.2f}')} ms ({show('half')} req/s, p50 {show('half', 'p50', '{:.2f}')} ms) | | | <= 5 ms | {verdict(med('half', 'p99') <= 5)} |")
so, bare, ng = med("sold_out"), med("bare"), med("nginx")
print(f"| sold-out flood, requests/s | {show('sold_out')} ({lat('sold_out')}) | bare axum 409 on this HTTP stack (examples/bench_bare_409.rs): {show('bare')} req/s ({lat('bare')}) | {ratio(so, bare)} | >= 0.9 | {verdict(so >= 0.9 * bare)} |")
print(f"| the same sold-out flood | {show('sold_out')} | nginx return 200: {show('nginx')} req/s ({lat('nginx')}) | {ratio(so, ng)} | | |")
hot = med("hotrow")
print(f"| HTTP reserve path against MySQL hot row + insert (64 in flight) | {show('reserve')}/s | {show('hotrow')} tx/s | {ratio(res, hot)} | >= 20 | {verdict(res >= 20 * hot)} |")
rec = med("reconciler")
print(f"| reconciler, records/s into MariaDB | {show('reconciler')} | peak reserve rate: {show('reserve')}/s | {ratio(rec, res)} | >= 2.0 | {verdict(rec >= 2 * res)} |")
ex, exb, bull = med("expiry"), med("expiry_bare"), med("bullmq")
print(f"| expiry drain, 1 worker (batch $EXPIRY_BATCH), orders/s ($EXPIRY_ORDERS due at once) | {show('expiry')} | the claim script driven by a bare client: {show('expiry_bare')}/s | {ratio(ex, exb)} | >= 0.5 | {verdict(ex >= 0.5 * exb)} |")
bu = med("expiry_burst")
print(f"| expiry burst: $EXPIRY_ORDERS orders due at one moment, 1 worker waiting for them, orders/s from the due time to the last close | {show('expiry_burst')} (lateness p50 {show('expiry_burst', 'p50')} ms, p99 {show('expiry_burst', 'p99')} ms) | BullMQ $bullmq_version, the same shape: $EXPIRY_ORDERS delayed jobs due at once, 1 Worker (concurrency $BULLMQ_CONCURRENCY): {show('bullmq')} jobs/s (lateness p50 {show('bullmq', 'p50')} ms, p99 {show('bullmq', 'p99')} ms) | {ratio(bu, bull)} | >= 4 | {verdict(bu >= 4 * bull)} |")
print(f"| expiry lateness, steady 2,000/s, nothing else running | p50 {show('expiry_late', 'p50')} ms, p99 {show('expiry_late', 'p99')} ms | | | p99 <= 25 ms | {verdict(med('expiry_late', 'p99') <= 25)} |")
print(f"| expiry lateness while the reserve flood runs at full speed (one server, roles http,expiry; 1 s payment window, so every order falls due during the flood) | p50 {show('flood_late', 'p50')} ms, p99 {show('flood_late', 'p99')} ms ({show('flood_late')} orders closed) | reserve rate meanwhile: {show('flood_reserve')}/s ({lat('flood_reserve')}) | | p99 <= 10 ms | {verdict(med('flood_late', 'p99') <= 10)} |")
print(f"| reserve p99 at half rate while $DRAIN_ORDERS unpaid orders fall due at once (the same server; claims of $EXPIRY_BUSY_BATCH while it reserves) | {show('drain_reserve', 'p99', '{:.2f}')} ms ({show('drain_reserve')} req/s, p50 {show('drain_reserve', 'p50', '{:.2f}')} ms) | the drain meanwhile: {show('drain_during')} orders/s (lateness p50 {show('drain_during', 'p50')} ms, p99 {show('drain_during', 'p99')} ms) | | <= 5 ms | {verdict(med('drain_reserve', 'p99') <= 5)} |")
PY
cat <<TABLE
| Redis bytes per pending order (orders + due-queue + buyers), HTTP sale ($mem_made orders of $(wc -l < "$work/tokens.txt") buyers) | $bytes_settled ($bytes_with_flow with its flow record, while no reconciler runs) | | | <= 200 | $(python3 -c "print('meets' if $bytes_settled <= 200 else 'misses')") |
| the same, one order per buyer (the reference's sale: $mem_raw_made orders, $raw_buyers buyers) | $bytes_unique ($bytes_parts) | | | <= 120 | $(python3 -c "print('meets' if $bytes_unique <= 120 else 'misses')") |
| reserve call records per order (the calls hash: HTTP sale, combined calls / reference, one call per order) | $bytes_calls / $bytes_calls_unique | | | | |
| server peak RSS | $((rss_kb / 1024)) MB | | | <= 100 MB | $(python3 -c "print('meets' if $rss_kb <= 102400 else 'misses')") |
TABLE
if [ "$SECTION" = all ]; then
    t=$SECONDS
    bench_topologies
    t_topo=$((SECONDS - t)); t=$SECONDS
    bench_failover
    t_fail=$((SECONDS - t)); t=$SECONDS
    bench_events
    echo
    echo "The whole run took $SECONDS s: the main table $main_secs s, topologies $t_topo s, failover drills $t_fail s, events $((SECONDS - t)) s (the rest: builds, setup)."
fi
