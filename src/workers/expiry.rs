//! Expiry: closes unpaid orders at their payment deadline and puts their
//! units back on sale.
//!
//! A worker claims due entries of each sale's deadline set through one Lua
//! call that also closes the orders, so any number of workers in any number
//! of processes is safe without locks. Workers never busy-poll: after a
//! partial batch they sleep until the earliest deadline, at most `max_sleep`,
//! and an in-process [`Wakeup`] cuts the sleep short when a nearer deadline
//! or a new sale appears. Since `max_sleep` is no longer than the shortest
//! payment window (1 s), a deadline created by another process is never
//! later than the worker's next look, so cross-process wake-ups need no
//! extra channel. Workers walk the live list (`workers::live`), read from
//! MySQL: a sale another process created joins it within a second, and
//! its refresh wakes the workers.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::live::LiveSales;
use crate::engine::{Engine, EngineError};
use crate::telemetry::Metrics;

/// Lets the HTTP side wake a sleeping worker of the same process early.
#[derive(Debug)]
pub struct Wakeup {
    notify: Notify,
    /// When the worker plans to look next, ms by Redis's clock.
    planned_ms: AtomicI64,
}

impl Default for Wakeup {
    fn default() -> Self {
        Self {
            notify: Notify::new(),
            planned_ms: AtomicI64::new(i64::MAX),
        }
    }
}

impl Wakeup {
    /// A new payment deadline exists; wakes the worker if it would look later.
    pub fn deadline_added(&self, deadline_ms: i64) {
        if deadline_ms < self.planned_ms.load(Ordering::Relaxed) {
            self.notify.notify_one();
        }
    }

    /// A new sale exists: wake the worker so it starts watching it.
    pub fn sale_added(&self) {
        self.notify.notify_one();
    }
}

/// How a worker paces itself.
#[derive(Debug, Clone, Copy)]
pub struct ExpiryOptions {
    /// Most deadline entries one Lua call claims (it holds Redis meanwhile)
    /// while this process sends no reservations.
    pub batch: usize,
    /// Entries one call claims while this process's reservations are
    /// under way, unless more are needed to keep pace with them (a reserve
    /// call waits behind a claim it meets; see `claim_size`).
    pub busy_batch: usize,
    /// Longest sleep between looks; at most the shortest payment window.
    pub max_sleep: Duration,
    /// Pause after a Redis error.
    pub error_backoff: Duration,
}

impl Default for ExpiryOptions {
    fn default() -> Self {
        Self {
            batch: 256,
            busy_batch: 64,
            max_sleep: Duration::from_secs(1),
            error_backoff: Duration::from_millis(500),
        }
    }
}

/// What one step over every sale did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepOutcome {
    /// Orders closed.
    pub closed: usize,
    /// Whether due entries are left (a batch came back full).
    pub more_due: bool,
    /// The earliest deadline left over all sales, ms by Redis's clock.
    pub next_deadline_ms: Option<i64>,
    /// Redis's clock at the last call.
    pub now_ms: i64,
}

/// How long after this process's last reserve call a worker still claims
/// in short batches: reservations come in rushes, and a pause of a few ms
/// inside one must not let a long claim in.
const RESERVE_QUIET: Duration = Duration::from_millis(100);

/// What the worker saw of its process's reservations at its last step.
#[derive(Debug)]
struct ReserveWatch {
    reservations: u64,
    at: Instant,
    /// When `reservations` last moved.
    changed: Instant,
    /// How long the last step took.
    step: Duration,
}

/// The claim size while reservations go on: four times the reservations
/// made over `secs` scaled to one step's time, within `busy_batch..=batch`
/// (twice fell 40 ms behind a flood on a slow host: steps vary).
fn paced_claim(made: f64, secs: f64, step: Duration, opts: ExpiryOptions) -> usize {
    let busy = opts.busy_batch.min(opts.batch);
    if secs <= 0.0 {
        return busy;
    }
    let pace = (4.0 * made / secs * step.as_secs_f64()).ceil() as usize;
    pace.clamp(busy, opts.batch)
}

/// One expiry worker.
pub struct ExpiryWorker {
    engine: Engine,
    live: Arc<LiveSales>,
    metrics: Arc<Metrics>,
    wakeup: Arc<Wakeup>,
    opts: ExpiryOptions,
    reserves: Mutex<ReserveWatch>,
}

impl ExpiryWorker {
    /// A worker on `engine`'s Redis, over the sales of `live`.
    pub fn new(
        engine: Engine,
        live: Arc<LiveSales>,
        metrics: Arc<Metrics>,
        wakeup: Arc<Wakeup>,
        opts: ExpiryOptions,
    ) -> Self {
        let reservations = engine.reserve_stats().reservations.get();
        let now = Instant::now();
        Self {
            engine,
            live,
            metrics,
            wakeup,
            opts,
            reserves: Mutex::new(ReserveWatch {
                reservations,
                at: now,
                changed: now - RESERVE_QUIET,
                step: Duration::ZERO,
            }),
        }
    }

    /// The claim size of the next step. With no reserve call of this
    /// process within `RESERVE_QUIET`: `batch`. Otherwise a reserve call
    /// that arrives during a claim waits for it (measured on the reference
    /// host, docs/BENCHMARKS.md: claims of 128 orders held Redis ~1.4 ms and
    /// put the half-rate reserve p99 at 6.5 ms while 300,000 orders fell due
    /// at once, claims of 64 at 4.8 ms), so the claim is `busy_batch`, or
    /// more when it must be to keep pace: four times the reservations this
    /// process makes in one step's time (their deadlines fall due at about
    /// that pace a payment window later; with `busy_batch` alone a flood's
    /// deadlines fell behind by 240 ms on a slow host). A backlog of
    /// deadlines all due at once is worked off in short claims.
    fn claim_size(&self) -> usize {
        let reservations = self.engine.reserve_stats().reservations.get();
        let now = Instant::now();
        let mut w = self.reserves.lock().unwrap_or_else(|p| p.into_inner());
        if reservations != w.reservations {
            w.changed = now;
        }
        let made = reservations.saturating_sub(w.reservations) as f64;
        let secs = now.duration_since(w.at).as_secs_f64();
        w.reservations = reservations;
        w.at = now;
        if now.duration_since(w.changed) >= RESERVE_QUIET {
            return self.opts.batch;
        }
        paced_claim(made, secs, w.step, self.opts)
    }

