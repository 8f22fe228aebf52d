//! Putting a sale on: validate the terms, persist them in MySQL, load them
//! into Redis. Shared by the admin API and `flashsale sale create`.
//!
//! A sale is answered as created only once it is in both stores; a sale that
//! reached MySQL but not Redis is removed again (it was never on sale), and
//! start-up loads any unfinished sale that Redis lacks (a crash in between,
//! or a Redis that lost its data), resuming from MySQL's settled state; a
//! retired sale is never loaded again.

use chrono::{DateTime, Utc};
use sqlx::MySqlPool;

use crate::db::{self, SaleRow};
use crate::domain::InvalidValue;
use crate::engine::{
    Engine, EngineError, GuardVerdict, Loaded, SaleControl, SaleSnapshot, SaleTerms,
};

/// The admin's request to put a sale on, as sent.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SaleRequest {
    /// The product's SKU (1 to 64 characters).
    pub sku: String,
    /// The product's title (1 to 200 characters).
    pub title: String,
    /// Unit price in cents (0 to 10^10).
    pub price_cents: i64,
    /// Units on sale (1 to 10,000,000).
    pub stock: i64,
    /// Opening time.
    pub start_at: DateTime<Utc>,
    /// Closing time, after the opening.
    pub end_at: DateTime<Utc>,
    /// Most units one buyer may hold (at least 1).
    #[serde(default = "one")]
    pub per_user_limit: i64,
    /// Seconds a buyer has to pay (1 to 7 days).
    pub payment_window_secs: i64,
}

fn one() -> i64 {
    1
}

/// Largest accepted price: keeps price times quantity far from overflow.
const MAX_PRICE_CENTS: i64 = 10_000_000_000;
/// Longest accepted payment window.
const MAX_PAYMENT_WINDOW_SECS: i64 = 7 * 24 * 3600;

/// The times MySQL's DATETIME columns hold (an RFC 3339 offset can move a
/// time of the year 9999 or 0000 out of them).
fn stored_times() -> std::ops::RangeInclusive<DateTime<Utc>> {
    let utc = |s: &str| s.parse::<DateTime<Utc>>().expect("a valid constant");
    utc("0001-01-01T00:00:00Z")..=utc("9999-12-31T23:59:59.999999999Z")
}

impl SaleRequest {
    /// Checks every field's range; the first violation is reported.
    pub fn validate(self) -> Result<SaleRow, InvalidValue> {
        let bad = |m: &str| Err(InvalidValue(m.to_owned()));
        let chars = |s: &str| s.chars().count();
        if !(1..=64).contains(&chars(&self.sku)) || self.sku.trim() != self.sku {
            return bad("sku must be 1 to 64 characters without surrounding spaces");
        }
        if !(1..=200).contains(&chars(&self.title)) {
            return bad("title must be 1 to 200 characters");
        }
        if !(0..=MAX_PRICE_CENTS).contains(&self.price_cents) {
            return bad("price_cents must be between 0 and 10000000000");
        }
        if !(1..=10_000_000).contains(&self.stock) {
            return bad("stock must be between 1 and 10000000");
        }
        if !(1..=10_000_000).contains(&self.per_user_limit) {
            return bad("per_user_limit must be between 1 and 10000000");
        }
        if !(1..=MAX_PAYMENT_WINDOW_SECS).contains(&self.payment_window_secs) {
            return bad("payment_window_secs must be between 1 and 604800");
        }
        if !(stored_times().contains(&self.start_at) && stored_times().contains(&self.end_at)) {
            return bad("start_at and end_at must be within the years 0001 to 9999 (UTC)");
        }
        if self.end_at <= self.start_at {
            return bad("end_at must be after start_at");
        }
        Ok(SaleRow {
            sku: self.sku,
            title: self.title,
            price_cents: self.price_cents,
            stock: self.stock,
            per_user_limit: self.per_user_limit,
            payment_window_secs: self.payment_window_secs,
            start_at: self.start_at,
            end_at: self.end_at,
        })
    }
}

/// Why a sale could not be put on.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// MySQL failed.
    #[error("mysql: {0}")]
    Database(anyhow::Error),
    /// Redis failed (the MySQL row was removed again).
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// Redis holds another database's sale under the new sale's name (the
    /// MySQL row was removed again; those keys are never adopted).
    #[error(
        "Redis already holds keys of another database under sale {0}'s name (key prefix \
         {1:?}): give this deployment its own FLASHSALE_KEY_PREFIX or Redis database, or \
         remove those keys"
    )]
    Foreign(crate::domain::SaleId, String),
}

