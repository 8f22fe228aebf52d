#!/usr/bin/env bash
# scripts/redis-topology.sh - real Redis topologies on free loopback ports,
# each in a folder of its own, for tests and failover drills.
#
#   scripts/redis-topology.sh start cluster DIR [NODE_TIMEOUT_MS]
#       3 primaries + 3 replicas (redis-cli --cluster create, replicas 1),
#       cluster-node-timeout NODE_TIMEOUT_MS (default 5000; below 5000 only
#       for drills: two busy cores make shorter ones fail over by themselves)
#   scripts/redis-topology.sh start sentinel DIR [DOWN_AFTER_MS]
#       1 primary, 1 replica, 3 sentinels (quorum 2) monitoring them as
#       $TOPOLOGY_MASTER_NAME (default flashsale), down-after DOWN_AFTER_MS
#       (default 2000), failover-timeout 10000
#   scripts/redis-topology.sh wait DIR [SECS]
#       checks readiness again (after a node was killed and restarted, or a
#       failover) for up to SECS (default 45) and rewrites DIR/nodes with
#       each node's role and PID now. A Sentinel set needs ~20 s after a
#       primary is restarted or demoted: the sentinels turn it into a
#       replica after 8 s, and see that in its INFO within 10 s more, which
#       readiness waits for (a sentinel still remembering it as a primary
#       would turn it back into a replica once promoted).
#   scripts/redis-topology.sh stop DIR
#       stops every process of DIR (SIGCONT, SIGTERM, SIGKILL after 10 s);
#       removes nothing; safe to run twice
#
# DIR must not exist or be empty. `start` leaves in it:
#   node-PORT.conf      one per process; `redis-server node-PORT.conf` (a
#                       sentinel: `redis-server node-PORT.conf --sentinel`)
#                       restarts that node on the same port and data folder
#   node-PORT/          its data folder: AOF, nodes.conf (cluster), redis.pid,
#                       redis.log
#   nodes               one line per process: ROLE PORT PID CONF, ROLE being
#                       primary|replica|sentinel (as of the last start/wait)
#   topology.env        KEY=VALUE lines a shell can source:
#                       TOPOLOGY_KIND=cluster|sentinel, TOPOLOGY_DIR=DIR, and
#                       FLASHSALE_REDIS_CLUSTER=redis://127.0.0.1:P,... (every
#                       node) or FLASHSALE_REDIS_SENTINELS=redis://127.0.0.1:S,...
#                       and FLASHSALE_REDIS_SENTINEL_MASTER=NAME
#
# Every process is a daemon (daemonize yes) that writes its pidfile, so a
# restarted node's PID is found by `stop` through the pidfile. Readiness is
# bounded ($TOPOLOGY_READY_SECS, else 30 s for `start`, 45 s for `wait`):
# past it the script says what was still missing and exits 1; a failed
# `start` stops what it started and keeps DIR for its logs.
#
# Ports are picked below the kernel's ephemeral range (so no outgoing
# connection takes them meanwhile), each free to bind and, for a cluster,
# with its bus port (PORT+10000) free too.

set -euo pipefail

READY_SECS=${TOPOLOGY_READY_SECS:-30}
WAIT_SECS=${TOPOLOGY_READY_SECS:-45}
MASTER_NAME=${TOPOLOGY_MASTER_NAME:-flashsale}

say() { printf 'redis-topology: %s\n' "$*"; }
die() { printf 'redis-topology: ERROR: %s\n' "$*" >&2; exit 1; }

usage() {
    sed -n '2,/^$/s/^# \{0,1\}//p' "$0" >&2
    exit 2
}

# redis-cli against 127.0.0.1:PORT, error replies an error, never hanging on
# a stopped (SIGSTOP) node; output without carriage returns.
cli() {
    local port=$1
    shift
    timeout 3 redis-cli -e -h 127.0.0.1 -p "$port" "$@" 2>/dev/null | tr -d '\r'
}

# True when PID runs (a zombie left by a killed daemon counts as gone).
alive() {
    local pid=$1 state
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
    state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
    [ "$state" != "Z" ]
}

# True when PID is a redis-server serving PORT (not a PID reused since).
is_our_redis() {
    local pid=$1 port=$2 exe title
    alive "$pid" || return 1
    exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
    # Debian installs redis-server as a link to redis-check-rdb.
    case ${exe##*/} in redis-*) ;; *) return 1 ;; esac
    title=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
    case $title in *":$port "* | *":$port") return 0 ;; *) return 1 ;; esac
}

