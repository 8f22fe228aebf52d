//! The guard: notices that Redis lost a sale or went back in time, fences
//! it, and rebuilds it from MySQL plus what Redis still holds.
//!
//! The reconciler runs a guard pass over the live list (MySQL's, never a
//! Redis key a flush would take with it) at most every [`GUARD_EVERY`],
//! before it applies records: each sale's Redis token, order counter and
//! flow position are compared with MySQL's (`Engine::guard`), and a sale
//! that is missing, behind or foreign is fenced: every script refuses it,
//! the API answers 503 with Retry-After. A missing or behind sale is then
//! rebuilt here; a foreign one (another database's keys under its name)
//! waits for a person (`flashsale sale discard-foreign`).
//!
//! The rebuild of one sale:
//! 1. drains the sale's flow stream into MySQL (the reconciler's own batches:
//!    what the surviving Redis still holds that MySQL lacks);
//! 2. locks the sale's cursor row, so no other reconciler or rebuilder
//!    touches the sale, and takes the fence (`rebuilding`), reading Redis's
//!    orders, counter and the highest seq a caller reported (`lost_hint`:
//!    every reserve call and guard pass that meets a fenced sale of this
//!    database, or the fence-only hash a reserve call left for a missing
//!    one, reports the highest seq its process handed out);
//! 3. merges: MySQL's orders (with the keys they were made under) stand;
//!    an order only Redis holds is kept; an order Redis gave out under an
//!    id MySQL holds for another buyer is counted lost (`id_reused`); every
//!    seq up to the highest anyone saw (`lost_hint`, the highest this
//!    process handed out, the counter, MySQL's top) that neither side holds
//!    is counted lost (`missing`) in `lost_orders`, and the counter moves
//!    past it;
//! 4. writes orders, buyers' units, keys and the due-queue (pending orders
//!    keep their deadlines, waiting refunds are retried), then the sale hash
//!    with the fence lifted in one script; commits and trims the stream.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use sqlx::MySqlPool;

use super::reconciler::Reconciler;
use crate::db::rebuild::{self as queries, GuardFacts, LostReason};
use crate::db::{self, ledger};
use crate::domain::SaleId;
use crate::engine::{GuardInput, GuardVerdict, Order, OrderStatus, RebuiltSale, Unfenced};
use crate::telemetry::{FenceLabels, SaleLabels};

/// Longest time between two guard passes over the live list.
pub const GUARD_EVERY: Duration = Duration::from_millis(500);
/// How long MySQL's settled points are reused between guard passes.
const FACTS_EVERY: Duration = Duration::from_secs(1);
/// How often a sale that stays fenced for a person is logged again.
const FOREIGN_LOG_EVERY: Duration = Duration::from_secs(60);

/// The guard's memory between passes.
#[derive(Default)]
pub struct GuardState {
    last_pass: Option<Instant>,
    facts: Option<(Instant, HashMap<SaleId, GuardFacts>)>,
    /// Sales fenced foreign, and when that was last logged.
    foreign_logged: HashMap<SaleId, Instant>,
    /// Sales this reconciler is rebuilding now (each in its own task).
    rebuilding: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<SaleId>>>,
}

impl GuardState {
    /// The sales the last pass found fenced `foreign`.
    pub fn foreign(&self) -> std::collections::HashSet<SaleId> {
        self.foreign_logged.keys().copied().collect()
    }
}

/// What one rebuild did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebuildReport {
    /// The sale.
    pub sale: SaleId,
    /// Why it was fenced.
    pub fence: String,
    /// Orders written back.
    pub orders: usize,
    /// Orders counted lost by this rebuild.
    pub lost: u64,
    /// The order counter it resumed from.
    pub counter: u64,
    /// How long it took.
    pub took: Duration,
}

/// A sale's orders by seq, each with the key it was made under.
pub type Orders = BTreeMap<u64, (Order, Option<String>)>;
/// Orders counted lost: seq, reason, detail.
pub type Lost = Vec<(u64, LostReason, String)>;

