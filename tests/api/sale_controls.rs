//! Sale controls (API.md "Sale controls"): an admin pauses, resumes and
//! ends a sale. Every test runs the real service against real Redis and
//! MariaDB; two instances share one sale where "every instance" matters.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use serde_json::Value;

use crate::audit::{audit, wait_backlog_empty};
use crate::helpers::*;
use flashsale::config::Role;

fn all_roles(c: &mut flashsale::config::ServeConfig) {
    c.roles = vec![Role::Http, Role::Expiry, Role::Reconciler];
}

impl TestApp {
    /// `POST /api/v1/sales/{sale}/{control}` with `token` (None: no
    /// credentials); returns status and body.
    async fn control(&self, sale: &str, control: &str, token: Option<&str>) -> (u16, Value) {
        let mut req = self
            .client
            .post(self.url(&format!("/api/v1/sales/{sale}/{control}")));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let res = req.send().await.unwrap();
        let status = res.status().as_u16();
        (status, res.json().await.unwrap_or(Value::Null))
    }

    async fn admin(&self, sale: &str, control: &str) -> (u16, Value) {
        self.control(sale, control, Some(ADMIN_TOKEN)).await
    }
}

async fn pool(t: &Target) -> sqlx::MySqlPool {
    sqlx::MySqlPool::connect(&t.database_url).await.unwrap()
}

