#!/usr/bin/env bash
# Audit benchmark (not a test): time and peak memory of `flashsale audit` on
# settled sales of 100,000 and 1,000,000 orders (every third paid), so the
# two sizes show that memory stays bounded. Uses its own database and Redis
# key prefix on the local services and removes them afterwards.
# Usage: scripts/bench-audit.sh [orders...]   (default: 100000 1000000)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh >/dev/null
cargo build --quiet --release --bin flashsale --example seed_sale
sizes=("$@"); [ ${#sizes[@]} -gt 0 ] || sizes=(100000 1000000)
echo "machine: $(nproc) cores, $(redis-server --version | cut -d' ' -f3), $(mariadb --version | grep -o 'Distrib [^,]*')"
echo
echo "| orders | audit wall time | audit peak RSS | verdict |"
echo "| ---: | ---: | ---: | --- |"
for n in "${sizes[@]}"; do
    tag="fsbench_audit_$$_$n"
    export DATABASE_URL="mysql://root@127.0.0.1:3306/$tag" FLASHSALE_KEY_PREFIX="$tag"
    export FLASHSALE_FLOW_BACKLOG_LIMIT=100000000  # the seeding runs ahead of the reconciler
    sale=$(target/release/examples/seed_sale --orders "$n" 2>/tmp/seed_sale.log) || { cat /tmp/seed_sale.log >&2; exit 2; }
    stats=$(mktemp)
    set +e
    /usr/bin/time -f '%e %M' -o "$stats" target/release/flashsale audit --sale "$sale" > /dev/null
    code=$?
    set -e
    read -r secs kb < "$stats"
    verdict=$([ "$code" = 0 ] && echo clean || echo "exit $code")
    echo "| $n | ${secs} s | $((kb / 1024)) MB | $verdict |"
    rm -f "$stats"
    redis-cli --scan --pattern "$tag:*" | xargs -r -n 500 redis-cli del > /dev/null
    mariadb -h 127.0.0.1 -uroot -e "DROP DATABASE \`$tag\`"
done
