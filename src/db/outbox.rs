//! The transactional outbox: one row per downstream event, written in the
//! same MySQL transaction as the change it tells of (the reconciler's batch,
//! an audit repair), and published by the relay (`workers::relay`).
//!
//! Rows are unique by event id, and an event's id is derived from the change
//! (see [`crate::events`]), so writing the same change twice leaves one row.

use chrono::{DateTime, Utc};
use sqlx::{MySql, MySqlPool, QueryBuilder, Transaction};

use crate::domain::{OrderId, SaleId};
use crate::events::{Event, EventType};

/// One row to write: the event, and the order it is about (`None` for a
/// sale event).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRow {
    /// The sale.
    pub sale: SaleId,
    /// The order's seq within the sale, for order events.
    pub order_seq: Option<u64>,
    /// The event as it will be published.
    pub event: Event,
}

/// Writes `rows` in `tx`; a row whose event id is already there is skipped.
/// Returns the types of the rows written, for metrics (a chunk in which
/// some rows were skipped is left out).
pub async fn insert(
    tx: &mut Transaction<'_, MySql>,
    rows: &[NewRow],
) -> sqlx::Result<Vec<EventType>> {
    let mut written = Vec::new();
    // In chunks: 6 placeholders a row, MySQL allows 65,535 in a statement.
    for chunk in rows.chunks(2000) {
        let mut q = QueryBuilder::<MySql>::new(
            "INSERT IGNORE INTO outbox (event_id, sale_id, order_seq, event_type, body, occurred_at) ",
        );
        q.push_values(chunk, |mut b, r| {
            b.push_bind(&r.event.event_id)
                .push_bind(r.sale.get())
                .push_bind(r.order_seq)
                .push_bind(r.event.kind.as_str())
                .push_bind(r.event.to_json())
                .push_bind(r.event.occurred_at);
        });
        let done = q.build().execute(&mut **tx).await?;
        if done.rows_affected() == chunk.len() as u64 {
            written.extend(chunk.iter().map(|r| r.event.kind));
        } else if done.rows_affected() > 0 {
            // Some were there already (a change written again): which of
            // these rows are new is not worth a query; count them untyped.
            tracing::debug!(
                written = done.rows_affected(),
                of = chunk.len(),
                "some outbox rows were there already"
            );
        }
    }
    Ok(written)
}

/// Writes the outbox rows order `id` owes for the state MySQL holds it in
/// within `tx` (see [`Event::history`]): for changes made outside the
/// reconciler. Rows already there are kept.
pub async fn write_order_history(
    tx: &mut Transaction<'_, MySql>,
    id: OrderId,
) -> anyhow::Result<Vec<EventType>> {
    let row: Option<super::OrderRow> = sqlx::query_as(&format!(
        "SELECT {} FROM orders WHERE sale_id = ? AND seq = ?",
        super::ORDER_COLUMNS
    ))
    .bind(id.sale().get())
    .bind(id.seq())
    .fetch_optional(&mut **tx)
    .await?;
    let Some(order) = row
        .map(|r| r.into_order(id.sale(), String::new()))
        .transpose()?
    else {
        return Ok(Vec::new());
    };
    let rows: Vec<NewRow> = Event::history(&order)
        .into_iter()
        .map(|event| NewRow {
            sale: id.sale(),
            order_seq: Some(id.seq()),
            event,
        })
        .collect();
    Ok(insert(tx, &rows).await?)
}

// The relay's side (`workers::relay`): the sales with unsent rows, a claim
// row per sale locked for one transaction (`SKIP LOCKED`, so any number of
// relays share the sales and one sale's rows leave from one relay at a
// time, in id order), the rows of one batch, their mark once the broker
// confirmed them, and the upkeep (backlog, purge of sent rows).

/// One unsent row, as the relay publishes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsent {
    /// The row's id: the order a sale's rows are published in.
    pub id: u64,
    /// The event id (the message id).
    pub event_id: String,
    /// The event type as stored (the routing key).
    pub event_type: String,
    /// The JSON body as stored, published byte for byte.
    pub body: String,
    /// When the change happened (the message timestamp).
    pub occurred_at: DateTime<Utc>,
}

/// The sales that have unsent rows, by a skip scan of `idx_outbox_unsent`
/// (sent_at, sale_id, id): one index seek per sale, however many rows
/// wait (a `SELECT DISTINCT` reads every unsent row's entry: half a second
/// at two million after a long broker outage, on every pass).
pub async fn unsent_sales(pool: &MySqlPool) -> sqlx::Result<Vec<SaleId>> {
    let mut sales = Vec::new();
    let mut after = 0u64;
    loop {
        let next: Option<(u64,)> = sqlx::query_as(
            "SELECT sale_id FROM outbox WHERE sent_at IS NULL AND sale_id > ? \
             ORDER BY sale_id LIMIT 1",
        )
        .bind(after)
        .fetch_optional(pool)
        .await?;
        let Some((id,)) = next else {
            return Ok(sales);
        };
        after = id;
        // A sale id of 0 cannot come from the reconciler (the scan starts
        // above it anyway); one that does not parse is a hand-made row and
        // is left alone rather than failing every pass.
        if let Ok(sale) = SaleId::new(id) {
            sales.push(sale);
        }
    }
}

