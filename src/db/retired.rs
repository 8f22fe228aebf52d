//! Retirement in MySQL: the live list (the sales not retired, which the
//! workers walk), the transaction that retires a sale after re-checking
//! MySQL's side, and the reads and refunds of a retired sale, for which
//! MySQL alone is the truth (Redis's copy, while it lasts, no longer moves).
//!
//! A refund of a retired sale's order is applied here in one transaction:
//! the order becomes refunded, the inventory moves its units from paid to
//! refunded (no restock: the sale has ended), and a stock flow row
//! `<sale>-refund-<seq>` records it. An order is refunded at most once, so
//! that id is unique, and a second call finds the order refunded and
//! changes nothing.

use chrono::{DateTime, Utc};
use sqlx::{MySql, MySqlPool, Transaction};

use super::inventory;
use crate::domain::{OrderId, SaleId, UserId};
use crate::engine::{FlowEvent, FlowId, Order, OrderStatus};
use crate::units::Units;

/// A sale on the live list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiveSale {
    /// The sale.
    pub id: SaleId,
    /// Its end, ms since the epoch (retirement is looked at only after it).
    pub end_ms: i64,
    /// Its token (`sales.redis_token`, 16 hex digits, as a number; 0: not
    /// known).
    pub token: u64,
}

/// Every sale that is not retired (served by `idx_sales_retired`).
pub async fn live_sales(pool: &MySqlPool) -> anyhow::Result<Vec<LiveSale>> {
    let rows: Vec<(u64, DateTime<Utc>, String)> =
        sqlx::query_as("SELECT id, end_at, redis_token FROM sales WHERE retired_at IS NULL")
            .fetch_all(pool)
            .await?;
    rows.into_iter()
        .map(|(id, end, token)| {
            Ok(LiveSale {
                id: SaleId::new(id)?,
                end_ms: end.timestamp_millis(),
                token: u64::from_str_radix(&token, 16).unwrap_or(0),
            })
        })
        .collect()
}

/// Where MySQL's side of a sale stands for retirement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// Nothing waits in MySQL; the reconciler's cursor, locked in the
    /// transaction, is `cursor`.
    Ready {
        /// The reconciler's cursor.
        cursor: FlowId,
    },
    /// Retired already (by another reconciler, or by an earlier attempt of
    /// this one whose answer was lost).
    Retired,
    /// Not now: the sale is missing, being reconciled, or has orders
    /// pending or waiting for a refund.
    Busy(&'static str),
}

/// Locks the sale's row and its reconciler cursor in `tx` and checks that
/// MySQL holds no work of the sale: no pending order, no refund waiting.
/// The cursor is taken with `SKIP LOCKED`: a reconciler applying a batch
/// of the sale right now makes this answer `Busy`.
pub async fn lock_for_retirement(
    tx: &mut Transaction<'_, MySql>,
    sale: SaleId,
) -> anyhow::Result<Readiness> {
    let row: Option<(Option<DateTime<Utc>>,)> =
        sqlx::query_as("SELECT retired_at FROM sales WHERE id = ? FOR UPDATE")
            .bind(sale.get())
            .fetch_optional(&mut **tx)
            .await?;
    match row {
        None => return Ok(Readiness::Busy("missing in mysql")),
        Some((Some(_),)) => return Ok(Readiness::Retired),
        Some((None,)) => {}
    }
    let Some(cursor) = crate::db::ledger::lock_cursor(tx, sale).await? else {
        return Ok(Readiness::Busy("reconciling"));
    };
    let (pending,): (i32,) = sqlx::query_as("SELECT pending FROM inventory WHERE sale_id = ?")
        .bind(sale.get())
        .fetch_one(&mut **tx)
        .await?;
    let (waiting,): (i64,) = sqlx::query_as(
        "SELECT COUNT(*) FROM orders WHERE sale_id = ? \
         AND status IN ('pending', 'refund_pending')",
    )
    .bind(sale.get())
    .fetch_one(&mut **tx)
    .await?;
    if pending != 0 || waiting != 0 {
        return Ok(Readiness::Busy("orders waiting in mysql"));
    }
    Ok(Readiness::Ready { cursor })
}

/// Sets `retired_at` (inside the transaction of [`lock_for_retirement`]).
pub async fn mark_retired(tx: &mut Transaction<'_, MySql>, sale: SaleId) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE sales SET retired_at = UTC_TIMESTAMP(3) WHERE id = ? AND retired_at IS NULL",
    )
    .bind(sale.get())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Whether MySQL holds `sale` as retired.
pub async fn is_retired(pool: &MySqlPool, sale: SaleId) -> sqlx::Result<bool> {
    let row: Option<(Option<DateTime<Utc>>,)> =
        sqlx::query_as("SELECT retired_at FROM sales WHERE id = ?")
            .bind(sale.get())
            .fetch_optional(pool)
            .await?;
    Ok(matches!(row, Some((Some(_),))))
}

