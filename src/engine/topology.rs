//! One connection type over the three Redis topologies the service runs on:
//! one node (`REDIS_URL`), a primary with replicas watched by Sentinel
//! (`FLASHSALE_REDIS_SENTINELS`, `FLASHSALE_REDIS_SENTINEL_MASTER`), and
//! Redis Cluster (`FLASHSALE_REDIS_CLUSTER`). Failover is Redis's own: this
//! layer only follows it (Sentinel's answer, the cluster's slot map).
//!
//! Writes that must survive a failover (`FLASHSALE_REDIS_WAIT_REPLICAS`)
//! go through [`Writer`]: each call is sent with its `WAIT` on a connection
//! of its own to the primary that takes it, since `WAIT` covers what its own
//! connection sent and blocks that connection until the replicas answer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::sentinel::{SentinelClient, SentinelServerType};
use redis::{AsyncConnectionConfig, Cmd, Pipeline, RedisFuture, RedisResult, Value};

use super::EngineError;

/// Where Redis is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topology {
    /// One node: `redis://host:port[/db]`.
    Node(String),
    /// A primary and its replicas, watched by these sentinels under `master`.
    Sentinel {
        /// `redis://host:port` of each sentinel.
        sentinels: Vec<String>,
        /// The name the sentinels watch the primary under.
        master: String,
    },
    /// Redis Cluster, found from these seed nodes (`redis://host:port`).
    Cluster(Vec<String>),
}

impl Topology {
    /// The topology the settings name: Sentinel or Cluster when set (not
    /// both), else the one node of `redis_url`.
    pub fn choose(
        redis_url: &str,
        sentinels: Option<&str>,
        master: Option<&str>,
        cluster: Option<&str>,
    ) -> anyhow::Result<Self> {
        let list = |s: Option<&str>, name: &str| -> anyhow::Result<Vec<String>> {
            let items: Vec<String> = s
                .unwrap_or("")
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect();
            for item in &items {
                redis::parse_redis_url(item)
                    .filter(|u| u.scheme() == "redis")
                    .ok_or_else(|| {
                        anyhow::anyhow!("{name}: {item:?} is not a redis://host:port address")
                    })?;
            }
            Ok(items)
        };
        let sentinels = list(sentinels, "FLASHSALE_REDIS_SENTINELS")?;
        let cluster = list(cluster, "FLASHSALE_REDIS_CLUSTER")?;
        let master = master.map(str::trim).filter(|m| !m.is_empty());
        match (sentinels.is_empty(), cluster.is_empty()) {
            (false, false) => anyhow::bail!(
                "FLASHSALE_REDIS_SENTINELS and FLASHSALE_REDIS_CLUSTER are both set: choose one"
            ),
            (false, true) => Ok(Self::Sentinel {
                sentinels,
                master: master
                    .ok_or_else(|| {
                        anyhow::anyhow!(
                            "FLASHSALE_REDIS_SENTINELS is set: FLASHSALE_REDIS_SENTINEL_MASTER must name the primary"
                        )
                    })?
                    .to_owned(),
            }),
            (true, false) => Ok(Self::Cluster(cluster)),
            (true, true) => {
                anyhow::ensure!(
                    master.is_none(),
                    "FLASHSALE_REDIS_SENTINEL_MASTER is set without FLASHSALE_REDIS_SENTINELS"
                );
                Ok(Self::Node(redis_url.to_owned()))
            }
        }
    }

    /// For logs: the kind and addresses, without credentials.
    pub fn describe(&self) -> String {
        let bare = |u: &String| {
            redis::parse_redis_url(u)
                .map(|u| {
                    format!(
                        "{}:{}",
                        u.host_str().unwrap_or("?"),
                        u.port().unwrap_or(6379)
                    )
                })
                .unwrap_or_else(|| "?".into())
        };
        let all = |v: &Vec<String>| v.iter().map(bare).collect::<Vec<_>>().join(",");
        match self {
            Self::Node(u) => format!("one node ({})", bare(u)),
            Self::Sentinel { sentinels, master } => {
                format!("Sentinel, primary {master:?} ({})", all(sentinels))
            }
            Self::Cluster(seeds) => format!("Cluster ({})", all(seeds)),
        }
    }
}

