//! The loyalty-points consumer against the real RabbitMQ and MariaDB: each
//! test has its own exchange, queue and dead-letter queue (deleted at the
//! end) and its own database, and publishes the events itself.

use std::collections::BTreeMap;
use std::future::Future;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use flashsale::config::AmqpConfig;
use flashsale::events::{order_event_id, Event, EventType, SCHEMA_VERSION};
use flashsale::points::ledger::{self, Outcome};
use flashsale::points::PointsConsumer;
use flashsale::telemetry::{Metrics, OutcomeLabels};
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, PublisherConfirm};
use secrecy::SecretString;
use serde_json::Value;
use sqlx::MySqlPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::helpers::*;

const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The test's own exchange and queues on the shared broker, and a
/// connection of the test's own to publish and look.
struct Broker {
    cfg: AmqpConfig,
    conn: Connection,
    ch: Channel,
    deleted: bool,
}

impl Broker {
    /// Declares a fresh exchange, points queue and dead-letter queue, so
    /// that what the test publishes before a consumer starts is kept.
    async fn fresh() -> Self {
        let mut cfg = Target::fresh_on(SHARED_REDIS).config().amqp;
        cfg.amqp_url = Some(SecretString::from(AMQP_URL));
        cfg.amqp_exchange = unique("fstest_points_x");
        cfg.points_queue = unique("fstest_points");
        let conn = flashsale::amqp::connect(AMQP_URL, "fstest points publisher")
            .await
            .expect("RabbitMQ at 127.0.0.1:5672");
        let ch = conn.create_channel().await.unwrap();
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        flashsale::amqp::declare_points_queue(&ch, &cfg)
            .await
            .unwrap();
        Self {
            cfg,
            conn,
            ch,
            deleted: false,
        }
    }

    /// The environment of a `flashsale` child on this broker.
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("FLASHSALE_AMQP_URL", AMQP_URL.to_owned()),
            ("FLASHSALE_AMQP_EXCHANGE", self.cfg.amqp_exchange.clone()),
            ("FLASHSALE_POINTS_QUEUE", self.cfg.points_queue.clone()),
        ]
    }

    /// Publishes `body` persistent to the test's exchange; returns once the
    /// broker confirmed it.
    async fn publish(&self, routing_key: &str, body: &[u8]) {
        self.publish_to(&self.cfg.amqp_exchange, routing_key, body)
            .await;
    }

    async fn publish_to(&self, exchange: &str, routing_key: &str, body: &[u8]) {
        let confirm = self.publish_unconfirmed(exchange, routing_key, body).await;
        confirmed(vec![confirm]).await;
    }

    /// Publishes; the broker's confirm is the future returned.
    async fn publish_unconfirmed(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
    ) -> PublisherConfirm {
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into());
        self.ch
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                props,
            )
            .await
            .unwrap()
    }

    async fn publish_event(&self, e: &Event) {
        self.publish(e.kind.as_str(), e.to_json().as_bytes()).await;
    }

    /// Messages ready in `queue` (not counting those delivered and unacked).
    async fn ready(&self, queue: &str) -> u32 {
        queue_depth(&self.ch, queue)
            .await
            .expect("the queue exists")
    }

    /// Deletes the queues and the exchange (what `Drop` does too).
    async fn delete(mut self) {
        delete_objects(&self.ch, &self.cfg).await.unwrap();
        self.deleted = true;
        let _ = self.conn.close(200, "done".into()).await;
    }
}

async fn delete_objects(ch: &Channel, cfg: &AmqpConfig) -> lapin::Result<()> {
    for q in [cfg.points_queue.clone(), cfg.points_dead_queue()] {
        ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await?;
    }
    ch.exchange_delete(
        cfg.amqp_exchange.as_str().into(),
        ExchangeDeleteOptions::default(),
    )
    .await
}

/// A test that failed still deletes its broker objects, from a runtime of
/// its own (the test's may be gone).
impl Drop for Broker {
    fn drop(&mut self) {
        if self.deleted {
            return;
        }
        let cfg = self.cfg.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let conn = flashsale::amqp::connect(AMQP_URL, "fstest points cleanup").await?;
                let ch = conn.create_channel().await?;
                delete_objects(&ch, &cfg).await?;
                conn.close(200, "done".into()).await
            })
        })
        .join();
    }
}

