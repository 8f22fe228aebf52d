//! Combines the reservations that arrive together for one sale into one
//! call of `lua/reserve.lua`.
//!
//! Each sale with traffic gets a queue and a task. The task takes the
//! first waiting reservation, then whatever else is already waiting (up to
//! `batch_max`), and sends them as one script call; up to `in_flight` calls
//! per sale are on the wire at once, pipelined on the multiplexed
//! connection. Nothing waits for a batch to fill: a lone buyer's call goes
//! out at once, and under a flood the calls grow by themselves, because
//! reservations pile up while earlier calls are in flight. The script judges
//! each reservation in turn exactly as if it had come alone, so batching
//! changes the cost per order, not the outcome.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use redis::aio::ConnectionManager;
use redis::Script;
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::{EngineError, SaleKeys};
use crate::domain::{IdempotencyKey, Qty, SaleId, UserId};

/// One reservation's reply from the script (see `lua/reserve.lua`).
pub(crate) type Reply = Result<Vec<String>, EngineError>;

/// How reservations are combined.
#[derive(Debug, Clone, Copy)]
pub struct Batching {
    /// Most reservations in one script call (1: no combining).
    pub max: usize,
    /// Script calls per sale on the wire at once.
    pub in_flight: usize,
}

impl Default for Batching {
    fn default() -> Self {
        Self {
            max: 32,
            in_flight: 2,
        }
    }
}

struct Job {
    user: UserId,
    qty: Qty,
    idem: Option<IdempotencyKey>,
    reply: oneshot::Sender<Reply>,
}

/// What a sale's task needs to call the script.
#[derive(Clone)]
pub(crate) struct ReserveCall {
    pub conn: ConnectionManager,
    pub script: Arc<Script>,
    pub timeout: Duration,
    pub backlog_limit: u64,
    pub stats: ReserveStats,
}

/// Reserve script calls and the reservations they carried, since start.
#[derive(Clone, Debug, Default)]
pub struct ReserveStats {
    /// Script calls sent.
    pub calls: Counter,
    /// Reservations carried by those calls.
    pub reservations: Counter,
}

/// The per-sale queues of one engine.
pub(crate) struct Combiner {
    call: ReserveCall,
    batching: Batching,
    queues: Mutex<HashMap<SaleId, mpsc::UnboundedSender<Job>>>,
}

impl Combiner {
    pub fn stats(&self) -> &ReserveStats {
        &self.call.stats
    }

    pub fn new(call: ReserveCall, batching: Batching) -> Self {
        Self {
            call,
            batching: Batching {
                max: batching.max.max(1),
                in_flight: batching.in_flight.max(1),
            },
            queues: Mutex::default(),
        }
    }

    /// Reserves through the sale's queue; the reply is the script's for
    /// this reservation alone.
    pub async fn reserve(
        &self,
        sale: SaleId,
        keys: impl FnOnce() -> SaleKeys,
        user: UserId,
        qty: Qty,
        idem: Option<&IdempotencyKey>,
    ) -> Reply {
        let (tx, rx) = oneshot::channel();
        let mut job = Job {
            user,
            qty,
            idem: idem.cloned(),
            reply: tx,
        };
        let mut keys = Some(keys);
        // A queue whose task is gone (its runtime shut down) is replaced once.
        for _ in 0..2 {
            let queue = {
                let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
                match queues.get(&sale) {
                    Some(q) if !q.is_closed() => q.clone(),
                    _ => {
                        let Some(make_keys) = keys.take() else { break };
                        let (q, jobs) = mpsc::unbounded_channel();
                        tokio::spawn(run_sale(
                            jobs,
                            self.call.clone(),
                            make_keys(),
                            self.batching,
                        ));
                        queues.insert(sale, q.clone());
                        q
                    }
                }
            };
            match queue.send(job) {
                Ok(()) => {
                    return rx.await.unwrap_or_else(|_| {
                        Err(EngineError::Combined("the reserve task stopped".into()))
                    })
                }
                Err(mpsc::error::SendError(back)) => job = back,
            }
        }
        Err(EngineError::Combined("no reserve task for the sale".into()))
    }
}

/// A sale's task: drains its queue into script calls until every sender
/// (the engine) is gone.
async fn run_sale(
    mut jobs: mpsc::UnboundedReceiver<Job>,
    call: ReserveCall,
    keys: SaleKeys,
    batching: Batching,
) {
    let keys = Arc::new(keys);
    let slots = Arc::new(Semaphore::new(batching.in_flight));
    while let Some(first) = jobs.recv().await {
        // Waiting for a slot lets the next batch gather while calls are out.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let mut batch = Vec::with_capacity(batching.max);
        batch.push(first);
        while batch.len() < batching.max {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let (call, keys) = (call.clone(), keys.clone());
        tokio::spawn(async move {
            call.run(&keys, batch).await;
            drop(slot);
        });
    }
}

impl ReserveCall {
    async fn run(&self, keys: &SaleKeys, batch: Vec<Job>) {
        let mut inv = self.script.prepare_invoke();
        for key in [
            &keys.sale,
            &keys.buyers,
            &keys.orders,
            &keys.deadlines,
            &keys.flow,
            &keys.idem,
        ] {
            inv.key(key.as_str());
        }
        inv.arg(self.backlog_limit);
        for job in &batch {
            inv.arg(job.user.get())
                .arg(job.qty.get())
                .arg(job.idem.as_ref().map_or("", |k| k.as_str()));
        }
        self.stats.calls.inc();
        self.stats.reservations.inc_by(batch.len() as u64);
        let mut conn = self.conn.clone();
        let result: Result<Vec<Vec<String>>, EngineError> =
            match tokio::time::timeout(self.timeout, inv.invoke_async(&mut conn)).await {
                Ok(Ok(replies)) => Ok(replies),
                Ok(Err(e)) => Err(EngineError::Redis(e)),
                Err(_) => Err(EngineError::Timeout(self.timeout)),
            };
        match result {
            Ok(replies) if replies.len() == batch.len() => {
                for (job, reply) in batch.into_iter().zip(replies) {
                    let _ = job.reply.send(Ok(reply));
                }
            }
            Ok(replies) => {
                let msg = format!(
                    "reserve: {} replies for {} reservations",
                    replies.len(),
                    batch.len()
                );
                for job in batch {
                    let _ = job.reply.send(Err(EngineError::Protocol(msg.clone())));
                }
            }
            Err(e) => {
                let shared = e.to_string();
                for job in batch {
                    let err = match &e {
                        EngineError::Timeout(d) => EngineError::Timeout(*d),
                        _ => EngineError::Combined(shared.clone()),
                    };
                    let _ = job.reply.send(Err(err));
                }
            }
        }
    }
}