/// Connection settings of [`RedisConn::connect`].
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// How long a call may take; connections give up a little earlier, so
    /// that a broken one is noticed by the layer that can replace it.
    pub timeout: Duration,
    /// Replicas each write waits for (0: none).
    pub wait_replicas: u32,
    /// How long a write waits for them.
    pub wait_timeout: Duration,
}

/// A connection to whichever topology is configured. A clone shares the
/// underlying connections.
#[derive(Clone)]
pub struct RedisConn {
    link: Link,
    acks: Option<Arc<Acks>>,
}

#[derive(Clone)]
enum Link {
    Node(ConnectionManager, redis::Client),
    Sentinel(Arc<SentinelLink>),
    Cluster(ClusterConnection),
}

impl RedisConn {
    /// Connects lazily: a Redis that is away now is tried again on each call.
    pub fn connect(topology: &Topology, opts: &ConnectOptions) -> anyhow::Result<Self> {
        let inner = opts.timeout.mul_f64(0.9).max(Duration::from_millis(1));
        let link = match topology {
            Topology::Node(url) => {
                let client = redis::Client::open(url.as_str())?;
                // Short connection attempts and few retries: while Redis is
                // away, a caller gets an error quickly instead of waiting on
                // a reconnect loop; the next call starts a new attempt.
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(opts.timeout))
                    .set_response_timeout(Some(opts.timeout))
                    .set_number_of_retries(1)
                    .set_min_delay(Duration::from_millis(50))
                    .set_max_delay(Duration::from_millis(200));
                Link::Node(
                    ConnectionManager::new_lazy_with_config(client.clone(), config)?,
                    client,
                )
            }
            Topology::Sentinel { sentinels, master } => {
                let client = SentinelClient::build(
                    sentinels.clone(),
                    master.clone(),
                    None,
                    SentinelServerType::Master,
                )?;
                Link::Sentinel(Arc::new(SentinelLink {
                    client: tokio::sync::Mutex::new(client),
                    current: Mutex::new(None),
                    config: AsyncConnectionConfig::new()
                        .set_connection_timeout(Some(inner))
                        .set_response_timeout(Some(inner)),
                    generation: Default::default(),
                }))
            }
            Topology::Cluster(seeds) => {
                // Few retries: a resent script may run twice (its call id
                // makes the second run a no-op), and during a failover the
                // caller is better served by a quick 503 than a long wait.
                let client = redis::cluster::ClusterClientBuilder::new(seeds.clone())
                    .retries(2)
                    .min_retry_wait(20)
                    .max_retry_wait(200)
                    .build()?;
                let config = redis::cluster::ClusterConfig::new()
                    .set_connection_timeout(inner)
                    .set_response_timeout(inner);
                Link::Cluster(client.get_pending_async_connection_with_config(config))
            }
        };
        let acks = (opts.wait_replicas > 0).then(|| {
            Arc::new(Acks {
                replicas: opts.wait_replicas,
                timeout: opts.wait_timeout,
                connect_timeout: inner,
                lanes: Mutex::default(),
                slots: Mutex::default(),
                refreshed: Mutex::default(),
                stats: ReplicationStats::default(),
            })
        });
        Ok(Self { link, acks })
    }

    /// Replicas each write waits for (0: none).
    pub fn wait_replicas(&self) -> u32 {
        self.acks.as_ref().map_or(0, |a| a.replicas)
    }

    /// Counters of acknowledged writes, for metrics.
    pub fn replication_stats(&self) -> ReplicationStats {
        self.acks
            .as_ref()
            .map(|a| a.stats.clone())
            .unwrap_or_default()
    }

    /// Sends `cmd` to the node that holds `key` (on a cluster; elsewhere,
    /// to the one primary): for commands the cluster client cannot route by
    /// themselves, such as SCAN over one sale's keys.
    pub async fn query_at<T: redis::FromRedisValue>(
        &mut self,
        key: &str,
        cmd: &Cmd,
    ) -> RedisResult<T> {
        match &mut self.link {
            Link::Cluster(c) => {
                let route = redis::cluster_routing::Route::with_key(
                    key,
                    redis::cluster_routing::SlotAddr::Master,
                );
                let v = c
                    .route_command(
                        cmd.clone(),
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route)),
                    )
                    .await?;
                redis::from_redis_value(v.extract_error()?).map_err(Into::into)
            }
            _ => cmd.query_async(self).await,
        }
    }

    /// PING to one node (on a cluster, any: readiness must not hang on one
    /// shard that is failing over while the others serve).
    pub async fn ping_one(&mut self) -> RedisResult<()> {
        let ping = redis::cmd("PING");
        match &mut self.link {
            Link::Cluster(c) => c
                .route_command(ping, RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random))
                .await?
                .extract_error()
                .map(drop),
            _ => ping.query_async::<()>(self).await,
        }
    }

    /// Sends `call`, a write to the sale that `key` belongs to, through
    /// [`RedisConn::writer`] within `timeout`: with acknowledged writes its
    /// answer comes only once WAIT confirmed the replicas (see
    /// [`Writer::settle`]); one that runs out of time is counted as
    /// unacknowledged (it may have run: the caller gets a retry key).
    pub async fn write<T: redis::FromRedisValue + Send>(
        &self,
        key: &str,
        call: &impl WriteCall,
        timeout: Duration,
    ) -> Result<T, EngineError> {
        let run = async {
            let mut w = self.writer(key).await?;
            let r = call.send(&mut w).await.map_err(EngineError::from_redis);
            w.settle(r)
        };
        match tokio::time::timeout(timeout, run).await {
            Ok(r) => r,
            Err(_) => {
                if let Some(acks) = &self.acks {
                    acks.stats.unacknowledged.inc();
                }
                Err(EngineError::Timeout(timeout))
            }
        }
    }

    /// Sends `cmd` to every primary (a cluster's; elsewhere the one) and
    /// returns each one's answer.
    pub async fn query_primaries<T: redis::FromRedisValue>(
        &mut self,
        cmd: &Cmd,
    ) -> RedisResult<Vec<T>> {
        match &mut self.link {
            Link::Cluster(c) => {
                let mut out = Vec::new();
                for (host, port) in cluster_primaries(c).await? {
                    let v = c
                        .route_command(
                            cmd.clone(),
                            RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                                host,
                                port,
                            }),
                        )
                        .await?;
                    out.push(redis::from_redis_value(v.extract_error()?)?);
                }
                Ok(out)
            }
            _ => Ok(vec![cmd.query_async(self).await?]),
        }
    }

    /// The connection a write to `key` (a key of the sale it changes) goes
    /// out on: this shared one, or with acknowledged writes, one of its own
    /// to the primary holding `key`, refused before anything is sent while
    /// that primary has fewer replicas than asked for.
    pub async fn writer(&self, key: &str) -> Result<Writer, EngineError> {
        let Some(acks) = &self.acks else {
            return Ok(Writer::Shared(self.clone()));
        };
        let lane = self.lane_for(acks, key).await?;
        let mut conn = lane.take(acks.connect_timeout).await.map_err(|e| {
            self.forget_primary(acks, &lane.addr);
            EngineError::from_redis(e)
        })?;
        let connected = match lane.replicas(&mut conn).await {
            Ok(Some(n)) => n,
            Ok(None) => {
                // No longer the primary (a failover demoted it, or a
                // restarted old primary rejoined as a replica): the next
                // write asks the topology again.
                lane.give_back(conn);
                self.forget_primary(acks, &lane.addr);
                acks.stats.refused.inc();
                return Err(EngineError::Replicas {
                    connected: 0,
                    wanted: acks.replicas,
                });
            }
            Err(e) => {
                self.forget_primary(acks, &lane.addr);
                return Err(EngineError::from_redis(e));
            }
        };
        if connected < acks.replicas {
            lane.give_back(conn);
            // The primary may have moved without this lane noticing (a
            // planned switch leaves the old one answering): look again, at
            // most once a second.
            if acks.may_refresh() {
                self.forget_primary(acks, &lane.addr);
            }
            acks.stats.refused.inc();
            return Err(EngineError::Replicas {
                connected,
                wanted: acks.replicas,
            });
        }
        Ok(Writer::Acked(AckedConn {
            conn: Some(conn),
            lane,
            acks: acks.clone(),
            acked: None,
            me: self.clone(),
        }))
    }

    /// The lane (connections to one primary) that writes to `key` take.
    async fn lane_for(&self, acks: &Acks, key: &str) -> Result<Arc<Lane>, EngineError> {
        let (addr, client) = match &self.link {
            Link::Node(_, client) => (client.get_connection_info().addr().to_string(), None),
            Link::Sentinel(s) => {
                let p = s.current().await.map_err(EngineError::from_redis)?;
                (p.addr.clone(), Some(p.client.clone()))
            }
            Link::Cluster(c) => {
                let slot = slot_of(key);
                let known = acks.primary_of_slot(slot);
                let (host, port) = match known {
                    Some(hp) => hp,
                    None => {
                        let mut c = c.clone();
                        let map = cluster_slots(&mut c)
                            .await
                            .map_err(EngineError::from_redis)?;
                        let hp = map
                            .iter()
                            .find(|(from, to, _)| (*from..=*to).contains(&slot))
                            .map(|(_, _, hp)| hp.clone())
                            .ok_or_else(|| {
                                // A gap in the slot map (mid-failover, or
                                // slots not assigned yet) passes.
                                EngineError::from_redis(redis::RedisError::from((
                                    redis::ErrorKind::Server(redis::ServerErrorKind::ClusterDown),
                                    "no primary holds the sale's slot",
                                )))
                            })?;
                        *acks.slots.lock().unwrap_or_else(|p| p.into_inner()) = map;
                        hp
                    }
                };
                (host_port(&host, port), None)
            }
        };
        let mut lanes = acks.lanes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = lanes.get(&addr) {
            return Ok(l.clone());
        }
        let client = match (client, &self.link) {
            (Some(c), _) => c,
            (None, Link::Node(_, c)) => c.clone(),
            (None, _) => {
                redis::Client::open(format!("redis://{addr}")).map_err(EngineError::from_redis)?
            }
        };
        let lane = Arc::new(Lane {
            addr: addr.clone(),
            client,
            idle: Mutex::default(),
            replicas: Mutex::new(None),
        });
        lanes.insert(addr, lane.clone());
        Ok(lane)
    }

    /// After a failure on the primary at `addr`: the next write asks the
    /// topology again where the primary is.
    fn forget_primary(&self, acks: &Acks, addr: &str) {
        acks.lanes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(addr);
        // Only that primary's slot ranges: the other shards' stay known.
        acks.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(_, _, (host, port))| host_port(host, *port) != addr);
        if let Link::Sentinel(s) = &self.link {
            s.forget_addr(addr);
        }
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match &mut self.link {
            Link::Node(c, _) => c.req_packed_command(cmd),
            Link::Cluster(c) => c.req_packed_command(cmd),
            Link::Sentinel(s) => {
                let s = s.clone();
                Box::pin(async move {
                    let p = s.current().await?;
                    let r = p.conn.clone().req_packed_command(cmd).await;
                    s.check(p.generation, &r);
                    r
                })
            }
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match &mut self.link {
            Link::Node(c, _) => c.req_packed_commands(pipeline, offset, count),
            Link::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
            Link::Sentinel(s) => {
                let s = s.clone();
                Box::pin(async move {
                    let p = s.current().await?;
                    let r = p
                        .conn
                        .clone()
                        .req_packed_commands(pipeline, offset, count)
                        .await;
                    s.check(p.generation, &r);
                    r
                })
            }
        }
    }

    fn get_db(&self) -> i64 {
        match &self.link {
            Link::Node(c, _) => c.get_db(),
            Link::Cluster(c) => c.get_db(),
            Link::Sentinel(_) => 0,
        }
    }
}

