//! The loyalty-points consumer: `order.paid` and `order.refunded` events
//! from its own queue into a points ledger in MySQL, once per event id.
//!
//! Deliveries come with manual acks, up to [`PREFETCH`] at a time. Whatever
//! has arrived (up to [`BATCH`]) is applied in one MySQL transaction
//! (`ledger::apply_entries`) and acked only after the commit: a crash
//! between the two gets a redelivery that finds its entries and changes
//! nothing. A body that is not an event this build reads (bad JSON, an
//! unknown schema version or type, a paid or refunded event without its
//! order, buyer or amount) is rejected without requeue, so the broker moves
//! it to `<queue>.dead` for a person to look at; it is never redelivered in
//! a loop. Other event types are acked and ignored.
//!
//! While MySQL fails, the batch stays unacked and is retried in place with
//! capped, jittered backoff (the broker keeps the rest). When the broker
//! connection fails, the consumer reconnects with capped, jittered backoff;
//! what it held unacked goes back to the queue and comes again.

pub mod ledger;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use sqlx::MySqlPool;
use tokio_util::sync::CancellationToken;

use self::ledger::{Entry, LedgerError, Outcome};
use crate::config::AmqpConfig;
use crate::events::Event;
use crate::telemetry::{Metrics, OutcomeLabels};
use crate::workers::reconciler::with_jitter;

/// Deliveries the broker sends ahead of their acks.
pub const PREFETCH: u16 = 100;
/// Most deliveries applied in one MySQL transaction.
pub const BATCH: usize = 100;
/// How often the queue's depth is read.
const DEPTH_EVERY: Duration = Duration::from_secs(1);
/// The first and the longest pause between retries (broker or MySQL).
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A connection that lasted this long starts its next backoff afresh.
const STABLE_AFTER: Duration = Duration::from_secs(30);
/// How long a goodbye to the broker may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// One consumer.
pub struct PointsConsumer {
    db: MySqlPool,
    cfg: AmqpConfig,
    metrics: Arc<Metrics>,
}

/// The next pause of a capped exponential backoff.
fn next_backoff(current: Duration) -> Duration {
    (current * 2).clamp(FIRST_BACKOFF, MAX_BACKOFF)
}

impl PointsConsumer {
    /// A consumer of the queue `cfg` names, keeping its ledger in `db`.
    pub fn new(db: MySqlPool, cfg: AmqpConfig, metrics: Arc<Metrics>) -> Self {
        Self { db, cfg, metrics }
    }

    /// Consumes until `stop` is cancelled, reconnecting to the broker
    /// whenever the connection fails. Never returns before `stop`.
    pub async fn run(self, stop: CancellationToken) {
        let Some(url) = self.cfg.url().map(str::to_owned) else {
            tracing::error!("the points consumer needs a broker: FLASHSALE_AMQP_URL is unset");
            stop.cancelled().await;
            return;
        };
        let mut backoff = Duration::ZERO;
        loop {
            let started = Instant::now();
            match self.session(&url, &stop).await {
                Ok(()) => return,
                Err(e) => {
                    if stop.is_cancelled() {
                        return;
                    }
                    if started.elapsed() >= STABLE_AFTER {
                        backoff = Duration::ZERO;
                    }
                    backoff = next_backoff(backoff);
                    tracing::warn!(
                        error = %format!("{e:#}"),
                        retry_in = ?backoff,
                        queue = %self.cfg.points_queue,
                        "points consumer lost the broker; reconnecting"
                    );
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(with_jitter(backoff)) => {}
            }
        }
    }

    /// One connection: consumes until `stop` (`Ok`) or a broker error.
    async fn session(&self, url: &str, stop: &CancellationToken) -> anyhow::Result<()> {
        let name = crate::amqp::connection_name("points");
        let conn = tokio::select! {
            () = stop.cancelled() => return Ok(()),
            c = crate::amqp::connect(url, &name) => c.context("connecting to the broker")?,
        };
        let result = self.consume(&conn, stop).await;
        // Closing hands whatever is unacked back to the queue at once.
        let _ = tokio::time::timeout(
            CLOSE_TIMEOUT,
            conn.close(200, "points consumer stopping".into()),
        )
        .await;
        result
    }

    async fn consume(&self, conn: &Connection, stop: &CancellationToken) -> anyhow::Result<()> {
        let ch = conn.create_channel().await.context("opening a channel")?;
        ch.basic_qos(PREFETCH, BasicQosOptions::default())
            .await
            .context("basic.qos")?;
        let waiting = crate::amqp::declare_points_queue(&ch, &self.cfg)
            .await
            .context("declaring the points queue")?;
        self.metrics
            .events
            .points_queue_depth
            .set(i64::from(waiting));
        let queue = self.cfg.points_queue.as_str();
        let mut consumer = ch
            .basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .context("basic.consume")?;
        tracing::info!(queue, waiting, "points consumer connected");
        let mut depth = tokio::time::interval(DEPTH_EVERY);
        depth.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let first = tokio::select! {
                biased;
                () = stop.cancelled() => return Ok(()),
                _ = depth.tick() => {
                    self.measure_depth(&ch).await?;
                    continue;
                }
                d = consumer.next() => d,
            };
            let first = first.context("the broker cancelled the consumer")??;
            let mut batch = vec![first];
            // Whatever else has arrived already joins the transaction.
            while batch.len() < BATCH {
                match consumer.next().now_or_never() {
                    Some(Some(d)) => batch.push(d?),
                    Some(None) | None => break,
                }
            }
            self.handle(batch, stop).await?;
        }
    }

