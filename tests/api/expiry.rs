//! Expiry: unpaid orders close at their deadline, their units go back on
//! sale once, and worker timing never lets a late payment through.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flashsale::domain::{Qty, UserId};
use flashsale::engine::OrderStatus;
use futures::stream::{self, StreamExt};
use redis::AsyncCommands;

use crate::helpers::*;

/// Polls `cond` every 50 ms until it holds or `limit` passes.
async fn wait_for<F, Fut>(limit: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = Instant::now() + limit;
    while !cond().await {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pay_and_expire_racing_on_1000_orders_end_in_one_state_each() {
    let app = spawn_app().await; // HTTP only; the workers are other processes
    let sale = app
        .create_sale(SaleSpec {
            stock: 1000,
            payment_window_secs: 2,
            ..SaleSpec::default()
        })
        .await;
    let reserved =
        futures::future::join_all((1..=1000u64).map(|u| app.reserve(&sale, u, None))).await;
    let mut orders: Vec<(String, i64, i64)> = reserved
        .iter()
        .map(|(s, o)| {
            assert_eq!(*s, 201, "{o}");
            (
                o["order_id"].as_str().unwrap().to_owned(),
                o["amount_cents"].as_i64().unwrap(),
                0,
            )
        })
        .collect();
    let held = app.orders(&sale).await;
    for o in orders.iter_mut() {
        let seq: u64 = o.0.rsplit('-').next().unwrap().parse().unwrap();
        o.2 = held[&seq].deadline_ms;
    }
    let first = orders.iter().map(|o| o.2).min().unwrap();
    let last = orders.iter().map(|o| o.2).max().unwrap();
    assert!(
        last - first < 1000,
        "deadlines within one second: {}",
        last - first
    );

    let _workers = [
        ServeProcess::start(&app.target, "expiry", &[("FLASHSALE_EXPIRY_BATCH", "16")]),
        ServeProcess::start(&app.target, "expiry", &[("FLASHSALE_EXPIRY_BATCH", "16")]),
    ];

    // Payments for every other order, spread from 400 ms before to 400 ms
    // after each one's deadline (by Redis's clock).
    let clock_now = app.redis_now_ms().await;
    let local_now = tokio::time::Instant::now();
    let app = Arc::new(app);
    let payments = orders
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 2 == 0)
        .map(|(i, o)| {
            let (app, id, amount, deadline) = (app.clone(), o.0.clone(), o.1, o.2);
            let offset = (i as i64 * 37) % 801 - 400;
            let at =
                local_now + Duration::from_millis((deadline + offset - clock_now).max(0) as u64);
            tokio::spawn(async move {
                tokio::time::sleep_until(at).await;
                let (status, body) = app.pay(&id, &format!("pay-{id}"), amount).await;
                (id, status, body)
            })
        });
    let answers: Vec<_> = futures::future::join_all(payments.collect::<Vec<_>>())
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();

    wait_for(Duration::from_secs(20), "every order to settle", || async {
        app.sale_field(&sale, "pending").await == 0
    })
    .await;

    let held = app.orders(&sale).await;
    let by_id: HashMap<String, _> = held.values().map(|o| (o.id.to_string(), o)).collect();
    let (mut paid, mut closed) = (0, 0);
    for o in held.values() {
        match o.status {
            OrderStatus::Paid => {
                paid += 1;
                assert!(
                    o.paid_ms.unwrap() < o.deadline_ms,
                    "{} paid after its deadline",
                    o.id
                );
                assert!(o.closed_ms.is_none());
            }
            OrderStatus::Closed => {
                closed += 1;
                assert!(
                    o.closed_ms.unwrap() >= o.deadline_ms,
                    "{} closed early",
                    o.id
                );
                assert!(o.paid_ms.is_none());
            }
            other => panic!("{} ended {other:?}", o.id),
        }
    }
    let (mut accepted, mut expired) = (0, 0);
    for (id, status, body) in &answers {
        let o = by_id[id];
        match status {
            200 => {
                accepted += 1;
                assert_eq!(o.status, OrderStatus::Paid, "{id}");
            }
            409 => {
                expired += 1;
                assert_eq!(code(body), "order_expired", "{id}");
                assert_eq!(o.status, OrderStatus::Closed, "{id}");
            }
            _ => panic!("{id}: {status} {body}"),
        }
    }
    assert!(
        accepted > 0 && expired > 0,
        "the race was run: {accepted} paid, {expired} late"
    );
    assert_eq!(paid, accepted);
    assert_eq!(paid + closed, 1000);

    // Conservation, and stock returned exactly once per closed order.
    let field = |f: &'static str| {
        let app = app.clone();
        let sale = sale.clone();
        async move { app.sale_field(&sale, f).await }
    };
    assert_eq!(field("paid").await, paid as i64);
    assert_eq!(field("closed").await, closed as i64);
    assert_eq!(
        field("avail").await + field("pending").await + field("paid").await,
        1000
    );
    assert_eq!(field("avail").await, closed as i64);
    let events = app.flow_events(&sale).await;
    let mut terminal = HashSet::new();
    for (ev, seq) in &events {
        if ev == "pay" || ev == "close" {
            assert!(
                terminal.insert(*seq),
                "order {seq} reached two terminal states"
            );
        }
    }
    assert_eq!(terminal.len(), 1000);
    let app = Arc::try_unwrap(app).ok().unwrap();
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_killed_mid_drain_leaves_nothing_half_done() {
    const N: u64 = 50_000;
    let app = spawn_app().await;
    let sale = app
        .create_sale(SaleSpec {
            stock: N as i64,
            payment_window_secs: 1,
            ..SaleSpec::default()
        })
        .await;
    let sale_id = sale.parse().unwrap();
    let engine = &app.engine;
    stream::iter(1..=N)
        .for_each_concurrent(64, |u| async move {
            let r = engine
                .reserve(sale_id, UserId::new(u).unwrap(), Qty::default(), None)
                .await
                .unwrap();
            assert!(matches!(r, flashsale::engine::Reservation::Created(_)));
        })
        .await;
    let keys = app.sale_keys(&sale);
    let mut c = app.engine.connection();
    let last: Vec<(String, i64)> = c.zrange_withscores(&keys.deadlines, -1, -1).await.unwrap();
    while app.redis_now_ms().await <= last[0].1 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut first = ServeProcess::start(&app.target, "expiry", &[("FLASHSALE_EXPIRY_BATCH", "20")]);
    wait_for(
        Duration::from_secs(30),
        "the first worker to start draining",
        || async { app.sale_field(&sale, "closed").await >= 2_000 },
    )
    .await;
    first.kill();
    let closed_at_kill = app.sale_field(&sale, "closed").await;
    assert!(
        closed_at_kill < N as i64,
        "the kill came mid-drain ({closed_at_kill})"
    );

    let _second = ServeProcess::start(&app.target, "expiry", &[]);
    wait_for(
        Duration::from_secs(60),
        "the second worker to finish",
        || async { app.sale_field(&sale, "pending").await == 0 },
    )
    .await;
    let overdue: i64 = c.zcard(&keys.deadlines).await.unwrap();
    assert_eq!(overdue, 0);
    assert_eq!(app.sale_field(&sale, "avail").await, N as i64);
    assert_eq!(app.sale_field(&sale, "closed").await, N as i64);
    let orders = app.orders(&sale).await;
    assert!(orders.values().all(|o| o.status == OrderStatus::Closed));
    let closes = app
        .flow_events(&sale)
        .await
        .into_iter()
        .filter(|(e, _)| e == "close");
    assert_eq!(
        closes.map(|(_, seq)| seq).collect::<HashSet<_>>().len(),
        N as usize
    );
    let buyers: i64 = c.hlen(&keys.buyers).await.unwrap();
    assert_eq!(buyers, 0, "every buyer's units were returned");
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unpaid_unit_is_buyable_again_soon_after_its_deadline() {
    let app = spawn_with(Target::fresh(), |c| {
        c.roles = vec![
            flashsale::config::Role::Http,
            flashsale::config::Role::Expiry,
        ]
    })
    .await;
    let sale = app
        .create_sale(SaleSpec {
            stock: 1,
            payment_window_secs: 1,
            ..SaleSpec::default()
        })
        .await;
    let (s, first) = app.reserve(&sale, 1, None).await;
    assert_eq!(s, 201);
    let (s, v) = app.reserve(&sale, 2, None).await;
    assert_eq!((s, code(&v)), (409, "sold_out"));
    let started = Instant::now();
    loop {
        let (s, v) = app.reserve(&sale, 2, None).await;
        if s == 201 {
            break;
        }
        assert_eq!(code(&v), "sold_out");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "the unit did not come back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let order: serde_json::Value = app
        .client
        .get(app.url(&format!(
            "/api/v1/orders/{}",
            first["order_id"].as_str().unwrap()
        )))
        .bearer_auth(buyer_token(1))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(order["status"], "closed");
    let closed =
        chrono::DateTime::parse_from_rfc3339(order["closed_at"].as_str().unwrap()).unwrap();
    let deadline =
        chrono::DateTime::parse_from_rfc3339(order["payment_deadline"].as_str().unwrap()).unwrap();
    let late = (closed - deadline).num_milliseconds();
    assert!(
        (0..500).contains(&late),
        "closed {late} ms after its deadline"
    );

    let metrics = app.metrics().await;
    assert!(
        metrics.contains("flashsale_orders_total{event=\"closed\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("flashsale_expiry_lateness_seconds_count 1"),
        "{metrics}"
    );
    assert!(metrics.contains("flashsale_expiry_due"), "{metrics}");
    app.finish().await;
}