/// Merges MySQL's orders of a sale with the surviving Redis's: MySQL's
/// stand (the flow stream was drained into MySQL first, so Redis holds
/// nothing newer of them); an order only Redis holds is kept; one Redis
/// gave out under an id MySQL holds for another buyer or another quantity
/// is returned as lost (`id_reused`).
pub fn merge(mysql: Vec<(Order, Option<String>)>, redis: Vec<Order>) -> (Orders, Lost) {
    let mut all: Orders = mysql
        .into_iter()
        .map(|(o, k)| (o.id.seq(), (o, k)))
        .collect();
    let mut reused = Vec::new();
    for o in redis {
        let seq = o.id.seq();
        match all.get(&seq) {
            Some((m, _)) if m.user != o.user || m.qty != o.qty => reused.push((
                seq,
                LostReason::IdReused,
                format!(
                    "Redis gave order {} to buyer {} for {} unit(s) ({}); MySQL holds it for buyer {}",
                    o.id,
                    o.user,
                    o.qty,
                    o.status.as_str(),
                    m.user
                ),
            )),
            Some(_) => {}
            None => {
                all.insert(seq, (o, None));
            }
        }
    }
    (all, reused)
}

/// The seqs up to `top` that no order holds and that are not counted lost
/// yet.
fn missing_seqs(orders: &Orders, counted: &std::collections::BTreeSet<u64>, top: u64) -> Lost {
    (1..=top)
        .filter(|s| !orders.contains_key(s) && !counted.contains(s))
        .map(|s| {
            (
                s,
                LostReason::Missing,
                "acknowledged, then lost with Redis before it reached MySQL".to_owned(),
            )
        })
        .collect()
}

impl Reconciler {
    /// A guard pass over `sales`, at most every [`GUARD_EVERY`]; rebuilds
    /// what it can (each rebuild in a task of its own).
    pub async fn guard_pass(&self, sales: &[SaleId]) -> anyhow::Result<()> {
        let facts = {
            let mut st = self.guard.lock().await;
            if st.last_pass.is_some_and(|t| t.elapsed() < GUARD_EVERY) {
                return Ok(());
            }
            st.last_pass = Some(Instant::now());
            match &st.facts {
                Some((at, f)) if at.elapsed() < FACTS_EVERY => f.clone(),
                _ => {
                    let f = queries::guard_facts(&self.db).await?;
                    st.facts = Some((Instant::now(), f.clone()));
                    f
                }
            }
        };
        let mut fenced: HashMap<String, i64> = HashMap::new();
        let mut still_foreign = std::collections::HashSet::new();
        let rebuilding = self.guard.lock().await.rebuilding.clone();
        for &sale in sales {
            let Some(f) = facts.get(&sale) else {
                continue; // created after the facts were read: next pass
            };
            if f.young {
                continue; // its creator may not have loaded it yet
            }
            let input = GuardInput {
                sale,
                token: &f.token,
                max_seq: f.settled.max_seq,
                cursor: f.settled.cursor,
                last_n: f.last_n,
                start_ms: f.start_ms,
                end_ms: f.end_ms,
                total: f.total,
                price_cents: f.price_cents,
            };
            let verdict = match self.engine.guard(&input).await {
                Ok(v) => v,
                // Redis down fails the sale's batch as well; the others go on.
                Err(e) => {
                    tracing::debug!(sale = %sale, error = %e, "guard check failed");
                    continue;
                }
            };
            let GuardVerdict::Fenced(reason) = &verdict else {
                continue;
            };
            *fenced
                .entry(reason.split(':').next().unwrap_or_default().to_owned())
                .or_default() += 1;
            if verdict.rebuildable() {
                // Each rebuild in its own task: the other sales are checked
                // and reconciled meanwhile.
                if !rebuilding
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(sale)
                {
                    continue;
                }
                tracing::warn!(sale = %sale, reason, "sale fenced: Redis lost some of it; rebuilding it from MySQL");
                let worker = Reconciler::new(
                    self.engine.clone(),
                    self.db.clone(),
                    self.live.clone(),
                    self.metrics.clone(),
                    self.opts,
                );
                let done = rebuilding.clone();
                tokio::spawn(async move {
                    match worker.rebuild(sale).await {
                        Ok(Some(r)) => {
                            tracing::info!(sale = %sale, fence = r.fence, orders = r.orders,
                            lost = r.lost, counter = r.counter, took_ms = r.took.as_millis() as u64,
                            "sale rebuilt from MySQL; serving again")
                        }
                        Ok(None) => {}
                        Err(e) => tracing::warn!(sale = %sale, error = %format!("{e:#}"),
                            "rebuilding the sale failed; the next guard pass retries"),
                    }
                    done.lock().unwrap_or_else(|p| p.into_inner()).remove(&sale);
                });
            } else {
                still_foreign.insert(sale);
                let mut st = self.guard.lock().await;
                let due = st
                    .foreign_logged
                    .get(&sale)
                    .is_none_or(|t| t.elapsed() >= FOREIGN_LOG_EVERY);
                if due {
                    st.foreign_logged.insert(sale, Instant::now());
                    tracing::error!(sale = %sale, reason, prefix = self.engine.keys().prefix(),
                        "sale fenced: Redis holds another database's keys under its name; never adopted. \
                         Give this deployment its own key prefix or Redis database, or remove them with \
                         `flashsale sale discard-foreign`");
                }
            }
        }
        self.guard
            .lock()
            .await
            .foreign_logged
            .retain(|s, _| still_foreign.contains(s));
        for reason in ["missing", "behind", "foreign", "rebuilding"] {
            self.metrics
                .loss
                .fenced
                .get_or_create(&FenceLabels {
                    reason: reason.into(),
                })
                .set(fenced.get(reason).copied().unwrap_or(0));
        }
        Ok(())
    }