/// Waits for the broker's confirms; each must be an ack of a routed message.
async fn confirmed(pending: Vec<PublisherConfirm>) {
    for c in futures::future::join_all(pending).await {
        let c = c.unwrap();
        assert!(c.is_ack(), "{c:?}");
        assert!(c.take_message().is_none(), "returned unroutable");
    }
}

/// An `order.paid` or `order.refunded` event of `order` for `user`.
fn order_event(kind: EventType, order: &str, user: u64, amount_cents: i64) -> Event {
    order_event_at(kind, order, user, amount_cents, Utc::now())
}

fn order_event_at(
    kind: EventType,
    order: &str,
    user: u64,
    amount_cents: i64,
    at: DateTime<Utc>,
) -> Event {
    Event {
        event_id: order_event_id(kind, order),
        kind,
        schema_version: SCHEMA_VERSION,
        occurred_at: at,
        sale_id: order.split('-').next().unwrap().to_owned(),
        order_id: Some(order.to_owned()),
        user_id: Some(user.to_string()),
        qty: Some(1),
        amount_cents: Some(amount_cents),
        payment_id: Some(format!("pay_{order}")),
        status: Some(
            if kind == EventType::OrderPaid {
                "paid"
            } else {
                "refunded"
            }
            .into(),
        ),
        restocked: (kind == EventType::OrderRefunded).then_some(false),
    }
}

/// The consumer in this process, with metrics the test reads.
struct InProcess {
    metrics: Arc<Metrics>,
    stop: CancellationToken,
    handle: Option<JoinHandle<()>>,
}

impl InProcess {
    fn start(db: &MySqlPool, cfg: &AmqpConfig) -> Self {
        if std::env::var_os("RUST_LOG").is_some() {
            flashsale::telemetry::init_logging();
        }
        let metrics = Arc::new(Metrics::default());
        let stop = CancellationToken::new();
        let handle = tokio::spawn(
            PointsConsumer::new(db.clone(), cfg.clone(), metrics.clone()).run(stop.clone()),
        );
        Self {
            metrics,
            stop,
            handle: Some(handle),
        }
    }

    fn consumed(&self, outcome: &'static str) -> u64 {
        self.metrics
            .events
            .points_consumed
            .get_or_create(&OutcomeLabels { outcome })
            .get()
    }

