//! The outbox relay: outbox rows to RabbitMQ with publisher confirms.
//! (Being written: see issue 15.)

use std::sync::Arc;

use sqlx::MySqlPool;
use tokio_util::sync::CancellationToken;

use crate::config::AmqpConfig;
use crate::telemetry::Metrics;

/// One relay.
pub struct Relay {
    db: MySqlPool,
    cfg: AmqpConfig,
    metrics: Arc<Metrics>,
}

impl Relay {
    /// A relay from `db`'s outbox to the broker `cfg` names.
    pub fn new(db: MySqlPool, cfg: AmqpConfig, metrics: Arc<Metrics>) -> Self {
        Self { db, cfg, metrics }
    }

    /// Publishes until `stop` is cancelled.
    pub async fn run(self, stop: CancellationToken) {
        let _ = (&self.db, &self.cfg, &self.metrics);
        todo!("issue 15: the relay; {stop:?}")
    }
}
