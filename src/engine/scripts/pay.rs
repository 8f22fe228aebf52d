//! `lua/pay.lua`: a successful payment applied to a pending order, unless
//! its deadline has passed by Redis's clock.

use redis::{FromRedisValue, ParsingError, Value};

use super::reply::{tagged, unknown};

/// The script's reply (packed orders: see `engine::order`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reply {
    /// Now paid.
    Paid(String),
    /// Paid before with this payment id.
    AlreadyPaid(String),
    /// Past the deadline: closed by this call (`closed_now`) or before.
    Expired { packed: String, closed_now: bool },
    /// Cancelled, or paid with another payment id.
    NotPending(String),
    /// Another amount than the order's; nothing changed.
    AmountMismatch(String),
    /// No such order.
    NotFound,
}

impl FromRedisValue for Reply {
    fn from_redis_value(v: Value) -> Result<Self, ParsingError> {
        let (tag, f) = tagged("pay", v)?;
        Ok(match (tag.as_str(), f.as_slice()) {
            ("ok", [p]) => Self::Paid(p.clone()),
            ("dup", [p]) => Self::AlreadyPaid(p.clone()),
            ("order_expired", [p, c]) if c == "0" || c == "1" => Self::Expired {
                packed: p.clone(),
                closed_now: c == "1",
            },
            ("order_not_pending", [p]) => Self::NotPending(p.clone()),
            ("amount_mismatch", [p]) => Self::AmountMismatch(p.clone()),
            ("not_found", []) => Self::NotFound,
            _ => return Err(unknown("pay", &(tag, f))),
        })
    }
}