# N free loopback ports below the ephemeral range; with BUS=1 each one's
# PORT+10000 is free as well.
free_ports() {
    local n=$1 bus=$2
    python3 - "$n" "$bus" <<'PY'
import random, socket, sys

n, bus = int(sys.argv[1]), sys.argv[2] == "1"
try:
    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
except OSError:
    low = 32768
top = (low - 10001) if bus else (low - 1)
top = min(top, 55535 if bus else 65535)
if top <= 10000:
    sys.exit("no port range below the ephemeral ports (%d)" % low)


def free(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


taken, picked = set(), []
for _ in range(10000):
    if len(picked) == n:
        break
    p = random.randint(10000, top)
    wanted = [p, p + 10000] if bus else [p]
    if any(w in taken for w in wanted) or not all(free(w) for w in wanted):
        continue
    taken.update(wanted)
    picked.append(p)
if len(picked) < n:
    sys.exit("found only %d free ports" % len(picked))
print(" ".join(map(str, picked)))
PY
}

# Settings every data node shares.
data_conf() {
    local dir=$1 port=$2
    cat <<EOF
port $port
bind 127.0.0.1
daemonize yes
pidfile $dir/node-$port/redis.pid
logfile $dir/node-$port/redis.log
dir $dir/node-$port
appendonly yes
appendfsync everysec
save ""
maxmemory-policy noeviction
enable-debug-command local
# One replica per primary: nothing to batch, so sync at once.
repl-diskless-sync-delay 0
EOF
}

pidfile_of() { sed -n 's/^pidfile //p' "$1" | tail -1 | tr -d '"'; }

# Starts CONF (a sentinel when SENTINEL=1) and waits until it answers PING.
start_node() {
    local conf=$1 port=$2 sentinel=$3 pidfile pid="" i
    pidfile=$(pidfile_of "$conf")
    rm -f "$pidfile"
    if [ "$sentinel" = 1 ]; then
        redis-server "$conf" --sentinel >/dev/null
    else
        redis-server "$conf" >/dev/null
    fi || die "redis-server $conf refused to start"
    for ((i = 0; i < 100; i++)); do
        [ -s "$pidfile" ] && pid=$(cat "$pidfile")
        if [ -n "$pid" ] && [ "$(cli "$port" ping || true)" = "PONG" ]; then
            printf '%s\n' "$pid"
            return 0
        fi
        if [ -n "$pid" ] && ! alive "$pid"; then
            break
        fi
        sleep 0.1
    done
    printf 'redis-topology: node %s did not start; its log ends:\n' "$port" >&2
    tail -5 "${pidfile%/*}/redis.log" >&2 || true
    return 1
}

# Appends a line to DIR/nodes.
record() { printf '%s %s %s %s\n' "$2" "$3" "$4" "$5" >>"$1/nodes"; }

# Stops what was started when `start` fails, keeping DIR for its logs.
abandon() {
    say "start failed; stopping what it started (logs stay in $1)"
    stop_all "$1" || true
    exit 1
}

start_cluster() {
    local dir=$1 timeout=${2:-5000} list ports port conf pid addrs="" urls=""
    list=$(free_ports 6 1) || die "no free ports"
    read -r -a ports <<<"$list"
    for port in "${ports[@]}"; do
        mkdir -p "$dir/node-$port"
        conf=$dir/node-$port.conf
        {
            data_conf "$dir" "$port"
            cat <<EOF
cluster-enabled yes
cluster-config-file nodes.conf
cluster-node-timeout $timeout
cluster-require-full-coverage no
EOF
        } >"$conf"
        pid=$(start_node "$conf" "$port" 0) || abandon "$dir"
        # The role is known once the cluster exists; `wait` writes it.
        record "$dir" node "$port" "$pid" "$conf"
        addrs+=" 127.0.0.1:$port"
        urls+="${urls:+,}redis://127.0.0.1:$port"
    done
    # shellcheck disable=SC2086 # one argument per address
    if ! timeout 60 redis-cli --cluster create $addrs --cluster-replicas 1 --cluster-yes \
        >"$dir/cluster-create.log" 2>&1; then
        tail -20 "$dir/cluster-create.log" >&2
        abandon "$dir"
    fi
    cat >"$dir/topology.env" <<EOF
TOPOLOGY_KIND=cluster
TOPOLOGY_DIR=$dir
FLASHSALE_REDIS_CLUSTER=$urls
EOF
    wait_ready "$dir" "$READY_SECS" || abandon "$dir"
}

start_sentinel() {
    local dir=$1 down_after=${2:-2000} list ports primary replica port conf pid urls=""
    list=$(free_ports 5 0) || die "no free ports"
    read -r -a ports <<<"$list"
    primary=${ports[0]}
    replica=${ports[1]}
    for port in "$primary" "$replica"; do
        mkdir -p "$dir/node-$port"
        conf=$dir/node-$port.conf
        {
            data_conf "$dir" "$port"
            if [ "$port" = "$replica" ]; then
                printf 'replicaof 127.0.0.1 %s\n' "$primary"
            fi
        } >"$conf"
        pid=$(start_node "$conf" "$port" 0) || abandon "$dir"
        if [ "$port" = "$primary" ]; then
            record "$dir" primary "$port" "$pid" "$conf"
        else
            record "$dir" replica "$port" "$pid" "$conf"
        fi
    done
    for port in "${ports[@]:2}"; do
        mkdir -p "$dir/node-$port"
        conf=$dir/node-$port.conf
        cat >"$conf" <<EOF
port $port
bind 127.0.0.1
daemonize yes
pidfile $dir/node-$port/redis.pid
logfile $dir/node-$port/redis.log
dir $dir/node-$port
sentinel resolve-hostnames no
sentinel monitor $MASTER_NAME 127.0.0.1 $primary 2
sentinel down-after-milliseconds $MASTER_NAME $down_after
sentinel failover-timeout $MASTER_NAME 10000
EOF
        pid=$(start_node "$conf" "$port" 1) || abandon "$dir"
        record "$dir" sentinel "$port" "$pid" "$conf"
        urls+="${urls:+,}redis://127.0.0.1:$port"
    done
    cat >"$dir/topology.env" <<EOF
TOPOLOGY_KIND=sentinel
TOPOLOGY_DIR=$dir
FLASHSALE_REDIS_SENTINELS=$urls
FLASHSALE_REDIS_SENTINEL_MASTER=$MASTER_NAME
EOF
    wait_ready "$dir" "$READY_SECS" || abandon "$dir"
}

# --------------------------------------------------------------- readiness ---

# Set by the checks: what is still missing, for the timeout message.
WHY=""

# Data ports and sentinel ports of DIR, from DIR/nodes.
DATA_PORTS=()
SENTINEL_PORTS=()
load_nodes() {
    local role port _rest
    DATA_PORTS=()
    SENTINEL_PORTS=()
    [ -f "$1/nodes" ] || die "$1/nodes not found: not a topology folder"
    while read -r role port _rest; do
        if [ "$role" = sentinel ]; then
            SENTINEL_PORTS+=("$port")
        else
            DATA_PORTS+=("$port")
        fi
    done <"$1/nodes"
}

# INFO replication field KEY of PORT (empty when it does not answer).
repl_field() { cli "$1" info replication | sed -n "s/^$2://p"; }

# Checks one data node as a replica: a linked replica (of MASTER_PORT when
# given). Sets WHY otherwise.
replica_linked() {
    local port=$1 want=${2:-} info
    info=$(cli "$port" info replication) || { WHY="node $port does not answer"; return 1; }
    if ! grep -qx 'role:slave' <<<"$info"; then
        WHY="node $port is not a replica"
        return 1
    fi
    if [ -n "$want" ] && ! grep -qx "master_port:$want" <<<"$info"; then
        WHY="replica $port does not follow $want yet"
        return 1
    fi
    if ! grep -qx 'master_link_status:up' <<<"$info"; then
        WHY="replica $port: master_link_status is not up"
        return 1
    fi
}

cluster_ready() {
    local n=${#DATA_PORTS[@]} port info nodes role verdict
    for port in "${DATA_PORTS[@]}"; do
        info=$(cli "$port" cluster info) || { WHY="node $port does not answer"; return 1; }
        grep -qx 'cluster_state:ok' <<<"$info" || { WHY="node $port: cluster_state is not ok"; return 1; }
        grep -qx 'cluster_slots_ok:16384' <<<"$info" \
            || { WHY="node $port: not all 16384 slots are covered and ok"; return 1; }
        grep -qx "cluster_known_nodes:$n" <<<"$info" \
            || { WHY="node $port does not know all $n nodes"; return 1; }
        nodes=$(cli "$port" cluster nodes) || { WHY="node $port does not answer"; return 1; }
        # In this node's view: no node failing, in handshake or without an
        # address; it serves slots if it is a primary; every primary that
        # serves slots has a replica.
        verdict=$(awk '
            { flags[NR] = $3; id[NR] = $1; slots[NR] = (NF >= 9) }
            $3 ~ /(^|,)(fail\??|handshake|noaddr)(,|$)/ { print "node " $2 " is flagged " $3; done = 1; exit }
            $3 ~ /myself/ && $3 ~ /master/ && NF < 9 { print "it is a primary without slots"; done = 1; exit }
            $3 ~ /slave/ { replicas[$4]++ }
            END {
                if (done) exit
                for (i = 1; i <= NR; i++)
                    if (flags[i] ~ /master/ && slots[i] && !replicas[id[i]]) {
                        print "primary " id[i] " has no replica"; exit
                    }
            }' <<<"$nodes")
        [ -z "$verdict" ] || { WHY="node $port view: $verdict"; return 1; }
        role=$(repl_field "$port" role)
        if [ "$role" = slave ]; then
            replica_linked "$port" || return 1
        elif [ "$role" != master ]; then
            WHY="node $port does not say its role"
            return 1
        fi
    done
}

# Turns the flat key/value reply of `SENTINEL replicas` into one line per
# replica: "PORT FLAGS ROLE-REPORTED MASTER-LINK-STATUS MASTER-PORT".
replica_lines() {
    awk 'function show() { if (port != "") print port, f["flags"], f["role-reported"], f["master-link-status"], f["master-port"] }
         NR % 2 == 1 { key = $0; next }
         key == "name" { show(); port = ""; delete f }
         key == "port" { port = $0 }
         { f[key] = $0 }
         END { show() }'
}

sentinel_ready() {
    local port addr primary="" want listed master others data
    local n_sentinels=${#SENTINEL_PORTS[@]}
    for port in "${SENTINEL_PORTS[@]}"; do
        addr=$(cli "$port" sentinel get-master-addr-by-name "$MASTER_NAME" | paste -sd' ') \
            || { WHY="sentinel $port does not answer"; return 1; }
        [ -n "$addr" ] || { WHY="sentinel $port names no primary"; return 1; }
        if [ -z "$primary" ]; then
            primary=$addr
        elif [ "$addr" != "$primary" ]; then
            WHY="sentinels disagree on the primary ($primary, $addr)"
            return 1
        fi
    done
    [ -n "$primary" ] || { WHY="no sentinel names a primary"; return 1; }
    want=${primary#127.0.0.1 }
    case " ${DATA_PORTS[*]} " in
        *" $want "*) ;;
        *) WHY="sentinels name $primary, not one of ours"; return 1 ;;
    esac
    [ "$(repl_field "$want" role)" = master ] \
        || { WHY="primary $want does not say it is the primary"; return 1; }
    for data in "${DATA_PORTS[@]}"; do
        [ "$data" = "$want" ] && continue
        replica_linked "$data" "$want" || return 1
    done
    for port in "${SENTINEL_PORTS[@]}"; do
        master=$(cli "$port" sentinel master "$MASTER_NAME" | paste -sd' ') \
            || { WHY="sentinel $port does not answer"; return 1; }
        case " $master " in
            *" flags master "*) ;;
            *) WHY="sentinel $port: the primary's flags are not just 'master'"; return 1 ;;
        esac
        case " $master " in
            *" role-reported master "*) ;;
            *) WHY="sentinel $port has not seen $want report itself a primary yet"; return 1 ;;
        esac
        others=$((n_sentinels - 1))
        case " $master " in
            *" num-other-sentinels $others "*) ;;
            *) WHY="sentinel $port does not know the $others other sentinels yet"; return 1 ;;
        esac
        listed=$(cli "$port" sentinel replicas "$MASTER_NAME" | replica_lines) \
            || { WHY="sentinel $port does not answer"; return 1; }
        # Its last INFO of the replica must say so too: a sentinel that still
        # remembers a restarted primary reporting itself a master turns it
        # into a replica again later, even after it was promoted.
        for data in "${DATA_PORTS[@]}"; do
            [ "$data" = "$want" ] && continue
            grep -qx "$data slave slave ok $want" <<<"$listed" || {
                WHY="sentinel $port does not see $data as a linked replica of $want yet (${listed:-no replicas})"
                return 1
            }
        done
    done
}

