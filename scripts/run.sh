#!/usr/bin/env bash
# The quick start's first command: make sure Redis, MariaDB and RabbitMQ
# answer (installing and starting them when missing), build flashsale, put a
# sample sale on, and serve the API on http://127.0.0.1:8080 until Ctrl-C,
# with the outbox relay and the points consumer on the local broker.
#
# Development secrets are used unless the FLASHSALE_* variables are set.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/services.sh

export FLASHSALE_JWT_SECRET="${FLASHSALE_JWT_SECRET:-dev-jwt-secret-change-me-32-bytes-min}"
export FLASHSALE_ADMIN_TOKEN="${FLASHSALE_ADMIN_TOKEN:-dev-admin-token-change-me-32-bytes-min}"
export FLASHSALE_PAYMENT_SECRET="${FLASHSALE_PAYMENT_SECRET:-dev-payment-secret-change-me-32-bytes}"
export FLASHSALE_AMQP_URL="${FLASHSALE_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
export FLASHSALE_ROLES="${FLASHSALE_ROLES:-http,expiry,reconciler,relay,points}"

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

Events go to the exchange flashsale.events; watch them with
  amqp-consume -u amqp://guest:guest@127.0.0.1:5672 -e flashsale.events -r '#' cat
and a buyer's points with
  curl -s http://127.0.0.1:8080/api/v1/users/me/points -H "Authorization: Bearer \$TOKEN"

MSG
exec "$bin" serve
