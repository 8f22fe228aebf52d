//! The reconciler's side of MySQL: a per-sale cursor locked for the length
//! of one transaction, and the batch of flow records applied under it.
//!
//! Exactly-once in effect comes from moving the cursor in the same
//! transaction as the rows: a batch is either committed with its cursor or
//! not at all, and records at or before the cursor are never read again.
//! `SKIP LOCKED` lets any number of reconcilers share the sales without
//! waiting on each other; one sale's records are applied by one at a time,
//! in stream order.

use chrono::{DateTime, Utc};
use sqlx::{MySql, MySqlPool, QueryBuilder, Transaction};

use crate::domain::SaleId;
use crate::engine::{FlowEvent, FlowId, FlowRecord, Order};

fn at(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

/// Creates `sale`'s cursor row if it is missing. Called outside the batch
/// transaction: inserting under a locking read of a missing row would wait
/// on the transaction's own gap lock.
pub async fn ensure_cursor(pool: &MySqlPool, sale: SaleId) -> sqlx::Result<()> {
    let exists: Option<(u64,)> =
        sqlx::query_as("SELECT sale_id FROM reconcile_cursors WHERE sale_id = ?")
            .bind(sale.get())
            .fetch_optional(pool)
            .await?;
    if exists.is_none() {
        // Not INSERT IGNORE: that would turn a missing sale (foreign key)
        // into a warning and leave no cursor behind.
        sqlx::query(
            "INSERT INTO reconcile_cursors (sale_id) VALUES (?) \
             ON DUPLICATE KEY UPDATE sale_id = sale_id",
        )
        .bind(sale.get())
        .execute(pool)
        .await?;
    }
    Ok(())
}

/// Locks `sale`'s cursor (see [`ensure_cursor`]) for this transaction and
/// returns it; `None` when another reconciler holds it (then this one moves
/// on to other sales).
pub async fn lock_cursor(
    tx: &mut Transaction<'_, MySql>,
    sale: SaleId,
) -> sqlx::Result<Option<FlowId>> {
    let row: Option<(u64, u64)> = sqlx::query_as(
        "SELECT last_ms, last_seq FROM reconcile_cursors \
         WHERE sale_id = ? FOR UPDATE SKIP LOCKED",
    )
    .bind(sale.get())
    .fetch_optional(&mut **tx)
    .await?;
    Ok(row.map(|(ms, seq)| FlowId { ms, seq }))
}

/// Units moved by one change, as inventory deltas.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Deltas {
    /// Change of available units.
    pub available: i64,
    /// Change of units in pending orders.
    pub pending: i64,
    /// Change of units in paid orders.
    pub paid: i64,
    /// Change of cancelled units.
    pub cancelled: i64,
    /// Change of closed units.
    pub closed: i64,
    /// Change of refunded units.
    pub refunded: i64,
    /// Change of refunded units put back on sale.
    pub restocked: i64,
}

impl Deltas {
    /// What `record` does to the sale's inventory.
    pub fn of(record: &FlowRecord) -> Self {
        let q = i64::from(record.order.qty);
        let mut d = Self::default();
        match record.event {
            FlowEvent::Reserve => {
                d.available = -q;
                d.pending = q;
            }
            FlowEvent::Pay => {
                d.pending = -q;
                d.paid = q;
            }
            FlowEvent::Cancel => {
                d.pending = -q;
                d.available = q;
                d.cancelled = q;
            }
            FlowEvent::Close => {
                d.pending = -q;
                d.available = q;
                d.closed = q;
            }
            FlowEvent::RefundRequest => {}
            FlowEvent::Refund => {
                d.paid = -q;
                d.refunded = q;
                if record.restocked {
                    d.available = q;
                    d.restocked = q;
                }
            }
        }
        d
    }

    /// Adds another change's deltas.
    pub fn add(&mut self, o: Self) {
        self.available += o.available;
        self.pending += o.pending;
        self.paid += o.paid;
        self.cancelled += o.cancelled;
        self.closed += o.closed;
        self.refunded += o.refunded;
        self.restocked += o.restocked;
    }
}

