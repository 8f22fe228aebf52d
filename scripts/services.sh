#!/usr/bin/env bash
# scripts/services.sh - make sure the local Redis, MariaDB and RabbitMQ that
# flashsale needs are answering on this (Debian 12) development machine.
#
#   scripts/services.sh            ensure Redis (127.0.0.1:6379), MariaDB
#                                  (127.0.0.1:3306, root, empty password, TCP)
#                                  and RabbitMQ (127.0.0.1:5672, guest/guest)
#   scripts/services.sh redis      ensure only Redis
#   scripts/services.sh mariadb    ensure only MariaDB
#   scripts/services.sh rabbitmq   ensure only RabbitMQ (and amqp-tools, for
#                                  watching events with amqp-consume)
#
# When all already answer it only says so: no apt, no sudo, no restarts.
# Anything missing is installed (apt-get, at most one `apt-get update`) and
# started (systemctl when systemd runs, a plain daemon otherwise).  Exits
# non-zero with a message when a service still does not answer.
#
# Sourcing it (`. scripts/services.sh`) only defines the functions; call
# `ensure_services [all|redis|mariadb]` yourself, or set SERVICES_ENSURE
# (`SERVICES_ENSURE=all . scripts/services.sh`) to run the check right away.
# (Arguments are not used when sourced: a bare `source` passes on the
# caller's own arguments.)
# Note: sourcing also turns on `set -euo pipefail` in the calling shell.

set -euo pipefail

if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
else
    SUDO="sudo"
fi

SERVICES_REDIS_HOST=127.0.0.1
SERVICES_REDIS_PORT=6379
SERVICES_DB_HOST=127.0.0.1
SERVICES_DB_PORT=3306
SERVICES_MARIADBD=/usr/sbin/mariadbd
SERVICES_AMQP_HOST=127.0.0.1
SERVICES_AMQP_PORT=5672
_services_apt_updated=0

svc_say() { printf 'services: %s\n' "$*"; }
svc_fail() { printf 'services: ERROR: %s\n' "$*" >&2; return 1; }

# True when systemd is PID 1 and actually running.
svc_have_systemd() { [ -d /run/systemd/system ]; }

# Privileged commands need root or a working sudo; check before the first one.
svc_need_root() {
    if [ -n "$SUDO" ] && ! command -v sudo >/dev/null 2>&1; then
        svc_fail "need root or sudo to $1, and sudo is not installed"
        return 1
    fi
}

# apt-get install, running `apt-get update` only before the first install.
svc_apt_install() {
    command -v apt-get >/dev/null 2>&1 \
        || { svc_fail "apt-get not found; install $* by hand"; return 1; }
    svc_need_root "install $*" || return 1
    if [ "$_services_apt_updated" -eq 0 ]; then
        svc_say "apt: updating package lists"
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q \
            || { svc_fail "apt-get update failed"; return 1; }
        _services_apt_updated=1
    fi
    svc_say "apt: installing $*"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" \
        || { svc_fail "apt-get install $* failed"; return 1; }
}

# ---------------------------------------------------------------- Redis ---

