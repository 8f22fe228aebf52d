//! The safety-net sweep: pending orders that MySQL holds far past their
//! deadline are checked against Redis. One that Redis no longer knows (its
//! expiry can never happen there) is closed in MySQL with its stock
//! accounted, logged, counted and written to `sweep_corrections`. One that
//! Redis still holds pending means expiry is behind; it is logged and
//! counted, and left to the expiry workers. Everything else is a change on
//! its way through the flow stream.

use std::sync::Arc;
use std::time::Duration;

use sqlx::MySqlPool;
use tokio_util::sync::CancellationToken;

use crate::db::sweep as queries;
use crate::engine::{Engine, EngineError, OrderStatus};
use crate::telemetry::Metrics;

/// How often and how far back the sweep looks.
#[derive(Debug, Clone, Copy)]
pub struct SweepOptions {
    /// Time between sweeps.
    pub interval: Duration,
    /// How far past its deadline a pending order must be to be looked at.
    pub grace: Duration,
    /// Most orders looked at per sweep.
    pub batch: usize,
}

impl Default for SweepOptions {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(60),
            grace: Duration::from_secs(300),
            batch: 500,
        }
    }
}

/// What one sweep found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepOutcome {
    /// Overdue pending orders looked at.
    pub examined: usize,
    /// Orders Redis no longer knew, closed in MySQL.
    pub corrected: usize,
    /// Orders Redis still holds pending past the grace (expiry is behind).
    pub overdue_in_redis: usize,
}

/// The sweep worker.
pub struct Sweeper {
    engine: Engine,
    db: MySqlPool,
    metrics: Arc<Metrics>,
    opts: SweepOptions,
    /// Where the last sweep left off (None: from the oldest).
    after: tokio::sync::Mutex<Option<queries::SweepCursor>>,
}

impl Sweeper {
    /// A sweeper over `db`, checking against `engine`'s Redis.
    pub fn new(engine: Engine, db: MySqlPool, metrics: Arc<Metrics>, opts: SweepOptions) -> Self {
        Self {
            engine,
            db,
            metrics,
            opts,
            after: Default::default(),
        }
    }

    /// One sweep.
    pub async fn try_step(&self) -> anyhow::Result<SweepOutcome> {
        let mut out = SweepOutcome::default();
        let mut after = self.after.lock().await;
        let overdue =
            queries::overdue_pending(&self.db, self.opts.grace, *after, self.opts.batch).await?;
        // A short page means the end: the next sweep starts from the oldest.
        *after = match overdue.last() {
            Some(last) if overdue.len() == self.opts.batch => {
                Some((last.deadline, last.id.sale().get(), last.id.seq()))
            }
            _ => None,
        };
        drop(after);
        let mut skip = std::collections::HashSet::new();
        for row in overdue {
            out.examined += 1;
            let sale = row.id.sale();
            if skip.contains(&sale) {
                continue;
            }
            // A sale Redis lost, or fenced while it is rebuilt: its orders
            // come back from MySQL with their deadlines; never close them
            // here as "unknown to Redis".
            match self.engine.sale(sale).await {
                Ok(Some(_)) => {}
                Ok(None) | Err(EngineError::Fenced(_)) => {
                    skip.insert(sale);
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
            let order = match self.engine.order(row.id).await {
                Err(EngineError::Fenced(_)) => {
                    skip.insert(sale);
                    continue;
                }
                other => other?,
            };
            match order {
                None => {
                    // Under the sale's cursor lock, Redis is asked again: a
                    // rebuild that ran meanwhile may have the order back.
                    let tx = queries::lock_sale(&self.db, sale).await?;
                    match self.engine.order(row.id).await {
                        Ok(None) => {}
                        _ => {
                            tx.rollback().await?;
                            continue;
                        }
                    }
                    if queries::close_lost_order(tx, &row).await? {
                        out.corrected += 1;
                        self.metrics.sweep_corrections.inc();
                        tracing::warn!(order = %row.id, qty = row.qty, "sweep closed an overdue order that Redis no longer knows");
                    }
                }
                Some(o) if o.status == OrderStatus::Pending => {
                    out.overdue_in_redis += 1;
                    self.metrics.sweep_overdue_in_redis.inc();
                    tracing::warn!(order = %row.id, "order still pending in Redis far past its deadline: expiry is behind");
                }
                Some(_) => {} // its change is on its way through the flow stream
            }
        }
        Ok(out)
    }

    /// Sweeps every `interval` until `shutdown` fires.
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.opts.interval) => {}
            }
            if let Err(e) = self.try_step().await {
                tracing::warn!(error = %format!("{e:#}"), "sweep failed; next one at the next interval");
            }
        }
    }
}
