//! The flow stream of a sale, as the reconciler sees it: read the records
//! after a cursor, trim the ones MySQL has committed, measure the backlog.
//!
//! Records are appended by the order scripts (see `lua/prelude.lua`, `save`):
//! `ev` (the event), `o` (the order's seq), `s` (the packed order after
//! the event), `n` (its number among the sale's records), on refunds `r`
//! ("1" when the units went back on sale), on reservations `k` (the key
//! the order was made under), and on late payments `p` and `a` (the payment
//! id and amount the gateway sent after the deadline). Stream ids are Redis-clock milliseconds plus a sequence, so
//! they order a sale's changes exactly as Redis applied them.

use std::fmt;
use std::str::FromStr;

use redis::streams::StreamRangeReply;
use redis::AsyncCommands;

use super::{Engine, EngineError, Order};
use crate::domain::{OrderId, SaleId};

/// A stream entry id, `<ms>-<seq>`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FlowId {
    /// Milliseconds by Redis's clock.
    pub ms: u64,
    /// Sequence within the millisecond.
    pub seq: u64,
}

impl FlowId {
    /// The smallest id after this one.
    pub fn next(self) -> Self {
        match self.seq.checked_add(1) {
            Some(seq) => Self { ms: self.ms, seq },
            None => Self {
                ms: self.ms + 1,
                seq: 0,
            },
        }
    }
}

impl fmt::Display for FlowId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

impl FromStr for FlowId {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || EngineError::Protocol(format!("stream id {s:?}"));
        let (ms, seq) = s.split_once('-').ok_or_else(bad)?;
        Ok(Self {
            ms: ms.parse().map_err(|_| bad())?,
            seq: seq.parse().map_err(|_| bad())?,
        })
    }
}

/// The kind of change a flow record carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowEvent {
    /// A reservation made a pending order.
    Reserve,
    /// A payment made it paid.
    Pay,
    /// Its buyer cancelled it.
    Cancel,
    /// Its deadline closed it.
    Close,
    /// A refund was asked for before the order settled.
    RefundRequest,
    /// It was refunded.
    Refund,
    /// A payment came after the order's deadline (the order stays closed;
    /// the gateway must refund the payment).
    LatePay,
}

impl FlowEvent {
    /// The event as the scripts and MySQL spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reserve => "reserve",
            Self::Pay => "pay",
            Self::Cancel => "cancel",
            Self::Close => "close",
            Self::RefundRequest => "refund_request",
            Self::Refund => "refund",
            Self::LatePay => "late_pay",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "reserve" => Self::Reserve,
            "pay" => Self::Pay,
            "cancel" => Self::Cancel,
            "close" => Self::Close,
            "refund_request" => Self::RefundRequest,
            "refund" => Self::Refund,
            "late_pay" => Self::LatePay,
            _ => return None,
        })
    }
}

/// One change to carry to MySQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowRecord {
    /// Its place in the sale's stream.
    pub id: FlowId,
    /// What happened.
    pub event: FlowEvent,
    /// The order after the change.
    pub order: Order,
    /// For a refund: whether the units went back on sale (the sale was open).
    pub restocked: bool,
    /// For a reservation: the key the order was made under (the buyer's
    /// idempotency key, or the request's retry key), kept in MySQL so a
    /// sale rebuilt from there still finds the order by it.
    pub key: Option<String>,
    /// Its number among the sale's records (1, 2, 3, ...; `None` in records
    /// written before records were numbered).
    pub n: Option<u64>,
    /// For a late payment: what the gateway took.
    pub late: Option<LatePayment>,
}

/// A payment that came after its order's deadline (a `late_pay` record).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatePayment {
    /// The gateway's payment id.
    pub payment_id: String,
    /// The amount paid, in cents.
    pub amount_cents: i64,
}

/// A stream entry the reconciler cannot read as a flow record (an unknown
/// event, a missing field, an order that does not unpack): kept whole, so it
/// can be quarantined as received instead of stopping its sale for good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnreadableRecord {
    /// Its place in the sale's stream.
    pub id: FlowId,
    /// Its fields as received (values lossily decoded as UTF-8).
    pub fields: std::collections::BTreeMap<String, String>,
    /// Why it is not a flow record.
    pub error: String,
}

/// One entry of a sale's flow stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FlowEntry {
    /// A flow record.
    Record(FlowRecord),
    /// An entry that is not one.
    Unreadable(UnreadableRecord),
}

impl FlowEntry {
    /// Its number among the sale's records, when it has one.
    pub fn number(&self) -> Option<u64> {
        match self {
            Self::Record(r) => r.n,
            Self::Unreadable(u) => u.fields.get("n").and_then(|n| n.parse().ok()),
        }
    }

    /// Its place in the sale's stream.
    pub fn id(&self) -> FlowId {
        match self {
            Self::Record(r) => r.id,
            Self::Unreadable(u) => u.id,
        }
    }
}