redis_answers() {
    local reply=""
    if command -v redis-cli >/dev/null 2>&1; then
        reply=$(timeout 2 redis-cli -h "$SERVICES_REDIS_HOST" -p "$SERVICES_REDIS_PORT" ping 2>/dev/null) \
            || return 1
        [ "$reply" = "PONG" ]
    else
        # No client: speak the inline protocol over bash's /dev/tcp.
        # shellcheck disable=SC2016 # $0/$1 are expanded by the inner bash
        reply=$(timeout 2 bash -c '
            exec 3<>"/dev/tcp/$0/$1" || exit 1
            printf "PING\r\n" >&3
            IFS= read -r line <&3 || exit 1
            printf "%s" "$line"' "$SERVICES_REDIS_HOST" "$SERVICES_REDIS_PORT" 2>/dev/null) \
            || return 1
        [[ "$reply" == "+PONG"* ]]
    fi
}

redis_wait() {
    local i
    for ((i = 0; i < 30; i++)); do # 30 x 0.5 s = 15 s
        redis_answers && return 0
        sleep 0.5
    done
    return 1
}

redis_start() {
    svc_need_root "start redis-server" || return 1
    if svc_have_systemd; then
        svc_say "redis: systemctl start redis-server"
        $SUDO systemctl start redis-server \
            || { svc_fail "redis: systemctl start redis-server failed (see: journalctl -u redis-server)"; return 1; }
        return 0
    fi

    local dir=/var/lib/redis logdir=/var/log/redis logfile
    $SUDO mkdir -p "$dir" 2>/dev/null || dir=/tmp
    $SUDO mkdir -p "$logdir" 2>/dev/null || true
    logfile="$logdir/ci.log"
    if ! $SUDO touch "$logfile" 2>/dev/null; then
        logfile=/tmp/flashsale-redis-ci.log
        svc_say "redis: $logdir is not writable, logging to $logfile"
    fi
    svc_say "redis: starting redis-server as a daemon (no systemd), log $logfile"
    $SUDO redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$SERVICES_REDIS_PORT" \
        --save "" --appendonly yes --appendfsync everysec --maxmemory-policy noeviction \
        --dir "$dir" --logfile "$logfile" \
        || { svc_fail "redis: redis-server failed to start (see $logfile)"; return 1; }
}

ensure_redis() {
    if redis_answers; then
        svc_say "redis: answering on $SERVICES_REDIS_HOST:$SERVICES_REDIS_PORT"
        return 0
    fi
    svc_say "redis: not answering on $SERVICES_REDIS_HOST:$SERVICES_REDIS_PORT"

    if command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ]; then
        svc_say "redis: redis-server is installed"
    else
        svc_apt_install redis-server || return 1
        # The package may have started it already.
        if redis_wait; then
            svc_say "redis: installed and answering"
            return 0
        fi
    fi

    redis_start || return 1
    if redis_wait; then
        svc_say "redis: started, answering"
        return 0
    fi
    svc_fail "redis: still no PONG from $SERVICES_REDIS_HOST:$SERVICES_REDIS_PORT after 15 s"
}

# -------------------------------------------------------------- MariaDB ---

# Path of the command-line client (mariadb, else mysql).
mariadb_client() { command -v mariadb 2>/dev/null || command -v mysql 2>/dev/null; }
mariadb_admin() { command -v mariadb-admin 2>/dev/null || command -v mysqladmin 2>/dev/null; }

# The login the application uses: root, empty password, TCP.
# --no-defaults so a ~/.my.cnf password cannot hide a failing empty login.
mariadb_answers() {
    local client
    client=$(mariadb_client) || return 1
    timeout 10 "$client" --no-defaults --protocol=TCP --connect-timeout=2 \
        -h "$SERVICES_DB_HOST" -P "$SERVICES_DB_PORT" -uroot -e 'SELECT 1' >/dev/null 2>&1
}

# Server up on its unix socket?  `ping` returns 0 even on "access denied".
mariadb_socket_alive() {
    local admin
    admin=$(mariadb_admin) || return 1
    timeout 5 "$admin" --connect-timeout=2 ping >/dev/null 2>&1
}

mariadb_wait_socket() {
    local i
    for ((i = 0; i < 60; i++)); do # 60 x 0.5 s = 30 s
        mariadb_socket_alive && return 0
        sleep 0.5
    done
    return 1
}

