//! Downstream events benchmark, on the real Redis, MariaDB and RabbitMQ:
//!
//! 1. the reserve path alone (the engine's reserve calls, 64 concurrent):
//!    the reference;
//! 2. the relay: the outbox rows the reconciler wrote for those orders,
//!    published with publisher confirms, persistent, into one durable queue
//!    bound to everything: events per second, beside the reserve rate and
//!    beside the broker's own rate for the same messages published straight
//!    from this process (no MySQL) with confirms per batch;
//! 3. the lag from a payment in Redis to its points entry in MySQL, through
//!    the reconciler, the outbox, the relay, the broker and the points
//!    consumer, at a steady payment rate (p50, p99, max).
//!
//! Run it with `loadtest/bench.sh events` or `scripts/bench-events.sh`
//! (release build). It uses its own database, key prefix, exchange and
//! queues, and removes them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use flashsale::config::AmqpConfig;
use flashsale::db::{self, SaleRow};
use flashsale::domain::{Qty, SaleId, UserId};
use flashsale::engine::{Engine, EngineOptions, Payment, Reservation, Topology};
use flashsale::points::PointsConsumer;
use flashsale::telemetry::Metrics;
use flashsale::workers::live::LiveSales;
use flashsale::workers::reconciler::{Reconciler, ReconcilerOptions};
use flashsale::workers::relay::Relay;
use futures::stream::{self, StreamExt};
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
struct Args {
    /// Redis to run against.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// MySQL server (the benchmark creates and drops its own database).
    #[arg(long, default_value = "mysql://root@127.0.0.1:3306")]
    mysql: String,
    /// RabbitMQ.
    #[arg(
        long,
        env = "FLASHSALE_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp_url: String,
    /// Orders reserved for the reference, whose events the relay publishes.
    #[arg(long, default_value_t = 50_000)]
    events: u64,
    /// Relay batch (FLASHSALE_RELAY_BATCH).
    #[arg(long, default_value_t = 500)]
    relay_batch: usize,
    /// Payments per second in the lag measurement.
    #[arg(long, default_value_t = 500)]
    rate: u64,
    /// Seconds of payments in the lag measurement.
    #[arg(long, default_value_t = 10)]
    secs: u64,
}

