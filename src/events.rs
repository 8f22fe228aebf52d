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

use crate::domain::SaleId;
use crate::engine::{FlowEvent, FlowId, LatePayment, Order};

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

    /// The event a flow record of `event` tells of.
    pub fn of_flow(event: FlowEvent) -> Self {
        match event {
            FlowEvent::Reserve => Self::OrderReserved,
            FlowEvent::Pay => Self::OrderPaid,
            FlowEvent::Cancel => Self::OrderCancelled,
            FlowEvent::Close => Self::OrderClosed,
            FlowEvent::RefundRequest => Self::OrderRefundRequested,
            FlowEvent::Refund => Self::OrderRefunded,
            FlowEvent::LatePay => Self::PaymentLate,
        }
    }

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

fn at(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

impl Event {
    /// The event `kind` of order `o` (its state after the change), which
    /// happened at `at_ms` by Redis's clock.
    pub fn of_order(kind: EventType, o: &Order, at_ms: i64) -> Self {
        let order_id = o.id.to_string();
        Self {
            event_id: order_event_id(kind, &order_id),
            kind,
            schema_version: SCHEMA_VERSION,
            occurred_at: at(at_ms),
            sale_id: o.id.sale().to_string(),
            order_id: Some(order_id),
            user_id: Some(o.user.to_string()),
            qty: Some(o.qty),
            amount_cents: Some(o.amount_cents),
            payment_id: o.payment_id.clone(),
            status: Some(o.status.as_str().to_owned()),
            restocked: None,
        }
    }

    /// The events order `o` has had to reach its state (reserved; paid when
    /// it was paid; cancelled, closed or refunded), each at its own time:
    /// what a change written outside the reconciler (a sweep's close, a
    /// retired sale's refund, an audit repair) owes the outbox. Their ids
    /// are the ids the reconciler gives the same changes.
    pub fn history(o: &Order) -> Vec<Self> {
        use crate::engine::OrderStatus::*;
        let mut reserved = Self::of_order(EventType::OrderReserved, o, o.created_ms);
        reserved.status = Some("pending".to_owned());
        reserved.payment_id = None;
        let mut out = vec![reserved];
        let mut push = |kind, status: &str, at_ms: Option<i64>| {
            if let Some(ms) = at_ms {
                let mut e = Self::of_order(kind, o, ms);
                e.status = Some(status.to_owned());
                out.push(e);
            }
        };
        push(EventType::OrderPaid, "paid", o.paid_ms);
        match o.status {
            Cancelled => push(EventType::OrderCancelled, "cancelled", o.closed_ms),
            Closed => push(EventType::OrderClosed, "closed", o.closed_ms),
            Refunded => push(EventType::OrderRefunded, "refunded", o.refunded_ms),
            Pending | Paid | RefundPending => {}
        }
        out
    }

    /// A payment of closed order `o` that came after its deadline; one
    /// event per order and payment id, however often the gateway sent it.
    pub fn late_payment(o: &Order, late: &LatePayment, at_ms: i64) -> Self {
        let mut e = Self::of_order(EventType::PaymentLate, o, at_ms);
        e.event_id = event_id(&format!(
            "{}/{}/{}",
            EventType::PaymentLate,
            o.id,
            late.payment_id
        ));
        e.amount_cents = Some(late.amount_cents);
        e.payment_id = Some(late.payment_id.clone());
        e
    }

    /// `sale`'s available stock reached 0 with the change of flow record
    /// `flow` (one event each time it does).
    pub fn sold_out(sale: SaleId, flow: FlowId) -> Self {
        Self {
            event_id: event_id(&format!("{}/{sale}/{flow}", EventType::SaleSoldOut)),
            kind: EventType::SaleSoldOut,
            schema_version: SCHEMA_VERSION,
            occurred_at: at(flow.ms as i64),
            sale_id: sale.to_string(),
            order_id: None,
            user_id: None,
            qty: None,
            amount_cents: None,
            payment_id: None,
            status: None,
            restocked: None,
        }
    }

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
