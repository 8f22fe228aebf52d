//! Old sales retire: an ended sale with no work left is marked retired in
//! MySQL, leaves the live list (workers stop visiting it), its Redis keys
//! expire after the retention, and MySQL alone answers for it and its
//! orders from then on (reads and refunds). A sale with work left never
//! retires.

use std::sync::Arc;
use std::time::{Duration, Instant};

use flashsale::config::{Role, ServeConfig};
use flashsale::domain::SaleId;
use flashsale::telemetry::Metrics;
use flashsale::workers::reconciler::Reconciler;
use flashsale::workers::retire::{Outcome, Retirer};
use redis::AsyncCommands;
use serde_json::Value;
use sqlx::MySqlPool;

use crate::helpers::*;

const RETENTION_SECS: u64 = 3600;

fn every_role(c: &mut ServeConfig) {
    c.roles = vec![Role::Http, Role::Expiry, Role::Reconciler];
    c.reconciler.sale_retention_secs = RETENTION_SECS;
}

/// A sale that opened a minute ago and ends `end_in_ms` from now, with a
/// one-second payment window.
fn ending_soon(end_in_ms: i64) -> SaleSpec {
    SaleSpec {
        stock: 10,
        per_user_limit: 1,
        start_offset_ms: -60_000,
        end_offset_ms: end_in_ms,
        payment_window_secs: 1,
    }
}

async fn pool(app: &TestApp) -> MySqlPool {
    MySqlPool::connect(&app.target.database_url).await.unwrap()
}

async fn retired_at(pool: &MySqlPool, sale: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    let (at,): (Option<chrono::DateTime<chrono::Utc>>,) =
        sqlx::query_as("SELECT retired_at FROM sales WHERE id = ?")
            .bind(sale.parse::<u64>().unwrap())
            .fetch_one(pool)
            .await
            .unwrap();
    at
}