mariadb_start() {
    svc_need_root "start mariadb" || return 1
    if svc_have_systemd; then
        svc_say "mariadb: systemctl start mariadb"
        $SUDO systemctl start mariadb \
            || { svc_fail "mariadb: systemctl start mariadb failed (see: journalctl -u mariadb)"; return 1; }
        return 0
    fi

    $SUDO install -d -o mysql -g mysql -m 0755 /run/mysqld \
        || { svc_fail "mariadb: cannot create /run/mysqld owned by mysql"; return 1; }
    if [ ! -d /var/lib/mysql/mysql ] && ! $SUDO test -d /var/lib/mysql/mysql; then
        svc_say "mariadb: data directory not initialised, running mariadb-install-db"
        $SUDO mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null \
            || { svc_fail "mariadb: mariadb-install-db failed"; return 1; }
    fi
    svc_say "mariadb: starting $SERVICES_MARIADBD in the background (no systemd)"
    $SUDO start-stop-daemon --start --oknodo --background \
        --exec "$SERVICES_MARIADBD" -- --user=mysql \
        || { svc_fail "mariadb: start-stop-daemon could not start $SERVICES_MARIADBD"; return 1; }
}

# Debian's root@localhost uses unix_socket auth only, so the app's TCP login
# (root, empty password) is refused.  On this development machine, allow it.
mariadb_allow_root_tcp() {
    local client
    client=$(mariadb_client) || { svc_fail "mariadb: no mariadb/mysql client found"; return 1; }
    if ! $SUDO "$client" -uroot -e 'SELECT 1' >/dev/null 2>&1; then
        svc_fail "mariadb: server is up but root can log in neither over TCP with an empty password nor over the socket; fix root's authentication by hand"
        return 1
    fi
    $SUDO "$client" -uroot <<'SQL' || { svc_fail "mariadb: could not change root's authentication"; return 1; }
ALTER USER 'root'@'localhost' IDENTIFIED VIA unix_socket OR mysql_native_password USING PASSWORD('');
CREATE USER IF NOT EXISTS 'root'@'127.0.0.1' IDENTIFIED VIA mysql_native_password USING PASSWORD('');
GRANT ALL PRIVILEGES ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION;
SQL
    svc_say "mariadb: root had no empty-password TCP login (Debian default: unix_socket only); allowed empty password for root@localhost and root@127.0.0.1 (development machine only)"
}

ensure_mariadb() {
    if mariadb_answers; then
        svc_say "mariadb: answering on $SERVICES_DB_HOST:$SERVICES_DB_PORT (root, empty password)"
        return 0
    fi
    svc_say "mariadb: no root login on $SERVICES_DB_HOST:$SERVICES_DB_PORT"

    if [ ! -x "$SERVICES_MARIADBD" ]; then
        svc_apt_install mariadb-server mariadb-client || return 1
    elif ! mariadb_client >/dev/null; then
        svc_apt_install mariadb-client || return 1
    else
        svc_say "mariadb: mariadb-server is installed"
    fi

    if mariadb_socket_alive; then
        svc_say "mariadb: server is running"
    else
        mariadb_start || return 1
        mariadb_wait_socket \
            || { svc_fail "mariadb: server did not answer mariadb-admin ping within 30 s"; return 1; }
        svc_say "mariadb: started"
    fi

    if ! mariadb_answers; then
        mariadb_allow_root_tcp || return 1
    fi
    if mariadb_answers; then
        svc_say "mariadb: answering on $SERVICES_DB_HOST:$SERVICES_DB_PORT (root, empty password)"
        return 0
    fi
    svc_fail "mariadb: server runs, but 'root' with an empty password still cannot log in over TCP at $SERVICES_DB_HOST:$SERVICES_DB_PORT (is networking/bind-address or port changed, or does root@127.0.0.1 have a password?)"
}

# ------------------------------------------------------------- RabbitMQ ---

# A broker answers the AMQP 0-9-1 protocol header with a Connection.Start
# method frame (frame type 1).
rabbitmq_answers() {
    # shellcheck disable=SC2016 # $0/$1 are expanded by the inner bash
    timeout 3 bash -c '
        exec 3<>"/dev/tcp/$0/$1" || exit 1
        printf "AMQP\x00\x00\x09\x01" >&3
        first=$(head -c 1 <&3 | od -An -tu1 | tr -d " ")
        [ "$first" = "1" ]' "$SERVICES_AMQP_HOST" "$SERVICES_AMQP_PORT" 2>/dev/null
}

