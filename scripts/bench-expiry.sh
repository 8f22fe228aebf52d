#!/usr/bin/env bash
# Expiry benchmark (not a test): drain rate of 1,000,000 due orders by the
# expiry workers against the raw rate of the same Lua claim script driven by
# a bare client, and lateness under a steady stream of expiries. Uses the
# local Redis (REDIS_URL) under its own key prefix. Extra arguments go to the
# benchmark (see --help), for example: scripts/bench-expiry.sh --orders 200000
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh redis
echo "machine: $(nproc) cores, $(redis-server --version | cut -d' ' -f3)"
cargo run --quiet --release --example bench_expiry -- "$@"
