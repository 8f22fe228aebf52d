//! `flashsale demo`: a whole sale on the local services, end to end.
//!
//! It starts the service in this process (HTTP, expiry and reconciler) on a
//! free port with its own database and key prefix, puts a sale on, and lets
//! thousands of simulated buyers rush it over HTTP. Some pay (through signed
//! gateway callbacks), some cancel, the rest let the deadline pass; some of
//! the payers ask for a refund at once. When everything has settled it runs
//! the audit and prints a summary. Nothing here is a shortcut: every step
//! goes through the public API or the same code the operators run.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt};
use hmac::{Hmac, Mac};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Value};
use sha2::Sha256;
use tokio_util::sync::CancellationToken;

use crate::config::{Role, Secrets, ServeConfig, StoreConfig};
use crate::domain::UserId;

/// The demo's shape.
#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Simulated buyers.
    #[arg(long, default_value_t = 5000)]
    pub buyers: u64,
    /// Units on sale.
    #[arg(long, default_value_t = 1000)]
    pub stock: i64,
    /// Seconds each buyer has to pay.
    #[arg(long, default_value_t = 3)]
    pub payment_window_secs: i64,
    /// Buyers in flight at once.
    #[arg(long, default_value_t = 200)]
    pub concurrency: usize,
    /// Redis and MySQL to use (the demo makes its own database and prefix).
    #[command(flatten)]
    pub store: StoreConfig,
}

#[derive(Default)]
struct Tally {
    sold: AtomicU64,
    sold_out: AtomicU64,
    paid: AtomicU64,
    cancelled: AtomicU64,
    left_unpaid: AtomicU64,
    refunds_asked: AtomicU64,
    other: AtomicU64,
}

fn secret(s: &str) -> SecretString {
    SecretString::from(s.to_owned())
}

