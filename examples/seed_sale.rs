//! Seeds a settled sale of N orders for the audit benchmark: reserves
//! through the engine at full speed, pays every third order, and runs the
//! reconciler until MySQL holds everything. Prints the sale id.
//!
//! Used by `scripts/bench-audit.sh`; uses the stores named by `REDIS_URL`,
//! `DATABASE_URL` and `FLASHSALE_KEY_PREFIX`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use flashsale::config::StoreConfig;
use flashsale::db::SaleRow;
use flashsale::domain::{Qty, UserId};
use flashsale::engine::{Engine, Reservation};
use flashsale::telemetry::Metrics;
use flashsale::workers::live::LiveSales;
use flashsale::workers::reconciler::{Reconciler, ReconcilerOptions};
use futures::stream::{self, StreamExt};

#[derive(Parser, Debug)]
struct Args {
    /// Orders to make.
    #[arg(long, default_value_t = 1_000_000)]
    orders: u64,
    #[command(flatten)]
    store: StoreConfig,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let pool = flashsale::db::connect(&args.store.database_url).await?;
    let engine = Engine::connect(&args.store.engine_options()?)?;
    engine.load_scripts().await?;
    let now = chrono::Utc::now();
    let row = SaleRow {
        sku: "AUDIT-BENCH".into(),
        title: "audit benchmark".into(),
        price_cents: 100,
        stock: args.orders as i64,
        per_user_limit: 1,
        payment_window_secs: 3600,
        start_at: now - chrono::Duration::minutes(1),
        end_at: now + chrono::Duration::hours(2),
    };
    let sale = flashsale::sales::create(&pool, &engine, &row).await?.id;
    let started = Instant::now();
    let e = &engine;
    stream::iter(1..=args.orders)
        .for_each_concurrent(64, |u| async move {
            let r = e
                .reserve(sale, UserId::new(u).unwrap(), Qty::default(), None)
                .await;
            let Ok(Reservation::Created(o)) = r else {
                panic!("{r:?}");
            };
            if u % 3 == 0 {
                e.pay(o.id, &format!("p{u}"), o.amount_cents).await.unwrap();
            }
        })
        .await;
    eprintln!("seeded {} orders in {:.1?}", args.orders, started.elapsed());
    let r = Reconciler::new(
        engine.clone(),
        pool.clone(),
        Arc::new(LiveSales::default()), // only reconcile_sale below
        Arc::new(Metrics::default()),
        ReconcilerOptions {
            max_batch: 5000,
            ..ReconcilerOptions::default()
        },
    );
    while r.reconcile_sale(sale).await? > 0 {}
    let (left, _) = engine.flow_backlog(sale).await?;
    anyhow::ensure!(left == 0, "{left} records still wait");
    eprintln!("settled in MySQL after {:.1?}", started.elapsed());
    tokio::time::sleep(Duration::from_millis(10)).await;
    println!("{sale}");
    Ok(())
}
