-- Sale retirement: a sale that has ended and whose every change is settled
-- here is marked retired. Workers walk only the sales that are not retired
-- (the live list, read through idx_sales_retired), and a retired sale is
-- answered from MySQL alone: its Redis keys expire after the retention.
ALTER TABLE sales ADD COLUMN retired_at DATETIME(3) NULL AFTER created_at;
CREATE INDEX idx_sales_retired ON sales (retired_at);