    /// Sum (seconds) and count of the observed points lag (event time to
    /// commit).
    fn lag_totals(&self) -> (f64, u64) {
        let text = self.metrics.render();
        let find = |suffix: &str| {
            text.lines()
                .find(|l| l.contains(&format!("points_lag_seconds_{suffix} ")))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        (find("sum"), find("count") as u64)
    }

    fn dead_lettered(&self) -> u64 {
        self.metrics.events.points_dead_lettered.get()
    }

    async fn stop(mut self) {
        self.stop.cancel();
        let handle = self.handle.take().unwrap();
        tokio::time::timeout(Duration::from_secs(10), handle)
            .await
            .expect("the consumer stops within 10 s")
            .unwrap();
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A `flashsale points` child process on the test's database and broker,
/// its operations routes on `ops_port`.
fn points_process_on(target: &Target, broker: &Broker, ops_port: u16) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_flashsale"))
        .arg("points")
        .env("DATABASE_URL", &target.database_url)
        .env("FLASHSALE_METRICS_LISTEN", format!("127.0.0.1:{ops_port}"))
        .envs(broker.env())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("the flashsale binary starts")
}

/// [`points_process_on`] a free port.
fn points_process(target: &Target, broker: &Broker) -> std::process::Child {
    points_process_on(target, broker, free_port())
}

/// Polls `check` every 20 ms until it holds; panics after `within`.
async fn wait_for<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let until = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < until, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn entry_count(db: &MySqlPool) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM points_entries")
        .fetch_one(db)
        .await
        .unwrap()
}

async fn balances(db: &MySqlPool) -> BTreeMap<u64, i64> {
    sqlx::query_as::<_, (u64, i64)>("SELECT user_id, balance FROM points_balances")
        .fetch_all(db)
        .await
        .unwrap()
        .into_iter()
        .filter(|(_, b)| *b != 0)
        .collect()
}

/// Each buyer's sum of entries, which must be their balance.
async fn entry_sums(db: &MySqlPool) -> BTreeMap<u64, i64> {
    sqlx::query_as::<_, (u64, i64)>(
        "SELECT user_id, CAST(SUM(points) AS SIGNED) FROM points_entries GROUP BY user_id",
    )
    .fetch_all(db)
    .await
    .unwrap()
    .into_iter()
    .filter(|(_, b)| *b != 0)
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paid_and_refunded_events_move_balances_once_each_however_often_delivered() {
    let started = Instant::now();
    let target = Target::fresh();
    let db = flashsale::db::connect(&target.database_url).await.unwrap();
    let broker = Broker::fresh().await;
    let consumer = InProcess::start(&db, &broker.cfg);

    // Buyers 1..=4, three orders each at different prices; the second order
    // of every even buyer refunded.
    let mut events = Vec::new();
    let mut want: BTreeMap<u64, i64> = BTreeMap::new();
    for user in 1..=4u64 {
        for n in 1..=3u64 {
            let order = format!("9-{}", user * 10 + n);
            let amount = 1999 + 10_000 * n as i64 + 37 * user as i64;
            events.push(order_event(EventType::OrderPaid, &order, user, amount));
            *want.entry(user).or_default() += amount / 100;
            if user % 2 == 0 && n == 2 {
                events.push(order_event(EventType::OrderRefunded, &order, user, amount));
                *want.entry(user).or_default() -= amount / 100;
            }
        }
    }
    // Each event three times: twice in a row, then all again.
    for e in &events {
        broker.publish_event(e).await;
        broker.publish_event(e).await;
    }
    for e in &events {
        broker.publish_event(e).await;
    }
    // A known type that carries no points, straight into the queue.
    let sold_out = Event {
        event_id: flashsale::events::event_id("sale.sold_out/9"),
        kind: EventType::SaleSoldOut,
        schema_version: SCHEMA_VERSION,
        occurred_at: Utc::now(),
        sale_id: "9".into(),
        order_id: None,
        user_id: None,
        qty: None,
        amount_cents: None,
        payment_id: None,
        status: None,
        restocked: None,
    };
    broker
        .publish_to("", &broker.cfg.points_queue, sold_out.to_json().as_bytes())
        .await;

    let n = events.len() as u64;
    wait_for(
        "every delivery settled",
        Duration::from_secs(20),
        || async {
            consumer.consumed("applied")
                + consumer.consumed("duplicate")
                + consumer.consumed("ignored")
                == 3 * n + 1
        },
    )
    .await;
    assert_eq!(consumer.consumed("applied"), n);
    assert_eq!(consumer.consumed("duplicate"), 2 * n);
    assert_eq!(consumer.consumed("ignored"), 1);
    assert_eq!(consumer.dead_lettered(), 0);
    assert_eq!(entry_count(&db).await, n as i64);
    assert_eq!(balances(&db).await, want);
    assert_eq!(entry_sums(&db).await, want);
    // Entries as the events said.
    let refund = &events[events.len() - 2]; // buyer 4's refund
    let (points, reason, order): (i64, String, String) =
        sqlx::query_as("SELECT points, reason, order_id FROM points_entries WHERE event_id = ?")
            .bind(&refund.event_id)
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(reason, "order.refunded");
    assert_eq!(order, refund.order_id.clone().unwrap());
    assert_eq!(points, -(refund.amount_cents.unwrap() / 100));
    assert_eq!(broker.ready(&broker.cfg.points_queue).await, 0);
    assert_eq!(broker.ready(&broker.cfg.points_dead_queue()).await, 0);
    let (_, observed) = consumer.lag_totals();
    assert_eq!(observed, n, "one lag per applied event");
    // The lag of an idle consumer: one event at a time, stamped as it is
    // published.
    let (sum0, count0) = consumer.lag_totals();
    for k in 1..=20u64 {
        let e = order_event(EventType::OrderPaid, &format!("9-{}", 1000 + k), 5, 100);
        broker.publish_event(&e).await;
        wait_for("applied", Duration::from_secs(5), || async {
            consumer.consumed("applied") == n + k
        })
        .await;
    }
    let (sum1, count1) = consumer.lag_totals();
    assert_eq!(count1 - count0, 20);
    eprintln!(
        "points lag, publish to commit, idle consumer: mean {:.2} ms over 20 events",
        (sum1 - sum0) / 20.0 * 1000.0
    );

    consumer.stop().await;
    // Stopped with nothing unacked: the queue is still empty.
    assert_eq!(broker.ready(&broker.cfg.points_queue).await, 0);
    broker.delete().await;
    target.cleanup().await;
    eprintln!("took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_the_commit_before_the_ack_gets_a_redelivery_that_changes_nothing() {
    let target = Target::fresh();
    let db = flashsale::db::connect(&target.database_url).await.unwrap();
    let broker = Broker::fresh().await;
    let paid = order_event(EventType::OrderPaid, "5-1", 7, 99_900);
    broker.publish_event(&paid).await;

    // A consumer of the test's own takes the message, applies it, and dies
    // (closes its connection) without acking.
    {
        let conn = flashsale::amqp::connect(AMQP_URL, "fstest crashing consumer")
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        let msg = ch
            .basic_get(
                broker.cfg.points_queue.as_str().into(),
                BasicGetOptions { no_ack: false },
            )
            .await
            .unwrap()
            .expect("the message waits");
        let event = Event::parse(&msg.delivery.data).unwrap();
        assert_eq!(event, paid);
        assert_eq!(
            ledger::apply(&db, &event).await.unwrap(),
            Outcome::Applied {
                user: "7".parse().unwrap(),
                points: 999
            }
        );
        conn.close(200, "gone without acking".into()).await.unwrap();
    }
    let once = BTreeMap::from([(7, 999)]);
    assert_eq!(balances(&db).await, once);
    wait_for(
        "the message back in the queue",
        Duration::from_secs(5),
        || async { broker.ready(&broker.cfg.points_queue).await == 1 },
    )
    .await;

    // The real consumer, as its own process, gets the redelivery.
    let port = free_port();
    let mut child = ServeProcess::adopt(points_process_on(&target, &broker, port));
    wait_for("the redelivery taken", Duration::from_secs(20), || async {
        broker.ready(&broker.cfg.points_queue).await == 0
    })
    .await;
    // It says so on its own /metrics (a process without the API serves the
    // operations routes on FLASHSALE_METRICS_LISTEN).
    let ops = |path: &str| format!("http://127.0.0.1:{port}{path}");
    let http = reqwest::Client::new();
    let ready = http.get(ops("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    // The queue shows the message taken as soon as it is delivered; the
    // consumer counts it once it has looked it up in MySQL.
    let scrape = || async {
        http.get(ops("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    wait_for("the duplicate counted", Duration::from_secs(20), || async {
        scrape()
            .await
            .contains("flashsale_points_events_total{outcome=\"duplicate\"} 1")
    })
    .await;
    // SIGTERM: a clean stop. Had it kept the message unacked, closing its
    // connection would put it back.
    assert!(child_term(&mut child), "a clean exit on SIGTERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(broker.ready(&broker.cfg.points_queue).await, 0);
    assert_eq!(broker.ready(&broker.cfg.points_dead_queue()).await, 0);
    assert_eq!(balances(&db).await, once);
    assert_eq!(entry_count(&db).await, 1);
    drop(child);
    broker.delete().await;
    target.cleanup().await;
}

/// Sends SIGTERM to a child the test started and waits for it (up to 10 s);
/// returns whether it exited with 0.
fn child_term(child: &mut ServeProcess) -> bool {
    child.terminate(Duration::from_secs(10))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_killed_mid_stream_and_restarted_applies_every_event_exactly_once() {
    let started = Instant::now();
    let target = Target::fresh();
    let db = flashsale::db::connect(&target.database_url).await.unwrap();
    let broker = Broker::fresh().await;
    // 2,000 events: 1,600 payments by 40 buyers, 400 of them refunded.
    let mut want: BTreeMap<u64, i64> = BTreeMap::new();
    let mut events = Vec::new();
    for n in 1..=1600u64 {
        let user = n % 40 + 1;
        let order = format!("3-{n}");
        let amount = 500 + (n as i64 % 97) * 100 + 99;
        events.push(order_event(EventType::OrderPaid, &order, user, amount));
        *want.entry(user).or_default() += amount / 100;
        if n % 4 == 0 {
            events.push(order_event(EventType::OrderRefunded, &order, user, amount));
            *want.entry(user).or_default() -= amount / 100;
        }
    }
    assert_eq!(events.len(), 2000);
    let mut pending = Vec::with_capacity(events.len());
    for e in &events {
        let body = e.to_json();
        let c = broker
            .publish_unconfirmed(&broker.cfg.amqp_exchange, e.kind.as_str(), body.as_bytes())
            .await;
        pending.push(c);
    }
    confirmed(pending).await;
    assert_eq!(broker.ready(&broker.cfg.points_queue).await, 2000);

    // SIGKILL the consumer three times while it works (as `serve --roles
    // points` the first time, as `flashsale points` after), and restart it.
    let mut kills_mid_stream = 0;
    let env_owned = broker.env();
    let env: Vec<(&str, &str)> = env_owned.iter().map(|(k, v)| (*k, v.as_str())).collect();
    for (round, threshold) in [200i64, 700, 1200].into_iter().enumerate() {
        let mut child = if round == 0 {
            ServeProcess::start(&target, "points", &env)
        } else {
            ServeProcess::adopt(points_process(&target, &broker))
        };
        wait_for(
            "progress before the kill",
            Duration::from_secs(30),
            || async { entry_count(&db).await >= threshold },
        )
        .await;
        child.kill();
        let at = entry_count(&db).await;
        if at < 2000 {
            kills_mid_stream += 1;
        }
        eprintln!("killed at {at} entries");
    }
    let mut child = ServeProcess::adopt(points_process(&target, &broker));
    wait_for("every event applied", Duration::from_secs(40), || async {
        entry_count(&db).await == 2000
    })
    .await;
    wait_for(
        "the queue drained and acked",
        Duration::from_secs(10),
        || async { broker.ready(&broker.cfg.points_queue).await == 0 },
    )
    .await;
    assert!(child_term(&mut child), "a clean exit on SIGTERM");
    assert!(kills_mid_stream >= 1, "no kill landed mid-stream");
    want.retain(|_, b| *b != 0);
    assert_eq!(balances(&db).await, want);
    assert_eq!(entry_sums(&db).await, want);
    let distinct: i64 = sqlx::query_scalar("SELECT COUNT(DISTINCT event_id) FROM points_entries")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(distinct, 2000);
    assert_eq!(broker.ready(&broker.cfg.points_queue).await, 0);
    assert_eq!(broker.ready(&broker.cfg.points_dead_queue()).await, 0);
    broker.delete().await;
    target.cleanup().await;
    eprintln!("took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_messages_go_to_the_dead_letter_queue_once_and_the_rest_flows() {
    let target = Target::fresh();
    let db = flashsale::db::connect(&target.database_url).await.unwrap();
    let broker = Broker::fresh().await;
    let good = |n: u64| order_event(EventType::OrderPaid, &format!("4-{n}"), 11, 100 * n as i64);
    broker.publish_event(&good(1)).await;
    let bad_json = b"{not json".to_vec();
    let v2 = good(2)
        .to_json()
        .replace(r#""schema_version":1"#, r#""schema_version":2"#)
        .into_bytes();
    let mut no_user = good(3);
    no_user.user_id = None;
    let no_user = no_user.to_json().into_bytes();
    let unknown_type = good(4)
        .to_json()
        .replace(r#""type":"order.paid""#, r#""type":"order.exploded""#)
        .into_bytes();
    let mut dead = vec![bad_json, v2, no_user, unknown_type];
    for body in &dead {
        broker.publish("order.paid", body).await;
    }
    broker.publish_event(&good(5)).await;
    broker.publish_event(&good(6)).await;
    // 101 payments of the largest amount: the points of the 101st overflow
    // buyer 12's balance (BIGINT), and MySQL refuses it as such whatever
    // batch it is in. The other events of its batch are applied on their
    // own, and it goes to the dead letters instead of blocking the queue.
    let huge = |n: u64| order_event(EventType::OrderPaid, &format!("4-{n}"), 12, i64::MAX);
    let huge: Vec<Event> = (100..=200).map(huge).collect();
    for e in &huge {
        broker.publish_event(e).await;
    }
    broker.publish_event(&good(9)).await;
    dead.push(huge[100].to_json().into_bytes());

    let consumer = InProcess::start(&db, &broker.cfg);
    wait_for(
        "the good events applied",
        Duration::from_secs(20),
        || async { consumer.consumed("applied") == 104 },
    )
    .await;
    wait_for(
        "the bad ones dead-lettered",
        Duration::from_secs(10),
        || async { broker.ready(&broker.cfg.points_dead_queue()).await == 5 },
    )
    .await;
    // Given time, nothing comes back to the consumer.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(consumer.dead_lettered(), 5);
    assert_eq!(consumer.consumed("applied"), 104);
    assert_eq!(consumer.consumed("duplicate"), 0);
    assert_eq!(broker.ready(&broker.cfg.points_queue).await, 0);
    assert_eq!(
        balances(&db).await,
        BTreeMap::from([(11, 1 + 5 + 6 + 9), (12, 100 * (i64::MAX / 100))])
    );

    // The dead-letter queue holds them as published, in order, with the
    // broker's account of why.
    for body in &dead {
        let msg = broker
            .ch
            .basic_get(
                broker.cfg.points_dead_queue().as_str().into(),
                BasicGetOptions { no_ack: true },
            )
            .await
            .unwrap()
            .expect("a dead letter");
        assert_eq!(&msg.delivery.data, body);
        let headers = msg.delivery.properties.headers().clone().unwrap();
        assert_eq!(death_reason(&headers).as_deref(), Some("rejected"));
    }
    consumer.stop().await;
    broker.delete().await;
    target.cleanup().await;
}

/// The reason of the broker's first `x-death` record in `headers`.
fn death_reason(headers: &FieldTable) -> Option<String> {
    let find = |t: &FieldTable, key: &str| {
        t.inner()
            .iter()
            .find(|(k, _)| k.as_str() == key)
            .map(|(_, v)| v.clone())
    };
    let AMQPValue::FieldArray(deaths) = find(headers, "x-death")? else {
        return None;
    };
    let AMQPValue::FieldTable(first) = deaths.as_slice().first()? else {
        return None;
    };
    match find(first, "reason")? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buyer_reads_their_balance_and_newest_entries() {
    let target = Target::fresh();
    let app = spawn_on(target).await;
    let db = flashsale::db::connect(&app.target.database_url)
        .await
        .unwrap();
    // 60 payments of buyer 7 a second apart, the last one refunded later.
    let t0 = DateTime::from_timestamp_millis(1_795_000_000_123).unwrap();
    let mut balance = 0;
    for n in 1..=60i64 {
        let e = order_event_at(
            EventType::OrderPaid,
            &format!("8-{n}"),
            7,
            1000 + n,
            t0 + chrono::Duration::seconds(n),
        );
        ledger::apply(&db, &e).await.unwrap();
        balance += 10;
    }
    let refund = order_event_at(
        EventType::OrderRefunded,
        "8-60",
        7,
        1060,
        t0 + chrono::Duration::seconds(90),
    );
    ledger::apply(&db, &refund).await.unwrap();
    balance -= 10;
    // Another buyer's entry stays theirs.
    ledger::apply(&db, &order_event(EventType::OrderPaid, "8-99", 8, 5000))
        .await
        .unwrap();

    let get = |token: Option<String>| {
        let mut req = app.client.get(app.url("/api/v1/users/me/points"));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send()
    };
    let res = get(Some(buyer_token(7))).await.unwrap();
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["user_id"], "7");
    assert_eq!(body["balance"], balance);
    let entries = body["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 50);
    assert_eq!(
        entries[0],
        serde_json::json!({
            "event_id": refund.event_id,
            "order_id": "8-60",
            "points": -10,
            "reason": "order.refunded",
            "at": "2026-11-18T11:08:10.123Z",
        })
    );
    assert_eq!(entries[1]["order_id"], "8-60");
    assert_eq!(entries[1]["reason"], "order.paid");
    assert_eq!(entries[1]["at"], "2026-11-18T11:07:40.123Z");
    // Newest first, down to the 50th newest (payment 12).
    let orders: Vec<&str> = entries
        .iter()
        .map(|e| e["order_id"].as_str().unwrap())
        .collect();
    let want: Vec<String> = std::iter::once(60)
        .chain((12..=60).rev())
        .map(|n| format!("8-{n}"))
        .collect();
    assert_eq!(orders, want);
    for e in entries {
        let keys: Vec<&String> = e.as_object().unwrap().keys().collect();
        assert_eq!(keys.len(), 5, "{e}");
    }

    let other: Value = get(Some(buyer_token(8)))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(other["balance"], 50);
    assert_eq!(other["entries"].as_array().unwrap().len(), 1);
    let nobody: Value = get(Some(buyer_token(9)))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        nobody,
        serde_json::json!({"user_id": "9", "balance": 0, "entries": []})
    );
    let res = get(None).await.unwrap();
    assert_eq!(res.status(), 401);
    let err: Value = res.json().await.unwrap();
    assert_eq!(code(&err), "unauthorized");
    let res = get(Some(ADMIN_TOKEN.to_owned())).await.unwrap();
    assert_eq!(res.status(), 401);

    let spec: Value = app
        .client
        .get(app.url("/api/v1/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let op = &spec["paths"]["/api/v1/users/me/points"]["get"];
    for status in ["200", "401", "503"] {
        assert!(op["responses"][status].is_object(), "{status}");
    }
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_points_command_refuses_to_start_without_a_broker() {
    let out = Command::new(env!("CARGO_BIN_EXE_flashsale"))
        .arg("points")
        .env_remove("FLASHSALE_AMQP_URL")
        .env("DATABASE_URL", "mysql://root@127.0.0.1:1/never_used")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("FLASHSALE_AMQP_URL"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_mysql_is_down_events_wait_unacked_and_the_endpoint_answers_503() {
    let started = Instant::now();
    let mut mysql = OwnMariaDb::start().await;
    let mut target = Target::fresh();
    target.database_url = mysql.url(&unique("fstest"));
    let app = spawn_on(target.clone()).await;
    let db = flashsale::db::connect(&target.database_url).await.unwrap();
    let broker = Broker::fresh().await;
    let consumer = InProcess::start(&db, &broker.cfg);
    let paid = |n: u64| order_event(EventType::OrderPaid, &format!("6-{n}"), 5, 250);
    for n in 1..=50 {
        broker.publish_event(&paid(n)).await;
    }
    wait_for(
        "the first events applied",
        Duration::from_secs(20),
        || async { consumer.consumed("applied") == 50 },
    )
    .await;
    let points = || {
        app.client
            .get(app.url("/api/v1/users/me/points"))
            .bearer_auth(buyer_token(5))
            .send()
    };
    let body: Value = points().await.unwrap().json().await.unwrap();
    assert_eq!(body["balance"], 100);

    mysql.kill();
    for n in 51..=100 {
        broker.publish_event(&paid(n)).await;
    }
    let res = points().await.unwrap();
    assert_eq!(res.status(), 503);
    assert!(res.headers().contains_key("retry-after"));
    let err: Value = res.json().await.unwrap();
    assert_eq!(code(&err), "unavailable");
    // Nothing is dead-lettered or lost while MySQL is away: the deliveries
    // wait unacked.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(consumer.dead_lettered(), 0);
    assert_eq!(consumer.consumed("applied"), 50);

    mysql.restart().await;
    wait_for(
        "every event applied after MySQL came back",
        Duration::from_secs(40),
        || async { entry_count(&db).await == 100 },
    )
    .await;
    wait_for("every delivery acked", Duration::from_secs(10), || async {
        consumer.consumed("applied") + consumer.consumed("duplicate") == 100
            && broker.ready(&broker.cfg.points_queue).await == 0
    })
    .await;
    assert_eq!(balances(&db).await, BTreeMap::from([(5, 200)]));
    assert_eq!(consumer.dead_lettered(), 0);
    let body: Value = points().await.unwrap().json().await.unwrap();
    assert_eq!(body["balance"], 200);
    assert_eq!(body["entries"].as_array().unwrap().len(), 50);

    consumer.stop().await;
    broker.delete().await;
    app.finish().await;
    eprintln!("took {:?}", started.elapsed());
}

/// The broker's ids of the connections named for process `pid`'s points
/// consumer (`rabbitmqctl list_connections`).
fn points_connections(pid: u32) -> Vec<String> {
    let out = Command::new("rabbitmqctl")
        .args([
            "list_connections",
            "pid",
            "client_properties",
            "--no-table-headers",
            "-q",
        ])
        .output()
        .expect("rabbitmqctl is installed");
    let name = "flashsale points ";
    let tag = format!("pid {pid}");
    let names_pid = |l: &str| {
        l.match_indices(&tag)
            .any(|(i, _)| !l[i + tag.len()..].starts_with(|c: char| c.is_ascii_digit()))
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(name) && names_pid(l))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_whose_connection_the_broker_closes_reconnects_and_applies_everything_once() {
    let started = Instant::now();
    let target = Target::fresh();
    let db = flashsale::db::connect(&target.database_url).await.unwrap();
    let broker = Broker::fresh().await;
    let child = points_process(&target, &broker);
    let pid = child.id();
    let mut child = ServeProcess::adopt(child);
    let paid = |n: u64| order_event(EventType::OrderPaid, &format!("7-{n}"), n % 3 + 1, 300);
    let mut pending = Vec::new();
    for n in 1..=300 {
        let e = paid(n);
        let body = e.to_json();
        pending.push(
            broker
                .publish_unconfirmed(&broker.cfg.amqp_exchange, e.kind.as_str(), body.as_bytes())
                .await,
        );
    }
    confirmed(pending).await;
    let mut conns = Vec::new();
    wait_for(
        "the consumer's connection listed",
        Duration::from_secs(20),
        || {
            conns = points_connections(pid);
            std::future::ready(!conns.is_empty())
        },
    )
    .await;
    for c in &conns {
        let ok = Command::new("rabbitmqctl")
            .args(["close_connection", c, "fstest: forced close"])
            .output()
            .unwrap()
            .status
            .success();
        assert!(ok, "close_connection {c}");
    }
    for n in 301..=600 {
        broker.publish_event(&paid(n)).await;
    }
    wait_for("every event applied", Duration::from_secs(40), || async {
        entry_count(&db).await == 600
    })
    .await;
    wait_for("the queue drained", Duration::from_secs(10), || async {
        broker.ready(&broker.cfg.points_queue).await == 0
    })
    .await;
    // A new connection of the same process.
    let now = points_connections(pid);
    assert_eq!(now.len(), 1, "{now:?}");
    assert_ne!(now, conns);
    assert!(
        child.terminate(Duration::from_secs(10)),
        "a clean exit on SIGTERM"
    );
    assert_eq!(
        balances(&db).await,
        BTreeMap::from([(1, 600), (2, 600), (3, 600)])
    );
    assert_eq!(broker.ready(&broker.cfg.points_queue).await, 0);
    broker.delete().await;
    target.cleanup().await;
    eprintln!("took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_role_points_consumes_and_reports_its_metrics() {
    let target = Target::fresh();
    let db = flashsale::db::connect(&target.database_url).await.unwrap();
    let broker = Broker::fresh().await;
    for n in 1..=10u64 {
        let e = order_event(EventType::OrderPaid, &format!("2-{n}"), 3, 1_000);
        broker.publish_event(&e).await;
    }
    broker.publish("order.refunded", b"[]").await;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut env = broker.env();
    env.push(("FLASHSALE_LISTEN", listen.clone()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut child = ServeProcess::start(&target, "points", &env);
    let client = reqwest::Client::new();
    let metrics = || async {
        match client.get(format!("http://{listen}/metrics")).send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    };
    let want = [
        "flashsale_points_events_total{outcome=\"applied\"} 10",
        "flashsale_points_dead_lettered_total 1",
        "flashsale_points_lag_seconds_count 10",
        "flashsale_points_queue_depth 0",
    ];
    let until = Instant::now() + Duration::from_secs(30);
    let last = loop {
        let page = metrics().await;
        if want.iter().all(|w| page.contains(w)) {
            break page;
        }
        assert!(Instant::now() < until, "{want:?} not all in:\n{page}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        last.contains("flashsale_role_up{role=\"points\"} 1"),
        "{last}"
    );
    assert_eq!(balances(&db).await, BTreeMap::from([(3, 100)]));
    assert!(
        child.terminate(Duration::from_secs(10)),
        "a clean exit on SIGTERM"
    );
    assert_eq!(broker.ready(&broker.cfg.points_queue).await, 0);
    assert_eq!(broker.ready(&broker.cfg.points_dead_queue()).await, 1);
    broker.delete().await;
    target.cleanup().await;
}