fn sign(secret: &SecretString, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.expose_secret().as_bytes())
        .expect("any key length works");
    mac.update(body.as_bytes());
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Runs the demo; returns the process exit code (the audit's).
pub async fn run(args: DemoArgs) -> anyhow::Result<i32> {
    let mut store = args.store.clone();
    let mut url = url::Url::parse(&store.database_url)?;
    url.set_path(&format!("flashsale_demo_{}", std::process::id()));
    store.database_url = url.to_string();
    store.key_prefix = format!("demo{}", std::process::id());
    let (jwt, admin, pay) = (
        secret("demo-jwt-secret-of-thirty-two-bytes"),
        secret("demo-admin-token-of-thirty-two-bytes"),
        secret("demo-payment-secret-of-thirty-two-bytes"),
    );
    let mut cfg = ServeConfig::from_defaults()?;
    cfg.store = store.clone();
    cfg.http.listen = "127.0.0.1:0".parse()?;
    // The demo's thousands of simulated buyers share one address, and each
    // asks once.
    cfg.http.ip_rate_per_sec = 0;
    cfg.reconciler.reconciler_max_backoff_ms = 2000;
    cfg.roles = vec![Role::Http, Role::Expiry, Role::Reconciler];
    cfg.secrets = Some(Secrets {
        jwt_secret: jwt.clone(),
        admin_token: admin.clone(),
        payment_secret: pay.clone(),
    });
    let app = crate::startup::App::build(cfg).await?;
    let base = format!("http://{}", app.local_addr().expect("HTTP role"));
    let engine = app.state().engine.clone();
    let db = app.state().db.clone();
    let stop = CancellationToken::new();
    let server = tokio::spawn(app.run_until_stopped(stop.clone()));
    let client = reqwest::Client::new();

    let now = chrono::Utc::now();
    let sale: Value = client
        .post(format!("{base}/api/v1/sales"))
        .bearer_auth(admin.expose_secret())
        .json(
            &json!({"sku": "DEMO-1", "title": "Demo phone", "price_cents": 49_900,
            "stock": args.stock, "start_at": now - chrono::Duration::seconds(1),
            "end_at": now + chrono::Duration::hours(1), "per_user_limit": 1,
            "payment_window_secs": args.payment_window_secs}),
        )
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let sale_id = sale["sale_id"].as_str().unwrap_or_default().to_owned();
    println!(
        "sale {sale_id}: {} units, {} buyers rushing, {} s to pay (service at {base})",
        args.stock, args.buyers, args.payment_window_secs
    );

    let bars = MultiProgress::new();
    let style = ProgressStyle::with_template("{prefix:>10} {bar:40} {pos}/{len} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    let rush = bars.add(ProgressBar::new(args.buyers).with_style(style.clone()));
    rush.set_prefix("buyers");
    let tally = Arc::new(Tally::default());
    let started = Instant::now();
    stream::iter(1..=args.buyers)
        .for_each_concurrent(args.concurrency, |u| {
            let (client, base, sale_id, tally, rush) =
                (&client, &base, &sale_id, tally.clone(), &rush);
            let (jwt, pay) = (&jwt, &pay);
            async move {
                buyer(client, base, sale_id, u, jwt, pay, &tally).await;
                rush.inc(1);
            }
        })
        .await;
    let rush_secs = started.elapsed().as_secs_f64();
    rush.finish_with_message(format!("done in {rush_secs:.1} s"));

    let settle = bars.add(ProgressBar::new_spinner());
    settle.set_prefix("settling");
    let settle_started = Instant::now();
    loop {
        let s = engine.audit_snapshot(sale_id.parse()?).await?;
        let (pending, waiting, backlog) = s.as_ref().map_or((0, 0, 0), |s| {
            (s.num("pending"), s.num("refunds_waiting"), s.flow_len)
        });
        settle.set_message(format!(
            "{pending} pending, {waiting} refunds waiting, {backlog} records on their way to MySQL"
        ));
        settle.tick();
        if pending == 0 && waiting == 0 && backlog == 0 {
            break;
        }
        if server.is_finished() || settle_started.elapsed() > Duration::from_secs(120) {
            settle.abandon_with_message("did not settle within 2 minutes");
            stop.cancel();
            anyhow::bail!("the sale did not settle: {pending} pending, {waiting} refunds waiting, {backlog} records waiting");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    settle.finish_with_message("settled");

    let report = crate::audit::run(
        &engine,
        &db,
        &crate::audit::AuditOptions {
            sale: Some(sale_id.parse()?),
            grace: Duration::from_secs(60),
            progress: false,
            events: Default::default(),
        },
    )
    .await?;
    let snap = engine.audit_snapshot(sale_id.parse()?).await?;
    let u = snap.as_ref().map(|s| s.units()).unwrap_or_default();
    let t = &tally;
    println!();
    println!(
        "{} buyers got an order ({} units came back through cancels and refunds during the rush \
         and sold again), {} were told sold out; {} buyers in {rush_secs:.1} s: {:.0} buyers/s",
        t.sold.load(Ordering::Relaxed),
        (t.sold.load(Ordering::Relaxed) as i64 - args.stock).max(0),
        t.sold_out.load(Ordering::Relaxed),
        args.buyers,
        args.buyers as f64 / rush_secs
    );
    println!(
        "paid {}, cancelled {}, closed unpaid at the deadline {} (left unpaid by {} buyers), refunded {} ({} asked)",
        u.paid + u.refunded,
        u.cancelled,
        u.closed,
        t.left_unpaid.load(Ordering::Relaxed),
        u.refunded,
        t.refunds_asked.load(Ordering::Relaxed)
    );
    println!(
        "stock: total {} = available {} + pending {} + paid {} + refunded {} - restocked {}",
        u.total, u.available, u.pending, u.paid, u.refunded, u.restocked
    );
    if t.other.load(Ordering::Relaxed) > 0 {
        println!("unexpected answers: {}", t.other.load(Ordering::Relaxed));
    }
    let mut out = std::io::stdout().lock();
    crate::audit::print_human(&report, false, &mut out)?;
    drop(out);
    stop.cancel();
    server.await??;
    let clean = report.is_clean() && t.other.load(Ordering::Relaxed) == 0;
    crate::db::drop_database(&store.database_url).await.ok();
    engine.drop_sale_keys(sale_id.parse()?).await.ok();
    Ok(if clean { 0 } else { 1 })
}

/// One buyer: reserve; then pay (half), pay and ask for a refund (a tenth),
/// cancel (a sixth), or let the deadline pass.
async fn buyer(
    client: &reqwest::Client,
    base: &str,
    sale: &str,
    user: u64,
    jwt: &SecretString,
    pay_secret: &SecretString,
    t: &Tally,
) {
    let Ok(id) = UserId::new(user) else { return };
    let Ok(token) = crate::http::auth::issue_token(jwt, id, 3600) else {
        return;
    };
    let Ok(res) = client
        .post(format!("{base}/api/v1/sales/{sale}/orders"))
        .bearer_auth(&token)
        .send()
        .await
    else {
        t.other.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let status = res.status().as_u16();
    let body: Value = res.json().await.unwrap_or_default();
    match (status, body["error"]["code"].as_str()) {
        (201, _) => t.sold.fetch_add(1, Ordering::Relaxed),
        (409, Some("sold_out")) => {
            t.sold_out.fetch_add(1, Ordering::Relaxed);
            return;
        }
        _ => {
            t.other.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let order = body["order_id"].as_str().unwrap_or_default().to_owned();
    match user % 10 {
        0..=4 => {
            let cb = json!({"order_id": order, "payment_id": format!("demo-{order}"),
                "amount_cents": body["amount_cents"], "status": "succeeded"})
            .to_string();
            let paid = client
                .post(format!("{base}/api/v1/payments/callback"))
                .header("X-Signature", sign(pay_secret, &cb))
                .header("Content-Type", "application/json")
                .body(cb)
                .send()
                .await;
            if paid.is_ok_and(|r| r.status().is_success()) {
                t.paid.fetch_add(1, Ordering::Relaxed);
                if user.is_multiple_of(10) {
                    t.refunds_asked.fetch_add(1, Ordering::Relaxed);
                    let _ = client
                        .post(format!("{base}/api/v1/orders/{order}/refund"))
                        .bearer_auth(&token)
                        .send()
                        .await;
                }
            }
        }
        5 => {
            let _ = client
                .post(format!("{base}/api/v1/orders/{order}/cancel"))
                .bearer_auth(&token)
                .send()
                .await;
            t.cancelled.fetch_add(1, Ordering::Relaxed);
        }
        _ => {
            t.left_unpaid.fetch_add(1, Ordering::Relaxed);
        }
    }
}
