//! The live list: the sales that are not retired, as MySQL lists them,
//! held in memory and shared by every role of a process. The expiry
//! workers and the reconciler walk it, never a Redis key that a flush would
//! take with it. One task refreshes it from MySQL once a second; while
//! MySQL cannot be read, the last good list stays in use, and the log and
//! `/metrics` say so. A sale created through this process enters at once;
//! one this process retires leaves at once. It never calls Redis.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use sqlx::MySqlPool;
use tokio_util::sync::CancellationToken;

use super::expiry::Wakeup;
use crate::db::retired::{self, LiveSale};
use crate::domain::SaleId;
use crate::telemetry::Metrics;

/// How often the list is read from MySQL.
pub const REFRESH_EVERY: Duration = Duration::from_secs(1);
/// Longest wait for one read of the list.
const REFRESH_TIMEOUT: Duration = Duration::from_secs(2);

/// The live list of one process.
#[derive(Default)]
pub struct LiveSales {
    state: RwLock<State>,
    /// The engine told of every change (`Engine::set_live`: a live sale
    /// that Redis lacks is answered 503, not 404).
    engine: std::sync::OnceLock<crate::engine::Engine>,
}

#[derive(Debug, Default)]
struct State {
    /// The list as the workers see it.
    list: Arc<[LiveSale]>,
    /// Sales created through this process that no MySQL read has shown
    /// yet (a read that began before their insert committed lacks them),
    /// with their ends and tokens.
    added: BTreeMap<SaleId, (i64, u64)>,
    /// Sales this process retired that the last MySQL read still showed
    /// (it began before the retirement committed).
    retired: HashSet<SaleId>,
    /// When MySQL was last read.
    refreshed: Option<Instant>,
}

impl State {
    fn rebuild(&mut self, from_mysql: &[LiveSale]) {
        let mut all: BTreeMap<SaleId, (i64, u64)> = from_mysql
            .iter()
            .filter(|s| !self.retired.contains(&s.id))
            .map(|s| (s.id, (s.end_ms, s.token)))
            .collect();
        for (id, end) in &self.added {
            all.entry(*id).or_insert(*end);
        }
        self.list = all
            .into_iter()
            .map(|(id, (end_ms, token))| LiveSale { id, end_ms, token })
            .collect();
    }
}

