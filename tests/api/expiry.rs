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

/// A sale of `stock` units with a 1 s payment window, `n` buyers (user ids
/// 1..=n) holding one unpaid unit each, and every deadline passed by
/// Redis's clock when this returns (no expiry worker runs in `app`).
async fn unpaid_orders_past_due(app: &TestApp, n: u64, stock: i64) -> String {
    let sale = app
        .create_sale(SaleSpec {
            stock,
            payment_window_secs: 1,
            ..SaleSpec::default()
        })
        .await;
    let sale_id = sale.parse().unwrap();
    let engine = &app.engine;
    stream::iter(1..=n)
        .for_each_concurrent(64, |u| async move {
            let r = engine
                .reserve(sale_id, UserId::new(u).unwrap(), Qty::default(), None)
                .await
                .unwrap();
            assert!(matches!(r, flashsale::engine::Reservation::Created(_)));
        })
        .await;
    let last = app
        .due(&sale)
        .await
        .into_iter()
        .map(|(_, at)| at as i64)
        .max()
        .unwrap();
    while app.redis_now_ms().await <= last {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sale
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
    let sale = unpaid_orders_past_due(&app, N, N as i64).await;
    let keys = app.sale_keys(&sale);
    let mut c = app.engine.connection();

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
    let overdue = app.due_len(&sale).await;
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
        // The buyer polls faster than the default rate limit allows.
        c.http.buyer_rate_per_sec = 0;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bucketed_due_queue_stays_exact_compact_and_drains_to_nothing() {
    let app = spawn_app().await; // no workers: expiry is driven by hand here
    let sale = app
        .create_sale(SaleSpec {
            stock: 1_000,
            per_user_limit: 1,
            payment_window_secs: 1,
            ..SaleSpec::default()
        })
        .await;
    let id: flashsale::domain::SaleId = sale.parse().unwrap();
    let k = app.sale_keys(&sale);
    let mut c = app.engine.connection();
    // 300 orders: five buckets of 64 order seqs, the last one partly filled.
    let orders: Vec<flashsale::engine::Order> = stream::iter(1..=300u64)
        .map(|u| {
            let e = app.engine.clone();
            async move {
                match e
                    .reserve(id, UserId::new(u).unwrap(), Qty::new(1).unwrap(), None)
                    .await
                    .unwrap()
                {
                    flashsale::engine::Reservation::Created(o) => o,
                    other => panic!("{other:?}"),
                }
            }
        })
        .buffer_unordered(50)
        .collect()
        .await;
    // Every third order paid, every fifth (unpaid) cancelled.
    let mut pending = HashSet::new();
    for o in &orders {
        let seq = o.id.seq();
        if seq % 3 == 0 {
            let r = app
                .engine
                .pay(o.id, &format!("p{seq}"), o.amount_cents)
                .await;
            assert!(
                matches!(r, Ok(flashsale::engine::Payment::Paid(_))),
                "{r:?}"
            );
        } else if seq % 5 == 0 {
            let r = app.engine.cancel(o.id, o.user).await;
            assert!(
                matches!(r, Ok(flashsale::engine::Cancellation::Cancelled(_))),
                "{r:?}"
            );
        } else {
            pending.insert(seq.to_string());
        }
    }

    // One entry per pending order, each in its order's bucket, every bucket
    // in Redis's compact encoding and indexed by its earliest entry.
    let due = app.due(&sale).await;
    let members: HashSet<String> = due.iter().map(|(m, _)| m.clone()).collect();
    assert_eq!(members, pending);
    let index: Vec<(u64, f64)> = c.zrange_withscores(&k.deadlines, 0, -1).await.unwrap();
    assert_eq!(index.len(), 5);
    for (bucket, head) in &index {
        let key = k.due_bucket_no(*bucket);
        let encoding: String = redis::cmd("OBJECT")
            .arg("ENCODING")
            .arg(&key)
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(encoding, "listpack", "{key}");
        let first: Vec<(String, f64)> = c.zrange_withscores(&key, 0, 0).await.unwrap();
        assert_eq!(first[0].1, *head, "{key} is indexed by its earliest entry");
        for (member, _) in c
            .zrange_withscores::<_, Vec<(String, f64)>>(&key, 0, -1)
            .await
            .unwrap()
        {
            let seq: u64 = member.parse().unwrap();
            assert_eq!(seq / flashsale::engine::keys::DUE_BUCKET, *bucket);
        }
    }

    // Past the deadlines, small batches close exactly the pending orders.
    let last = due.iter().map(|(_, at)| *at as i64).max().unwrap();
    while app.redis_now_ms().await <= last {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut closed = 0;
    loop {
        let b = app.engine.expire(id, 7).await.unwrap();
        assert!(b.claimed <= 7);
        closed += b.closed;
        if b.still_due == 0 {
            assert_eq!(b.next_deadline_ms, None);
            break;
        }
    }
    assert_eq!(closed, pending.len());
    assert_eq!(app.sale_field(&sale, "closed").await, pending.len() as i64);
    let left: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}*", k.deadlines))
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(left.is_empty(), "{left:?}");
    app.finish().await;
}

/// A worker sharing its process with reservations keeps its claims short
/// (a reserve call that meets a claim waits for it) and claims in large
/// batches again once the reservations have stopped for a while.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_stay_short_while_the_process_reserves() {
    use flashsale::db::retired::LiveSale;
    use flashsale::workers::expiry::{ExpiryOptions, ExpiryWorker, Wakeup};
    use flashsale::workers::live::LiveSales;

    const N: u64 = 1_000;
    let app = spawn_app().await;
    let sale = unpaid_orders_past_due(&app, N, N as i64 + 10).await;
    let sale_id = sale.parse().unwrap();
    let engine = &app.engine;
    let live = Arc::new(LiveSales::of(&[LiveSale {
        id: sale_id,
        end_ms: i64::MAX,
        token: 0,
    }]));
    let worker = ExpiryWorker::new(
        app.engine.clone(),
        live,
        Arc::new(flashsale::telemetry::Metrics::default()),
        Arc::new(Wakeup::default()),
        ExpiryOptions {
            batch: 200,
            busy_batch: 10,
            ..ExpiryOptions::default()
        },
    );
    // The reservations above went out before the worker existed: the
    // process has been quiet since, as far as the worker knows.
    assert_eq!(worker.try_step().await.unwrap().closed, 200);
    // A reservation now (another buyer): the next claims are short, for a
    // while after the last reservation.
    let r = engine
        .reserve(sale_id, UserId::new(N + 1).unwrap(), Qty::default(), None)
        .await
        .unwrap();
    assert!(matches!(r, flashsale::engine::Reservation::Created(_)));
    assert_eq!(worker.try_step().await.unwrap().closed, 10);
    assert_eq!(worker.try_step().await.unwrap().closed, 10);
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(worker.try_step().await.unwrap().closed, 200);
    assert_eq!(app.sale_field(&sale, "closed").await, 420);
    app.finish().await;
}
