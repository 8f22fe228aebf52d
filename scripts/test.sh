#!/usr/bin/env bash
# The quick start's second command: make sure Redis and MariaDB answer
# (installing and starting them when missing), then run the whole test
# suite against them. Each test uses its own database and Redis key prefix.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/services.sh
# Library, binaries and integration tests (examples are benchmarks, built
# by clippy; doc tests: none). The integration suite reports last.
cargo test --lib --bins --tests "$@"
