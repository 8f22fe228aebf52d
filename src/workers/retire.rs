//! Retirement: an ended sale with no work left leaves the live list, so
//! workers stop visiting it, and MySQL alone answers for it from then on.
//!
//! Run by the reconciler role, at most once a second. A sale retires when,
//! by Redis's clock, it has ended, and it holds no pending order, nothing
//! due (deadlines or refund retries), no waiting or dead-lettered refund
//! and no flow record MySQL lacks. One MySQL transaction locks the sale's
//! row and its reconciler cursor, re-checks MySQL's side (no pending or
//! refund-pending order) and sets `retired_at`; before it commits,
//! `lua/retire.lua` re-checks Redis's side atomically against that cursor,
//! marks the sale retired there (refunds then go to MySQL) and sets the
//! retention as the expiry of every key. Only then does the transaction
//! commit. If the commit is lost, the next pass finds the Redis side
//! retired already (nothing can move it any more) and commits again; it
//! never retires a sale that has work left.

use std::sync::Arc;
use std::time::Duration;

use sqlx::MySqlPool;

use super::live::LiveSales;
use crate::db::retired::{self, Readiness};
use crate::domain::SaleId;
use crate::engine::{Engine, Retirement};
use crate::telemetry::Metrics;

/// Default time a retired sale's Redis keys are kept: 30 days.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

/// What one attempt to retire a sale found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The sale is retired now (or was already).
    Retired,
    /// Work is left (or the sale is being reconciled right now): why.
    NotYet(String),
}

/// Retires the live list's ended sales that have no work left.
pub struct Retirer {
    engine: Engine,
    db: MySqlPool,
    live: Arc<LiveSales>,
    metrics: Arc<Metrics>,
    retention: Duration,
}

impl Retirer {
    /// A retirer; retired sales' Redis keys expire after `retention`.
    pub fn new(
        engine: Engine,
        db: MySqlPool,
        live: Arc<LiveSales>,
        metrics: Arc<Metrics>,
        retention: Duration,
    ) -> Self {
        Self {
            engine,
            db,
            live,
            metrics,
            retention: retention.max(Duration::from_secs(1)),
        }
    }

    /// Looks at every sale of the live list that has ended by Redis's
    /// clock; returns how many retired.
    pub async fn pass(&self) -> anyhow::Result<usize> {
        let sales = self.live.snapshot();
        // The local clock only picks the candidates (with room for skew);
        // Redis's clock decides, here and again inside the script.
        let local = chrono::Utc::now().timestamp_millis();
        if !sales.iter().any(|s| s.end_ms <= local + 60_000) {
            return Ok(0);
        }
        let now = self.engine.now_ms().await?;
        let mut retired = 0;
        for s in sales.iter().filter(|s| s.end_ms <= now) {
            match self.try_retire(s.id).await {
                Ok(Outcome::Retired) => retired += 1,
                Ok(Outcome::NotYet(why)) => {
                    tracing::trace!(sale = %s.id, why, "not retired yet");
                }
                Err(e) => {
                    tracing::warn!(sale = %s.id, error = %format!("{e:#}"), "retiring this sale failed; next pass retries");
                }
            }
        }
        Ok(retired)
    }

    /// Retires `sale` if it has ended and has no work left (see the module
    /// doc); otherwise changes nothing and says why.
    pub async fn try_retire(&self, sale: SaleId) -> anyhow::Result<Outcome> {
        let not_yet = |why: &str| Ok(Outcome::NotYet(why.to_owned()));
        // Cheap looks first: most calls end here while work is left. The
        // sale hash alone answers for a sale that has not ended or still
        // has pending orders (whose due-queue may be large).
        let sale_now = match self.engine.sale(sale).await {
            // Fenced: the guard rebuilds it first.
            Err(crate::engine::EngineError::Fenced(_)) => return not_yet("fenced"),
            other => other?,
        };
        let Some(sale_now) = sale_now else {
            // Not in Redis, not retired in MySQL: lost, not finished. Never
            // retire it on that ground (the Redis-loss checks own it).
            return not_yet("missing in redis");
        };
        if !sale_now.retired {
            if sale_now.now_ms < sale_now.end_ms {
                return not_yet("not_ended");
            }
            if sale_now.stock_pending != 0 {
                return not_yet("pending");
            }
            let Some(snap) = self.engine.audit_snapshot(sale).await? else {
                return not_yet("missing in redis");
            };
            if snap.num("refunds_waiting") != 0
                || snap.num("refunds_dead") != 0
                || snap.dead_refunds != 0
            {
                return not_yet("refunds");
            }
            if snap.due_entries != 0 {
                return not_yet("due");
            }
            if snap.flow_len != 0 {
                return not_yet("flow");
            }
        }
        let mut tx = self.db.begin().await?;
        let cursor = match retired::lock_for_retirement(&mut tx, sale).await? {
            Readiness::Ready { cursor } => cursor,
            Readiness::Retired => {
                tx.rollback().await?;
                self.forget(sale).await;
                return Ok(Outcome::Retired);
            }
            Readiness::Busy(why) => {
                tx.rollback().await?;
                return not_yet(why);
            }
        };
        retired::mark_retired(&mut tx, sale).await?;
        match self.engine.retire(sale, cursor, self.retention).await? {
            Retirement::Retired => {}
            Retirement::Busy(why) => {
                tx.rollback().await?;
                return not_yet(&why);
            }
            Retirement::NotFound => {
                tx.rollback().await?;
                return not_yet("missing in redis");
            }
        }
        tx.commit().await?;
        self.forget(sale).await;
        self.metrics.live.retired.inc();
        tracing::info!(sale = %sale, keep_redis_keys = ?self.retention, "sale retired: MySQL answers for it from now on");
        Ok(Outcome::Retired)
    }

    /// Off the live list and the Redis sales index.
    async fn forget(&self, sale: SaleId) {
        self.live.retire(sale);
        if let Err(e) = self.engine.unindex_sale(sale).await {
            tracing::warn!(sale = %sale, error = %e, "a retired sale stays in the Redis sales index (harmless: workers walk the live list)");
        }
    }
}