fn flow_id(sale: SaleId, id: FlowId) -> String {
    format!("{sale}-{id}")
}

/// Applies `records` (oldest first, all after the locked cursor) and moves
/// the cursor to the last one, inside `tx`.
pub async fn apply(
    tx: &mut Transaction<'_, MySql>,
    sale: SaleId,
    records: &[FlowRecord],
) -> sqlx::Result<()> {
    let Some(last) = records.last() else {
        return Ok(());
    };

    let mut flows = QueryBuilder::<MySql>::new(
        "INSERT INTO stock_flows (flow_id, sale_id, seq, event, qty, status, event_at) ",
    );
    flows.push_values(records, |mut b, r| {
        b.push_bind(flow_id(sale, r.id))
            .push_bind(sale.get())
            .push_bind(r.order.id.seq())
            .push_bind(r.event.as_str())
            .push_bind(r.order.qty)
            .push_bind(r.order.status.as_str())
            .push_bind(at(r.id.ms as i64));
    });
    flows.build().execute(&mut **tx).await?;

    upsert_orders(tx, records.iter().map(|r| &r.order)).await?;

    let mut d = Deltas::default();
    for r in records {
        d.add(Deltas::of(r));
    }
    sqlx::query(
        "UPDATE inventory SET available = available + ?, pending = pending + ?, \
         paid = paid + ?, cancelled = cancelled + ?, closed = closed + ?, \
         refunded = refunded + ?, restocked = restocked + ? WHERE sale_id = ?",
    )
    .bind(d.available)
    .bind(d.pending)
    .bind(d.paid)
    .bind(d.cancelled)
    .bind(d.closed)
    .bind(d.refunded)
    .bind(d.restocked)
    .bind(sale.get())
    .execute(&mut **tx)
    .await?;

    sqlx::query(
        "UPDATE reconcile_cursors SET last_ms = ?, last_seq = ?, applied = applied + ? \
         WHERE sale_id = ?",
    )
    .bind(last.id.ms)
    .bind(last.id.seq)
    .bind(records.len() as u64)
    .bind(sale.get())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The status order: a row's status only ever moves to a later one.
const RANK: &str = "'pending','paid','cancelled','closed','refund_pending','refunded'";

/// Inserts orders, or moves existing rows forward to the given state.
async fn upsert_orders<'a>(
    tx: &mut Transaction<'_, MySql>,
    orders: impl Iterator<Item = &'a Order>,
) -> sqlx::Result<()> {
    let mut q = QueryBuilder::<MySql>::new(
        "INSERT INTO orders (sale_id, seq, user_id, qty, amount_cents, status, created_at, \
         payment_deadline, paid_at, closed_at, refunded_at, payment_id) ",
    );
    q.push_values(orders, |mut b, o| {
        b.push_bind(o.id.sale().get())
            .push_bind(o.id.seq())
            .push_bind(o.user.get())
            .push_bind(o.qty)
            .push_bind(o.amount_cents)
            .push_bind(o.status.as_str())
            .push_bind(at(o.created_ms))
            .push_bind(at(o.deadline_ms))
            .push_bind(o.paid_ms.map(at))
            .push_bind(o.closed_ms.map(at))
            .push_bind(o.refunded_ms.map(at))
            .push_bind(o.payment_id.clone());
    });
    // Assignments run left to right and see earlier ones, so `status` goes
    // last and every guard compares against the row's old status.
    let forward = format!("FIELD(VALUES(status), {RANK}) >= FIELD(status, {RANK})");
    q.push(format!(
        " ON DUPLICATE KEY UPDATE \
         paid_at = IF({forward}, VALUES(paid_at), paid_at), \
         closed_at = IF({forward}, VALUES(closed_at), closed_at), \
         refunded_at = IF({forward}, VALUES(refunded_at), refunded_at), \
         payment_id = IF({forward}, VALUES(payment_id), payment_id), \
         status = IF({forward}, VALUES(status), status)"
    ));
    q.build().execute(&mut **tx).await?;
    Ok(())
}
