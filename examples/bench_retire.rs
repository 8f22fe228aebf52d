//! Retirement benchmark driver: what 2,000 ended sales cost a running
//! `flashsale serve` when nothing happens (CPU of the server process,
//! MySQL queries and Redis commands per second), and the settlement lag
//! of a new order beside them (from its 201 to its row in MySQL).
//!
//! It talks to the server over HTTP and reads MySQL and Redis directly, so
//! it drives any build of the server, before or after retirement existed.
//! `scripts/bench-retire.sh` runs it against both, each on a MariaDB and a
//! Redis of its own (so the global counters count that server alone).

use std::time::{Duration, Instant};

use clap::Parser;
use flashsale::domain::UserId;
use futures::stream::{self, StreamExt};
use hmac::Mac;
use secrecy::SecretString;
use serde_json::{json, Value};
use sqlx::{Connection, MySqlConnection};

#[derive(Parser, Debug)]
struct Args {
    /// The server's base URL.
    #[arg(long)]
    base: String,
    /// The server's database.
    #[arg(long)]
    database_url: String,
    /// The server's Redis.
    #[arg(long)]
    redis_url: String,
    /// The server's process id (its CPU time is read from /proc).
    #[arg(long)]
    pid: u32,
    /// Clock ticks per second of /proc/<pid>/stat (`getconf CLK_TCK`).
    #[arg(long, default_value_t = 100)]
    clk_tck: u64,
    /// Ended sales to create.
    #[arg(long, default_value_t = 2000)]
    sales: u64,
    /// Seconds from the start until the sales end (all their orders must be
    /// placed before).
    #[arg(long, default_value_t = 40)]
    end_in_secs: i64,
    /// Seconds of the idle measurement.
    #[arg(long, default_value_t = 60)]
    idle_secs: u64,
    /// Orders whose settlement lag is measured (one after another).
    #[arg(long, default_value_t = 20)]
    lag_orders: u64,
    /// A name for the output line.
    #[arg(long, default_value = "server")]
    label: String,
    /// Admin token, buyer-token and payment secrets (as the server's).
    #[arg(long, env = "FLASHSALE_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: String,
    #[arg(long, env = "FLASHSALE_JWT_SECRET", hide_env_values = true)]
    jwt_secret: String,
    #[arg(long, env = "FLASHSALE_PAYMENT_SECRET", hide_env_values = true)]
    payment_secret: String,
}

struct Driver {
    args: Args,
    http: reqwest::Client,
}

fn rfc3339(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

impl Driver {
    fn token(&self, user: u64) -> String {
        flashsale::http::auth::issue_token(
            &SecretString::from(self.args.jwt_secret.clone()),
            UserId::new(user).unwrap(),
            3600,
        )
        .unwrap()
    }

    async fn create_sale(
        &self,
        stock: u64,
        end: chrono::DateTime<chrono::Utc>,
    ) -> anyhow::Result<String> {
        let now = chrono::Utc::now();
        let res = self
            .http
            .post(format!("{}/api/v1/sales", self.args.base))
            .bearer_auth(&self.args.admin_token)
            .json(
                &json!({"sku": "BENCH", "title": "retirement bench", "price_cents": 100,
                "stock": stock, "start_at": rfc3339(now - chrono::Duration::minutes(1)),
                "end_at": rfc3339(end), "per_user_limit": 1, "payment_window_secs": 1}),
            )
            .send()
            .await?;
        anyhow::ensure!(res.status() == 201, "create sale: {}", res.text().await?);
        let v: Value = res.json().await?;
        Ok(v["sale_id"].as_str().unwrap_or_default().to_owned())
    }

    async fn reserve(&self, sale: &str, user: u64) -> anyhow::Result<Value> {
        let res = self
            .http
            .post(format!("{}/api/v1/sales/{sale}/orders", self.args.base))
            .bearer_auth(self.token(user))
            .send()
            .await?;
        anyhow::ensure!(res.status() == 201, "reserve: {}", res.text().await?);
        Ok(res.json().await?)
    }

    async fn pay(&self, order: &Value) -> anyhow::Result<()> {
        let body =
            json!({"order_id": order["order_id"], "payment_id": format!("p-{}", order["order_id"]),
            "amount_cents": order["amount_cents"], "status": "succeeded"})
            .to_string();
        let mut mac =
            hmac::Hmac::<sha2::Sha256>::new_from_slice(self.args.payment_secret.as_bytes())?;
        mac.update(body.as_bytes());
        let res = self
            .http
            .post(format!("{}/api/v1/payments/callback", self.args.base))
            .header(
                "X-Signature",
                format!("sha256={}", hex::encode(mac.finalize().into_bytes())),
            )
            .header("Content-Type", "application/json")
            .body(body)
            .send()
            .await?;
        anyhow::ensure!(res.status() == 200, "pay: {}", res.text().await?);
        Ok(())
    }

    fn cpu_ticks(&self) -> anyhow::Result<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.args.pid))?;
        // Fields after the command name (which may hold spaces): state is
        // field 3, utime 14 and stime 15.
        let rest = stat
            .rsplit_once(')')
            .ok_or_else(|| anyhow::anyhow!("bad stat"))?
            .1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        Ok(f[11].parse::<u64>()? + f[12].parse::<u64>()?)
    }
}

async fn scalar(db: &mut MySqlConnection, sql: &str) -> anyhow::Result<i64> {
    let (v,): (i64,) = sqlx::query_as(sql).fetch_one(&mut *db).await?;
    Ok(v)
}

