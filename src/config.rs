//! Configuration by flags and environment, one clap struct per concern.
//!
//! The environment names are a contract (outside scripts start the binary with
//! them): `REDIS_URL`, `DATABASE_URL`, and `FLASHSALE_*` for the rest. Secrets
//! are wrapped so that they never reach a log or a `Debug` print.

use std::net::SocketAddr;
use std::time::Duration;

use secrecy::SecretString;

/// Shortest secret accepted, in bytes (HS256 and HMAC-SHA256 keys shorter
/// than the hash are guessable).
pub const MIN_SECRET_BYTES: usize = 32;

/// Reads secret `name` from the environment (never from a flag: flags show
/// in `ps`), refusing a missing or short one with a message naming it.
pub fn secret_from_env(name: &str) -> anyhow::Result<SecretString> {
    let value = std::env::var(name).map_err(|_| anyhow::anyhow!("{name} must be set"))?;
    secret_value(name, &value)
}

/// Checks a secret's length; `name` is the variable it came from.
pub fn secret_value(name: &str, value: &str) -> anyhow::Result<SecretString> {
    anyhow::ensure!(
        value.len() >= MIN_SECRET_BYTES,
        "{name} must be at least {MIN_SECRET_BYTES} bytes long (it has {})",
        value.len()
    );
    Ok(SecretString::from(value.to_owned()))
}

/// The three secrets of the HTTP role, read from the environment only.
#[derive(Debug, Clone)]
pub struct Secrets {
    /// `FLASHSALE_JWT_SECRET`: HS256 secret that signs buyer tokens.
    pub jwt_secret: SecretString,
    /// `FLASHSALE_ADMIN_TOKEN`: bearer token of the admin.
    pub admin_token: SecretString,
    /// `FLASHSALE_PAYMENT_SECRET`: secret of the gateway's callback signature.
    pub payment_secret: SecretString,
}

impl Secrets {
    /// Reads all three from the environment.
    pub fn from_env() -> anyhow::Result<Self> {
        Ok(Self {
            jwt_secret: secret_from_env("FLASHSALE_JWT_SECRET")?,
            admin_token: secret_from_env("FLASHSALE_ADMIN_TOKEN")?,
            payment_secret: secret_from_env("FLASHSALE_PAYMENT_SECRET")?,
        })
    }
}

/// Where the two stores are.
#[derive(clap::Args, Debug, Clone)]
pub struct StoreConfig {
    /// Redis URL; a database index (`redis://host:6379/3`) keeps deployments apart.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,

    /// Redis Sentinel addresses, comma-separated (`redis://host:26379,...`):
    /// the primary is the one they name `--redis-sentinel-master`. Takes
    /// precedence over REDIS_URL.
    #[arg(long, env = "FLASHSALE_REDIS_SENTINELS")]
    pub redis_sentinels: Option<String>,

    /// The name the sentinels watch the primary under.
    #[arg(long, env = "FLASHSALE_REDIS_SENTINEL_MASTER")]
    pub redis_sentinel_master: Option<String>,

    /// Redis Cluster seed nodes, comma-separated (`redis://host:7000,...`).
    /// Takes precedence over REDIS_URL.
    #[arg(long, env = "FLASHSALE_REDIS_CLUSTER")]
    pub redis_cluster: Option<String>,

    /// Replicas that must hold a write (Redis WAIT) before its client gets
    /// an answer; 0: answer as soon as the primary has it.
    #[arg(long, env = "FLASHSALE_REDIS_WAIT_REPLICAS", default_value_t = 0)]
    pub redis_wait_replicas: u32,

    /// How long a write waits for those replicas, in ms; at most half of
    /// FLASHSALE_REDIS_TIMEOUT_MS. A write not confirmed in time is answered
    /// 503 with a retry key.
    #[arg(long, env = "FLASHSALE_REDIS_WAIT_TIMEOUT_MS", default_value_t = 200,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub redis_wait_timeout_ms: u64,