fn terms(id: crate::domain::SaleId, token: String, s: &SaleRow) -> SaleTerms {
    // Millisecond precision, as MySQL's DATETIME(3) stores it.
    SaleTerms {
        id,
        sku: s.sku.clone(),
        title: s.title.clone(),
        price_cents: s.price_cents,
        stock_total: s.stock,
        per_user_limit: s.per_user_limit,
        payment_window_ms: s.payment_window_secs * 1000,
        start_ms: s.start_at.timestamp_millis(),
        end_ms: s.end_at.timestamp_millis(),
        token,
        paused: false,
    }
}

/// Persists the sale in MySQL, loads it into Redis and reads it back.
pub async fn create(
    db: &MySqlPool,
    engine: &Engine,
    row: &SaleRow,
) -> Result<SaleSnapshot, CreateError> {
    let (id, token) = db::insert_sale(db, row)
        .await
        .map_err(CreateError::Database)?;
    let loaded = async {
        if engine.load_sale(&terms(id, token, row)).await? == Loaded::Foreign {
            return Ok(None);
        }
        engine
            .sale(id)
            .await?
            .map(Some)
            .ok_or_else(|| EngineError::Protocol(format!("sale {id} vanished after loading")))
    }
    .await;
    match loaded {
        Ok(Some(snapshot)) => Ok(snapshot),
        Ok(None) => {
            if let Err(undo) = db::delete_sale(db, id).await {
                tracing::error!(sale = %id, error = %undo, "could not remove a sale whose Redis name another database holds");
            }
            Err(CreateError::Foreign(id, engine.keys().prefix().to_owned()))
        }
        Err(e) => {
            // Undo MySQL only when Redis certainly lacks the sale: a reply
            // lost on the way back may hide a sale that is already live.
            match engine.sale(id).await {
                Ok(None) => {
                    if let Err(undo) = db::delete_sale(db, id).await {
                        tracing::error!(sale = %id, error = %undo, "could not remove a sale that Redis refused; start-up will load it");
                    }
                }
                Ok(Some(_)) => {
                    tracing::warn!(sale = %id, error = %e, "sale loaded into Redis although the call reported an error");
                    return engine.sale(id).await?.ok_or_else(|| e.into());
                }
                Err(_) => {
                    tracing::error!(sale = %id, error = %e, "sale persisted; Redis did not answer whether it holds it: start-up (or `flashsale audit --repair`) loads it")
                }
            }
            Err(e.into())
        }
    }
}

/// Fences every unfinished sale that Redis lacks (or only `only`, ended
/// or not), so that the reconciler rebuilds it from MySQL; returns how
/// many. A retired sale is never loaded again: MySQL alone answers for it.
pub async fn load_missing(
    db: &MySqlPool,
    engine: &Engine,
    only: Option<crate::domain::SaleId>,
) -> anyhow::Result<usize> {
    let mut fenced = 0;
    let ids = match only {
        Some(id) => vec![id],
        None => crate::db::retired::live_sales(db)
            .await?
            .into_iter()
            .map(|s| s.id)
            .collect(),
    };
    for id in ids {
        let Some(t) = db::sale_terms(db, id).await? else {
            continue;
        };
        if engine.sale_exists(id).await? {
            continue;
        }
        let cursor = crate::db::rebuild::settled_point(db, id).await?;
        let input = crate::engine::GuardInput {
            sale: id,
            token: &t.token,
            max_seq: cursor.max_seq,
            cursor: cursor.cursor,
            last_n: 0,
            start_ms: t.start_ms,
            end_ms: t.end_ms,
            total: t.stock_total,
            price_cents: t.price_cents,
        };
        if let GuardVerdict::Fenced(reason) = engine.guard(&input).await? {
            tracing::warn!(sale = %id, reason, "sale missing from Redis: fenced until the reconciler rebuilds it from MySQL");
            fenced += 1;
        }
    }
    Ok(fenced)
}

/// Why an admin's control of a sale was not carried out.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No such sale.
    #[error("no such sale")]
    NotFound,
    /// Pause or resume of a sale that has ended (or retired).
    #[error("the sale has ended")]
    Ended,
    /// MySQL failed; nothing changed.
    #[error("mysql: {0}")]
    Database(anyhow::Error),
    /// Redis failed or the sale is fenced; MySQL's change was rolled back.
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// What a control left: the sale as Redis holds it now, or, for a sale
/// that has retired (ended for good), nothing more to show than MySQL's.
#[derive(Debug)]
pub enum Controlled {
    /// The sale, live in Redis.
    Live(Box<SaleSnapshot>),
    /// The sale has retired: MySQL alone answers for it.
    Retired,
}

