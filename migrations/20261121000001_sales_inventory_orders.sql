-- Sales, their inventory counters, and orders: the system of record.
-- Redis holds the live copy; the reconciler brings every change here.

CREATE TABLE IF NOT EXISTS sales (
    id                  BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    sku                 VARCHAR(64)     NOT NULL,
    title               VARCHAR(200)    NOT NULL,
    price_cents         BIGINT          NOT NULL,
    stock_total         INT             NOT NULL,
    per_user_limit      INT             NOT NULL,
    payment_window_secs INT             NOT NULL,
    start_at            DATETIME(3)     NOT NULL,
    end_at              DATETIME(3)     NOT NULL,
    created_at          DATETIME(3)     NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    PRIMARY KEY (id),
    KEY idx_sales_end_at (end_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

-- One row per sale: units by where they stand. available + pending + paid
-- (+ refunded units that were not restocked) = total, once settled.
CREATE TABLE IF NOT EXISTS inventory (
    sale_id    BIGINT UNSIGNED NOT NULL,
    total      INT             NOT NULL,
    available  INT             NOT NULL,
    pending    INT             NOT NULL DEFAULT 0,
    paid       INT             NOT NULL DEFAULT 0,
    cancelled  INT             NOT NULL DEFAULT 0,
    closed     INT             NOT NULL DEFAULT 0,
    refunded   INT             NOT NULL DEFAULT 0,
    updated_at DATETIME(3)     NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),
    PRIMARY KEY (sale_id),
    CONSTRAINT fk_inventory_sale FOREIGN KEY (sale_id) REFERENCES sales (id) ON DELETE CASCADE,
    CONSTRAINT chk_inventory_not_negative CHECK (available >= 0 AND pending >= 0 AND paid >= 0)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

-- An order's id is "<sale_id>-<seq>".
CREATE TABLE IF NOT EXISTS orders (
    sale_id          BIGINT UNSIGNED NOT NULL,
    seq              BIGINT UNSIGNED NOT NULL,
    user_id          BIGINT UNSIGNED NOT NULL,
    qty              INT             NOT NULL,
    amount_cents     BIGINT          NOT NULL,
    status           VARCHAR(16)     NOT NULL,
    created_at       DATETIME(3)     NOT NULL,
    payment_deadline DATETIME(3)     NOT NULL,
    paid_at          DATETIME(3)     NULL,
    closed_at        DATETIME(3)     NULL,
    refunded_at      DATETIME(3)     NULL,
    payment_id       VARCHAR(128)    NULL,
    PRIMARY KEY (sale_id, seq),
    KEY idx_orders_status_deadline (status, payment_deadline),
    KEY idx_orders_sale_user (sale_id, user_id),
    CONSTRAINT fk_orders_sale FOREIGN KEY (sale_id) REFERENCES sales (id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