    /// Rebuilds a fenced sale (see the module's comment). `None` when
    /// there was nothing to do here: the sale is not fenced for a reason a
    /// rebuild cures, is retired, or another reconciler has it right now.
    pub async fn rebuild(&self, sale: SaleId) -> anyhow::Result<Option<RebuildReport>> {
        let started = Instant::now();
        let Some(terms) = db::sale_terms(&self.db, sale).await? else {
            return Ok(None);
        };
        // 1. What the surviving Redis holds that MySQL lacks.
        loop {
            if self.reconcile_batch(sale, false).await? < self.opts.max_batch {
                break;
            }
        }
        // 2. The sale is this rebuild's until the commit.
        ledger::ensure_cursor(&self.db, sale).await?;
        let mut tx = self.db.begin().await?;
        let Some((cursor, last_n)) = ledger::lock_numbered_cursor(&mut tx, sale).await? else {
            return Ok(None);
        };
        if !self
            .engine
            .read_flow_entries(sale, cursor, 1)
            .await?
            .is_empty()
        {
            return Ok(None); // records still wait: drain them first
        }
        // MySQL's orders first: Redis's are read up to the highest seq
        // either side knows of (the cursor is locked: MySQL's do not change).
        let mysql = queries::orders(&mut tx, sale, cursor).await?;
        let mysql_top = mysql.last().map_or(0, |(o, _)| o.id.seq());
        let side = match self.engine.begin_rebuild(&terms, mysql_top).await? {
            Ok(side) => side,
            Err(_) => return Ok(None),
        };
        let now_ms = self.engine.now_ms().await?;
        // 3. Merge and count.
        let mut counted = queries::lost_seqs(&mut tx, sale).await?;
        let (orders, reused) = merge(mysql, side.orders);
        let mut lost_now = record_lost(&self.db, sale, &reused, &mut counted).await?;
        let dead_refunds: std::collections::BTreeSet<u64> = side
            .dead_refunds
            .iter()
            .copied()
            .filter(|s| {
                orders
                    .get(s)
                    .is_some_and(|(o, _)| o.status == OrderStatus::RefundPending)
            })
            .collect();
        let mut hint = side.lost_hint;
        let mut written = false;
        let counter = loop {
            // This process's own replies count without waiting for a report
            // to reach Redis: one answered since the guard pass that began
            // the rebuild, when no later reserve call or guard pass came
            // before the fence is lifted, would be in no hint.
            hint = hint.max(self.engine.seen(sale));
            let top = [
                hint,
                side.counter,
                mysql_top,
                orders.keys().next_back().copied().unwrap_or(0),
                counted.last().copied().unwrap_or(0),
            ]
            .into_iter()
            .max()
            .unwrap_or(0);
            let missing = missing_seqs(&orders, &counted, top);
            lost_now += record_lost(&self.db, sale, &missing, &mut counted).await?;
            let rebuilt = RebuiltSale {
                terms: terms.clone(),
                orders: orders.clone(),
                counter: top,
                lost_hint: hint,
                cursor,
                now_ms,
                flows: last_n.max(side.flows),
                dead_refunds: dead_refunds.clone(),
                held: side.held.clone(),
            };
            // 4. Write, then lift the fence.
            if !written {
                self.engine.write_rebuilt(&rebuilt).await?;
                written = true;
            }
            match self.engine.unfence(&rebuilt).await? {
                Unfenced::Done => break top,
                Unfenced::Again(h) => hint = h,
                Unfenced::Wait(d) => tokio::time::sleep(d).await,
            }
        };
        tx.commit().await?;
        if let Err(e) = self.engine.settle(sale, cursor).await {
            tracing::warn!(sale = %sale, error = %e, "trimming the rebuilt sale's stream failed; the reconciler retries");
        }
        let took = started.elapsed();
        self.metrics.loss.rebuilds.inc();
        self.metrics.loss.rebuild_seconds.set(took.as_secs_f64());
        if lost_now > 0 {
            self.metrics
                .loss
                .orders_lost
                .get_or_create(&SaleLabels {
                    sale_id: sale.get(),
                })
                .inc_by(lost_now);
            tracing::error!(sale = %sale, lost = lost_now,
                "acknowledged orders were lost with Redis (they reached neither MySQL nor the surviving Redis); \
                 their ids are listed in lost_orders and never given out again");
        }
        Ok(Some(RebuildReport {
            sale,
            fence: side.fence,
            orders: orders.len(),
            lost: lost_now,
            counter,
            took,
        }))
    }
}

