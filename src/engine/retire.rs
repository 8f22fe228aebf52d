//! Retiring a sale in Redis (`lua/retire.lua`): once the reconciler has
//! found an ended sale with no work left, its Redis keys are marked retired
//! and left to expire after the retention, and the sale leaves the sales
//! index. From then on MySQL alone answers for the sale and its orders.

use std::time::Duration;

use redis::AsyncCommands;

use super::keys::order_buckets;
use super::{Engine, EngineError, FlowId};
use crate::domain::SaleId;

/// What `retire` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Retirement {
    /// The sale is retired in Redis (now or before); its keys expire.
    Retired,
    /// Work is left; nothing changed. The reason is the script's word:
    /// `not_ended`, `pending`, `refunds`, `due`, `flow` or `unsettled`.
    Busy(String),
    /// Redis does not hold the sale.
    NotFound,
}

impl Engine {
    /// Marks `sale` retired and sets the retention as the expiry of each of
    /// its keys, unless work is left: it must have ended (Redis's clock),
    /// hold no pending order, no waiting or dead-lettered refund, nothing
    /// due, no flow record, and its settled mark must be `cursor`, MySQL's
    /// reconciler cursor, with no record generated after it.
    pub async fn retire(
        &self,
        sale: SaleId,
        cursor: FlowId,
        retention: Duration,
    ) -> Result<Retirement, EngineError> {
        let k = self.keys.sale(sale);
        // Every orders bucket gets the expiry too: those of the order
        // counter, read first (an ended sale makes no new order; the script
        // names any bucket missing, and the call is sent again with it).
        let mut c = self.conn.clone();
        let counter: Option<u64> = self.timed(async { c.hget(&k.sale, "seq").await }).await?;
        let buckets: Vec<u64> = order_buckets(counter.unwrap_or(0)).collect();
        use super::scripts::retire::Reply;
        let reply: Reply = self
            .invoke_declaring(buckets, 3, |buckets| {
                let mut inv = self.scripts.retire.prepare_invoke();
                for key in [
                    &k.sale,
                    &k.buyers,
                    &k.idem,
                    &k.orders,
                    &k.deadlines,
                    &k.flow,
                    &k.dead_refunds,
                    &k.calls,
                ] {
                    inv.key(key);
                }
                for b in buckets {
                    inv.key(k.orders_bucket_no(*b));
                }
                inv.arg(cursor.to_string()).arg(retention.as_secs().max(1));
                inv
            })
            .await?;
        Ok(match reply {
            Reply::Retired => Retirement::Retired,
            Reply::Busy(why) => Retirement::Busy(why),
            Reply::NotFound => Retirement::NotFound,
        })
    }

    /// Whether Redis holds `sale` as retired (false when it does not hold
    /// the sale at all).
    pub async fn sale_retired(&self, sale: SaleId) -> Result<bool, EngineError> {
        let key = self.keys.sale(sale).sale;
        let mut c = self.conn.clone();
        self.timed(async move { c.hexists(key, "retired").await })
            .await
    }

    /// Takes `sale` off the Redis sales index (after it retired).
    pub async fn unindex_sale(&self, sale: SaleId) -> Result<(), EngineError> {
        let index = self.keys.sales_index();
        let mut c = self.conn.clone();
        self.timed(async move { c.srem::<_, _, ()>(index, sale.get()).await })
            .await
    }
}
