//! The reconciler: carries every flow record from Redis into MySQL exactly
//! once in effect, then deletes it from Redis.
//!
//! For each sale it locks the sale's cursor row (`SKIP LOCKED`, so any
//! number of reconcilers share the sales), reads the records after the
//! cursor, applies them and moves the cursor in one transaction, and trims
//! the stream only after the commit. A crash anywhere leaves either the old
//! cursor (the batch is read again) or the new one (the records are skipped
//! and trimmed next time). Batches adapt by themselves: whatever waits, up
//! to `max_batch`, so an idle sale is applied record by record within
//! `idle_sleep` and a busy one in large transactions. After a full batch the
//! next one is read from Redis while MySQL applies and commits this one, and
//! taken only if it was read after the cursor then locked and Redis still
//! holds it (`read_batch`). While MySQL is down it retries with capped,
//! jittered exponential backoff; Redis keeps selling.
//!
//! It walks the live list (`workers::live`: the sales MySQL holds as not
//! retired), and once a second retires the ended sales that have no work
//! left (`workers::retire`), which then leave the list.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::MySqlPool;
use tokio_util::sync::CancellationToken;

use super::live::LiveSales;
use super::retire::{Retirer, DEFAULT_RETENTION};
use crate::db::ledger;
use crate::domain::SaleId;
use crate::engine::{Engine, EngineError, FlowEntry, FlowId};
use crate::telemetry::{EventTypeLabels, Metrics};

/// How often ended sales are looked at for retirement.
const RETIRE_EVERY: Duration = Duration::from_secs(1);

/// How the reconciler paces itself.
#[derive(Debug, Clone, Copy)]
pub struct ReconcilerOptions {
    /// Most records applied in one transaction.
    pub max_batch: usize,
    /// Pause when nothing waits.
    pub idle_sleep: Duration,
    /// Longest pause between retries while MySQL or Redis fails.
    pub max_backoff: Duration,
    /// How long a retired sale's Redis keys are kept.
    pub retention: Duration,
}

impl Default for ReconcilerOptions {
    fn default() -> Self {
        Self {
            max_batch: 2000,
            idle_sleep: Duration::from_millis(20),
            max_backoff: Duration::from_secs(30),
            retention: DEFAULT_RETENTION,
        }
    }
}

/// What one pass over the sales did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepOutcome {
    /// Records applied.
    pub applied: usize,
    /// Whether some sale returned a full batch (more is waiting).
    pub more: bool,
    /// Sales retired.
    pub retired: usize,
}

/// One reconciler.
pub struct Reconciler {
    pub(super) engine: Engine,
    pub(super) db: MySqlPool,
    pub(super) metrics: Arc<Metrics>,
    pub(super) opts: ReconcilerOptions,
    pub(super) live: Arc<LiveSales>,
    /// The guard's memory (`workers::guard`).
    pub(super) guard: tokio::sync::Mutex<super::guard::GuardState>,
    retirer: Retirer,
    /// When ended sales were last looked at for retirement.
    last_retire: std::sync::Mutex<Option<Instant>>,
    /// Sales whose cursor row is known to exist.
    known_cursors: tokio::sync::Mutex<HashSet<SaleId>>,
    /// Per sale, the read of its next batch, begun while this reconciler
    /// applied a full one (see [`Reconciler::read_batch`]).
    ahead: std::sync::Mutex<HashMap<SaleId, Ahead>>,
}

/// The next batch of a sale, read from Redis while the current one was
/// applied and committed.
struct Ahead {
    /// The record it was read after: the cursor the batch committed.
    after: FlowId,
    /// The read, running or done.
    read: tokio::task::JoinHandle<Result<Vec<FlowEntry>, EngineError>>,
}

impl Reconciler {
    /// A reconciler between `engine`'s Redis and `db`, over the sales of
    /// `live`.
    pub fn new(
        engine: Engine,
        db: MySqlPool,
        live: Arc<LiveSales>,
        metrics: Arc<Metrics>,
        opts: ReconcilerOptions,
    ) -> Self {
        let retirer = Retirer::new(
            engine.clone(),
            db.clone(),
            live.clone(),
            metrics.clone(),
            opts.retention,
        );
        Self {
            engine,
            db,
            metrics,
            opts,
            live,
            retirer,
            last_retire: Default::default(),
            known_cursors: Default::default(),
            ahead: Default::default(),
            guard: Default::default(),
        }
    }

