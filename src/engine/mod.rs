//! The engine: typed calls of the Lua scripts on the hot path, over one
//! multiplexed Redis connection (per node of the topology, see
//! [`topology`]).
//!
//! The engine owns the Redis side of every state change; each change is one
//! script call, atomic in Redis. It never calls MySQL: the reconciler carries
//! the flow records that the scripts write to the system of record.

mod audit;
mod combiner;
pub mod durability;
mod flow;
pub mod keys;
mod lifecycle;
pub mod order;
mod rebuild;
mod retire;
mod sale;
mod scripts;
mod sold_out;
pub mod topology;

use std::time::Duration;

use crate::domain::SaleId;

pub use audit::{AuditSnapshot, Repair, Repaired};
pub use combiner::{Batching, ReserveFailed, ReserveStats};
pub use flow::{FlowEntry, FlowEvent, FlowId, FlowRecord, LatePayment, UnreadableRecord};
pub use keys::{Keys, SaleKeys};
pub use lifecycle::{Cancellation, ExpiryBatch, Payment, Refund, Refusal, Reservation};
pub use order::{Order, OrderStatus};
pub use rebuild::{GuardInput, GuardVerdict, RebuiltSale, RedisSide, Unfenced, FENCE_AT_LEAST};
pub use retire::Retirement;
pub use sale::{Controlled, Loaded, SaleControl, SaleSnapshot, SaleState, SaleTerms};
use scripts::Scripts;
pub use topology::{RedisConn, ReplicationStats, Topology};

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
    /// A combined reserve call failed (the message of the call's error).
    #[error("{0}")]
    Combined(String),
    /// A script failed inside Redis (a runtime error, or a state it
    /// refuses): a fault that retrying will not cure.
    #[error("script fault: {0}")]
    Script(String),
    /// This process has no room for the call right now.
    #[error("overloaded: {0}")]
    Overloaded(&'static str),
    /// The sale is fenced: Redis lost some of it, went back in time, or
    /// holds another database's sale under its name (the reason), and it
    /// takes no call until it is rebuilt from MySQL.
    #[error("the sale is fenced ({0}) until it is rebuilt from MySQL")]
    Fenced(String),
    /// Writes wait for `wanted` replicas and the primary has `connected`:
    /// refused before anything was sent.
    #[error("redis primary has {connected} replicas connected, writes wait for {wanted}")]
    Replicas {
        /// Replicas the primary has now.
        connected: u32,
        /// Replicas each write waits for.
        wanted: u32,
    },
    /// The write ran on the primary but WAIT confirmed only `acked` of
    /// `wanted` replicas in time: a failover now could lose it.
    #[error("redis WAIT confirmed {acked} of {wanted} replicas in time")]
    Unacknowledged {
        /// Replicas that confirmed the write.
        acked: u32,
        /// Replicas each write waits for.
        wanted: u32,
    },
}

impl EngineError {
    /// Whether retrying cannot cure it: a script that fails in Redis, or a
    /// reply the engine does not understand (as opposed to a timeout, a
    /// lost connection or an overloaded server, which pass).
    pub fn is_permanent(&self) -> bool {
        match self {
            Self::Redis(e) => script_fault(e),
            Self::Protocol(_) | Self::Script(_) => true,
            Self::Timeout(_)
            | Self::Combined(_)
            | Self::Overloaded(_)
            | Self::Fenced(_)
            | Self::Replicas { .. }
            | Self::Unacknowledged { .. } => false,
        }
    }

    /// The same error for one more caller (the callers of one combined call
    /// share its error).
    pub(crate) fn shared(&self) -> Self {
        match self {
            Self::Redis(e) if script_fault(e) => Self::Script(e.to_string()),
            Self::Redis(e) => Self::Combined(e.to_string()),
            Self::Timeout(d) => Self::Timeout(*d),
            Self::Protocol(m) => Self::Protocol(m.clone()),
            Self::Combined(m) => Self::Combined(m.clone()),
            Self::Script(m) => Self::Script(m.clone()),
            Self::Overloaded(m) => Self::Overloaded(m),
            Self::Fenced(r) => Self::Fenced(r.clone()),
            Self::Replicas { connected, wanted } => Self::Replicas {
                connected: *connected,
                wanted: *wanted,
            },
            Self::Unacknowledged { acked, wanted } => Self::Unacknowledged {
                acked: *acked,
                wanted: *wanted,
            },
        }
    }

