//! `lua/retire.lua`: an ended sale with no work left marked retired.

use redis::{FromRedisValue, ParsingError, Value};

use super::reply::{tagged, unknown};

/// The script's reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reply {
    /// Retired, by this call or before.
    Retired,
    /// Work is left: `not_ended`, `pending`, `refunds`, `due`, `flow` or
    /// `unsettled`.
    Busy(String),
    /// Redis does not hold the sale.
    NotFound,
}

impl FromRedisValue for Reply {
    fn from_redis_value(v: Value) -> Result<Self, ParsingError> {
        let (tag, f) = tagged("retire", v)?;
        Ok(match (tag.as_str(), f.as_slice()) {
            ("ok", []) => Self::Retired,
            ("busy", [why]) => Self::Busy(why.clone()),
            ("not_found", []) => Self::NotFound,
            _ => return Err(unknown("retire", &(tag, f))),
        })
    }
}
