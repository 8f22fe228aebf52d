//! MySQL, the system of record: the pool, the migrations and the queries.
//!
//! Nothing on the hot path (reserve, pay, cancel) calls into this module; the
//! admin API, the CLI, start-up and the workers do.

pub mod audit;
pub mod ledger;
pub mod sweep;

use chrono::{DateTime, Utc};
use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions};
use sqlx::{ConnectOptions, Connection, MySqlPool};
use std::str::FromStr;
use std::time::Duration;

use crate::domain::SaleId;
use crate::engine::SaleTerms;

/// The embedded migrations (`migrations/`).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Splits a MySQL URL into the server URL and the database name.
fn split_database(url: &str) -> anyhow::Result<(url::Url, String)> {
    let mut server = url::Url::parse(url)?;
    let name = server.path().trim_start_matches('/').to_owned();
    anyhow::ensure!(
        !name.is_empty()
            && name.len() <= 64
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
        "DATABASE_URL must name a database of letters, digits and '_' (got {name:?})"
    );
    server.set_path("");
    Ok((server, name))
}

/// Creates the database named in `url` if it is missing.
pub async fn create_database(url: &str) -> anyhow::Result<()> {
    let (server, name) = split_database(url)?;
    let mut conn = MySqlConnectOptions::from_str(server.as_str())?
        .connect()
        .await?;
    sqlx::query(&format!(
        "CREATE DATABASE IF NOT EXISTS `{name}` CHARACTER SET utf8mb4"
    ))
    .execute(&mut conn)
    .await?;
    conn.close().await?;
    Ok(())
}

/// Drops the database named in `url` (tests clean up with it).
pub async fn drop_database(url: &str) -> anyhow::Result<()> {
    let (server, name) = split_database(url)?;
    let mut conn = MySqlConnectOptions::from_str(server.as_str())?
        .connect()
        .await?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS `{name}`"))
        .execute(&mut conn)
        .await?;
    conn.close().await?;
    Ok(())
}

/// Creates the database if missing, connects a pool and runs the migrations.
pub async fn connect(url: &str) -> anyhow::Result<MySqlPool> {
    create_database(url).await?;
    let pool = MySqlPoolOptions::new()
        .max_connections(16)
        .acquire_timeout(Duration::from_secs(5))
        .connect(url)
        .await?;
    MIGRATOR.run(&pool).await?;
    Ok(pool)
}

/// A sale to persist, already validated.
#[derive(Debug, Clone)]
pub struct SaleRow {
    /// The product's SKU.
    pub sku: String,
    /// The product's title.
    pub title: String,
    /// Unit price in cents.
    pub price_cents: i64,
    /// Units put on sale.
    pub stock: i64,
    /// Most units one buyer may hold.
    pub per_user_limit: i64,
    /// Time to pay after reserving.
    pub payment_window_secs: i64,
    /// Opening time.
    pub start_at: DateTime<Utc>,
    /// Closing time (exclusive).
    pub end_at: DateTime<Utc>,
}

/// Inserts a sale and its inventory row in one transaction; returns its id.
pub async fn insert_sale(pool: &MySqlPool, s: &SaleRow) -> anyhow::Result<SaleId> {
    let mut tx = pool.begin().await?;
    let id = sqlx::query(
        "INSERT INTO sales (sku, title, price_cents, stock_total, per_user_limit, \
         payment_window_secs, start_at, end_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(&s.sku)
    .bind(&s.title)
    .bind(s.price_cents)
    .bind(s.stock)
    .bind(s.per_user_limit)
    .bind(s.payment_window_secs)
    .bind(s.start_at)
    .bind(s.end_at)
    .execute(&mut *tx)
    .await?
    .last_insert_id();
    sqlx::query("INSERT INTO inventory (sale_id, total, available) VALUES (?, ?, ?)")
        .bind(id)
        .bind(s.stock)
        .bind(s.stock)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(SaleId::new(id)?)
}

/// Removes a sale that never reached Redis (so it was never on sale).
pub async fn delete_sale(pool: &MySqlPool, id: SaleId) -> anyhow::Result<()> {
    sqlx::query("DELETE FROM sales WHERE id = ?")
        .bind(id.get())
        .execute(pool)
        .await?;
    Ok(())
}

/// Sales that have not ended yet, with their settled available stock: what
/// start-up loads into a Redis that lacks them.
pub async fn unfinished_sales(pool: &MySqlPool) -> anyhow::Result<Vec<SaleTerms>> {
    #[allow(clippy::type_complexity)]
    let rows: Vec<(
        u64,
        String,
        String,
        i64,
        i32,
        i32,
        i32,
        i32,
        DateTime<Utc>,
        DateTime<Utc>,
    )> = sqlx::query_as(
        "SELECT s.id, s.sku, s.title, s.price_cents, s.stock_total, i.available, \
             s.per_user_limit, s.payment_window_secs, s.start_at, s.end_at \
             FROM sales s JOIN inventory i ON i.sale_id = s.id \
             WHERE s.end_at > UTC_TIMESTAMP(3)",
    )
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok(SaleTerms {
                id: SaleId::new(r.0)?,
                sku: r.1,
                title: r.2,
                price_cents: r.3,
                stock_total: r.4.into(),
                stock_available: r.5.into(),
                per_user_limit: r.6.into(),
                payment_window_ms: i64::from(r.7) * 1000,
                start_ms: r.8.timestamp_millis(),
                end_ms: r.9.timestamp_millis(),
            })
        })
        .collect()
}

/// `SELECT 1`.
pub async fn ping(pool: &MySqlPool) -> anyhow::Result<()> {
    sqlx::query("SELECT 1").execute(pool).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_name_is_split_off_and_checked() {
        let (server, name) = split_database("mysql://root@127.0.0.1:3306/flashsale").unwrap();
        assert_eq!(name, "flashsale");
        assert_eq!(server.as_str(), "mysql://root@127.0.0.1:3306");
        assert!(split_database("mysql://root@127.0.0.1:3306/").is_err());
        assert!(split_database("mysql://root@127.0.0.1:3306/a`b").is_err());
    }
}