    /// Checks the live sales against MySQL (the guard, at most every
    /// `guard::GUARD_EVERY`: fences and rebuilds what Redis lost), applies
    /// one batch of every live sale, updates the backlog metrics, and (at
    /// most once a second) retires ended sales with no work left.
    pub async fn try_step(&self) -> anyhow::Result<StepOutcome> {
        let mut out = StepOutcome::default();
        let sales = self.live.ids();
        self.guard_pass(&sales).await?;
        let foreign = self.guard.lock().await.foreign();
        let mut failed = 0;
        let mut last_error = None;
        for &sale in &sales {
            if foreign.contains(&sale) {
                continue; // another database's records: never applied here
            }
            // One sale's failure (a record MySQL refuses, a deadlock) must
            // not hold up the others.
            match self.reconcile_sale(sale).await {
                Ok(n) => {
                    out.applied += n;
                    out.more |= n >= self.opts.max_batch;
                }
                Err(e) => {
                    failed += 1;
                    tracing::warn!(sale = %sale, error = %format!("{e:#}"), "reconciling this sale failed; the others go on");
                    last_error = Some(e);
                }
            }
        }
        if let Some(e) = last_error.filter(|_| failed == sales.len()) {
            return Err(e); // everything failed: MySQL or Redis is down; back off
        }
        if failed > 0 {
            self.metrics.reconciler_retries.inc();
        }
        self.measure_backlog(&sales).await?;
        if self.retire_due() {
            out.retired = self.retirer.pass().await?;
        }
        Ok(out)
    }

