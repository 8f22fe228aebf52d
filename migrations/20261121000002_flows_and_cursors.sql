-- What the reconciler needs: the flow rows it applied (one per change Redis
-- accepted, unique by flow id, kept for audit), a cursor per sale (the last
-- flow record applied, moved in the same transaction as the rows, which is
-- what makes re-delivery harmless), and the safety-net sweep's corrections.

CREATE TABLE IF NOT EXISTS stock_flows (
    flow_id    VARCHAR(64)     NOT NULL, -- "<sale_id>-<stream entry id>"
    sale_id    BIGINT UNSIGNED NOT NULL,
    seq        BIGINT UNSIGNED NOT NULL, -- the order's sequence in its sale
    event      VARCHAR(16)     NOT NULL, -- reserve | pay | cancel | close | refund_request | refund
    qty        INT             NOT NULL,
    status     VARCHAR(16)     NOT NULL, -- the order's status after the event
    event_at   DATETIME(3)     NOT NULL, -- by Redis's clock
    applied_at DATETIME(3)     NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    PRIMARY KEY (flow_id),
    KEY idx_stock_flows_order (sale_id, seq)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

CREATE TABLE IF NOT EXISTS reconcile_cursors (
    sale_id    BIGINT UNSIGNED NOT NULL,
    last_ms    BIGINT UNSIGNED NOT NULL DEFAULT 0,
    last_seq   BIGINT UNSIGNED NOT NULL DEFAULT 0,
    applied    BIGINT UNSIGNED NOT NULL DEFAULT 0,
    updated_at DATETIME(3)     NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),
    PRIMARY KEY (sale_id),
    CONSTRAINT fk_cursor_sale FOREIGN KEY (sale_id) REFERENCES sales (id) ON DELETE CASCADE
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

CREATE TABLE IF NOT EXISTS sweep_corrections (
    id          BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    sale_id     BIGINT UNSIGNED NOT NULL,
    seq         BIGINT UNSIGNED NOT NULL,
    action      VARCHAR(32)     NOT NULL,
    detail      VARCHAR(255)    NOT NULL,
    corrected_at DATETIME(3)    NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    PRIMARY KEY (id),
    KEY idx_sweep_order (sale_id, seq)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
