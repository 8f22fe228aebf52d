//! What the guard and the rebuild of a fenced sale read from MySQL and
//! write to it (see `workers::guard`): how far MySQL has settled each live
//! sale, a sale's orders with the keys they were made under, and the lost
//! orders a rebuild counted.

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use sqlx::{MySql, MySqlPool, QueryBuilder, Transaction};

use crate::domain::SaleId;
use crate::engine::{FlowId, Order};

/// How far MySQL has settled a sale: Redis is behind when its order
/// counter is below `max_seq` or its flow position below `cursor`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SettledPoint {
    /// The highest order seq MySQL holds (0: none).
    pub max_seq: u64,
    /// The reconciler's cursor (the last flow record applied).
    pub cursor: FlowId,
}

/// What the guard compares a live sale's Redis copy with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardFacts {
    /// `sales.redis_token`.
    pub token: String,
    /// What MySQL has settled.
    pub settled: SettledPoint,
    /// The number of the last flow record applied.
    pub last_n: u64,
    /// Its terms.
    pub start_ms: i64,
    /// See `start_ms`.
    pub end_ms: i64,
    /// See `start_ms`.
    pub total: i64,
    /// See `start_ms`.
    pub price_cents: i64,
    /// Created in the last few seconds with nothing settled yet: its
    /// creator may not have loaded it into Redis yet.
    pub young: bool,
}

type FactsRow = (
    u64,
    String,
    u64,
    u64,
    u64,
    u64,
    DateTime<Utc>,
    DateTime<Utc>,
    i64,
    i64,
    i64,
);

/// Every live (not retired) sale's facts, in one query (the highest seq by
/// the primary key, one index dive per sale).
pub async fn guard_facts(pool: &MySqlPool) -> anyhow::Result<HashMap<SaleId, GuardFacts>> {
    let rows: Vec<FactsRow> = sqlx::query_as(
        "SELECT s.id, s.redis_token, \
         CAST(COALESCE((SELECT MAX(o.seq) FROM orders o WHERE o.sale_id = s.id), 0) AS UNSIGNED), \
         CAST(COALESCE(c.last_ms, 0) AS UNSIGNED), CAST(COALESCE(c.last_seq, 0) AS UNSIGNED), \
         CAST(COALESCE(c.last_n, 0) AS UNSIGNED), s.start_at, s.end_at, \
         CAST(s.stock_total AS SIGNED), s.price_cents, \
         CAST(s.created_at > NOW(3) - INTERVAL 10 SECOND AS SIGNED) \
         FROM sales s LEFT JOIN reconcile_cursors c ON c.sale_id = s.id \
         WHERE s.retired_at IS NULL",
    )
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(
            |(id, token, max_seq, ms, seq, last_n, start, end, total, price_cents, recent)| {
                let settled = SettledPoint {
                    max_seq,
                    cursor: FlowId { ms, seq },
                };
                let young = recent == 1 && max_seq == 0 && last_n == 0;
                let facts = GuardFacts {
                    token,
                    settled,
                    last_n,
                    start_ms: start.timestamp_millis(),
                    end_ms: end.timestamp_millis(),
                    total,
                    price_cents,
                    young,
                };
                Ok((SaleId::new(id)?, facts))
            },
        )
        .collect()
}

/// One sale's settled point.
pub async fn settled_point<'e>(
    ex: impl sqlx::Executor<'e, Database = MySql>,
    sale: SaleId,
) -> anyhow::Result<SettledPoint> {
    let (max_seq, ms, seq): (u64, u64, u64) = sqlx::query_as(
        "SELECT CAST(COALESCE((SELECT MAX(seq) FROM orders WHERE sale_id = ?), 0) AS UNSIGNED), \
         CAST(COALESCE((SELECT last_ms FROM reconcile_cursors WHERE sale_id = ?), 0) AS UNSIGNED), \
         CAST(COALESCE((SELECT last_seq FROM reconcile_cursors WHERE sale_id = ?), 0) AS UNSIGNED)",
    )
    .bind(sale.get())
    .bind(sale.get())
    .bind(sale.get())
    .fetch_one(ex)
    .await?;
    Ok(SettledPoint {
        max_seq,
        cursor: FlowId { ms, seq },
    })
}

#[derive(sqlx::FromRow)]
struct KeyedRow {
    #[sqlx(flatten)]
    order: super::OrderRow,
    idem_key: Option<String>,
}

/// Every order of `sale` as MySQL holds it, with the key it was made
/// under; each order's last flow is `settled` (MySQL has all of it).
pub async fn orders(
    tx: &mut Transaction<'_, MySql>,
    sale: SaleId,
    settled: FlowId,
) -> anyhow::Result<Vec<(Order, Option<String>)>> {
    let rows: Vec<KeyedRow> = sqlx::query_as(&format!(
        "SELECT {}, idem_key FROM orders WHERE sale_id = ? ORDER BY seq",
        super::ORDER_COLUMNS
    ))
    .bind(sale.get())
    .fetch_all(&mut **tx)
    .await?;
    rows.into_iter()
        .map(|r| Ok((r.order.into_order(sale, settled.to_string())?, r.idem_key)))
        .collect()
}

/// The seqs of `sale`'s orders counted lost so far.
pub async fn lost_seqs(
    tx: &mut Transaction<'_, MySql>,
    sale: SaleId,
) -> anyhow::Result<BTreeSet<u64>> {
    let seqs: Vec<u64> = sqlx::query_scalar("SELECT seq FROM lost_orders WHERE sale_id = ?")
        .bind(sale.get())
        .fetch_all(&mut **tx)
        .await?;
    Ok(seqs.into_iter().collect())
}

/// Why an acknowledged order is counted lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LostReason {
    /// Neither MySQL nor the surviving Redis has it.
    Missing,
    /// Redis gave its id out again to another buyer after going back in
    /// time; MySQL's order with that id stands.
    IdReused,
}

impl LostReason {
    /// As `lost_orders.reason` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::IdReused => "id_reused",
        }
    }
}

/// Records lost orders (a seq already recorded stays as it was); returns
/// how many are new.
pub async fn record_lost(
    tx: &mut Transaction<'_, MySql>,
    sale: SaleId,
    lost: &[(u64, LostReason, String)],
) -> anyhow::Result<u64> {
    let mut added = 0;
    for chunk in lost.chunks(500) {
        let mut q = QueryBuilder::<MySql>::new(
            "INSERT IGNORE INTO lost_orders (sale_id, seq, reason, detail) ",
        );
        q.push_values(chunk, |mut b, (seq, reason, detail)| {
            b.push_bind(sale.get())
                .push_bind(*seq)
                .push_bind(reason.as_str())
                .push_bind(detail.chars().take(255).collect::<String>());
        });
        added += q.build().execute(&mut **tx).await?.rows_affected();
    }
    Ok(added)
}

/// Lost orders per sale and reason (for the audit and the metrics).
pub async fn lost_counts(
    pool: &MySqlPool,
    only: Option<SaleId>,
) -> anyhow::Result<Vec<(SaleId, String, u64)>> {
    let rows: Vec<(u64, String, i64)> = sqlx::query_as(
        "SELECT sale_id, reason, COUNT(*) FROM lost_orders \
         WHERE (? IS NULL OR sale_id = ?) GROUP BY sale_id, reason ORDER BY sale_id, reason",
    )
    .bind(only.map(SaleId::get))
    .bind(only.map(SaleId::get))
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|(sale, reason, n)| Ok((SaleId::new(sale)?, reason, n as u64)))
        .collect()
}
