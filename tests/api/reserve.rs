//! The seckill path under concurrency: no oversell, per-user limit,
//! idempotency, and the sale window judged by Redis's clock.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use redis::AsyncCommands;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_sell_exactly_the_stock_to_2000_buyers() {
    let a = spawn_app().await;
    let b = spawn_on(a.target.clone()).await;
    let sale = a
        .create_sale(SaleSpec {
            stock: 100,
            ..SaleSpec::default()
        })
        .await;

    // Watch the stock counter while the flood runs: it must never go below 0.
    let stop = Arc::new(AtomicBool::new(false));
    let lowest = Arc::new(AtomicI64::new(i64::MAX));
    let watcher = {
        let (stop, lowest) = (stop.clone(), lowest.clone());
        let mut c = a.engine.connection();
        let key = a.sale_keys(&sale).sale;
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let avail: i64 = c.hget(&key, "avail").await.unwrap();
                lowest.fetch_min(avail, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };

    let results = join_all((1..=2000u64).map(|user| {
        let app = if user % 2 == 0 { &a } else { &b };
        let sale = sale.clone();
        async move { app.reserve(&sale, user, None).await }
    }))
    .await;
    stop.store(true, Ordering::Relaxed);
    watcher.await.unwrap();

    let mut by_outcome: BTreeMap<(u16, String), usize> = BTreeMap::new();
    let mut order_ids = HashSet::new();
    let mut buyers = HashSet::new();
    for (status, body) in &results {
        *by_outcome
            .entry((*status, code(body).to_owned()))
            .or_default() += 1;
        if *status == 201 {
            order_ids.insert(body["order_id"].as_str().unwrap().to_owned());
            buyers.insert(body["user_id"].as_str().unwrap().to_owned());
        }
    }
    let expected: BTreeMap<(u16, String), usize> = [
        ((201, "<none>".to_owned()), 100),
        ((409, "sold_out".to_owned()), 1900),
    ]
    .into();
    assert_eq!(by_outcome, expected);
    assert_eq!(order_ids.len(), 100, "every order id is distinct");
    assert_eq!(buyers.len(), 100, "one unit per buyer");
    assert!(lowest.load(Ordering::Relaxed) >= 0, "stock went negative");

    assert_eq!(a.sale_field(&sale, "avail").await, 0);
    assert_eq!(a.sale_field(&sale, "pending").await, 100);
    let k = a.sale_keys(&sale);
    let mut c = a.engine.connection();
    let orders = a.order_seqs(&sale).await.len();
    let deadlines = a.due_len(&sale).await;
    let flows: i64 = c.xlen(&k.flow).await.unwrap();
    let held: Vec<i64> = c.hvals(&k.buyers).await.unwrap();
    assert_eq!((orders, deadlines, flows), (100, 100, 100));
    assert_eq!(held.iter().sum::<i64>(), 100);

    let view = a.get_sale(&sale).await;
    assert_eq!(view["stock_available"], 0);
    assert_eq!(view["state"], "sold_out");
    b.finish().await;
    a.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_buyer_sending_50_requests_gets_the_limit_and_no_more() {
    // The per-user limit, not the rate limit, is under test here.
    let app = spawn_with(Target::fresh(), |c| c.http.buyer_rate_per_sec = 0).await;
    let sale = app
        .create_sale(SaleSpec {
            stock: 100,
            per_user_limit: 2,
            ..SaleSpec::default()
        })
        .await;
    let results = join_all((0..50).map(|_| app.reserve(&sale, 77, None))).await;
    let created = results.iter().filter(|(s, _)| *s == 201).count();
    let limited = results
        .iter()
        .filter(|(s, b)| *s == 409 && code(b) == "limit_exceeded")
        .count();
    assert_eq!((created, limited), (2, 48));
    assert_eq!(app.sale_field(&sale, "avail").await, 98);
    let mut c = app.engine.connection();
    let held: i64 = c.hget(app.sale_keys(&sale).buyers, "77").await.unwrap();
    assert_eq!(held, 2);
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_idempotency_key_sent_20_times_makes_one_order() {
    // Idempotency, not the rate limit, is under test here.
    let app = spawn_with(Target::fresh(), |c| c.http.buyer_rate_per_sec = 0).await;
    let sale = app
        .create_sale(SaleSpec {
            stock: 10,
            per_user_limit: 3,
            ..SaleSpec::default()
        })
        .await;
    let results = join_all((0..20).map(|_| app.reserve(&sale, 5, Some("checkout-1")))).await;
    let ids: HashSet<_> = results
        .iter()
        .map(|(s, b)| {
            assert_eq!(*s, 201, "{b}");
            b["order_id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 1, "every answer names the same order");
    assert_eq!(app.sale_field(&sale, "avail").await, 9);

    // Another key is another order; the same key from another buyer is theirs.
    let (s, other) = app.reserve(&sale, 5, Some("checkout-2")).await;
    assert_eq!(s, 201);
    assert!(!ids.contains(other["order_id"].as_str().unwrap()));
    let (s, theirs) = app.reserve(&sale, 6, Some("checkout-1")).await;
    assert_eq!(s, 201);
    assert_eq!(theirs["user_id"], "6");
    assert_eq!(app.sale_field(&sale, "avail").await, 7);
    app.finish().await;
}

/// A key finds its order in any orders bucket: sent again after the sale
/// has moved two buckets on, it answers the first order (the script names
/// the old bucket, and the call is sent again declaring it), and a buyer at
/// the limit is still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_finds_its_order_buckets_later() {
    let app = spawn_with(Target::fresh(), |c| c.http.buyer_rate_per_sec = 0).await;
    let sale = app
        .create_sale(SaleSpec {
            stock: 200,
            ..SaleSpec::default()
        })
        .await;
    let (s, first) = app.reserve(&sale, 1, Some("checkout-1")).await;
    assert_eq!(s, 201, "{first}");
    for user in 2..=150 {
        let (s, o) = app.reserve(&sale, user, None).await;
        assert_eq!(s, 201, "{o}");
    }
    let (s, again) = app.reserve(&sale, 1, Some("checkout-1")).await;
    assert_eq!(s, 201, "{again}");
    assert_eq!(again["order_id"], first["order_id"]);
    assert_eq!(again["order_id"], format!("{sale}-1"));
    let (s, refused) = app.reserve(&sale, 1, None).await;
    assert_eq!((s, code(&refused)), (409, "limit_exceeded"), "{refused}");
    assert_eq!(app.sale_field(&sale, "seq").await, 150);
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sale_window_is_judged_by_redis_clock() {
    let app = spawn_app().await;
    let upcoming = app
        .create_sale(SaleSpec {
            start_offset_ms: 60_000,
            end_offset_ms: 120_000,
            ..SaleSpec::default()
        })
        .await;
    let (s, body) = app.reserve(&upcoming, 1, None).await;
    assert_eq!((s, code(&body)), (409, "sale_not_started"));

    let closing = app
        .create_sale(SaleSpec {
            start_offset_ms: -1_000,
            end_offset_ms: 1_500,
            ..SaleSpec::default()
        })
        .await;
    let (s, _) = app.reserve(&closing, 1, None).await;
    assert_eq!(s, 201);
    let end_ms = app.sale_field(&closing, "end_ms").await;
    while app.redis_now_ms().await < end_ms {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (s, body) = app.reserve(&closing, 2, None).await;
    assert_eq!((s, code(&body)), (409, "sale_ended"));

    let states = [
        app.get_sale(&upcoming).await["state"].clone(),
        app.get_sale(&closing).await["state"].clone(),
    ];
    assert_eq!(states, ["upcoming", "ended"]);
    assert_eq!(app.sale_field(&upcoming, "avail").await, 10);
    assert_eq!(app.sale_field(&closing, "avail").await, 9);
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_is_seen_by_its_owner_and_the_admin_only() {
    let app = spawn_app().await;
    let sale = app.create_sale(SaleSpec::default()).await;
    let (_, order) = app.reserve(&sale, 10, None).await;
    let id = order["order_id"].as_str().unwrap();
    assert!(
        id.starts_with(&format!("{sale}-")),
        "the order id names its sale"
    );
    let get = |token: String| {
        app.client
            .get(app.url(&format!("/api/v1/orders/{id}")))
            .bearer_auth(token)
            .send()
    };
    let mine = get(buyer_token(10)).await.unwrap();
    assert_eq!(mine.status(), 200);
    let mine: serde_json::Value = mine.json().await.unwrap();
    assert_eq!(mine, order);
    assert_eq!(mine["status"], "pending");
    assert_eq!(mine["amount_cents"], 1999);
    assert_eq!(get(ADMIN_TOKEN.to_owned()).await.unwrap().status(), 200);
    let other = get(buyer_token(11)).await.unwrap();
    assert_eq!(other.status(), 404);
    let body: serde_json::Value = other.json().await.unwrap();
    assert_eq!(code(&body), "not_found");
    app.finish().await;
}

/// The reserve script as the engine sends it (prelude + reserve).
fn reserve_script() -> redis::Script {
    redis::Script::new(&format!(
        "{}\n{}",
        include_str!("../../lua/prelude.lua"),
        include_str!("../../lua/reserve.lua")
    ))
}

#[tokio::test]
async fn one_combined_call_judges_each_reservation_as_if_it_came_alone() {
    let app = spawn_app().await;
    let sale = app
        .create_sale(SaleSpec {
            stock: 5,
            per_user_limit: 2,
            ..SaleSpec::default()
        })
        .await;
    let k = app.sale_keys(&sale);
    // (user, qty, idempotency key) -> the reply each must get.
    let batch: [(u64, u32, &str, &str); 9] = [
        (1, 1, "a", "ok"),            // seq 1
        (1, 1, "a", "dup"),           // same key: the order of seq 1
        (1, 1, "", "ok"),             // seq 2, user 1 now holds 2
        (1, 1, "", "limit_exceeded"), // a third unit for user 1
        (2, 2, "", "ok"),             // seq 3, 1 unit left
        (3, 2, "", "sold_out"),       // wants 2, 1 left
        (3, 1, "", "ok"),             // seq 4, stock gone
        (4, 1, "", "sold_out"),
        (1, 1, "a", "dup"), // a retry still finds its order
    ];
    let script = reserve_script();
    let mut inv = script.prepare_invoke();
    for key in k.reserve_keys() {
        inv.key(key);
    }
    let mut c = app.engine.connection();
    let token: String = c.hget(&k.sale, "db").await.unwrap();
    inv.arg(1_000_000).arg("c0ffee").arg(0).arg(token);
    for (user, qty, idem, _) in batch {
        inv.arg(user).arg(qty).arg(idem);
    }
    let mut c = app.engine.connection();
    let replies: Vec<Vec<String>> = inv.invoke_async(&mut c).await.unwrap();
    assert_eq!(replies.len(), batch.len());
    let seqs: Vec<Option<&str>> = replies
        .iter()
        .map(|r| (r[0] == "ok" || r[0] == "dup").then(|| r[1].as_str()))
        .collect();
    for (i, (reply, (_, _, _, want))) in replies.iter().zip(batch).enumerate() {
        assert_eq!(reply[0], want, "reservation {i}: {reply:?}");
    }
    assert_eq!(
        seqs,
        [
            Some("1"),
            Some("1"),
            Some("2"),
            None,
            Some("3"),
            None,
            Some("4"),
            None,
            Some("1")
        ]
    );
    // A sold-out answer says what is left: only "0" is a sold-out sale.
    assert_eq!((&*replies[5][1], &*replies[7][1]), ("1", "0"));
    // A repeated key in the same call answers with the order it made.
    assert_eq!(replies[1][2], replies[0][2]);
    assert_eq!(replies[8][2], replies[0][2]);
    // Each new order carries its own buyer, quantity and amount.
    let order3 = flashsale::engine::Order::unpack(
        flashsale::domain::OrderId::new(sale.parse().unwrap(), 3),
        &replies[4][2],
    )
    .unwrap();
    assert_eq!(
        (order3.user.get(), order3.qty, order3.amount_cents),
        (2, 2, 2 * 1999)
    );
    // The orders bucket keeps a short form; reading it back gives the same order.
    let stored: String = c.hget(k.orders_bucket(3), 3).await.unwrap();
    assert!(stored.starts_with("p2|2|"), "{stored}");
    assert!(stored.len() < replies[4][2].len() / 2, "{stored}");
    assert_eq!(app.engine.order(order3.id).await.unwrap(), Some(order3));

    // The sale's counters, the buyers, the deadlines and the flow moved by
    // exactly the four new orders.
    assert_eq!(app.sale_field(&sale, "avail").await, 0);
    assert_eq!(app.sale_field(&sale, "pending").await, 5);
    assert_eq!(app.sale_field(&sale, "seq").await, 4);
    let buyers: BTreeMap<String, i64> = c.hgetall(&k.buyers).await.unwrap();
    let want: BTreeMap<String, i64> = [("1", 2), ("2", 2), ("3", 1)]
        .into_iter()
        .map(|(u, n)| (u.to_owned(), n))
        .collect();
    assert_eq!(buyers, want);
    let due = app.due_len(&sale).await;
    let records: i64 = c.xlen(&k.flow).await.unwrap();
    let orders = app.order_seqs(&sale).await.len();
    let keys_kept: i64 = c.hlen(&k.idem).await.unwrap();
    assert_eq!((due, records, orders, keys_kept), (4, 4, 4, 1));
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_on_one_sale_is_combined_into_fewer_script_calls() {
    let app = spawn_app().await;
    let sale = app
        .create_sale(SaleSpec {
            stock: 300,
            ..SaleSpec::default()
        })
        .await;
    let id: flashsale::domain::SaleId = sale.parse().unwrap();
    let stats = app.engine.reserve_stats().clone();
    let (calls0, carried0) = (stats.calls.get(), stats.reservations.get());
    // 600 buyers at once straight into the engine, limit 1 each, 300 units.
    let results = join_all((1..=600u64).map(|user| {
        let engine = app.engine.clone();
        async move {
            let user = flashsale::domain::UserId::new(user).unwrap();
            let qty = flashsale::domain::Qty::new(1).unwrap();
            engine.reserve(id, user, qty, None).await.unwrap()
        }
    }))
    .await;
    let created = results
        .iter()
        .filter(|r| matches!(r, flashsale::engine::Reservation::Created(_)))
        .count();
    assert_eq!(created, 300);
    let calls = stats.calls.get() - calls0;
    let carried = stats.reservations.get() - carried0;
    // Refusals answered from the sold-out memory never reach Redis.
    assert!(carried >= 300, "{carried}");
    assert!(
        calls * 2 < carried,
        "{calls} calls for {carried} reservations"
    );
    assert_eq!(app.orders(&sale).await.len(), 300);
    assert_eq!(app.sale_field(&sale, "avail").await, 0);
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserve_queues_of_idle_or_unknown_sales_go_away() {
    let app = spawn_app().await;
    let sale = app.create_sale(SaleSpec::default()).await;
    let mut opts = app.target.config().store.engine_options().unwrap();
    opts.batching.idle = Duration::from_millis(200);
    let engine = flashsale::engine::Engine::connect(&opts).unwrap();
    let user = flashsale::domain::UserId::new(5).unwrap();
    let qty = flashsale::domain::Qty::new(1).unwrap();
    // Buyers probing ids that name no sale leave no queue behind.
    for id in 1_000_000..1_000_200u64 {
        let id = flashsale::domain::SaleId::new(id).unwrap();
        let r = engine.reserve(id, user, qty, None).await.unwrap();
        assert_eq!(
            r,
            flashsale::engine::Reservation::Refused(flashsale::engine::Refusal::NotFound)
        );
    }
    assert_eq!(engine.reserve_queues(), 0);
    // A real sale keeps its queue while buyers come, and loses it when idle;
    // a reservation after that starts a new one.
    let id = sale.parse().unwrap();
    let r = engine.reserve(id, user, qty, None).await.unwrap();
    assert!(
        matches!(r, flashsale::engine::Reservation::Created(_)),
        "{r:?}"
    );
    assert_eq!(engine.reserve_queues(), 1);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(engine.reserve_queues(), 0);
    let r = engine.reserve(id, user, qty, None).await.unwrap();
    assert_eq!(
        r,
        flashsale::engine::Reservation::Refused(flashsale::engine::Refusal::LimitExceeded)
    );
    assert_eq!(engine.reserve_queues(), 1);
    app.finish().await;
}

/// The reserve script touches only the buckets (due-queue and orders) its
/// caller declares: a new order that falls in another makes the call write
/// nothing and name the bucket it needs.
#[tokio::test]
async fn a_reserve_that_needs_an_undeclared_bucket_writes_nothing_and_names_it() {
    let app = spawn_app().await;
    let sale = app.create_sale(SaleSpec::default()).await;
    let k = app.sale_keys(&sale);
    let mut c = app.engine.connection();
    let token: String = c.hget(&k.sale, "db").await.unwrap();
    let script = reserve_script();
    let call = |bucket: u64| {
        let mut inv = script.prepare_invoke();
        for key in k.reserve_keys() {
            inv.key(key);
        }
        for key in k.bucket_keys(bucket) {
            inv.key(key);
        }
        inv.arg(1_000_000).arg("b0cce7").arg(0).arg(&token);
        inv.arg(7).arg(1).arg("");
        inv
    };
    // Order seq 1 falls in bucket 0; bucket 5 is declared.
    let err = call(5)
        .invoke_async::<Vec<Vec<String>>>(&mut c)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("NEEDBUCKETS"), "{err}");
    assert!(err.detail().is_some_and(|d| d.starts_with("0 ")), "{err}");
    assert_eq!(app.sale_field(&sale, "avail").await, 10, "nothing written");
    let seq: Option<u64> = c.hget(&k.sale, "seq").await.unwrap();
    assert_eq!(seq, Some(0));
    let ok: Vec<Vec<String>> = call(0).invoke_async(&mut c).await.unwrap();
    assert_eq!(ok[0][0], "ok");
    let due: u64 = c.zcard(k.due_bucket_no(0)).await.unwrap();
    assert_eq!(due, 1);
    app.finish().await;
}
