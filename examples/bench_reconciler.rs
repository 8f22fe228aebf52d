//! Reconciler benchmark: flow records persisted per second into MySQL,
//! beside the reserve path's own rate measured in the same run (the
//! reconciler keeps up when its ratio is at least 1), and the reconciler's
//! lag while reservations run at full speed.
//!
//! Run it with `scripts/bench-reconciler.sh` (release build, local Redis and
//! MariaDB). It uses its own database and key prefix and removes both.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use flashsale::db::{self, SaleRow};
use flashsale::domain::{Qty, SaleId, UserId};
use flashsale::engine::{Engine, EngineOptions, Reservation, Topology};
use flashsale::telemetry::Metrics;
use flashsale::workers::live::LiveSales;
use flashsale::workers::reconciler::{Reconciler, ReconcilerOptions};
use futures::stream::{self, StreamExt};
use redis::AsyncCommands;
use tokio_util::sync::CancellationToken;

// The service's allocator (src/main.rs): the reconciler and the reserve
// path run in that binary, so both are measured with it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
struct Args {
    /// Redis to run against.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// MySQL server (the benchmark creates and drops its own database).
    #[arg(long, default_value = "mysql://root@127.0.0.1:3306")]
    mysql: String,
    /// Reservations (flow records) for the throughput measurement.
    #[arg(long, default_value_t = 200_000)]
    records: u64,
    /// Concurrent reservations (the reserve path's load).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Seconds of full-speed reservations for the lag measurement.
    #[arg(long, default_value_t = 10)]
    lag_secs: u64,
    /// Most records per transaction (default: the reconciler's default).
    #[arg(long)]
    max_batch: Option<usize>,
}

async fn new_sale(pool: &sqlx::MySqlPool, e: &Engine, stock: i64) -> anyhow::Result<SaleId> {
    let now = chrono::Utc::now();
    let row = SaleRow {
        sku: "BENCH".into(),
        title: "bench".into(),
        price_cents: 100,
        stock,
        per_user_limit: 1,
        payment_window_secs: 3600,
        start_at: now - chrono::Duration::minutes(1),
        end_at: now + chrono::Duration::hours(1),
    };
    Ok(flashsale::sales::create(pool, e, &row).await?.id)
}

/// Reserves for users `from..from + n` at full speed; returns reservations/s.
async fn reserve_all(e: &Engine, sale: SaleId, from: u64, n: u64, concurrency: usize) -> f64 {
    let started = Instant::now();
    stream::iter(from..from + n)
        .for_each_concurrent(concurrency, |u| async move {
            let r = e
                .reserve(sale, UserId::new(u).unwrap(), Qty::default(), None)
                .await;
            assert!(matches!(r, Ok(Reservation::Created(_))), "{r:?}");
        })
        .await;
    n as f64 / started.elapsed().as_secs_f64()
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let tag = format!("fsbench_{}", std::process::id());
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
    let reconciler = || {
        Reconciler::new(
            e.clone(),
            pool.clone(),
            live.clone(),
            Arc::new(Metrics::default()),
            ReconcilerOptions {
                max_batch: args
                    .max_batch
                    .unwrap_or(ReconcilerOptions::default().max_batch),
                ..ReconcilerOptions::default()
            },
        )
    };

    // 1. The reserve path alone, then the reconciler draining what it wrote.
    let sale = new_sale(&pool, &e, args.records as i64).await?;
    let reserve_rate = reserve_all(&e, sale, 1, args.records, args.concurrency).await;
    let r = reconciler();
    let started = Instant::now();
    let mut applied = 0;
    loop {
        let n = r.reconcile_sale(sale).await?;
        if n == 0 {
            break;
        }
        applied += n;
    }
    let drain_rate = applied as f64 / started.elapsed().as_secs_f64();
    anyhow::ensure!(
        applied as u64 == args.records,
        "applied {applied} of {}",
        args.records
    );

    // 2. Lag while the reserve path runs at full speed beside the reconciler.
    let n = (reserve_rate as u64) * args.lag_secs;
    let sale2 = new_sale(&pool, &e, n as i64).await?;
    live.refresh(&pool).await?; // the running reconciler walks the live list
    let stop = CancellationToken::new();
    let worker = tokio::spawn(reconciler().run(stop.clone()));
    let sampling = CancellationToken::new();
    let sampler = {
        let (e, sampling) = (e.clone(), sampling.clone());
        tokio::spawn(async move {
            let mut lags = Vec::new();
            while !sampling.is_cancelled() {
                let (_, oldest) = e.flow_backlog(sale2).await.unwrap();
                let now = e.now_ms().await.unwrap();
                lags.push(oldest.map_or(0, |o| now - o.ms as i64));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            lags
        })
    };
    let loaded_rate = reserve_all(&e, sale2, 1, n, args.concurrency).await;
    sampling.cancel();
    let mut lags = sampler.await?;
    lags.sort_unstable();
    let caught_up = Instant::now();
    let mut c = e.connection();
    loop {
        let left: u64 = c.xlen(e.keys().sale(sale2).flow).await?;
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let tail = caught_up.elapsed();
    stop.cancel();
    worker.await?;

    println!(
        "reconciler benchmark: Redis {}, MySQL {}",
        args.redis_url, args.mysql
    );
    println!();
    println!("| measurement | figure | reference (same run) | ratio |");
    println!("| --- | ---: | ---: | ---: |");
    println!(
        "| reconciler, records persisted into MySQL per second | {drain_rate:.0} | reserve path alone, {} concurrent: {reserve_rate:.0}/s | {:.2} |",
        args.concurrency,
        drain_rate / reserve_rate
    );
    println!(
        "| reserve path with the reconciler running, reservations/s | {loaded_rate:.0} | reserve path alone: {reserve_rate:.0}/s | {:.2} |",
        loaded_rate / reserve_rate
    );
    println!(
        "| reconciler lag while reserving at full speed ({} s, {} samples) | p50 {} ms, p99 {} ms, max {} ms | | |",
        args.lag_secs,
        lags.len(),
        percentile(&lags, 0.5),
        percentile(&lags, 0.99),
        lags.last().copied().unwrap_or(0)
    );
    println!(
        "| backlog drained after the load stopped | {} ms | | |",
        tail.as_millis()
    );

    for s in [sale, sale2] {
        e.drop_sale_keys(s).await?;
    }
    let _: () = c.del(e.keys().sales_index()).await?;
    pool.close().await;
    db::drop_database(&db_url).await?;
    Ok(())
}
