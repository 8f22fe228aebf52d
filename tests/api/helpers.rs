//! Test harness: the real app on port 0 with its own MySQL database and its
//! own Redis key prefix, so tests run in parallel against the real services.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use flashsale::config::{Role, Secrets, ServeConfig};
use flashsale::domain::{OrderId, UserId};
use flashsale::engine::{Engine, Order, SaleKeys};
use redis::AsyncCommands;
use secrecy::SecretString;
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const JWT_SECRET: &str = "test-jwt-secret-of-at-least-32-bytes";
pub const ADMIN_TOKEN: &str = "test-admin-token-of-at-least-32-bytes";
pub const PAYMENT_SECRET: &str = "test-payment-secret-of-at-least-32-bytes";
pub const SHARED_REDIS: &str = "redis://127.0.0.1:6379";
const MYSQL_SERVER: &str = "mysql://root@127.0.0.1:3306";

/// A name no other test (or test run) uses.
pub fn unique(tag: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{tag}_{}_{}_{}",
        std::process::id(),
        nanos,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Where one test's data lives; two apps built on the same target share it.
#[derive(Clone, Debug)]
pub struct Target {
    pub redis_url: String,
    /// Cluster seeds, or sentinels and the primary's name, when the tests
    /// run on that topology (see [`Target::fresh`]).
    pub redis_cluster: Option<String>,
    pub redis_sentinels: Option<(String, String)>,
    /// Replicas each write waits for (FLASHSALE_REDIS_WAIT_REPLICAS).
    pub wait_replicas: u32,
    pub database_url: String,
    pub key_prefix: String,
}

/// Where the core subset of the suite finds a Redis Cluster or a Sentinel
/// set to run on (scripts/test-topologies.sh sets them); unset: one node.
pub const TEST_CLUSTER_ENV: &str = "FLASHSALE_TEST_REDIS_CLUSTER";
pub const TEST_SENTINELS_ENV: &str = "FLASHSALE_TEST_REDIS_SENTINELS";
pub const TEST_SENTINEL_MASTER_ENV: &str = "FLASHSALE_TEST_REDIS_SENTINEL_MASTER";
pub const TEST_WAIT_REPLICAS_ENV: &str = "FLASHSALE_TEST_REDIS_WAIT_REPLICAS";

impl Target {
    /// A fresh database and key prefix on the shared services: the shared
    /// Redis, or the cluster or Sentinel set the environment names.
    pub fn fresh() -> Self {
        let mut t = Self::fresh_on(SHARED_REDIS);
        let var = |name| std::env::var(name).ok().filter(|v: &String| !v.is_empty());
        t.redis_cluster = var(TEST_CLUSTER_ENV);
        t.redis_sentinels = var(TEST_SENTINELS_ENV).map(|s| {
            (
                s,
                var(TEST_SENTINEL_MASTER_ENV).unwrap_or_else(|| "flashsale".into()),
            )
        });
        t.wait_replicas = var(TEST_WAIT_REPLICAS_ENV).map_or(0, |n| n.parse().unwrap());
        t
    }

    /// A fresh database and key prefix, with Redis at `redis_url`.
    pub fn fresh_on(redis_url: &str) -> Self {
        Self {
            redis_url: redis_url.to_owned(),
            redis_cluster: None,
            redis_sentinels: None,
            wait_replicas: 0,
            database_url: format!("{MYSQL_SERVER}/{}", unique("fstest")),
            key_prefix: unique("fstest"),
        }
    }

    /// The Redis settings of this target as environment variables, for a
    /// child process (the unused ones empty, so none leaks in).
    pub fn redis_env(&self) -> Vec<(&'static str, String)> {
        let (sentinels, master) = self.redis_sentinels.clone().unwrap_or_default();
        vec![
            ("REDIS_URL", self.redis_url.clone()),
            (
                "FLASHSALE_REDIS_CLUSTER",
                self.redis_cluster.clone().unwrap_or_default(),
            ),
            ("FLASHSALE_REDIS_SENTINELS", sentinels),
            ("FLASHSALE_REDIS_SENTINEL_MASTER", master),
            (
                "FLASHSALE_REDIS_WAIT_REPLICAS",
                self.wait_replicas.to_string(),
            ),
        ]
    }

    /// A connection of the test's own to this target's Redis.
    pub fn redis(&self) -> flashsale::engine::RedisConn {
        let store = self.config().store;
        flashsale::engine::RedisConn::connect(
            &store.redis_topology().unwrap(),
            &flashsale::engine::topology::ConnectOptions {
                timeout: Duration::from_secs(5),
                wait_replicas: 0,
                wait_timeout: Duration::from_millis(100),
            },
        )
        .unwrap()
    }

    /// The app's configuration: the real defaults, on this target, HTTP
    /// only (no workers) unless changed.
    pub fn config(&self) -> ServeConfig {
        let mut c = ServeConfig::from_defaults().expect("the defaults parse");
        c.store.redis_url = self.redis_url.clone();
        c.store.redis_cluster = self.redis_cluster.clone();
        c.store.redis_sentinels = self.redis_sentinels.as_ref().map(|s| s.0.clone());
        c.store.redis_sentinel_master = self.redis_sentinels.as_ref().map(|s| s.1.clone());
        c.store.redis_wait_replicas = self.wait_replicas;
        if self.wait_replicas > 0 {
            // Two cores run the whole suite, six cluster nodes and their
            // replication at once: replicas answer WAIT late at times. The
            // suite checks behaviour, so it gives them room (the drills and
            // the replica test check the timing itself).
            c.store.redis_timeout_ms = 2000;
            c.store.redis_wait_timeout_ms = 800;
        }
        c.store.database_url = self.database_url.clone();
        c.store.key_prefix = self.key_prefix.clone();
        c.http.listen = "127.0.0.1:0".parse().unwrap();
        c.roles = vec![Role::Http];
        c.secrets = Some(Secrets {
            jwt_secret: SecretString::from(JWT_SECRET),
            admin_token: SecretString::from(ADMIN_TOKEN),
            payment_secret: SecretString::from(PAYMENT_SECRET),
        });
        c
    }

    /// Drops the database and deletes every key under the prefix.
    pub async fn cleanup(&self) {
        let _ = flashsale::db::drop_database(&self.database_url).await;
        let mut c = self.redis();
        let pattern = format!("{}:*", self.key_prefix);
        let keys: Vec<Vec<String>> = c
            .query_primaries(redis::cmd("KEYS").arg(pattern))
            .await
            .unwrap_or_default();
        // One at a time: on a cluster they live in many slots.
        for key in keys.into_iter().flatten() {
            let _: Result<(), _> = c.del(key).await;
        }
    }
}

/// One running app instance.
pub struct TestApp {
    pub addr: SocketAddr,
    pub target: Target,
    pub client: reqwest::Client,
    pub engine: Engine,
    /// The app's live list of sales (what its workers walk).
    pub live: std::sync::Arc<flashsale::workers::live::LiveSales>,
    shutdown: CancellationToken,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
}

pub async fn spawn_app() -> TestApp {
    spawn_on(Target::fresh()).await
}

pub async fn spawn_on(target: Target) -> TestApp {
    spawn_with(target, |_| {}).await
}

/// Spawns an app on `target` with its configuration changed by `change`.
pub async fn spawn_with(target: Target, change: impl FnOnce(&mut ServeConfig)) -> TestApp {
    if std::env::var_os("RUST_LOG").is_some() {
        flashsale::telemetry::init_logging();
    }
    let mut config = target.config();
    change(&mut config);
    let app = flashsale::startup::App::build(config)
        .await
        .expect("app builds");
    let addr = app.local_addr().unwrap();
    let engine = app.state().engine.clone();
    let live = app.state().live.clone();
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(app.run_until_stopped(shutdown.clone()));
    TestApp {
        addr,
        target,
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap(),
        engine,
        live,
        shutdown,
        handle: Some(handle),
    }
}

pub fn buyer_token(user: u64) -> String {
    flashsale::http::auth::issue_token(
        &SecretString::from(JWT_SECRET),
        UserId::new(user).unwrap(),
        3600,
    )
    .unwrap()
}

/// Sale terms relative to Redis's clock, in ms.
pub struct SaleSpec {
    pub stock: i64,
    pub per_user_limit: i64,
    pub start_offset_ms: i64,
    pub end_offset_ms: i64,
    pub payment_window_secs: i64,
}

impl Default for SaleSpec {
    fn default() -> Self {
        Self {
            stock: 10,
            per_user_limit: 1,
            start_offset_ms: -60_000,
            end_offset_ms: 3_600_000,
            payment_window_secs: 900,
        }
    }
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn redis_now_ms(&self) -> i64 {
        self.engine.now_ms().await.unwrap()
    }

    /// Creates a sale through the admin API; returns its id.
    pub async fn create_sale(&self, spec: SaleSpec) -> String {
        let now = self.redis_now_ms().await;
        let body = json!({
            "sku": "SKU-T", "title": "Test item", "price_cents": 1999, "stock": spec.stock,
            "start_at": rfc3339(now + spec.start_offset_ms),
            "end_at": rfc3339(now + spec.end_offset_ms),
            "per_user_limit": spec.per_user_limit,
            "payment_window_secs": spec.payment_window_secs,
        });
        let res = self
            .client
            .post(self.url("/api/v1/sales"))
            .bearer_auth(ADMIN_TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 201, "{:?}", res.text().await);
        let v: Value = res.json().await.unwrap();
        v["sale_id"].as_str().unwrap().to_owned()
    }

    /// GETs a sale object.
    pub async fn get_sale(&self, sale: &str) -> Value {
        let res = self
            .client
            .get(self.url(&format!("/api/v1/sales/{sale}")))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        res.json().await.unwrap()
    }

    /// Waits until the sale answers GET with 200 (a fenced sale answers 503
    /// until the reconciler has rebuilt it); panics after `within`.
    pub async fn wait_serving(&self, sale: &str, within: Duration) {
        let until = Instant::now() + within;
        loop {
            let res = self
                .client
                .get(self.url(&format!("/api/v1/sales/{sale}")))
                .send()
                .await
                .unwrap();
            if res.status() == 200 {
                return;
            }
            assert!(
                Instant::now() < until,
                "sale {sale} still answers {} after {within:?}",
                res.status()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// POSTs a reservation; returns status and body.
    pub async fn reserve(&self, sale: &str, user: u64, idem: Option<&str>) -> (u16, Value) {
        let mut req = self
            .client
            .post(self.url(&format!("/api/v1/sales/{sale}/orders")))
            .bearer_auth(buyer_token(user))
            .json(&json!({"qty": 1}));
        if let Some(k) = idem {
            req = req.header("Idempotency-Key", k);
        }
        let res = req.send().await.unwrap();
        let status = res.status().as_u16();
        (status, res.json().await.unwrap_or(Value::Null))
    }

    pub fn sale_keys(&self, sale: &str) -> SaleKeys {
        self.engine.keys().sale(sale.parse().unwrap())
    }

    /// One field of the sale hash as an integer.
    pub async fn sale_field(&self, sale: &str, field: &str) -> i64 {
        let mut c = self.engine.connection();
        c.hget(self.sale_keys(sale).sale, field).await.unwrap()
    }

    /// The `/metrics` page.
    pub async fn metrics(&self) -> String {
        let res = self.client.get(self.url("/metrics")).send().await.unwrap();
        res.text().await.unwrap()
    }

    /// Stops the app gracefully and waits for it.
    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(h) = self.handle.take() {
            h.await.unwrap().unwrap();
        }
    }

    /// Stops the app and removes the test's data.
    pub async fn finish(mut self) {
        self.stop().await;
        self.target.cleanup().await;
    }
}

/// The contract's error code of a response body.
pub fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("<none>")
}

/// A redis-server of the test's own, on its own port and data directory, that
/// the test may kill and restart. Persistence is on (fsync on every write) so
/// a restart brings the data back.
pub struct OwnRedis {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
    /// Settings after the defaults below (a later one wins).
    extra: Vec<String>,
}

impl OwnRedis {
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// Starts with `extra` settings (`["--maxmemory-policy", "allkeys-lru"]`).
    pub async fn start_with(extra: &[&str]) -> Self {
        let (port, dir) = (free_port(), fresh_dir("fstest-redis"));
        let mut r = Self {
            port,
            dir,
            child: None,
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
        };
        r.restart().await;
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--maxmemory-policy",
                "noeviction",
            ])
            .args(["--enable-debug-command", "local"])
            .args(&self.extra)
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(client) = redis::Client::open(self.url()) {
                if let Ok(mut c) = client.get_multiplexed_async_connection().await {
                    let pong: redis::RedisResult<String> =
                        redis::cmd("PING").query_async(&mut c).await;
                    if pong.is_ok() {
                        return;
                    }
                }
            }
            assert!(Instant::now() < deadline, "own redis-server did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A copy of the data folder as it is now (the AOF, fsynced on every
    /// write): restored later, it is Redis going back to this moment.
    pub fn copy_data(&self) -> PathBuf {
        let to = fresh_dir("fstest-redis-copy");
        copy_tree(&self.dir, &to);
        to
    }

    /// Replaces the data folder with `from` (stopped server only).
    pub fn restore_data(&mut self, from: &std::path::Path) {
        assert!(self.child.is_none(), "stop it first");
        let _ = std::fs::remove_dir_all(&self.dir);
        copy_tree(from, &self.dir);
        let _ = std::fs::remove_dir_all(from);
    }

    /// Sends `signal` (`"STOP"`, `"CONT"`) to the running server.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{signal} {pid}");
    }

    /// SIGKILL, no goodbye.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `sha256=<hex HMAC>` of `body` with the test payment secret.
pub fn sign(body: &[u8]) -> String {
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(PAYMENT_SECRET.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

impl TestApp {
    /// Sends a signed payment callback.
    pub async fn pay(&self, order_id: &str, payment_id: &str, amount: i64) -> (u16, Value) {
        self.pay_with_status(order_id, payment_id, amount, "succeeded")
            .await
    }

    pub async fn pay_with_status(
        &self,
        order_id: &str,
        payment_id: &str,
        amount: i64,
        status: &str,
    ) -> (u16, Value) {
        let body = json!({"order_id": order_id, "payment_id": payment_id,
            "amount_cents": amount, "status": status})
        .to_string();
        let res = self
            .client
            .post(self.url("/api/v1/payments/callback"))
            .header("X-Signature", sign(body.as_bytes()))
            .header("Content-Type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = res.status().as_u16();
        (status, res.json().await.unwrap_or(Value::Null))
    }

    /// The owner (or anyone) cancels an order.
    pub async fn cancel(&self, order_id: &str, user: u64) -> (u16, Value) {
        self.order_call("POST", order_id, "/cancel", user).await
    }

    /// `method /api/v1/orders/{order_id}{action}` as buyer `user`.
    pub async fn order_call(
        &self,
        method: &str,
        order_id: &str,
        action: &str,
        user: u64,
    ) -> (u16, Value) {
        let url = self.url(&format!("/api/v1/orders/{order_id}{action}"));
        let req = match method {
            "GET" => self.client.get(url),
            _ => self.client.post(url),
        };
        let res = req.bearer_auth(buyer_token(user)).send().await.unwrap();
        let status = res.status().as_u16();
        (status, res.json().await.unwrap_or(Value::Null))
    }

    /// Every entry of a sale's due-queue (all buckets): (member, due ms).
    pub async fn due(&self, sale: &str) -> Vec<(String, f64)> {
        let id = sale.parse().unwrap();
        let mut all = Vec::new();
        let mut cursor = 0;
        loop {
            let (next, page) = self.engine.due_page(id, cursor).await.unwrap();
            all.extend(page);
            cursor = next;
            if cursor == 0 {
                return all;
            }
        }
    }

    /// How many entries a sale's due-queue holds.
    pub async fn due_len(&self, sale: &str) -> i64 {
        self.due(sale).await.len() as i64
    }

    /// The order seqs a sale's orders buckets hold: every bucket up to the
    /// sale's order counter, and past it while buckets hold orders.
    pub async fn order_seqs(&self, sale: &str) -> Vec<u64> {
        let k = self.sale_keys(sale);
        let mut c = self.engine.connection();
        let counter: Option<u64> = c.hget(&k.sale, "seq").await.unwrap();
        let known = flashsale::engine::keys::order_buckets(counter.unwrap_or(0)).end;
        let mut seqs = Vec::new();
        for b in 0.. {
            let mut held: Vec<u64> = c.hkeys(k.orders_bucket_no(b)).await.unwrap();
            if held.is_empty() && b >= known {
                break;
            }
            held.sort_unstable();
            seqs.extend(held);
        }
        seqs
    }

    /// Every order of a sale as Redis holds it, by sequence number.
    pub async fn orders(&self, sale: &str) -> std::collections::BTreeMap<u64, Order> {
        let seqs = self.order_seqs(sale).await;
        let sale_id = sale.parse().unwrap();
        let packed = self.engine.packed_orders(sale_id, &seqs).await.unwrap();
        seqs.into_iter()
            .zip(packed)
            .map(|(seq, packed)| {
                let packed = packed.expect("an order its bucket lists");
                let id = OrderId::new(sale_id, seq);
                (
                    seq,
                    Order::unpack(id, &packed).expect("a well-formed order"),
                )
            })
            .collect()
    }

    /// The flow records of a sale, in order: (event, order seq).
    pub async fn flow_events(&self, sale: &str) -> Vec<(String, u64)> {
        let k = self.sale_keys(sale);
        let mut c = self.engine.connection();
        let mut out = Vec::new();
        let mut start = "-".to_owned();
        loop {
            let page: redis::streams::StreamRangeReply =
                c.xrange_count(&k.flow, &start, "+", 10_000).await.unwrap();
            let n = page.ids.len();
            for entry in &page.ids {
                let ev: String = entry.get("ev").unwrap();
                let seq: u64 = entry.get("o").unwrap();
                out.push((ev, seq));
            }
            match page.ids.last() {
                Some(last) if n == 10_000 => start = format!("({}", last.id),
                _ => return out,
            }
        }
    }
}

/// A `flashsale serve` child process with the given roles on `target`.
pub struct ServeProcess(Child);

impl ServeProcess {
    /// Takes charge of a `flashsale` child started by the test itself: it is
    /// killed when dropped, also when the test fails.
    pub fn adopt(child: Child) -> Self {
        Self(child)
    }

    pub fn start(target: &Target, roles: &str, extra_env: &[(&str, &str)]) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_flashsale"))
            .arg("serve")
            .envs(target.redis_env())
            .env("DATABASE_URL", &target.database_url)
            .env("FLASHSALE_KEY_PREFIX", &target.key_prefix)
            .env("FLASHSALE_LISTEN", "127.0.0.1:0")
            .env("FLASHSALE_JWT_SECRET", JWT_SECRET)
            .env("FLASHSALE_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("FLASHSALE_PAYMENT_SECRET", PAYMENT_SECRET)
            .env("FLASHSALE_ROLES", roles)
            .env("RUST_LOG", "warn")
            .envs(extra_env.iter().copied())
            .stdout(Stdio::null())
            .spawn()
            .expect("the flashsale binary starts");
        Self(child)
    }

    /// The child's process id (a broker connection's name carries it).
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// SIGKILL: no shutdown, no goodbye.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    /// SIGTERM, then waits up to `within` for the exit (SIGKILL after
    /// that); returns whether it exited with 0.
    pub fn terminate(&mut self, within: Duration) -> bool {
        let pid = self.0.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let until = Instant::now() + within;
        loop {
            match self.0.try_wait() {
                Ok(Some(status)) => return status.success(),
                Ok(None) if Instant::now() < until => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => {
                    self.kill();
                    return false;
                }
            }
        }
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A mariadbd of the test's own, on its own port and data directory, that the
/// test may kill and restart. No grant tables: any user may connect.
pub struct OwnMariaDb {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl OwnMariaDb {
    pub async fn start() -> Self {
        let (port, dir) = (free_port(), fresh_dir("fstest-mariadb"));
        let mut install = Command::new("mariadb-install-db");
        install
            .arg("--no-defaults")
            .arg(format!("--datadir={}", dir.join("data").display()))
            .args(["--auth-root-authentication-method=normal", "--skip-test-db"]);
        if is_root() {
            install.arg("--user=root");
        }
        let out = install.output().expect("mariadb-install-db is installed");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut db = Self {
            port,
            dir,
            child: None,
        };
        db.restart().await;
        db
    }

    /// A database URL on this server.
    pub fn url(&self, database: &str) -> String {
        format!("mysql://root@127.0.0.1:{}/{database}", self.port)
    }

    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let mut cmd = Command::new("mariadbd");
        cmd.arg("--no-defaults")
            .arg(format!("--datadir={}", self.dir.join("data").display()))
            .arg(format!("--socket={}", self.dir.join("sock").display()))
            .arg(format!("--port={}", self.port))
            .args([
                "--bind-address=127.0.0.1",
                "--skip-grant-tables",
                "--skip-log-bin",
            ])
            .arg("--innodb-buffer-pool-size=64M")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if is_root() {
            cmd.arg("--user=root");
        }
        self.child = Some(cmd.spawn().expect("mariadbd is installed"));
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "own mariadbd did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILL: a crash, not a shutdown.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for OwnMariaDb {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

/// A TCP port nothing listens on right now.
fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// A new empty directory under the system's temporary directory.
fn fresh_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(unique(tag));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Messages ready in broker queue `queue` (not those delivered and
/// unacked), by a passive declare on `ch`; `None` when the queue does not
/// exist, and then the broker has closed `ch`.
pub async fn queue_depth(ch: &lapin::Channel, queue: &str) -> Option<u32> {
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    ch.queue_declare(queue.into(), passive, Default::default())
        .await
        .ok()
        .map(|q| q.message_count())
}

/// The audit's options for one sale: a minute's grace, no progress bar, the
/// events checked without a broker.
pub fn audit_of(sale: flashsale::domain::SaleId) -> flashsale::audit::AuditOptions {
    flashsale::audit::AuditOptions {
        sale: Some(sale),
        grace: Duration::from_secs(60),
        progress: false,
        events: Default::default(),
    }
}

/// `flashsale audit --sale <sale>` as the library runs it.
pub async fn audit_sale(
    app: &TestApp,
    pool: &sqlx::MySqlPool,
    sale: &str,
) -> flashsale::audit::Report {
    flashsale::audit::run(&app.engine, pool, &audit_of(sale.parse().unwrap()))
        .await
        .unwrap()
}
