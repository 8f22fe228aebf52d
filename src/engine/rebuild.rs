//! When Redis forgets or goes back in time: the guard that notices, and the
//! Redis side of rebuilding a fenced sale from MySQL.
//!
//! A sale's hash carries `db`, its token from MySQL (`sales.redis_token`),
//! and its order counter `seq`; its flow stream's last generated id is its
//! flow position. The guard (`lua/guard.lua`) compares them with what MySQL
//! has settled, and fences the sale (`fence` in its hash: every script then
//! fails with "FENCED <reason>", answered 503) when Redis lost it
//! (`missing`), is behind MySQL (`behind`) or holds another database's sale
//! under its name (`foreign`, never adopted). A reserve call that finds the
//! counter below the highest seq its process was given fences the sale the
//! same way (`check_seen` in `lua/prelude.lua`).
//!
//! The rebuild (driven by `workers::guard`) takes the fence
//! (`rebuilding`), reads what the surviving Redis holds, and writes the
//! sale merged with MySQL while every other script is refused: orders,
//! buyers' units, idempotency keys, the due-queue, then the sale hash and
//! the lifted fence in one last script (`lua/rebuilt.lua`).

use std::collections::{BTreeMap, HashMap};

use redis::AsyncCommands;

use super::keys::DUE_BUCKET as DUE_BUCKET_SIZE;
use super::{Engine, EngineError, FlowId, Order, OrderStatus, SaleTerms};
use crate::domain::{OrderId, SaleId};

/// Orders per script call or command while a rebuild writes.
const CHUNK: usize = 500;

/// Orders buckets one `lua/rebuild_read.lua` call reads (64 orders each at
/// most).
const READ_BUCKETS: u64 = 16;

/// What the guard found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuardVerdict {
    /// Redis holds this database's sale, not behind MySQL.
    Ok,
    /// The sale is fenced, for this reason: `missing`, `behind`,
    /// `foreign`, `rebuilding`.
    Fenced(String),
}

impl GuardVerdict {
    /// Whether a rebuild cures it (a foreign sale needs a person).
    pub fn rebuildable(&self) -> bool {
        matches!(self, Self::Fenced(r) if r == "missing" || r == "behind" || r.starts_with("rebuilding"))
    }
}

/// What the guard compares Redis's copy of a sale with: MySQL's side.
#[derive(Debug, Clone)]
pub struct GuardInput<'a> {
    /// The sale.
    pub sale: SaleId,
    /// Its token (`sales.redis_token`).
    pub token: &'a str,
    /// The highest order seq MySQL holds.
    pub max_seq: u64,
    /// The reconciler's cursor.
    pub cursor: FlowId,
    /// The number of the last flow record MySQL applied.
    pub last_n: u64,
    /// Its terms (a sale hash written before sales had tokens is adopted
    /// only when they are the same).
    pub start_ms: i64,
    /// See `start_ms`.
    pub end_ms: i64,
    /// See `start_ms`.
    pub total: i64,
    /// See `start_ms`.
    pub price_cents: i64,
}

/// What the surviving Redis holds of a sale taken for a rebuild.
#[derive(Debug, Clone, Default)]
pub struct RedisSide {
    /// Why it was fenced.
    pub fence: String,
    /// Its order counter.
    pub counter: u64,
    /// The highest seq a caller reported having been given (0: none).
    pub lost_hint: u64,
    /// The number of its last flow record.
    pub flows: u64,
    /// Its orders.
    pub orders: Vec<Order>,
    /// Its refund dead-letter (order seqs), kept as it is.
    pub dead_refunds: std::collections::BTreeSet<u64>,
    /// The fence this rebuild holds (`rebuilding:<id>`).
    pub held: String,
}

/// A sale as the rebuild writes it.
#[derive(Debug, Clone)]
pub struct RebuiltSale {
    /// The sale's terms and token (from MySQL).
    pub terms: SaleTerms,
    /// Every order with the key it was made under, by seq.
    pub orders: BTreeMap<u64, (Order, Option<String>)>,
    /// The order counter: past every order and every lost one.
    pub counter: u64,
    /// The `lost_hint` the counter accounts for.
    pub lost_hint: u64,
    /// MySQL's cursor: the sale's settled mark and flow floor.
    pub cursor: FlowId,
    /// Redis's clock when the rebuild began (refunds waiting for their
    /// order to settle are retried from then).
    pub now_ms: i64,
    /// The number of the sale's last flow record: past MySQL's and Redis's.
    pub flows: u64,
    /// Refunds in the dead-letter (left there, not retried).
    pub dead_refunds: std::collections::BTreeSet<u64>,
    /// The fence this rebuild holds (`rebuilding:<id>`).
    pub held: String,
}

