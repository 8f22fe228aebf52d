//! Downstream, end to end on the real RabbitMQ: a sale's payments and
//! refunds go from Redis through the reconciler's outbox and the relay to
//! the points consumer, which books exactly one entry per paid and per
//! refunded order, while the relay is SIGKILLed again and again.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use flashsale::config::Role;
use futures::StreamExt;
use secrecy::SecretString;
use sqlx::MySqlPool;

use crate::helpers::*;

pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Removes a test's exchange and queues from the shared broker.
pub async fn remove_broker_objects(exchange: &str, queues: &[&str]) {
    let conn = flashsale::amqp::connect(AMQP_URL, "flashsale test cleanup")
        .await
        .expect("RabbitMQ answers");
    let ch = conn.create_channel().await.unwrap();
    for q in queues {
        let _ = ch
            .queue_delete((*q).into(), lapin::options::QueueDeleteOptions::default())
            .await;
    }
    let _ = ch
        .exchange_delete(
            exchange.into(),
            lapin::options::ExchangeDeleteOptions::default(),
        )
        .await;
    let _ = conn.close(200, "done".into()).await;
}

/// Waits until `queue` exists on the broker (a passive declare succeeds).
pub async fn wait_for_queue(queue: &str) {
    let conn = flashsale::amqp::connect(AMQP_URL, "flashsale test probe")
        .await
        .expect("RabbitMQ answers");
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        // A failed passive declare closes its channel: a new one each time.
        let ch = conn.create_channel().await.unwrap();
        let passive = lapin::options::QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        if ch
            .queue_declare(queue.into(), passive, Default::default())
            .await
            .is_ok()
        {
            break;
        }
        assert!(Instant::now() < until, "queue {queue} never declared");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = conn.close(200, "done".into()).await;
}

async fn scalar(pool: &MySqlPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_thousand_orders_earn_and_return_points_exactly_once_through_relay_kills() {
    const ORDERS: u64 = 2000;
    let exchange = unique("fstest_ex");
    let queue = unique("fstest_points");
    let dead = format!("{queue}.dead");
    let target = Target::fresh();
    // This process sells, reconciles and consumes points; the relay runs in
    // a child process that is killed ten times.
    let app = spawn_with(target.clone(), |c| {
        c.roles = vec![Role::Http, Role::Expiry, Role::Reconciler, Role::Points];
        c.amqp.amqp_url = Some(SecretString::from(AMQP_URL));
        c.amqp.amqp_exchange = exchange.clone();
        c.amqp.points_queue = queue.clone();
        c.http.buyer_rate_per_sec = 0;
    })
    .await;
    let pool = MySqlPool::connect(&target.database_url).await.unwrap();
    // The consumer declares and binds its queue before anything is published
    // (a topic exchange drops what no queue is bound for).
    wait_for_queue(&queue).await;

    let relay_env = [
        ("FLASHSALE_AMQP_URL", AMQP_URL),
        ("FLASHSALE_AMQP_EXCHANGE", exchange.as_str()),
        ("FLASHSALE_RELAY_BATCH", "50"),
    ];
    let mut relay = ServeProcess::start(&target, "relay", &relay_env);

    let sale = app
        .create_sale(SaleSpec {
            stock: ORDERS as i64,
            ..SaleSpec::default()
        })
        .await;
    let app_ref = &app;
    let sale_ref = &sale;
    // Buyers reserve and pay; every fourth asks for a refund.
    let work = async {
        let done: Vec<(u64, String, i64)> = futures::stream::iter(1..=ORDERS)
            .map(|user| async move {
                let (s, o) = app_ref.reserve(sale_ref, user, None).await;
                assert_eq!(s, 201, "{o}");
                let id = o["order_id"].as_str().unwrap().to_owned();
                let amount = o["amount_cents"].as_i64().unwrap();
                let (s, v) = app_ref.pay(&id, &format!("pay-{user}"), amount).await;
                assert_eq!(s, 200, "{v}");
                if user % 4 == 0 {
                    let (s, v) = app_ref.order_call("POST", &id, "/refund", user).await;
                    assert!(s == 200 || s == 202, "refund: {s} {v}");
                }
                (user, id, amount)
            })
            .buffer_unordered(32)
            .collect()
            .await;
        done
    };
    // Meanwhile the relay dies ten times, each time with events in flight.
    let kills = async {
        let mut kills = 0;
        while kills < 10 {
            tokio::time::sleep(Duration::from_millis(400)).await;
            let unsent = scalar(&pool, "SELECT COUNT(*) FROM outbox WHERE sent_at IS NULL").await;
            let sent = scalar(
                &pool,
                "SELECT COUNT(*) FROM outbox WHERE sent_at IS NOT NULL",
            )
            .await;
            if unsent == 0 || sent == 0 && kills > 0 {
                continue; // nothing in flight, or the new relay has not started
            }
            relay.kill();
            kills += 1;
            relay = ServeProcess::start(&target, "relay", &relay_env);
        }
        relay
    };
    let (orders, relay) = tokio::join!(work, kills);
    let refunded: HashSet<u64> = (1..=ORDERS).filter(|u| u % 4 == 0).collect();

    // Everything reaches the ledger.
    let want = ORDERS as i64 + refunded.len() as i64;
    let until = Instant::now() + Duration::from_secs(90);
    loop {
        let entries = scalar(&pool, "SELECT COUNT(*) FROM points_entries").await;
        let unsent = scalar(&pool, "SELECT COUNT(*) FROM outbox WHERE sent_at IS NULL").await;
        if entries >= want && unsent == 0 {
            break;
        }
        assert!(
            Instant::now() < until,
            "{entries} of {want} points entries, {unsent} events unsent"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await; // late duplicates, if any

    // Exactly one entry per paid and per refunded order, balances to match.
    let entries: Vec<(u64, String, i64, String)> =
        sqlx::query_as("SELECT user_id, order_id, points, reason FROM points_entries")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(entries.len() as i64, want, "one entry per event");
    let mut per_order: BTreeMap<(String, String), i64> = BTreeMap::new();
    for (_, order, points, reason) in &entries {
        *per_order
            .entry((order.clone(), reason.clone()))
            .or_default() += points;
    }
    let balances: BTreeMap<u64, i64> =
        sqlx::query_as::<_, (u64, i64)>("SELECT user_id, balance FROM points_balances")
            .fetch_all(&pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    for (user, id, amount) in &orders {
        let points = amount / 100;
        assert_eq!(per_order[&(id.clone(), "order.paid".into())], points);
        let back = refunded.contains(user);
        assert_eq!(
            per_order
                .get(&(id.clone(), "order.refunded".into()))
                .copied(),
            back.then_some(-points),
            "order {id}"
        );
        assert_eq!(
            balances[user],
            if back { 0 } else { points },
            "buyer {user}"
        );
    }
    let metrics = app.metrics().await;
    let duplicates = metrics
        .lines()
        .find(|l| l.starts_with("flashsale_points_events_total{outcome=\"duplicate\"}"))
        .unwrap_or("none");
    println!("relay killed 10 times; consumer saw duplicates: {duplicates}");

    drop(relay);
    pool.close().await;
    app.finish().await;
    remove_broker_objects(&exchange, &[&queue, &dead]).await;
}