# Rewrites DIR/nodes with each node's role and PID (from its pidfile) now.
rewrite_nodes() {
    local dir=$1 role port pid conf new_role new_pid pidfile
    : >"$dir/nodes.new"
    while read -r role port pid conf; do
        new_role=$role
        if [ "$role" != sentinel ]; then
            case $(repl_field "$port" role) in
                master) new_role=primary ;;
                slave) new_role=replica ;;
            esac
        fi
        new_pid=$pid
        pidfile=$(pidfile_of "$conf")
        if [ -s "$pidfile" ] && alive "$(cat "$pidfile")"; then
            new_pid=$(cat "$pidfile")
        fi
        printf '%s %s %s %s\n' "$new_role" "$port" "$new_pid" "$conf" >>"$dir/nodes.new"
    done <"$dir/nodes"
    mv "$dir/nodes.new" "$dir/nodes"
}

wait_ready() {
    local dir=$1 secs=${2:-$READY_SECS} kind check deadline
    [ -f "$dir/topology.env" ] || die "$dir/topology.env not found: not a topology folder"
    kind=$(sed -n 's/^TOPOLOGY_KIND=//p' "$dir/topology.env")
    if [ "$kind" = sentinel ]; then
        MASTER_NAME=$(sed -n 's/^FLASHSALE_REDIS_SENTINEL_MASTER=//p' "$dir/topology.env")
    fi
    case $kind in
        cluster) check=cluster_ready ;;
        sentinel) check=sentinel_ready ;;
        *) die "$dir/topology.env: unknown TOPOLOGY_KIND '$kind'" ;;
    esac
    load_nodes "$dir"
    deadline=$((SECONDS + secs))
    until "$check"; do
        if ((SECONDS >= deadline)); then
            printf 'redis-topology: ERROR: %s %s not ready after %s s: %s\n' \
                "$kind" "$dir" "$secs" "$WHY" >&2
            return 1
        fi
        sleep 0.2
    done
    rewrite_nodes "$dir"
    say "$kind ready in $dir"
}