/// Rebuilds one fenced sale now, outside a running reconciler (the audit's
/// repair, the CLI).
pub async fn rebuild_now(
    engine: &crate::engine::Engine,
    db: &MySqlPool,
    sale: SaleId,
) -> anyhow::Result<Option<RebuildReport>> {
    let r = Reconciler::new(
        engine.clone(),
        db.clone(),
        std::sync::Arc::new(super::live::LiveSales::default()),
        std::sync::Arc::new(crate::telemetry::Metrics::default()),
        Default::default(),
    );
    r.rebuild(sale).await
}

/// Records `lost` (those not counted yet) in MySQL at once, in their own
/// transaction: a count must not wait for, or be undone with, the rebuild.
async fn record_lost(
    pool: &MySqlPool,
    sale: SaleId,
    lost: &[(u64, LostReason, String)],
    counted: &mut std::collections::BTreeSet<u64>,
) -> anyhow::Result<u64> {
    let new: Vec<(u64, LostReason, String)> = lost
        .iter()
        .filter(|(s, _, _)| !counted.contains(s))
        .cloned()
        .collect();
    if new.is_empty() {
        return Ok(0);
    }
    let mut tx = pool.begin().await?;
    let added = queries::record_lost(&mut tx, sale, &new).await?;
    tx.commit().await?;
    counted.extend(new.iter().map(|(s, _, _)| *s));
    Ok(added)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::OrderId;

    fn order(seq: u64, user: u64, packed_rest: &str) -> Order {
        let id = OrderId::new(SaleId::new(1).unwrap(), seq);
        Order::unpack(id, packed_rest)
            .map(|mut o| {
                o.user = crate::domain::UserId::new(user).unwrap();
                o
            })
            .unwrap()
    }

    #[test]
    fn mysql_stands_redis_only_orders_stay_and_reused_ids_are_lost() {
        let pending = "pending|7|1|100|10|20|||||";
        let paid = "paid|7|1|100|10|20|15||||pay-1";
        let mysql = vec![
            (order(1, 7, paid), Some("k1".to_owned())),
            (order(2, 8, pending), None),
        ];
        let redis = vec![
            order(1, 7, pending),
            order(2, 9, pending),
            order(4, 5, pending),
        ];
        let (all, reused) = merge(mysql, redis);
        assert_eq!(all.keys().copied().collect::<Vec<_>>(), [1, 2, 4]);
        assert_eq!(all[&1].0.status.as_str(), "paid", "MySQL's state stands");
        assert_eq!(all[&1].1.as_deref(), Some("k1"));
        assert_eq!(all[&2].0.user.get(), 8);
        assert_eq!(reused.len(), 1);
        assert_eq!((reused[0].0, reused[0].1), (2, LostReason::IdReused));
        let counted = [5].into_iter().collect();
        let missing: Vec<u64> = missing_seqs(&all, &counted, 6)
            .iter()
            .map(|m| m.0)
            .collect();
        assert_eq!(missing, [3, 6]);
    }
}
