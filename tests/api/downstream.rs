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
        if queue_depth(&ch, queue).await.is_some() {
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
        ("FLASHSALE_POINTS_QUEUE", queue.as_str()),
        ("FLASHSALE_RELAY_BATCH", "50"),
    ];
    let sale = app
        .create_sale(SaleSpec {
            stock: ORDERS as i64,
            ..SaleSpec::default()
        })
        .await;
    let app_ref = &app;
    let sale_ref = &sale;
    let finished = std::sync::atomic::AtomicBool::new(false);
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
        finished.store(true, std::sync::atomic::Ordering::SeqCst);
        done
    };
    // The relay starts once events wait, and dies ten times, each time
    // after it has published some and with more waiting.
    let kills = async {
        let unsent_sql = "SELECT COUNT(*) FROM outbox WHERE sent_at IS NULL";
        let sent_sql = "SELECT COUNT(*) FROM outbox WHERE sent_at IS NOT NULL";
        while scalar(&pool, unsent_sql).await < 500 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut relay = ServeProcess::start(&target, "relay", &relay_env);
        let mut kills = 0;
        let mut sent_at_start = scalar(&pool, sent_sql).await;
        while kills < 10 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let unsent = scalar(&pool, unsent_sql).await;
            if unsent == 0 && finished.load(std::sync::atomic::Ordering::SeqCst) {
                break;
            }
            let sent = scalar(&pool, sent_sql).await;
            if unsent > 0 && sent - sent_at_start >= 100 {
                relay.kill();
                kills += 1;
                relay = ServeProcess::start(&target, "relay", &relay_env);
                sent_at_start = sent;
            }
        }
        (relay, kills)
    };
    let (orders, (relay, kills)) = tokio::join!(work, kills);
    assert_eq!(kills, 10, "the relay was killed ten times mid-stream");
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

/// With the broker named but not answering, selling, paying and settling
/// go on, `/readyz` stays 200, the events wait in the outbox, and the relay
/// counts its failures; they leave once a broker answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_that_does_not_answer_holds_nothing_up() {
    let exchange = unique("fstest_ex");
    let queue = unique("fstest_points");
    let dead_port = free_port(); // nothing listens there
    let target = Target::fresh();
    let app = spawn_with(target.clone(), |c| {
        c.roles = vec![Role::Http, Role::Expiry, Role::Reconciler, Role::Relay];
        c.amqp.amqp_url = Some(SecretString::from(format!(
            "amqp://guest:guest@127.0.0.1:{dead_port}/%2f"
        )));
        c.amqp.amqp_exchange = exchange.clone();
        c.amqp.points_queue = queue.clone();
    })
    .await;
    let pool = MySqlPool::connect(&target.database_url).await.unwrap();
    let sale = app.create_sale(SaleSpec::default()).await;
    let (s, o) = app.reserve(&sale, 1, None).await;
    assert_eq!(s, 201, "{o}");
    let id = o["order_id"].as_str().unwrap();
    let (s, _) = app
        .pay(id, "pay-1", o["amount_cents"].as_i64().unwrap())
        .await;
    assert_eq!(s, 200);
    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200, "{:?}", ready.text().await);
    // The events are in the outbox, unsent, and the relay says why.
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let unsent = scalar(&pool, "SELECT COUNT(*) FROM outbox WHERE sent_at IS NULL").await;
        let m = app.metrics().await;
        let failures = m
            .lines()
            .find_map(|l| l.strip_prefix("flashsale_relay_failures_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        if unsent >= 2 && failures >= 1.0 {
            break;
        }
        assert!(
            Instant::now() < until,
            "{unsent} unsent, {failures} relay failures"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        app.metrics()
            .await
            .contains("flashsale_role_up{role=\"relay\"} 1"),
        "the relay role keeps running (and retrying)"
    );
    // A relay that can reach the broker publishes what waited.
    let relay = ServeProcess::start(
        &target,
        "relay",
        &[
            ("FLASHSALE_AMQP_URL", AMQP_URL),
            ("FLASHSALE_AMQP_EXCHANGE", exchange.as_str()),
            ("FLASHSALE_POINTS_QUEUE", queue.as_str()),
        ],
    );
    let until = Instant::now() + Duration::from_secs(20);
    while scalar(&pool, "SELECT COUNT(*) FROM outbox WHERE sent_at IS NULL").await > 0 {
        assert!(Instant::now() < until, "the waiting events never left");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(relay);
    pool.close().await;
    app.finish().await;
    remove_broker_objects(&exchange, &[&queue, &format!("{queue}.dead")]).await;
}

/// Payments published before the points consumer ever ran are not lost:
/// the relay declares the consumer's queue (API.md names it) before it
/// publishes, so the queue keeps them until the consumer comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn points_earned_before_the_consumer_first_runs_wait_in_its_queue() {
    let exchange = unique("fstest_ex");
    let queue = unique("fstest_points");
    let target = Target::fresh();
    let app = spawn_with(target.clone(), |c| {
        c.roles = vec![Role::Http, Role::Reconciler, Role::Relay];
        c.amqp.amqp_url = Some(SecretString::from(AMQP_URL));
        c.amqp.amqp_exchange = exchange.clone();
        c.amqp.points_queue = queue.clone();
    })
    .await;
    let pool = MySqlPool::connect(&target.database_url).await.unwrap();
    let sale = app.create_sale(SaleSpec::default()).await;
    for user in 1..=5 {
        let (s, o) = app.reserve(&sale, user, None).await;
        assert_eq!(s, 201, "{o}");
        let (s, _) = app
            .pay(
                o["order_id"].as_str().unwrap(),
                &format!("pay-{user}"),
                o["amount_cents"].as_i64().unwrap(),
            )
            .await;
        assert_eq!(s, 200);
    }
    let until = Instant::now() + Duration::from_secs(20);
    while scalar(
        &pool,
        "SELECT COUNT(*) FROM outbox WHERE event_type = 'order.paid' AND sent_at IS NOT NULL",
    )
    .await
        < 5
    {
        assert!(Instant::now() < until, "the payments were never published");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Only now does a points consumer start.
    let mut cfg = target.config().amqp;
    cfg.amqp_url = Some(SecretString::from(AMQP_URL));
    cfg.amqp_exchange = exchange.clone();
    cfg.points_queue = queue.clone();
    let stop = tokio_util::sync::CancellationToken::new();
    let consumer = tokio::spawn(
        flashsale::points::PointsConsumer::new(
            pool.clone(),
            cfg,
            std::sync::Arc::new(flashsale::telemetry::Metrics::default()),
        )
        .run(stop.clone()),
    );
    let until = Instant::now() + Duration::from_secs(20);
    while scalar(&pool, "SELECT COUNT(*) FROM points_entries").await < 5 {
        assert!(
            Instant::now() < until,
            "the waiting payments never earned points"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    let _ = consumer.await;
    pool.close().await;
    app.finish().await;
    remove_broker_objects(&exchange, &[&queue, &format!("{queue}.dead")]).await;
}