    /// MySQL/MariaDB URL; the database is created if missing and migrated.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "mysql://root@127.0.0.1:3306/flashsale"
    )]
    pub database_url: String,

    /// Prefix of every Redis key of this deployment (no braces).
    #[arg(long, env = "FLASHSALE_KEY_PREFIX", default_value = "fs")]
    pub key_prefix: String,

    /// How long one Redis call may take before the request fails with 503, in ms.
    #[arg(long, env = "FLASHSALE_REDIS_TIMEOUT_MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub redis_timeout_ms: u64,

    /// Flow records a sale may have waiting for MySQL before new reservations
    /// are refused with 503 (payments, cancels and expiries go on).
    #[arg(
        long,
        env = "FLASHSALE_FLOW_BACKLOG_LIMIT",
        default_value_t = 1_000_000
    )]
    pub flow_backlog_limit: u64,

    /// How long, in ms, a process answers a sale sold out from memory after
    /// Redis said so (0: always ask Redis). Units coming back through this
    /// process reopen the sale at once; through another, within this time.
    #[arg(long, env = "FLASHSALE_SOLD_OUT_TTL_MS", default_value_t = 100)]
    pub sold_out_ttl_ms: u64,

    /// Most reservations of one sale combined into one Redis script call
    /// (1: one call per reservation). Calls never wait to fill up.
    #[arg(long, env = "FLASHSALE_RESERVE_BATCH", default_value_t = 32,
          value_parser = script_batch)]
    pub reserve_batch: usize,

    /// Combined reserve calls per sale on the wire at once.
    #[arg(long, env = "FLASHSALE_RESERVE_IN_FLIGHT", default_value_t = 2,
          value_parser = at_least_one)]
    pub reserve_in_flight: usize,

    /// Reservations one sale's queue holds at most in this process; past
    /// it, 503 at once (default, and never below: the HTTP in-flight limit,
    /// so that a request the front door admitted is never shed here).
    #[arg(long, env = "FLASHSALE_RESERVE_QUEUE_LIMIT",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub reserve_queue_limit: Option<u32>,

    /// First retry of a refund waiting for its order to settle, in ms
    /// (doubling per attempt, with a spread per order).
    #[arg(long, env = "FLASHSALE_REFUND_RETRY_MS", default_value_t = 200,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub refund_retry_ms: u64,

    /// Longest delay between refund retries, in ms.
    #[arg(long, env = "FLASHSALE_REFUND_RETRY_MAX_MS", default_value_t = 5000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub refund_retry_max_ms: u64,

    /// Age in seconds at which a refund that still cannot settle moves to the
    /// dead-letter (listed by the audit) instead of retrying forever.
    #[arg(
        long,
        env = "FLASHSALE_REFUND_DEAD_LETTER_SECS",
        default_value_t = 3600
    )]
    pub refund_dead_letter_secs: u64,
}

impl StoreConfig {
    /// Where Redis is (Sentinel or Cluster when set, else REDIS_URL).
    pub fn redis_topology(&self) -> anyhow::Result<crate::engine::Topology> {
        crate::engine::Topology::choose(
            &self.redis_url,
            self.redis_sentinels.as_deref(),
            self.redis_sentinel_master.as_deref(),
            self.redis_cluster.as_deref(),
        )
    }

    /// The engine's connection settings; refused when they contradict each
    /// other.
    pub fn engine_options(&self) -> anyhow::Result<crate::engine::EngineOptions> {
        anyhow::ensure!(
            self.redis_wait_replicas == 0
                || self.redis_wait_timeout_ms * 2 <= self.redis_timeout_ms,
            "FLASHSALE_REDIS_WAIT_TIMEOUT_MS ({} ms) must be at most half of FLASHSALE_REDIS_TIMEOUT_MS ({} ms): a write, its replica check and its WAIT fit in the time of one Redis call",
            self.redis_wait_timeout_ms,
            self.redis_timeout_ms
        );
        Ok(crate::engine::EngineOptions {
            topology: self.redis_topology()?,
            wait_replicas: self.redis_wait_replicas,
            wait_timeout: Duration::from_millis(self.redis_wait_timeout_ms),
            key_prefix: self.key_prefix.clone(),
            timeout: Duration::from_millis(self.redis_timeout_ms),
            flow_backlog_limit: self.flow_backlog_limit,
            sold_out_ttl: Duration::from_millis(self.sold_out_ttl_ms),
            batching: crate::engine::Batching {
                max: self.reserve_batch,
                in_flight: self.reserve_in_flight,
                queue_limit: self
                    .reserve_queue_limit
                    .map_or(crate::engine::Batching::default().queue_limit, |n| {
                        n as usize
                    }),
                ..Default::default()
            },
            refunds: crate::engine::RefundPolicy {
                first_retry: Duration::from_millis(self.refund_retry_ms),
                max_retry: Duration::from_millis(self.refund_retry_max_ms),
                dead_letter_after: Duration::from_secs(self.refund_dead_letter_secs),
            },
        })
    }
}