# -------------------------------------------------------------------- stop ---

stop_all() {
    local dir=$1 role port pid conf pidfile p i left
    local -a pids=() ports=()
    [ -f "$dir/nodes" ] || { say "nothing to stop in $dir"; return 0; }
    while read -r role port pid conf; do
        pidfile=$(pidfile_of "$conf" 2>/dev/null || true)
        for p in "$pid" "$( [ -n "$pidfile" ] && cat "$pidfile" 2>/dev/null || true)"; do
            case " ${pids[*]} " in *" $p "*) continue ;; esac
            if [ -n "$p" ] && is_our_redis "$p" "$port"; then
                pids+=("$p")
                ports+=("$port")
            fi
        done
    done <"$dir/nodes"
    [ "${#pids[@]}" -gt 0 ] || { say "nothing running in $dir"; return 0; }
    # A stopped (SIGSTOP) node handles SIGTERM only once continued.
    kill -CONT "${pids[@]}" 2>/dev/null || true
    kill -TERM "${pids[@]}" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        left=0
        for p in "${pids[@]}"; do alive "$p" && left=1; done
        [ "$left" = 0 ] && break
        sleep 0.1
    done
    for p in "${pids[@]}"; do
        alive "$p" && kill -KILL "$p" 2>/dev/null || true
    done
    for ((i = 0; i < 50; i++)); do
        left=0
        for p in "${pids[@]}"; do alive "$p" && left=1; done
        [ "$left" = 0 ] && break
        sleep 0.1
    done
    [ "$left" = 0 ] || die "processes ${pids[*]} outlived SIGKILL"
    say "stopped ${#pids[@]} processes (ports ${ports[*]}) of $dir"
}

