#!/usr/bin/env bash
# scripts/prometheus.sh - Prometheus for flashsale on this (Debian 12)
# development machine.
#
#   scripts/prometheus.sh ensure   install Debian's `prometheus` package (it
#                                  brings promtool) when `prometheus` or
#                                  `promtool` is missing; does nothing when
#                                  both are there. If the install starts the
#                                  Debian service, it is stopped again: tests
#                                  start their own Prometheus on a free port.
#   scripts/prometheus.sh check    promtool: the config, the rule files and
#                                  their unit tests (deploy/prometheus/tests),
#                                  and every alert's runbook anchor.
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=deploy/prometheus

say() { printf 'prometheus: %s\n' "$*"; }
fail() { printf 'prometheus: ERROR: %s\n' "$*" >&2; exit 1; }

# PIDs of running prometheus servers, one per line.
running() { pgrep -x prometheus || true; }

ensure() {
    if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
        say "present: $(prometheus --version 2>&1 | head -n 1)"
        return 0
    fi
    command -v apt-get >/dev/null 2>&1 || fail "apt-get not found; install prometheus and promtool by hand"
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || fail "need root or sudo to install prometheus"
        sudo=sudo
    fi
    local before
    before=$(running)
    say "apt: installing prometheus"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q
    # Without recommends: no node exporter service comes with it.
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus
    # The package starts its service; stop what this install started, only.
    local pid started=""
    for pid in $(running); do
        grep -qx "$pid" <<<"$before" || started="$started $pid"
    done
    if [ -n "$started" ]; then
        say "stopping the Debian service the install started (pid$started)"
        if [ -d /run/systemd/system ]; then
            $sudo systemctl stop prometheus || true
        else
            $sudo service prometheus stop >/dev/null 2>&1 || true
        fi
        for pid in $started; do
            if kill -0 "$pid" 2>/dev/null; then $sudo kill "$pid" || true; fi
        done
    fi
    command -v promtool >/dev/null 2>&1 || fail "promtool still missing after the install"
    say "installed: $(prometheus --version 2>&1 | head -n 1)"
}

# Every alert has runbook_url docs/RUNBOOK.md#<its name in lower case>.
check_anchors() {
    awk '
        /^[[:space:]]*- alert:/ { alert = $3; n++ }
        /^[[:space:]]*runbook_url:/ {
            want = "docs/RUNBOOK.md#" tolower(alert)
            if ($2 != want) { printf "%s: runbook_url %s, want %s\n", alert, $2, want; bad++ }
            seen++
        }
        END {
            if (seen != n) { printf "%d alerts, %d runbook_url lines\n", n, seen; bad++ }
            exit bad > 0
        }' "$DIR/rules/alerts.yml" || fail "runbook anchors in $DIR/rules/alerts.yml"
}

check() {
    command -v promtool >/dev/null 2>&1 || fail "promtool not found: run scripts/prometheus.sh ensure"
    promtool check config "$DIR/prometheus.yml"
    promtool check rules "$DIR"/rules/*.yml
    promtool test rules "$DIR"/tests/*.yml
    check_anchors
    say "config, rules, rule tests and runbook anchors: ok"
}

case "${1:-}" in
    ensure) ensure ;;
    check) check ;;
    *)
        printf 'usage: %s ensure|check\n' "$0" >&2
        exit 2
        ;;
esac
