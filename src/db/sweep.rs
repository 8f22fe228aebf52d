//! Queries of the safety-net sweep (see `workers::sweep`).

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::MySqlPool;

use super::inventory;
use crate::domain::{OrderId, SaleId};
use crate::engine::FlowEvent;
use crate::units::Units;

/// A pending order as MySQL holds it.
#[derive(Debug, Clone)]
pub struct PendingRow {
    /// The order.
    pub id: OrderId,
    /// Its units.
    pub qty: i32,
    /// Its payment deadline.
    pub deadline: DateTime<Utc>,
}

/// Where a sweep left off: the last order it looked at.
pub type SweepCursor = (DateTime<Utc>, u64, u64);

/// Pending orders more than `grace` past their deadline, oldest first,
/// after `after` (served by the `(status, payment_deadline)` index). Paging
/// by cursor means rows that stay pending for a while (their change is on
/// its way through the flow stream) cannot hide the ones behind them.
pub async fn overdue_pending(
    pool: &MySqlPool,
    grace: Duration,
    after: Option<SweepCursor>,
    limit: usize,
) -> anyhow::Result<Vec<PendingRow>> {
    let (deadline, sale, seq) = after.unwrap_or((DateTime::<Utc>::UNIX_EPOCH, 0, 0));
    let rows: Vec<(u64, u64, i32, DateTime<Utc>)> = sqlx::query_as(
        "SELECT sale_id, seq, qty, payment_deadline FROM orders \
         WHERE status = 'pending' \
           AND payment_deadline < UTC_TIMESTAMP(3) - INTERVAL ? MICROSECOND \
           AND (payment_deadline > ? OR (payment_deadline = ? \
                AND (sale_id > ? OR (sale_id = ? AND seq > ?)))) \
         ORDER BY payment_deadline, sale_id, seq LIMIT ?",
    )
    .bind(grace.as_micros() as u64)
    .bind(deadline)
    .bind(deadline)
    .bind(sale)
    .bind(sale)
    .bind(seq)
    .bind(limit as u64)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|(sale, seq, qty, deadline)| {
            Ok(PendingRow {
                id: OrderId::new(SaleId::new(sale)?, seq),
                qty,
                deadline,
            })
        })
        .collect()
}

/// A transaction holding `sale`'s cursor row: a rebuild of the sale (which
/// holds it while it reads MySQL and writes Redis) finishes first, and
/// none starts until [`close_lost_order`] commits.
pub async fn lock_sale(
    pool: &MySqlPool,
    sale: crate::domain::SaleId,
) -> anyhow::Result<sqlx::Transaction<'static, sqlx::MySql>> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT sale_id FROM reconcile_cursors WHERE sale_id = ? FOR UPDATE")
        .bind(sale.get())
        .fetch_optional(&mut *tx)
        .await?;
    Ok(tx)
}

/// Closes one pending order in MySQL, returns its units to the sale's
/// inventory and logs the correction, in `tx` (from [`lock_sale`]), and
/// commits. False when the order was no longer pending (nothing changed).
pub async fn close_lost_order(
    mut tx: sqlx::Transaction<'static, sqlx::MySql>,
    row: &PendingRow,
) -> anyhow::Result<bool> {
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
    let close = Units::moved_by(FlowEvent::Close, i64::from(row.qty), false);
    inventory::add(&mut tx, row.id.sale(), &close).await?;
    sqlx::query("INSERT INTO sweep_corrections (sale_id, seq, action, detail) VALUES (?, ?, ?, ?)")
        .bind(sale)
        .bind(row.id.seq())
        .bind("closed")
        .bind("pending in MySQL past its deadline and unknown to Redis")
        .execute(&mut *tx)
        .await?;
    super::outbox::write_order_history(&mut tx, row.id).await?;
    tx.commit().await?;
    Ok(true)
}