async fn wait_retired(pool: &MySqlPool, sale: &str) {
    let until = Instant::now() + Duration::from_secs(30);
    while retired_at(pool, sale).await.is_none() {
        assert!(Instant::now() < until, "sale {sale} did not retire");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_ended(app: &TestApp, sale: &str) {
    let end = app.sale_field(sale, "end_ms").await;
    while app.redis_now_ms().await < end {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reserves for `user`; returns the order object.
async fn order_for(app: &TestApp, sale: &str, user: u64) -> Value {
    let (s, o) = app.reserve(sale, user, None).await;
    assert_eq!(s, 201, "{o}");
    o
}

/// Reserves and pays for `user`; returns the paid order object.
async fn paid_order(app: &TestApp, sale: &str, user: u64) -> Value {
    let o = order_for(app, sale, user).await;
    let id = o["order_id"].as_str().unwrap();
    let (s, paid) = app
        .pay(
            id,
            &format!("pay-{id}"),
            o["amount_cents"].as_i64().unwrap(),
        )
        .await;
    assert_eq!(s, 200, "{paid}");
    paid
}

async fn get(app: &TestApp, path: &str, token: Option<&str>) -> (u16, Value) {
    let mut req = app.client.get(app.url(path));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

async fn refund(app: &TestApp, order_id: &str, token: &str) -> (u16, Value) {
    let res = app
        .client
        .post(app.url(&format!("/api/v1/orders/{order_id}/refund")))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

/// The TTL of every key of the sale (-2: no such key).
async fn ttls(app: &TestApp, sale: &str) -> Vec<(String, i64)> {
    let k = app.sale_keys(sale);
    let mut c = app.engine.connection();
    let mut out = Vec::new();
    let bucket = k.due_bucket(0);
    let orders = k.orders_bucket(0);
    for key in [
        k.sale,
        k.buyers,
        k.idem,
        orders,
        k.deadlines,
        bucket,
        k.flow,
        k.dead_refunds,
    ] {
        let ttl: i64 = c.ttl(&key).await.unwrap();
        out.push((key, ttl));
    }
    out
}

async fn inventory(pool: &MySqlPool, sale: &str) -> [i32; 8] {
    let r: (i32, i32, i32, i32, i32, i32, i32, i32) = sqlx::query_as(
        "SELECT total, available, pending, paid, cancelled, closed, refunded, restocked \
         FROM inventory WHERE sale_id = ?",
    )
    .bind(sale.parse::<u64>().unwrap())
    .fetch_one(pool)
    .await
    .unwrap();
    [r.0, r.1, r.2, r.3, r.4, r.5, r.6, r.7]
}

async fn flow_rows(pool: &MySqlPool, sale: &str) -> i64 {
    let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM stock_flows WHERE sale_id = ?")
        .bind(sale.parse::<u64>().unwrap())
        .fetch_one(pool)
        .await
        .unwrap();
    n
}

/// Retiring gives every orders bucket of the sale the retention: a sale of
/// 140 orders keeps them in three hashes of 64 seqs (`<orders>:0..=2`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retired_sale_gives_every_orders_bucket_its_expiry() {
    let app = spawn_with(Target::fresh(), every_role).await;
    let pool = pool(&app).await;
    let sale = app
        .create_sale(SaleSpec {
            stock: 150,
            ..ending_soon(5_000)
        })
        .await;
    for user in 1..=140 {
        order_for(&app, &sale, user).await; // each left to close at its deadline
    }
    wait_retired(&pool, &sale).await;
    let k = app.sale_keys(&sale);
    let mut c = app.engine.connection();
    for b in 0..3 {
        let ttl: i64 = c.ttl(k.orders_bucket_no(b)).await.unwrap();
        assert!(
            (1..=RETENTION_SECS as i64).contains(&ttl),
            "orders bucket {b}: TTL {ttl}"
        );
    }
    let past: bool = c.exists(k.orders_bucket_no(3)).await.unwrap();
    assert!(!past, "no bucket past the order counter");
    let orders = app.orders(&sale).await;
    assert_eq!(orders.len(), 140);
    assert!(orders.values().all(|o| o.status.as_str() == "closed"));
    pool.close().await;
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ended_settled_sale_retires_and_the_workers_leave_it() {
    let app = spawn_with(Target::fresh(), every_role).await;
    let pool = pool(&app).await;
    let sale = app.create_sale(ending_soon(2_000)).await;
    let sale_id: SaleId = sale.parse().unwrap();
    assert!(
        app.live.contains(sale_id),
        "a new sale joins the live list at once"
    );
    paid_order(&app, &sale, 1).await;
    let cancelled = order_for(&app, &sale, 2).await;
    let (s, _) = app.cancel(cancelled["order_id"].as_str().unwrap(), 2).await;
    assert_eq!(s, 200);
    order_for(&app, &sale, 3).await; // left to close at its deadline

    wait_retired(&pool, &sale).await;
    assert!(
        !app.live.contains(sale_id),
        "a retired sale leaves the live list"
    );
    let mut c = app.engine.connection();
    let indexed: bool = c
        .sismember(app.engine.keys().sales_index(), sale_id.get())
        .await
        .unwrap();
    assert!(!indexed, "a retired sale leaves the Redis sales index");
    let ttls = ttls(&app, &sale).await;
    for (key, ttl) in &ttls {
        assert!(
            *ttl == -2 || (1..=RETENTION_SECS as i64).contains(ttl),
            "{key}: TTL {ttl}"
        );
    }
    let kept: Vec<&String> = ttls.iter().filter(|t| t.1 > 0).map(|t| &t.0).collect();
    assert!(
        kept.len() >= 3,
        "sale, orders and flow keys are kept: {ttls:?}"
    );
    let orders = app.orders(&sale).await;
    assert_eq!(orders.len(), 3);
    assert_eq!(app.due_len(&sale).await, 0);
    assert_eq!(inventory(&pool, &sale).await, [10, 9, 0, 1, 1, 1, 0, 0]);
    let report = audit_sale(&app, &pool, &sale).await;
    assert!(report.is_clean(), "{report:?}");
    assert!(report.sales[0].retired);
    assert!(app
        .metrics()
        .await
        .contains("flashsale_sales_retired_total 1"));

    // The workers no longer visit it: a flow record and a due entry planted
    // in its keys stay where they are.
    let k = app.sale_keys(&sale);
    let planted: String = c
        .xadd(
            &k.flow,
            "*",
            &[
                ("ev", "pay"),
                ("o", "1"),
                ("s", "paid|1|1|1999|1|2|3|||1-1|x"),
            ],
        )
        .await
        .unwrap();
    let _: () = c.zadd(k.due_bucket(3), "3", 0).await.unwrap();
    let _: () = c.zadd(&k.deadlines, "0", 0).await.unwrap();
    let flows = flow_rows(&pool, &sale).await;
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let left: u64 = c.xlen(&k.flow).await.unwrap();
    assert_eq!(left, 1, "the reconciler did not carry {planted}");
    assert_eq!(flow_rows(&pool, &sale).await, flows);
    assert_eq!(app.due_len(&sale).await, 1, "no expiry worker claimed it");
    let report = audit_sale(&app, &pool, &sale).await;
    let kinds: Vec<&str> = report.findings().map(|f| f.kind.as_str()).collect();
    assert_eq!(kinds, ["retired_sale_backlog"]);
    pool.close().await;
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_with_work_left_is_not_retired() {
    // No workers in the app: the test drives reconciliation and retirement
    // by hand. Refunds that cannot settle are dead-lettered at once.
    let app = spawn_with(Target::fresh(), |c| {
        c.roles = vec![Role::Http];
        c.store.refund_retry_ms = 100;
        c.store.refund_dead_letter_secs = 0;
    })
    .await;
    let pool = pool(&app).await;
    let metrics = Arc::new(Metrics::default());
    let retirer = Retirer::new(
        app.engine.clone(),
        pool.clone(),
        app.live.clone(),
        metrics.clone(),
        Duration::from_secs(RETENTION_SECS),
    );
    let reconciler = Reconciler::new(
        app.engine.clone(),
        pool.clone(),
        app.live.clone(),
        metrics,
        Default::default(),
    );
    let settle = |sale: &str| {
        let (reconciler, sale) = (&reconciler, sale.parse::<SaleId>().unwrap());
        async move { while reconciler.reconcile_sale(sale).await.unwrap() > 0 {} }
    };
    let retire = |sale: &str| {
        let (retirer, sale) = (&retirer, sale.parse::<SaleId>().unwrap());
        async move { retirer.try_retire(sale).await.unwrap() }
    };

    let pending = app.create_sale(ending_soon(1_500)).await;
    let unsettled = app.create_sale(ending_soon(1_500)).await;
    let waiting = app.create_sale(ending_soon(1_500)).await;
    let dead = app.create_sale(ending_soon(1_500)).await;
    let mysql_only = app.create_sale(ending_soon(1_500)).await;
    assert_eq!(retire(&pending).await, Outcome::NotYet("not_ended".into()));

    // A pending order (its 1 s deadline passes, but no worker closes it).
    order_for(&app, &pending, 1).await;
    // A paid order whose records MySQL does not have yet.
    paid_order(&app, &unsettled, 1).await;
    // A refund waiting for its order to settle, and one dead-lettered.
    for (sale, user) in [(&waiting, 1), (&dead, 2)] {
        let o = paid_order(&app, sale, user).await;
        let (s, r) = refund(&app, o["order_id"].as_str().unwrap(), &buyer_token(user)).await;
        assert_eq!((s, r["status"].as_str()), (202, Some("refund_pending")));
    }
    tokio::time::sleep(Duration::from_millis(300)).await; // the retry falls due
    let batch = app.engine.expire(dead.parse().unwrap(), 10).await.unwrap();
    assert_eq!(batch.dead_lettered, 1);
    for sale in [&pending, &unsettled, &waiting, &dead, &mysql_only] {
        wait_ended(&app, sale).await;
    }

    assert_eq!(retire(&pending).await, Outcome::NotYet("pending".into()));
    assert_eq!(retire(&unsettled).await, Outcome::NotYet("flow".into()));
    for sale in [&pending, &waiting, &dead, &mysql_only] {
        settle(sale).await;
    }
    assert_eq!(retire(&waiting).await, Outcome::NotYet("refunds".into()));
    assert_eq!(retire(&dead).await, Outcome::NotYet("refunds".into()));
    // MySQL's side is checked too: an order pending there (that Redis
    // does not hold) keeps the sale live.
    sqlx::query(
        "INSERT INTO orders (sale_id, seq, user_id, qty, amount_cents, status, created_at, \
         payment_deadline) VALUES (?, 99, 7, 1, 1999, 'pending', UTC_TIMESTAMP(3), UTC_TIMESTAMP(3))",
    )
    .bind(mysql_only.parse::<u64>().unwrap())
    .execute(&pool)
    .await
    .unwrap();
    assert_eq!(
        retire(&mysql_only).await,
        Outcome::NotYet("orders waiting in mysql".into())
    );
    for sale in [&pending, &unsettled, &waiting, &dead, &mysql_only] {
        assert_eq!(retired_at(&pool, sale).await, None, "sale {sale}");
        assert!(app.live.contains(sale.parse().unwrap()));
        assert!(!app
            .engine
            .sale_retired(sale.parse().unwrap())
            .await
            .unwrap());
        let ttl: i64 = app
            .engine
            .connection()
            .ttl(app.sale_keys(sale).sale)
            .await
            .unwrap();
        assert_eq!(ttl, -1, "sale {sale}'s keys do not expire");
    }

    // Once its records are in MySQL, the paid sale retires.
    settle(&unsettled).await;
    assert_eq!(retire(&unsettled).await, Outcome::Retired);
    assert!(retired_at(&pool, &unsettled).await.is_some());
    assert!(!app.live.contains(unsettled.parse().unwrap()));
    assert_eq!(retire(&unsettled).await, Outcome::Retired, "idempotent");
    pool.close().await;
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retired_sale_and_its_orders_are_read_from_mysql_once_redis_lets_them_go() {
    let app = spawn_with(Target::fresh(), every_role).await;
    let pool = pool(&app).await;
    let sale = app.create_sale(ending_soon(2_000)).await;
    let paid = paid_order(&app, &sale, 1).await;
    let closed = order_for(&app, &sale, 2).await;
    let paid_id = paid["order_id"].as_str().unwrap().to_owned();
    let closed_id = closed["order_id"].as_str().unwrap().to_owned();
    let live_view = app.get_sale(&sale).await;
    let path = |id: &str| format!("/api/v1/orders/{id}");
    let (_, closed_live) = {
        // Wait for the unpaid order to close, then read it from Redis.
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let (s, o) = get(&app, &path(&closed_id), Some(&buyer_token(2))).await;
            if o["status"] == "closed" || Instant::now() > until {
                break (s, o);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    assert_eq!(closed_live["status"], "closed");

    wait_retired(&pool, &sale).await;
    app.engine
        .drop_sale_keys(sale.parse().unwrap())
        .await
        .unwrap();
    assert!(app
        .engine
        .sale(sale.parse().unwrap())
        .await
        .unwrap()
        .is_none());

    let (s, view) = get(&app, &format!("/api/v1/sales/{sale}"), None).await;
    assert_eq!(s, 200, "{view}");
    assert_eq!(view["state"], "ended");
    assert_eq!(view["stock_total"], 10);
    assert_eq!(view["stock_available"], 9);
    for field in [
        "sale_id",
        "sku",
        "title",
        "price_cents",
        "per_user_limit",
        "payment_window_secs",
        "start_at",
        "end_at",
    ] {
        assert_eq!(view[field], live_view[field], "{field}");
    }
    let (s, o) = get(&app, &path(&paid_id), Some(&buyer_token(1))).await;
    assert_eq!((s, &o), (200, &paid), "the paid order, as the buyer saw it");
    let (s, o) = get(&app, &path(&closed_id), Some(ADMIN_TOKEN)).await;
    assert_eq!(
        (s, &o),
        (200, &closed_live),
        "the closed order, for the admin"
    );
    let (s, o) = get(&app, &path(&paid_id), Some(&buyer_token(2))).await;
    assert_eq!((s, code(&o)), (404, "not_found"), "not another buyer's");
    let (s, _) = get(&app, &path(&format!("{sale}-999")), Some(ADMIN_TOKEN)).await;
    assert_eq!(s, 404, "an unknown order stays unknown");
    let (s, _) = get(&app, "/api/v1/sales/987654321", None).await;
    assert_eq!(s, 404, "an unknown sale stays unknown");
    pool.close().await;
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paid_order_of_a_retired_sale_is_refunded_once_in_mysql() {
    let app = spawn_with(Target::fresh(), every_role).await;
    let pool = pool(&app).await;
    let sale = app.create_sale(ending_soon(2_000)).await;
    let mut ids = Vec::new();
    for user in 1..=3 {
        let o = paid_order(&app, &sale, user).await;
        ids.push(o["order_id"].as_str().unwrap().to_owned());
    }
    let unpaid = order_for(&app, &sale, 4).await;
    let end_at = app.get_sale(&sale).await["end_at"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_retired(&pool, &sale).await;
    assert_eq!(inventory(&pool, &sale).await, [10, 7, 0, 3, 0, 1, 0, 0]);
    let flows = flow_rows(&pool, &sale).await;

    // Within the retention: Redis still holds the keys, MySQL refunds.
    let (s, first) = refund(&app, &ids[0], &buyer_token(1)).await;
    assert_eq!(
        (s, first["status"].as_str()),
        (200, Some("refunded")),
        "{first}"
    );
    // Refunded after the end: not restocked.
    assert!(first["refunded_at"].as_str().unwrap() >= end_at.as_str());
    let (s, again) = refund(&app, &ids[0], &buyer_token(1)).await;
    assert_eq!(
        (s, &again),
        (200, &first),
        "a second refund changes nothing"
    );
    let (s, o) = get(
        &app,
        &format!("/api/v1/orders/{}", ids[0]),
        Some(&buyer_token(1)),
    )
    .await;
    assert_eq!(
        (s, &o),
        (200, &first),
        "read from MySQL, not from Redis's copy"
    );
    let redis_copy = app.orders(&sale).await;
    let seq: u64 = ids[0].rsplit('-').next().unwrap().parse().unwrap();
    assert_eq!(
        redis_copy[&seq].status.as_str(),
        "paid",
        "Redis's copy is left alone"
    );
    let (s, o) = refund(&app, &ids[1], &buyer_token(3)).await;
    assert_eq!((s, code(&o)), (404, "not_found"), "not another buyer's");
    let (s, o) = refund(&app, &ids[1], ADMIN_TOKEN).await;
    assert_eq!((s, o["status"].as_str()), (200, Some("refunded")));
    let (s, o) = refund(&app, unpaid["order_id"].as_str().unwrap(), &buyer_token(4)).await;
    assert_eq!((s, code(&o)), (409, "order_not_paid"));
    assert_eq!(o["error"]["status"], "closed");

    // After Redis let the sale go.
    app.engine
        .drop_sale_keys(sale.parse().unwrap())
        .await
        .unwrap();
    let (s, o) = refund(&app, &ids[2], &buyer_token(3)).await;
    assert_eq!((s, o["status"].as_str()), (200, Some("refunded")));
    let (s, _) = refund(&app, &format!("{sale}-999"), ADMIN_TOKEN).await;
    assert_eq!(s, 404);

    // MySQL: three refunds, no restock, conserved; one flow row each.
    let inv = inventory(&pool, &sale).await;
    assert_eq!(inv, [10, 7, 0, 0, 0, 1, 3, 0]);
    assert_eq!(inv[1] + inv[2] + inv[3] + inv[6] - inv[7], inv[0]);
    assert_eq!(flow_rows(&pool, &sale).await, flows + 3);
    let (n,): (i64,) = sqlx::query_as(
        "SELECT COUNT(*) FROM stock_flows WHERE flow_id = ? AND event = 'refund' AND status = 'refunded'",
    )
    .bind(format!("{sale}-refund-{seq}"))
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(n, 1);
    let report = audit_sale(&app, &pool, &sale).await;
    assert!(report.is_clean(), "{report:?}");
    assert!(app
        .metrics()
        .await
        .contains("flashsale_refunds_total{outcome=\"after_retirement\"} 3"));
    pool.close().await;
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retired_sale_is_not_loaded_into_redis_again() {
    let target = Target::fresh();
    let mut app = spawn_with(target.clone(), every_role).await;
    let pool = pool(&app).await;
    let sale = app.create_sale(ending_soon(1_000)).await;
    paid_order(&app, &sale, 1).await;
    wait_retired(&pool, &sale).await;
    app.stop().await;
    let sale_id: SaleId = sale.parse().unwrap();
    app.engine.drop_sale_keys(sale_id).await.unwrap();

    let again = spawn_with(target, every_role).await;
    assert!(
        again.engine.sale(sale_id).await.unwrap().is_none(),
        "not loaded at start"
    );
    assert!(!again.live.contains(sale_id));
    let loaded = flashsale::sales::load_missing(&pool, &again.engine, Some(sale_id))
        .await
        .unwrap();
    assert_eq!(loaded, 0);
    assert!(again.engine.sale(sale_id).await.unwrap().is_none());
    let (s, view) = get(&again, &format!("/api/v1/sales/{sale}"), None).await;
    assert_eq!((s, view["state"].as_str()), (200, Some("ended")));
    pool.close().await;
    again.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_list_keeps_its_last_good_state_while_mysql_is_unreachable() {
    use flashsale::db::retired::LiveSale;
    use flashsale::workers::live::LiveSales;
    let sales = [1, 2].map(|i| LiveSale {
        id: SaleId::new(i).unwrap(),
        end_ms: 0,
        token: 0,
    });
    let live = Arc::new(LiveSales::of(&sales));
    let unreachable = sqlx::mysql::MySqlPoolOptions::new()
        .acquire_timeout(Duration::from_millis(300))
        .connect_lazy("mysql://root@127.0.0.1:1/nothing")
        .unwrap();
    assert!(live.refresh(&unreachable).await.is_err());
    let metrics = Arc::new(Metrics::default());
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(live.clone().run(
        unreachable,
        metrics.clone(),
        Arc::new(Default::default()),
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    stop.cancel();
    task.await.unwrap();
    assert!(metrics.live.refresh_failures.get() >= 1);
    assert_eq!(live.ids(), sales.map(|s| s.id));
    let page = metrics.render();
    assert!(page.contains("flashsale_live_sales 2"), "{page}");
    assert!(
        page.contains("flashsale_live_sales_age_seconds -1"),
        "{page}"
    );
}