# -------------------------------------------------------------------- main ---

main() {
    local cmd=${1:-} dir
    case $cmd in
        start)
            [ $# -ge 3 ] && [ $# -le 4 ] || usage
            command -v redis-server >/dev/null || die "redis-server not found"
            command -v redis-cli >/dev/null || die "redis-cli not found"
            command -v python3 >/dev/null || die "python3 not found (it picks the ports)"
            if [ -n "${4:-}" ] && ! [[ $4 =~ ^[0-9]+$ ]]; then
                die "'$4' is not a number of milliseconds"
            fi
            mkdir -p "$3"
            dir=$(cd "$3" && pwd -P)
            [ -z "$(ls -A "$dir")" ] || die "$dir is not empty"
            case $2 in
                cluster) start_cluster "$dir" "${4:-5000}" ;;
                sentinel) start_sentinel "$dir" "${4:-2000}" ;;
                *) usage ;;
            esac
            ;;
        wait)
            [ $# -ge 2 ] && [ $# -le 3 ] || usage
            dir=$(cd "$2" && pwd -P) || die "$2 not found"
            wait_ready "$dir" "${3:-$WAIT_SECS}"
            ;;
        stop)
            [ $# -eq 2 ] || usage
            [ -d "$2" ] || { say "$2 does not exist; nothing to stop"; return 0; }
            stop_all "$(cd "$2" && pwd -P)"
            ;;
        *) usage ;;
    esac
}

main "$@"