    /// Redis's error reply, with a fenced sale's ("FENCED <reason>") and a
    /// missing sale's ("NOSALE", see [`Engine::missing`]) told apart.
    pub(crate) fn from_redis(e: redis::RedisError) -> Self {
        // A reply its script's contract does not allow (see
        // `scripts::reply`): a fault, not a passing state.
        if matches!(
            e.kind(),
            redis::ErrorKind::Parse | redis::ErrorKind::UnexpectedReturnType
        ) {
            return Self::Protocol(e.to_string());
        }
        match e.code() {
            // Redis adds the script's name after the reason.
            Some("FENCED") => Self::Fenced(
                e.detail()
                    .and_then(|d| d.split_whitespace().next())
                    .unwrap_or("unknown")
                    .to_owned(),
            ),
            _ => Self::Redis(e),
        }
    }

    /// The due-queue buckets a script asked to have declared ("NEEDBUCKETS
    /// <n> ..."; it wrote nothing): the caller sends it again declaring them.
    pub(crate) fn needed_buckets(&self) -> Option<Vec<u64>> {
        match self {
            Self::Redis(e) if e.code() == Some("NEEDBUCKETS") => Some(
                e.detail()
                    .unwrap_or("")
                    .split_whitespace()
                    .map_while(|w| w.parse().ok())
                    .collect(),
            ),
            _ => None,
        }
    }

    /// Whether the error is Redis's "NOSALE" reply: an order script found no
    /// sale at all.
    pub(crate) fn is_no_sale(&self) -> bool {
        matches!(self, Self::Redis(e) if e.code() == Some("NOSALE"))
    }
}

/// Whether Redis ran the call and refused it, so that the same call would
/// fail again: a script's runtime error ("ERR ..."), a script's own refusal
/// (`error({err = "flashsale: ..."})`), a wrong key type, a key outside the
/// slot, a missing permission. A server that is loading, failing over,
/// busy or out of memory passes, as do timeouts and lost connections.
fn script_fault(e: &redis::RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    match e.kind() {
        ErrorKind::Server(kind) => matches!(
            kind,
            ServerErrorKind::ResponseError
                | ServerErrorKind::ExecAbort
                | ServerErrorKind::CrossSlot
                | ServerErrorKind::NoPerm
        ),
        // Codes redis-rs has no kind for: a script's own refusal, WRONGTYPE,
        // ... are permanent; these are the server's passing states.
        ErrorKind::Extension => !matches!(
            e.code(),
            Some("BUSY" | "OOM" | "MISCONF" | "NOREPLICAS" | "UNBLOCKED")
        ),
        _ => false,
    }
}

/// The sales MySQL lists as live, each with its token (0: not known yet),
/// shared by the engine and its reserve calls.
pub(crate) type LiveMap =
    std::sync::Arc<std::sync::RwLock<std::sync::Arc<std::collections::HashMap<SaleId, u64>>>>;

/// Connection settings for the engine.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Where Redis is.
    pub topology: Topology,
    /// Replicas a write waits for (WAIT) before its caller gets an answer
    /// (0: none).
    pub wait_replicas: u32,
    /// How long a write waits for them.
    pub wait_timeout: Duration,
    /// The deployment's key prefix.
    pub key_prefix: String,
    /// How long one Redis call may take before the caller gets an error.
    pub timeout: Duration,
    /// Flow records a sale may hold before reservations are refused.
    pub flow_backlog_limit: u64,
    /// How refunds of unsettled orders are retried.
    pub refunds: RefundPolicy,
    /// How long this process answers a sale sold out from memory after
    /// Redis said so (zero: always ask Redis).
    pub sold_out_ttl: Duration,
    /// How concurrent reservations of one sale are combined.
    pub batching: Batching,
}

