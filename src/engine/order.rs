//! The packed order layout shared with the Lua scripts.
//!
//! Scripts reply with an order packed as one string,
//! `status|user|qty|amount|created|deadline|paid|closed|refunded|flow|payment_id`
//! (times in ms by Redis's clock, empty when unset; `flow` is the id of the
//! order's last flow record), and flow records carry the same form. The
//! orders buckets (`<orders>:<n>`, see `keys.rs`) keep a shorter form that
//! only the scripts read and write (`store_order`/`load_order` in `lua/prelude.lua`; readers outside
//! the scripts go through `lua/read_orders.lua`). This module only parses.

use crate::domain::{OrderId, UserId};

/// Where an order stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    /// Reserved, waiting for payment until its deadline.
    Pending,
    /// Paid before its deadline.
    Paid,
    /// Cancelled by its buyer while pending.
    Cancelled,
    /// Closed unpaid at its deadline.
    Closed,
    /// Refund accepted, waiting for the order to settle.
    RefundPending,
    /// Refunded.
    Refunded,
}

impl OrderStatus {
    /// Parses the status as the API and the scripts spell it.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => Self::Pending,
            "paid" => Self::Paid,
            "cancelled" => Self::Cancelled,
            "closed" => Self::Closed,
            "refund_pending" => Self::RefundPending,
            "refunded" => Self::Refunded,
            _ => return None,
        })
    }

    /// The status as the API and the scripts spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Paid => "paid",
            Self::Cancelled => "cancelled",
            Self::Closed => "closed",
            Self::RefundPending => "refund_pending",
            Self::Refunded => "refunded",
        }
    }
}

/// One order as Redis holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    /// The order's id (names its sale).
    pub id: OrderId,
    /// Where it stands.
    pub status: OrderStatus,
    /// The buyer.
    pub user: UserId,
    /// Units reserved.
    pub qty: u32,
    /// Price times quantity, in cents.
    pub amount_cents: i64,
    /// Reservation time, ms since the epoch by Redis's clock.
    pub created_ms: i64,
    /// Payment deadline, ms since the epoch by Redis's clock.
    pub deadline_ms: i64,
    /// When it was paid.
    pub paid_ms: Option<i64>,
    /// When it was cancelled or closed.
    pub closed_ms: Option<i64>,
    /// When it was refunded.
    pub refunded_ms: Option<i64>,
    /// The id of its last flow record (empty in the copy a record carries).
    pub last_flow: String,
    /// The gateway's payment id, once paid.
    pub payment_id: Option<String>,
}

impl Order {
    /// Packs the order as the scripts do (the inverse of [`Order::unpack`]).
    pub fn pack(&self) -> String {
        let opt = |v: Option<i64>| v.map(|v| v.to_string()).unwrap_or_default();
        format!(
            "{}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}",
            self.status.as_str(),
            self.user,
            self.qty,
            self.amount_cents,
            self.created_ms,
            self.deadline_ms,
            opt(self.paid_ms),
            opt(self.closed_ms),
            opt(self.refunded_ms),
            self.last_flow,
            self.payment_id.as_deref().unwrap_or("")
        )
    }

    /// Parses a packed order; `None` when the string is not one.
    pub fn unpack(id: OrderId, packed: &str) -> Option<Self> {
        let mut f = packed.splitn(11, '|');
        let mut next = || f.next();
        let opt_ms = |s: &str| -> Option<Option<i64>> {
            if s.is_empty() {
                Some(None)
            } else {
                s.parse().ok().map(Some)
            }
        };
        let status = OrderStatus::parse(next()?)?;
        let user = next()?.parse().ok()?;
        let qty = next()?.parse().ok()?;
        let amount_cents = next()?.parse().ok()?;
        let created_ms = next()?.parse().ok()?;
        let deadline_ms = next()?.parse().ok()?;
        let paid_ms = opt_ms(next()?)?;
        let closed_ms = opt_ms(next()?)?;
        let refunded_ms = opt_ms(next()?)?;
        let last_flow = next()?.to_owned();
        let payment_id = Some(next()?).filter(|s| !s.is_empty()).map(str::to_owned);
        Some(Self {
            id,
            status,
            user,
            qty,
            amount_cents,
            created_ms,
            deadline_ms,
            paid_ms,
            closed_ms,
            refunded_ms,
            last_flow,
            payment_id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpacks_what_the_scripts_write() {
        let id: OrderId = "3-9".parse().unwrap();
        let o = Order::unpack(id, "pending|7|2|1998|1000|2000|||||").unwrap();
        assert_eq!(o.status, OrderStatus::Pending);
        assert_eq!((o.user.get(), o.qty, o.amount_cents), (7, 2, 1998));
        assert_eq!((o.created_ms, o.deadline_ms), (1000, 2000));
        assert_eq!((o.paid_ms, o.payment_id), (None, None));
        let p = Order::unpack(id, "paid|7|1|5|1|2|3|||9-1|pay|x").unwrap();
        assert_eq!(p.paid_ms, Some(3));
        assert_eq!(p.last_flow, "9-1");
        assert_eq!(p.payment_id.as_deref(), Some("pay|x"));
        assert!(Order::unpack(id, "weird|7|1|5|1|2|||||").is_none());
        for packed in [
            "paid|7|1|5|1|2|3|||9-1|pay|x",
            "pending|7|2|1998|1000|2000|||||",
        ] {
            assert_eq!(Order::unpack(id, packed).unwrap().pack(), packed);
        }
        assert!(Order::unpack(id, "pending|7|1").is_none());
    }
}
