//! Drills: Redis forgets or goes back in time while a sale serves. Each
//! runs the whole service against real Redis and MariaDB; the ones that
//! restart Redis use the test's own redis-server.

use std::time::{Duration, Instant};

use redis::AsyncCommands;
use serde_json::Value;

use crate::audit::{audit, wait_backlog_empty};
use crate::helpers::*;
use flashsale::config::Role;

fn all_roles(c: &mut flashsale::config::ServeConfig) {
    c.roles = vec![Role::Http, Role::Expiry, Role::Reconciler];
}

async fn refund(app: &TestApp, order_id: &str, user: u64) -> (u16, Value) {
    app.order_call("POST", order_id, "/refund", user).await
}

async fn get_order(app: &TestApp, order_id: &str, user: u64) -> (u16, Value) {
    app.order_call("GET", order_id, "", user).await
}

/// Buyers reserving one unit each, `tasks` at a time, until stopped or
/// `per_task` requests each; collects the acknowledged (buyer, order id).
struct Rush {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    acked: std::sync::Arc<std::sync::Mutex<Vec<(u64, String)>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Rush {
    fn start(app: &TestApp, sale: &str, tasks: u64, per_task: u64) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let tasks = (0..tasks)
            .map(|t| {
                let (client, url, acked, stop) =
                    (app.client.clone(), app.url(""), acked.clone(), stop.clone());
                let sale = sale.to_owned();
                tokio::spawn(async move {
                    let mut i = 0;
                    while i < per_task && !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let u = 10_000 + t * 1_000_000 + i;
                        i += 1;
                        let res = client
                            .post(format!("{url}/api/v1/sales/{sale}/orders"))
                            .bearer_auth(buyer_token(u))
                            .json(&serde_json::json!({"qty": 1}))
                            .send()
                            .await;
                        let Ok(res) = res else { continue };
                        if res.status() == 201 {
                            let o: Value = res.json().await.unwrap();
                            let id = o["order_id"].as_str().unwrap().to_owned();
                            acked.lock().unwrap().push((u, id));
                        }
                    }
                })
            })
            .collect();
        Self { stop, acked, tasks }
    }

    /// Stops the buyers; what was acknowledged.
    async fn stop(self) -> Vec<(u64, String)> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.finish().await
    }

    /// Waits for the buyers to end; what was acknowledged.
    async fn finish(self) -> Vec<(u64, String)> {
        for t in self.tasks {
            t.await.unwrap();
        }
        let acked = self.acked.lock().unwrap().clone();
        acked
    }
}

