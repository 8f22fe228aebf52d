//! Configuration by flags and environment, one clap struct per concern.
//!
//! The environment names are a contract (outside scripts start the binary with
//! them): `REDIS_URL`, `DATABASE_URL`, and `FLASHSALE_*` for the rest. Secrets
//! are wrapped so that they never reach a log or a `Debug` print.

use std::net::SocketAddr;
use std::time::Duration;

use secrecy::SecretString;

fn secret(s: &str) -> Result<SecretString, String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    Ok(SecretString::from(s.to_owned()))
}

/// Where the two stores are.
#[derive(clap::Args, Debug, Clone)]
pub struct StoreConfig {
    /// Redis URL; a database index (`redis://host:6379/3`) keeps deployments apart.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,

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
    #[arg(long, env = "FLASHSALE_REDIS_TIMEOUT_MS", default_value_t = 1000)]
    pub redis_timeout_ms: u64,
}

impl StoreConfig {
    /// The Redis timeout as a duration.
    pub fn redis_timeout(&self) -> Duration {
        Duration::from_millis(self.redis_timeout_ms.max(1))
    }
}

/// The buyer token secret, shared by `serve` and `token`.
#[derive(clap::Args, Debug, Clone)]
pub struct JwtConfig {
    /// HS256 secret that signs buyer tokens.
    #[arg(long, env = "FLASHSALE_JWT_SECRET", value_parser = secret, hide_env_values = true)]
    pub jwt_secret: SecretString,
}

/// What the HTTP server needs beyond the stores.
#[derive(clap::Args, Debug, Clone)]
pub struct HttpConfig {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, env = "FLASHSALE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Bearer token of the admin.
    #[arg(long, env = "FLASHSALE_ADMIN_TOKEN", value_parser = secret, hide_env_values = true)]
    pub admin_token: SecretString,

    /// Secret of the payment gateway's HMAC-SHA256 callback signature.
    #[arg(long, env = "FLASHSALE_PAYMENT_SECRET", value_parser = secret, hide_env_values = true)]
    pub payment_secret: SecretString,

    /// Requests handled at once; past it, new requests get 503 at once.
    #[arg(long, env = "FLASHSALE_MAX_IN_FLIGHT", default_value_t = 4096)]
    pub max_in_flight: usize,

    /// Longest time one request may take before it gets 503, in ms.
    #[arg(long, env = "FLASHSALE_REQUEST_TIMEOUT_MS", default_value_t = 5000)]
    pub request_timeout_ms: u64,
}

/// Which parts of the service a `serve` process runs.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The HTTP API.
    Http,
    /// Expiry workers: close unpaid orders at their deadline.
    Expiry,
}

/// How expiry workers run.
#[derive(clap::Args, Debug, Clone)]
pub struct ExpiryConfig {
    /// Expiry workers in this process.
    #[arg(long, env = "FLASHSALE_EXPIRY_WORKERS", default_value_t = 1)]
    pub expiry_workers: usize,

    /// Most deadlines one expiry call claims (each call holds Redis meanwhile).
    #[arg(long, env = "FLASHSALE_EXPIRY_BATCH", default_value_t = 128)]
    pub expiry_batch: usize,

    /// Longest sleep of an idle worker, in ms; keep it at most the shortest
    /// payment window (1 s) so deadlines made by other processes are on time.
    #[arg(long, env = "FLASHSALE_EXPIRY_MAX_SLEEP_MS", default_value_t = 1000)]
    pub expiry_max_sleep_ms: u64,
}

/// Everything `flashsale serve` takes.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeConfig {
    /// The stores.
    #[command(flatten)]
    pub store: StoreConfig,
    /// Buyer tokens.
    #[command(flatten)]
    pub jwt: JwtConfig,
    /// The HTTP server.
    #[command(flatten)]
    pub http: HttpConfig,
    /// Expiry workers.
    #[command(flatten)]
    pub expiry: ExpiryConfig,
    /// Roles this process runs, comma-separated.
    #[arg(
        long,
        env = "FLASHSALE_ROLES",
        value_enum,
        value_delimiter = ',',
        default_value = "http,expiry"
    )]
    pub roles: Vec<Role>,
}
