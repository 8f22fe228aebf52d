//! The audit's reads and compare-and-set repairs of a sale in Redis. Reads
//! are paged (bounded memory whatever the sale's size); the one read that
//! must be atomic, the counters beside the stream's position, is a script.
//! Repairs are typed ([`Repair`]): each renders its own arguments for
//! `lua/audit_fix.lua`, and the script's reply decodes itself
//! ([`Repaired`]), refusing any shape the script does not answer.

use std::collections::HashMap;

use redis::{AsyncCommands, FromRedisValue, ParsingError, Value};

use super::keys::DUE_BUCKET;
use super::{Engine, EngineError, FlowId};
use crate::domain::SaleId;
use crate::units::Units;

/// A sale's counters and the position of its flow stream, read at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditSnapshot {
    /// Redis's clock.
    pub now_ms: i64,
    /// The stream's last generated id ("" when it never had a record).
    pub last_flow: String,
    /// Records in the stream.
    pub flow_len: u64,
    /// Entries in the due-queue.
    pub due_entries: u64,
    /// Dead-lettered refunds.
    pub dead_refunds: u64,
    /// The sale hash.
    pub fields: HashMap<String, String>,
}

impl AuditSnapshot {
    /// A numeric field of the sale hash (0 when absent).
    pub fn num(&self, field: &str) -> i64 {
        self.fields
            .get(field)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// The sale's stock counters (a counter absent from the hash is 0).
    pub fn units(&self) -> Units {
        Units::from_fn(|c| self.num(c.redis))
    }
}

/// One compare-and-set repair of a sale in Redis (`lua/audit_fix.lua`):
/// applied only if what the audit saw is still so, so a repair never
/// overwrites a change that live traffic made after the audit looked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Repair {
    /// Set the sale hash's moving counters to `units` (the total stays),
    /// if the flow stream's last generated id is still `seen_flow`.
    Counters {
        /// The stream's last generated id the audit saw.
        seen_flow: String,
        /// What Redis's orders add up to.
        units: Units,
    },
    /// Set a buyer's units (0: remove the buyer), if the flow stream's last
    /// generated id is still `seen_flow`.
    BuyerUnits {
        /// The stream's last generated id the audit saw.
        seen_flow: String,
        /// The buyer.
        user: u64,
        /// The units their orders hold.
        units: i64,
    },
    /// Put an order back, only if it is missing (a pending one gets its
    /// deadline entry back).
    RestoreOrder {
        /// The order's seq.
        seq: u64,
        /// The order, packed.
        packed: String,
    },
    /// Remove a due-queue entry, only if its order does not wait on it.
    DropDueEntry {
        /// The entry.
        member: String,
    },
    /// Record `last_flow` as the order's last flow id, only if the order is
    /// still as the audit saw it.
    MarkSettled {
        /// The order's seq.
        seq: u64,
        /// The order as the audit saw it, packed.
        seen: String,
        /// The flow id to record as its last (MySQL holds all of it).
        last_flow: FlowId,
    },
    /// Put a dead-lettered refund back on the retry queue.
    RequeueRefund {
        /// The order's seq.
        seq: u64,
    },
    /// Give a pending order without one its deadline entry.
    AddDeadline {
        /// The order's seq.
        seq: u64,
    },
}

impl Repair {
    /// The order the repair touches, its entry in the due-queue or itself
    /// (both keys of its bucket are declared in the call's KEYS).
    pub fn order_seq(&self) -> Option<u64> {
        match self {
            Self::RestoreOrder { seq, .. }
            | Self::RequeueRefund { seq }
            | Self::MarkSettled { seq, .. }
            | Self::AddDeadline { seq } => Some(*seq),
            Self::DropDueEntry { member } => member
                .trim_start_matches('r')
                .split(':')
                .next()
                .and_then(|s| s.parse().ok()),
            Self::Counters { .. } | Self::BuyerUnits { .. } => None,
        }
    }

