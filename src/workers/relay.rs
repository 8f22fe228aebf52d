//! The outbox relay: outbox rows to RabbitMQ with publisher confirms.
//!
//! For each sale with unsent rows it locks the sale's claim row (`SKIP
//! LOCKED`, so any number of relays share the sales and one sale's rows
//! leave from one relay at a time), reads up to `relay_batch` unsent rows in
//! id order, publishes them all on a confirm-mode channel, awaits their
//! confirms together, and marks them sent in the claim's transaction. A row
//! is marked only after the broker confirmed it: a crash (or a lost
//! connection, a nack) between publish and mark leaves it unsent, and it is
//! published again. Delivery is at least once, in id order per sale by first
//! occurrence; consumers de-duplicate by event id.
//!
//! It holds one named connection (`amqp::connection_name("relay")`) also
//! while idle, and replaces it when it is found closed. On any broker error
//! during a round the connection is dropped, the failure counted and
//! the relay reconnects after a capped, jittered exponential backoff; while
//! MySQL is down it backs off the same way. Every ten seconds it measures the
//! backlog and purges sent rows past the retention, in bounded chunks.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Confirmation, Connection, PublisherConfirm};
use sqlx::MySqlPool;
use tokio_util::sync::CancellationToken;

use super::reconciler::with_jitter;
use crate::amqp;
use crate::config::AmqpConfig;
use crate::db::outbox::{self, Unsent};
use crate::domain::SaleId;
use crate::events::EventType;
use crate::telemetry::{EventTypeLabels, Metrics};

/// How often the backlog is measured and sent rows are purged.
const UPKEEP_EVERY: Duration = Duration::from_secs(10);
/// Rows one purge statement deletes at most.
const PURGE_CHUNK: u64 = 5000;
/// Purge statements in one upkeep at most (the rest waits for the next).
const PURGE_CHUNKS_PER_UPKEEP: usize = 20;
/// First pause after a failure.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Longest pause between retries while the broker or MySQL fails.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Longest wait for a connection to the broker.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for one batch's publishes and confirms (a blocked broker,
/// a half-open connection): then the connection is dropped and the batch
/// published again.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);
/// Batches one sale sends in one turn of its claim at most, before the
/// relay moves on to the next sale (and comes back at once).
const TURN_BATCHES: usize = 16;

/// Why a pass failed: the broker (the connection is dropped) or MySQL.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// Connecting, declaring, publishing, a nack or a confirm that never came.
    #[error("broker: {0}")]
    Broker(String),
    /// A query failed.
    #[error("mysql: {0}")]
    Db(#[from] sqlx::Error),
}

impl From<lapin::Error> for RelayError {
    fn from(e: lapin::Error) -> Self {
        Self::Broker(e.to_string())
    }
}

/// What one pass over the sales did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PassOutcome {
    /// Rows published and marked sent.
    pub published: usize,
    /// Whether some sale returned a full batch (more is waiting).
    pub more: bool,
}

/// The relay's link to the broker: a connection and its confirm-mode
/// channel, with the exchange declared, and the points consumer's queue
/// (API.md names it) declared and bound, so that no `order.paid` or
/// `order.refunded` published before the consumer first starts is dropped
/// for want of a queue.
struct Link {
    conn: Connection,
    channel: Channel,
}

impl Link {
    async fn open(url: &str, cfg: &AmqpConfig) -> Result<Self, RelayError> {
        let name = amqp::connection_name("relay");
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, amqp::connect(url, &name))
            .await
            .map_err(|_| RelayError::Broker("connecting timed out".into()))??;
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        // Publishing to a missing exchange would close the channel.
        amqp::declare_exchange(&channel, &cfg.amqp_exchange).await?;
        if !cfg.points_queue.is_empty() {
            amqp::declare_points_queue(&channel, cfg).await?;
        }
        Ok(Self { conn, channel })
    }

    /// Whether the connection and the channel are still open.
    fn usable(&self) -> bool {
        self.conn.status().connected() && self.channel.status().connected()
    }

    /// Closes the connection, best effort (it may be gone already).
    async fn close(self) {
        let closing = self.conn.close(200, "relay reconnects".into());
        let _ = tokio::time::timeout(Duration::from_secs(1), closing).await;
    }
}