/// The primary Sentinel names, and one multiplexed connection to it, asked
/// for again after a connection error or a READONLY answer (the node was
/// demoted).
struct SentinelLink {
    client: tokio::sync::Mutex<SentinelClient>,
    /// Shared by reference: a call clones the `Arc`, not the client.
    current: Mutex<Option<Arc<Primary>>>,
    config: AsyncConnectionConfig,
    generation: std::sync::atomic::AtomicU64,
}

/// The primary the sentinels named, and the connection to it.
struct Primary {
    /// Which answer of the sentinels this is (an error forgets only its own).
    generation: u64,
    client: redis::Client,
    /// `host:port`, as lanes are keyed.
    addr: String,
    conn: MultiplexedConnection,
}

impl SentinelLink {
    fn cached(&self) -> Option<Arc<Primary>> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    async fn current(&self) -> RedisResult<Arc<Primary>> {
        if let Some(p) = self.cached() {
            return Ok(p);
        }
        let mut sentinel = self.client.lock().await;
        // Another caller may have asked while this one waited.
        if let Some(p) = self.cached() {
            return Ok(p);
        }
        // The sentinels' answer, checked with ROLE on the node itself.
        let client = sentinel.async_get_client().await?;
        let conn = client
            .get_multiplexed_async_connection_with_config(&self.config)
            .await?;
        let p = Arc::new(Primary {
            generation: 1 + self
                .generation
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            addr: client.get_connection_info().addr().to_string(),
            client,
            conn,
        });
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(p.clone());
        Ok(p)
    }

