//! `lua/expire.lua`: one call's work on one sale's due-queue.

use redis::{FromRedisValue, ParsingError, Value};

use super::reply::unknown;

/// The script's reply: `{claimed, closed, still_due, next_due_ms or -1,
/// now_ms, refunded, dead_lettered, refunds_waiting, lateness_ms of each
/// closed order..., wait_ms of each refund..., the first buckets of the
/// index...}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reply {
    pub claimed: i64,
    pub closed: usize,
    pub still_due: i64,
    pub next_due_ms: Option<i64>,
    pub now_ms: i64,
    pub refunded: usize,
    pub dead_lettered: i64,
    pub refunds_waiting: i64,
    pub lateness_ms: Vec<i64>,
    pub refund_wait_ms: Vec<i64>,
    /// The first buckets of the due-queue's index: the next call declares
    /// them.
    pub next_buckets: Vec<u64>,
}

impl FromRedisValue for Reply {
    fn from_redis_value(v: Value) -> Result<Self, ParsingError> {
        let Value::Array(items) = v else {
            return Err(unknown("expire", &v));
        };
        let n: Vec<i64> = items
            .iter()
            .map(|i| match i {
                Value::Int(n) => Ok(*n),
                other => Err(unknown("expire", other)),
            })
            .collect::<Result<_, _>>()?;
        let bad = || unknown("expire", &n);
        let head = n.get(..8).ok_or_else(bad)?;
        let closed = usize::try_from(head[1]).map_err(|_| bad())?;
        let refunded = usize::try_from(head[5]).map_err(|_| bad())?;
        let buckets = 8 + closed + refunded;
        if n.len() < buckets || n[buckets..].iter().any(|b| *b < 0) {
            return Err(bad());
        }
        Ok(Self {
            claimed: head[0],
            closed,
            still_due: head[2],
            next_due_ms: (head[3] >= 0).then_some(head[3]),
            now_ms: head[4],
            refunded,
            dead_lettered: head[6],
            refunds_waiting: head[7],
            lateness_ms: n[8..8 + closed].to_vec(),
            refund_wait_ms: n[8 + closed..buckets].to_vec(),
            next_buckets: n[buckets..].iter().map(|b| *b as u64).collect(),
        })
    }
}