/// Keeps `confirms_pending` right whatever ends the wait (an error, a
/// timeout, the task dropped).
struct PendingConfirms<'a> {
    metrics: &'a Metrics,
    n: i64,
}

impl<'a> PendingConfirms<'a> {
    fn new(metrics: &'a Metrics) -> Self {
        Self { metrics, n: 0 }
    }

    fn add(&mut self) {
        self.n += 1;
        self.metrics.events.confirms_pending.inc();
    }
}

impl Drop for PendingConfirms<'_> {
    fn drop(&mut self) {
        self.metrics.events.confirms_pending.dec_by(self.n);
    }
}

/// The metric label of a stored event type.
fn type_label(stored: &str) -> &'static str {
    stored
        .parse::<EventType>()
        .map_or("unknown", EventType::as_str)
}

/// One relay.
pub struct Relay {
    db: MySqlPool,
    cfg: AmqpConfig,
    metrics: Arc<Metrics>,
    /// The broker link, while it works.
    link: tokio::sync::Mutex<Option<Link>>,
    /// Sales whose claim row is known to exist.
    known_claims: tokio::sync::Mutex<HashSet<SaleId>>,
    /// When the backlog was last measured and sent rows purged.
    last_upkeep: std::sync::Mutex<Option<Instant>>,
}

impl Relay {
    /// A relay from `db`'s outbox to the broker `cfg` names.
    pub fn new(db: MySqlPool, cfg: AmqpConfig, metrics: Arc<Metrics>) -> Self {
        Self {
            db,
            cfg,
            metrics,
            link: Default::default(),
            known_claims: Default::default(),
            last_upkeep: Default::default(),
        }
    }