/// A retired sale as MySQL holds it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RetiredSale {
    /// The sale's id.
    pub id: u64,
    /// The product's SKU.
    pub sku: String,
    /// The product's title.
    pub title: String,
    /// Unit price in cents.
    pub price_cents: i64,
    /// Units put on sale.
    pub stock_total: i32,
    /// Units available when it ended (refunds after the end do not restock).
    pub available: i32,
    /// Most units one buyer may hold.
    pub per_user_limit: i32,
    /// Time to pay after reserving, in seconds.
    pub payment_window_secs: i32,
    /// Opening time.
    pub start_at: DateTime<Utc>,
    /// Closing time.
    pub end_at: DateTime<Utc>,
    /// When it retired.
    pub retired_at: DateTime<Utc>,
}

/// The sale, when MySQL holds it retired (`None` otherwise).
pub async fn retired_sale(pool: &MySqlPool, sale: SaleId) -> sqlx::Result<Option<RetiredSale>> {
    sqlx::query_as(
        "SELECT s.id, s.sku, s.title, s.price_cents, s.stock_total, i.available, \
         s.per_user_limit, s.payment_window_secs, s.start_at, s.end_at, s.retired_at \
         FROM sales s JOIN inventory i ON i.sale_id = s.id \
         WHERE s.id = ? AND s.retired_at IS NOT NULL",
    )
    .bind(sale.get())
    .fetch_optional(pool)
    .await
}

/// The order as MySQL holds it, and whether its sale is retired there.
pub async fn order(pool: &MySqlPool, id: OrderId) -> anyhow::Result<Option<(Order, bool)>> {
    let row: Option<super::OrderRow> = sqlx::query_as(&format!(
        "SELECT {} FROM orders WHERE sale_id = ? AND seq = ?",
        super::ORDER_COLUMNS
    ))
    .bind(id.sale().get())
    .bind(id.seq())
    .fetch_optional(pool)
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let retired = is_retired(pool, id.sale()).await?;
    Ok(Some((row.into_order(id.sale(), String::new())?, retired)))
}

/// What a refund of a retired sale's order did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetiredRefund {
    /// The order is refunded, by this call (`now`) or before.
    Refunded {
        /// The refunded order.
        order: Order,
        /// Whether this call refunded it.
        now: bool,
    },
    /// The order is not paid (the order as it stands).
    NotPaid(Order),
    /// No such order, or not the caller's.
    NotFound,
    /// MySQL does not hold the sale as retired (Redis keeps its refunds).
    NotRetired,
}

/// Refunds a paid order of a retired sale on behalf of its owner (`Some`)
/// or the admin (`None`), in one transaction (see the module doc).
pub async fn refund(
    pool: &MySqlPool,
    id: OrderId,
    caller: Option<UserId>,
) -> anyhow::Result<RetiredRefund> {
    let sale = id.sale().get();
    let mut tx = pool.begin().await?;
    // The refund's time: MySQL's clock, never before the sale's end, so the
    // audit (refunded_at < end_at means restocked) counts it as not restocked.
    let found: Option<(Option<DateTime<Utc>>, DateTime<Utc>)> = sqlx::query_as(
        "SELECT retired_at, GREATEST(UTC_TIMESTAMP(3), end_at) FROM sales \
         WHERE id = ? LOCK IN SHARE MODE",
    )
    .bind(sale)
    .fetch_optional(&mut *tx)
    .await?;
    let at = match found {
        None => return Ok(RetiredRefund::NotFound),
        Some((None, _)) => return Ok(RetiredRefund::NotRetired),
        Some((Some(_), at)) => at,
    };
    let row: Option<super::OrderRow> = sqlx::query_as(&format!(
        "SELECT {} FROM orders WHERE sale_id = ? AND seq = ? FOR UPDATE",
        super::ORDER_COLUMNS
    ))
    .bind(sale)
    .bind(id.seq())
    .fetch_optional(&mut *tx)
    .await?;
    let Some(mut order) = row
        .map(|r| r.into_order(id.sale(), String::new()))
        .transpose()?
    else {
        return Ok(RetiredRefund::NotFound);
    };
    if caller.is_some_and(|u| u != order.user) {
        return Ok(RetiredRefund::NotFound);
    }
    match order.status {
        OrderStatus::Refunded => return Ok(RetiredRefund::Refunded { order, now: false }),
        OrderStatus::Paid => {}
        _ => return Ok(RetiredRefund::NotPaid(order)),
    }
    sqlx::query(
        "UPDATE orders SET status = 'refunded', refunded_at = ? \
         WHERE sale_id = ? AND seq = ? AND status = 'paid'",
    )
    .bind(at)
    .bind(sale)
    .bind(id.seq())
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO stock_flows (flow_id, sale_id, seq, event, qty, status, event_at) \
         VALUES (?, ?, ?, 'refund', ?, 'refunded', ?)",
    )
    .bind(format!("{sale}-refund-{}", id.seq()))
    .bind(sale)
    .bind(id.seq())
    .bind(order.qty)
    .bind(at)
    .execute(&mut *tx)
    .await?;
    // After the end: the units do not go back on sale.
    let refund = Units::moved_by(FlowEvent::Refund, i64::from(order.qty), false);
    inventory::add(&mut tx, id.sale(), &refund).await?;
    super::outbox::write_order_history(&mut tx, id).await?;
    tx.commit().await?;
    order.status = OrderStatus::Refunded;
    order.refunded_ms = Some(at.timestamp_millis());
    Ok(RetiredRefund::Refunded { order, now: true })
}