/// Creates `sale`'s claim row if it is missing. Called outside the batch
/// transaction (as `ledger::ensure_cursor`): inserting under a locking read
/// of a missing row would wait on the transaction's own gap lock.
pub async fn ensure_claim(pool: &MySqlPool, sale: SaleId) -> sqlx::Result<()> {
    let exists: Option<(u64,)> =
        sqlx::query_as("SELECT sale_id FROM outbox_relay_claims WHERE sale_id = ?")
            .bind(sale.get())
            .fetch_optional(pool)
            .await?;
    if exists.is_none() {
        sqlx::query(
            "INSERT INTO outbox_relay_claims (sale_id) VALUES (?) \
             ON DUPLICATE KEY UPDATE sale_id = sale_id",
        )
        .bind(sale.get())
        .execute(pool)
        .await?;
    }
    Ok(())
}

/// Locks `sale`'s claim row (see [`ensure_claim`]) for this transaction;
/// `false` when another relay holds it (then this one moves on).
pub async fn lock_claim(tx: &mut Transaction<'_, MySql>, sale: SaleId) -> sqlx::Result<bool> {
    let row: Option<(u64,)> = sqlx::query_as(
        "SELECT sale_id FROM outbox_relay_claims WHERE sale_id = ? FOR UPDATE SKIP LOCKED",
    )
    .bind(sale.get())
    .fetch_optional(&mut **tx)
    .await?;
    Ok(row.is_some())
}

/// Up to `limit` unsent rows of `sale` after row `after` (0: from the
/// first), in id order. Read under the sale's claim (see [`lock_claim`]):
/// the rows a relay that held it before marked sent are not read again.
/// Within one claim the relay pages on by id, so rows it marked meanwhile
/// (on another connection, see [`mark_sent`]) are never read twice.
pub async fn unsent_batch(
    tx: &mut Transaction<'_, MySql>,
    sale: SaleId,
    after: u64,
    limit: usize,
) -> sqlx::Result<Vec<Unsent>> {
    let rows: Vec<(u64, String, String, String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT id, event_id, event_type, body, occurred_at FROM outbox \
         WHERE sent_at IS NULL AND sale_id = ? AND id > ? ORDER BY id LIMIT ?",
    )
    .bind(sale.get())
    .bind(after)
    .bind(limit as u64)
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, event_id, event_type, body, occurred_at)| Unsent {
            id,
            event_id,
            event_type,
            body,
            occurred_at,
        })
        .collect())
}

/// Marks `ids` (rows the broker confirmed) sent, committed at once on a
/// connection of its own: a relay that dies later in its turn publishes
/// again only what it had not marked. Returns the rows marked.
pub async fn mark_sent(pool: &MySqlPool, ids: &[u64]) -> sqlx::Result<u64> {
    let mut marked = 0;
    for chunk in ids.chunks(5000) {
        let mut q = QueryBuilder::<MySql>::new(
            "UPDATE outbox SET sent_at = NOW(3) WHERE sent_at IS NULL AND id IN (",
        );
        let mut list = q.separated(", ");
        for id in chunk {
            list.push_bind(*id);
        }
        q.push(")");
        marked += q.build().execute(pool).await?.rows_affected();
    }
    Ok(marked)
}

/// Adds `n` rows to `sale`'s published count, in the claim's transaction
/// (the claim row is locked there).
pub async fn count_published(
    tx: &mut Transaction<'_, MySql>,
    sale: SaleId,
    n: u64,
) -> sqlx::Result<()> {
    sqlx::query("UPDATE outbox_relay_claims SET published = published + ? WHERE sale_id = ?")
        .bind(n)
        .bind(sale.get())
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// The unsent rows: how many, and the age in seconds of the oldest (by its
/// `created_at`, MySQL's clock; the oldest is taken to be the lowest id,
/// which the auto-increment makes so up to a commit's width). `(0, 0.0)`
/// when none waits.
pub async fn backlog(pool: &MySqlPool) -> sqlx::Result<(u64, f64)> {
    let (count, first): (i64, Option<u64>) =
        sqlx::query_as("SELECT COUNT(*), MIN(id) FROM outbox WHERE sent_at IS NULL")
            .fetch_one(pool)
            .await?;
    let Some(first) = first else {
        return Ok((0, 0.0));
    };
    let age_us: Option<(i64,)> = sqlx::query_as(
        "SELECT TIMESTAMPDIFF(MICROSECOND, created_at, NOW(3)) FROM outbox WHERE id = ?",
    )
    .bind(first)
    .fetch_optional(pool)
    .await?;
    let age = age_us.map_or(0.0, |(us,)| us.max(0) as f64 / 1e6);
    Ok((count.max(0) as u64, age))
}

/// Deletes up to `limit` rows sent more than `retention_secs` ago (MySQL's
/// clock, the one `sent_at` is written by); returns how many. Callers loop
/// while a full chunk comes back, so one statement never holds many locks.
pub async fn purge_sent(pool: &MySqlPool, retention_secs: u64, limit: u64) -> sqlx::Result<u64> {
    // The ids first, by a plain (non-locking) read, then a delete by primary
    // key: a range DELETE would lock the gap where the reconciler inserts
    // new rows and hold its batch up behind the purge.
    let ids: Vec<u64> = sqlx::query_scalar(
        "SELECT id FROM outbox WHERE sent_at IS NOT NULL \
         AND sent_at < NOW(3) - INTERVAL ? SECOND ORDER BY sent_at LIMIT ?",
    )
    .bind(retention_secs)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    if ids.is_empty() {
        return Ok(0);
    }
    let mut q = QueryBuilder::<MySql>::new("DELETE FROM outbox WHERE id IN (");
    let mut list = q.separated(", ");
    for id in &ids {
        list.push_bind(*id);
    }
    q.push(") AND sent_at IS NOT NULL");
    let done = q.build().execute(pool).await?;
    Ok(done.rows_affected())
}