async fn new_sale(pool: &sqlx::MySqlPool, e: &Engine, stock: i64) -> anyhow::Result<SaleId> {
    let now = chrono::Utc::now();
    let row = SaleRow {
        sku: "BENCH".into(),
        title: "bench".into(),
        price_cents: 1999,
        stock,
        per_user_limit: 1,
        payment_window_secs: 3600,
        start_at: now - chrono::Duration::minutes(1),
        end_at: now + chrono::Duration::hours(1),
    };
    Ok(flashsale::sales::create(pool, e, &row).await?.id)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn count(pool: &sqlx::MySqlPool, sql: &str) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(sql).fetch_one(pool).await?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let tag = format!("fsbench_events_{}", std::process::id());
    let db_url = format!("{}/{tag}", args.mysql);
    let pool = db::connect(&db_url).await?;
    let e = Engine::connect(&EngineOptions {
        timeout: Duration::from_secs(10),
        flow_backlog_limit: u64::MAX,
        sold_out_ttl: Duration::ZERO,
        ..EngineOptions::new(Topology::Node(args.redis_url.clone()), &tag)
    })?;
    e.load_scripts().await?;
    let live = Arc::new(LiveSales::default());
    let metrics = Arc::new(Metrics::default());
    let amqp = AmqpConfig {
        amqp_url: Some(SecretString::from(args.amqp_url.clone())),
        amqp_exchange: format!("{tag}.events"),
        points_queue: format!("{tag}.points"),
        relay_batch: args.relay_batch,
        relay_idle_ms: 10,
        outbox_retention_secs: 86_400,
    };
    let conn = flashsale::amqp::connect(&args.amqp_url, "flashsale bench").await?;
    let ch = conn.create_channel().await?;
    flashsale::amqp::declare_exchange(&ch, &amqp.amqp_exchange).await?;
    let all_queue = format!("{tag}.all");
    ch.queue_declare(
        all_queue.as_str().into(),
        lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        Default::default(),
    )
    .await?;
    ch.queue_bind(
        all_queue.as_str().into(),
        amqp.amqp_exchange.as_str().into(),
        "#".into(),
        Default::default(),
        Default::default(),
    )
    .await?;

    // 1. The reference: the reserve path alone.
    let sale = new_sale(&pool, &e, args.events as i64).await?;
    let started = Instant::now();
    stream::iter(1..=args.events)
        .for_each_concurrent(64, |u| {
            let e = &e;
            async move {
                let r = e
                    .reserve(sale, UserId::new(u).unwrap(), Qty::default(), None)
                    .await;
                assert!(matches!(r, Ok(Reservation::Created(_))), "{r:?}");
            }
        })
        .await;
    let reserve_rate = args.events as f64 / started.elapsed().as_secs_f64();

    // 2a. The broker's own limit: the same number of messages of an event's
    //     size, persistent, published in batches of the relay's size with
    //     confirms awaited per batch, into the same queue, without MySQL.
    let body = vec![b'x'; 330];
    let confirm_ch = conn.create_channel().await?;
    confirm_ch
        .confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await?;
    let started = Instant::now();
    let mut sent = 0u64;
    while sent < args.events {
        let mut confirms = Vec::with_capacity(args.relay_batch);
        for _ in 0..args.relay_batch.min((args.events - sent) as usize) {
            confirms.push(
                confirm_ch
                    .basic_publish(
                        amqp.amqp_exchange.as_str().into(),
                        "bench.raw".into(),
                        Default::default(),
                        &body,
                        lapin::BasicProperties::default().with_delivery_mode(2),
                    )
                    .await?,
            );
            sent += 1;
        }
        for c in confirms {
            anyhow::ensure!(c.await?.is_ack(), "the broker refused a message");
        }
    }
    let raw_rate = args.events as f64 / started.elapsed().as_secs_f64();
    ch.queue_purge(all_queue.as_str().into(), Default::default())
        .await?;

    // 2. The reconciler writes their events; the relay publishes them.
    let reconciler = Reconciler::new(
        e.clone(),
        pool.clone(),
        live.clone(),
        metrics.clone(),
        ReconcilerOptions::default(),
    );
    while reconciler.reconcile_sale(sale).await? > 0 {}
    let rows = count(&pool, "SELECT COUNT(*) FROM outbox WHERE sent_at IS NULL").await?;
    let stop = CancellationToken::new();
    let started = Instant::now();
    let relay =
        tokio::spawn(Relay::new(pool.clone(), amqp.clone(), metrics.clone()).run(stop.clone()));
    while count(&pool, "SELECT COUNT(*) FROM outbox WHERE sent_at IS NULL").await? > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let relay_secs = started.elapsed().as_secs_f64();
    let relay_rate = rows as f64 / relay_secs;
    let depth = ch
        .queue_declare(
            all_queue.as_str().into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await?
        .message_count();
    anyhow::ensure!(
        i64::from(depth) >= rows,
        "the queue holds {depth} of {rows} events"
    );
    ch.queue_delete(all_queue.as_str().into(), Default::default())
        .await?;

    // 3. Payment to points: reconciler, relay and consumer running.
    let consumer = tokio::spawn(
        PointsConsumer::new(pool.clone(), amqp.clone(), metrics.clone()).run(stop.clone()),
    );
    // The consumer's queue exists before the first payment's event leaves.
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let probe = conn.create_channel().await?;
        if probe
            .queue_declare(
                amqp.points_queue.as_str().into(),
                passive,
                Default::default(),
            )
            .await
            .is_ok()
        {
            break;
        }
        anyhow::ensure!(Instant::now() < until, "the points queue never appeared");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let n = args.rate * args.secs;
    let sale2 = new_sale(&pool, &e, n as i64).await?;
    live.refresh(&pool).await?;
    let worker = tokio::spawn(
        Reconciler::new(
            e.clone(),
            pool.clone(),
            live.clone(),
            metrics.clone(),
            ReconcilerOptions::default(),
        )
        .run(stop.clone()),
    );
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate as f64));
    let mut buyers = Vec::with_capacity(n as usize);
    for u in 1..=n {
        tick.tick().await;
        let e = e.clone();
        buyers.push(tokio::spawn(async move {
            let r = e
                .reserve(sale2, UserId::new(u).unwrap(), Qty::default(), None)
                .await;
            let Ok(Reservation::Created(o)) = r else {
                panic!("{r:?}")
            };
            let p = e.pay(o.id, &format!("bench-{u}"), o.amount_cents).await;
            assert!(matches!(p, Ok(Payment::Paid(_))), "{p:?}");
        }));
    }
    for b in buyers {
        b.await?;
    }
    let until = Instant::now() + Duration::from_secs(120);
    while count(&pool, "SELECT COUNT(*) FROM points_entries").await? < n as i64 {
        anyhow::ensure!(Instant::now() < until, "points never caught up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut lags: Vec<f64> = sqlx::query_scalar(
        "SELECT CAST(TIMESTAMPDIFF(MICROSECOND, o.paid_at, p.recorded_at) AS DOUBLE) / 1000 \
         FROM points_entries p JOIN orders o ON p.order_id = CONCAT(o.sale_id, '-', o.seq) \
         WHERE p.reason = 'order.paid'",
    )
    .fetch_all(&pool)
    .await?;
    lags.sort_by(f64::total_cmp);
    stop.cancel();
    let _ = tokio::join!(relay, consumer, worker);

    println!("broker_raw_per_sec={raw_rate:.0}");
    println!("relay_events={rows}");
    println!("relay_secs={relay_secs:.2}");
    println!("relay_events_per_sec={relay_rate:.0}");
    println!("reserve_per_sec={reserve_rate:.0}");
    println!("lag_payments={}", lags.len());
    println!("lag_rate={}", args.rate);
    println!("lag_p50_ms={:.1}", percentile(&lags, 0.5));
    println!("lag_p99_ms={:.1}", percentile(&lags, 0.99));
    println!("lag_max_ms={:.1}", lags.last().copied().unwrap_or_default());

    // Clean up.
    let ch = conn.create_channel().await?;
    for q in [amqp.points_queue.clone(), amqp.points_dead_queue()] {
        let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
    }
    let _ = ch
        .exchange_delete(amqp.amqp_exchange.as_str().into(), Default::default())
        .await;
    let _ = conn.close(200, "done".into()).await;
    for s in [sale, sale2] {
        e.drop_sale_keys(s).await?;
    }
    let mut c = e.connection();
    let _: () = redis::AsyncCommands::del(&mut c, e.keys().sales_index()).await?;
    pool.close().await;
    db::drop_database(&db_url).await?;
    Ok(())
}