rabbitmq_wait() {
    local i
    for ((i = 0; i < 120; i++)); do # 120 x 0.5 s = 60 s: Erlang starts slowly
        rabbitmq_answers && return 0
        sleep 0.5
    done
    return 1
}

rabbitmq_start() {
    svc_need_root "start rabbitmq-server" || return 1
    if svc_have_systemd; then
        svc_say "rabbitmq: systemctl start rabbitmq-server"
        $SUDO systemctl start rabbitmq-server \
            || { svc_fail "rabbitmq: systemctl start rabbitmq-server failed (see: journalctl -u rabbitmq-server)"; return 1; }
        return 0
    fi
    svc_say "rabbitmq: starting rabbitmq-server -detached (no systemd)"
    $SUDO rabbitmq-server -detached \
        || { svc_fail "rabbitmq: rabbitmq-server -detached failed (see /var/log/rabbitmq/)"; return 1; }
}

ensure_rabbitmq() {
    if ! command -v amqp-consume >/dev/null 2>&1; then
        # The README's way to watch events; not needed by the service.
        svc_apt_install amqp-tools || svc_say "rabbitmq: amqp-tools not installed (optional)"
    fi
    if rabbitmq_answers; then
        svc_say "rabbitmq: answering on $SERVICES_AMQP_HOST:$SERVICES_AMQP_PORT"
        return 0
    fi
    svc_say "rabbitmq: not answering on $SERVICES_AMQP_HOST:$SERVICES_AMQP_PORT"
    if command -v rabbitmq-server >/dev/null 2>&1 || [ -x /usr/sbin/rabbitmq-server ]; then
        svc_say "rabbitmq: rabbitmq-server is installed"
    else
        svc_apt_install rabbitmq-server || return 1
        if rabbitmq_wait; then
            svc_say "rabbitmq: installed and answering"
            return 0
        fi
    fi
    rabbitmq_start || return 1
    if rabbitmq_wait; then
        svc_say "rabbitmq: started, answering"
        return 0
    fi
    svc_fail "rabbitmq: still no AMQP answer from $SERVICES_AMQP_HOST:$SERVICES_AMQP_PORT after 60 s"
}

# ------------------------------------------------------------------ main ---

# ensure_services [all|redis|mariadb|rabbitmq]  (default: all)
ensure_services() {
    local what="${1:-all}" rc=0
    case "$what" in
        all)
            ensure_redis || rc=1
            ensure_mariadb || rc=1
            ensure_rabbitmq || rc=1
            "$(dirname "${BASH_SOURCE[0]}")/prometheus.sh" ensure || rc=1
            ;;
        redis) ensure_redis || rc=1 ;;
        mariadb | mysql) ensure_mariadb || rc=1 ;;
        rabbitmq | amqp) ensure_rabbitmq || rc=1 ;;
        -h | --help)
            printf 'usage: %s [all|redis|mariadb|rabbitmq]\n' "${BASH_SOURCE[0]}"
            return 0
            ;;
        *)
            printf 'usage: %s [all|redis|mariadb|rabbitmq]\n' "${BASH_SOURCE[0]}" >&2
            return 2
            ;;
    esac
    if [ "$rc" -ne 0 ]; then
        svc_fail "not all services answer; see the messages above"
        return 1
    fi
}

if [[ "${BASH_SOURCE[0]}" != "$0" ]]; then
    # Sourced: only run when asked to.
    if [ -n "${SERVICES_ENSURE:-}" ]; then
        case "$SERVICES_ENSURE" in 1 | yes | true) SERVICES_ENSURE=all ;; esac
        ensure_services "$SERVICES_ENSURE"
    fi
else
    ensure_services "$@" || exit $?
fi
