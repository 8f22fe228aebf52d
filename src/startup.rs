//! Building and running a `serve` process: connect, migrate, load, bind;
//! then run each role as a sibling task under one cancellation token.
//!
//! `App::build` does all the fallible set-up (so tests can bind port 0 and
//! learn the address); `run_until_stopped` runs until the token is cancelled
//! or a task ends on its own, and says which task ended and why.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Role, ServeConfig};
use crate::engine::Engine;
use crate::http::{self, AppState, Authenticator, Limits, Shared};
use crate::telemetry::Metrics;
use crate::workers::expiry::{ExpiryOptions, ExpiryWorker, Wakeup};
use crate::workers::reconciler::{Reconciler, ReconcilerOptions};
use crate::workers::sweep::{SweepOptions, Sweeper};

/// A built, not yet running, service.
pub struct App {
    state: AppState,
    listener: Option<TcpListener>,
    limits: Limits,
    expiry_workers: usize,
    expiry: ExpiryOptions,
    /// Reconciler and sweep settings, when this process runs them.
    reconciler: Option<(ReconcilerOptions, SweepOptions)>,
}

impl App {
    /// Connects both stores (creating and migrating the database), loads the
    /// scripts and any unfinished sale Redis lacks, and binds the listener.
    pub async fn build(cfg: ServeConfig) -> anyhow::Result<Self> {
        let db = crate::db::connect(&cfg.store.database_url)
            .await
            .context("cannot prepare the MySQL database (DATABASE_URL)")?;
        let engine = Engine::connect(&cfg.store.engine_options())?;
        engine
            .load_scripts()
            .await
            .context("cannot reach Redis (REDIS_URL)")?;
        let loaded = crate::sales::load_missing(&db, &engine, None).await?;
        tracing::info!(loaded, "unfinished sales checked against Redis");
        let listener = if cfg.roles.contains(&Role::Http) {
            Some(
                TcpListener::bind(cfg.http.listen)
                    .await
                    .with_context(|| format!("cannot listen on {}", cfg.http.listen))?,
            )
        } else {
            None
        };
        let auth = Authenticator::new(
            &cfg.jwt.jwt_secret,
            cfg.http.admin_token.clone(),
            cfg.http.payment_secret.clone(),
        );
        let metrics = Metrics::default();
        metrics.register_reserve_stats(engine.reserve_stats());
        Ok(Self {
            state: AppState::new(Shared {
                engine,
                db,
                auth: Arc::new(auth),
                metrics: Arc::new(metrics),
                wakeup: Arc::new(Wakeup::default()),
            }),
            listener,
            limits: Limits {
                max_in_flight: cfg.http.max_in_flight.max(1),
                request_timeout: Duration::from_millis(cfg.http.request_timeout_ms.max(1)),
            },
            expiry_workers: if cfg.roles.contains(&Role::Expiry) {
                cfg.expiry.expiry_workers
            } else {
                0
            },
            expiry: ExpiryOptions {
                batch: cfg.expiry.expiry_batch.max(1),
                max_sleep: Duration::from_millis(cfg.expiry.expiry_max_sleep_ms.clamp(1, 1000)),
                ..ExpiryOptions::default()
            },
            reconciler: cfg.roles.contains(&Role::Reconciler).then(|| {
                let r = &cfg.reconciler;
                (
                    ReconcilerOptions {
                        // 12 placeholders per order row: MySQL allows 65,535.
                        max_batch: r.reconciler_batch.clamp(1, 5000),
                        idle_sleep: Duration::from_millis(r.reconciler_idle_ms.max(1)),
                        max_backoff: Duration::from_millis(r.reconciler_max_backoff_ms.max(100)),
                    },
                    SweepOptions {
                        interval: Duration::from_secs(r.sweep_interval_secs.max(1)),
                        grace: Duration::from_secs(r.sweep_grace_secs),
                        ..SweepOptions::default()
                    },
                )
            }),
        })
    }

    /// The bound HTTP address, when this process serves HTTP.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The shared state (tests reach the stores through it).
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Runs every role until `shutdown` is cancelled (in-flight requests
    /// finish) or a role ends by itself (then the others are stopped too).
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let tracker = TaskTracker::new();
        let (ended_tx, mut ended_rx) = tokio::sync::mpsc::unbounded_channel();
        if let Some(listener) = self.listener {
            let app = http::router(self.state.clone(), self.limits);
            let stop = shutdown.clone();
            let ended = ended_tx.clone();
            let addr = listener.local_addr()?;
            tracker.spawn(async move {
                tracing::info!(%addr, "HTTP listening");
                let result = axum::serve(listener, app)
                    .with_graceful_shutdown(stop.cancelled_owned())
                    .await;
                let _ = ended.send(("http", result.map_err(anyhow::Error::from)));
            });
        }
        for _ in 0..self.expiry_workers {
            let s = &self.state;
            let worker = ExpiryWorker::new(
                s.engine.clone(),
                s.metrics.clone(),
                s.wakeup.clone(),
                self.expiry,
            );
            let stop = shutdown.clone();
            let ended = ended_tx.clone();
            tracker.spawn(async move {
                worker.run(stop).await;
                let _ = ended.send(("expiry", Ok(())));
            });
        }
        if let Some((reconciler, sweep)) = self.reconciler {
            let s = &self.state;
            let r = Reconciler::new(
                s.engine.clone(),
                s.db.clone(),
                s.metrics.clone(),
                reconciler,
            );
            let sw = Sweeper::new(s.engine.clone(), s.db.clone(), s.metrics.clone(), sweep);
            for (name, task) in [
                ("reconciler", tokio::spawn(r.run(shutdown.clone()))),
                ("sweep", tokio::spawn(sw.run(shutdown.clone()))),
            ] {
                let ended = ended_tx.clone();
                tracker.spawn(async move {
                    let result = task.await.map_err(anyhow::Error::from);
                    let _ = ended.send((name, result));
                });
            }
            tracing::info!("reconciler and sweep running");
        }
        if self.expiry_workers > 0 {
            tracing::info!(workers = self.expiry_workers, "expiry workers running");
        }
        tracker.close();
        drop(ended_tx);

        let mut first_failure = None;
        tokio::select! {
            _ = shutdown.cancelled() => tracing::info!("shutdown requested"),
            Some((task, result)) = ended_rx.recv() => {
                match &result {
                    Ok(()) => tracing::warn!(task, "task ended by itself; stopping the others"),
                    Err(e) => tracing::error!(task, error = %e, "task failed; stopping the others"),
                }
                first_failure = result.err();
                shutdown.cancel();
            }
        }
        tracker.wait().await;
        tracing::info!("stopped");
        match first_failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Cancels `token` on SIGTERM or Ctrl-C.
pub fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("installing the SIGTERM handler");
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("signal received, shutting down gracefully");
        token.cancel();
    });
}
