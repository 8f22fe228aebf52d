//! Building and running a `serve` process: connect, migrate, load, bind;
//! then run each role as a sibling task under one cancellation token.
//!
//! `App::build` does all the fallible set-up (so tests can bind port 0 and
//! learn the address); `run_until_stopped` runs until the token is cancelled
//! or the HTTP server ends on its own (then it says why and stops the rest).
//! On the token, `/readyz` fails at once; the process goes on serving for
//! `FLASHSALE_SHUTDOWN_DELAY_MS` (load balancers stop sending it requests
//! meanwhile), then stops accepting, answers the requests in flight, and
//! stops its roles.
//! Background roles (expiry, reconciler, sweep, the live list) run under
//! `workers::supervisor`: one that panics is restarted in place.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{AmqpConfig, Role, ServeConfig};
use crate::engine::Engine;
use crate::http::server::{self, ConnLimits};
use crate::http::{self, AppState, Authenticator, Health, Limits, Rate, RateLimits, Shared};
use crate::points::PointsConsumer;
use crate::telemetry::{Metrics, RoleLabels};
use crate::workers::expiry::{ExpiryOptions, ExpiryWorker, Wakeup};
use crate::workers::live::LiveSales;
use crate::workers::reconciler::{Reconciler, ReconcilerOptions};
use crate::workers::relay::Relay;
use crate::workers::supervisor::Supervisor;
use crate::workers::sweep::{SweepOptions, Sweeper};

/// A built, not yet running, service.
pub struct App {
    state: AppState,
    listener: TcpListener,
    /// Whether `listener` serves the whole API or only the operations routes.
    serves_api: bool,
    limits: Limits,
    connections: ConnLimits,
    expiry_workers: usize,
    expiry: ExpiryOptions,
    /// Reconciler and sweep settings, when this process runs them.
    reconciler: Option<(ReconcilerOptions, SweepOptions)>,
    /// The broker, when this process runs the relay.
    relay: Option<AmqpConfig>,
    /// The broker, when this process runs the points consumer.
    points: Option<AmqpConfig>,
    /// How long it serves, not ready, between the shutdown request and the
    /// listener's close.
    shutdown_delay: Duration,
}

impl App {
    /// Connects both stores (creating and migrating the database), loads the
    /// scripts and any unfinished sale Redis lacks, and binds the listener.
    pub async fn build(cfg: ServeConfig) -> anyhow::Result<Self> {
        let cfg = cfg.with_roles();
        cfg.check_roles()?;
        let serves_api = cfg.serves_http();
        let secrets = match (&cfg.secrets, serves_api) {
            (Some(s), _) => Some(s.clone()),
            (None, true) => Some(crate::config::Secrets::from_env()?),
            (None, false) => None,
        };
        let h = &cfg.http;
        let redis_timeout = Duration::from_millis(cfg.store.redis_timeout_ms);
        let request_timeout = Duration::from_millis(h.request_timeout_ms);
        // A reserve may wait for its queue and then for its call, each up to
        // the Redis timeout; it must still answer (with its retry key)
        // before the request times out.
        anyhow::ensure!(
            request_timeout > redis_timeout * 2,
            "FLASHSALE_REQUEST_TIMEOUT_MS ({} ms) must be more than twice FLASHSALE_REDIS_TIMEOUT_MS ({} ms)",
            h.request_timeout_ms,
            cfg.store.redis_timeout_ms
        );
        let db = crate::db::connect(&cfg.store.database_url)
            .await
            .context("cannot prepare the MySQL database (DATABASE_URL)")?;
        let mut engine_options = cfg.store.engine_options()?;
        // The front door admits at most max_in_flight requests: a sale's
        // queue never refuses one of them.
        engine_options.batching.queue_limit = engine_options
            .batching
            .queue_limit
            .max(h.max_in_flight as usize);
        let topology = engine_options.topology.describe();
        let engine = Engine::connect(&engine_options)?;
        engine
            .load_scripts()
            .await
            .with_context(|| format!("cannot reach Redis: {topology}"))?;
        tracing::info!(
            redis = %topology,
            wait_replicas = engine_options.wait_replicas,
            "connected to Redis"
        );
        check_durability(&engine, cfg.require_durable_redis).await?;
        let live = Arc::new(LiveSales::default());
        live.watch(engine.clone());
        live.refresh(&db)
            .await
            .context("cannot read the live sales from MySQL")?;
        // A process without the HTTP role still serves the operations routes.
        let listen = if serves_api {
            h.listen
        } else {
            h.metrics_listen.unwrap_or(h.listen)
        };
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        let auth = match &secrets {
            Some(s) => Authenticator::new(
                &s.jwt_secret,
                s.admin_token.clone(),
                s.payment_secret.clone(),
            ),
            None => Authenticator::refusing_all(),
        };
        let metrics = Metrics::default();
        metrics.register_reserve_stats(engine.reserve_stats());
        metrics.register_replication_stats(&engine.replication_stats());
        let rate = |per_sec, burst| Rate { per_sec, burst };
        Ok(Self {
            state: AppState::new(Shared {
                engine,
                health: Health::new(crate::db::probe_pool(&cfg.store.database_url)?),
                db,
                auth: Arc::new(auth),
                metrics: Arc::new(metrics),
                wakeup: Arc::new(Wakeup::default()),
                limits: RateLimits::new(
                    rate(h.buyer_rate_per_sec, h.buyer_burst),
                    rate(
                        h.ip_rate_per_sec,
                        h.ip_burst.unwrap_or(h.ip_rate_per_sec.saturating_mul(2)),
                    ),
                ),
                live,
            }),
            listener,
            serves_api,
            limits: Limits {
                max_in_flight: h.max_in_flight as usize,
                request_timeout,
            },
            connections: ConnLimits {
                header_timeout: Duration::from_secs(h.header_timeout_secs),
                idle_timeout: Duration::from_secs(h.idle_timeout_secs),
                max_connections: server::fit_connections(h.max_connections as usize),
                drain: request_timeout + Duration::from_secs(1),
            },
            expiry_workers: if cfg.roles.contains(&Role::Expiry) {
                cfg.expiry.expiry_workers
            } else {
                0
            },
            expiry: ExpiryOptions {
                batch: cfg.expiry.expiry_batch,
                busy_batch: cfg.expiry.expiry_busy_batch,
                max_sleep: Duration::from_millis(cfg.expiry.expiry_max_sleep_ms.clamp(1, 1000)),
                ..ExpiryOptions::default()
            },
            reconciler: cfg.roles.contains(&Role::Reconciler).then(|| {
                let r = &cfg.reconciler;
                (
                    ReconcilerOptions {
                        // 12 placeholders per order row: MySQL allows 65,535.
                        max_batch: r.reconciler_batch.clamp(1, 5000),
                        idle_sleep: Duration::from_millis(r.reconciler_idle_ms),
                        max_backoff: Duration::from_millis(r.reconciler_max_backoff_ms.max(100)),
                        retention: Duration::from_secs(r.sale_retention_secs),
                    },
                    SweepOptions {
                        interval: Duration::from_secs(r.sweep_interval_secs),
                        grace: Duration::from_secs(r.sweep_grace_secs),
                        ..SweepOptions::default()
                    },
                )
            }),
            relay: cfg.roles.contains(&Role::Relay).then(|| cfg.amqp.clone()),
            points: cfg.roles.contains(&Role::Points).then(|| cfg.amqp.clone()),
            shutdown_delay: Duration::from_millis(h.shutdown_delay_ms),
        })
    }