    /// Forgets the connection of `generation` when `r` shows that it broke
    /// or that its node is no longer the primary.
    fn check<T>(&self, generation: u64, r: &RedisResult<T>) {
        let Err(e) = r else { return };
        if lost_primary(e) {
            let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
            if current.as_ref().is_some_and(|c| c.generation == generation) {
                *current = None;
            }
        }
    }

    fn forget_addr(&self, addr: &str) {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if current.as_ref().is_some_and(|c| c.addr == addr) {
            *current = None;
        }
    }
}

/// Whether an error means that the node is gone or no longer the primary.
fn lost_primary(e: &redis::RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || matches!(
            e.kind(),
            ErrorKind::Server(ServerErrorKind::ReadOnly | ServerErrorKind::MasterDown)
        )
}

/// Counters of acknowledged writes.
#[derive(Clone, Debug, Default)]
pub struct ReplicationStats {
    /// Writes that ran but whose WAIT saw fewer replicas than asked for.
    pub unacknowledged: Counter,
    /// Writes refused before running: too few replicas connected.
    pub refused: Counter,
}

/// A cluster's slot range (first, last) and the address of its primary.
type SlotRange = (u16, u16, (String, u16));

/// What acknowledged writes share.
struct Acks {
    replicas: u32,
    timeout: Duration,
    connect_timeout: Duration,
    /// Per primary address, its lane.
    lanes: Mutex<HashMap<String, Arc<Lane>>>,
    /// A cluster's slot ranges and their primaries (empty: ask).
    slots: Mutex<Vec<SlotRange>>,
    /// When a lane short of replicas last made the topology be asked again.
    refreshed: Mutex<Option<Instant>>,
    stats: ReplicationStats,
}

