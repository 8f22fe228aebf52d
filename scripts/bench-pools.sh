#!/usr/bin/env bash
# Connection handling on the reserve path (not a test): redis-rs's
# multiplexed connection against deadpool-redis and bb8 pools, one run.
# Extra arguments go to the benchmark, e.g. --requests 100000 --concurrency 64
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh redis >/dev/null
cargo run --quiet --release --example bench_pools -- "$@"