/// What the HTTP server needs beyond the stores.
#[derive(clap::Args, Debug, Clone)]
pub struct HttpConfig {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, env = "FLASHSALE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Where a process without the HTTP role serves `/healthz`, `/readyz`
    /// and `/metrics` (default: `FLASHSALE_LISTEN`).
    #[arg(long, env = "FLASHSALE_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Requests handled at once; past it, new requests get 503 at once.
    #[arg(long, env = "FLASHSALE_MAX_IN_FLIGHT", default_value_t = 4096,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_in_flight: u32,

    /// Longest time one request may take before it gets 503, in ms.
    #[arg(long, env = "FLASHSALE_REQUEST_TIMEOUT_MS", default_value_t = 5000,
          value_parser = clap::value_parser!(u64).range(100..))]
    pub request_timeout_ms: u64,

    /// Reserve requests per second one buyer (the token's `sub`) may send to
    /// this process; past it, 429 with Retry-After (0: no limit).
    #[arg(long, env = "FLASHSALE_BUYER_RATE_PER_SEC", default_value_t = 10)]
    pub buyer_rate_per_sec: u32,

    /// Reserve requests one buyer may send at once before the rate applies.
    #[arg(long, env = "FLASHSALE_BUYER_BURST", default_value_t = 20,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub buyer_burst: u32,

    /// API requests per second one client address may send to this process
    /// (0: no limit, the default: load balancers and load tests share
    /// addresses). The payment callback is never limited by it.
    #[arg(long, env = "FLASHSALE_IP_RATE_PER_SEC", default_value_t = 0)]
    pub ip_rate_per_sec: u32,

    /// Requests one client address may send at once before its rate applies
    /// (default: twice the rate).
    #[arg(long, env = "FLASHSALE_IP_BURST",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub ip_burst: Option<u32>,

    /// Seconds a client has to send a whole request head; then the
    /// connection is closed.
    #[arg(long, env = "FLASHSALE_HEADER_TIMEOUT_SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub header_timeout_secs: u64,

    /// Seconds an idle keep-alive connection is kept open at most.
    #[arg(long, env = "FLASHSALE_IDLE_TIMEOUT_SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub idle_timeout_secs: u64,

    /// Connections held open at most; more wait in the listen backlog. The
    /// process raises its open-file limit to fit, or lowers this cap to what
    /// the system allows and says so.
    #[arg(long, env = "FLASHSALE_MAX_CONNECTIONS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// On SIGTERM, how long the process keeps serving with `/readyz`
    /// answering 503 before it stops accepting, in ms: the time load
    /// balancers need to stop sending it new requests (0: stop at once).
    #[arg(long, env = "FLASHSALE_SHUTDOWN_DELAY_MS", default_value_t = 0,
          value_parser = clap::value_parser!(u64).range(..=600_000))]
    pub shutdown_delay_ms: u64,
}

/// Which parts of the service a `serve` process runs.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The HTTP API.
    Http,
    /// Expiry workers: close unpaid orders at their deadline.
    Expiry,
    /// The reconciler (flow records into MySQL) and the safety-net sweep.
    Reconciler,
    /// The outbox relay: outbox rows to RabbitMQ (needs FLASHSALE_AMQP_URL).
    Relay,
    /// The loyalty-points consumer (needs FLASHSALE_AMQP_URL).
    Points,
}

/// Roles of a `serve` process whose `FLASHSALE_ROLES` is unset: the HTTP
/// API, expiry and the reconciler, and the relay when a broker is named.
pub fn default_roles(broker: bool) -> Vec<Role> {
    let mut roles = vec![Role::Http, Role::Expiry, Role::Reconciler];
    if broker {
        roles.push(Role::Relay);
    }
    roles
}

fn secret_url(s: &str) -> Result<SecretString, String> {
    let url = url::Url::parse(s).map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(url.scheme(), "amqp" | "amqps") {
        return Err(format!(
            "scheme {:?}: an AMQP URL starts with amqp:// (amqps:// for TLS)",
            url.scheme()
        ));
    }
    Ok(SecretString::from(s.to_owned()))
}