impl Acks {
    /// Whether a caller may make the lanes ask the topology again now (at
    /// most once a second).
    fn may_refresh(&self) -> bool {
        let mut last = self.refreshed.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|at| at.elapsed() < Duration::from_secs(1)) {
            return false;
        }
        *last = Some(Instant::now());
        true
    }

    fn primary_of_slot(&self, slot: u16) -> Option<(String, u16)> {
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|(from, to, _)| (*from..=*to).contains(&slot))
            .map(|(_, _, hp)| hp.clone())
    }
}

/// Connections of their own to one primary: each carries one write and
/// its WAIT at a time.
struct Lane {
    addr: String,
    client: redis::Client,
    idle: Mutex<Vec<MultiplexedConnection>>,
    /// Replicas connected, and when that was asked.
    replicas: Mutex<Option<(Instant, u32)>>,
}

/// How long a primary's count of connected replicas is trusted.
const REPLICAS_FRESH: Duration = Duration::from_millis(200);

/// A replica acknowledges its primary's stream every second; one whose last
/// acknowledgement is older than this is frozen, cut off or far behind (a
/// busy machine delays an acknowledgement by a second at times: 3, not 2).
const REPLICA_MAX_LAG_SECS: i64 = 3;

/// The replicas an `INFO replication` reply shows online with a lag of at
/// most [`REPLICA_MAX_LAG_SECS`]; `None` unless the node is a primary.
fn live_replicas(info: &str) -> Option<u32> {
    let field = |line: &str, name: &str| {
        line.split(',')
            .find_map(|kv| kv.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
            .map(str::to_owned)
    };
    let mut primary = false;
    let mut n = 0;
    for line in info.lines().map(str::trim) {
        if line == "role:master" {
            primary = true;
        }
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        if key.starts_with("slave") && key[5..].chars().all(|c| c.is_ascii_digit()) {
            let online = field(value, "state").as_deref() == Some("online");
            // Redis computes the lag against its cached clock: -1 happens.
            let lag = field(value, "lag").and_then(|l| l.parse::<i64>().ok());
            if online && lag.is_some_and(|l| l <= REPLICA_MAX_LAG_SECS) {
                n += 1;
            }
        }
    }
    primary.then_some(n)
}

/// `host:port`, with an IPv6 host in brackets (as URLs and lane keys want it).
fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

impl Lane {
    async fn take(&self, timeout: Duration) -> RedisResult<MultiplexedConnection> {
        if let Some(c) = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop() {
            return Ok(c);
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(None);
        self.client
            .get_multiplexed_async_connection_with_config(&config)
            .await
    }

    fn give_back(&self, c: MultiplexedConnection) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < 64 {
            idle.push(c);
        }
    }

    /// Replicas of this primary that are online and acknowledged its stream
    /// within [`REPLICA_MAX_LAG_SECS`] (`INFO replication`), asked at most
    /// every [`REPLICAS_FRESH`]; `None` when the node is no longer a
    /// primary. A frozen or cut-off replica stays "connected" until the
    /// primary's `repl-timeout` (60 s by default): its lag tells sooner.
    async fn replicas(&self, c: &mut MultiplexedConnection) -> RedisResult<Option<u32>> {
        if let Some((at, n)) = *self.replicas.lock().unwrap_or_else(|p| p.into_inner()) {
            if at.elapsed() < REPLICAS_FRESH {
                return Ok(Some(n));
            }
        }
        let info: String = redis::cmd("INFO").arg("replication").query_async(c).await?;
        let Some(n) = live_replicas(&info) else {
            tracing::warn!(primary = %self.addr, "not a primary any more: asking the topology again");
            return Ok(None);
        };
        if n == 0 {
            tracing::debug!(primary = %self.addr, info = %info.replace("\r\n", " "), "no replica online and current");
        }
        *self.replicas.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), n));
        Ok(Some(n))
    }
}