    fn step_took(&self, took: Duration) {
        self.reserves.lock().unwrap_or_else(|p| p.into_inner()).step = took;
    }

    /// Claims and closes one batch of due orders in every live sale.
    pub async fn try_step(&self) -> Result<StepOutcome, EngineError> {
        let mut out = StepOutcome::default();
        let mut due = 0;
        let mut refunds_waiting = 0;
        let sales = self.live.ids();
        let batch = self.claim_size();
        let started = Instant::now();
        // Every live sale's claim at once: the calls share one round trip
        // to Redis instead of one each (a step over twenty sales, one after
        // another, took twenty round trips behind a reserve flood, and the
        // busy sale's deadlines fell hundreds of ms behind).
        let claims =
            futures::future::join_all(sales.iter().map(|&sale| self.engine.expire(sale, batch)))
                .await;
        self.step_took(started.elapsed());
        let mut failed = 0;
        for (&sale, claim) in sales.iter().zip(claims) {
            // One sale's failure must not hold up the others' deadlines.
            let batch = match claim {
                Ok(b) => b,
                // Redis lost it: the guard rebuilds it (and says so); its
                // deadlines are kept and worked off after.
                Err(EngineError::Fenced(_)) => continue,
                Err(e) if failed + 1 < sales.len() => {
                    failed += 1;
                    tracing::warn!(sale = %sale, error = %e, "expiry of this sale failed; the others go on");
                    continue;
                }
                Err(e) => return Err(e),
            };
            out.closed += batch.closed;
            out.more_due |= batch.still_due > 0;
            out.now_ms = out.now_ms.max(batch.now_ms);
            out.next_deadline_ms = match (out.next_deadline_ms, batch.next_deadline_ms) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            due += batch.still_due;
            refunds_waiting += batch.refunds_waiting;
            self.record_refunds(sale, &batch);
            for late in &batch.lateness_ms {
                self.metrics
                    .expiry_lateness
                    .observe(*late.max(&0) as f64 / 1000.0);
            }
            if batch.closed > 0 {
                tracing::debug!(sale = %sale, closed = batch.closed, "orders closed at their deadline");
            }
        }
        self.metrics.expiry_due.set(due as i64);
        self.metrics.refunds_pending.set(refunds_waiting);
        if out.closed > 0 {
            self.metrics.order_event("closed", out.closed as u64);
        }
        Ok(out)
    }

    fn record_refunds(&self, sale: crate::domain::SaleId, batch: &crate::engine::ExpiryBatch) {
        let m = &self.metrics;
        if batch.refunded > 0 {
            m.refunds
                .get_or_create(&crate::telemetry::OutcomeLabels {
                    outcome: "after_settlement",
                })
                .inc_by(batch.refunded as u64);
            for wait in &batch.refund_wait_ms {
                m.refund_wait.observe(*wait.max(&0) as f64 / 1000.0);
            }
        }
        if batch.dead_lettered > 0 {
            m.refunds_dead_lettered.inc_by(batch.dead_lettered as u64);
            tracing::error!(sale = %sale, refunds = batch.dead_lettered, "refunds moved to the dead-letter: their orders never settled");
        }
    }

    /// Steps until `shutdown` fires: at once again while due entries are
    /// left, otherwise after sleeping until the next deadline (bounded).
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            let pause = match self.try_step().await {
                Ok(out) if out.more_due => {
                    if shutdown.is_cancelled() {
                        return;
                    }
                    tokio::task::yield_now().await;
                    continue;
                }
                Ok(out) => {
                    let max = self.opts.max_sleep.as_millis() as i64;
                    // One extra ms: Redis compares whole ms, the timer rounds.
                    let wait = out
                        .next_deadline_ms
                        .map_or(max, |d| (d - out.now_ms + 1).clamp(0, max));
                    self.wakeup
                        .planned_ms
                        .store(out.now_ms + wait, Ordering::Relaxed);
                    Duration::from_millis(wait as u64)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "expiry step failed; retrying");
                    self.opts.error_backoff
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
                _ = self.wakeup.notify.notified() => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_keeps_pace_with_the_reservations_within_its_bounds() {
        let opts = ExpiryOptions {
            batch: 256,
            busy_batch: 48,
            ..ExpiryOptions::default()
        };
        let ms = Duration::from_millis;
        // 10,000 reservations a second, steps of 1 ms: 40 a claim, the
        // floor is 48.
        assert_eq!(paced_claim(1_000.0, 0.1, ms(1), opts), 48);
        // 20,000 a second, steps of 2 ms: 160.
        assert_eq!(paced_claim(2_000.0, 0.1, ms(2), opts), 160);
        // Never past `batch`, however fast.
        assert_eq!(paced_claim(100_000.0, 0.1, ms(5), opts), 256);
        // No time seen yet: the floor.
        assert_eq!(paced_claim(10.0, 0.0, ms(5), opts), 48);
        // A floor above `batch` is cut to it.
        let small = ExpiryOptions { batch: 16, ..opts };
        assert_eq!(paced_claim(0.0, 1.0, ms(1), small), 16);
    }
}
