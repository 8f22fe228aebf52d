//! Downstream events: what the outbox holds, the relay publishes and the
//! consumers read (API.md "Events"). One type for all three, so the body a
//! consumer parses is the body the reconciler wrote.
//!
//! An event's id is derived from what happened (the order and the change,
//! or the sale and the flow record that emptied it), never drawn at random:
//! a flow record applied again, an audit repair that writes the same change
//! or a relay that publishes a row twice all carry the same id, and
//! consumers de-duplicate by it.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The version of the body below; a consumer refuses a version it does not
/// know instead of guessing.
pub const SCHEMA_VERSION: u32 = 1;

/// The exchange events go to unless `FLASHSALE_AMQP_EXCHANGE` renames it.
pub const DEFAULT_EXCHANGE: &str = "flashsale.events";

/// An event's type, which is also its routing key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventType {
    /// A reservation made a pending order.
    #[serde(rename = "order.reserved")]
    OrderReserved,
    /// The order was paid.
    #[serde(rename = "order.paid")]
    OrderPaid,
    /// Its buyer cancelled it.
    #[serde(rename = "order.cancelled")]
    OrderCancelled,
    /// Its payment deadline closed it.
    #[serde(rename = "order.closed")]
    OrderClosed,
    /// A refund was asked for and waits for the order to settle.
    #[serde(rename = "order.refund_requested")]
    OrderRefundRequested,
    /// It was refunded.
    #[serde(rename = "order.refunded")]
    OrderRefunded,
    /// A payment came after the order's deadline: the gateway must refund it.
    #[serde(rename = "payment.late")]
    PaymentLate,
    /// The sale's available stock reached 0.
    #[serde(rename = "sale.sold_out")]
    SaleSoldOut,
}

impl EventType {
    /// Every type, in the order the API lists them.
    pub const ALL: [Self; 8] = [
        Self::OrderReserved,
        Self::OrderPaid,
        Self::OrderCancelled,
        Self::OrderClosed,
        Self::OrderRefundRequested,
        Self::OrderRefunded,
        Self::PaymentLate,
        Self::SaleSoldOut,
    ];

    /// The type as the body and the routing key spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OrderReserved => "order.reserved",
            Self::OrderPaid => "order.paid",
            Self::OrderCancelled => "order.cancelled",
            Self::OrderClosed => "order.closed",
            Self::OrderRefundRequested => "order.refund_requested",
            Self::OrderRefunded => "order.refunded",
            Self::PaymentLate => "payment.late",
            Self::SaleSoldOut => "sale.sold_out",
        }
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EventType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| format!("unknown event type {s:?}"))
    }
}

/// One event, as published (JSON, ids as strings, as the API writes them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Unique per event; the same change always has the same id.
    pub event_id: String,
    /// What happened (also the routing key).
    #[serde(rename = "type")]
    pub kind: EventType,
    /// [`SCHEMA_VERSION`] when written.
    pub schema_version: u32,
    /// When the change happened, by Redis's clock.
    pub occurred_at: DateTime<Utc>,
    /// The sale.
    pub sale_id: String,
    /// The order (absent for sale events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order_id: Option<String>,
    /// The buyer (absent for sale events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// Units of the order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qty: Option<u32>,
    /// The order's amount; for `payment.late`, the amount the gateway took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount_cents: Option<i64>,
    /// The gateway's payment id (paid and refunded orders, late payments).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payment_id: Option<String>,
    /// The order's status after the change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// For `order.refunded`: whether the units went back on sale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restocked: Option<bool>,
}

impl Event {
    /// The body as published.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("an event serializes")
    }

    /// Parses a published body, refusing a schema version this build does
    /// not know.
    pub fn parse(body: &[u8]) -> Result<Self, String> {
        let e: Self = serde_json::from_slice(body).map_err(|e| format!("not an event: {e}"))?;
        if e.schema_version != SCHEMA_VERSION {
            return Err(format!(
                "schema version {} (this build reads {SCHEMA_VERSION})",
                e.schema_version
            ));
        }
        Ok(e)
    }
}

/// The event id of the change named by `key` (for example
/// `order.paid/42-17`): a UUID-shaped digest, so ids have one length
/// whatever they name, and the same key always gives the same id.
pub fn event_id(key: &str) -> String {
    let d = Sha256::digest(format!("flashsale-event/{key}").as_bytes());
    let h = hex::encode(&d[..16]);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// The id of an order's event of `kind` (an order is reserved, paid,
/// cancelled, closed, refunded at most once).
pub fn order_event_id(kind: EventType, order_id: &str) -> String {
    event_id(&format!("{kind}/{order_id}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_distinct() {
        let a = order_event_id(EventType::OrderPaid, "42-17");
        assert_eq!(a, order_event_id(EventType::OrderPaid, "42-17"));
        assert_ne!(a, order_event_id(EventType::OrderRefunded, "42-17"));
        assert_ne!(a, order_event_id(EventType::OrderPaid, "42-18"));
        assert_eq!(a.len(), 36);
    }

    #[test]
    fn a_body_round_trips_and_a_foreign_version_is_refused() {
        let e = Event {
            event_id: order_event_id(EventType::OrderPaid, "42-17"),
            kind: EventType::OrderPaid,
            schema_version: SCHEMA_VERSION,
            occurred_at: DateTime::from_timestamp_millis(1_764_000_000_123).unwrap(),
            sale_id: "42".into(),
            order_id: Some("42-17".into()),
            user_id: Some("7".into()),
            qty: Some(1),
            amount_cents: Some(99_900),
            payment_id: Some("pay_abc".into()),
            status: Some("paid".into()),
            restocked: None,
        };
        let json = e.to_json();
        assert!(json.contains(r#""type":"order.paid""#), "{json}");
        assert!(json.contains(r#""order_id":"42-17""#), "{json}");
        assert!(!json.contains("restocked"), "{json}");
        assert_eq!(Event::parse(json.as_bytes()).unwrap(), e);
        let v2 = json.replace(r#""schema_version":1"#, r#""schema_version":2"#);
        assert!(Event::parse(v2.as_bytes()).is_err());
        assert!(Event::parse(b"{not json").is_err());
        for t in EventType::ALL {
            assert_eq!(t.as_str().parse::<EventType>().unwrap(), t);
        }
    }
}
