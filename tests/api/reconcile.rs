//! The reconciler: every change Redis accepted reaches MySQL exactly once,
//! across reconciler crashes and a MySQL outage; the sweep closes what
//! Redis lost.

use std::collections::BTreeMap;
use std::time::Duration;

use flashsale::config::Role;
use flashsale::domain::{OrderId, Qty, SaleId, UserId};
use flashsale::engine::{Engine, OrderStatus, Reservation};
use futures::stream::{self, StreamExt};
use redis::AsyncCommands;

use crate::helpers::*;

/// A small deterministic generator (xorshift), seeded per test.
pub struct Rng(u64);

impl Rng {
    pub fn seeded() -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            | 1;
        println!("rng seed {seed}");
        Self(seed)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Drives a sale through the engine: `n` reservations by distinct buyers,
/// then about a third paid, a sixth cancelled, the rest left to expire.
pub async fn run_sale(engine: &Engine, sale: SaleId, n: u64, users_from: u64) {
    stream::iter(users_from..users_from + n)
        .for_each_concurrent(32, |u| async move {
            let user = UserId::new(u).unwrap();
            let r = engine
                .reserve(sale, user, Qty::default(), None)
                .await
                .unwrap();
            let Reservation::Created(order) = r else {
                panic!("{r:?}");
            };
            match u % 6 {
                0 | 1 => {
                    engine
                        .pay(order.id, &format!("pay-{}", order.id), order.amount_cents)
                        .await
                        .unwrap();
                }
                2 => {
                    engine.cancel(order.id, user).await.unwrap();
                }
                _ => {}
            }
        })
        .await;
}

/// Waits until no order is pending and MySQL has every flow record.
pub async fn wait_quiet(app: &TestApp, sale: &str, limit: Duration) {
    let k = app.sale_keys(sale);
    let until = std::time::Instant::now() + limit;
    let mut c = app.engine.connection();
    loop {
        let pending = app.sale_field(sale, "pending").await;
        let backlog: u64 = c.xlen(&k.flow).await.unwrap();
        if pending == 0 && backlog == 0 {
            return;
        }
        assert!(
            std::time::Instant::now() < until,
            "not quiet: {pending} pending, {backlog} flow records waiting"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// MySQL holds exactly what Redis holds: every order with the same status,
/// quantity, amount and buyer; inventory counters equal to Redis's counters
/// and to the orders' sums; one flow row per change.
pub async fn assert_mysql_matches_redis(app: &TestApp, sale: &str) {
    let pool = sqlx::MySqlPool::connect(&app.target.database_url)
        .await
        .unwrap();
    let sale_id: u64 = sale.parse().unwrap();
    let redis_orders = app.orders(sale).await;
    let rows: Vec<(u64, u64, i32, i64, String, Option<String>)> = sqlx::query_as(
        "SELECT seq, user_id, qty, amount_cents, status, payment_id FROM orders WHERE sale_id = ?",
    )
    .bind(sale_id)
    .fetch_all(&pool)
    .await
    .unwrap();
    let mysql: BTreeMap<u64, _> = rows.into_iter().map(|r| (r.0, r)).collect();
    assert_eq!(mysql.len(), redis_orders.len(), "order count");
    let requests: Vec<(u64,)> = sqlx::query_as(
        "SELECT seq FROM stock_flows WHERE sale_id = ? AND event = 'refund_request'",
    )
    .bind(sale_id)
    .fetch_all(&pool)
    .await
    .unwrap();
    let refund_requests: std::collections::HashSet<u64> =
        requests.into_iter().map(|r| r.0).collect();
    let mut events = 0;
    for (seq, o) in &redis_orders {
        let row = &mysql[seq];
        assert_eq!(row.1, o.user.get(), "order {seq} user");
        assert_eq!(row.2 as u32, o.qty, "order {seq} qty");
        assert_eq!(row.3, o.amount_cents, "order {seq} amount");
        assert_eq!(row.4, o.status.as_str(), "order {seq} status");
        assert_eq!(row.5, o.payment_id, "order {seq} payment id");
        events += match o.status {
            OrderStatus::Pending => 1,
            OrderStatus::Paid | OrderStatus::Cancelled | OrderStatus::Closed => 2,
            OrderStatus::RefundPending => 3,
            // A refund of a settled order has no request record.
            OrderStatus::Refunded => 3 + i64::from(refund_requests.contains(seq)),
        };
    }
    let inv: (i32, i32, i32, i32, i32, i32, i32, i32) = sqlx::query_as(
        "SELECT total, available, pending, paid, cancelled, closed, refunded, restocked \
         FROM inventory WHERE sale_id = ?",
    )
    .bind(sale_id)
    .fetch_one(&pool)
    .await
    .unwrap();
    let field = |f| app.sale_field(sale, f);
    let redis_counters = [
        field("total").await,
        field("avail").await,
        field("pending").await,
        field("paid").await,
        field("cancelled").await,
        field("closed").await,
        field("refunded").await,
        field("restocked").await,
    ];
    let [total, available, pending, paid, cancelled, closed, refunded, restocked] =
        [inv.0, inv.1, inv.2, inv.3, inv.4, inv.5, inv.6, inv.7].map(i64::from);
    let mysql_counters = [
        total, available, pending, paid, cancelled, closed, refunded, restocked,
    ];
    assert_eq!(
        mysql_counters, redis_counters,
        "inventory vs Redis counters"
    );
    let sums: Vec<(String, i64)> = sqlx::query_as(
        "SELECT status, CAST(SUM(qty) AS SIGNED) FROM orders WHERE sale_id = ? GROUP BY status",
    )
    .bind(sale_id)
    .fetch_all(&pool)
    .await
    .unwrap();
    let sum = |s: &str| sums.iter().find(|r| r.0 == s).map_or(0, |r| r.1);
    assert_eq!(pending, sum("pending"));
    assert_eq!(
        paid,
        sum("paid") + sum("refund_pending"),
        "refunds waiting are still paid"
    );
    assert_eq!(cancelled, sum("cancelled"));
    assert_eq!(closed, sum("closed"));
    assert_eq!(refunded, sum("refunded"));
    assert_eq!(
        available + pending + paid + refunded - restocked,
        total,
        "conservation in MySQL"
    );
    let (flows, applied): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT COUNT(*) FROM stock_flows WHERE sale_id = ?), \
                (SELECT CAST(applied AS SIGNED) FROM reconcile_cursors WHERE sale_id = ?)",
    )
    .bind(sale_id)
    .bind(sale_id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(flows, events, "one flow row per change");
    assert_eq!(applied, events, "nothing applied twice");
    pool.close().await;
}

fn all_roles(c: &mut flashsale::config::ServeConfig) {
    c.roles = vec![Role::Http, Role::Expiry, Role::Reconciler];
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_whole_sale_of_20000_orders_settles_exactly_in_mysql() {
    let app = spawn_with(Target::fresh(), all_roles).await;
    let sale = app
        .create_sale(SaleSpec {
            stock: 20_000,
            payment_window_secs: 8,
            ..SaleSpec::default()
        })
        .await;
    run_sale(&app.engine, sale.parse().unwrap(), 20_000, 1).await;
    wait_quiet(&app, &sale, Duration::from_secs(60)).await;
    assert_mysql_matches_redis(&app, &sale).await;
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reconciler_killed_20_times_applies_everything_once() {
    let app = spawn_with(Target::fresh(), |c| {
        c.roles = vec![Role::Http, Role::Expiry]
    })
    .await;
    let sale = app
        .create_sale(SaleSpec {
            stock: 20_000,
            payment_window_secs: 6,
            ..SaleSpec::default()
        })
        .await;
    let sale_id: SaleId = sale.parse().unwrap();
    let engine = app.engine.clone();
    let traffic = tokio::spawn(async move {
        // Four waves, so records keep arriving while reconcilers die.
        for wave in 0..4u64 {
            run_sale(&engine, sale_id, 5_000, 1 + wave * 5_000).await;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    let mut rng = Rng::seeded();
    let batch = [("FLASHSALE_RECONCILER_BATCH", "200")];
    for _ in 0..20 {
        let mut r = ServeProcess::start(&app.target, "reconciler", &batch);
        tokio::time::sleep(Duration::from_millis(150 + rng.below(350))).await;
        r.kill();
    }
    traffic.await.unwrap();
    let applied_so_far: i64 = {
        let pool = sqlx::MySqlPool::connect(&app.target.database_url)
            .await
            .unwrap();
        let n: (i64,) = sqlx::query_as("SELECT COUNT(*) FROM stock_flows")
            .fetch_one(&pool)
            .await
            .unwrap();
        n.0
    };
    assert!(
        applied_so_far > 0,
        "the killed reconcilers applied something"
    );
    let mut last = ServeProcess::start(&app.target, "reconciler", &[]);
    wait_quiet(&app, &sale, Duration::from_secs(90)).await;
    assert_mysql_matches_redis(&app, &sale).await;
    last.kill();
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_closes_an_overdue_order_that_redis_lost() {
    let app = spawn_with(Target::fresh(), |c| {
        all_roles(c);
        c.roles.retain(|r| *r != Role::Expiry);
        c.reconciler.sweep_interval_secs = 1;
        c.reconciler.sweep_grace_secs = 0;
    })
    .await;
    let sale = app
        .create_sale(SaleSpec {
            payment_window_secs: 1,
            ..SaleSpec::default()
        })
        .await;
    let (_, order) = app.reserve(&sale, 1, None).await;
    let id: OrderId = order["order_id"].as_str().unwrap().parse().unwrap();
    let pool = sqlx::MySqlPool::connect(&app.target.database_url)
        .await
        .unwrap();
    let status = |pool: sqlx::MySqlPool| async move {
        let s: Option<(String,)> =
            sqlx::query_as("SELECT status FROM orders WHERE sale_id = ? AND seq = ?")
                .bind(id.sale().get())
                .bind(id.seq())
                .fetch_optional(&pool)
                .await
                .unwrap();
        s.map(|s| s.0)
    };
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while status(pool.clone()).await.as_deref() != Some("pending") {
        assert!(
            std::time::Instant::now() < until,
            "the order never reached MySQL"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Redis loses the order.
    let k = app.sale_keys(&sale);
    let mut c = app.engine.connection();
    let _: () = c.hdel(k.orders_bucket(id.seq()), id.seq()).await.unwrap();
    let _: () = c.zrem(k.due_bucket(id.seq()), id.seq()).await.unwrap();

    let until = std::time::Instant::now() + Duration::from_secs(15);
    while status(pool.clone()).await.as_deref() != Some("closed") {
        assert!(
            std::time::Instant::now() < until,
            "the sweep did not close it"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let inv: (i32, i32, i32) =
        sqlx::query_as("SELECT available, pending, closed FROM inventory WHERE sale_id = ?")
            .bind(id.sale().get())
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(inv, (10, 0, 1));
    let logged: (i64,) = sqlx::query_as("SELECT COUNT(*) FROM sweep_corrections")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(logged.0, 1);
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("flashsale_sweep_corrections_total 1"),
        "{metrics}"
    );
    pool.close().await;
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_30_second_mysql_outage_loses_nothing_and_never_stops_sales() {
    let mut mysql = OwnMariaDb::start().await;
    let mut target = Target::fresh();
    target.database_url = mysql.url("flashsale_outage");
    let app = std::sync::Arc::new(
        spawn_with(target, |c| {
            all_roles(c);
            c.reconciler.reconciler_max_backoff_ms = 2000;
        })
        .await,
    );
    let sale = app
        .create_sale(SaleSpec {
            stock: 100_000,
            payment_window_secs: 5,
            ..SaleSpec::default()
        })
        .await;
    // Steady traffic through the API: 20 buyers every 100 ms, a third of
    // them paying and a sixth cancelling, the rest expiring.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let (app, sale, stop) = (app.clone(), sale.clone(), stop.clone());
        tokio::spawn(async move {
            let mut user = 0u64;
            let mut refused = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let wave: Vec<u64> = (0..20).map(|i| user + i + 1).collect();
                user += 20;
                let results = futures::future::join_all(wave.iter().map(|&u| {
                    let app = app.clone();
                    let sale = sale.clone();
                    async move {
                        let (s, order) = app.reserve(&sale, u, None).await;
                        if s != 201 {
                            return Some((s, order));
                        }
                        let id = order["order_id"].as_str().unwrap().to_owned();
                        let amount = order["amount_cents"].as_i64().unwrap();
                        match u % 6 {
                            0 | 1 => {
                                assert_eq!(app.pay(&id, &format!("p{u}"), amount).await.0, 200)
                            }
                            2 => assert_eq!(app.cancel(&id, u).await.0, 200),
                            _ => {}
                        }
                        None
                    }
                }))
                .await;
                refused.extend(results.into_iter().flatten());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            refused
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    mysql.kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Readiness reports MySQL down without failing: selling goes on.
    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let ready: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(ready["mysql"], "down", "readiness reports MySQL down");
    tokio::time::sleep(Duration::from_secs(28)).await;
    let k = app.sale_keys(&sale);
    let mut c = app.engine.connection();
    let waiting: u64 = c.xlen(&k.flow).await.unwrap();
    assert!(waiting > 0, "records waited in Redis during the outage");
    mysql.restart().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let refused = traffic.await.unwrap();
    assert!(
        refused.is_empty(),
        "reservations failed during the outage: {refused:?}"
    );

    wait_quiet(&app, &sale, Duration::from_secs(60)).await;
    assert_mysql_matches_redis(&app, &sale).await;
    let app = std::sync::Arc::try_unwrap(app).ok().unwrap();
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_backlog_bound_reservations_wait_but_payments_go_on() {
    let app = spawn_with(Target::fresh(), |c| c.store.flow_backlog_limit = 3).await;
    let sale = app.create_sale(SaleSpec::default()).await;
    let mut orders = Vec::new();
    for u in 1..=3 {
        let (s, o) = app.reserve(&sale, u, None).await;
        assert_eq!(s, 201);
        orders.push(o);
    }
    let (s, v) = app.reserve(&sale, 4, None).await;
    assert_eq!(
        (s, code(&v)),
        (503, "unavailable"),
        "no reconciler runs: 3 records wait"
    );
    let first = orders[0]["order_id"].as_str().unwrap();
    let (s, _) = app
        .pay(first, "p1", orders[0]["amount_cents"].as_i64().unwrap())
        .await;
    assert_eq!(s, 200, "payments go on at the bound");
    let (s, _) = app.cancel(orders[1]["order_id"].as_str().unwrap(), 2).await;
    assert_eq!(s, 200, "cancels go on at the bound");
    assert_eq!(app.sale_field(&sale, "avail").await, 8);
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_redis_lost_resumes_from_mysql_without_reusing_ids() {
    let app = spawn_with(Target::fresh(), all_roles).await;
    let sale = app.create_sale(SaleSpec::default()).await;
    for u in 1..=5u64 {
        let (_, o) = app.reserve(&sale, u, None).await;
        if u <= 2 {
            let id = o["order_id"].as_str().unwrap();
            assert_eq!(app.pay(id, &format!("p{u}"), 1999).await.0, 200);
        }
    }
    let k = app.sale_keys(&sale);
    let mut c = app.engine.connection();
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while c.xlen::<_, u64>(&k.flow).await.unwrap() > 0 {
        assert!(std::time::Instant::now() < until);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let target = app.target.clone();
    let mut app = app;
    app.stop().await;
    // Redis loses everything it held for the sale.
    app.engine
        .drop_sale_keys(sale.parse().unwrap())
        .await
        .unwrap();

    let app = spawn_with(target, all_roles).await;
    // Fenced at the reconciler's first step, rebuilt from MySQL.
    app.wait_serving(&sale, Duration::from_secs(10)).await;
    assert_eq!(
        app.sale_field(&sale, "seq").await,
        5,
        "the order seq resumes"
    );
    assert_eq!(app.sale_field(&sale, "avail").await, 5);
    assert_eq!(app.sale_field(&sale, "pending").await, 3);
    assert_eq!(app.sale_field(&sale, "paid").await, 2);
    let (s, o) = app.reserve(&sale, 6, None).await;
    assert_eq!(s, 201);
    assert_eq!(o["order_id"], format!("{sale}-6"), "no order id is reused");
    let pool = sqlx::MySqlPool::connect(&app.target.database_url)
        .await
        .unwrap();
    let until = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM orders")
            .fetch_one(&pool)
            .await
            .unwrap();
        if n == 6 {
            break;
        }
        assert!(
            std::time::Instant::now() < until,
            "the new order never reached MySQL"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (pending,): (i32,) = sqlx::query_as("SELECT pending FROM inventory")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(pending, 4);
    pool.close().await;
    app.finish().await;
}
