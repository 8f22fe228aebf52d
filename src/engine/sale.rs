//! Sales in Redis: loading a sale's terms once and reading them back with
//! Redis's clock. Loading never resets a live sale.

use std::collections::HashMap;

use redis::AsyncCommands;

use super::{Engine, EngineError, FlowId};
use crate::domain::SaleId;

/// A sale's terms and counters as Redis holds them, read with Redis's clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaleSnapshot {
    /// The sale.
    pub id: SaleId,
    /// The product's SKU.
    pub sku: String,
    /// The product's title.
    pub title: String,
    /// Unit price in cents.
    pub price_cents: i64,
    /// Units put on sale.
    pub stock_total: i64,
    /// Units still available.
    pub stock_available: i64,
    /// Units in pending orders.
    pub stock_pending: i64,
    /// Units in paid orders.
    pub stock_paid: i64,
    /// Most units one buyer may hold.
    pub per_user_limit: i64,
    /// Time to pay after reserving, in ms.
    pub payment_window_ms: i64,
    /// Opening time, ms since the epoch.
    pub start_ms: i64,
    /// Closing time, ms since the epoch (exclusive).
    pub end_ms: i64,
    /// Redis's clock when the snapshot was read.
    pub now_ms: i64,
    /// The sale is retired: MySQL alone is its truth now.
    pub retired: bool,
}

/// Where a sale stands, judged by Redis's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SaleState {
    /// Before the start.
    Upcoming,
    /// Selling.
    Open,
    /// In its window with nothing left to sell.
    SoldOut,
    /// At or after the end.
    Ended,
}

impl SaleSnapshot {
    /// The sale's state at the snapshot's time.
    pub fn state(&self) -> SaleState {
        if self.now_ms < self.start_ms {
            SaleState::Upcoming
        } else if self.now_ms >= self.end_ms {
            SaleState::Ended
        } else if self.stock_available <= 0 {
            SaleState::SoldOut
        } else {
            SaleState::Open
        }
    }
}

/// A sale's terms, as loaded into Redis.
#[derive(Debug, Clone)]
pub struct SaleTerms {
    /// The sale (its MySQL id).
    pub id: SaleId,
    /// The product's SKU.
    pub sku: String,
    /// The product's title.
    pub title: String,
    /// Unit price in cents.
    pub price_cents: i64,
    /// Units put on sale.
    pub stock_total: i64,
    /// Most units one buyer may hold.
    pub per_user_limit: i64,
    /// Time to pay after reserving, in ms.
    pub payment_window_ms: i64,
    /// Opening time, ms since the epoch.
    pub start_ms: i64,
    /// Closing time, ms since the epoch (exclusive).
    pub end_ms: i64,
    /// For a sale Redis lost: MySQL's settled state to resume from (`None`
    /// for a new sale).
    pub resume: Option<ResumePoint>,
}

/// MySQL's settled state of a sale, from which Redis resumes a sale it lost:
/// its counters, its last order seq (new orders must not reuse one) and the
/// reconciler's cursor (new flow records must sort after it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResumePoint {
    /// Units on sale.
    pub available: i64,
    /// Units in pending orders.
    pub pending: i64,
    /// Units in paid orders.
    pub paid: i64,
    /// Units of cancelled orders.
    pub cancelled: i64,
    /// Units of closed orders.
    pub closed: i64,
    /// Units refunded.
    pub refunded: i64,
    /// Refunded units put back on sale.
    pub restocked: i64,
    /// The highest order seq MySQL holds.
    pub last_seq: u64,
    /// The reconciler's cursor.
    pub cursor: FlowId,
}

