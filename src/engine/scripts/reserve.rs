//! `lua/reserve.lua`: reservations of one sale, combined into one call and
//! judged each as if it came alone.

use redis::{FromRedisValue, ParsingError, Value};

use super::reply::{strings, unknown};

/// What the script answered for one reservation of a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// A new pending order (also when the same call comes again).
    Created { seq: u64, packed: String },
    /// The order this idempotency or retry key made before.
    Existing { seq: u64, packed: String },
    /// Not enough units: `left` is what is left (0: sold out; -1: a
    /// resent call's record, which keeps no count).
    SoldOut { left: i64 },
    /// One of the script's refusals, as it spells it (`not_found`,
    /// `sale_not_started`, `sale_ended`, `sale_paused`, `limit_exceeded`,
    /// `backlog_full`).
    Refused(Refusal),
}

/// A reservation the script refused without an order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    NotFound,
    NotStarted,
    Ended,
    Paused,
    LimitExceeded,
    BacklogFull,
}

impl Outcome {
    /// The order seq, for a reservation that has an order.
    pub(crate) fn seq(&self) -> Option<u64> {
        match self {
            Self::Created { seq, .. } | Self::Existing { seq, .. } => Some(*seq),
            _ => None,
        }
    }
}

impl FromRedisValue for Outcome {
    fn from_redis_value(v: Value) -> Result<Self, ParsingError> {
        let f = strings("reserve", v)?;
        let seq = |s: &String| s.parse::<u64>().ok();
        Ok(match f.as_slice() {
            [t, s, p] if t == "ok" && seq(s).is_some() => Self::Created {
                seq: seq(s).unwrap_or_default(),
                packed: p.clone(),
            },
            [t, s, p] if t == "dup" && seq(s).is_some() => Self::Existing {
                seq: seq(s).unwrap_or_default(),
                packed: p.clone(),
            },
            [t, n] if t == "sold_out" && n.parse::<i64>().is_ok() => Self::SoldOut {
                left: n.parse().unwrap_or_default(),
            },
            [t] => Self::Refused(match t.as_str() {
                "not_found" => Refusal::NotFound,
                "sale_not_started" => Refusal::NotStarted,
                "sale_ended" => Refusal::Ended,
                "sale_paused" => Refusal::Paused,
                "limit_exceeded" => Refusal::LimitExceeded,
                "backlog_full" => Refusal::BacklogFull,
                _ => return Err(unknown("reserve", &f)),
            }),
            _ => return Err(unknown("reserve", &f)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::reply::tests::reply;
    use super::*;

    #[test]
    fn each_outcome_of_the_contract_decodes_and_nothing_else_does() {
        let ok = Outcome::from_redis_value(reply(&["ok", "7", "pending|1|1|100|1|2|||||"]));
        assert_eq!(ok.unwrap().seq(), Some(7));
        assert_eq!(
            Outcome::from_redis_value(reply(&["sold_out", "0"])).unwrap(),
            Outcome::SoldOut { left: 0 }
        );
        assert_eq!(
            Outcome::from_redis_value(reply(&["limit_exceeded"])).unwrap(),
            Outcome::Refused(Refusal::LimitExceeded)
        );
        for bad in [
            &["ok", "x", "p"][..],
            &["ok", "7"],
            &["sold_out"],
            &["made_up"],
            &[],
        ] {
            assert!(Outcome::from_redis_value(reply(bad)).is_err(), "{bad:?}");
        }
    }
}
