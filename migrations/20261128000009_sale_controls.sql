-- Sale controls (POST /api/v1/sales/{id}/pause|resume|end): MySQL keeps
-- whether a sale is paused, so a sale rebuilt from MySQL after Redis lost
-- it stays paused, and when an admin ended it early (end_at then holds that
-- time, the sale's real end).
ALTER TABLE sales ADD COLUMN paused_at DATETIME(3) NULL AFTER end_at;
ALTER TABLE sales ADD COLUMN ended_early_at DATETIME(3) NULL AFTER paused_at;