/// The least time a sale stays fenced, so that every process that calls
/// meanwhile reports the order ids it handed out.
pub const FENCE_AT_LEAST: std::time::Duration = std::time::Duration::from_secs(1);

/// How the last step of a rebuild ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unfenced {
    /// The sale serves again.
    Done,
    /// A caller has since reported this higher seq: count the lost orders
    /// up to it and try again.
    Again(u64),
    /// The fence is younger than [`FENCE_AT_LEAST`]: try again after this.
    Wait(std::time::Duration),
}

impl RebuiltSale {
    /// The sale hash's fields (all but `db`).
    fn fields(&self) -> Vec<(&'static str, String)> {
        let mut units = crate::units::Units::opening(self.terms.stock_total);
        let mut waiting = 0;
        for (o, _) in self.orders.values() {
            units.count_order(o, self.terms.end_ms);
            if o.status == OrderStatus::RefundPending && !self.dead_refunds.contains(&o.id.seq()) {
                waiting += 1;
            }
        }
        let counters: HashMap<&str, String> = units.redis_fields().collect();
        let mut f = self.terms.fields();
        for (name, value) in f.iter_mut() {
            if let Some(v) = counters.get(name) {
                *value = v.clone();
                continue;
            }
            *value = match *name {
                "seq" => self.counter.to_string(),
                "refunds_waiting" => waiting.to_string(),
                "refunds_dead" => self.dead_refunds.len().to_string(),
                _ => continue,
            };
        }
        if self.cursor != FlowId::default() {
            f.push(("settled", self.cursor.to_string()));
        }
        f.push(("flows", self.flows.to_string()));
        f
    }
}

impl Engine {
    /// Checks a live sale against what MySQL holds of it (token, highest
    /// order seq, cursor, last flow number, terms), and fences it when
    /// Redis lost it, is behind, or holds another database's sale under its
    /// name (`lua/guard.lua`). The highest order seq of `sale` this process
    /// handed out counts too: a Redis below it lost orders that MySQL may
    /// never have seen.
    pub async fn guard(&self, f: &GuardInput<'_>) -> Result<GuardVerdict, EngineError> {
        let k = self.keys.sale(f.sale);
        let mut inv = self.scripts.guard.key(&k.sale);
        inv.key(&k.flow)
            .arg(f.token)
            .arg(f.max_seq)
            .arg(f.cursor.to_string())
            .arg(self.combiner.seen(f.sale))
            .arg(f.last_n)
            .arg(f.start_ms)
            .arg(f.end_ms)
            .arg(f.total)
            .arg(f.price_cents);
        let mut c = self.conn.clone();
        use super::scripts::guard::Reply;
        Ok(match self.timed(inv.invoke_async(&mut c)).await? {
            Reply::Ok => GuardVerdict::Ok,
            Reply::Fenced(reason) => GuardVerdict::Fenced(reason),
        })
    }

    /// The highest order seq of `sale` a reserve reply of this process
    /// carried (0: none). It is noted before the reply reaches its buyer.
    pub fn seen(&self, sale: SaleId) -> u64 {
        self.combiner.seen(sale)
    }

    /// Fences `sale` for `reason` unless it is fenced (`lua/fence.lua`);
    /// whether this call fenced it.
    pub async fn fence(&self, sale: SaleId, reason: &str) -> Result<bool, EngineError> {
        let k = self.keys.sale(sale);
        let mut c = self.conn.clone();
        let n: i64 = self
            .timed(
                self.scripts
                    .fence
                    .key(&k.sale)
                    .arg(reason)
                    .invoke_async(&mut c),
            )
            .await?;
        Ok(n == 1)
    }

