//! The engine: typed calls of the Lua scripts on the hot path, over one
//! multiplexed Redis connection.
//!
//! The engine owns the Redis side of every state change; each change is one
//! script call, atomic in Redis. It never calls MySQL: the reconciler carries
//! the flow records that the scripts write to the system of record.

pub mod keys;
pub mod order;
mod scripts;

use std::collections::HashMap;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::AsyncCommands;

use crate::domain::{IdempotencyKey, OrderId, Qty, SaleId, UserId};
pub use keys::{Keys, SaleKeys};
pub use order::{Order, OrderStatus};
use scripts::Scripts;

/// A failure to talk to Redis, or a reply the engine did not expect.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Redis answered with an error or the connection failed.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// Redis did not answer within the configured timeout.
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    /// A script answered with a shape its contract does not allow.
    #[error("unexpected reply from redis: {0}")]
    Protocol(String),
}

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
    /// Units available when loaded (the total for a new sale).
    pub stock_available: i64,
    /// Most units one buyer may hold.
    pub per_user_limit: i64,
    /// Time to pay after reserving, in ms.
    pub payment_window_ms: i64,
    /// Opening time, ms since the epoch.
    pub start_ms: i64,
    /// Closing time, ms since the epoch (exclusive).
    pub end_ms: i64,
}

/// Why a reservation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No such sale in Redis.
    NotFound,
    /// Before the sale's start.
    NotStarted,
    /// At or after the sale's end.
    Ended,
    /// Not enough units left.
    SoldOut,
    /// The buyer would hold more than the per-user limit.
    LimitExceeded,
}

/// What a reservation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reservation {
    /// A new pending order.
    Created(Order),
    /// The order that the same idempotency key made before; nothing reserved.
    Existing(Order),
    /// Nothing reserved.
    Refused(Refusal),
}

/// Connection settings for the engine.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// `redis://host:port[/db]`.
    pub url: String,
    /// The deployment's key prefix.
    pub key_prefix: String,
    /// How long one Redis call may take before the caller gets an error.
    pub timeout: Duration,
}

/// Typed calls of the scripts over one multiplexed connection (cheap to clone).
#[derive(Clone)]
pub struct Engine {
    conn: ConnectionManager,
    keys: Keys,
    scripts: Scripts,
    timeout: Duration,
}

impl Engine {
    /// Connects (lazily: a Redis that is down now is retried on each call) and
    /// checks the URL and prefix.
    pub fn connect(opts: &EngineOptions) -> anyhow::Result<Self> {
        let client = redis::Client::open(opts.url.as_str())?;
        // Short connection attempts and few retries: while Redis is away, a
        // caller gets an error quickly instead of waiting on a reconnect loop;
        // the next call starts a new attempt.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(opts.timeout))
            .set_response_timeout(Some(opts.timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(200));
        let conn = ConnectionManager::new_lazy_with_config(client, config)?;
        Ok(Self {
            conn,
            keys: Keys::new(&opts.key_prefix)?,
            scripts: Scripts::default(),
            timeout: opts.timeout,
        })
    }

    /// The key layout in use.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// A clone of the multiplexed connection, for callers outside the hot path
    /// (tests, audit) that need plain commands.
    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    async fn timed<T>(
        &self,
        fut: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, EngineError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(EngineError::Timeout(self.timeout)),
        }
    }

    /// PING.
    pub async fn ping(&self) -> Result<(), EngineError> {
        let mut c = self.conn.clone();
        self.timed(async move { redis::cmd("PING").query_async::<String>(&mut c).await })
            .await
            .map(drop)
    }

    /// Loads the scripts into the server's script cache (they are re-sent
    /// automatically after a NOSCRIPT, for example after a Redis restart).
    pub async fn load_scripts(&self) -> Result<(), EngineError> {
        for script in self.scripts.all() {
            let mut c = self.conn.clone();
            self.timed(async move { script.load_async(&mut c).await })
                .await?;
        }
        Ok(())
    }

