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
//! changes the cost per order, not the outcome. A sale's task ends after
//! `idle` without reservations, and at once when Redis does not know the
//! sale (so probing ids, or sales long over, leave nothing behind); the
//! next reservation starts a new one.

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
    /// How long a sale's queue and task live without reservations.
    pub idle: Duration,
}

impl Default for Batching {
    fn default() -> Self {
        Self {
            max: 32,
            in_flight: 2,
            idle: Duration::from_secs(30),
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

type Queues = Mutex<HashMap<SaleId, mpsc::UnboundedSender<Job>>>;

/// The per-sale queues of one engine.
pub(crate) struct Combiner {
    call: ReserveCall,
    batching: Batching,
    queues: Arc<Queues>,
}

impl Combiner {
    pub fn stats(&self) -> &ReserveStats {
        &self.call.stats
    }

    /// Sales with a live queue in this process.
    pub fn queues(&self) -> usize {
        self.queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|q| !q.is_closed())
            .count()
    }

    pub fn new(call: ReserveCall, batching: Batching) -> Self {
        Self {
            call,
            batching: Batching {
                max: batching.max.max(1),
                in_flight: batching.in_flight.max(1),
                idle: batching.idle.max(Duration::from_millis(1)),
            },
            queues: Arc::default(),
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
        // A queue whose task is gone (idle, or its runtime shut down) is
        // replaced.
        for _ in 0..2 {
            let queue = {
                let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
                match queues.get(&sale) {
                    Some(q) if !q.is_closed() => q.clone(),
                    _ => {
                        let Some(make_keys) = keys.take() else { break };
                        let (q, jobs) = mpsc::unbounded_channel();
                        tokio::spawn(run_sale(
                            sale,
                            Arc::downgrade(&self.queues),
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
                    let reply = rx.await.unwrap_or_else(|_| {
                        Err(EngineError::Combined("the reserve task stopped".into()))
                    });
                    if matches!(&reply, Ok(r) if r.first().is_some_and(|c| c == "not_found")) {
                        // No such sale: its queue goes at once (the task ends
                        // when the last sender does), so probing ids leaves
                        // nothing behind.
                        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
                        if queues.get(&sale).is_some_and(|q| q.same_channel(&queue)) {
                            queues.remove(&sale);
                        }
                    }
                    return reply;
                }
                Err(mpsc::error::SendError(back)) => job = back,
            }
        }
        Err(EngineError::Combined("no reserve task for the sale".into()))
    }
}

/// A sale's task: drains its queue into script calls until the engine is
/// gone or no reservation came for `batching.idle`.
async fn run_sale(
    sale: SaleId,
    queues: std::sync::Weak<Queues>,
    mut jobs: mpsc::UnboundedReceiver<Job>,
    call: ReserveCall,
    keys: SaleKeys,
    batching: Batching,
) {
    let keys = Arc::new(keys);
    let slots = Arc::new(Semaphore::new(batching.in_flight));
    loop {
        let first = match tokio::time::timeout(batching.idle, jobs.recv()).await {
            Ok(Some(job)) => job,
            Ok(None) => break,
            Err(_) => {
                // Idle: refuse new sends (their callers start a new queue),
                // leave the map, and serve what came in before the close.
                jobs.close();
                if let Some(queues) = queues.upgrade() {
                    let mut queues = queues.lock().unwrap_or_else(|p| p.into_inner());
                    if queues.get(&sale).is_some_and(|q| q.is_closed()) {
                        queues.remove(&sale);
                    }
                }
                let mut rest = Vec::new();
                while let Ok(job) = jobs.try_recv() {
                    if !job.reply.is_closed() {
                        rest.push(job);
                    }
                }
                while !rest.is_empty() {
                    let batch: Vec<Job> = rest.drain(..rest.len().min(batching.max)).collect();
                    call.run(&keys, batch).await;
                }
                break;
            }
        };
        // A caller that gave up (request timeout, client gone) is not
        // reserved for: its buyer got an error and may well retry.
        if first.reply.is_closed() {
            continue;
        }
        // Waiting for a slot lets the next batch gather while calls are out.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let mut batch = Vec::with_capacity(batching.max);
        batch.push(first);
        while batch.len() < batching.max {
            match jobs.try_recv() {
                Ok(job) if job.reply.is_closed() => {}
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
        for key in keys
            .order_script_keys()
            .into_iter()
            .chain([keys.idem.as_str()])
        {
            inv.key(key);
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
                        // Kept whole: the HTTP edge tells a permanent refusal
                        // (500) from an outage (503) by it.
                        EngineError::Redis(r) => EngineError::Redis(r.clone()),
                        _ => EngineError::Combined(shared.clone()),
                    };
                    let _ = job.reply.send(Err(err));
                }
            }
        }
    }
}
