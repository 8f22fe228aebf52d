//! The reference a user would build without Redis: each purchase is one
//! MySQL transaction, `UPDATE stock SET left = left - 1 WHERE left > 0` on
//! the sale's one row plus an order insert, at a given concurrency. Prints
//! transactions (orders) per second. Used by `loadtest/bench.sh`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use sqlx::mysql::MySqlPoolOptions;

#[derive(Parser, Debug)]
struct Args {
    /// MySQL server; the benchmark creates and drops its own database.
    #[arg(long, default_value = "mysql://root@127.0.0.1:3306")]
    mysql: String,
    /// Transactions in flight.
    #[arg(long, default_value_t = 64)]
    concurrency: u32,
    /// Seconds to run.
    #[arg(long, default_value_t = 10)]
    secs: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let url = format!("{}/fsbench_hotrow_{}", args.mysql, std::process::id());
    flashsale::db::create_database(&url).await?;
    let pool = MySqlPoolOptions::new()
        .max_connections(args.concurrency)
        .connect(&url)
        .await?;
    sqlx::query("CREATE TABLE stock (id INT PRIMARY KEY, units_left INT NOT NULL) ENGINE=InnoDB")
        .execute(&pool)
        .await?;
    sqlx::query(
        "CREATE TABLE orders (id BIGINT AUTO_INCREMENT PRIMARY KEY, user_id BIGINT NOT NULL, \
         qty INT NOT NULL, created_at DATETIME(3) NOT NULL) ENGINE=InnoDB",
    )
    .execute(&pool)
    .await?;
    sqlx::query("INSERT INTO stock VALUES (1, 100000000)")
        .execute(&pool)
        .await?;
    let done = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs(args.secs);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..args.concurrency {
        let (pool, done) = (pool.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut user = u64::from(t) * 1_000_000_000;
            while Instant::now() < until {
                user += 1;
                let mut tx = pool.begin().await.unwrap();
                let sold = sqlx::query("UPDATE stock SET units_left = units_left - 1 WHERE id = 1 AND units_left > 0")
                    .execute(&mut *tx)
                    .await
                    .unwrap()
                    .rows_affected();
                if sold == 1 {
                    sqlx::query("INSERT INTO orders (user_id, qty, created_at) VALUES (?, 1, UTC_TIMESTAMP(3))")
                        .bind(user)
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                }
                tx.commit().await.unwrap();
                done.fetch_add(sold, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let secs = started.elapsed().as_secs_f64();
    let (orders,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM orders")
        .fetch_one(&pool)
        .await?;
    anyhow::ensure!(
        orders as u64 == done.load(Ordering::Relaxed),
        "orders and updates disagree"
    );
    println!("{:.0}", orders as f64 / secs);
    pool.close().await;
    flashsale::db::drop_database(&url).await?;
    Ok(())
}
