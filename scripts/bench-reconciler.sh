#!/usr/bin/env bash
# Reconciler benchmark (not a test): flow records persisted per second into
# the local MariaDB against the reserve path's rate in the same run, and the
# reconciler's lag while reservations run at full speed. Extra arguments go
# to the benchmark (see --help), e.g. scripts/bench-reconciler.sh --records 50000
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
echo "machine: $(nproc) cores, $(redis-server --version | cut -d' ' -f3), $(mariadb --version | grep -o 'Distrib [^,]*')"
cargo run --quiet --release --example bench_reconciler -- "$@"