    /// The bound HTTP address, when this process serves the API.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.serves_api
            .then(|| self.listener.local_addr().ok())
            .flatten()
    }

    /// The bound address of the operations routes (`/healthz`, `/readyz`,
    /// `/metrics`): the API's address, or the metrics address of a process
    /// without the HTTP role.
    pub fn ops_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The shared state (tests reach the stores through it).
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Runs every role until `requested` is cancelled (readiness fails at
    /// once; after the shutdown delay the listener closes, in-flight
    /// requests finish, the roles stop) or a role ends by itself (then the
    /// others are stopped at once).
    pub async fn run_until_stopped(self, requested: CancellationToken) -> anyhow::Result<()> {
        // What the roles stop on: `requested`, after the shutdown delay.
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let (ended_tx, mut ended_rx) = tokio::sync::mpsc::unbounded_channel();
        let role = |name: &'static str, up: bool| {
            self.state.health.set_role(name, up);
            self.state
                .metrics
                .role_up
                .get_or_create(&RoleLabels { role: name })
                .set(i64::from(up));
        };
        {
            let (app, name) = if self.serves_api {
                (http::router(self.state.clone(), self.limits), "http")
            } else {
                (http::ops::router(self.state.clone()), "ops")
            };
            let stop = shutdown.clone();
            let ended = ended_tx.clone();
            let addr = self.listener.local_addr()?;
            let (connections, open) = (
                self.connections,
                self.state.metrics.http_connections.clone(),
            );
            let listener = self.listener;
            role(name, true);
            tracker.spawn(async move {
                tracing::info!(%addr, api = name == "http", "HTTP listening");
                let result = server::serve(listener, app, connections, open, stop).await;
                let _ = ended.send((name, result.map_err(anyhow::Error::from)));
            });
        }
        if self.serves_api {
            // Forgets idle buyers and addresses so the limiters stay small.
            let state = self.state.clone();
            let stop = shutdown.clone();
            tracker.spawn(async move {
                let mut tick = tokio::time::interval(http::limits::PURGE_EVERY);
                loop {
                    tokio::select! {
                        () = stop.cancelled() => break,
                        _ = tick.tick() => { state.limits.purge(); }
                    }
                }
            });
        }
        // Background roles restart in place when they fail (see
        // workers::supervisor); the HTTP server above stops the process.
        let supervisor = {
            let state = self.state.clone();
            Supervisor::new(
                tracker.clone(),
                shutdown.clone(),
                Arc::new(move |name, up| {
                    state.health.set_role(name, up);
                    state
                        .metrics
                        .role_up
                        .get_or_create(&RoleLabels { role: name })
                        .set(i64::from(up));
                }),
                self.state.metrics.role_restarts.clone(),
            )
        };
        let s = self.state.clone();
        {
            // The live list, read from MySQL once a second: the workers walk
            // it, and the API answers a live sale Redis lacks with 503.
            let (s, stop) = (s.clone(), shutdown.clone());
            supervisor.spawn("live_sales", move || {
                s.live.clone().run(
                    s.db.clone(),
                    s.metrics.clone(),
                    s.wakeup.clone(),
                    stop.clone(),
                )
            });
        }
        for _ in 0..self.expiry_workers {
            let (s, stop, opts) = (s.clone(), shutdown.clone(), self.expiry);
            supervisor.spawn("expiry", move || {
                ExpiryWorker::new(
                    s.engine.clone(),
                    s.live.clone(),
                    s.metrics.clone(),
                    s.wakeup.clone(),
                    opts,
                )
                .run(stop.clone())
            });
        }
        if let Some((reconciler, sweep)) = self.reconciler {
            let (s1, stop) = (s.clone(), shutdown.clone());
            supervisor.spawn("reconciler", move || {
                Reconciler::new(
                    s1.engine.clone(),
                    s1.db.clone(),
                    s1.live.clone(),
                    s1.metrics.clone(),
                    reconciler,
                )
                .run(stop.clone())
            });
            let (s2, stop) = (s.clone(), shutdown.clone());
            supervisor.spawn("sweep", move || {
                Sweeper::new(s2.engine.clone(), s2.db.clone(), s2.metrics.clone(), sweep)
                    .run(stop.clone())
            });
            tracing::info!("reconciler and sweep running");
        }
        if let Some(amqp) = self.relay {
            let (s, stop) = (s.clone(), shutdown.clone());
            let exchange = amqp.amqp_exchange.clone();
            supervisor.spawn("relay", move || {
                Relay::new(s.db.clone(), amqp.clone(), s.metrics.clone()).run(stop.clone())
            });
            tracing::info!(%exchange, "outbox relay running");
        }
        if let Some(amqp) = self.points {
            let (s, stop) = (s.clone(), shutdown.clone());
            let queue = amqp.points_queue.clone();
            supervisor.spawn("points", move || {
                PointsConsumer::new(s.db.clone(), amqp.clone(), s.metrics.clone()).run(stop.clone())
            });
            tracing::info!(%queue, "points consumer running");
        }
        if self.expiry_workers > 0 {
            tracing::info!(workers = self.expiry_workers, "expiry workers running");
        }
        tracker.close();
        drop(ended_tx);

        let mut first_failure = None;
        let mut ended = |(task, result): (&'static str, anyhow::Result<()>)| {
            role(task, false);
            match &result {
                Ok(()) => tracing::warn!(task, "task ended by itself; stopping the others"),
                Err(e) => tracing::error!(task, error = %e, "task failed; stopping the others"),
            }
            first_failure = result.err();
        };
        tokio::select! {
            () = requested.cancelled() => {
                // Not ready from now on, still serving: a load balancer that
                // probes /readyz takes this instance out of its pool before
                // the listener closes.
                self.state.health.shutting_down();
                let delay = self.shutdown_delay;
                tracing::info!(delay_ms = delay.as_millis() as u64, "shutdown requested");
                if !delay.is_zero() {
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        Some(e) = ended_rx.recv() => ended(e),
                    }
                }
            }
            Some(e) = ended_rx.recv() => ended(e),
        }
        self.state.health.shutting_down();
        shutdown.cancel();
        tracker.wait().await;
        tracing::info!("stopped");
        match first_failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Says which Redis settings can lose acknowledged writes; with `require`,
/// refuses to start on the ones that lose more than about a second.
async fn check_durability(engine: &Engine, require: bool) -> anyhow::Result<()> {
    let risks = match engine.durability_risks().await {
        Ok(r) => r,
        Err(e) if !require => {
            tracing::warn!(error = %e, "cannot read Redis's persistence and eviction settings");
            return Ok(());
        }
        Err(e) => {
            return Err(anyhow::anyhow!(e)
                .context("--require-durable-redis: cannot read Redis's settings (CONFIG GET)"))
        }
    };
    for r in &risks {
        tracing::warn!(
            setting = r.setting,
            value = %r.value,
            loses = r.loses,
            "this Redis setting can lose acknowledged writes"
        );
    }
    let refused: Vec<String> = risks
        .iter()
        .filter(|r| r.refused)
        .map(|r| format!("{} {} (loses {})", r.setting, r.value, r.loses))
        .collect();
    anyhow::ensure!(
        !require || refused.is_empty(),
        "--require-durable-redis: Redis is set to lose acknowledged writes: {}",
        refused.join("; ")
    );
    Ok(())
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