/// What goes out on a [`Writer`]: a script call or a plain command.
pub trait WriteCall: Sync {
    /// Sends it on `w` and decodes the answer.
    fn send<'a, T: redis::FromRedisValue + Send + 'a>(
        &'a self,
        w: &'a mut Writer,
    ) -> RedisFuture<'a, T>;
}

impl WriteCall for redis::ScriptInvocation<'_> {
    fn send<'a, T: redis::FromRedisValue + Send + 'a>(
        &'a self,
        w: &'a mut Writer,
    ) -> RedisFuture<'a, T> {
        Box::pin(self.invoke_async(w))
    }
}

impl WriteCall for Cmd {
    fn send<'a, T: redis::FromRedisValue + Send + 'a>(
        &'a self,
        w: &'a mut Writer,
    ) -> RedisFuture<'a, T> {
        Box::pin(self.query_async(w))
    }
}

/// The connection one write goes out on.
pub enum Writer {
    /// The shared connection (no acknowledgement asked for).
    Shared(RedisConn),
    /// A connection of its own, each command followed by WAIT.
    Acked(AckedConn),
}

impl Writer {
    /// The call's result, unless its WAIT saw fewer replicas than asked
    /// for: then the write happened on the primary but may not survive a
    /// failover, and the caller is told so.
    pub fn settle<T>(self, r: Result<T, EngineError>) -> Result<T, EngineError> {
        match self {
            Self::Shared(_) => r,
            Self::Acked(mut a) => {
                let r = r?;
                let acked = a.acked.unwrap_or(0);
                let wanted = a.acks.replicas;
                // The connection carried its call to the end: reusable.
                if let Some(c) = a.conn.take() {
                    a.lane.give_back(c);
                }
                if acked < i64::from(wanted) {
                    a.acks.stats.unacknowledged.inc();
                    // The replica count is stale: ask again next time.
                    *a.lane.replicas.lock().unwrap_or_else(|p| p.into_inner()) = None;
                    return Err(EngineError::Unacknowledged {
                        acked: acked.max(0) as u32,
                        wanted,
                    });
                }
                Ok(r)
            }
        }
    }
}