    /// Reads the queue's depth (messages ready, not those in flight).
    async fn measure_depth(&self, ch: &Channel) -> anyhow::Result<()> {
        let q = ch
            .queue_declare(
                self.cfg.points_queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .context("reading the queue's depth")?;
        self.metrics
            .events
            .points_queue_depth
            .set(i64::from(q.message_count()));
        Ok(())
    }

    /// Settles a batch of deliveries: dead-letters the unreadable ones,
    /// acks the ignored ones, applies the rest and acks them after the
    /// commit. Returns early (leaving the rest unacked) when `stop` fires
    /// while MySQL is failing; fails on a broker error.
    async fn handle(&self, batch: Vec<Delivery>, stop: &CancellationToken) -> anyhow::Result<()> {
        let mut todo: Vec<(Delivery, Entry)> = Vec::with_capacity(batch.len());
        for d in batch {
            let entry = Event::parse(&d.data)
                .and_then(|ev| ledger::entry_of(&ev).map_err(|e| e.to_string()));
            match entry {
                Err(reason) => self.dead_letter(&d, &reason).await?,
                Ok(None) => {
                    d.acker
                        .ack(BasicAckOptions::default())
                        .await
                        .context("basic.ack")?;
                    self.count(Outcome::Ignored);
                }
                Ok(Some(entry)) => todo.push((d, entry)),
            }
        }
        if todo.is_empty() {
            return Ok(());
        }
        let entries: Vec<Entry> = todo.iter().map(|(_, e)| e.clone()).collect();
        match self.apply_retrying(&entries, stop).await {
            Ok(None) => Ok(()),
            Ok(Some(outcomes)) => {
                for ((d, e), o) in todo.iter().zip(outcomes) {
                    self.settle(d, e, o).await?;
                }
                Ok(())
            }
            // Some event MySQL refuses as such: find it alone.
            Err(e) => {
                tracing::warn!(error = %e, n = todo.len(), "a batch was refused; applying its events one by one");
                for (d, entry) in &todo {
                    match self.apply_retrying(std::slice::from_ref(entry), stop).await {
                        Ok(None) => return Ok(()),
                        Ok(Some(o)) => self.settle(d, entry, o[0]).await?,
                        Err(e) => self.dead_letter(d, &e.to_string()).await?,
                    }
                }
                Ok(())
            }
        }
    }

    /// Applies `entries`, retrying in place while MySQL fails in a way that
    /// may pass; `Ok(None)` when `stop` fired first, `Err` when MySQL
    /// refuses the values themselves.
    async fn apply_retrying(
        &self,
        entries: &[Entry],
        stop: &CancellationToken,
    ) -> Result<Option<Vec<Outcome>>, LedgerError> {
        let mut backoff = Duration::ZERO;
        loop {
            match ledger::apply_entries(&self.db, entries).await {
                Ok(outcomes) => {
                    if backoff > Duration::ZERO {
                        tracing::info!("points consumer: MySQL is back");
                    }
                    return Ok(Some(outcomes));
                }
                Err(e) => {
                    let e = LedgerError::from(e);
                    if e.is_permanent() {
                        return Err(e);
                    }
                    backoff = next_backoff(backoff);
                    tracing::warn!(
                        error = %e,
                        retry_in = ?backoff,
                        held = entries.len(),
                        "points consumer: MySQL failed; the events stay unacked and are retried"
                    );
                }
            }
            tokio::select! {
                () = stop.cancelled() => return Ok(None),
                () = tokio::time::sleep(with_jitter(backoff)) => {}
            }
        }
    }

    /// Acks a delivery whose entry is committed (or was already there).
    async fn settle(&self, d: &Delivery, entry: &Entry, outcome: Outcome) -> anyhow::Result<()> {
        d.acker
            .ack(BasicAckOptions::default())
            .await
            .context("basic.ack")?;
        if let Outcome::Applied { .. } = outcome {
            let lag = (chrono::Utc::now() - entry.occurred_at)
                .to_std()
                .unwrap_or_default();
            self.metrics.events.points_lag.observe(lag.as_secs_f64());
        }
        self.count(outcome);
        Ok(())
    }

    fn count(&self, outcome: Outcome) {
        self.metrics
            .events
            .points_consumed
            .get_or_create(&OutcomeLabels {
                outcome: outcome.label(),
            })
            .inc();
    }

    /// Rejects a delivery without requeue: the broker moves it to the
    /// dead-letter queue.
    async fn dead_letter(&self, d: &Delivery, reason: &str) -> anyhow::Result<()> {
        d.acker
            .reject(BasicRejectOptions { requeue: false })
            .await
            .context("basic.reject")?;
        self.metrics.events.points_dead_lettered.inc();
        let body = String::from_utf8_lossy(&d.data);
        let excerpt: String = body.chars().take(200).collect();
        tracing::warn!(
            reason,
            routing_key = %d.routing_key,
            redelivered = d.redelivered,
            body = %excerpt,
            dead_letter_queue = %self.cfg.points_dead_queue(),
            "points consumer dead-lettered a message it cannot apply"
        );
        Ok(())
    }
}

/// The operations routes of a `flashsale points` process (it has no API):
/// `/healthz` while it runs, `/readyz` (503 once it is stopping), and
/// `/metrics`, until `stop` is cancelled.
pub async fn serve_ops(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    use axum::http::{header, StatusCode};
    use axum::routing::get;
    let ready = stop.clone();
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let stopping = ready.is_cancelled();
                async move {
                    if stopping {
                        (StatusCode::SERVICE_UNAVAILABLE, r#"{"points": "stopping"}"#)
                    } else {
                        (StatusCode::OK, r#"{"points": "ok"}"#)
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let body = metrics.render();
                async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        body,
                    )
                }
            }),
        );
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
}
