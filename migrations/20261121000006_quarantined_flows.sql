-- Flow records the reconciler refused: a change that would move an order
-- backwards (paid -> closed) or rewrite what never changes (buyer, units,
-- amount, a payment id once set), an entry it cannot read at all, or one
-- MySQL refuses for a reason retrying cannot cure. Each is kept here as it
-- was received, with the reason, instead of being applied; the sale's later
-- records go on. Nothing repairs them automatically: the audit lists them
-- for a person.
CREATE TABLE IF NOT EXISTS quarantined_flows (
    id             BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    flow_id        VARCHAR(64)     NOT NULL, -- "<sale_id>-<stream entry id>"
    sale_id        BIGINT UNSIGNED NOT NULL,
    seq            BIGINT UNSIGNED NULL,     -- the order's seq, when the record names one
    event          VARCHAR(32)     NOT NULL, -- as received (may be unknown)
    record         TEXT            NOT NULL, -- the record's fields as received, JSON
    reason         VARCHAR(1024)   NOT NULL,
    quarantined_at DATETIME(3)     NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    PRIMARY KEY (id),
    UNIQUE KEY uq_quarantined_flow (flow_id),
    KEY idx_quarantined_sale (sale_id, id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