/// Waits until the app's reconciler has rebuilt `n` sales.
async fn wait_rebuilds(app: &TestApp, n: u64) {
    let until = Instant::now() + Duration::from_secs(10);
    let want = format!("flashsale_sale_rebuilds_total {n}");
    while !app.metrics().await.contains(&want) {
        assert!(Instant::now() < until, "no rebuild");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn pool(app: &TestApp) -> sqlx::MySqlPool {
    sqlx::MySqlPool::connect(&app.target.database_url)
        .await
        .unwrap()
}

/// MySQL's orders of the sale: seq -> (user, status, payment id).
async fn mysql_orders(
    pool: &sqlx::MySqlPool,
) -> std::collections::BTreeMap<u64, (u64, String, Option<String>)> {
    let rows: Vec<(u64, u64, String, Option<String>)> =
        sqlx::query_as("SELECT seq, user_id, status, payment_id FROM orders")
            .fetch_all(pool)
            .await
            .unwrap();
    rows.into_iter()
        .map(|(seq, u, s, p)| (seq, (u, s, p)))
        .collect()
}

async fn lost_count(pool: &sqlx::MySqlPool) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM lost_orders")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Every key of the sale as DUMP payloads (the snapshot case).
async fn dump_sale(app: &TestApp, sale: &str) -> Vec<(String, Vec<u8>)> {
    let mut c = app.engine.connection();
    let keys: Vec<String> = c.keys(app.sale_keys(sale).pattern()).await.unwrap();
    let mut out = Vec::new();
    for k in keys {
        let d: Vec<u8> = redis::cmd("DUMP")
            .arg(&k)
            .query_async(&mut c)
            .await
            .unwrap();
        out.push((k, d));
    }
    out
}

/// Replaces the sale's keys with `dump` (keys made since are deleted).
async fn restore_sale(app: &TestApp, sale: &str, dump: &[(String, Vec<u8>)]) {
    let mut c = app.engine.connection();
    let keys: Vec<String> = c.keys(app.sale_keys(sale).pattern()).await.unwrap();
    let mut pipe = redis::pipe();
    pipe.atomic();
    if !keys.is_empty() {
        pipe.del(&keys).ignore();
    }
    for (k, d) in dump {
        pipe.cmd("RESTORE")
            .arg(k)
            .arg(0)
            .arg(d.as_slice())
            .arg("REPLACE")
            .ignore();
    }
    pipe.query_async::<()>(&mut c).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_deleted_mid_sale_are_fenced_rebuilt_and_serve_again() {
    let app = spawn_with(Target::fresh(), all_roles).await;
    let sale = app
        .create_sale(SaleSpec {
            stock: 50,
            per_user_limit: 2,
            ..SaleSpec::default()
        })
        .await;
    let mut orders = Vec::new();
    for u in 1..=10u64 {
        let (s, o) = app.reserve(&sale, u, Some(&format!("key-{u}"))).await;
        assert_eq!(s, 201, "{o}");
        orders.push(o["order_id"].as_str().unwrap().to_owned());
    }
    for (i, id) in orders.iter().enumerate().take(4) {
        assert_eq!(app.pay(id, &format!("pay-{i}"), 1999).await.0, 200);
    }
    wait_backlog_empty(&app, &sale).await;

    // Redis forgets the sale while it serves.
    let lost_at = Instant::now();
    app.engine
        .drop_sale_keys(sale.parse().unwrap())
        .await
        .unwrap();
    // Until it is rebuilt it answers 503 with Retry-After, never 404.
    let res = app
        .client
        .get(app.url(&format!("/api/v1/sales/{sale}")))
        .send()
        .await
        .unwrap();
    assert!(
        matches!(res.status().as_u16(), 200 | 503),
        "a live sale Redis lost is never 404: {}",
        res.status()
    );
    if res.status() == 503 {
        assert!(res.headers().contains_key("retry-after"));
    }
    app.wait_serving(&sale, Duration::from_secs(10)).await;
    let took = lost_at.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "serving again after {took:?}"
    );

    // Paid stay paid; pending stay payable; keys find their orders.
    for (i, id) in orders.iter().enumerate() {
        let u = i as u64 + 1;
        let (s, o) = get_order(&app, id, u).await;
        assert_eq!(s, 200, "{o}");
        let want = if i < 4 { "paid" } else { "pending" };
        assert_eq!(o["status"], want, "{id}");
    }
    assert_eq!(app.pay(&orders[4], "pay-late", 1999).await.0, 200);
    let (s, o) = app.reserve(&sale, 6, Some("key-6")).await;
    assert_eq!(
        (s, o["order_id"].as_str()),
        (201, Some(orders[5].as_str())),
        "the same key finds the same order: {o}"
    );
    // Limits hold: buyer 1 holds one, may take one more, not a third.
    assert_eq!(app.reserve(&sale, 1, None).await.0, 201);
    let (s, o) = app.reserve(&sale, 1, None).await;
    assert_eq!((s, code(&o)), (409, "limit_exceeded"));
    // No id is reused: the next order is past every one before.
    let (s, o) = app.reserve(&sale, 11, None).await;
    assert_eq!(s, 201);
    assert_eq!(o["order_id"], format!("{sale}-12"));
    assert_eq!(app.sale_field(&sale, "avail").await, 50 - 12);

    wait_backlog_empty(&app, &sale).await;
    let (code, out) = audit(&app.target, &["--sale", &sale]).await;
    assert_eq!(code, 0, "{out}");
    let pool = pool(&app).await;
    assert_eq!(lost_count(&pool).await, 0, "nothing acknowledged was lost");
    assert!(app
        .metrics()
        .await
        .contains("flashsale_sale_rebuilds_total 1"));
    pool.close().await;
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sale_restored_to_an_older_snapshot_keeps_every_payment_and_reuses_no_id() {
    let app = spawn_with(Target::fresh(), all_roles).await;
    let sale = app
        .create_sale(SaleSpec {
            stock: 50,
            per_user_limit: 1,
            ..SaleSpec::default()
        })
        .await;
    let mut orders = Vec::new();
    for u in 1..=6u64 {
        let (s, o) = app.reserve(&sale, u, None).await;
        assert_eq!(s, 201);
        orders.push(o["order_id"].as_str().unwrap().to_owned());
    }
    assert_eq!(app.pay(&orders[0], "pay-0", 1999).await.0, 200);
    wait_backlog_empty(&app, &sale).await;
    let snapshot = dump_sale(&app, &sale).await;

    // After the snapshot: payments, a refund, new orders; all reach MySQL.
    for (i, id) in orders.iter().enumerate().take(4).skip(1) {
        assert_eq!(app.pay(id, &format!("pay-{i}"), 1999).await.0, 200);
    }
    assert_eq!(refund(&app, &orders[0], 1).await.0, 200);
    for u in 7..=9u64 {
        assert_eq!(app.reserve(&sale, u, None).await.0, 201);
    }
    wait_backlog_empty(&app, &sale).await;
    let pool = pool(&app).await;
    let before = mysql_orders(&pool).await;
    assert_eq!(before.len(), 9);

    // Redis comes back older.
    restore_sale(&app, &sale, &snapshot).await;
    wait_rebuilds(&app, 1).await;
    app.wait_serving(&sale, Duration::from_secs(10)).await;

    // MySQL kept every fact; Redis has them again.
    assert_eq!(mysql_orders(&pool).await, before, "MySQL lost nothing");
    for (i, id) in orders.iter().enumerate().take(4) {
        let (s, o) = get_order(&app, id, i as u64 + 1).await;
        assert_eq!(s, 200);
        let want = if i == 0 { "refunded" } else { "paid" };
        assert_eq!(o["status"], want, "{id}: {o}");
    }
    // The refund is not applied twice.
    let (_, o) = refund(&app, &orders[0], 1).await;
    assert_eq!(o["status"], "refunded", "{o}");
    assert_eq!(app.sale_field(&sale, "refunded").await, 1);
    assert_eq!(app.sale_field(&sale, "restocked").await, 1);
    // A buyer of an order made after the snapshot still holds it.
    let (s, o) = app.reserve(&sale, 8, None).await;
    assert_eq!((s, code(&o)), (409, "limit_exceeded"), "{o}");
    // No id reused.
    let (s, o) = app.reserve(&sale, 20, None).await;
    assert_eq!(s, 201);
    assert_eq!(o["order_id"], format!("{sale}-10"));

    wait_backlog_empty(&app, &sale).await;
    let after = mysql_orders(&pool).await;
    for (seq, row) in &before {
        assert_eq!(after.get(seq), Some(row), "order {seq} unchanged");
    }
    let (code, out) = audit(&app.target, &["--sale", &sale]).await;
    assert_eq!(code, 0, "{out}");
    let quarantined: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM quarantined_flows")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(quarantined, 0);
    pool.close().await;
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reserve_against_a_redis_behind_what_it_has_seen_fences_before_reusing_an_id() {
    // No reconciler: MySQL never hears of these orders, so only the
    // process's memory of the ids it gave out can tell Redis went back.
    let app = spawn_with(Target::fresh(), |c| c.roles = vec![Role::Http]).await;
    let sale = app
        .create_sale(SaleSpec {
            stock: 20,
            ..SaleSpec::default()
        })
        .await;
    assert_eq!(app.reserve(&sale, 1, None).await.0, 201);
    let snapshot = dump_sale(&app, &sale).await;
    for u in 2..=4u64 {
        assert_eq!(app.reserve(&sale, u, None).await.0, 201);
    }
    restore_sale(&app, &sale, &snapshot).await;
    let (s, o) = app.reserve(&sale, 5, None).await;
    assert_eq!((s, code(&o)), (503, "unavailable"), "{o}");
    assert!(o["error"]["retry_key"].is_string());
    assert_eq!(app.sale_field(&sale, "seq").await, 1, "no id given out");
    let mut c = app.engine.connection();
    let k = app.sale_keys(&sale);
    let (fence, hint): (String, u64) = redis::cmd("HMGET")
        .arg(&k.sale)
        .arg("fence")
        .arg("lost_hint")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!((fence.as_str(), hint), ("behind", 4));
    app.finish().await;
}

/// Keys lost while replies were still on their way: the reserve call that
/// found the sale missing carried an older highest-seen than the replies
/// noted after it, and left a fence-only hash (no token yet: the guard adds
/// it). The next reserve call reports what its process has handed out since
/// into that hash, so the rebuild counts every acknowledged order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reserve_on_a_fence_left_for_a_missing_sale_reports_what_it_has_seen() {
    // No reconciler: nothing adopts or rebuilds the fence meanwhile.
    let app = spawn_with(Target::fresh(), |c| c.roles = vec![Role::Http]).await;
    let sale = app
        .create_sale(SaleSpec {
            stock: 20,
            ..SaleSpec::default()
        })
        .await;
    for u in 1..=4u64 {
        assert_eq!(app.reserve(&sale, u, None).await.0, 201);
    }
    app.engine
        .drop_sale_keys(sale.parse().unwrap())
        .await
        .unwrap();
    // What reserve.lua leaves for a missing sale, from a call that had
    // seen order 1 only.
    let mut c = app.engine.connection();
    let k = app.sale_keys(&sale);
    let _: () = c
        .hset_multiple(
            &k.sale,
            &[("fence", "missing"), ("fenced_at", "1"), ("lost_hint", "1")],
        )
        .await
        .unwrap();
    let (s, o) = app.reserve(&sale, 5, None).await;
    assert_eq!((s, code(&o)), (503, "unavailable"), "{o}");
    let (fence, hint): (String, u64) = redis::cmd("HMGET")
        .arg(&k.sale)
        .arg("fence")
        .arg("lost_hint")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!((fence.as_str(), hint), ("missing", 4));
    app.finish().await;
}

/// The drill with the test's own redis-server: restarted from an AOF
/// copied `N` acknowledged orders earlier. An HTTP-only process took the
/// `N` orders (MySQL never heard of them) and lives on: its next reserve
/// finds Redis behind what it gave out and fences the sale; a reconciler
/// rebuilds it and counts exactly `N` orders lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_restarted_from_an_older_aof_counts_exactly_the_orders_it_lost() {
    const N: u64 = 7;
    let mut redis = OwnRedis::start().await;
    let target = Target::fresh_on(&redis.url());
    let mut app = spawn_with(target.clone(), all_roles).await;
    let sale = app
        .create_sale(SaleSpec {
            stock: 100,
            ..SaleSpec::default()
        })
        .await;
    for u in 1..=5u64 {
        assert_eq!(app.reserve(&sale, u, None).await.0, 201);
    }
    wait_backlog_empty(&app, &sale).await;
    app.stop().await;
    let front = spawn_with(target.clone(), |c| c.roles = vec![Role::Http]).await;
    let older = redis.copy_data();
    for u in 6..6 + N {
        assert_eq!(front.reserve(&sale, u, None).await.0, 201);
    }
    redis.kill();
    redis.restore_data(&older);
    redis.restart().await;

    after_a_known_loss(front, &target, &sale, 5, N, 100).await;
}

/// After a Redis lost the orders `kept + 1 ..= kept + lost` of `sale` (of
/// `stock` units; made through `front`, an HTTP-only app, so MySQL has none
/// of them): the front door fences the sale before it gives an id out
/// twice; a reconciler rebuilds it and counts exactly those orders lost
/// (table, metric, audit information line, exit 0); the next order takes
/// the next id; nothing is oversold.
pub(crate) async fn after_a_known_loss(
    front: TestApp,
    target: &Target,
    sale: &str,
    kept: u64,
    lost: u64,
    stock: i64,
) {
    let until = Instant::now() + Duration::from_secs(30);
    let fence_key = front.sale_keys(sale).sale;
    loop {
        let (s, o) = front.reserve(sale, 50, None).await;
        let mut c = front.engine.connection();
        let fence: Option<String> = c.hget(&fence_key, "fence").await.unwrap_or(None);
        if s == 503 && fence.as_deref() == Some("behind") {
            break;
        }
        assert!(s != 201, "an id was given out again: {o}");
        assert!(s != 500, "{o}");
        assert!(Instant::now() < until, "{s} {o}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rec = spawn_with(target.clone(), |c| {
        c.roles = vec![Role::Http, Role::Reconciler]
    })
    .await;
    front.wait_serving(sale, Duration::from_secs(20)).await;
    let pool = pool(&rec).await;
    let counted: Vec<(u64, String)> =
        sqlx::query_as("SELECT seq, reason FROM lost_orders WHERE sale_id = ? ORDER BY seq")
            .bind(sale.parse::<u64>().unwrap())
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        counted,
        (kept + 1..=kept + lost)
            .map(|s| (s, "missing".to_owned()))
            .collect::<Vec<_>>(),
        "exactly the orders lost"
    );
    assert!(rec.metrics().await.contains(&format!(
        "flashsale_orders_lost_total{{sale_id=\"{sale}\"}} {lost}"
    )));
    let (s, o) = front.reserve(sale, 50, None).await;
    assert_eq!(s, 201, "{o}");
    assert_eq!(
        o["order_id"],
        format!("{sale}-{}", kept + lost + 1),
        "no id reused"
    );
    // Nothing oversold: the survivors and the new order hold units.
    assert_eq!(
        front.sale_field(sale, "avail").await,
        stock - kept as i64 - 1
    );
    wait_backlog_empty(&rec, sale).await;
    let (code, out) = audit(target, &["--sale", sale]).await;
    assert_eq!(code, 0, "a counted loss is information, not drift: {out}");
    assert!(
        out.contains(&format!("information: {lost} acknowledged order(s) lost")),
        "{out}"
    );
    pool.close().await;
    front.finish().await;
    rec.finish().await;
}

/// SIGKILL mid-rush with `appendfsync always`: every order acknowledged
/// before the kill is there after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_killed_mid_rush_with_fsync_always_loses_nothing_acknowledged() {
    let mut redis = OwnRedis::start().await;
    let target = Target::fresh_on(&redis.url());
    let app = spawn_with(target.clone(), all_roles).await;
    let sale = app
        .create_sale(SaleSpec {
            stock: 100_000,
            ..SaleSpec::default()
        })
        .await;
    let rush = Rush::start(&app, &sale, 16, u64::MAX);
    tokio::time::sleep(Duration::from_millis(700)).await;
    redis.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.restart().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let acked = rush.stop().await;
    app.wait_serving(&sale, Duration::from_secs(10)).await;
    assert!(acked.len() > 50, "the rush made orders: {}", acked.len());
    let held = app.orders(&sale).await;
    for (user, id) in &acked {
        let seq: u64 = id.rsplit('-').next().unwrap().parse().unwrap();
        let o = held
            .get(&seq)
            .unwrap_or_else(|| panic!("acknowledged order {id} lost"));
        assert_eq!(o.user.get(), *user, "{id}");
    }
    wait_backlog_empty(&app, &sale).await;
    let pool = pool(&app).await;
    assert_eq!(lost_count(&pool).await, 0);
    let (code, out) = audit(&target, &["--sale", &sale]).await;
    assert_eq!(code, 0, "{out}");
    pool.close().await;
    app.finish().await;
}

