//! Every background role of a process runs under one supervisor: a role
//! that panics or ends by itself is logged, counted
//! (`flashsale_role_restarts_total{role}`), reported down (so `/readyz`
//! answers 503 meanwhile) and started again after a backoff that doubles
//! from 100 ms to 30 s (and starts over once a role has run for a minute).
//! Restarting in place keeps the process's other roles serving; a role
//! that keeps failing shows as down and as a climbing restart count, for
//! the operator or the orchestrator's readiness probe to act on.
//! It never restarts anything after shutdown was asked for.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::telemetry::RoleLabels;

/// First wait before a restart.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait before a restart.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A role that ran this long starts its backoff over.
const STABLE: Duration = Duration::from_secs(60);

/// Called with a role's name and whether it runs.
pub type OnState = Arc<dyn Fn(&'static str, bool) + Send + Sync>;

/// Starts roles and keeps them running until `shutdown`.
#[derive(Clone)]
pub struct Supervisor {
    tracker: TaskTracker,
    shutdown: CancellationToken,
    on_state: OnState,
    restarts: Family<RoleLabels, Counter>,
}

impl Supervisor {
    /// Roles are tracked by `tracker`, stop with `shutdown`, report their
    /// state to `on_state` and count restarts in `restarts`.
    pub fn new(
        tracker: TaskTracker,
        shutdown: CancellationToken,
        on_state: OnState,
        restarts: Family<RoleLabels, Counter>,
    ) -> Self {
        Self {
            tracker,
            shutdown,
            on_state,
            restarts,
        }
    }

    /// Runs the future `start` makes as role `role`, and a new one each time
    /// the last panicked or ended before shutdown.
    pub fn spawn<F, Fut>(&self, role: &'static str, mut start: F)
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let this = self.clone();
        self.tracker.spawn(async move {
            let mut backoff = FIRST_BACKOFF;
            loop {
                (this.on_state)(role, true);
                let started = Instant::now();
                let ended = tokio::spawn(start()).await;
                if this.shutdown.is_cancelled() {
                    break;
                }
                match ended {
                    Ok(()) => tracing::error!(role, "role ended by itself; restarting it"),
                    Err(e) => tracing::error!(role, error = %e, "role failed; restarting it"),
                }
                (this.on_state)(role, false);
                this.restarts.get_or_create(&RoleLabels { role }).inc();
                if started.elapsed() >= STABLE {
                    backoff = FIRST_BACKOFF;
                }
                tokio::select! {
                    () = this.shutdown.cancelled() => break,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    #[tokio::test(start_paused = true)]
    async fn a_role_that_panics_is_reported_down_counted_and_restarted() {
        let tracker = TaskTracker::new();
        let shutdown = CancellationToken::new();
        let states: Arc<Mutex<Vec<bool>>> = Arc::default();
        let seen = states.clone();
        let restarts = Family::<RoleLabels, Counter>::default();
        let sup = Supervisor::new(
            tracker.clone(),
            shutdown.clone(),
            Arc::new(move |_, up| seen.lock().unwrap().push(up)),
            restarts.clone(),
        );
        let runs = Arc::new(AtomicUsize::new(0));
        let counted = runs.clone();
        let stop = shutdown.clone();
        sup.spawn("flaky", move || {
            let n = counted.fetch_add(1, Ordering::SeqCst);
            let stop = stop.clone();
            async move {
                if n < 2 {
                    panic!("made to panic (run {n})");
                }
                stop.cancelled().await;
            }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        assert_eq!(
            restarts.get_or_create(&RoleLabels { role: "flaky" }).get(),
            2
        );
        assert_eq!(*states.lock().unwrap(), [true, false, true, false, true]);
        shutdown.cancel();
        tracker.close();
        tracker.wait().await;
        // Shutdown ends the role for good: no restart, no "down".
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        assert_eq!(states.lock().unwrap().len(), 5);
    }
}
