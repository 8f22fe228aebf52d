//! Sales in Redis: loading a sale's terms once and reading them back with
//! Redis's clock. Loading never resets a live sale.

use std::collections::HashMap;

use redis::AsyncCommands;

use super::{Engine, EngineError};
use crate::domain::SaleId;
use crate::units::{Units, REDIS};

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
    /// The sale's token (the hash's `db`: `sales.redis_token`), as a number
    /// (0: none).
    pub token: u64,
    /// An admin paused it: reservations are refused (`sale_paused`).
    pub paused: bool,
    /// Every unit counter (a counter the hash lacks reads 0).
    pub units: Units,
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
    /// Paused by an admin before its end: no reservations until resumed.
    Paused,
}

impl SaleState {
    /// The state as the API and the metrics spell it.
    pub fn label(self) -> &'static str {
        match self {
            Self::Upcoming => "upcoming",
            Self::Open => "open",
            Self::SoldOut => "sold_out",
            Self::Ended => "ended",
            Self::Paused => "paused",
        }
    }
}

impl SaleSnapshot {
    /// The sale's state at the snapshot's time (an ended sale is ended,
    /// paused or not).
    pub fn state(&self) -> SaleState {
        if self.now_ms >= self.end_ms {
            SaleState::Ended
        } else if self.paused {
            SaleState::Paused
        } else if self.now_ms < self.start_ms {
            SaleState::Upcoming
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
    /// The sale's identity (`sales.redis_token`): Redis keys of the same
    /// name that carry another token are never adopted.
    pub token: String,
    /// Paused by an admin (MySQL's `sales.paused_at`): a rebuilt sale
    /// stays paused.
    pub paused: bool,
}

/// An admin's control of a sale (`POST /api/v1/sales/{id}/pause|resume|end`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaleControl {
    /// Stop taking reservations until resumed.
    Pause,
    /// Take reservations again.
    Resume,
    /// End the sale now, for good.
    End,
}

impl SaleControl {
    /// The control as the API path and the CLI spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::End => "end",
        }
    }
}

/// What a control did in Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Controlled {
    /// Done (or it was so already); the sale's end after it (ms since
    /// the epoch, by Redis's clock).
    Done {
        /// The sale's end.
        end_ms: i64,
    },
    /// Pause or resume of a sale that has ended: nothing changed.
    Ended,
    /// Redis does not hold the sale.
    NotFound,
}

/// What loading a new sale into Redis did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loaded {
    /// The sale is in Redis now.
    Loaded,
    /// It was there already (nothing changed).
    AlreadyThere,
    /// Redis holds keys of another token (another database, or an earlier
    /// one, under the same key prefix) under the sale's name: nothing was
    /// loaded, and they are never adopted.
    Foreign,
}

impl SaleTerms {
    /// The sale hash's fields for a new sale (all but `db`, the token).
    pub(crate) fn fields(&self) -> Vec<(&'static str, String)> {
        let mut f = vec![
            ("layout", super::keys::LAYOUT.to_string()),
            ("sku", self.sku.clone()),
            ("title", self.title.clone()),
            ("price", self.price_cents.to_string()),
        ];
        // The stock counters: everything on sale.
        f.extend(Units::opening(self.stock_total).redis_fields());
        f.extend([
            ("refunds_waiting", "0".into()),
            ("refunds_dead", "0".into()),
            ("limit", self.per_user_limit.to_string()),
            ("window_ms", self.payment_window_ms.to_string()),
            ("start_ms", self.start_ms.to_string()),
            ("end_ms", self.end_ms.to_string()),
            ("seq", "0".into()),
        ]);
        if self.paused {
            f.push(("paused", "1".into()));
        }
        f
    }
}

impl Engine {
    /// Puts a new sale into Redis unless it is there already (then
    /// nothing changes). A sale Redis lost is rebuilt, not loaded
    /// (`rebuild`).
    pub async fn load_sale(&self, t: &SaleTerms) -> Result<Loaded, EngineError> {
        let keys = self.keys.sale(t.id);
        let mut inv = self.scripts.load_sale.key(&keys.sale);
        inv.arg(&t.token);
        for (f, v) in t.fields() {
            inv.arg(f).arg(v);
        }
        let mut c = self.conn.clone();
        let loaded: i64 = self.timed(inv.invoke_async(&mut c)).await?;
        if loaded < 0 {
            return Ok(Loaded::Foreign);
        }
        let index = self.keys.sales_index();
        let mut c = self.conn.clone();
        self.timed(async move { c.sadd::<_, _, i64>(index, t.id.get()).await })
            .await?;
        Ok(if loaded == 1 {
            Loaded::Loaded
        } else {
            Loaded::AlreadyThere
        })
    }

    /// Pauses, resumes or ends `sale` in Redis (`lua/control.lua`; an end
    /// is now by Redis's clock). With acknowledged writes it answers once
    /// the replicas have it.
    pub async fn control_sale(
        &self,
        sale: SaleId,
        token: &str,
        control: SaleControl,
    ) -> Result<Controlled, EngineError> {
        let keys = self.keys.sale(sale);
        let mut inv = self.scripts.control.key(&keys.sale);
        inv.arg(token).arg(control.as_str());
        use super::scripts::control::Reply;
        Ok(match self.write::<Reply>(&keys.sale, &inv).await? {
            Reply::Done(end_ms) => Controlled::Done { end_ms },
            Reply::Ended => Controlled::Ended,
            Reply::NotFound => Controlled::NotFound,
        })
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
            return self.missing(id).map(|()| None);
        }
        let map: HashMap<&str, &str> = rest
            .chunks_exact(2)
            .map(|kv| (kv[0].as_str(), kv[1].as_str()))
            .collect();
        if let Some(reason) = map.get("fence") {
            return Err(EngineError::Fenced(reason.to_string()));
        }
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
            stock_total: num(REDIS.total)?,
            stock_available: num(REDIS.available)?,
            stock_pending: num(REDIS.pending)?,
            stock_paid: num(REDIS.paid)?,
            per_user_limit: num("limit")?,
            payment_window_ms: num("window_ms")?,
            start_ms: num("start_ms")?,
            end_ms: num("end_ms")?,
            now_ms: now
                .parse()
                .map_err(|_| EngineError::Protocol("bad clock".into()))?,
            retired: map.contains_key("retired"),
            token: map
                .get("db")
                .and_then(|t| u64::from_str_radix(t, 16).ok())
                .unwrap_or(0),
            paused: map.get("paused").is_some_and(|p| *p == "1"),
            units: Units::from_fn(|c| map.get(c.redis).and_then(|v| v.parse().ok()).unwrap_or(0)),
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
        let sale_key = self.keys.sale(sale).sale;
        let index = self.keys.sales_index();
        let mut c = self.conn.clone();
        self.timed(async move {
            let mut deleted = 0;
            let mut cursor = 0u64;
            loop {
                // On the node that holds the sale (its keys share a tag).
                let (next, keys): (u64, Vec<String>) = c
                    .query_at(
                        &sale_key,
                        redis::cmd("SCAN")
                            .arg(cursor)
                            .arg("MATCH")
                            .arg(&pattern)
                            .arg("COUNT")
                            .arg(1000),
                    )
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
