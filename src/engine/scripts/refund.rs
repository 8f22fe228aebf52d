//! `lua/refund.lua`: a paid order refunded at once when settled, otherwise
//! accepted and retried from the due-queue.

use redis::{FromRedisValue, ParsingError, Value};

use super::reply::{tagged, unknown};

/// The script's reply (packed orders: see `engine::order`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reply {
    /// Refunded, by this call (`now`) or before.
    Refunded { packed: String, now: bool },
    /// refund_pending (now, or before).
    Accepted(String),
    /// Pending, cancelled or closed.
    NotPaid(String),
    /// No such order, or not the caller's.
    NotFound,
    /// The sale is retired: MySQL alone refunds its orders now.
    Retired,
}

impl FromRedisValue for Reply {
    fn from_redis_value(v: Value) -> Result<Self, ParsingError> {
        let (tag, f) = tagged("refund", v)?;
        Ok(match (tag.as_str(), f.as_slice()) {
            ("ok", [p, n]) if n == "0" || n == "1" => Self::Refunded {
                packed: p.clone(),
                now: n == "1",
            },
            ("accepted", [p]) => Self::Accepted(p.clone()),
            ("order_not_paid", [p]) => Self::NotPaid(p.clone()),
            ("not_found", []) => Self::NotFound,
            ("retired", []) => Self::Retired,
            _ => return Err(unknown("refund", &(tag, f))),
        })
    }
}