/// The broker (RabbitMQ) for downstream events: the relay and the points
/// consumer. Without `FLASHSALE_AMQP_URL` neither runs and nothing else
/// depends on a broker.
#[derive(clap::Args, Debug, Clone)]
pub struct AmqpConfig {
    /// RabbitMQ, for example `amqp://guest:guest@127.0.0.1:5672/%2f`
    /// (holds a password: kept out of logs).
    #[arg(long, env = "FLASHSALE_AMQP_URL", value_parser = secret_url, hide_env_values = true)]
    pub amqp_url: Option<SecretString>,
    /// The durable topic exchange events go to.
    #[arg(long, env = "FLASHSALE_AMQP_EXCHANGE", default_value = crate::events::DEFAULT_EXCHANGE)]
    pub amqp_exchange: String,
    /// The points consumer's durable queue; its dead letters go to
    /// `<queue>.dead`. The relay declares it too (so nothing published
    /// before the consumer first runs is dropped); empty: the relay leaves
    /// it alone (a deployment without the points consumer).
    #[arg(
        long,
        env = "FLASHSALE_POINTS_QUEUE",
        default_value = "flashsale.points"
    )]
    pub points_queue: String,
    /// Most outbox rows one relay publishes in one round (then waits for
    /// their confirms and marks them sent in one statement).
    #[arg(long, env = "FLASHSALE_RELAY_BATCH", default_value_t = 500,
          value_parser = at_least_one)]
    pub relay_batch: usize,
    /// Pause of an idle relay before it looks at the outbox again.
    #[arg(long, env = "FLASHSALE_RELAY_IDLE_MS", default_value_t = 50)]
    pub relay_idle_ms: u64,
    /// How long sent outbox rows are kept before they are purged.
    #[arg(long, env = "FLASHSALE_OUTBOX_RETENTION_SECS", default_value_t = 7 * 86_400)]
    pub outbox_retention_secs: u64,
}

impl AmqpConfig {
    /// The broker's URL, when one is named.
    pub fn url(&self) -> Option<&str> {
        use secrecy::ExposeSecret;
        self.amqp_url.as_ref().map(|u| u.expose_secret())
    }

    /// The dead-letter queue of the points queue.
    pub fn points_dead_queue(&self) -> String {
        format!("{}.dead", self.points_queue)
    }
}

/// How the reconciler and the sweep run.
#[derive(clap::Args, Debug, Clone)]
pub struct ReconcilerConfig {
    /// Most flow records applied in one MySQL transaction (at most 5000).
    #[arg(long, env = "FLASHSALE_RECONCILER_BATCH", default_value_t = 2000,
          value_parser = at_least_one)]
    pub reconciler_batch: usize,

    /// Pause of an idle reconciler, in ms (the lag when traffic is light).
    #[arg(long, env = "FLASHSALE_RECONCILER_IDLE_MS", default_value_t = 20,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub reconciler_idle_ms: u64,

    /// Longest pause between reconciler retries while MySQL is down, in ms.
    #[arg(
        long,
        env = "FLASHSALE_RECONCILER_MAX_BACKOFF_MS",
        default_value_t = 30_000
    )]
    pub reconciler_max_backoff_ms: u64,

    /// Seconds between safety-net sweeps of MySQL for overdue pending orders.
    #[arg(long, env = "FLASHSALE_SWEEP_INTERVAL_SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub sweep_interval_secs: u64,

    /// How far past its deadline (seconds) a pending order must be for the sweep.
    #[arg(long, env = "FLASHSALE_SWEEP_GRACE_SECS", default_value_t = 300)]
    pub sweep_grace_secs: u64,

    /// Seconds a retired sale's Redis keys are kept before they expire
    /// (default 30 days; MySQL answers for a retired sale either way).
    #[arg(
        long,
        env = "FLASHSALE_SALE_RETENTION_SECS",
        default_value_t = crate::workers::retire::DEFAULT_RETENTION.as_secs(),
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub sale_retention_secs: u64,
}

/// How expiry workers run.
#[derive(clap::Args, Debug, Clone)]
pub struct ExpiryConfig {
    /// Expiry workers in this process.
    #[arg(long, env = "FLASHSALE_EXPIRY_WORKERS", default_value_t = 1)]
    pub expiry_workers: usize,

    /// Most deadlines one expiry call claims (each call holds Redis meanwhile)
    /// while this process sends no reservations.
    #[arg(long, env = "FLASHSALE_EXPIRY_BATCH", default_value_t = 256,
          value_parser = script_batch)]
    pub expiry_batch: usize,

    /// Deadlines one expiry call claims while this process's reserve calls
    /// are under way (they wait behind a claim), unless keeping pace with
    /// those reservations needs more (at most `--expiry-batch`).
    #[arg(long, env = "FLASHSALE_EXPIRY_BUSY_BATCH", default_value_t = 64,
          value_parser = script_batch)]
    pub expiry_busy_batch: usize,

    /// Longest sleep of an idle worker, in ms; keep it at most the shortest
    /// payment window (1 s) so deadlines made by other processes are on time.
    #[arg(long, env = "FLASHSALE_EXPIRY_MAX_SLEEP_MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub expiry_max_sleep_ms: u64,
}

