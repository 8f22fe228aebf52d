//! `lua/cancel.lua`: the buyer gives up a pending order (closed instead at
//! or past its deadline).

use redis::{FromRedisValue, ParsingError, Value};

use super::reply::{tagged, unknown};

/// The script's reply (packed orders: see `engine::order`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reply {
    /// Now cancelled.
    Cancelled(String),
    /// Not pending; closed by this call when it was overdue (`closed_now`).
    NotPending { packed: String, closed_now: bool },
    /// No such order, or not the caller's.
    NotFound,
}

impl FromRedisValue for Reply {
    fn from_redis_value(v: Value) -> Result<Self, ParsingError> {
        let (tag, f) = tagged("cancel", v)?;
        Ok(match (tag.as_str(), f.as_slice()) {
            ("ok", [p]) => Self::Cancelled(p.clone()),
            ("order_not_pending", [p, c]) if c == "0" || c == "1" => Self::NotPending {
                packed: p.clone(),
                closed_now: c == "1",
            },
            ("not_found", []) => Self::NotFound,
            _ => return Err(unknown("cancel", &(tag, f))),
        })
    }
}
