#!/usr/bin/env bash
# The core subset of the integration suite (reserve, lifecycle, reconcile,
# refund, audit) on the two other Redis topologies: a Redis Cluster of 3
# primaries + 3 replicas, and a Sentinel set (1 primary, 1 replica, 3
# sentinels), each started here on free loopback ports and stopped by PID.
# The cluster runs it twice: as configured by default (WAIT 0) and with
# every write acknowledged by a replica (FLASHSALE_REDIS_WAIT_REPLICAS=1);
# the Sentinel set with WAIT 1. Then the failover drills, one at a time.
#
#   scripts/test-topologies.sh            all of the above
#   scripts/test-topologies.sh subset     the core subset only
#   scripts/test-topologies.sh drills     the drills only
set -euo pipefail
cd "$(dirname "$0")/.."

what=${1:-all}
CORE=(reserve:: lifecycle:: reconcile:: refund:: audit::)
work=$(mktemp -d "${TMPDIR:-/tmp}/flashsale-topologies.XXXXXX")
cleanup() {
    for d in "$work"/cluster "$work"/sentinel; do
        [ -d "$d" ] && scripts/redis-topology.sh stop "$d" >/dev/null 2>&1 || true
    done
    rm -rf "$work"
}
trap cleanup EXIT

cargo build --quiet --tests

if [ "$what" = all ] || [ "$what" = subset ]; then
    # Node timeout 5000 ms: two busy cores make shorter ones fail over by
    # themselves in the middle of a test.
    scripts/redis-topology.sh start cluster "$work/cluster" 5000
    scripts/redis-topology.sh start sentinel "$work/sentinel"
    cluster=$(sed -n 's/^FLASHSALE_REDIS_CLUSTER=//p' "$work/cluster/topology.env")
    sentinels=$(sed -n 's/^FLASHSALE_REDIS_SENTINELS=//p' "$work/sentinel/topology.env")
    master=$(sed -n 's/^FLASHSALE_REDIS_SENTINEL_MASTER=//p' "$work/sentinel/topology.env")

    echo "== core subset on Redis Cluster (3+3), WAIT 0"
    FLASHSALE_TEST_REDIS_CLUSTER=$cluster cargo test --test api -- "${CORE[@]}"
    echo "== core subset on Redis Cluster (3+3), WAIT 1"
    FLASHSALE_TEST_REDIS_CLUSTER=$cluster FLASHSALE_TEST_REDIS_WAIT_REPLICAS=1 \
        cargo test --test api -- "${CORE[@]}"
    echo "== core subset on Redis Sentinel (1 primary, 1 replica, 3 sentinels), WAIT 1"
    FLASHSALE_TEST_REDIS_SENTINELS=$sentinels FLASHSALE_TEST_REDIS_SENTINEL_MASTER=$master \
        FLASHSALE_TEST_REDIS_WAIT_REPLICAS=1 cargo test --test api -- "${CORE[@]}"
fi

if [ "$what" = all ] || [ "$what" = drills ]; then
    # Each drill starts its own topology and kills nodes: one at a time.
    echo "== failover drills"
    cargo test --test api -- --ignored --nocapture --test-threads=1 topology:: failover::
fi