    /// Publishes until `stop` is cancelled.
    pub async fn run(self, stop: CancellationToken) {
        let idle = Duration::from_millis(self.cfg.relay_idle_ms.max(1));
        let mut backoff = Duration::ZERO;
        loop {
            if stop.is_cancelled() {
                break;
            }
            self.upkeep_if_due().await;
            let pause = match self.try_pass(&stop).await {
                Ok(out) => {
                    if backoff > Duration::ZERO {
                        tracing::info!("relay recovered");
                        backoff = Duration::ZERO;
                    }
                    if out.more {
                        tokio::task::yield_now().await;
                        continue;
                    }
                    idle
                }
                Err(e) => {
                    self.metrics.events.relay_failures.inc();
                    if matches!(e, RelayError::Broker(_)) {
                        self.drop_link().await;
                    }
                    backoff = (backoff * 2).max(FIRST_BACKOFF).min(MAX_BACKOFF);
                    tracing::warn!(error = %e, retry_in = ?backoff, "relay pass failed");
                    with_jitter(backoff)
                }
            };
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(pause) => {}
            }
        }
        self.drop_link().await;
    }

    async fn drop_link(&self) {
        if let Some(link) = self.link.lock().await.take() {
            link.close().await;
        }
    }

    /// One batch of every sale with unsent rows (the ones another relay
    /// holds are skipped), connecting first if need be (also while idle, so
    /// a relay shows in the broker's connections and a broker outage counts
    /// as failures before events wait on it). Stops between sales when
    /// `stop` fires.
    pub async fn try_pass(&self, stop: &CancellationToken) -> Result<PassOutcome, RelayError> {
        let mut out = PassOutcome::default();
        let mut link = self.link.lock().await;
        if link.as_ref().is_some_and(|l| !l.usable()) {
            // Lost while idle (a heartbeat timeout, a closed channel): not a
            // failed round; connect again before publishing.
            if let Some(old) = link.take() {
                tracing::info!("the broker connection was lost while idle; reconnecting");
                old.close().await;
            }
        }
        if link.is_none() {
            let url = self
                .cfg
                .url()
                .ok_or_else(|| RelayError::Broker("FLASHSALE_AMQP_URL is not set".into()))?;
            *link = Some(Link::open(url, &self.cfg).await?);
            tracing::info!(exchange = %self.cfg.amqp_exchange, "relay connected to the broker");
        }
        let sales = outbox::unsent_sales(&self.db).await?;
        if sales.is_empty() {
            // Nothing waits: the backlog is known without a query.
            self.metrics.events.outbox_backlog.set(0);
            self.metrics.events.outbox_oldest_age_seconds.set(0.0);
            return Ok(out);
        }
        let channel = &link.as_ref().expect("connected above").channel;
        for sale in sales {
            if stop.is_cancelled() {
                break;
            }
            let (n, left) = self.relay_sale(channel, sale).await?;
            out.published += n;
            out.more |= left;
        }
        if !out.more {
            // Caught up: what waits now is what came during the pass (a
            // cheap count), and the gauges say so before the relay idles.
            self.measure_backlog().await?;
        }
        Ok(out)
    }

    /// One turn of one sale under its claim: batches in id order, each
    /// published while the one before it awaits its confirms (two on the
    /// wire at most), each marked sent once confirmed, until a short batch
    /// or [`TURN_BATCHES`]. Returns how many rows were published and marked
    /// sent, and whether the turn ended with rows left (0 and false when
    /// another relay holds the sale or nothing waits).
    async fn relay_sale(
        &self,
        channel: &Channel,
        sale: SaleId,
    ) -> Result<(usize, bool), RelayError> {
        if !self.known_claims.lock().await.contains(&sale) {
            outbox::ensure_claim(&self.db, sale).await?;
            self.known_claims.lock().await.insert(sale);
        }
        let mut tx = self.db.begin().await?;
        if !outbox::lock_claim(&mut tx, sale).await? {
            tx.rollback().await?;
            // Another relay has this sale right now, or its claim row is
            // gone (SKIP LOCKED cannot tell): look again next time.
            self.known_claims.lock().await.remove(&sale);
            return Ok((0, false));
        }
        let batch = self.cfg.relay_batch.max(1);
        let mut pending = PendingConfirms::new(&self.metrics);
        let mut on_the_wire: std::collections::VecDeque<(Vec<Unsent>, Vec<PublisherConfirm>)> =
            Default::default();
        let (mut after, mut published, mut more) = (0u64, 0usize, false);
        // Dropping `tx` on an error releases the claim; what was not marked
        // stays unsent and is published again.
        for turn in 0..TURN_BATCHES {
            let rows = outbox::unsent_batch(&mut tx, sale, after, batch).await?;
            let Some(last) = rows.last() else {
                break;
            };
            after = last.id;
            let full = rows.len() >= batch;
            let confirms =
                tokio::time::timeout(CONFIRM_TIMEOUT, self.publish(channel, &rows, &mut pending))
                    .await
                    .map_err(|_| {
                        RelayError::Broker(format!("publishing took over {CONFIRM_TIMEOUT:?}"))
                    })??;
            on_the_wire.push_back((rows, confirms));
            if on_the_wire.len() >= 2 {
                let (rows, confirms) = on_the_wire.pop_front().expect("two on the wire");
                published += self.settle(rows, confirms).await?;
            }
            if !full {
                break;
            }
            more = turn + 1 == TURN_BATCHES;
        }
        while let Some((rows, confirms)) = on_the_wire.pop_front() {
            published += self.settle(rows, confirms).await?;
        }
        outbox::count_published(&mut tx, sale, published as u64).await?;
        tx.commit().await?;
        Ok((published, more))
    }

    /// Publishes `rows` in order; returns their confirm futures (the
    /// frames are with the connection's I/O loop, the broker's answers to
    /// come).
    async fn publish(
        &self,
        channel: &Channel,
        rows: &[Unsent],
        pending: &mut PendingConfirms<'_>,
    ) -> Result<Vec<PublisherConfirm>, RelayError> {
        let mut confirms = Vec::with_capacity(rows.len());
        let exchange = ShortString::from(self.cfg.amqp_exchange.as_str());
        for r in rows {
            let props = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into())
                .with_message_id(r.event_id.as_str().into())
                .with_type(r.event_type.as_str().into())
                .with_timestamp(r.occurred_at.timestamp().max(0) as u64)
                .with_app_id("flashsale".into());
            let confirm = channel
                .basic_publish(
                    exchange.clone(),
                    r.event_type.as_str().into(),
                    BasicPublishOptions::default(),
                    r.body.as_bytes(),
                    props,
                )
                .await?;
            pending.add();
            confirms.push(confirm);
        }
        Ok(confirms)
    }

    /// Awaits the confirms of one published batch (all together: one round
    /// trip a batch, within [`CONFIRM_TIMEOUT`]) and marks its rows sent.
    /// Any nack or error fails the batch: it is published again, duplicates
    /// and all. Returns the rows marked.
    async fn settle(
        &self,
        rows: Vec<Unsent>,
        confirms: Vec<PublisherConfirm>,
    ) -> Result<usize, RelayError> {
        let answers = tokio::time::timeout(CONFIRM_TIMEOUT, futures::future::join_all(confirms))
            .await
            .map_err(|_| RelayError::Broker(format!("no confirms within {CONFIRM_TIMEOUT:?}")))?;
        for (row, answer) in rows.iter().zip(answers) {
            match answer? {
                Confirmation::Ack(_) => {}
                Confirmation::Nack(_) => {
                    return Err(RelayError::Broker(format!(
                        "the broker nacked outbox row {} (event {})",
                        row.id, row.event_id
                    )))
                }
                Confirmation::NotRequested => {
                    return Err(RelayError::Broker(
                        "the channel is not in confirm mode".into(),
                    ))
                }
            }
        }
        let ids: Vec<u64> = rows.iter().map(|r| r.id).collect();
        outbox::mark_sent(&self.db, &ids).await?;
        for r in &rows {
            self.metrics
                .events
                .published
                .get_or_create(&EventTypeLabels {
                    event_type: type_label(&r.event_type),
                })
                .inc();
        }
        Ok(rows.len())
    }

    fn upkeep_due(&self) -> bool {
        let mut last = self.last_upkeep.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| t.elapsed() < UPKEEP_EVERY) {
            return false;
        }
        *last = Some(Instant::now());
        true
    }

    /// The backlog metrics and the purge, at most every [`UPKEEP_EVERY`];
    /// a failure is logged and waits for the next turn (it does not hold up
    /// publishing).
    async fn upkeep_if_due(&self) {
        if !self.upkeep_due() {
            return;
        }
        if let Err(e) = self.upkeep().await {
            tracing::warn!(error = %e, "outbox upkeep failed; will retry");
        }
    }

    /// Sets the backlog gauges from MySQL.
    async fn measure_backlog(&self) -> sqlx::Result<()> {
        let (count, age) = outbox::backlog(&self.db).await?;
        self.metrics
            .events
            .outbox_backlog
            .set(i64::try_from(count).unwrap_or(i64::MAX));
        self.metrics.events.outbox_oldest_age_seconds.set(age);
        Ok(())
    }

    /// Measures the backlog and purges sent rows past the retention, in
    /// chunks of [`PURGE_CHUNK`]; returns the rows purged.
    pub async fn upkeep(&self) -> sqlx::Result<u64> {
        self.measure_backlog().await?;
        let mut purged = 0;
        for _ in 0..PURGE_CHUNKS_PER_UPKEEP {
            let n =
                outbox::purge_sent(&self.db, self.cfg.outbox_retention_secs, PURGE_CHUNK).await?;
            purged += n;
            self.metrics.events.outbox_purged.inc_by(n);
            if n < PURGE_CHUNK {
                break;
            }
        }
        if purged > 0 {
            tracing::info!(purged, "sent outbox rows purged");
        }
        Ok(purged)
    }
}
