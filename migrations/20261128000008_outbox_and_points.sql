-- Downstream events. The reconciler writes one outbox row per business event
-- in the transaction that applies the change (a transactional outbox); the
-- relay publishes a sale's rows in id order to RabbitMQ and marks them sent
-- after the broker's confirm; sent rows are purged after a retention period.

CREATE TABLE IF NOT EXISTS outbox (
    id           BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    event_id     CHAR(36)        NOT NULL, -- derived from what happened: the same change, the same id
    sale_id      BIGINT UNSIGNED NOT NULL,
    order_seq    BIGINT UNSIGNED NULL,     -- NULL for sale events (sale.sold_out)
    event_type   VARCHAR(32)     NOT NULL, -- the routing key: order.paid, sale.sold_out, ...
    body         TEXT            NOT NULL, -- the JSON published (API.md "Events")
    occurred_at  DATETIME(3)     NOT NULL, -- by Redis's clock
    created_at   DATETIME(3)     NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    sent_at      DATETIME(3)     NULL,     -- the broker confirmed it
    PRIMARY KEY (id),
    UNIQUE KEY uq_outbox_event (event_id),
    KEY idx_outbox_unsent (sent_at, sale_id, id),
    KEY idx_outbox_order (sale_id, order_seq, event_type)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

-- One row per sale with outbox rows: a relay locks it (FOR UPDATE SKIP LOCKED)
-- while it publishes that sale's rows, so one sale's events leave in order and
-- never from two relays side by side.
CREATE TABLE IF NOT EXISTS outbox_relay_claims (
    sale_id      BIGINT UNSIGNED NOT NULL,
    published    BIGINT UNSIGNED NOT NULL DEFAULT 0,
    updated_at   DATETIME(3)     NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),
    PRIMARY KEY (sale_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

-- Payments that came after their order's deadline (answered 409
-- order_expired): the gateway must refund them (event payment.late).
CREATE TABLE IF NOT EXISTS late_payments (
    sale_id      BIGINT UNSIGNED NOT NULL,
    seq          BIGINT UNSIGNED NOT NULL,
    payment_id   VARCHAR(128)    NOT NULL,
    amount_cents BIGINT          NOT NULL,
    received_at  DATETIME(3)     NOT NULL, -- by Redis's clock
    recorded_at  DATETIME(3)     NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    PRIMARY KEY (sale_id, seq, payment_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

-- The loyalty-points consumer's ledger: one entry per event id (a redelivered
-- event finds its entry and changes nothing), and each buyer's balance,
-- updated in the same transaction.
CREATE TABLE IF NOT EXISTS points_entries (
    id           BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    event_id     CHAR(36)        NOT NULL,
    user_id      BIGINT UNSIGNED NOT NULL,
    order_id     VARCHAR(64)     NOT NULL,
    points       BIGINT          NOT NULL, -- negative for a refund
    reason       VARCHAR(32)     NOT NULL, -- order.paid | order.refunded
    occurred_at  DATETIME(3)     NOT NULL, -- the event's time
    recorded_at  DATETIME(3)     NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    PRIMARY KEY (id),
    UNIQUE KEY uq_points_event (event_id),
    KEY idx_points_user (user_id, id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

CREATE TABLE IF NOT EXISTS points_balances (
    user_id      BIGINT UNSIGNED NOT NULL,
    balance      BIGINT          NOT NULL DEFAULT 0,
    updated_at   DATETIME(3)     NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),
    PRIMARY KEY (user_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