impl Engine {
    /// Puts a sale into Redis unless it is there already (then nothing
    /// changes); returns whether it was loaded now.
    pub async fn load_sale(&self, t: &SaleTerms) -> Result<bool, EngineError> {
        let keys = self.keys.sale(t.id);
        let r = t.resume.unwrap_or(ResumePoint {
            available: t.stock_total,
            ..ResumePoint::default()
        });
        let fields: [(&str, String); 19] = [
            ("layout", super::keys::LAYOUT.to_string()),
            ("sku", t.sku.clone()),
            ("title", t.title.clone()),
            ("price", t.price_cents.to_string()),
            ("total", t.stock_total.to_string()),
            ("avail", r.available.to_string()),
            ("pending", r.pending.to_string()),
            ("paid", r.paid.to_string()),
            ("cancelled", r.cancelled.to_string()),
            ("closed", r.closed.to_string()),
            ("refunded", r.refunded.to_string()),
            ("restocked", r.restocked.to_string()),
            ("refunds_waiting", "0".into()),
            ("refunds_dead", "0".into()),
            ("limit", t.per_user_limit.to_string()),
            ("window_ms", t.payment_window_ms.to_string()),
            ("start_ms", t.start_ms.to_string()),
            ("end_ms", t.end_ms.to_string()),
            ("seq", r.last_seq.to_string()),
        ];
        let mut inv = self.scripts.load_sale.key(&keys.sale);
        inv.key(&keys.flow).arg(if r.cursor == FlowId::default() {
            String::new()
        } else {
            r.cursor.to_string()
        });
        for (f, v) in &fields {
            inv.arg(*f).arg(v);
        }
        let mut c = self.conn.clone();
        let loaded: i64 = self.timed(inv.invoke_async(&mut c)).await?;
        let index = self.keys.sales_index();
        let mut c = self.conn.clone();
        self.timed(async move { c.sadd::<_, _, i64>(index, t.id.get()).await })
            .await?;
        Ok(loaded == 1)
    }

    /// Reads a sale with Redis's clock; `None` when Redis does not know it.
    pub async fn sale(&self, id: SaleId) -> Result<Option<SaleSnapshot>, EngineError> {
        let keys = self.keys.sale(id);
        let mut c = self.conn.clone();
        let reply: Vec<String> = self
            .timed(
                self.scripts
                    .sale_snapshot
                    .key(&keys.sale)
                    .invoke_async(&mut c),
            )
            .await?;
        let (now, rest) = reply
            .split_first()
            .ok_or_else(|| EngineError::Protocol("empty sale snapshot".into()))?;
        if rest.is_empty() {
            return Ok(None);
        }
        let map: HashMap<&str, &str> = rest
            .chunks_exact(2)
            .map(|kv| (kv[0].as_str(), kv[1].as_str()))
            .collect();
        let num = |f: &str| -> Result<i64, EngineError> {
            map.get(f)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| EngineError::Protocol(format!("sale {id}: bad field {f}")))
        };
        let text = |f: &str| map.get(f).map(|s| s.to_string()).unwrap_or_default();
        Ok(Some(SaleSnapshot {
            id,
            sku: text("sku"),
            title: text("title"),
            price_cents: num("price")?,
            stock_total: num("total")?,
            stock_available: num("avail")?,
            stock_pending: num("pending")?,
            stock_paid: num("paid")?,
            per_user_limit: num("limit")?,
            payment_window_ms: num("window_ms")?,
            start_ms: num("start_ms")?,
            end_ms: num("end_ms")?,
            now_ms: now
                .parse()
                .map_err(|_| EngineError::Protocol("bad clock".into()))?,
            retired: map.contains_key("retired"),
        }))
    }

    /// Every sale loaded into Redis and not retired. Workers do not walk
    /// it (a flushed Redis would hide sales from them): they walk the live
    /// list read from MySQL (`workers::live`).
    pub async fn sale_ids(&self) -> Result<Vec<SaleId>, EngineError> {
        let mut c = self.conn.clone();
        let index = self.keys.sales_index();
        let ids: Vec<u64> = self.timed(async move { c.smembers(index).await }).await?;
        Ok(ids
            .into_iter()
            .filter_map(|id| SaleId::new(id).ok())
            .collect())
    }

    /// Deletes every Redis key of `sale` and takes it off the sales index
    /// (for throw-away sales: demo, benchmarks). Returns the keys deleted.
    pub async fn drop_sale_keys(&self, sale: SaleId) -> Result<u64, EngineError> {
        let pattern = self.keys.sale(sale).pattern();
        let index = self.keys.sales_index();
        let mut c = self.conn.clone();
        self.timed(async move {
            let mut deleted = 0;
            let mut cursor = 0u64;
            loop {
                let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(&mut c)
                    .await?;
                if !keys.is_empty() {
                    deleted += c.del::<_, u64>(&keys).await?;
                }
                cursor = next;
                if cursor == 0 {
                    break;
                }
            }
            c.srem::<_, _, ()>(&index, sale.get()).await?;
            Ok(deleted)
        })
        .await
    }
}