    /// Takes a fenced sale for a rebuild (its fence becomes
    /// `rebuilding:<id>`, its terms are written into its hash) and reads
    /// what Redis still holds of it. `Err(reason)` when the sale is not one
    /// a rebuild may take (foreign, not fenced).
    pub async fn begin_rebuild(
        &self,
        terms: &SaleTerms,
        mysql_top: u64,
    ) -> Result<Result<RedisSide, String>, EngineError> {
        let sale = terms.id;
        let k = self.keys.sale(sale);
        let id = format!(
            "{:x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        );
        let mut inv = self.scripts.rebuild_begin.key(&k.sale);
        inv.arg(&terms.token).arg(&id);
        for (f, v) in terms.fields() {
            if matches!(f, "layout" | "start_ms" | "window_ms" | "price") {
                inv.arg(f).arg(v);
            }
        }
        let mut c = self.conn.clone();
        use super::scripts::rebuild::Begun;
        let (fence, counter, lost_hint, flows) = match self.timed(inv.invoke_async(&mut c)).await? {
            Begun::Taken {
                fence,
                counter,
                lost_hint,
                flows,
            } => (fence, counter, lost_hint, flows),
            Begun::Refused(why) => return Ok(Err(why)),
        };
        let mut c = self.conn.clone();
        let dead: Vec<u64> = self.timed(async { c.hkeys(&k.dead_refunds).await }).await?;
        let mut side = RedisSide {
            fence,
            counter,
            lost_hint,
            flows,
            orders: Vec::new(),
            dead_refunds: dead.into_iter().collect(),
            held: format!("rebuilding:{id}"),
        };
        // The orders buckets, a few at a time (Redis is fenced: it does not
        // change meanwhile): every bucket up to the highest order seq anyone
        // knows of (Redis's counter, the seqs callers reported, MySQL's),
        // and past it while buckets still hold orders (a sale hash lost
        // alone took its counter with it; orders fill buckets in turn).
        let top = [counter, lost_hint, self.seen(sale), mysql_top]
            .into_iter()
            .max()
            .unwrap_or(0);
        let known = super::keys::order_buckets(top).end;
        let mut from = 0;
        loop {
            let to = from + READ_BUCKETS;
            let mut inv = self.scripts.rebuild_read.prepare_invoke();
            for key in k.order_script_keys() {
                inv.key(key);
            }
            for b in from..to {
                inv.key(k.orders_bucket_no(b));
            }
            let mut c = self.conn.clone();
            let page: Vec<String> = self.timed(inv.invoke_async(&mut c)).await?;
            for pair in page.chunks_exact(2) {
                let seq: u64 = pair[0]
                    .parse()
                    .map_err(|_| EngineError::Protocol(format!("order seq {:?}", pair[0])))?;
                let id = OrderId::new(sale, seq);
                let o = Order::unpack(id, &pair[1])
                    .ok_or_else(|| EngineError::Protocol(format!("order {id}: {:?}", pair[1])))?;
                side.orders.push(o);
            }
            if to >= known && page.is_empty() {
                break;
            }
            from = to;
        }
        Ok(Ok(side))
    }

    /// Writes a rebuilt sale while this rebuild holds its fence (every
    /// step checks it: a rebuild that lost the sale to another writes
    /// nothing more), then the caller lifts it with [`Engine::unfence`].
    pub async fn write_rebuilt(&self, s: &RebuiltSale) -> Result<(), EngineError> {
        let sale = s.terms.id;
        let k = self.keys.sale(sale);
        let mut c = self.conn.clone();
        // What a rebuild replaces: everything but the sale hash (it holds
        // the fence), the flow stream (its records are in MySQL; it keeps
        // its position) and the refund dead-letter.
        let buckets: Vec<String> = self
            .timed(async { c.zrange(&k.deadlines, 0, -1).await })
            .await?;
        let mut clear = self.scripts.rebuild_clear.key(&k.sale);
        for key in [&k.buyers, &k.idem, &k.calls, &k.deadlines] {
            clear.key(key);
        }
        for b in &buckets {
            clear.key(format!("{}:{b}", k.deadlines));
        }
        // Every orders bucket Redis held was read (begin_rebuild), so its
        // orders are among the rebuilt ones: their buckets cover it.
        let top = s.orders.keys().next_back().copied().unwrap_or(0);
        for b in super::keys::order_buckets(top.max(s.counter)) {
            clear.key(k.orders_bucket_no(b));
        }
        clear.arg(&s.held);
        let mut c = self.conn.clone();
        self.timed(clear.invoke_async::<i64>(&mut c)).await?;

        let orders: Vec<&(Order, Option<String>)> = s.orders.values().collect();
        for chunk in orders.chunks(CHUNK) {
            let mut inv = self.scripts.rebuild_write.prepare_invoke();
            for key in k.order_script_keys() {
                inv.key(key);
            }
            let mut buckets: Vec<u64> = chunk
                .iter()
                .map(|(o, _)| o.id.seq() / DUE_BUCKET_SIZE)
                .collect();
            buckets.sort_unstable();
            buckets.dedup();
            for b in buckets {
                inv.key(k.orders_bucket_no(b));
            }
            inv.arg(&s.held);
            for (o, _) in chunk {
                inv.arg(o.id.seq()).arg(o.pack());
            }
            let mut c = self.conn.clone();
            self.timed(inv.invoke_async::<i64>(&mut c)).await?;
        }

        let mut buyers: BTreeMap<u64, i64> = BTreeMap::new();
        let mut idem: Vec<(String, String)> = Vec::new();
        let mut due: BTreeMap<u64, Vec<(i64, String)>> = BTreeMap::new();
        for (o, key) in s.orders.values() {
            let seq = o.id.seq();
            let bucket = seq / DUE_BUCKET_SIZE;
            match o.status {
                OrderStatus::Pending => {
                    *buyers.entry(o.user.get()).or_default() += i64::from(o.qty);
                    due.entry(bucket)
                        .or_default()
                        .push((o.deadline_ms, seq.to_string()));
                }
                OrderStatus::Paid => *buyers.entry(o.user.get()).or_default() += i64::from(o.qty),
                OrderStatus::RefundPending => {
                    *buyers.entry(o.user.get()).or_default() += i64::from(o.qty);
                    // Retried at once (its order is settled now), unless a
                    // person has it in the dead-letter.
                    if !s.dead_refunds.contains(&seq) {
                        due.entry(bucket)
                            .or_default()
                            .push((s.now_ms, format!("r{seq}:1:{}", s.now_ms)));
                    }
                }
                _ => {}
            }
            if let Some(key) = key {
                idem.push((format!("{}:{key}", o.user), seq.to_string()));
            }
        }
        let buyers: Vec<(String, String)> = buyers
            .into_iter()
            .map(|(u, n)| (u.to_string(), n.to_string()))
            .collect();
        self.put(&k.sale, &k.buyers, &s.held, "hash", &buyers)
            .await?;
        self.put(&k.sale, &k.idem, &s.held, "hash", &idem).await?;
        let mut index: Vec<(String, String)> = Vec::with_capacity(due.len());
        for (bucket, entries) in &due {
            let first = entries.iter().map(|(at, _)| *at).min().unwrap_or(s.now_ms);
            index.push((first.to_string(), bucket.to_string()));
            let entries: Vec<(String, String)> = entries
                .iter()
                .map(|(at, m)| (at.to_string(), m.clone()))
                .collect();
            self.put(
                &k.sale,
                &format!("{}:{bucket}", k.deadlines),
                &s.held,
                "zset",
                &entries,
            )
            .await?;
        }
        self.put(&k.sale, &k.deadlines, &s.held, "zset", &index)
            .await?;
        Ok(())
    }

    /// Writes `pairs` into `key` (a hash or a sorted set) through
    /// `lua/rebuild_put.lua`, a chunk a call, while `held` is the fence.
    async fn put(
        &self,
        sale_key: &str,
        key: &str,
        held: &str,
        kind: &str,
        pairs: &[(String, String)],
    ) -> Result<(), EngineError> {
        for chunk in pairs.chunks(CHUNK) {
            let mut inv = self.scripts.rebuild_put.key(sale_key);
            inv.key(key).arg(held).arg(kind);
            for (a, b) in chunk {
                inv.arg(a).arg(b);
            }
            let mut c = self.conn.clone();
            self.timed(inv.invoke_async::<i64>(&mut c)).await?;
        }
        Ok(())
    }

    /// The last step of a rebuild: the sale hash and the lifted fence
    /// (`lua/rebuilt.lua`).
    pub async fn unfence(&self, s: &RebuiltSale) -> Result<Unfenced, EngineError> {
        let k = self.keys.sale(s.terms.id);
        let mut inv = self.scripts.rebuilt.key(&k.sale);
        inv.key(&k.flow)
            .arg(&s.terms.token)
            .arg(&s.held)
            .arg(s.lost_hint)
            .arg(s.cursor.to_string())
            .arg(FENCE_AT_LEAST.as_millis() as u64);
        for (f, v) in s.fields() {
            inv.arg(f).arg(v);
        }
        let mut c = self.conn.clone();
        use super::scripts::rebuild::Lifted;
        Ok(match self.timed(inv.invoke_async(&mut c)).await? {
            Lifted::Done => {
                self.sold_out.clear(s.terms.id);
                Unfenced::Done
            }
            Lifted::Again(hint) => Unfenced::Again(hint),
            Lifted::Wait(ms) => Unfenced::Wait(std::time::Duration::from_millis(ms)),
        })
    }

    /// Whether Redis holds `sale`'s hash (fenced or not).
    pub async fn sale_exists(&self, sale: SaleId) -> Result<bool, EngineError> {
        let k = self.keys.sale(sale);
        let mut c = self.conn.clone();
        self.timed(async { c.exists(&k.sale).await }).await
    }

    /// Deletes every key of `sale` whatever its token (an operator's
    /// decision: keys another database left under the sale's name), and
    /// leaves a fence-only hash of `token`, so the guard rebuilds the sale
    /// from MySQL. Returns the keys deleted.
    pub async fn discard_foreign(&self, sale: SaleId, token: &str) -> Result<u64, EngineError> {
        let deleted = self.drop_sale_keys(sale).await?;
        let k = self.keys.sale(sale);
        let mut c = self.conn.clone();
        self.timed(async {
            c.hset_multiple::<_, _, _, ()>(&k.sale, &[("fence", "missing"), ("db", token)])
                .await
        })
        .await?;
        Ok(deleted)
    }
}
