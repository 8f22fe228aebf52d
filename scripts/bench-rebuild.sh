#!/usr/bin/env bash
# Rebuild benchmark (not a test): how long the guard's rebuild takes to put
# a sale of 100,000 orders (30% paid, 1,000 cancelled) back into Redis from
# MySQL after Redis lost all its keys, against the reconciler carrying the
# same orders' flow records into MySQL in the same run; the rebuilt sale is
# checked against MySQL and against Redis before the loss. Uses the local
# Redis and MariaDB under its own key prefix and database, removed
# afterwards. Extra arguments go to the benchmark (see --help), e.g.
#   scripts/bench-rebuild.sh --orders 20000
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
echo "machine: $(nproc) cores, $(redis-server --version | cut -d' ' -f3), $(mariadb --version | grep -o 'Distrib [^,]*'), load average $(cut -d' ' -f1-3 /proc/loadavg)"
cargo run --quiet --release --example bench_rebuild -- "$@"
