//! The points ledger in MySQL: one entry per event id, and each buyer's
//! balance, changed in the same transaction as the entry it sums.
//!
//! An event applied again (a redelivery after a crash between the commit and
//! the broker's ack, a relay that published twice) finds its entry by the
//! unique event id and changes nothing. The consumer acks only after the
//! commit, so every event is applied exactly once in effect.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sqlx::{MySql, MySqlPool, Row, Transaction};

use crate::domain::UserId;
use crate::events::{Event, EventType};

/// The longest event id the ledger holds (`points_entries.event_id`).
const EVENT_ID_MAX: usize = 36;
/// The longest order id the ledger holds (`points_entries.order_id`).
const ORDER_ID_MAX: usize = 64;

/// What applying one event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A new entry: the buyer's balance moved by `points`.
    Applied {
        /// The buyer.
        user: UserId,
        /// Points added (negative for a refund).
        points: i64,
    },
    /// The event's entry was already there: nothing changed.
    Duplicate,
    /// An event type that carries no points.
    Ignored,
}

impl Outcome {
    /// The metric label of the outcome.
    pub fn label(self) -> &'static str {
        match self {
            Self::Applied { .. } => "applied",
            Self::Duplicate => "duplicate",
            Self::Ignored => "ignored",
        }
    }
}

/// Why an event was not applied.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The event lacks what its type needs, or holds values the ledger
    /// cannot take: applying it again will never succeed.
    #[error("unusable event: {0}")]
    Invalid(String),
    /// MySQL failed; see [`LedgerError::is_permanent`].
    #[error("mysql: {0}")]
    Db(#[from] sqlx::Error),
}

impl LedgerError {
    /// Whether retrying cannot cure it: an invalid event, or MySQL refusing
    /// the values themselves (SQLSTATE class 22, data exception: a value out
    /// of range, too long). A lost connection, a deadlock or a lock wait are
    /// worth a retry.
    pub fn is_permanent(&self) -> bool {
        match self {
            Self::Invalid(_) => true,
            Self::Db(sqlx::Error::Database(e)) => e.code().is_some_and(|c| c.starts_with("22")),
            // A value sqlx cannot encode (or a row it cannot read back) is
            // the same on every retry.
            Self::Db(
                sqlx::Error::Encode(_) | sqlx::Error::Decode(_) | sqlx::Error::ColumnDecode { .. },
            ) => true,
            Self::Db(_) => false,
        }
    }
}

/// One ledger entry an event makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The event's id (unique in the ledger).
    pub event_id: String,
    /// The buyer.
    pub user: UserId,
    /// The order.
    pub order_id: String,
    /// Points (negative for a refund).
    pub points: i64,
    /// `order.paid` or `order.refunded`.
    pub reason: EventType,
    /// When the change happened.
    pub occurred_at: DateTime<Utc>,
}

/// Points an amount earns: one per whole 100 cents.
pub fn points_for(amount_cents: i64) -> i64 {
    amount_cents.div_euclid(100)
}

/// The entry `event` makes: `None` for a type that carries no points, an
/// error when a paid or refunded event lacks what the ledger needs.
pub fn entry_of(event: &Event) -> Result<Option<Entry>, LedgerError> {
    let sign = match event.kind {
        EventType::OrderPaid => 1,
        EventType::OrderRefunded => -1,
        _ => return Ok(None),
    };
    let invalid = |what: &str| LedgerError::Invalid(format!("{} event {what}", event.kind));
    if event.event_id.is_empty() || event.event_id.len() > EVENT_ID_MAX {
        return Err(invalid("has an event id that is empty or too long"));
    }
    let order_id = match event.order_id.as_deref() {
        Some(o) if !o.is_empty() && o.len() <= ORDER_ID_MAX => o.to_owned(),
        Some(_) => return Err(invalid("has an order id that is empty or too long")),
        None => return Err(invalid("has no order_id")),
    };
    let user = match event.user_id.as_deref() {
        Some(u) => u
            .parse::<UserId>()
            .map_err(|e| invalid(&format!("has a bad user_id: {}", e.0)))?,
        None => return Err(invalid("has no user_id")),
    };
    let amount = match event.amount_cents {
        Some(a) if a >= 0 => a,
        Some(a) => return Err(invalid(&format!("has a negative amount_cents {a}"))),
        None => return Err(invalid("has no amount_cents")),
    };
    // MySQL's DATETIME holds years 1000 to 9999; chrono reads more.
    let year = chrono::Datelike::year(&event.occurred_at);
    if !(1000..=9999).contains(&year) {
        return Err(invalid(&format!(
            "has an occurred_at MySQL cannot hold (year {year})"
        )));
    }
    Ok(Some(Entry {
        event_id: event.event_id.clone(),
        user,
        order_id,
        points: sign * points_for(amount),
        reason: event.kind,
        occurred_at: event.occurred_at,
    }))
}