/// A new database whose sale 1 meets another database's `{s1}` under the
/// same prefix never sells from the old stock: creating it is refused
/// while those keys are there, and keys that show up under a live sale's
/// name later fence it (503) and are never applied to this database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_databases_sale_under_the_same_name_is_never_adopted() {
    let old = spawn_app().await;
    let sale = old.create_sale(SaleSpec::default()).await;
    assert_eq!(old.reserve(&sale, 1, None).await.0, 201);
    let mut fresh = Target::fresh();
    fresh.key_prefix = old.target.key_prefix.clone();
    let new = spawn_with(fresh, all_roles).await;
    let body = serde_json::json!({
        "sku": "SKU-T", "title": "Test item", "price_cents": 1999, "stock": 10,
        "start_at": "2026-01-01T00:00:00Z", "end_at": "2036-01-01T00:00:00Z",
        "per_user_limit": 1, "payment_window_secs": 900,
    });
    let create = || async {
        new.client
            .post(new.url("/api/v1/sales"))
            .bearer_auth(ADMIN_TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(create().await, 500, "refused, not adopted");
    assert_eq!(old.sale_field(&sale, "seq").await, 1, "theirs untouched");

    // A sale of this database's own; then keys of another database take
    // its name (the other's token in its hash).
    let res = new
        .client
        .post(new.url("/api/v1/sales"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let mine = res.json::<Value>().await.unwrap()["sale_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(new.reserve(&mine, 2, None).await.0, 201);
    wait_backlog_empty(&new, &mine).await;
    let mut c = new.engine.connection();
    let _: () = c
        .hset(new.sale_keys(&mine).sale, "db", "0123456789abcdef")
        .await
        .unwrap();
    let sale = mine;
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let (s, o) = new.reserve(&sale, 3, None).await;
        if s == 503 {
            break;
        }
        assert!(
            Instant::now() < until,
            "still sells from their stock: {s} {o}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (exit, out) = audit(&new.target, &["--sale", &sale]).await;
    assert_eq!(exit, 1, "{out}");
    assert!(out.contains("sale_foreign"), "{out}");
    let pool = pool(&new).await;
    let users: Vec<u64> = sqlx::query_scalar("SELECT user_id FROM orders")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(users, [2], "only this database's order");

    // A person decides the keys are debris: discarded, the sale is rebuilt.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_flashsale"))
        .args(["sale", "discard-foreign", "--id", &sale, "--yes"])
        .env("REDIS_URL", &new.target.redis_url)
        .env("DATABASE_URL", &new.target.database_url)
        .env("FLASHSALE_KEY_PREFIX", &new.target.key_prefix)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    new.wait_serving(&sale, Duration::from_secs(10)).await;
    let (s, o) = new.reserve(&sale, 2, None).await;
    assert_eq!(
        (s, code(&o)),
        (409, "limit_exceeded"),
        "buyer 2's order is back: {o}"
    );
    wait_backlog_empty(&new, &sale).await;
    let (code, out) = audit(&new.target, &["--sale", &sale]).await;
    assert_eq!(code, 0, "{out}");
    pool.close().await;
    new.finish().await;
    old.finish().await;
}

/// Pending orders keep their deadlines across a rebuild: cancellable,
/// and closed by expiry on time, their units back on sale.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pending_orders_keep_their_deadlines_across_a_rebuild() {
    let app = spawn_with(Target::fresh(), all_roles).await;
    let sale = app
        .create_sale(SaleSpec {
            stock: 5,
            payment_window_secs: 4,
            ..SaleSpec::default()
        })
        .await;
    let (_, a) = app.reserve(&sale, 1, None).await;
    let (_, b) = app.reserve(&sale, 2, None).await;
    let (a, b) = (
        a["order_id"].as_str().unwrap().to_owned(),
        b["order_id"].as_str().unwrap().to_owned(),
    );
    let (_, o) = get_order(&app, &b, 2).await;
    let deadline =
        chrono::DateTime::parse_from_rfc3339(o["payment_deadline"].as_str().unwrap()).unwrap();
    wait_backlog_empty(&app, &sale).await;
    app.engine
        .drop_sale_keys(sale.parse().unwrap())
        .await
        .unwrap();
    wait_rebuilds(&app, 1).await;
    app.wait_serving(&sale, Duration::from_secs(10)).await;
    let (s, o) = get_order(&app, &b, 2).await;
    assert_eq!(s, 200);
    assert_eq!(
        chrono::DateTime::parse_from_rfc3339(o["payment_deadline"].as_str().unwrap()).unwrap(),
        deadline,
        "the deadline is kept"
    );
    assert_eq!(app.cancel(&a, 1).await.0, 200, "still cancellable");
    // Expiry closes b at its deadline (not much later).
    let until = Instant::now() + Duration::from_secs(6);
    loop {
        let (_, o) = get_order(&app, &b, 2).await;
        if o["status"] == "closed" {
            let closed =
                chrono::DateTime::parse_from_rfc3339(o["closed_at"].as_str().unwrap()).unwrap();
            let late = closed - deadline;
            assert!(
                late.num_milliseconds() >= 0 && late.num_milliseconds() < 1500,
                "closed {late:?} after its deadline"
            );
            break;
        }
        assert!(Instant::now() < until, "never closed: {o}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        app.sale_field(&sale, "avail").await,
        5,
        "units back on sale"
    );
    wait_backlog_empty(&app, &sale).await;
    let (code, out) = audit(&app.target, &["--sale", &sale]).await;
    assert_eq!(code, 0, "{out}");
    app.finish().await;
}

/// Keys deleted while a rush of buyers hits the sale: no oversell, no id
/// given to two buyers, every acknowledged order either kept or counted
/// lost, and the audit clean after.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_deleted_under_a_rush_oversell_nothing_and_reuse_no_id() {
    const STOCK: i64 = 400;
    let app = spawn_with(Target::fresh(), all_roles).await;
    let sale = app
        .create_sale(SaleSpec {
            stock: STOCK,
            ..SaleSpec::default()
        })
        .await;
    let rush = Rush::start(&app, &sale, 8, 100);
    tokio::time::sleep(Duration::from_millis(150)).await;
    app.engine
        .drop_sale_keys(sale.parse().unwrap())
        .await
        .unwrap();
    let acked = rush.finish().await;
    app.wait_serving(&sale, Duration::from_secs(10)).await;
    wait_backlog_empty(&app, &sale).await;
    let mut owner = std::collections::HashMap::new();
    for (u, id) in &acked {
        assert!(
            owner.insert(id.clone(), *u).is_none(),
            "order id {id} given to two buyers"
        );
    }
    let pool = pool(&app).await;
    let lost: Vec<u64> = sqlx::query_scalar("SELECT seq FROM lost_orders")
        .fetch_all(&pool)
        .await
        .unwrap();
    let held = app.orders(&sale).await;
    for (u, id) in &acked {
        let seq: u64 = id.rsplit('-').next().unwrap().parse().unwrap();
        match held.get(&seq) {
            Some(o) => assert_eq!(o.user.get(), *u, "{id}"),
            None => assert!(lost.contains(&seq), "{id} neither kept nor counted lost"),
        }
    }
    let units: i64 = held
        .values()
        .filter(|o| o.status.as_str() == "pending")
        .map(|o| i64::from(o.qty))
        .sum();
    assert!(units <= STOCK);
    assert_eq!(app.sale_field(&sale, "avail").await + units, STOCK);
    let (code, out) = audit(&app.target, &["--sale", &sale]).await;
    assert_eq!(code, 0, "{out}");
    pool.close().await;
    app.finish().await;
}

/// A payment MySQL applied and Redis then lost (AOF `everysec` losing its
/// last second) is noticed by the flow records' numbers, even when a write
/// lands on the older Redis first (its stream id, from the clock, would
/// pass): the payment stands, the sale is rebuilt, nothing is quarantined.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_payment_is_noticed_even_after_a_new_write() {
    let app = spawn_with(Target::fresh(), all_roles).await;
    let sale = app
        .create_sale(SaleSpec {
            stock: 10,
            ..SaleSpec::default()
        })
        .await;
    let mut ids = Vec::new();
    for u in 1..=3u64 {
        let (_, o) = app.reserve(&sale, u, None).await;
        ids.push(o["order_id"].as_str().unwrap().to_owned());
    }
    wait_backlog_empty(&app, &sale).await;
    let snapshot = dump_sale(&app, &sale).await;
    assert_eq!(app.pay(&ids[0], "pay-kept", 1999).await.0, 200);
    wait_backlog_empty(&app, &sale).await;
    restore_sale(&app, &sale, &snapshot).await;
    // A write on the older Redis (it may already be fenced: then 503).
    let (s, _) = app.cancel(&ids[1], 2).await;
    assert!(s == 200 || s == 503, "{s}");
    wait_rebuilds(&app, 1).await;
    app.wait_serving(&sale, Duration::from_secs(10)).await;
    let (_, o) = get_order(&app, &ids[0], 1).await;
    assert_eq!(o["status"], "paid", "{o}");
    wait_backlog_empty(&app, &sale).await;
    let pool = pool(&app).await;
    let (status, pid): (String, Option<String>) =
        sqlx::query_as("SELECT status, payment_id FROM orders WHERE seq = 1")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        (status.as_str(), pid.as_deref()),
        ("paid", Some("pay-kept"))
    );
    let quarantined: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM quarantined_flows")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(quarantined, 0);
    let (code, out) = audit(&app.target, &["--sale", &sale]).await;
    assert_eq!(code, 0, "{out}");
    pool.close().await;
    app.finish().await;
}

/// Only the sale hash lost (its orders survive): rebuilt all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sale_hash_lost_alone_is_rebuilt() {
    let app = spawn_with(Target::fresh(), all_roles).await;
    let sale = app
        .create_sale(SaleSpec {
            stock: 10,
            ..SaleSpec::default()
        })
        .await;
    let (_, o) = app.reserve(&sale, 1, None).await;
    let id = o["order_id"].as_str().unwrap().to_owned();
    wait_backlog_empty(&app, &sale).await;
    let mut c = app.engine.connection();
    let _: () = c.del(app.sale_keys(&sale).sale).await.unwrap();
    wait_rebuilds(&app, 1).await;
    app.wait_serving(&sale, Duration::from_secs(10)).await;
    assert_eq!(get_order(&app, &id, 1).await.1["status"], "pending");
    assert_eq!(app.sale_field(&sale, "avail").await, 9);
    let (code, out) = audit(&app.target, &["--sale", &sale]).await;
    assert_eq!(code, 0, "{out}");
    app.finish().await;
}

/// A sale hash written before sales had tokens (no `db` field) whose terms
/// and settled mark are MySQL's is adopted, not fenced.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sale_from_before_tokens_is_adopted_when_it_matches_mysql() {
    let app = spawn_with(Target::fresh(), all_roles).await;
    let sale = app
        .create_sale(SaleSpec {
            stock: 10,
            ..SaleSpec::default()
        })
        .await;
    assert_eq!(app.reserve(&sale, 1, None).await.0, 201);
    wait_backlog_empty(&app, &sale).await;
    let key = app.sale_keys(&sale).sale;
    let mut c = app.engine.connection();
    let token: String = c.hget(&key, "db").await.unwrap();
    let _: () = c.hdel(&key, "db").await.unwrap();
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let now: Option<String> = c.hget(&key, "db").await.unwrap();
        if now.is_some() {
            assert_eq!(now.as_deref(), Some(token.as_str()));
            break;
        }
        assert!(Instant::now() < until, "never adopted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let fence: Option<String> = c.hget(&key, "fence").await.unwrap();
    assert_eq!(fence, None);
    assert_eq!(app.reserve(&sale, 2, None).await.0, 201);
    assert!(app
        .metrics()
        .await
        .contains("flashsale_sale_rebuilds_total 0"));
    app.finish().await;
}

/// The orders live in hashes of 64 consecutive order seqs
/// (`<orders>:<n>`, order `s` in bucket `s / 64`), never in one `<orders>`
/// hash: each small enough for Redis's compact encoding. Pay and cancel
/// find orders in any bucket, the audit reads every bucket (an order
/// deleted from one is found), and a rebuild reads every bucket Redis
/// holds, also past the counter when the sale hash went alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn orders_live_in_buckets_of_64_and_audit_and_rebuild_find_every_one() {
    // No reconciler: the orders stay in Redis alone, and nothing but this
    // test takes the sale for a rebuild.
    let app = spawn_with(Target::fresh(), |c| {
        c.roles = vec![Role::Http, Role::Expiry];
    })
    .await;
    let sale = app
        .create_sale(SaleSpec {
            stock: 200,
            ..SaleSpec::default()
        })
        .await;
    let mut ids = Vec::new();
    for u in 1..=200u64 {
        let (s, o) = app.reserve(&sale, u, None).await;
        assert_eq!(s, 201, "{o}");
        ids.push(o["order_id"].as_str().unwrap().to_owned());
    }
    assert_eq!(ids[199], format!("{sale}-200"));
    // Seqs 1..=200: bucket 0 holds 1..=63, buckets 1 and 2 64 each, 3 the
    // last 9 (192..=200).
    let k = app.sale_keys(&sale);
    let mut c = app.engine.connection();
    let mut held = Vec::new();
    for b in 0..5 {
        let n: u64 = c.hlen(k.orders_bucket_no(b)).await.unwrap();
        held.push(n);
    }
    assert_eq!(held, [63, 64, 64, 9, 0]);
    let seqs: Vec<u64> = c.hkeys(k.orders_bucket_no(3)).await.unwrap();
    assert!(seqs.iter().all(|s| (192..=200).contains(s)), "{seqs:?}");
    let single: bool = c.exists(&k.orders).await.unwrap();
    assert!(!single, "no single orders hash");
    let encoding: String = redis::cmd("OBJECT")
        .arg("ENCODING")
        .arg(k.orders_bucket_no(1))
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(
        encoding, "listpack",
        "a bucket of 64 pending orders stays compact"
    );

    // Pay an order of the last bucket, cancel one of bucket 1.
    assert_eq!(app.pay(&ids[199], "pay-200", 1999).await.0, 200);
    assert_eq!(app.cancel(&ids[99], 100).await.0, 200);
    let orders = app.orders(&sale).await;
    assert_eq!(orders.len(), 200);
    assert_eq!(orders[&200].status.as_str(), "paid");
    assert_eq!(orders[&100].status.as_str(), "cancelled");
    assert_eq!(orders[&1].status.as_str(), "pending");

    // The audit reads every bucket: Redis's orders add up to its counters
    // (clean), and do not once an order is gone from bucket 2.
    let pool = pool(&app).await;
    let audit_now = || audit_sale(&app, &pool, &sale);
    let report = audit_now().await;
    let json = serde_json::to_string(&report).unwrap();
    assert!(report.is_clean(), "{json}");
    assert_eq!(report.sales[0].orders_checked, 200, "{json}");
    let stored: String = c.hget(k.orders_bucket(150), 150).await.unwrap();
    let _: () = c.hdel(k.orders_bucket(150), 150).await.unwrap();
    let report = audit_now().await;
    assert!(!report.is_clean(), "an order gone from bucket 2 is noticed");
    let _: () = c.hset(k.orders_bucket(150), 150, &stored).await.unwrap();
    assert!(audit_now().await.is_clean());

    // The rebuild's read: the sale hash lost alone (no counter left; a
    // fence-only hash of the sale's token, as the guard leaves), and every
    // order of every bucket is found all the same.
    let sale_id: flashsale::domain::SaleId = sale.parse().unwrap();
    let terms = flashsale::db::sale_terms(&pool, sale_id)
        .await
        .unwrap()
        .unwrap();
    let _: () = c.del(&k.sale).await.unwrap();
    let _: () = c
        .hset_multiple(
            &k.sale,
            &[("db", terms.token.as_str()), ("fence", "missing")],
        )
        .await
        .unwrap();
    let side = app
        .engine
        .begin_rebuild(&terms, 0)
        .await
        .unwrap()
        .expect("a missing sale of this token is taken");
    assert_eq!(side.counter, 0);
    let mut found: Vec<(u64, &str)> = side
        .orders
        .iter()
        .map(|o| (o.id.seq(), o.status.as_str()))
        .collect();
    found.sort_unstable();
    assert_eq!(found.len(), 200);
    assert!(found.iter().map(|f| f.0).eq(1..=200));
    assert_eq!(found[199], (200, "paid"));
    assert_eq!(found[99], (100, "cancelled"));
    assert_eq!(found[149], (150, "pending"));
    pool.close().await;
    app.finish().await;
}
