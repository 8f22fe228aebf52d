-- Every repair the audit applied (`flashsale audit --repair --yes`): what it
-- found, what it changed, and which side it took as the truth.
CREATE TABLE IF NOT EXISTS repair_log (
    id         BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    sale_id    BIGINT UNSIGNED NOT NULL,
    order_seq  BIGINT UNSIGNED NULL,
    finding    VARCHAR(48)     NOT NULL,
    fix        VARCHAR(255)    NOT NULL,
    truth      VARCHAR(16)     NOT NULL,
    detail     VARCHAR(1024)   NOT NULL,
    applied_at DATETIME(3)     NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    PRIMARY KEY (id),
    KEY idx_repair_log_sale (sale_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