/// Applies one event in its own transaction (what the consumer does for a
/// batch of one). Tests call it to apply an event without acking it.
pub async fn apply(db: &MySqlPool, event: &Event) -> Result<Outcome, LedgerError> {
    match entry_of(event)? {
        None => Ok(Outcome::Ignored),
        Some(entry) => Ok(apply_entries(db, std::slice::from_ref(&entry)).await?[0]),
    }
}

/// Applies `entries` in one transaction: each new event id gets its entry,
/// and each buyer's balance moves by the sum of the new entries. Returns
/// one outcome per entry, in order (an event id repeated within `entries`
/// is a duplicate after its first time). Nothing changes unless it commits.
pub async fn apply_entries(db: &MySqlPool, entries: &[Entry]) -> Result<Vec<Outcome>, sqlx::Error> {
    if entries.is_empty() {
        return Ok(Vec::new());
    }
    let mut tx = db.begin().await?;
    let outcomes = apply_in(&mut tx, entries).await?;
    tx.commit().await?;
    Ok(outcomes)
}

async fn apply_in(
    tx: &mut Transaction<'_, MySql>,
    entries: &[Entry],
) -> Result<Vec<Outcome>, sqlx::Error> {
    let mut outcomes = Vec::with_capacity(entries.len());
    let mut deltas: BTreeMap<u64, i64> = BTreeMap::new();
    for e in entries {
        // A duplicate key fails this statement only; the transaction goes on.
        let inserted = sqlx::query(
            "INSERT INTO points_entries (event_id, user_id, order_id, points, reason, occurred_at) \
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(&e.event_id)
        .bind(e.user.get())
        .bind(&e.order_id)
        .bind(e.points)
        .bind(e.reason.as_str())
        .bind(e.occurred_at.naive_utc())
        .execute(&mut **tx)
        .await;
        match inserted {
            Ok(_) => {
                *deltas.entry(e.user.get()).or_default() += e.points;
                outcomes.push(Outcome::Applied {
                    user: e.user,
                    points: e.points,
                });
            }
            Err(sqlx::Error::Database(d)) if d.is_unique_violation() => {
                outcomes.push(Outcome::Duplicate);
            }
            Err(err) => return Err(err),
        }
    }
    // In user order, so that consumers side by side lock balances in one
    // order.
    for (user, delta) in deltas {
        sqlx::query(
            "INSERT INTO points_balances (user_id, balance) VALUES (?, ?) \
             ON DUPLICATE KEY UPDATE balance = balance + VALUES(balance)",
        )
        .bind(user)
        .bind(delta)
        .execute(&mut **tx)
        .await?;
    }
    Ok(outcomes)
}

/// One entry as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryRow {
    /// The event's id.
    pub event_id: String,
    /// The order.
    pub order_id: String,
    /// Points (negative for a refund).
    pub points: i64,
    /// `order.paid` or `order.refunded`.
    pub reason: String,
    /// When the change happened.
    pub at: DateTime<Utc>,
}

