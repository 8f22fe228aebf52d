//! MySQL, the system of record: the pool, the migrations and the queries.
//!
//! Nothing on the hot path (reserve, pay, cancel) calls into this module; the
//! admin API, the CLI, start-up and the workers do.

pub mod audit;
pub mod forward;
pub mod ledger;
pub mod quarantine;
pub mod retired;
pub mod sweep;

use chrono::{DateTime, Utc};
use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions};
use sqlx::{ConnectOptions, Connection, MySqlPool};
use std::str::FromStr;
use std::time::Duration;

use crate::domain::SaleId;
use crate::engine::{FlowId, ResumePoint, SaleTerms};

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
    // As DATETIME values: sqlx sends a `DateTime<Utc>` as a TIMESTAMP, which
    // MariaDB turns into NULL past 2038-01-19 (the columns are DATETIME(3)).
    .bind(s.start_at.naive_utc())
    .bind(s.end_at.naive_utc())
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

#[derive(sqlx::FromRow)]
struct ResumeRow {
    id: u64,
    sku: String,
    title: String,
    price_cents: i64,
    stock_total: i32,
    per_user_limit: i32,
    payment_window_secs: i32,
    start_at: DateTime<Utc>,
    end_at: DateTime<Utc>,
    available: i32,
    pending: i32,
    paid: i32,
    cancelled: i32,
    closed: i32,
    refunded: i32,
    restocked: i32,
    last_seq: u64,
    last_ms: u64,
    last_flow_seq: u64,
}

/// Sales with the settled state to load them from: every sale that has not
/// ended (start-up loads the ones Redis lacks), or the one asked for. A
/// retired sale is never loaded again: MySQL alone answers for it.
pub async fn sales_to_load(
    pool: &MySqlPool,
    only: Option<SaleId>,
) -> anyhow::Result<Vec<SaleTerms>> {
    let filter = if only.is_some() {
        "s.id = ? AND s.retired_at IS NULL"
    } else {
        "s.end_at > UTC_TIMESTAMP(3) AND s.retired_at IS NULL"
    };
    let sql = format!(
        "SELECT s.id, s.sku, s.title, s.price_cents, s.stock_total, s.per_user_limit, \
         s.payment_window_secs, s.start_at, s.end_at, i.available, i.pending, i.paid, \
         i.cancelled, i.closed, i.refunded, i.restocked, \
         CAST(COALESCE((SELECT MAX(o.seq) FROM orders o WHERE o.sale_id = s.id), 0) AS UNSIGNED) AS last_seq, \
         CAST(COALESCE(c.last_ms, 0) AS UNSIGNED) AS last_ms, \
         CAST(COALESCE(c.last_seq, 0) AS UNSIGNED) AS last_flow_seq \
         FROM sales s JOIN inventory i ON i.sale_id = s.id \
         LEFT JOIN reconcile_cursors c ON c.sale_id = s.id WHERE {filter}"
    );
    let mut q = sqlx::query_as::<_, ResumeRow>(&sql);
    if let Some(id) = only {
        q = q.bind(id.get());
    }
    let rows = q.fetch_all(pool).await?;
    rows.into_iter()
        .map(|r| {
            let cursor = FlowId {
                ms: r.last_ms,
                seq: r.last_flow_seq,
            };
            let fresh = r.last_seq == 0 && cursor == FlowId::default();
            Ok(SaleTerms {
                id: SaleId::new(r.id)?,
                sku: r.sku,
                title: r.title,
                price_cents: r.price_cents,
                stock_total: r.stock_total.into(),
                per_user_limit: r.per_user_limit.into(),
                payment_window_ms: i64::from(r.payment_window_secs) * 1000,
                start_ms: r.start_at.timestamp_millis(),
                end_ms: r.end_at.timestamp_millis(),
                resume: (!fresh).then_some(ResumePoint {
                    available: r.available.into(),
                    pending: r.pending.into(),
                    paid: r.paid.into(),
                    cancelled: r.cancelled.into(),
                    closed: r.closed.into(),
                    refunded: r.refunded.into(),
                    restocked: r.restocked.into(),
                    last_seq: r.last_seq,
                    cursor,
                }),
            })
        })
        .collect()
}

/// A pool of one connection, opened on first use, for health probes: a
/// probe flood never takes a connection the reconciler needs.
pub fn probe_pool(url: &str) -> anyhow::Result<MySqlPool> {
    Ok(MySqlPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(2))
        .connect_lazy(url)?)
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
