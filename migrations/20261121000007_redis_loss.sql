-- What it takes to notice that Redis lost or went back on a sale, and to
-- rebuild the sale from here.
--
-- `sales.redis_token`: a random identity per sale, written into the sale's
-- Redis hash. Keys under the same prefix and sale id that carry another
-- token belong to another database (or an earlier one) and are never
-- adopted.
ALTER TABLE sales ADD COLUMN redis_token CHAR(16) NULL AFTER retired_at;
UPDATE sales SET redis_token = SUBSTRING(SHA2(CONCAT(id, '-', UUID()), 256), 1, 16)
    WHERE redis_token IS NULL;
ALTER TABLE sales MODIFY redis_token CHAR(16) NOT NULL;

-- The number of the last flow record applied (records of a sale are
-- numbered 1, 2, 3, ... in Redis): a record numbered at or below it comes
-- from a Redis that went back in time, whatever its stream id says.
ALTER TABLE reconcile_cursors ADD COLUMN last_n BIGINT UNSIGNED NOT NULL DEFAULT 0 AFTER last_seq;

-- The key an order was made under: the buyer's Idempotency-Key, or the
-- retry key ("rk-...") of the request that made it. A rebuilt sale answers
-- a retried key with the same order.
ALTER TABLE orders ADD COLUMN idem_key VARCHAR(80) NULL AFTER payment_id;

-- Orders acknowledged to a buyer that reached neither MySQL nor the Redis
-- that survived a loss (reason `missing`: the id is never given out again),
-- or that a Redis gone back in time gave out under an id MySQL already
-- held for another order (reason `id_reused`: MySQL's order stands). An
-- operator counts the buyers to contact here. Written by the rebuild.
CREATE TABLE IF NOT EXISTS lost_orders (
    sale_id    BIGINT UNSIGNED NOT NULL,
    seq        BIGINT UNSIGNED NOT NULL,
    reason     VARCHAR(16)     NOT NULL,
    detail     VARCHAR(255)    NOT NULL DEFAULT '',
    noticed_at DATETIME(3)     NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    PRIMARY KEY (sale_id, seq),
    CONSTRAINT fk_lost_orders_sale FOREIGN KEY (sale_id) REFERENCES sales (id) ON DELETE CASCADE
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