    /// Puts a sale into Redis unless it is there already (then nothing
    /// changes); returns whether it was loaded now.
    pub async fn load_sale(&self, t: &SaleTerms) -> Result<bool, EngineError> {
        let keys = self.keys.sale(t.id);
        let fields: [(&str, String); 15] = [
            ("sku", t.sku.clone()),
            ("title", t.title.clone()),
            ("price", t.price_cents.to_string()),
            ("total", t.stock_total.to_string()),
            ("avail", t.stock_available.to_string()),
            ("pending", "0".into()),
            ("paid", "0".into()),
            ("cancelled", "0".into()),
            ("closed", "0".into()),
            ("refunded", "0".into()),
            ("limit", t.per_user_limit.to_string()),
            ("window_ms", t.payment_window_ms.to_string()),
            ("start_ms", t.start_ms.to_string()),
            ("end_ms", t.end_ms.to_string()),
            ("seq", "0".into()),
        ];
        let mut inv = self.scripts.load_sale.key(&keys.sale);
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
        }))
    }

    /// Reserves `qty` units of `sale` for `user`: the seckill call.
    pub async fn reserve(
        &self,
        sale: SaleId,
        user: UserId,
        qty: Qty,
        idem: Option<&IdempotencyKey>,
    ) -> Result<Reservation, EngineError> {
        let k = self.keys.sale(sale);
        let mut inv = self.scripts.reserve.prepare_invoke();
        inv.key(&k.sale)
            .key(&k.buyers)
            .key(&k.idem)
            .key(&k.orders)
            .key(&k.deadlines)
            .key(&k.flow)
            .arg(user.get())
            .arg(qty.get())
            .arg(idem.map_or("", |k| k.as_str()));
        let mut c = self.conn.clone();
        let reply: Vec<String> = self.timed(inv.invoke_async(&mut c)).await?;
        let refused = |r| Ok(Reservation::Refused(r));
        match reply.first().map(String::as_str) {
            Some("ok") | Some("dup") => {
                let order = parse_order_reply(sale, &reply)?;
                if reply[0] == "ok" {
                    Ok(Reservation::Created(order))
                } else {
                    Ok(Reservation::Existing(order))
                }
            }
            Some("not_found") => refused(Refusal::NotFound),
            Some("sale_not_started") => refused(Refusal::NotStarted),
            Some("sale_ended") => refused(Refusal::Ended),
            Some("sold_out") => refused(Refusal::SoldOut),
            Some("limit_exceeded") => refused(Refusal::LimitExceeded),
            _ => Err(EngineError::Protocol(format!("reserve: {reply:?}"))),
        }
    }

    /// Reads one order; `None` when Redis does not know it.
    pub async fn order(&self, id: OrderId) -> Result<Option<Order>, EngineError> {
        let k = self.keys.sale(id.sale());
        let mut c = self.conn.clone();
        let packed: Option<String> = self
            .timed(async move { c.hget(&k.orders, id.seq()).await })
            .await?;
        packed
            .map(|p| {
                Order::unpack(id, &p)
                    .ok_or_else(|| EngineError::Protocol(format!("order {id}: {p:?}")))
            })
            .transpose()
    }

    /// Redis's clock in ms since the epoch.
    pub async fn now_ms(&self) -> Result<i64, EngineError> {
        let mut c = self.conn.clone();
        let (secs, micros): (i64, i64) = self
            .timed(async move { redis::cmd("TIME").query_async(&mut c).await })
            .await?;
        Ok(secs * 1000 + micros / 1000)
    }
}

/// Parses `{tag, seq, packed_order}`.
fn parse_order_reply(sale: SaleId, reply: &[String]) -> Result<Order, EngineError> {
    let bad = || EngineError::Protocol(format!("order reply: {reply:?}"));
    let seq: u64 = reply.get(1).and_then(|s| s.parse().ok()).ok_or_else(bad)?;
    let id = OrderId::new(sale, seq);
    Order::unpack(id, reply.get(2).ok_or_else(bad)?).ok_or_else(bad)
}
