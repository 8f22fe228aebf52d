//! `lua/guard.lua`: whether Redis's copy of a sale is this database's,
//! there at all and not behind MySQL; fences it when not.

use redis::{FromRedisValue, ParsingError, Value};

use super::reply::{tagged, unknown};

/// The script's reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reply {
    /// This database's sale, not behind.
    Ok,
    /// Fenced, for this reason.
    Fenced(String),
}

impl FromRedisValue for Reply {
    fn from_redis_value(v: Value) -> Result<Self, ParsingError> {
        let (tag, f) = tagged("guard", v)?;
        Ok(match (tag.as_str(), f.as_slice()) {
            ("ok", []) => Self::Ok,
            ("fenced", [reason]) => Self::Fenced(reason.clone()),
            _ => return Err(unknown("guard", &(tag, f))),
        })
    }
}
