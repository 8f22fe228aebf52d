//! The audit's reads and compare-and-set repairs of a sale in Redis. Reads
//! are paged (bounded memory whatever the sale's size); the one read that
//! must be atomic, the counters beside the stream's position, is a script.

use std::collections::HashMap;

use redis::AsyncCommands;

use super::{Engine, EngineError};
use crate::domain::SaleId;

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
}

impl Engine {
    /// The atomic snapshot; `None` when Redis does not know the sale.
    pub async fn audit_snapshot(&self, sale: SaleId) -> Result<Option<AuditSnapshot>, EngineError> {
        let k = self.keys.sale(sale);
        let mut inv = self.scripts.audit_snapshot.key(&k.sale);
        inv.key(&k.flow).key(&k.deadlines).key(&k.dead_refunds);
        let mut c = self.conn.clone();
        let reply: Vec<String> = self.timed(inv.invoke_async(&mut c)).await?;
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

    /// Applies one compare-and-set repair (see `lua/audit_fix.lua`); false
    /// when the state had moved on since the audit looked.
    pub async fn audit_fix(&self, sale: SaleId, args: &[String]) -> Result<bool, EngineError> {
        let k = self.keys.sale(sale);
        let mut inv = self.scripts.audit_fix.prepare_invoke();
        for key in [
            &k.sale,
            &k.buyers,
            &k.orders,
            &k.deadlines,
            &k.flow,
            &k.dead_refunds,
        ] {
            inv.key(key);
        }
        for a in args {
            inv.arg(a);
        }
        let mut c = self.conn.clone();
        let applied: i64 = self.timed(inv.invoke_async(&mut c)).await?;
        Ok(applied == 1)
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