    /// The repair's name as `lua/audit_fix.lua` spells it (its `ARGV[1]`).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Counters { .. } => "counters",
            Self::BuyerUnits { .. } => "buyer",
            Self::RestoreOrder { .. } => "restore_order",
            Self::DropDueEntry { .. } => "drop_deadline",
            Self::MarkSettled { .. } => "mark_settled",
            Self::RequeueRefund { .. } => "requeue_refund",
            Self::AddDeadline { .. } => "add_deadline",
        }
    }

    /// The script's `ARGV`: the name, then the repair's arguments in the
    /// order its header gives.
    pub fn args(&self) -> Vec<String> {
        let mut a = vec![self.name().to_owned()];
        match self {
            Self::Counters { seen_flow, units } => {
                a.push(seen_flow.clone());
                for c in Units::moving() {
                    a.push(c.redis.to_owned());
                    a.push(c.of(units).to_string());
                }
            }
            Self::BuyerUnits {
                seen_flow,
                user,
                units,
            } => a.extend([seen_flow.clone(), user.to_string(), units.to_string()]),
            Self::RestoreOrder { seq, packed } => a.extend([seq.to_string(), packed.clone()]),
            Self::DropDueEntry { member } => a.push(member.clone()),
            Self::MarkSettled {
                seq,
                seen,
                last_flow,
            } => a.extend([seq.to_string(), seen.clone(), last_flow.to_string()]),
            Self::RequeueRefund { seq } | Self::AddDeadline { seq } => a.push(seq.to_string()),
        }
        a
    }
}

/// What `lua/audit_fix.lua` answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repaired {
    /// The repair changed the sale (`1`).
    Applied,
    /// The state had moved on since the audit looked, or there was nothing
    /// left to change (`0`): audit again.
    Moved,
}

impl FromRedisValue for Repaired {
    fn from_redis_value(v: Value) -> Result<Self, ParsingError> {
        match v {
            Value::Int(1) => Ok(Self::Applied),
            Value::Int(0) => Ok(Self::Moved),
            other => {
                Err(format!("audit_fix answered {other:?}, not 1 (applied) or 0 (moved)").into())
            }
        }
    }
}

impl Engine {
    /// The atomic snapshot; `None` when Redis does not know the sale.
    pub async fn audit_snapshot(&self, sale: SaleId) -> Result<Option<AuditSnapshot>, EngineError> {
        let k = self.keys.sale(sale);
        // Every bucket of the due-queue is declared: the index is read
        // first, and read again when the script finds one more.
        let mut c = self.conn.clone();
        let buckets: Vec<u64> = self
            .timed(async { redis::AsyncCommands::zrange(&mut c, &k.deadlines, 0, -1).await })
            .await?;
        let reply: Vec<String> = self
            .invoke_declaring(buckets, 5, |buckets| {
                let mut inv = self.scripts.audit_snapshot.key(&k.sale);
                inv.key(&k.flow).key(&k.deadlines).key(&k.dead_refunds);
                for b in buckets {
                    inv.key(k.due_bucket_no(*b));
                }
                inv
            })
            .await?;
        if reply.is_empty() {
            return Ok(None);
        }
        let bad = || EngineError::Protocol(format!("audit snapshot: {reply:?}"));
        if reply.len() < 5 {
            return Err(bad());
        }
        let num = |i: usize| reply[i].parse::<i64>().map_err(|_| bad());
        Ok(Some(AuditSnapshot {
            now_ms: num(0)?,
            last_flow: reply[1].clone(),
            flow_len: num(2)? as u64,
            due_entries: num(3)? as u64,
            dead_refunds: num(4)? as u64,
            fields: reply[5..]
                .chunks_exact(2)
                .map(|kv| (kv[0].clone(), kv[1].clone()))
                .collect(),
        }))
    }

    /// Applies one compare-and-set repair (see [`Repair`]).
    pub async fn repair(&self, sale: SaleId, repair: &Repair) -> Result<Repaired, EngineError> {
        let k = self.keys.sale(sale);
        let mut inv = self.scripts.audit_fix.prepare_invoke();
        for key in k.with_dead_refunds() {
            inv.key(key);
        }
        if let Some(seq) = repair.order_seq() {
            for key in k.bucket_keys(seq / DUE_BUCKET) {
                inv.key(key);
            }
        }
        for a in repair.args() {
            inv.arg(a);
        }
        let mut c = self.conn.clone();
        self.timed(inv.invoke_async(&mut c)).await
    }

    /// `command key item...` (HMGET, ZMSCORE): one answer per item.
    async fn many<I, T>(
        &self,
        command: &str,
        key: String,
        items: &[I],
    ) -> Result<Vec<T>, EngineError>
    where
        I: redis::ToRedisArgs + Sync,
        T: redis::FromRedisValue,
    {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let mut c = self.conn.clone();
        let mut cmd = redis::cmd(command);
        cmd.arg(&key).arg(items);
        self.timed(async move { cmd.query_async(&mut c).await })
            .await
    }