impl EngineOptions {
    /// The service's defaults on `topology` under `key_prefix`.
    pub fn new(topology: Topology, key_prefix: &str) -> Self {
        Self {
            topology,
            wait_replicas: 0,
            wait_timeout: Duration::from_millis(200),
            key_prefix: key_prefix.to_owned(),
            timeout: Duration::from_secs(1),
            flow_backlog_limit: 1_000_000,
            refunds: RefundPolicy::default(),
            sold_out_ttl: Duration::from_millis(100),
            batching: Batching::default(),
        }
    }
}

/// Retries of refunds that wait for their order to settle.
#[derive(Debug, Clone, Copy)]
pub struct RefundPolicy {
    /// First retry delay (doubles per attempt).
    pub first_retry: Duration,
    /// Longest retry delay.
    pub max_retry: Duration,
    /// Age at which a refund that still cannot settle is dead-lettered.
    pub dead_letter_after: Duration,
}

impl Default for RefundPolicy {
    fn default() -> Self {
        Self {
            first_retry: Duration::from_millis(200),
            max_retry: Duration::from_secs(5),
            dead_letter_after: Duration::from_secs(3600),
        }
    }
}

/// Typed calls of the scripts over one multiplexed connection. A clone is
/// one reference count: the HTTP layer clones it for every request.
#[derive(Clone)]
pub struct Engine(std::sync::Arc<EngineInner>);

/// What an [`Engine`] shares between its clones.
pub struct EngineInner {
    conn: RedisConn,
    keys: Keys,
    scripts: Scripts,
    timeout: Duration,
    refunds: RefundPolicy,
    sold_out: std::sync::Arc<sold_out::SoldOut>,
    combiner: std::sync::Arc<combiner::Combiner>,
    /// See [`Engine::set_live`].
    live: LiveMap,
    /// Per sale, the due-queue buckets the last expiry call answered as the
    /// first of the index: the next call declares them (`lua/expire.lua`).
    expiry_buckets: std::sync::Mutex<std::collections::HashMap<SaleId, Vec<u64>>>,
}

impl std::ops::Deref for Engine {
    type Target = EngineInner;

    fn deref(&self) -> &EngineInner {
        &self.0
    }
}

impl Engine {
    /// Connects (lazily: a Redis that is down now is retried on each call) and
    /// checks the URL and prefix.
    pub fn connect(opts: &EngineOptions) -> anyhow::Result<Self> {
        let conn = RedisConn::connect(
            &opts.topology,
            &topology::ConnectOptions {
                timeout: opts.timeout,
                wait_replicas: opts.wait_replicas,
                wait_timeout: opts.wait_timeout,
            },
        )?;
        let scripts = Scripts::default();
        let live = LiveMap::default();
        let combiner = combiner::Combiner::new(
            combiner::ReserveCall::new(
                conn.clone(),
                scripts.reserve.clone(),
                opts.timeout,
                opts.flow_backlog_limit,
                live.clone(),
            ),
            combiner::Batching {
                max_wait: opts.timeout,
                ..opts.batching
            },
        );
        Ok(Self(std::sync::Arc::new(EngineInner {
            conn,
            keys: Keys::new(&opts.key_prefix)?,
            scripts,
            timeout: opts.timeout,
            refunds: opts.refunds,
            sold_out: std::sync::Arc::new(sold_out::SoldOut::new(opts.sold_out_ttl)),
            combiner: std::sync::Arc::new(combiner),
            live,
            expiry_buckets: Default::default(),
        })))
    }

    /// The key layout in use.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Reserve script calls and the reservations they carried (their ratio
    /// is how many reservations one call combines).
    pub fn reserve_stats(&self) -> &ReserveStats {
        self.combiner.stats()
    }

    /// A retry key that no reserve call used: for a reserve answered with
    /// an error before any call could carry it.
    pub fn unused_retry_key(&self) -> String {
        self.combiner.unused_key()
    }

