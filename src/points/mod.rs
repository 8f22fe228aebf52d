//! The loyalty-points consumer: `order.paid` and `order.refunded` events
//! from its own queue into a points ledger in MySQL, once per event id.
//! (Being written: see issue 15.)

use std::sync::Arc;

use sqlx::MySqlPool;
use tokio_util::sync::CancellationToken;

use crate::config::AmqpConfig;
use crate::telemetry::Metrics;

/// One consumer.
pub struct PointsConsumer {
    db: MySqlPool,
    cfg: AmqpConfig,
    metrics: Arc<Metrics>,
}

impl PointsConsumer {
    /// A consumer of the queue `cfg` names, keeping its ledger in `db`.
    pub fn new(db: MySqlPool, cfg: AmqpConfig, metrics: Arc<Metrics>) -> Self {
        Self { db, cfg, metrics }
    }

    /// Consumes until `stop` is cancelled.
    pub async fn run(self, stop: CancellationToken) {
        let _ = (&self.db, &self.cfg, &self.metrics);
        todo!("issue 15: the points consumer; {stop:?}")
    }
}