    /// `command key cursor COUNT 1000` (ZSCAN, HSCAN): the next cursor and the
    /// page's field, value pairs.
    async fn scan_page(
        &self,
        command: &str,
        key: String,
        cursor: u64,
    ) -> Result<(u64, Vec<(String, String)>), EngineError> {
        let mut c = self.conn.clone();
        let mut cmd = redis::cmd(command);
        cmd.arg(&key).arg(cursor).arg("COUNT").arg(1000);
        let (next, flat): (u64, Vec<String>) = self
            .timed(async move { cmd.query_async(&mut c).await })
            .await?;
        let pairs = flat
            .chunks_exact(2)
            .map(|p| (p[0].clone(), p[1].clone()))
            .collect();
        Ok((next, pairs))
    }

    /// The packed orders with these seqs (None where missing).
    pub async fn packed_orders(
        &self,
        sale: SaleId,
        seqs: &[u64],
    ) -> Result<Vec<Option<String>>, EngineError> {
        let k = self.keys.sale(sale);
        let mut out = Vec::with_capacity(seqs.len());
        // A thousand orders a call keeps each call short for Redis.
        for chunk in seqs.chunks(1000) {
            let mut inv = self.scripts.read_orders.prepare_invoke();
            for key in k.order_script_keys() {
                inv.key(key);
            }
            // The orders buckets of the chunk, each declared once.
            let mut buckets: Vec<u64> = chunk.iter().map(|s| s / DUE_BUCKET).collect();
            buckets.sort_unstable();
            buckets.dedup();
            for b in buckets {
                inv.key(k.orders_bucket_no(b));
            }
            for seq in chunk {
                inv.arg(*seq);
            }
            let mut c = self.conn.clone();
            let part: Vec<Option<String>> = match self.timed(inv.invoke_async(&mut c)).await {
                // No sale at all: none of its orders (a live sale Redis
                // lost is fenced instead).
                Err(e) if e.is_no_sale() => {
                    self.missing(sale)?;
                    vec![None; chunk.len()]
                }
                other => other?,
            };
            out.extend(part);
        }
        Ok(out)
    }

    /// The due-queue scores of these members (None where absent).
    pub async fn due_scores(
        &self,
        sale: SaleId,
        members: &[String],
    ) -> Result<Vec<Option<f64>>, EngineError> {
        if members.is_empty() {
            return Ok(Vec::new());
        }
        let k = self.keys.sale(sale);
        let mut pipe = redis::pipe();
        for m in members {
            // A member names its order: "<seq>" or "r<seq>:...".
            let seq = m.trim_start_matches('r').split(':').next().unwrap_or("");
            pipe.zscore(k.due_bucket(seq.parse().unwrap_or(0)), m);
        }
        let mut c = self.conn.clone();
        self.timed(async move { pipe.query_async(&mut c).await })
            .await
    }

    /// One page of the due-queue: (next cursor, members with scores). A page
    /// is a page of buckets, each read whole.
    pub async fn due_page(
        &self,
        sale: SaleId,
        cursor: u64,
    ) -> Result<(u64, Vec<(String, f64)>), EngineError> {
        let k = self.keys.sale(sale);
        let (next, buckets) = self.scan_page("ZSCAN", k.deadlines.clone(), cursor).await?;
        if buckets.is_empty() {
            return Ok((next, Vec::new()));
        }
        let mut pipe = redis::pipe();
        for (bucket, _) in &buckets {
            pipe.zrange_withscores(format!("{}:{bucket}", k.deadlines), 0, -1);
        }
        let mut c = self.conn.clone();
        let pages: Vec<Vec<(String, f64)>> = self
            .timed(async move { pipe.query_async(&mut c).await })
            .await?;
        Ok((next, pages.into_iter().flatten().collect()))
    }

    /// One page of the buyers hash: (next cursor, user -> units).
    pub async fn buyers_page(
        &self,
        sale: SaleId,
        cursor: u64,
    ) -> Result<(u64, Vec<(u64, i64)>), EngineError> {
        let (next, page) = self
            .scan_page("HSCAN", self.keys.sale(sale).buyers, cursor)
            .await?;
        let pairs = page
            .into_iter()
            .filter_map(|(u, n)| Some((u.parse().ok()?, n.parse().ok()?)))
            .collect();
        Ok((next, pairs))
    }

