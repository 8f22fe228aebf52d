//! `lua/control.lua`: an admin's pause, resume or end of a sale.

use redis::{FromRedisValue, ParsingError, Value};

use super::reply::{tagged, unknown};

/// The script's reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reply {
    /// Done (or already so); the sale's end after it, in ms.
    Done(i64),
    /// Pause or resume of a sale that has ended or retired: nothing changed.
    Ended,
    /// Redis does not hold the sale.
    NotFound,
}

impl FromRedisValue for Reply {
    fn from_redis_value(v: Value) -> Result<Self, ParsingError> {
        let (tag, f) = tagged("control", v)?;
        Ok(match (tag.as_str(), f.as_slice()) {
            ("ok", [end]) if end.parse::<i64>().is_ok() => {
                Self::Done(end.parse().unwrap_or_default())
            }
            ("ended", []) => Self::Ended,
            ("not_found", []) => Self::NotFound,
            _ => return Err(unknown("control", &(tag, f))),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::reply::tests::reply;
    use super::*;

    #[test]
    fn the_contract_decodes_and_nothing_else_does() {
        assert_eq!(
            Reply::from_redis_value(reply(&["ok", "1700000000123"])).unwrap(),
            Reply::Done(1_700_000_000_123)
        );
        assert_eq!(
            Reply::from_redis_value(reply(&["ended"])).unwrap(),
            Reply::Ended
        );
        for bad in [&["ok"][..], &["ok", "soon"], &["ended", "1"], &["paused"]] {
            assert!(Reply::from_redis_value(reply(bad)).is_err(), "{bad:?}");
        }
    }
}