fn decode(sale: SaleId, entry: &redis::streams::StreamId) -> Result<FlowEntry, EngineError> {
    let id: FlowId = entry.id.parse()?;
    let field = |name: &str| entry.get::<String>(name);
    let record = (|| {
        let event = field("ev").ok_or("no field ev")?;
        let event = FlowEvent::parse(&event).ok_or(format!("unknown event {event:?}"))?;
        let seq: u64 = field("o")
            .ok_or("no field o")?
            .parse()
            .map_err(|_| "field o is not an order seq")?;
        let packed = field("s").ok_or("no field s")?;
        let order = Order::unpack(OrderId::new(sale, seq), &packed)
            .ok_or(format!("field s {packed:?} is not a packed order"))?;
        Ok::<_, String>(FlowRecord {
            id,
            event,
            order,
            restocked: field("r").is_some_and(|r| r == "1"),
            key: field("k").filter(|_| event == FlowEvent::Reserve),
            n: match field("n") {
                Some(n) => Some(n.parse().map_err(|_| "field n is not a number")?),
                None => None,
            },
            late: if event == FlowEvent::LatePay {
                Some(LatePayment {
                    payment_id: field("p").ok_or("a late_pay record without field p")?,
                    amount_cents: field("a")
                        .ok_or("a late_pay record without field a")?
                        .parse()
                        .map_err(|_| "field a is not an amount")?,
                })
            } else {
                None
            },
        })
    })();
    Ok(match record {
        Ok(r) => FlowEntry::Record(r),
        Err(error) => FlowEntry::Unreadable(UnreadableRecord {
            id,
            fields: entry
                .map
                .iter()
                .map(|(k, v)| {
                    let v = match v {
                        redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
                        other => format!("{other:?}"),
                    };
                    (k.clone(), v)
                })
                .collect(),
            error,
        }),
    })
}

impl Engine {
    /// Up to `count` entries of `sale`'s flow stream after `after`, oldest
    /// first, each a flow record or an entry that is not one.
    pub async fn read_flow_entries(
        &self,
        sale: SaleId,
        after: FlowId,
        count: usize,
    ) -> Result<Vec<FlowEntry>, EngineError> {
        let key = self.keys.sale(sale).flow;
        let mut c = self.conn.clone();
        let start = format!("({after}");
        let reply: StreamRangeReply = self
            .timed(async move { c.xrange_count(&key, start, "+", count).await })
            .await?;
        reply.ids.iter().map(|entry| decode(sale, entry)).collect()
    }

    /// With acknowledged writes (`FLASHSALE_REDIS_WAIT_REPLICAS`), returns
    /// once the replicas hold everything `sale`'s primary held when it was
    /// called: a write to the sale's barrier key, sent with its WAIT after
    /// the caller's reads, is replicated after them. The reconciler calls it
    /// between reading records and committing them, so MySQL never holds a
    /// record (an order id) that a promoted replica lacks and would give
    /// out again. Without acknowledged writes it returns at once.
    pub async fn replicated(&self, sale: SaleId) -> Result<(), EngineError> {
        if self.conn.wait_replicas() == 0 {
            return Ok(());
        }
        let k = self.keys.sale(sale);
        let mut set = redis::cmd("SET");
        set.arg(&k.barrier).arg(1).arg("PX").arg(60_000);
        self.conn.write::<()>(&k.sale, &set, self.timeout).await
    }

    /// Up to `count` flow records of `sale` after `after`, oldest first; an
    /// entry that is not a flow record is an error (the reconciler, which
    /// quarantines such entries, reads [`Engine::read_flow_entries`]).
    pub async fn read_flow(
        &self,
        sale: SaleId,
        after: FlowId,
        count: usize,
    ) -> Result<Vec<FlowRecord>, EngineError> {
        self.read_flow_entries(sale, after, count)
            .await?
            .into_iter()
            .map(|e| match e {
                FlowEntry::Record(r) => Ok(r),
                FlowEntry::Unreadable(u) => Err(EngineError::Protocol(format!(
                    "flow record {}: {}",
                    u.id, u.error
                ))),
            })
            .collect()
    }

    /// After MySQL committed the records of `sale` up to and including
    /// `upto`: marks them settled (refunds of their orders may proceed) and
    /// deletes them from the stream. Repeating it is harmless.
    pub async fn settle(&self, sale: SaleId, upto: FlowId) -> Result<(), EngineError> {
        let k = self.keys.sale(sale);
        let mut c = self.conn.clone();
        let mut inv = self.scripts.settle.key(&k.sale);
        inv.key(&k.flow).arg(upto.ms).arg(upto.seq);
        self.timed(inv.invoke_async::<i64>(&mut c)).await.map(drop)
    }

    /// Records waiting in `sale`'s stream, and the id of the oldest one.
    pub async fn flow_backlog(&self, sale: SaleId) -> Result<(u64, Option<FlowId>), EngineError> {
        let key = self.keys.sale(sale).flow;
        let mut c = self.conn.clone();
        let (len, first): (u64, StreamRangeReply) = self
            .timed(async move {
                redis::pipe()
                    .xlen(&key)
                    .xrange_count(&key, "-", "+", 1)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        let oldest = first.ids.first().map(|e| e.id.parse()).transpose()?;
        Ok((len, oldest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_ids_order_and_step() {
        let a: FlowId = "1700000000000-5".parse().unwrap();
        assert_eq!(a.next().to_string(), "1700000000000-6");
        assert!(a < "1700000000001-0".parse().unwrap());
        assert!("x-1".parse::<FlowId>().is_err());
    }
}
