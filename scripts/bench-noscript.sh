#!/usr/bin/env bash
# NOSCRIPT handling against Redis Functions (not a test): starts a Redis of
# its own and a replica of it (--replicaof) on free loopback ports in a temp
# folder, runs examples/bench_noscript.rs against them (it flushes their
# script cache and functions and promotes the replica), and stops both by
# PID. Extra arguments go to the benchmark (see --help), for example:
#   scripts/bench-noscript.sh --rounds 500
# PROFILE=debug runs the debug build (the comparison is within one run).
set -euo pipefail
cd "$(dirname "$0")/.."

profile=${PROFILE:-release}
case $profile in
release) cargo_flags=(--release) ;;
debug) cargo_flags=() ;;
*) echo "PROFILE must be release or debug" >&2; exit 2 ;;
esac
cargo build --quiet "${cargo_flags[@]}" --example bench_noscript
bin=target/$profile/examples/bench_noscript

dir=$(mktemp -d "${TMPDIR:-/tmp}/flashsale-noscript.XXXXXX")
pids=()
cleanup() {
    local pid
    for pid in "${pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$dir"
}
trap cleanup EXIT

# Two loopback ports free to bind right now.
read -r primary_port replica_port < <(python3 -c '
import socket
ss = [socket.socket() for _ in range(2)]
for s in ss:
    s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in ss])
for s in ss:
    s.close()
')

start() {
    local name=$1 port=$2
    shift 2
    mkdir -p "$dir/$name"
    redis-server --port "$port" --bind 127.0.0.1 --dir "$dir/$name" \
        --save '' --appendonly no --daemonize no \
        --logfile "$dir/$name/redis.log" "$@" &
    pids+=($!)
    local i
    for i in $(seq 100); do
        if [ "$(redis-cli -p "$port" ping 2>/dev/null)" = PONG ]; then
            return 0
        fi
        sleep 0.1
    done
    echo "redis-server ($name, port $port) did not start:" >&2
    tail -n 20 "$dir/$name/redis.log" >&2
    exit 1
}

start primary "$primary_port"
start replica "$replica_port" --replicaof 127.0.0.1 "$primary_port"

echo "machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg), redis-server $(redis-server --version | cut -d' ' -f3 | cut -d= -f2), $profile build"
echo "command: scripts/bench-noscript.sh${*:+ $*}"
echo "runs: $bin --redis-url redis://127.0.0.1:$primary_port --replica-url redis://127.0.0.1:$replica_port${*:+ $*}"
echo
"$bin" --redis-url "redis://127.0.0.1:$primary_port" \
    --replica-url "redis://127.0.0.1:$replica_port" "$@"
