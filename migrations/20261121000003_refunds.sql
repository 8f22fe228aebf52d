-- Refunds: units refunded while the sale was open go back on sale
-- (restocked); the others stay out. Settled conservation per sale:
-- available + pending + paid + refunded - restocked = total.
ALTER TABLE inventory ADD COLUMN restocked INT NOT NULL DEFAULT 0 AFTER refunded;
