//! The audit's MySQL side: consistent reads of a sale's record, paged so
//! that a sale of any size is audited in bounded memory, and the repairs
//! that take Redis's orders as the truth.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::{MySql, MySqlPool, Transaction};

use super::inventory;
use crate::domain::SaleId;
use crate::engine::{FlowId, Order, OrderStatus};
use crate::units::Units;

/// A sale's stock counters at one moment (Redis's, MySQL's inventory, or
/// what its orders add up to).
pub type Counters = Units;

fn at(ms: Option<i64>) -> Option<DateTime<Utc>> {
    ms.and_then(DateTime::from_timestamp_millis)
}

/// Every sale MySQL holds.
pub async fn sale_ids(pool: &MySqlPool) -> sqlx::Result<Vec<u64>> {
    let rows: Vec<(u64,)> = sqlx::query_as("SELECT id FROM sales ORDER BY id")
        .fetch_all(pool)
        .await?;
    Ok(rows.into_iter().map(|r| r.0).collect())
}

/// Locks `sale`'s reconciler cursor, waiting for a running batch to end,
/// so the record cannot move while the audit reads it.
pub async fn lock_cursor(tx: &mut Transaction<'_, MySql>, sale: SaleId) -> sqlx::Result<FlowId> {
    let (ms, seq): (u64, u64) = sqlx::query_as(
        "SELECT last_ms, last_seq FROM reconcile_cursors WHERE sale_id = ? FOR UPDATE",
    )
    .bind(sale.get())
    .fetch_one(&mut **tx)
    .await?;
    Ok(FlowId { ms, seq })
}

/// The reconciler's cursor of `sale`, unlocked (None when it has none).
pub async fn cursor(pool: &MySqlPool, sale: SaleId) -> sqlx::Result<Option<FlowId>> {
    let row: Option<(u64, u64)> =
        sqlx::query_as("SELECT last_ms, last_seq FROM reconcile_cursors WHERE sale_id = ?")
            .bind(sale.get())
            .fetch_optional(pool)
            .await?;
    Ok(row.map(|(ms, seq)| FlowId { ms, seq }))
}

/// The inventory as the sale's MySQL orders add up (available derived).
pub async fn order_sums(
    tx: &mut Transaction<'_, MySql>,
    sale: SaleId,
    total: i64,
) -> sqlx::Result<Counters> {
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT o.status, CAST(SUM(o.qty) AS SIGNED), \
         CAST(SUM(CASE WHEN o.refunded_at < s.end_at THEN o.qty ELSE 0 END) AS SIGNED) \
         FROM orders o JOIN sales s ON s.id = o.sale_id WHERE o.sale_id = ? GROUP BY o.status",
    )
    .bind(sale.get())
    .fetch_all(&mut **tx)
    .await?;
    let mut c = Counters {
        total,
        ..Counters::default()
    };
    for (status, units, restocked) in rows {
        if let Some(status) = OrderStatus::parse(&status) {
            c.count(status, units, restocked);
        }
    }
    c.derive_available();
    Ok(c)
}

/// The highest order seq MySQL holds for `sale` (0 when none).
pub async fn max_seq(pool: &MySqlPool, sale: SaleId) -> sqlx::Result<u64> {
    let (m,): (u64,) = sqlx::query_as(
        "SELECT CAST(COALESCE(MAX(seq), 0) AS UNSIGNED) FROM orders WHERE sale_id = ?",
    )
    .bind(sale.get())
    .fetch_one(pool)
    .await?;
    Ok(m)
}

/// Orders of `sale` with seq in `from..=to`, by seq.
pub async fn orders_in(
    pool: &MySqlPool,
    sale: SaleId,
    from: u64,
    to: u64,
) -> anyhow::Result<HashMap<u64, Order>> {
    let rows: Vec<super::OrderRow> = sqlx::query_as(&format!(
        "SELECT {} FROM orders WHERE sale_id = ? AND seq BETWEEN ? AND ?",
        super::ORDER_COLUMNS
    ))
    .bind(sale.get())
    .bind(from)
    .bind(to)
    .fetch_all(pool)
    .await?;
    let mut out = HashMap::with_capacity(rows.len());
    for r in rows {
        let o = r.into_order(sale, String::new())?;
        out.insert(o.id.seq(), o);
    }
    Ok(out)
}

const HELD: &str = "status IN ('pending', 'paid', 'refund_pending')";

/// Units each of `users` holds by MySQL's orders.
pub async fn buyer_units_of(
    pool: &MySqlPool,
    sale: SaleId,
    users: &[u64],
) -> sqlx::Result<HashMap<u64, i64>> {
    if users.is_empty() {
        return Ok(HashMap::new());
    }
    let mut q = sqlx::QueryBuilder::<MySql>::new(format!(
        "SELECT user_id, CAST(SUM(qty) AS SIGNED) FROM orders WHERE {HELD} AND sale_id = "
    ));
    q.push_bind(sale.get()).push(" AND user_id IN (");
    let mut list = q.separated(", ");
    for u in users {
        list.push_bind(*u);
    }
    q.push(") GROUP BY user_id");
    let rows: Vec<(u64, i64)> = q.build_query_as().fetch_all(pool).await?;
    Ok(rows.into_iter().collect())
}