    /// The units these buyers hold (None where absent).
    pub async fn buyer_units(
        &self,
        sale: SaleId,
        users: &[u64],
    ) -> Result<Vec<Option<i64>>, EngineError> {
        self.many("HMGET", self.keys.sale(sale).buyers, users).await
    }

    /// The dead-lettered refunds: seq -> "requested_ms|attempts".
    pub async fn dead_refunds(&self, sale: SaleId) -> Result<Vec<(u64, String)>, EngineError> {
        let key = self.keys.sale(sale).dead_refunds;
        let mut c = self.conn.clone();
        self.timed(async move { c.hgetall(&key).await }).await
    }

    /// Whether the flow stream holds the record with this id.
    pub async fn flow_record_exists(&self, sale: SaleId, id: &str) -> Result<bool, EngineError> {
        let key = self.keys.sale(sale).flow;
        let mut c = self.conn.clone();
        let id = id.to_owned();
        let found: redis::streams::StreamRangeReply = self
            .timed(async move { c.xrange_count(&key, &id, &id, 1).await })
            .await?;
        Ok(!found.ids.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names the script dispatches on (`op == '...'`).
    fn script_names() -> Vec<String> {
        include_str!("../../lua/audit_fix.lua")
            .split("op == '")
            .skip(1)
            .filter_map(|rest| rest.split_once('\'').map(|(name, _)| name.to_owned()))
            .collect()
    }

    /// One repair of each kind, with the `ARGV` it must render.
    fn one_of_each() -> Vec<(Repair, Vec<&'static str>)> {
        let units = Units {
            total: 10,
            available: 4,
            pending: 1,
            paid: 5,
            ..Units::default()
        };
        vec![
            (
                Repair::Counters {
                    seen_flow: "5-0".into(),
                    units,
                },
                vec![
                    "counters",
                    "5-0",
                    "avail",
                    "4",
                    "pending",
                    "1",
                    "paid",
                    "5",
                    "cancelled",
                    "0",
                    "closed",
                    "0",
                    "refunded",
                    "0",
                    "restocked",
                    "0",
                ],
            ),
            (
                Repair::BuyerUnits {
                    seen_flow: "5-0".into(),
                    user: 7,
                    units: 2,
                },
                vec!["buyer", "5-0", "7", "2"],
            ),
            (
                Repair::RestoreOrder {
                    seq: 3,
                    packed: "p|x".into(),
                },
                vec!["restore_order", "3", "p|x"],
            ),
            (
                Repair::DropDueEntry {
                    member: "r3:0:1".into(),
                },
                vec!["drop_deadline", "r3:0:1"],
            ),
            (
                Repair::MarkSettled {
                    seq: 3,
                    seen: "p|x".into(),
                    last_flow: FlowId { ms: 9, seq: 1 },
                },
                vec!["mark_settled", "3", "p|x", "9-1"],
            ),
            (
                Repair::RequeueRefund { seq: 3 },
                vec!["requeue_refund", "3"],
            ),
            (Repair::AddDeadline { seq: 3 }, vec!["add_deadline", "3"]),
        ]
    }

    #[test]
    fn each_repair_renders_the_arguments_the_script_reads() {
        for (repair, want) in one_of_each() {
            assert_eq!(repair.args(), want, "{repair:?}");
        }
    }

    #[test]
    fn the_script_and_the_enum_name_the_same_repairs() {
        let mut script = script_names();
        script.sort();
        let mut rust: Vec<String> = one_of_each()
            .iter()
            .map(|(r, _)| r.name().to_owned())
            .collect();
        rust.sort();
        assert_eq!(script, rust);
    }

    #[test]
    fn the_reply_is_one_or_zero_and_nothing_else() {
        assert_eq!(
            Repaired::from_redis_value(Value::Int(1)),
            Ok(Repaired::Applied)
        );
        assert_eq!(
            Repaired::from_redis_value(Value::Int(0)),
            Ok(Repaired::Moved)
        );
        for other in [
            Value::Int(2),
            Value::Nil,
            Value::SimpleString("OK".into()),
            Value::Array(vec![]),
        ] {
            assert!(Repaired::from_redis_value(other).is_err());
        }
    }
}