/// Pauses, resumes or ends a sale (`POST /api/v1/sales/{id}/pause|resume|end`,
/// `flashsale sale pause|resume|end`).
///
/// The sale's row in MySQL is locked first; Redis then carries the control
/// out (`lua/control.lua`: reservations read it there, so it holds for
/// every instance at once, and an end is now by Redis's clock, the clock
/// of every sale window); MySQL records the same and commits. Two controls
/// of one sale take turns, and both stores end in the same order. When
/// Redis fails, MySQL is left as it was and the caller is told so; when
/// MySQL fails after Redis changed, the caller is told so too, and the
/// same control, sent again, brings MySQL level (each control is
/// idempotent: pausing twice changes nothing the second time, and ending
/// keeps the earlier end, so an ended sale stays ended).
///
/// Payments, cancels, expiry and refunds never look at either.
pub async fn control(
    db: &MySqlPool,
    engine: &Engine,
    id: crate::domain::SaleId,
    control: SaleControl,
) -> Result<Controlled, ControlError> {
    let database = |e: sqlx::Error| ControlError::Database(e.into());
    let mut tx = db.begin().await.map_err(database)?;
    let row: Option<(String, bool)> = sqlx::query_as(
        "SELECT redis_token, retired_at IS NOT NULL FROM sales WHERE id = ? FOR UPDATE",
    )
    .bind(id.get())
    .fetch_optional(&mut *tx)
    .await
    .map_err(database)?;
    let Some((token, retired)) = row else {
        return Err(ControlError::NotFound);
    };
    if retired {
        return match control {
            SaleControl::End => Ok(Controlled::Retired),
            _ => Err(ControlError::Ended),
        };
    }
    let end_ms = match engine.control_sale(id, &token, control).await? {
        crate::engine::Controlled::Done { end_ms } => end_ms,
        crate::engine::Controlled::Ended => return Err(ControlError::Ended),
        // MySQL lists the sale as live: Redis lost it, and the guard fences
        // it until it is rebuilt from MySQL.
        crate::engine::Controlled::NotFound => {
            return Err(EngineError::Fenced("missing".into()).into())
        }
    };
    let recorded = match control {
        SaleControl::Pause => sqlx::query(
            "UPDATE sales SET paused_at = COALESCE(paused_at, UTC_TIMESTAMP(3)) WHERE id = ?",
        )
        .bind(id.get()),
        SaleControl::Resume => {
            sqlx::query("UPDATE sales SET paused_at = NULL WHERE id = ?").bind(id.get())
        }
        SaleControl::End => {
            let end = DateTime::<Utc>::from_timestamp_millis(end_ms).ok_or_else(|| {
                EngineError::Protocol(format!("sale {id}: end {end_ms} out of range"))
            })?;
            sqlx::query(
                "UPDATE sales SET ended_early_at = IF(end_at > ?, ?, ended_early_at), \
                 end_at = LEAST(end_at, ?), paused_at = NULL WHERE id = ?",
            )
            .bind(end)
            .bind(end)
            .bind(end)
            .bind(id.get())
        }
    };
    recorded.execute(&mut *tx).await.map_err(database)?;
    tx.commit().await.map_err(database)?;
    tracing::info!(sale = %id, control = control.as_str(), "sale control carried out");
    match engine.sale(id).await? {
        Some(snapshot) if !snapshot.retired => Ok(Controlled::Live(Box::new(snapshot))),
        Some(_) => Ok(Controlled::Retired),
        None => Err(EngineError::Fenced("missing".into()).into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> SaleRequest {
        serde_json::from_str(
            r#"{"sku":"SKU-1","title":"Phone","price_cents":100,"stock":10,
                "start_at":"2026-11-21T12:00:00Z","end_at":"2026-11-21T13:00:00Z",
                "per_user_limit":1,"payment_window_secs":900}"#,
        )
        .unwrap()
    }

    #[test]
    fn a_good_request_validates() {
        let row = request().validate().unwrap();
        assert_eq!(row.stock, 10);
    }

    #[test]
    fn each_bad_field_is_refused() {
        let cases: [fn(&mut SaleRequest); 8] = [
            |r| r.sku.clear(),
            |r| r.title = "x".repeat(201),
            |r| r.price_cents = -1,
            |r| r.stock = 0,
            |r| r.stock = 10_000_001,
            |r| r.per_user_limit = 0,
            |r| r.payment_window_secs = 0,
            |r| r.end_at = r.start_at,
        ];
        for (i, change) in cases.iter().enumerate() {
            let mut r = request();
            change(&mut r);
            assert!(r.validate().is_err(), "case {i}");
        }
    }
}