/// Everything `flashsale serve` takes.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeConfig {
    /// The stores.
    #[command(flatten)]
    pub store: StoreConfig,
    /// The HTTP server.
    #[command(flatten)]
    pub http: HttpConfig,
    /// Expiry workers.
    #[command(flatten)]
    pub expiry: ExpiryConfig,
    /// Reconciler and sweep.
    #[command(flatten)]
    pub reconciler: ReconcilerConfig,
    /// The broker, for the relay and the points consumer.
    #[command(flatten)]
    pub amqp: AmqpConfig,
    /// Roles this process runs, comma-separated (default: http, expiry,
    /// reconciler, and relay when FLASHSALE_AMQP_URL is set).
    #[arg(long, env = "FLASHSALE_ROLES", value_enum, value_delimiter = ',')]
    pub roles: Vec<Role>,
    /// Refuse to start (exit 2) when Redis is set to lose acknowledged
    /// writes: an eviction policy other than `noeviction`, no AOF, or
    /// `appendfsync no` (`everysec` passes with a warning).
    #[arg(long, env = "FLASHSALE_REQUIRE_DURABLE_REDIS")]
    pub require_durable_redis: bool,
    /// The HTTP role's secrets, from the environment only (see
    /// [`Secrets::from_env`]); `None` for a process without that role.
    #[arg(skip)]
    pub secrets: Option<Secrets>,
}

/// Parses `ServeConfig` alone (its defaults, with the environment).
#[derive(clap::Parser, Debug)]
struct ServeOnly {
    #[command(flatten)]
    serve: ServeConfig,
}

impl ServeConfig {
    /// The configuration a `flashsale serve` without flags would run with:
    /// the one source of defaults for tests and the demo, which override
    /// only what they must.
    pub fn from_defaults() -> anyhow::Result<Self> {
        use clap::Parser;
        Ok(ServeOnly::try_parse_from(["flashsale"])?.serve.with_roles())
    }

    /// Fills in the default roles (see [`default_roles`]) when none were
    /// given; refuses the broker's roles without a broker.
    pub fn with_roles(mut self) -> Self {
        if self.roles.is_empty() {
            self.roles = default_roles(self.amqp.amqp_url.is_some());
        }
        self
    }

    /// Refuses roles that need what is not configured.
    pub fn check_roles(&self) -> anyhow::Result<()> {
        for r in [Role::Relay, Role::Points] {
            anyhow::ensure!(
                !self.roles.contains(&r) || self.amqp.amqp_url.is_some(),
                "role {r:?} needs a broker: set FLASHSALE_AMQP_URL"
            );
        }
        Ok(())
    }

    /// Whether this process serves the HTTP API.
    pub fn serves_http(&self) -> bool {
        self.roles.contains(&Role::Http)
    }
}

/// A count of at least one: zero is refused at parse time, never clamped.
fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// Most items one Lua call takes: the scripts hand a batch's keys to one
/// Redis command (Lua's `unpack` stops near 8,000 values), and a call this
/// size already holds Redis for tens of ms.
fn script_batch(s: &str) -> Result<usize, String> {
    match at_least_one(s)? {
        n if n > 4096 => Err("must be at most 4096".into()),
        n => Ok(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn zero_counts_and_durations_are_refused_at_parse_time() {
        for (flag, value) in [
            ("--reserve-batch", "0"),
            ("--reserve-in-flight", "0"),
            ("--redis-timeout-ms", "0"),
            ("--reconciler-batch", "0"),
            ("--expiry-batch", "0"),
            ("--sweep-interval-secs", "0"),
        ] {
            let err = ServeOnly::try_parse_from(["flashsale", flag, value])
                .err()
                .unwrap_or_else(|| panic!("{flag} {value} was taken"));
            assert!(err.to_string().contains(flag), "{err}");
        }
        let ok = ServeOnly::try_parse_from(["flashsale", "--reserve-batch", "1"]).unwrap();
        assert_eq!(ok.serve.store.reserve_batch, 1);
    }

    #[test]
    fn script_batches_are_bounded_by_what_one_call_can_take() {
        for flag in ["--reserve-batch", "--expiry-batch", "--expiry-busy-batch"] {
            let err = ServeOnly::try_parse_from(["flashsale", flag, "4097"])
                .err()
                .unwrap_or_else(|| panic!("{flag} 4097 was taken"));
            assert!(err.to_string().contains("at most 4096"), "{err}");
            ServeOnly::try_parse_from(["flashsale", flag, "4096"]).unwrap();
        }
    }
}
