#!/usr/bin/env bash
# The quick start's second command: make sure Redis and MariaDB answer
# (installing and starting them when missing), then run the whole test
# suite against them. Each test uses its own database and Redis key prefix.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/services.sh
cargo test --all-targets "$@"
