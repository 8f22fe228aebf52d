//! MySQL, the system of record: the pool, the migrations and the queries.
//!
//! Nothing on the hot path (reserve, pay, cancel) calls into this module; the
//! admin API, the CLI, start-up and the workers do.

pub mod audit;
pub mod forward;
pub mod inventory;
pub mod ledger;
pub mod outbox;
pub mod quarantine;
pub mod rebuild;
pub mod retired;
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
pub async fn insert_sale(pool: &MySqlPool, s: &SaleRow) -> anyhow::Result<(SaleId, String)> {
    let token = new_token();
    let mut tx = pool.begin().await?;
    let id = sqlx::query(
        "INSERT INTO sales (sku, title, price_cents, stock_total, per_user_limit, \
         payment_window_secs, start_at, end_at, redis_token) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
    .bind(&token)
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
    Ok((SaleId::new(id)?, token))
}

/// A new sale's token: 16 hex digits from the process's random hasher
/// seed and the clock. It names the sale's Redis keys as this database's,
/// not a secret.
fn new_token() -> String {
    use sha2::{Digest, Sha256};
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    let digest = Sha256::digest(h.finish().to_be_bytes());
    hex::encode(&digest[..8])
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
struct TermsRow {
    id: u64,
    sku: String,
    title: String,
    price_cents: i64,
    stock_total: i32,
    per_user_limit: i32,
    payment_window_secs: i32,
    start_at: DateTime<Utc>,
    end_at: DateTime<Utc>,
    redis_token: String,
    paused: bool,
}

/// The terms (and token) of one sale, or `None` when MySQL has no such
/// sale or it is retired (MySQL alone answers for a retired sale).
pub async fn sale_terms<'e>(
    ex: impl sqlx::Executor<'e, Database = sqlx::MySql>,
    id: SaleId,
) -> anyhow::Result<Option<SaleTerms>> {
    let row: Option<TermsRow> = sqlx::query_as(
        "SELECT id, sku, title, price_cents, stock_total, per_user_limit, payment_window_secs, \
         start_at, end_at, redis_token, paused_at IS NOT NULL AS paused FROM sales \
         WHERE id = ? AND retired_at IS NULL",
    )
    .bind(id.get())
    .fetch_optional(ex)
    .await?;
    row.map(|r| {
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
            token: r.redis_token,
            paused: r.paused,
        })
    })
    .transpose()
}

/// The columns of an order row, as [`OrderRow`] reads them.
pub(crate) const ORDER_COLUMNS: &str = "seq, user_id, qty, amount_cents, status, created_at, \
     payment_deadline, paid_at, closed_at, refunded_at, payment_id";

/// An order as MySQL holds it ([`ORDER_COLUMNS`]).
#[derive(sqlx::FromRow)]
pub(crate) struct OrderRow {
    seq: u64,
    user_id: u64,
    qty: i32,
    amount_cents: i64,
    status: String,
    created_at: DateTime<Utc>,
    payment_deadline: DateTime<Utc>,
    paid_at: Option<DateTime<Utc>>,
    closed_at: Option<DateTime<Utc>>,
    refunded_at: Option<DateTime<Utc>>,
    payment_id: Option<String>,
}

impl OrderRow {
    /// The order of `sale` this row holds, its last flow `last_flow`.
    pub(crate) fn into_order(
        self,
        sale: SaleId,
        last_flow: String,
    ) -> anyhow::Result<crate::engine::Order> {
        let id = crate::domain::OrderId::new(sale, self.seq);
        let status = crate::engine::OrderStatus::parse(&self.status)
            .ok_or_else(|| anyhow::anyhow!("order {id}: unknown status {:?}", self.status))?;
        let ms = |t: DateTime<Utc>| t.timestamp_millis();
        Ok(crate::engine::Order {
            id,
            status,
            user: crate::domain::UserId::new(self.user_id)?,
            qty: u32::try_from(self.qty)?,
            amount_cents: self.amount_cents,
            created_ms: ms(self.created_at),
            deadline_ms: ms(self.payment_deadline),
            paid_ms: self.paid_at.map(ms),
            closed_ms: self.closed_at.map(ms),
            refunded_ms: self.refunded_at.map(ms),
            last_flow,
            payment_id: self.payment_id,
        })
    }
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
