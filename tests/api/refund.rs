//! Refunds, including refunds that arrive before the order has settled.

use std::time::{Duration, Instant};

use flashsale::config::Role;
use futures::future::join_all;
use redis::AsyncCommands;

use crate::helpers::*;
use crate::reconcile::{assert_mysql_matches_redis, wait_quiet};

async fn refund(app: &TestApp, order_id: &str, token: &str) -> (u16, serde_json::Value) {
    let res = app
        .client
        .post(app.url(&format!("/api/v1/orders/{order_id}/refund")))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap())
}

/// Reserves and pays for `user`; returns the order id.
async fn paid_order(app: &TestApp, sale: &str, user: u64) -> String {
    let (s, o) = app.reserve(sale, user, None).await;
    assert_eq!(s, 201, "{o}");
    let id = o["order_id"].as_str().unwrap().to_owned();
    let (s, _) = app
        .pay(
            &id,
            &format!("pay-{id}"),
            o["amount_cents"].as_i64().unwrap(),
        )
        .await;
    assert_eq!(s, 200);
    id
}

async fn wait_for_field(app: &TestApp, sale: &str, field: &str, want: i64, limit: Duration) {
    let until = Instant::now() + limit;
    loop {
        let v = app.sale_field(sale, field).await;
        if v == want {
            return;
        }
        assert!(Instant::now() < until, "{field} is {v}, not {want}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refunds_before_settlement_are_accepted_and_done_once_the_orders_settle() {
    // The reconciler is "paused": it is not running in this process.
    let app = spawn_with(Target::fresh(), |c| {
        c.roles = vec![Role::Http, Role::Expiry]
    })
    .await;
    let sale = app
        .create_sale(SaleSpec {
            stock: 500,
            ..SaleSpec::default()
        })
        .await;
    let ids = join_all((1..=500u64).map(|u| paid_order(&app, &sale, u))).await;
    // Right after paying: every refund waits for its order to settle.
    let app_ref = &app;
    let answers = join_all(
        ids.iter()
            .enumerate()
            .map(|(i, id)| async move { refund(app_ref, id, &buyer_token(i as u64 + 1)).await }),
    )
    .await;
    for (s, o) in &answers {
        assert_eq!(
            (*s, o["status"].as_str()),
            (202, Some("refund_pending")),
            "{o}"
        );
    }
    assert_eq!(app.sale_field(&sale, "refunds_waiting").await, 500);
    assert_eq!(
        app.sale_field(&sale, "avail").await,
        0,
        "nothing refunded yet"
    );

    let mut reconciler = ServeProcess::start(&app.target, "reconciler", &[]);
    wait_for_field(&app, &sale, "refunded", 500, Duration::from_secs(30)).await;
    wait_quiet(&app, &sale, Duration::from_secs(30)).await;
    assert_eq!(
        app.sale_field(&sale, "avail").await,
        500,
        "the units are on sale again"
    );
    assert_eq!(app.sale_field(&sale, "refunds_waiting").await, 0);
    for (i, id) in ids.iter().enumerate().take(5) {
        let (s, o) = refund(&app, id, &buyer_token(i as u64 + 1)).await;
        assert_eq!((s, o["status"].as_str()), (200, Some("refunded")));
        assert!(o["refunded_at"].is_string());
    }
    assert_mysql_matches_redis(&app, &sale).await;
    // Someone can buy again.
    let (s, _) = app.reserve(&sale, 9_999, None).await;
    assert_eq!(s, 201);
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("flashsale_refunds_total{outcome=\"after_settlement\"} 500"),
        "{metrics}"
    );
    reconciler.kill();
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_replayed_concurrently_has_one_effect() {
    let app = spawn_with(Target::fresh(), |c| {
        c.roles = vec![Role::Http, Role::Expiry, Role::Reconciler]
    })
    .await;
    let sale = app.create_sale(SaleSpec::default()).await;
    let id = paid_order(&app, &sale, 1).await;
    wait_quiet(&app, &sale, Duration::from_secs(10)).await; // settled

    let token = buyer_token(1);
    let answers = join_all((0..10).map(|_| refund(&app, &id, &token))).await;
    for (s, o) in &answers {
        assert_eq!((*s, o["status"].as_str()), (200, Some("refunded")), "{o}");
    }
    assert_eq!(app.sale_field(&sale, "refunded").await, 1);
    assert_eq!(app.sale_field(&sale, "restocked").await, 1);
    assert_eq!(app.sale_field(&sale, "avail").await, 10);
    // One refund record: counted once settled (the running reconciler trims
    // the stream, so the stream alone may no longer hold it).
    wait_quiet(&app, &sale, Duration::from_secs(10)).await;
    let pool = sqlx::MySqlPool::connect(&app.target.database_url)
        .await
        .unwrap();
    let (refund_records,): (i64,) =
        sqlx::query_as("SELECT COUNT(*) FROM stock_flows WHERE event = 'refund'")
            .fetch_one(&pool)
            .await
            .unwrap();
    pool.close().await;
    assert_eq!(refund_records, 1);

    // Unsettled and replayed: accepted once, one request record.
    let id2 = paid_order(&app, &sale, 2).await;
    let admin = join_all((0..10).map(|_| refund(&app, &id2, ADMIN_TOKEN))).await;
    let statuses: Vec<u16> = admin.iter().map(|(s, _)| *s).collect();
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 202),
        "{statuses:?}"
    );
    wait_for_field(&app, &sale, "refunded", 2, Duration::from_secs(10)).await;
    wait_quiet(&app, &sale, Duration::from_secs(10)).await;
    assert_eq!(app.sale_field(&sale, "avail").await, 10);
    assert_mysql_matches_redis(&app, &sale).await;
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_paid_orders_are_refunded_and_only_by_their_owner_or_the_admin() {
    let app = spawn_app().await;
    let sale = app
        .create_sale(SaleSpec {
            payment_window_secs: 1,
            ..SaleSpec::default()
        })
        .await;
    let (_, pending) = app.reserve(&sale, 1, None).await;
    let pending = pending["order_id"].as_str().unwrap().to_owned();
    let (s, v) = refund(&app, &pending, &buyer_token(1)).await;
    assert_eq!(
        (s, code(&v), v["error"]["status"].as_str()),
        (409, "order_not_paid", Some("pending"))
    );

    let (_, c) = app.reserve(&sale, 2, None).await;
    let cancelled = c["order_id"].as_str().unwrap().to_owned();
    app.cancel(&cancelled, 2).await;
    let (s, v) = refund(&app, &cancelled, &buyer_token(2)).await;
    assert_eq!((s, code(&v)), (409, "order_not_paid"));

    // The pending order is closed by a late payment (no worker runs here).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (s, _) = app.pay(&pending, "late", 1999).await;
    assert_eq!(s, 409);
    let (s, v) = refund(&app, &pending, ADMIN_TOKEN).await;
    assert_eq!(
        (s, code(&v), v["error"]["status"].as_str()),
        (409, "order_not_paid", Some("closed"))
    );

    let paid = paid_order(&app, &sale, 3).await;
    let (s, v) = refund(&app, &paid, &buyer_token(4)).await;
    assert_eq!((s, code(&v)), (404, "not_found"), "another buyer's order");
    let (s, v) = refund(&app, &paid, "nonsense").await;
    assert_eq!((s, code(&v)), (401, "unauthorized"));
    let (s, v) = refund(&app, "1-x", &buyer_token(3)).await;
    assert_eq!((s, code(&v)), (400, "invalid_request"));
    assert_eq!(app.sale_field(&sale, "paid").await, 1);
    assert_eq!(app.sale_field(&sale, "refunds_waiting").await, 0);
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_that_never_settles_reaches_the_dead_letter_and_changes_nothing_else() {
    let app = spawn_with(Target::fresh(), |c| {
        c.roles = vec![Role::Http, Role::Expiry]; // no reconciler: nothing settles
        c.store.refund_dead_letter_secs = 1;
    })
    .await;
    let sale = app.create_sale(SaleSpec::default()).await;
    let id = paid_order(&app, &sale, 1).await;
    let (s, _) = refund(&app, &id, &buyer_token(1)).await;
    assert_eq!(s, 202);
    let before: Vec<(String, String)> = {
        let mut c = app.engine.connection();
        let mut all: Vec<(String, String)> = c.hgetall(app.sale_keys(&sale).sale).await.unwrap();
        all.retain(|(f, _)| f != "refunds_waiting" && f != "refunds_dead");
        all.sort();
        all
    };
    wait_for_field(&app, &sale, "refunds_dead", 1, Duration::from_secs(10)).await;
    let mut c = app.engine.connection();
    let dead: Vec<(u64, String)> = c.hgetall(app.sale_keys(&sale).dead_refunds).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].0.to_string(), id.split('-').nth(1).unwrap());
    let mut after: Vec<(String, String)> = c.hgetall(app.sale_keys(&sale).sale).await.unwrap();
    after.retain(|(f, _)| f != "refunds_waiting" && f != "refunds_dead");
    after.sort();
    assert_eq!(before, after, "stock and counters did not move");
    assert_eq!(app.sale_field(&sale, "refunds_waiting").await, 0);
    let order = app.orders(&sale).await.into_values().next().unwrap();
    assert_eq!(order.status.as_str(), "refund_pending");
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("flashsale_refunds_dead_lettered_total 1"),
        "{metrics}"
    );

    // Asking again takes it out of the dead-letter and back on the queue.
    let (s, _) = refund(&app, &id, &buyer_token(1)).await;
    assert_eq!(s, 202);
    assert_eq!(app.sale_field(&sale, "refunds_dead").await, 0);
    assert_eq!(app.sale_field(&sale, "refunds_waiting").await, 1);
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_after_the_sale_ended_keeps_the_unit_off_sale() {
    let app = spawn_with(Target::fresh(), |c| {
        c.roles = vec![Role::Http, Role::Expiry, Role::Reconciler]
    })
    .await;
    let sale = app
        .create_sale(SaleSpec {
            end_offset_ms: 1500,
            ..SaleSpec::default()
        })
        .await;
    let id = paid_order(&app, &sale, 1).await;
    let end = app.sale_field(&sale, "end_ms").await;
    while app.redis_now_ms().await < end {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_quiet(&app, &sale, Duration::from_secs(10)).await;
    let (s, o) = refund(&app, &id, &buyer_token(1)).await;
    assert_eq!((s, o["status"].as_str()), (200, Some("refunded")));
    assert_eq!(app.sale_field(&sale, "avail").await, 9);
    assert_eq!(app.sale_field(&sale, "restocked").await, 0);
    wait_quiet(&app, &sale, Duration::from_secs(10)).await;
    assert_mysql_matches_redis(&app, &sale).await;
    app.finish().await;
}
