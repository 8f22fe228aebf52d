//! Queries of the safety-net sweep (see `workers::sweep`).

use std::time::Duration;

use sqlx::MySqlPool;

use crate::domain::{OrderId, SaleId};

/// A pending order as MySQL holds it.
#[derive(Debug, Clone)]
pub struct PendingRow {
    /// The order.
    pub id: OrderId,
    /// Its units.
    pub qty: i32,
}

/// Pending orders more than `grace` past their deadline, oldest first
/// (served by the `(status, payment_deadline)` index).
pub async fn overdue_pending(
    pool: &MySqlPool,
    grace: Duration,
    limit: usize,
) -> anyhow::Result<Vec<PendingRow>> {
    let rows: Vec<(u64, u64, i32)> = sqlx::query_as(
        "SELECT sale_id, seq, qty FROM orders \
         WHERE status = 'pending' \
           AND payment_deadline < UTC_TIMESTAMP(3) - INTERVAL ? MICROSECOND \
         ORDER BY payment_deadline LIMIT ?",
    )
    .bind(grace.as_micros() as u64)
    .bind(limit as u64)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|(sale, seq, qty)| {
            Ok(PendingRow {
                id: OrderId::new(SaleId::new(sale)?, seq),
                qty,
            })
        })
        .collect()
}

/// Closes one pending order in MySQL, returns its units to the sale's
/// inventory and logs the correction, in one transaction. False when the
/// order was no longer pending (nothing changed).
pub async fn close_lost_order(pool: &MySqlPool, row: &PendingRow) -> anyhow::Result<bool> {
    let mut tx = pool.begin().await?;
    let sale = row.id.sale().get();
    let closed = sqlx::query(
        "UPDATE orders SET status = 'closed', closed_at = UTC_TIMESTAMP(3) \
         WHERE sale_id = ? AND seq = ? AND status = 'pending'",
    )
    .bind(sale)
    .bind(row.id.seq())
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if closed == 0 {
        tx.rollback().await?;
        return Ok(false);
    }
    sqlx::query(
        "UPDATE inventory SET pending = pending - ?, available = available + ?, \
         closed = closed + ? WHERE sale_id = ?",
    )
    .bind(row.qty)
    .bind(row.qty)
    .bind(row.qty)
    .bind(sale)
    .execute(&mut *tx)
    .await?;
    sqlx::query("INSERT INTO sweep_corrections (sale_id, seq, action, detail) VALUES (?, ?, ?, ?)")
        .bind(sale)
        .bind(row.id.seq())
        .bind("closed")
        .bind("pending in MySQL past its deadline and unknown to Redis")
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(true)
}
