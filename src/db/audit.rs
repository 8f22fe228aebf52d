//! The audit's MySQL side: consistent reads of a sale's record, paged so
//! that a sale of any size is audited in bounded memory, and the repairs
//! that take Redis's orders as the truth.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::{MySql, MySqlPool, Transaction};

use crate::domain::{OrderId, SaleId, UserId};
use crate::engine::{FlowId, Order, OrderStatus};

/// Unit counters of a sale, in Redis's or MySQL's names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    /// Units put on sale.
    pub total: i64,
    /// Units on sale now.
    pub available: i64,
    /// Units in pending orders.
    pub pending: i64,
    /// Units in paid (and refund_pending) orders.
    pub paid: i64,
    /// Units of cancelled orders.
    pub cancelled: i64,
    /// Units of closed orders.
    pub closed: i64,
    /// Units refunded.
    pub refunded: i64,
    /// Refunded units that went back on sale.
    pub restocked: i64,
}

impl Counters {
    /// available + pending + paid + refunded - restocked, which must be the total.
    pub fn accounted(&self) -> i64 {
        self.available + self.pending + self.paid + self.refunded - self.restocked
    }

    /// These counters moved by `d` (the total stays).
    pub fn plus(&self, d: &crate::db::ledger::Deltas) -> Self {
        Self {
            total: self.total,
            available: self.available + d.available,
            pending: self.pending + d.pending,
            paid: self.paid + d.paid,
            cancelled: self.cancelled + d.cancelled,
            closed: self.closed + d.closed,
            refunded: self.refunded + d.refunded,
            restocked: self.restocked + d.restocked,
        }
    }

    /// The counters' names and values, in a fixed order.
    pub fn fields(&self) -> [(&'static str, i64); 8] {
        [
            ("total", self.total),
            ("available", self.available),
            ("pending", self.pending),
            ("paid", self.paid),
            ("cancelled", self.cancelled),
            ("closed", self.closed),
            ("refunded", self.refunded),
            ("restocked", self.restocked),
        ]
    }

    /// Adds one order's units to the sums by status (`end_ms` decides
    /// whether a refund restocked); `available` is derived from the total.
    pub fn count_order(&mut self, o: &Order, end_ms: i64) {
        let q = i64::from(o.qty);
        match o.status {
            OrderStatus::Pending => self.pending += q,
            OrderStatus::Paid | OrderStatus::RefundPending => self.paid += q,
            OrderStatus::Cancelled => self.cancelled += q,
            OrderStatus::Closed => self.closed += q,
            OrderStatus::Refunded => {
                self.refunded += q;
                if o.refunded_ms.is_some_and(|r| r < end_ms) {
                    self.restocked += q;
                }
            }
        }
        self.available = self.total - self.pending - self.paid - self.refunded + self.restocked;
    }
}

fn ms(t: Option<DateTime<Utc>>) -> Option<i64> {
    t.map(|t| t.timestamp_millis())
}

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

/// The sale's inventory row and end time (None when MySQL lacks the sale).
pub async fn inventory(
    tx: &mut Transaction<'_, MySql>,
    sale: SaleId,
) -> sqlx::Result<Option<(Counters, i64)>> {
    #[allow(clippy::type_complexity)]
    let row: Option<(i32, i32, i32, i32, i32, i32, i32, i32, DateTime<Utc>)> = sqlx::query_as(
        "SELECT i.total, i.available, i.pending, i.paid, i.cancelled, i.closed, i.refunded, \
         i.restocked, s.end_at FROM inventory i JOIN sales s ON s.id = i.sale_id \
         WHERE i.sale_id = ?",
    )
    .bind(sale.get())
    .fetch_optional(&mut **tx)
    .await?;
    Ok(row.map(|r| {
        (
            Counters {
                total: r.0.into(),
                available: r.1.into(),
                pending: r.2.into(),
                paid: r.3.into(),
                cancelled: r.4.into(),
                closed: r.5.into(),
                refunded: r.6.into(),
                restocked: r.7.into(),
            },
            r.8.timestamp_millis(),
        )
    }))
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
        match status.as_str() {
            "pending" => c.pending += units,
            "paid" | "refund_pending" => c.paid += units,
            "cancelled" => c.cancelled += units,
            "closed" => c.closed += units,
            "refunded" => {
                c.refunded += units;
                c.restocked += restocked;
            }
            _ => {}
        }
    }
    c.available = total - c.pending - c.paid - c.refunded + c.restocked;
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
    #[allow(clippy::type_complexity)]
    let rows: Vec<(
        u64,
        u64,
        i32,
        i64,
        String,
        DateTime<Utc>,
        DateTime<Utc>,
        Option<DateTime<Utc>>,
        Option<DateTime<Utc>>,
        Option<DateTime<Utc>>,
        Option<String>,
    )> = sqlx::query_as(
        "SELECT seq, user_id, qty, amount_cents, status, created_at, payment_deadline, \
         paid_at, closed_at, refunded_at, payment_id FROM orders \
         WHERE sale_id = ? AND seq BETWEEN ? AND ?",
    )
    .bind(sale.get())
    .bind(from)
    .bind(to)
    .fetch_all(pool)
    .await?;
    let mut out = HashMap::with_capacity(rows.len());
    for r in rows {
        let status = OrderStatus::parse(&r.4)
            .ok_or_else(|| anyhow::anyhow!("order {sale}-{}: unknown status {:?}", r.0, r.4))?;
        out.insert(
            r.0,
            Order {
                id: OrderId::new(sale, r.0),
                status,
                user: UserId::new(r.1)?,
                qty: r.2.max(0) as u32,
                amount_cents: r.3,
                created_ms: r.5.timestamp_millis(),
                deadline_ms: r.6.timestamp_millis(),
                paid_ms: ms(r.7),
                closed_ms: ms(r.8),
                refunded_ms: ms(r.9),
                last_flow: String::new(),
                payment_id: r.10,
            },
        );
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
    Ok(())
}

/// Sets the inventory row to what the sale's MySQL orders add up to.
pub async fn recompute_inventory(
    tx: &mut Transaction<'_, MySql>,
    sale: SaleId,
) -> anyhow::Result<()> {
    let (inv, _) = inventory(tx, sale)
        .await?
        .ok_or_else(|| anyhow::anyhow!("MySQL has no sale {sale}"))?;
    let c = order_sums(tx, sale, inv.total).await?;
    sqlx::query(
        "UPDATE inventory SET available = ?, pending = ?, paid = ?, cancelled = ?, closed = ?, \
         refunded = ?, restocked = ? WHERE sale_id = ?",
    )
    .bind(c.available)
    .bind(c.pending)
    .bind(c.paid)
    .bind(c.cancelled)
    .bind(c.closed)
    .bind(c.refunded)
    .bind(c.restocked)
    .bind(sale.get())
    .execute(&mut **tx)
    .await?;
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