impl ConnectionLike for Writer {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Shared(c) => c.req_packed_command(cmd),
            Self::Acked(a) => Box::pin(a.send(cmd)),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Shared(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Acked(_) => Box::pin(async {
                Err(redis::RedisError::from((
                    redis::ErrorKind::Client,
                    "an acknowledged write sends one command at a time",
                )))
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Shared(c) => c.get_db(),
            Self::Acked(_) => 0,
        }
    }
}

/// One write's own connection to its primary.
pub struct AckedConn {
    /// `None` once given back or broken.
    conn: Option<MultiplexedConnection>,
    lane: Arc<Lane>,
    acks: Arc<Acks>,
    /// The fewest replicas a WAIT of this call confirmed.
    acked: Option<i64>,
    me: RedisConn,
}

impl AckedConn {
    /// `cmd`, then WAIT, back to back on this connection; the answer is
    /// `cmd`'s, WAIT's count is kept for [`Writer::settle`].
    async fn send(&mut self, cmd: &Cmd) -> RedisResult<Value> {
        let Some(conn) = self.conn.as_mut() else {
            return Err(redis::RedisError::from((
                redis::ErrorKind::Client,
                "the write's connection broke",
            )));
        };
        let mut p = redis::pipe();
        p.add_command(cmd.clone())
            .cmd("WAIT")
            .arg(self.acks.replicas)
            .arg(self.acks.timeout.as_millis() as u64);
        let r = conn.req_packed_commands(&p, 0, 2).await;
        match r {
            Ok(mut values) if values.len() == 2 => {
                let wait = values.pop();
                let answer = values.pop().unwrap_or(Value::Nil);
                if let Some(Value::Int(n)) = wait {
                    self.acked = Some(self.acked.map_or(n, |a| a.min(n)));
                }
                if let Value::ServerError(e) = &answer {
                    // MOVED, READONLY, ...: the primary moved; ask again.
                    let e: redis::RedisError = e.clone().into();
                    if lost_primary(&e) || e.redirect_node().is_some() {
                        self.me.forget_primary(&self.acks, &self.lane.addr);
                    }
                }
                Ok(answer)
            }
            Ok(values) => Err(redis::RedisError::from((
                redis::ErrorKind::Client,
                "WAIT pipeline",
                format!("{} replies for 2 commands", values.len()),
            ))),
            Err(e) => {
                // Whether it ran is unknown: the connection is not reused.
                self.conn = None;
                self.me.forget_primary(&self.acks, &self.lane.addr);
                Err(e)
            }
        }
    }
}

/// The cluster slot of `key` (its hash tag's, when it has one).
pub fn slot_of(key: &str) -> u16 {
    let b = key.as_bytes();
    let tagged = b.iter().position(|&c| c == b'{').and_then(|open| {
        let rest = &b[open + 1..];
        rest.iter()
            .position(|&c| c == b'}')
            .filter(|&close| close > 0)
            .map(|close| &rest[..close])
    });
    crc16::State::<crc16::XMODEM>::calculate(tagged.unwrap_or(b)) % 16384
}

/// A cluster's slot ranges with their primaries (CLUSTER SLOTS).
async fn cluster_slots(c: &mut ClusterConnection) -> RedisResult<Vec<SlotRange>> {
    let v: Vec<Value> = redis::cmd("CLUSTER").arg("SLOTS").query_async(c).await?;
    let mut out = Vec::new();
    for range in v {
        let Value::Array(parts) = range else { continue };
        let (Some(Value::Int(from)), Some(Value::Int(to)), Some(Value::Array(primary))) =
            (parts.first(), parts.get(1), parts.get(2))
        else {
            continue;
        };
        let (Some(Value::BulkString(host)), Some(Value::Int(port))) =
            (primary.first(), primary.get(1))
        else {
            continue;
        };
        out.push((
            *from as u16,
            *to as u16,
            (String::from_utf8_lossy(host).into_owned(), *port as u16),
        ));
    }
    Ok(out)
}

/// Every primary of a cluster.
async fn cluster_primaries(c: &mut ClusterConnection) -> RedisResult<Vec<(String, u16)>> {
    let mut all: Vec<(String, u16)> = cluster_slots(c)
        .await?
        .into_iter()
        .map(|(_, _, hp)| hp)
        .collect();
    all.sort();
    all.dedup();
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_topology_follows_the_settings() {
        let url = "redis://127.0.0.1:6379";
        assert_eq!(
            Topology::choose(url, None, None, None).unwrap(),
            Topology::Node(url.into())
        );
        assert_eq!(
            Topology::choose(url, None, None, Some("redis://a:1, redis://b:2")).unwrap(),
            Topology::Cluster(vec!["redis://a:1".into(), "redis://b:2".into()])
        );
        assert_eq!(
            Topology::choose(url, Some("redis://s:26379"), Some("main"), None).unwrap(),
            Topology::Sentinel {
                sentinels: vec!["redis://s:26379".into()],
                master: "main".into()
            }
        );
        for (s, m, c) in [
            (Some("redis://s:1"), None, None),
            (None, Some("main"), None),
            (Some("redis://s:1"), Some("main"), Some("redis://c:1")),
            (None, None, Some("http://c:1")),
            (None, None, Some("c:1")),
        ] {
            assert!(Topology::choose(url, s, m, c).is_err(), "{s:?} {m:?} {c:?}");
        }
    }

    #[test]
    fn only_online_replicas_that_acknowledged_lately_count() {
        let info = "# Replication\r\nrole:master\r\nconnected_slaves:3\r\n\
            slave0:ip=127.0.0.1,port=7001,state=online,offset=100,lag=0\r\n\
            slave1:ip=127.0.0.1,port=7002,state=online,offset=90,lag=4\r\n\
            slave2:ip=127.0.0.1,port=7003,state=wait_bgsave,offset=0,lag=0\r\n\
            slave3:ip=127.0.0.1,port=7004,state=online,offset=100,lag=-1\r\n\
            master_failover_state:no-failover\r\n";
        assert_eq!(live_replicas(info), Some(2));
        assert_eq!(
            live_replicas("role:master\r\nconnected_slaves:0\r\n"),
            Some(0)
        );
        assert_eq!(
            live_replicas("role:slave\r\nmaster_host:127.0.0.1\r\n"),
            None
        );
        assert_eq!(host_port("::1", 7000), "[::1]:7000");
        assert_eq!(host_port("10.0.0.1", 7000), "10.0.0.1:7000");
    }

    #[test]
    fn slots_follow_the_hash_tag() {
        // Values from CLUSTER KEYSLOT.
        assert_eq!(slot_of("foo"), 12182);
        assert_eq!(slot_of("{user1000}.following"), slot_of("user1000"));
        assert_eq!(slot_of("fs:{s7}:sale"), slot_of("fs:{s7}:orders"));
        assert_eq!(slot_of("{}x"), slot_of("{}x"));
    }
}