/// `flashsale sale <control> --id <sale>` against the test's stores.
async fn cli(t: &Target, control: &str, sale: &str) -> (i32, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_flashsale"))
        .args(["sale", control, "--id", sale])
        .envs(t.redis_env())
        .env("DATABASE_URL", &t.database_url)
        .env("FLASHSALE_KEY_PREFIX", &t.key_prefix)
        .output()
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_sale_refuses_reservations_on_every_instance_while_payments_and_expiry_go_on() {
    let target = Target::fresh();
    let a = spawn_with(target.clone(), all_roles).await;
    let b = spawn_on(target.clone()).await;
    let sale = a
        .create_sale(SaleSpec {
            stock: 100,
            payment_window_secs: 2,
            ..SaleSpec::default()
        })
        .await;
    b.wait_serving(&sale, Duration::from_secs(5)).await;
    // Orders before the pause: one to pay, one to cancel, one to expire,
    // and one made under an idempotency key.
    let mut orders = Vec::new();
    for user in 1..=3u64 {
        let (s, o) = a.reserve(&sale, user, None).await;
        assert_eq!(s, 201, "{o}");
        orders.push(o["order_id"].as_str().unwrap().to_owned());
    }
    let (s, keyed) = b.reserve(&sale, 4, Some("k-4")).await;
    assert_eq!(s, 201, "{keyed}");

    let (s, view) = a.admin(&sale, "pause").await;
    assert_eq!(s, 200, "{view}");
    assert_eq!(view["state"], "paused");
    assert_eq!(view["sale_id"], sale.as_str());
    // At once, on both instances.
    for app in [&a, &b] {
        let (s, e) = app.reserve(&sale, 10, None).await;
        assert_eq!((s, code(&e)), (409, "sale_paused"), "{e}");
        assert_eq!(app.get_sale(&sale).await["state"], "paused");
    }
    // Pausing again changes nothing.
    let (s, again) = b.admin(&sale, "pause").await;
    assert_eq!((s, &again["state"]), (200, &Value::from("paused")));
    // The buyer whose key made an order before still finds it.
    let (s, replay) = a.reserve(&sale, 4, Some("k-4")).await;
    assert!(s == 200 || s == 201, "{s} {replay}");
    assert_eq!(replay["order_id"], keyed["order_id"]);

    // Payments and cancels go on; the third order expires while paused.
    let (s, paid) = b.pay(&orders[0], "pay-1", 1999).await;
    assert_eq!(s, 200, "{paid}");
    let (s, cancelled) = a.cancel(&orders[1], 2).await;
    assert_eq!(s, 200, "{cancelled}");
    let until = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, o) = a.order_call("GET", &orders[2], "", 3).await;
        if o["status"] == "closed" {
            break;
        }
        assert!(Instant::now() < until, "order never closed: {o}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (s, e) = b.reserve(&sale, 11, None).await;
    assert_eq!((s, code(&e)), (409, "sale_paused"));
    let metrics = b.metrics().await;
    assert!(
        metrics.contains(&format!(
            "flashsale_sale_state{{sale_id=\"{sale}\",state=\"paused\"}} 1"
        )),
        "{metrics}"
    );
    assert!(metrics.contains("flashsale_reservations_total{outcome=\"sale_paused\"} 2"));

    // MySQL keeps the pause (a sale rebuilt from it stays paused).
    let db = pool(&target).await;
    let paused: bool = sqlx::query_scalar("SELECT paused_at IS NOT NULL FROM sales WHERE id = ?")
        .bind(sale.parse::<u64>().unwrap())
        .fetch_one(&db)
        .await
        .unwrap();
    assert!(paused);

    let (s, view) = b.admin(&sale, "resume").await;
    assert_eq!((s, &view["state"]), (200, &Value::from("open")), "{view}");
    for (app, user) in [(&a, 20), (&b, 21)] {
        let (s, o) = app.reserve(&sale, user, None).await;
        assert_eq!(s, 201, "{o}");
    }
    let paused: bool = sqlx::query_scalar("SELECT paused_at IS NOT NULL FROM sales WHERE id = ?")
        .bind(sale.parse::<u64>().unwrap())
        .fetch_one(&db)
        .await
        .unwrap();
    assert!(!paused);
    wait_backlog_empty(&a, &sale).await;
    let (code_, out) = audit(&target, &["--sale", &sale]).await;
    assert_eq!(code_, 0, "{out}");
    drop(db);
    b.finish().await;
    a.finish().await;
}

/// A pause sent in the middle of a rush holds from its answer on: no order
/// is made after it, on either instance, and none is lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pause_in_a_rush_holds_from_its_answer_on() {
    let target = Target::fresh();
    let a = Arc::new(spawn_with(target.clone(), all_roles).await);
    let b = Arc::new(spawn_on(target.clone()).await);
    let sale = a
        .create_sale(SaleSpec {
            stock: 100_000,
            ..SaleSpec::default()
        })
        .await;
    b.wait_serving(&sale, Duration::from_secs(5)).await;
    let paused = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let next_user = Arc::new(AtomicU64::new(1));
    let mut tasks = Vec::new();
    for t in 0..32 {
        let app = if t % 2 == 0 { a.clone() } else { b.clone() };
        let (sale, paused, stop, next_user) = (
            sale.clone(),
            paused.clone(),
            stop.clone(),
            next_user.clone(),
        );
        tasks.push(tokio::spawn(async move {
            // (created, created after the pause's answer, paused refusals)
            let mut seen = (0u64, 0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                let user = next_user.fetch_add(1, Ordering::Relaxed);
                let sent_after_pause = paused.load(Ordering::SeqCst);
                let (s, body) = app.reserve(&sale, user, None).await;
                match (s, code(&body)) {
                    (201, _) => {
                        seen.0 += 1;
                        if sent_after_pause {
                            seen.1 += 1;
                        }
                    }
                    (409, "sale_paused") => seen.2 += 1,
                    other => panic!("unexpected answer {other:?}: {body}"),
                }
            }
            seen
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (s, view) = a.admin(&sale, "pause").await;
    assert_eq!(s, 200, "{view}");
    paused.store(true, Ordering::SeqCst);
    let sold_at_pause = b.get_sale(&sale).await["stock_available"].as_i64().unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = (0, 0, 0);
    for t in tasks {
        let s = t.await.unwrap();
        total = (total.0 + s.0, total.1 + s.1, total.2 + s.2);
    }
    assert!(total.0 > 0, "no order before the pause");
    assert_eq!(total.1, 0, "orders made after the pause answered");
    assert!(total.2 > 0, "nobody was refused while paused");
    let after = b.get_sale(&sale).await;
    assert_eq!(after["stock_available"].as_i64().unwrap(), sold_at_pause);
    assert_eq!(100_000 - sold_at_pause, total.0 as i64);
    wait_backlog_empty(&a, &sale).await;
    let (c, out) = audit(&target, &["--sale", &sale]).await;
    assert_eq!(c, 0, "{out}");
    let b = Arc::try_unwrap(b).ok().unwrap();
    let a = Arc::try_unwrap(a).ok().unwrap();
    b.finish().await;
    a.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_ended_sale_stays_ended_and_its_pending_orders_can_still_be_paid() {
    let app = spawn_with(Target::fresh(), all_roles).await;
    let sale = app.create_sale(SaleSpec::default()).await;
    let (s, o) = app.reserve(&sale, 1, None).await;
    assert_eq!(s, 201);
    let order = o["order_id"].as_str().unwrap().to_owned();
    let (s, _) = app.admin(&sale, "pause").await;
    assert_eq!(s, 200);

    let (s, view) = app.admin(&sale, "end").await;
    assert_eq!((s, &view["state"]), (200, &Value::from("ended")), "{view}");
    let ended_at = view["end_at"].as_str().unwrap().to_owned();
    let (s, e) = app.reserve(&sale, 2, None).await;
    assert_eq!((s, code(&e)), (409, "sale_ended"));
    for control in ["pause", "resume"] {
        let (s, e) = app.admin(&sale, control).await;
        assert_eq!((s, code(&e)), (409, "sale_ended"), "{control}: {e}");
    }
    // Ending again keeps the first end.
    let (s, again) = app.admin(&sale, "end").await;
    assert_eq!(s, 200);
    assert_eq!(again["end_at"].as_str().unwrap(), ended_at);
    assert_eq!(again["state"], "ended");

    // The buyer who reserved before the end may still pay.
    let (s, paid) = app.pay(&order, "pay-1", 1999).await;
    assert_eq!(s, 200, "{paid}");
    let db = pool(&app.target).await;
    let (early, end_at): (bool, chrono::DateTime<chrono::Utc>) = sqlx::query_as(
        "SELECT ended_early_at IS NOT NULL AND paused_at IS NULL, end_at FROM sales WHERE id = ?",
    )
    .bind(sale.parse::<u64>().unwrap())
    .fetch_one(&db)
    .await
    .unwrap();
    assert!(early);
    assert_eq!(
        end_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        ended_at,
        "MySQL and Redis end the sale at the same time"
    );
    wait_backlog_empty(&app, &sale).await;
    let (c, out) = audit(&app.target, &["--sale", &sale]).await;
    assert_eq!(c, 0, "{out}");
    drop(db);
    app.finish().await;
}

#[tokio::test]
async fn controls_need_the_admin_token_and_an_existing_sale_and_change_nothing_otherwise() {
    let app = spawn_app().await;
    let sale = app.create_sale(SaleSpec::default()).await;
    for control in ["pause", "resume", "end"] {
        let (s, e) = app.control(&sale, control, None).await;
        assert_eq!((s, code(&e)), (401, "unauthorized"), "{control}");
        let (s, e) = app.control(&sale, control, Some(&buyer_token(1))).await;
        assert_eq!((s, code(&e)), (401, "unauthorized"), "{control}");
        let (s, e) = app.admin("999999999", control).await;
        assert_eq!((s, code(&e)), (404, "not_found"), "{control}");
        let (s, e) = app.admin("x1", control).await;
        assert_eq!((s, code(&e)), (400, "invalid_request"), "{control}");
    }
    let res = app
        .client
        .get(app.url(&format!("/api/v1/sales/{sale}/pause")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 405);
    assert_eq!(app.get_sale(&sale).await["state"], "open");
    let (s, _) = app.reserve(&sale, 1, None).await;
    assert_eq!(s, 201);
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cli_pauses_resumes_and_ends_a_sale_the_api_serves() {
    let app = spawn_app().await;
    let sale = app.create_sale(SaleSpec::default()).await;
    let (c, out, err) = cli(&app.target, "pause", &sale).await;
    assert_eq!(c, 0, "{out} {err}");
    assert!(out.contains("paused"), "{out}");
    let (s, e) = app.reserve(&sale, 1, None).await;
    assert_eq!((s, code(&e)), (409, "sale_paused"));
    let (c, out, err) = cli(&app.target, "resume", &sale).await;
    assert_eq!(c, 0, "{out} {err}");
    assert!(out.contains("open"), "{out}");
    let (s, _) = app.reserve(&sale, 1, None).await;
    assert_eq!(s, 201);
    let (c, out, err) = cli(&app.target, "end", &sale).await;
    assert_eq!(c, 0, "{out} {err}");
    assert!(out.contains("ended"), "{out}");
    let (c, _, err) = cli(&app.target, "pause", &sale).await;
    assert_eq!(c, 1, "{err}");
    assert!(err.contains("has ended"), "{err}");
    let (c, _, err) = cli(&app.target, "pause", "999999999").await;
    assert_eq!(c, 1, "{err}");
    let (s, e) = app.reserve(&sale, 2, None).await;
    assert_eq!((s, code(&e)), (409, "sale_ended"));
    app.finish().await;
}

/// Redis loses a paused sale: the sale rebuilt from MySQL is still paused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_sale_that_redis_loses_comes_back_paused() {
    let app = spawn_with(Target::fresh(), all_roles).await;
    let sale = app.create_sale(SaleSpec::default()).await;
    let (s, _) = app.reserve(&sale, 1, None).await;
    assert_eq!(s, 201);
    let (s, _) = app.admin(&sale, "pause").await;
    assert_eq!(s, 200);
    wait_backlog_empty(&app, &sale).await;
    let mut c = app.engine.connection();
    let _: () = c.del(app.sale_keys(&sale).sale).await.unwrap();
    app.wait_serving(&sale, Duration::from_secs(15)).await;
    let view = app.get_sale(&sale).await;
    assert_eq!(view["state"], "paused", "{view}");
    assert_eq!(view["stock_available"], 9);
    let (s, e) = app.reserve(&sale, 2, None).await;
    assert_eq!((s, code(&e)), (409, "sale_paused"));
    let (s, _) = app.admin(&sale, "resume").await;
    assert_eq!(s, 200);
    let (s, _) = app.reserve(&sale, 2, None).await;
    assert_eq!(s, 201);
    app.finish().await;
}

/// A control in one store only (MySQL failed after Redis changed) is a
/// finding until the control is sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_audit_finds_a_control_in_one_store_only_and_sending_it_again_levels_them() {
    let app = spawn_with(Target::fresh(), all_roles).await;
    let sale = app.create_sale(SaleSpec::default()).await;
    let (s, _) = app.reserve(&sale, 1, None).await;
    assert_eq!(s, 201);
    wait_backlog_empty(&app, &sale).await;
    // Paused in Redis alone, as a pause whose MySQL commit failed leaves it.
    let mut c = app.engine.connection();
    let _: () = c
        .hset(app.sale_keys(&sale).sale, "paused", "1")
        .await
        .unwrap();
    let (code_, out) = audit(&app.target, &["--sale", &sale]).await;
    assert_eq!(code_, 1, "{out}");
    assert!(out.contains("sale_control_mismatch"), "{out}");
    let (s, _) = app.admin(&sale, "pause").await;
    assert_eq!(s, 200);
    let (code_, out) = audit(&app.target, &["--sale", &sale]).await;
    assert_eq!(code_, 0, "{out}");
    app.finish().await;
}