impl LiveSales {
    /// A list holding `sales` (tests and tools that run workers by hand).
    pub fn of(sales: &[LiveSale]) -> Self {
        let me = Self::default();
        me.write().rebuild(sales);
        me
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Tells `engine` the list now and on every change.
    pub fn watch(&self, engine: crate::engine::Engine) {
        engine.set_live(self.snapshot().iter().map(|s| (s.id, s.token)));
        let _ = self.engine.set(engine);
    }

    fn changed(&self) {
        if let Some(e) = self.engine.get() {
            e.set_live(self.snapshot().iter().map(|s| (s.id, s.token)));
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The sales on the list, with their ends (one reference count).
    pub fn snapshot(&self) -> Arc<[LiveSale]> {
        self.read().list.clone()
    }

    /// The sales on the list.
    pub fn ids(&self) -> Vec<SaleId> {
        self.read().list.iter().map(|s| s.id).collect()
    }

    /// Whether `sale` is on the list.
    pub fn contains(&self, sale: SaleId) -> bool {
        self.read().list.iter().any(|s| s.id == sale)
    }

    /// A sale created through this process: on the list at once.
    pub fn add(&self, sale: SaleId, end_ms: i64, token: u64) {
        let mut s = self.write();
        s.added.insert(sale, (end_ms, token));
        s.retired.remove(&sale);
        let list: Vec<LiveSale> = s.list.to_vec();
        s.rebuild(&list);
        drop(s);
        self.changed();
    }

    /// A sale this process retired: off the list at once.
    pub fn retire(&self, sale: SaleId) {
        let mut s = self.write();
        s.added.remove(&sale);
        s.retired.insert(sale);
        let list: Vec<LiveSale> = s.list.to_vec();
        s.rebuild(&list);
        drop(s);
        self.changed();
    }

    /// Replaces the list with what MySQL listed (plus the sales this
    /// process created that the read did not show yet, minus the ones it
    /// retired); returns how many sales are new to the list.
    pub fn replace(&self, from_mysql: &[LiveSale]) -> usize {
        let mut s = self.write();
        let listed: HashSet<SaleId> = from_mysql.iter().map(|l| l.id).collect();
        s.added.retain(|id, _| !listed.contains(id));
        s.retired.retain(|id| listed.contains(id));
        let before: HashSet<SaleId> = s.list.iter().map(|l| l.id).collect();
        s.rebuild(from_mysql);
        s.refreshed = Some(Instant::now());
        let new = s.list.iter().filter(|l| !before.contains(&l.id)).count();
        drop(s);
        self.changed();
        new
    }

    /// Time since MySQL was last read (`None`: never).
    pub fn age(&self) -> Option<Duration> {
        self.read().refreshed.map(|t| t.elapsed())
    }

    /// Reads the list from MySQL once; returns how many sales are new. On
    /// an error the list stays as it was.
    pub async fn refresh(&self, db: &MySqlPool) -> anyhow::Result<usize> {
        let sales = tokio::time::timeout(REFRESH_TIMEOUT, retired::live_sales(db))
            .await
            .map_err(|_| anyhow::anyhow!("no answer within {REFRESH_TIMEOUT:?}"))??;
        Ok(self.replace(&sales))
    }

    /// Refreshes every [`REFRESH_EVERY`] until `shutdown` fires. New sales
    /// (created by another process) wake this process's expiry workers.
    pub async fn run(
        self: Arc<Self>,
        db: MySqlPool,
        metrics: Arc<Metrics>,
        wakeup: Arc<Wakeup>,
        shutdown: CancellationToken,
    ) {
        let mut failures = 0u64;
        let mut tick = tokio::time::interval(REFRESH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self.refresh(&db).await {
                Ok(new) => {
                    if failures > 0 {
                        tracing::info!(
                            failures,
                            sales = self.snapshot().len(),
                            "live sales: read from MySQL again"
                        );
                        failures = 0;
                    }
                    if new > 0 {
                        wakeup.sale_added();
                    }
                }
                Err(e) => {
                    failures += 1;
                    metrics.live.refresh_failures.inc();
                    // The first failure and then one a minute, not one a second.
                    if failures % 60 == 1 {
                        tracing::warn!(
                            error = %format!("{e:#}"),
                            failures,
                            sales = self.snapshot().len(),
                            "live sales: cannot read the list from MySQL; working from the last good list"
                        );
                    }
                }
            }
            metrics.live.sales.set(self.snapshot().len() as i64);
            metrics
                .live
                .age_seconds
                .set(self.age().map_or(-1, |a| a.as_secs() as i64));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sale(id: u64) -> LiveSale {
        LiveSale {
            id: SaleId::new(id).unwrap(),
            end_ms: id as i64 * 1000,
            token: 0,
        }
    }

    #[test]
    fn a_read_that_missed_a_change_of_this_process_does_not_undo_it() {
        let live = LiveSales::of(&[sale(1), sale(2)]);
        live.add(SaleId::new(3).unwrap(), 3000, 0);
        live.retire(SaleId::new(1).unwrap());
        assert_eq!(live.ids(), [2, 3].map(|i| SaleId::new(i).unwrap()));
        // A read that began before both changes committed.
        assert_eq!(live.replace(&[sale(1), sale(2)]), 0);
        assert_eq!(live.ids(), [2, 3].map(|i| SaleId::new(i).unwrap()));
        // Later reads show both; then the list is MySQL's alone.
        assert_eq!(live.replace(&[sale(2), sale(3)]), 0);
        assert_eq!(live.replace(&[sale(2), sale(4)]), 1);
        assert_eq!(live.ids(), [2, 4].map(|i| SaleId::new(i).unwrap()));
        assert!(live.age().is_some());
    }
}
