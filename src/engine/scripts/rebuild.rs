//! The replies of the rebuild's first and last steps: `lua/rebuild_begin.lua`
//! and `lua/rebuilt.lua`.

use redis::{FromRedisValue, ParsingError, Value};

use super::reply::{tagged, unknown};

/// `lua/rebuild_begin.lua`'s reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Begun {
    /// Taken: the fence it had, the order counter, the highest seq a
    /// caller reported, the last flow number.
    Taken {
        fence: String,
        counter: u64,
        lost_hint: u64,
        flows: u64,
    },
    /// Not a sale a rebuild may take (foreign, not fenced, ...).
    Refused(String),
}

impl FromRedisValue for Begun {
    fn from_redis_value(v: Value) -> Result<Self, ParsingError> {
        let (tag, f) = tagged("rebuild_begin", v)?;
        let num = |s: &String| s.parse::<u64>().ok();
        Ok(match (tag.as_str(), f.as_slice()) {
            ("ok", [fence, c, h, n]) => match (num(c), num(h), num(n)) {
                (Some(counter), Some(lost_hint), Some(flows)) => Self::Taken {
                    fence: fence.clone(),
                    counter,
                    lost_hint,
                    flows,
                },
                _ => return Err(unknown("rebuild_begin", &f)),
            },
            ("refused", [why]) => Self::Refused(why.clone()),
            _ => return Err(unknown("rebuild_begin", &(tag, f))),
        })
    }
}

/// `lua/rebuilt.lua`'s reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Lifted {
    /// The sale serves again.
    Done,
    /// A caller has since reported this higher seq.
    Again(u64),
    /// The fence is younger than the least time a sale stays fenced: try
    /// again after this many ms.
    Wait(u64),
}

impl FromRedisValue for Lifted {
    fn from_redis_value(v: Value) -> Result<Self, ParsingError> {
        let (tag, f) = tagged("rebuilt", v)?;
        let num = |s: &String| s.parse::<u64>().ok();
        Ok(match (tag.as_str(), f.as_slice()) {
            ("ok", []) => Self::Done,
            ("again", [h]) if num(h).is_some() => Self::Again(num(h).unwrap_or_default()),
            ("wait", [ms]) if num(ms).is_some() => Self::Wait(num(ms).unwrap_or_default()),
            _ => return Err(unknown("rebuilt", &(tag, f))),
        })
    }
}