/// One page of buyers holding units by MySQL's orders, after `after`.
pub async fn buyer_units_page(
    pool: &MySqlPool,
    sale: SaleId,
    after: u64,
    limit: u64,
) -> sqlx::Result<Vec<(u64, i64)>> {
    sqlx::query_as(&format!(
        "SELECT user_id, CAST(SUM(qty) AS SIGNED) FROM orders \
         WHERE {HELD} AND sale_id = ? AND user_id > ? \
         GROUP BY user_id ORDER BY user_id LIMIT ?"
    ))
    .bind(sale.get())
    .bind(after)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Writes an order as Redis holds it, whatever MySQL held (a repair).
pub async fn force_order(tx: &mut Transaction<'_, MySql>, o: &Order) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO orders (sale_id, seq, user_id, qty, amount_cents, status, created_at, \
         payment_deadline, paid_at, closed_at, refunded_at, payment_id) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON DUPLICATE KEY UPDATE \
         user_id = VALUES(user_id), qty = VALUES(qty), amount_cents = VALUES(amount_cents), \
         status = VALUES(status), created_at = VALUES(created_at), \
         payment_deadline = VALUES(payment_deadline), paid_at = VALUES(paid_at), \
         closed_at = VALUES(closed_at), refunded_at = VALUES(refunded_at), \
         payment_id = VALUES(payment_id)",
    )
    .bind(o.id.sale().get())
    .bind(o.id.seq())
    .bind(o.user.get())
    .bind(o.qty)
    .bind(o.amount_cents)
    .bind(o.status.as_str())
    .bind(at(Some(o.created_ms)))
    .bind(at(Some(o.deadline_ms)))
    .bind(at(o.paid_ms))
    .bind(at(o.closed_ms))
    .bind(at(o.refunded_ms))
    .bind(&o.payment_id)
    .execute(&mut **tx)
    .await?;
    // What downstream owes for the state written (rows there already stay).
    let rows: Vec<super::outbox::NewRow> = crate::events::Event::history(o)
        .into_iter()
        .map(|event| super::outbox::NewRow {
            sale: o.id.sale(),
            order_seq: Some(o.id.seq()),
            event,
        })
        .collect();
    super::outbox::insert(tx, &rows).await?;
    Ok(())
}

/// Sets the inventory row to what the sale's MySQL orders add up to.
pub async fn recompute_inventory(
    tx: &mut Transaction<'_, MySql>,
    sale: SaleId,
) -> anyhow::Result<()> {
    let (inv, _) = inventory::read(tx, sale)
        .await?
        .ok_or_else(|| anyhow::anyhow!("MySQL has no sale {sale}"))?;
    let c = order_sums(tx, sale, inv.total).await?;
    inventory::set(tx, sale, &c).await?;
    Ok(())
}

/// Writes one applied repair to `repair_log`.
pub async fn log_repair(
    tx: &mut Transaction<'_, MySql>,
    sale: SaleId,
    order_seq: Option<u64>,
    finding: &str,
    fix: &str,
    truth: &str,
    detail: &str,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO repair_log (sale_id, order_seq, finding, fix, truth, detail) \
         VALUES (?, ?, ?, ?, ?, ?)",
    )
    .bind(sale.get())
    .bind(order_seq)
    .bind(finding)
    .bind(fix)
    .bind(truth)
    .bind(&detail[..detail.len().min(1000)])
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Orders of `sale` by status: (status, orders).
pub async fn orders_by_status(
    tx: &mut Transaction<'_, MySql>,
    sale: SaleId,
) -> sqlx::Result<Vec<(String, i64)>> {
    sqlx::query_as("SELECT status, COUNT(*) FROM orders WHERE sale_id = ? GROUP BY status")
        .bind(sale.get())
        .fetch_all(&mut **tx)
        .await
}

/// A paid or refunded order without the outbox row its state owes.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct MissingEvent {
    /// The order's seq.
    pub seq: u64,
    /// Its status in MySQL.
    pub status: String,
    /// The event type it lacks.
    pub event_type: String,
}

/// Up to `limit` orders of `sale` paid (or refunded) since `since` whose
/// `order.paid` (or `order.refunded`) outbox row is missing.
pub async fn orders_missing_events(
    pool: &MySqlPool,
    sale: SaleId,
    since: DateTime<Utc>,
    limit: u64,
) -> sqlx::Result<Vec<MissingEvent>> {
    sqlx::query_as(
        "SELECT o.seq, o.status, 'order.paid' AS event_type FROM orders o \
         WHERE o.sale_id = ? AND o.paid_at IS NOT NULL AND o.paid_at >= ? \
         AND NOT EXISTS (SELECT 1 FROM outbox x WHERE x.sale_id = o.sale_id \
           AND x.order_seq = o.seq AND x.event_type = 'order.paid') \
         UNION ALL \
         SELECT o.seq, o.status, 'order.refunded' FROM orders o \
         WHERE o.sale_id = ? AND o.status = 'refunded' AND o.refunded_at >= ? \
         AND NOT EXISTS (SELECT 1 FROM outbox x WHERE x.sale_id = o.sale_id \
           AND x.order_seq = o.seq AND x.event_type = 'order.refunded') \
         ORDER BY seq LIMIT ?",
    )
    .bind(sale.get())
    .bind(since)
    .bind(sale.get())
    .bind(since)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// `sale`'s outbox rows not yet sent: all of them, and those written
/// before `before`.
pub async fn unsent_events(
    pool: &MySqlPool,
    sale: SaleId,
    before: DateTime<Utc>,
) -> sqlx::Result<(u64, u64)> {
    let (all, late): (i64, Option<i64>) = sqlx::query_as(
        "SELECT COUNT(*), CAST(SUM(created_at < ?) AS SIGNED) FROM outbox \
         WHERE sent_at IS NULL AND sale_id = ?",
    )
    .bind(before)
    .bind(sale.get())
    .fetch_one(pool)
    .await?;
    Ok((all as u64, late.unwrap_or(0) as u64))
}
