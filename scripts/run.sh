#!/usr/bin/env bash
# The quick start's first command: make sure Redis and MariaDB answer
# (installing and starting them when missing), build flashsale, put a sample
# sale on, and serve the API on http://127.0.0.1:8080 until Ctrl-C.
#
# Development secrets are used unless the FLASHSALE_* variables are set.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/services.sh

export FLASHSALE_JWT_SECRET="${FLASHSALE_JWT_SECRET:-dev-jwt-secret-change-me-32-bytes-min}"
export FLASHSALE_ADMIN_TOKEN="${FLASHSALE_ADMIN_TOKEN:-dev-admin-token-change-me-32-bytes-min}"
export FLASHSALE_PAYMENT_SECRET="${FLASHSALE_PAYMENT_SECRET:-dev-payment-secret-change-me-32-bytes}"

cargo build --release --bin flashsale
bin=target/release/flashsale

# A sample sale: 100 units, open now for an hour, one per buyer, 15 minutes to pay.
sale=$("$bin" sale create --sku SAMPLE-1 --title "Sample phone" --price-cents 19900 \
    --stock 100 --per-user-limit 1 --payment-window-secs 900)
echo "$sale" > target/sample-sale-id
cat <<MSG

Sample sale $sale is open (its id is also in target/sample-sale-id). Buy a unit:

  TOKEN=\$(FLASHSALE_JWT_SECRET=$FLASHSALE_JWT_SECRET $bin token --user 1)
  curl -s -X POST http://127.0.0.1:8080/api/v1/sales/$sale/orders -H "Authorization: Bearer \$TOKEN"

MSG
exec "$bin" serve
