//! The transactional outbox: one row per downstream event, written in the
//! same MySQL transaction as the change it tells of (the reconciler's batch,
//! an audit repair), and published by the relay (`workers::relay`).
//!
//! Rows are unique by event id, and an event's id is derived from the change
//! (see [`crate::events`]), so writing the same change twice leaves one row.

use sqlx::{MySql, QueryBuilder, Transaction};

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