/// A buyer's balance (0 without entries) and newest entries (by the
/// event's time, then by arrival), at most `limit`, both from one snapshot
/// (one read-only transaction), so the balance counts every entry listed.
pub async fn statement(
    db: &MySqlPool,
    user: UserId,
    limit: u32,
) -> Result<(i64, Vec<EntryRow>), sqlx::Error> {
    let mut tx = db.begin().await?;
    let balance: Option<i64> =
        sqlx::query_scalar("SELECT balance FROM points_balances WHERE user_id = ?")
            .bind(user.get())
            .fetch_optional(&mut *tx)
            .await?;
    let rows = sqlx::query(
        "SELECT event_id, order_id, points, reason, occurred_at FROM points_entries \
         WHERE user_id = ? ORDER BY occurred_at DESC, id DESC LIMIT ?",
    )
    .bind(user.get())
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    let entries = rows
        .into_iter()
        .map(|r| {
            Ok(EntryRow {
                event_id: r.try_get("event_id")?,
                order_id: r.try_get("order_id")?,
                points: r.try_get("points")?,
                reason: r.try_get("reason")?,
                at: r
                    .try_get::<chrono::NaiveDateTime, _>("occurred_at")?
                    .and_utc(),
            })
        })
        .collect::<Result<_, sqlx::Error>>()?;
    Ok((balance.unwrap_or(0), entries))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{order_event_id, SCHEMA_VERSION};

    fn event(kind: EventType, amount: Option<i64>) -> Event {
        Event {
            event_id: order_event_id(kind, "42-17"),
            kind,
            schema_version: SCHEMA_VERSION,
            occurred_at: DateTime::from_timestamp_millis(1_764_000_000_123).unwrap(),
            sale_id: "42".into(),
            order_id: Some("42-17".into()),
            user_id: Some("7".into()),
            qty: Some(1),
            amount_cents: amount,
            payment_id: Some("pay_abc".into()),
            status: None,
            restocked: None,
        }
    }

    #[test]
    fn a_time_mysql_cannot_hold_is_refused_for_good() {
        for text in [
            "-0001-01-01T00:00:00Z",
            "+10000-01-01T00:00:00Z",
            "0999-12-31T23:59:59Z",
        ] {
            let mut e = event(EventType::OrderPaid, Some(100));
            e.occurred_at = text.parse().unwrap();
            let err = entry_of(&e).unwrap_err();
            assert!(err.is_permanent(), "{text}: {err}");
        }
        let encode = LedgerError::Db(sqlx::Error::Encode("out of range".into()));
        assert!(encode.is_permanent());
    }

    #[test]
    fn paid_earns_and_refunded_takes_back_whole_hundreds() {
        let paid = entry_of(&event(EventType::OrderPaid, Some(99_950)))
            .unwrap()
            .unwrap();
        assert_eq!(paid.points, 999);
        assert_eq!(paid.user.get(), 7);
        let refunded = entry_of(&event(EventType::OrderRefunded, Some(99_950)))
            .unwrap()
            .unwrap();
        assert_eq!(refunded.points, -999);
        assert_eq!(points_for(99), 0);
        assert_eq!(points_for(100), 1);
    }

    #[test]
    fn other_types_are_ignored_and_incomplete_events_refused() {
        assert_eq!(
            entry_of(&event(EventType::OrderReserved, None)).unwrap(),
            None
        );
        assert!(entry_of(&event(EventType::OrderPaid, None))
            .unwrap_err()
            .is_permanent());
        assert!(entry_of(&event(EventType::OrderPaid, Some(-1))).is_err());
        let mut e = event(EventType::OrderPaid, Some(100));
        e.user_id = Some("0".into());
        assert!(entry_of(&e).is_err());
        e.user_id = None;
        assert!(entry_of(&e).is_err());
        let mut e = event(EventType::OrderRefunded, Some(100));
        e.order_id = Some("x".repeat(65));
        assert!(entry_of(&e).is_err());
    }
}