async fn questions(db: &mut MySqlConnection) -> anyhow::Result<u64> {
    let (_, v): (String, String) = sqlx::query_as("SHOW GLOBAL STATUS LIKE 'Questions'")
        .fetch_one(&mut *db)
        .await?;
    Ok(v.parse()?)
}

async fn redis_commands(c: &mut redis::aio::MultiplexedConnection) -> anyhow::Result<u64> {
    let info: String = redis::cmd("INFO").arg("stats").query_async(c).await?;
    info.lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .ok_or_else(|| anyhow::anyhow!("no total_commands_processed"))?
        .trim()
        .parse()
        .map_err(Into::into)
}

async fn wait_until(
    what: &str,
    limit: Duration,
    mut ok: impl AsyncFnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    while !ok().await? {
        anyhow::ensure!(started.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(started.elapsed())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let d = Driver {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()?,
        args,
    };
    let a = &d.args;
    let mut db = MySqlConnection::connect(&a.database_url).await?;
    let redis = redis::Client::open(a.redis_url.as_str())?;
    let mut rc = redis.get_multiplexed_async_connection().await?;
    let has_retirement = scalar(
        &mut db,
        "SELECT COUNT(*) FROM information_schema.columns WHERE table_schema = DATABASE() \
         AND table_name = 'sales' AND column_name = 'retired_at'",
    )
    .await?
        == 1;

    // 1. The ended sales: one order each (every other one paid), all made
    //    before the common end.
    let started = Instant::now();
    let end = chrono::Utc::now() + chrono::Duration::seconds(a.end_in_secs);
    let dr = &d;
    let created: Vec<anyhow::Result<()>> = stream::iter(1..=a.sales)
        .map(|i| async move {
            let sale = dr.create_sale(10, end).await?;
            let order = dr.reserve(&sale, i).await?;
            if i % 2 == 0 {
                dr.pay(&order).await?;
            }
            Ok(())
        })
        .buffer_unordered(16)
        .collect()
        .await;
    created.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    let setup = started.elapsed();
    anyhow::ensure!(
        chrono::Utc::now() < end,
        "setting up took {setup:?}, past the sales' end: raise --end-in-secs"
    );
    eprintln!(
        "[{}] {} sales with one order each in {setup:.1?}",
        a.label, a.sales
    );
    tokio::time::sleep(
        (end - chrono::Utc::now())
            .to_std()
            .unwrap_or_default()
            .max(Duration::ZERO),
    )
    .await;
    let ended = Instant::now();
    let n = a.sales as i64;
    let settled = wait_until(
        "every order settled",
        Duration::from_secs(600),
        async || {
            Ok(scalar(
                &mut db,
                "SELECT COUNT(*) FROM orders WHERE status <> 'pending'",
            )
            .await?
                == n)
        },
    )
    .await?;
    eprintln!(
        "[{}] every order settled {settled:.1?} after the end",
        a.label
    );
    if has_retirement {
        wait_until("every sale retired", Duration::from_secs(600), async || {
            Ok(scalar(
                &mut db,
                "SELECT COUNT(*) FROM sales WHERE retired_at IS NOT NULL",
            )
            .await?
                == n)
        })
        .await?;
        eprintln!(
            "[{}] every sale retired {:.1?} after the end",
            a.label,
            ended.elapsed()
        );
    }
    tokio::time::sleep(Duration::from_secs(3)).await;

    // 2. Idle: nothing but the ended sales.
    let (cpu0, q0, r0) = (
        d.cpu_ticks()?,
        questions(&mut db).await?,
        redis_commands(&mut rc).await?,
    );
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(a.idle_secs)).await;
    let secs = t0.elapsed().as_secs_f64();
    let (cpu1, q1, r1) = (
        d.cpu_ticks()?,
        questions(&mut db).await?,
        redis_commands(&mut rc).await?,
    );
    let cpu_per_min = (cpu1 - cpu0) as f64 / a.clk_tck as f64 * 60.0 / secs;
    // Less the driver's own reading (one SHOW, one INFO).
    let qps = (q1 - q0).saturating_sub(1) as f64 / secs;
    let rps = (r1 - r0).saturating_sub(1) as f64 / secs;

    // 3. Settlement lag of new orders beside the ended sales.
    let sale = d
        .create_sale(
            a.lag_orders.max(1),
            chrono::Utc::now() + chrono::Duration::hours(1),
        )
        .await?;
    let sale_id: u64 = sale.parse()?;
    let mut lags = Vec::new();
    for user in 0..a.lag_orders {
        let order = d.reserve(&sale, 1_000_000 + user).await?;
        let at = Instant::now();
        let seq: u64 = order["order_id"]
            .as_str()
            .and_then(|o| o.rsplit('-').next())
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("order id {order}"))?;
        loop {
            let found: Option<(u64,)> =
                sqlx::query_as("SELECT seq FROM orders WHERE sale_id = ? AND seq = ?")
                    .bind(sale_id)
                    .bind(seq)
                    .fetch_optional(&mut db)
                    .await?;
            if found.is_some() {
                break;
            }
            anyhow::ensure!(
                at.elapsed() < Duration::from_secs(120),
                "order {seq} never settled"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        lags.push(at.elapsed().as_secs_f64() * 1000.0);
    }
    lags.sort_by(f64::total_cmp);
    let p50 = lags[lags.len() / 2];
    let max = lags.last().copied().unwrap_or(0.0);
    println!(
        "| {} | {} | {cpu_per_min:.2} | {qps:.1} | {rps:.1} | {p50:.0} ms | {max:.0} ms |",
        a.label, a.sales
    );
    Ok(())
}