    fn retire_due(&self) -> bool {
        let mut last = self.last_retire.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| t.elapsed() < RETIRE_EVERY) {
            return false;
        }
        *last = Some(Instant::now());
        true
    }

    /// Applies the next batch of one sale; returns how many records.
    pub async fn reconcile_sale(&self, sale: SaleId) -> anyhow::Result<usize> {
        self.reconcile_batch(sale, true).await
    }

    /// Applies the next batch of one sale. With `numbered`, a record
    /// numbered at or below the last one MySQL applied (Redis went back in
    /// time and numbers records again) fences the sale instead: nothing is
    /// applied, and the guard rebuilds it. The rebuild itself drains a
    /// fenced sale without that check (the forward-only judge still holds).
    pub(super) async fn reconcile_batch(
        &self,
        sale: SaleId,
        numbered: bool,
    ) -> anyhow::Result<usize> {
        if !self.known_cursors.lock().await.contains(&sale) {
            ledger::ensure_cursor(&self.db, sale).await?;
            self.known_cursors.lock().await.insert(sale);
        }
        let mut tx = self.db.begin().await?;
        let Some((cursor, last_n)) = ledger::lock_numbered_cursor(&mut tx, sale).await? else {
            return Ok(0); // another reconciler has this sale right now
        };
        // Records (and the settled mark) a crash left behind after a commit.
        let (_, records) = tokio::try_join!(
            self.engine.settle(sale, cursor),
            self.read_batch(sale, cursor, numbered)
        )?;
        let Some(last) = records.last().map(|r| r.id()) else {
            tx.commit().await?;
            return Ok(0);
        };
        if numbered {
            if let Some(n) = records
                .iter()
                .filter_map(|r| r.number())
                .find(|&n| n <= last_n)
            {
                tx.rollback().await?;
                if self.engine.fence(sale, "behind").await? {
                    tracing::warn!(sale = %sale, record = n, applied = last_n,
                        "a flow record numbered at or below the last one MySQL applied: Redis went back in time; sale fenced");
                }
                return Ok(0);
            }
        }
        // Only what the replicas hold reaches MySQL (acknowledged writes).
        self.engine.replicated(sale).await?;
        // A full batch: more probably waits. Its read runs beside this
        // batch's MySQL work (on another core), for the next call to check
        // and take (`read_batch`).
        let next = (numbered && records.len() >= self.opts.max_batch).then(|| {
            let (engine, n) = (self.engine.clone(), self.opts.max_batch);
            tokio::spawn(async move { engine.read_flow_entries(sale, last, n).await })
        });
        let out = match apply_and_commit(tx, sale, &records).await {
            Ok(out) => out,
            Err(e) => {
                if let Some(read) = next {
                    read.abort();
                }
                return Err(e);
            }
        };
        if let Some(read) = next {
            let ahead = Ahead { after: last, read };
            if let Some(old) = self.ahead().insert(sale, ahead) {
                old.read.abort();
            }
        }
        self.metrics.reconciler_batches.inc();
        self.metrics.reconciler_rows.inc_by(out.applied as u64);
        for t in &out.events {
            self.metrics
                .events
                .outbox_written
                .get_or_create(&EventTypeLabels {
                    event_type: t.as_str(),
                })
                .inc();
        }
        for q in &out.quarantined {
            self.metrics.flow_quarantined.inc();
            tracing::error!(sale = %sale, flow = %q.flow, order_seq = ?q.seq, reason = %q.reason,
                "flow record quarantined, not applied; the sale's later records go on");
        }
        // Best effort: a failure here only delays the trim to the next batch.
        if let Err(e) = self.engine.settle(sale, last).await {
            tracing::warn!(sale = %sale, error = %e, "trimming applied flow records failed; will retry");
        }
        Ok(records.len())
    }

    fn ahead(&self) -> std::sync::MutexGuard<'_, HashMap<SaleId, Ahead>> {
        self.ahead.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The records of `sale` after `cursor` (the locked cursor), up to
    /// `max_batch`: the read begun while the last batch was applied, when
    /// it was read after this cursor and Redis still holds what it read,
    /// topped up to a full batch; otherwise (or without `numbered`: the
    /// rebuild reads only what Redis holds now) a read of its own.
    ///
    /// Redis still holds it when its last entry is still there, unchanged:
    /// a stream only grows at its end (ids given by Redis, each above the
    /// last) and loses entries only from its start, up to a committed
    /// cursor (which is not past this one). A Redis that went back in time,
    /// or a stream rebuilt meanwhile, lacks that entry or has another one
    /// in its place. The check is read in one call with the top-up, after
    /// the cursor was locked, as the read of its own would be.
    async fn read_batch(
        &self,
        sale: SaleId,
        cursor: FlowId,
        numbered: bool,
    ) -> Result<Vec<FlowEntry>, EngineError> {
        let max = self.opts.max_batch;
        let ahead = self.ahead().remove(&sale);
        if let Some(a) = ahead {
            if !numbered || a.after != cursor {
                a.read.abort(); // stale (another reconciler moved the cursor), or a rebuild
            } else if let Ok(Ok(mut entries)) = a.read.await {
                // (A read that failed is made again below.)
                if let Some(tail) = entries.last().cloned() {
                    let from = match entries.len() {
                        1 => cursor,
                        n => entries[n - 2].id(),
                    };
                    let more = self
                        .engine
                        .read_flow_entries(sale, from, max.saturating_sub(entries.len()) + 1)
                        .await?;
                    if more.first() == Some(&tail) {
                        entries.extend(more.into_iter().skip(1));
                        entries.truncate(max);
                        return Ok(entries);
                    }
                }
            }
        }
        self.engine.read_flow_entries(sale, cursor, max).await
    }

    async fn measure_backlog(&self, sales: &[SaleId]) -> anyhow::Result<()> {
        let mut backlog = 0;
        let mut oldest: Option<u64> = None;
        for &sale in sales {
            let (len, first) = self.engine.flow_backlog(sale).await?;
            backlog += len;
            if let Some(first) = first {
                oldest = Some(oldest.map_or(first.ms, |o| o.min(first.ms)));
            }
        }
        let lag_ms = match oldest {
            Some(ms) => (self.engine.now_ms().await? - ms as i64).max(0),
            None => 0,
        };
        self.metrics.reconciler_backlog.set(backlog as i64);
        self.metrics.reconciler_lag_ms.set(lag_ms);
        Ok(())
    }

    /// Steps until `shutdown` fires.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Duration::ZERO;
        loop {
            let pause = match self.try_step().await {
                Ok(out) => {
                    if backoff > Duration::ZERO {
                        tracing::info!("reconciler recovered");
                        backoff = Duration::ZERO;
                    }
                    if out.more {
                        if shutdown.is_cancelled() {
                            return;
                        }
                        tokio::task::yield_now().await;
                        continue;
                    }
                    self.opts.idle_sleep
                }
                Err(e) => {
                    self.metrics.reconciler_retries.inc();
                    backoff = (backoff * 2)
                        .max(Duration::from_millis(100))
                        .min(self.opts.max_backoff);
                    tracing::warn!(error = %format!("{e:#}"), retry_in = ?backoff, "reconciler step failed");
                    with_jitter(backoff)
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }
}

/// Applies `records` in `tx` (see [`ledger::apply`]) and commits.
async fn apply_and_commit(
    mut tx: sqlx::Transaction<'_, sqlx::MySql>,
    sale: SaleId,
    records: &[FlowEntry],
) -> anyhow::Result<ledger::BatchOutcome> {
    let out = ledger::apply(&mut tx, sale, records).await?;
    tx.commit().await?;
    Ok(out)
}

/// `d` plus up to a quarter of it, so many reconcilers do not retry in step.
pub(crate) fn with_jitter(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |t| t.subsec_nanos());
    let quarter = d.as_millis() as u64 / 4;
    d + Duration::from_millis(if quarter == 0 {
        0
    } else {
        u64::from(nanos) % quarter
    })
}
