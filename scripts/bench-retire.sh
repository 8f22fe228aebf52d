#!/usr/bin/env bash
# Retirement benchmark (not a test): what ended sales cost a running
# `flashsale serve` (roles http,expiry,reconciler) while nothing happens,
# and the settlement lag of a new order beside them, for the build before
# sales retired (BEFORE, default: where this branch left main) and for
# this tree.
#
# Each server runs on a MariaDB and a Redis of its own (temporary, removed
# afterwards), so MySQL's Questions and Redis's command counters count that
# server alone; its CPU time comes from /proc/<pid>/stat. The driver is
# examples/bench_retire.rs; extra arguments go to it, e.g.
#   scripts/bench-retire.sh --sales 2000 --idle-secs 60 --lag-orders 20
# The build before is compiled in a temporary git worktree with its own
# target directory (BEFORE_TARGET, seeded from this tree's release build so
# only flashsale itself is compiled again).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
# The commit this branch started from on main, unless told otherwise.
BEFORE=${BEFORE:-$(git merge-base HEAD main)}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
BEFORE_TARGET=${BEFORE_TARGET:-/tmp/flashsale-bench-before-target}
WORK=$(mktemp -d /tmp/bench-retire.XXXXXX)
PIDS=()

cleanup() {
    local status=$?
    if [ "$status" != 0 ]; then
        for f in "$WORK"/*/*.log; do
            [ -f "$f" ] && { echo "== $f"; tail -n 20 "$f"; }
        done >&2
    fi
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    git worktree remove --force "$WORK/src-before" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_port() { # port, what
    for _ in $(seq 1 300); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "$2 did not start on port $1" >&2
    return 1
}

stop() { # pid: SIGTERM, then SIGKILL after 10 s
    kill "$1" 2>/dev/null || return 0
    for _ in $(seq 1 100); do
        kill -0 "$1" 2>/dev/null || break
        sleep 0.1
    done
    kill -9 "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

as_root=()
[ "$(id -u)" = 0 ] && as_root=(--user=root)

echo "building this tree and the build before ($BEFORE: $(git rev-parse --short "$BEFORE"))" >&2
cargo build --quiet --release --bin flashsale --example bench_retire
cp "$TARGET/release/flashsale" "$WORK/flashsale-after"
cp "$TARGET/release/examples/bench_retire" "$WORK/bench_retire"
git worktree add --quiet --detach "$WORK/src-before" "$BEFORE"
if [ ! -d "$BEFORE_TARGET/release" ]; then
    mkdir -p "$BEFORE_TARGET"
    cp -a "$TARGET/release" "$BEFORE_TARGET/"
fi
(cd "$WORK/src-before" && CARGO_TARGET_DIR="$BEFORE_TARGET" cargo build --quiet --release --bin flashsale)
cp "$BEFORE_TARGET/release/flashsale" "$WORK/flashsale-before"

export FLASHSALE_JWT_SECRET=bench-jwt-secret-0123456789abcdef0123456789
export FLASHSALE_ADMIN_TOKEN=bench-admin-token-0123456789abcdef012345678
export FLASHSALE_PAYMENT_SECRET=bench-payment-secret-0123456789abcdef01234

run() { # name, label, server binary, driver arguments...
    local name=$1 label=$2 bin=$3
    shift 3
    local dir="$WORK/$name"
    mkdir -p "$dir"
    local rport mport hport
    rport=$(free_port)
    mport=$(free_port)
    hport=$(free_port)
    redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly no --dir "$dir" \
        >"$dir/redis.log" 2>&1 &
    local rpid=$!
    PIDS+=("$rpid")
    mariadb-install-db --no-defaults --datadir="$dir/db" --auth-root-authentication-method=normal \
        --skip-test-db "${as_root[@]}" >"$dir/install.log" 2>&1
    mariadbd --no-defaults --datadir="$dir/db" --socket="$dir/sock" --port="$mport" \
        --bind-address=127.0.0.1 --skip-grant-tables --skip-log-bin \
        --innodb-buffer-pool-size=128M "${as_root[@]}" >"$dir/mariadb.log" 2>&1 &
    local mpid=$!
    PIDS+=("$mpid")
    wait_port "$rport" redis-server
    wait_port "$mport" mariadbd
    REDIS_URL="redis://127.0.0.1:$rport" DATABASE_URL="mysql://root@127.0.0.1:$mport/bench" \
        FLASHSALE_LISTEN="127.0.0.1:$hport" FLASHSALE_ROLES=http,expiry,reconciler RUST_LOG=warn \
        "$bin" serve >"$dir/server.log" 2>&1 &
    local spid=$!
    PIDS+=("$spid")
    wait_port "$hport" "flashsale serve ($label)"
    "$WORK/bench_retire" --label "$label" --base "http://127.0.0.1:$hport" \
        --database-url "mysql://root@127.0.0.1:$mport/bench" --redis-url "redis://127.0.0.1:$rport" \
        --pid "$spid" --clk-tck "$(getconf CLK_TCK)" "$@" >>"$WORK/rows"
    # The server first, while its stores still answer.
    stop "$spid"
    stop "$mpid"
    stop "$rpid"
    PIDS=()
}

echo "machine: $(nproc) cores, $(redis-server --version | cut -d' ' -f3), $(mariadbd --version | grep -o 'Ver [^ ]*')" >&2
run before "before ($(git rev-parse --short "$BEFORE"))" "$WORK/flashsale-before" "$@"
run after "after ($(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src lua migrations || echo '+changes'))" \
    "$WORK/flashsale-after" "$@"
echo
echo "| build | ended sales | server CPU s per idle minute | MySQL queries/s idle | Redis commands/s idle | settlement lag p50 | max |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
cat "$WORK/rows"