    /// Sales with a live reserve queue in this process (a queue ends after
    /// a while without reservations).
    pub fn reserve_queues(&self) -> usize {
        self.combiner.queues()
    }

    /// A clone of the multiplexed connection, for callers outside the hot path
    /// (tests, audit) that need plain commands.
    pub fn connection(&self) -> RedisConn {
        self.conn.clone()
    }

    /// Counters of acknowledged writes (`FLASHSALE_REDIS_WAIT_REPLICAS`).
    pub fn replication_stats(&self) -> ReplicationStats {
        self.conn.replication_stats()
    }

    /// A script call that changes `sale` and answers a client: with
    /// acknowledged writes, it answers only once WAIT confirmed the
    /// replicas (see [`topology::Writer`]).
    pub(crate) async fn write<T: redis::FromRedisValue + Send>(
        &self,
        sale_key: &str,
        inv: &redis::ScriptInvocation<'_>,
    ) -> Result<T, EngineError> {
        self.conn.write(sale_key, inv, self.timeout).await
    }

    async fn timed<T>(
        &self,
        fut: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, EngineError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => r.map_err(EngineError::from_redis),
            Err(_) => Err(EngineError::Timeout(self.timeout)),
        }
    }

    /// Runs a script that declares buckets (of the due-queue or the orders)
    /// as keys: `build` makes the call declaring `buckets`; when the script
    /// names others it needs ("NEEDBUCKETS", having written nothing), they
    /// are added and the call is sent again, at most `retries` times.
    async fn invoke_declaring<'s, T: redis::FromRedisValue>(
        &self,
        mut buckets: Vec<u64>,
        retries: usize,
        build: impl Fn(&[u64]) -> redis::ScriptInvocation<'s>,
    ) -> Result<T, EngineError> {
        let mut attempts = 0;
        loop {
            let inv = build(&buckets);
            let mut c = self.conn.clone();
            match self.timed(inv.invoke_async(&mut c)).await {
                Err(e) if attempts < retries => match e.needed_buckets() {
                    Some(need) => {
                        attempts += 1;
                        buckets.extend(need);
                    }
                    None => return Err(e),
                },
                other => return other,
            }
        }
    }

    /// The sales MySQL lists as live (the live list of `workers::live`
    /// keeps it up to date): a sale on it that Redis does not hold was lost
    /// by Redis, and is answered as fenced, never as not found.
    /// Each sale comes with its token (`sales.redis_token` as a number; 0
    /// while not known): reserve calls pass it, and a sale hash of another
    /// token is refused as another database's.
    pub fn set_live(&self, sales: impl IntoIterator<Item = (SaleId, u64)>) {
        let map: std::collections::HashMap<SaleId, u64> = sales.into_iter().collect();
        *self.live.write().unwrap_or_else(|p| p.into_inner()) = std::sync::Arc::new(map);
    }

    /// Whether MySQL lists `sale` as live (see [`Engine::set_live`]).
    pub fn is_live(&self, sale: SaleId) -> bool {
        self.live
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&sale)
    }

    /// What a call that found no sale `sale` in Redis answers: nothing (a
    /// sale this deployment does not know), or, for a sale MySQL lists as
    /// live, that it is fenced: Redis lost it, and it is rebuilt from MySQL.
    pub(crate) fn missing(&self, sale: SaleId) -> Result<(), EngineError> {
        if self.is_live(sale) {
            Err(EngineError::Fenced("missing".into()))
        } else {
            Ok(())
        }
    }

    /// PING.
    pub async fn ping(&self) -> Result<(), EngineError> {
        let mut c = self.conn.clone();
        self.timed(async move { c.ping_one().await }).await
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

    /// Redis's clock in ms since the epoch.
    pub async fn now_ms(&self) -> Result<i64, EngineError> {
        let mut c = self.conn.clone();
        let (secs, micros): (i64, i64) = self
            .timed(async move { redis::cmd("TIME").query_async(&mut c).await })
            .await?;
        Ok(secs * 1000 + micros / 1000)
    }
}
