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
//!
//! A sale's queue is bounded (`queue_limit`): past it a reservation fails
//! at once. Every call carries an id (`lua/reserve.lua` keeps what it did),
//! and a reservation that fails once its call may have reached Redis
//! carries the retry key that finds what it made: a buyer is never left
//! holding a unit they cannot find. A reservation that waited in the queue
//! longer than `max_wait` is withdrawn before any call carries it.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use redis::Script;
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::keys::DUE_BUCKET;
use super::scripts::reserve::{Outcome, Refusal};
use super::{EngineError, SaleKeys};
use crate::domain::{IdempotencyKey, Qty, SaleId, UserId};

/// One reservation's reply from the script (see `lua/reserve.lua`).
pub(crate) type Reply = Result<Answer, ReserveFailed>;

/// The script's reply for one reservation, and the job it answers.
pub(crate) struct Answer {
    /// The reply, as `lua/reserve.lua` describes it.
    pub reply: Outcome,
    job: Arc<JobShared>,
    ids: Arc<CallIds>,
}

impl Answer {
    /// The key that finds this reservation again (for a reply this process
    /// cannot read): the buyer's own key, or the call's retry key.
    pub fn retry_key(&self, idem: Option<&IdempotencyKey>) -> String {
        self.job.retry_key(&self.ids, idem)
    }
}

/// A reservation whose outcome this process does not know: its call may
/// or may not have run in Redis. `retry_key`, sent as the
/// `Idempotency-Key` of a retry, finds the order if the call made one and
/// otherwise reserves at most once.
#[derive(Debug, thiserror::Error)]
#[error("{source}")]
pub struct ReserveFailed {
    /// Why the call failed.
    #[source]
    pub source: EngineError,
    /// The key that finds this reservation's order, if any.
    pub retry_key: String,
}

/// How reservations are combined.
#[derive(Debug, Clone, Copy)]
pub struct Batching {
    /// Most reservations in one script call (1: no combining).
    pub max: usize,
    /// Script calls per sale on the wire at once.
    pub in_flight: usize,
    /// How long a sale's queue and task live without reservations.
    pub idle: Duration,
    /// Reservations one sale's queue holds at most; past it, a reservation
    /// fails at once.
    pub queue_limit: usize,
    /// Longest wait in the queue before a reservation is withdrawn (its
    /// call, once sent, is bounded by the Redis timeout).
    pub max_wait: Duration,
}

impl Default for Batching {
    fn default() -> Self {
        Self {
            max: 32,
            in_flight: 2,
            idle: Duration::from_secs(30),
            queue_limit: 4096,
            max_wait: Duration::from_secs(1),
        }
    }
}

/// A job waits in its queue, was withdrawn by its caller, or went out in a
/// call.
const WAITING: u8 = 0;
const WITHDRAWN: u8 = 1;
const SENT: u8 = 2;

struct Job {
    user: UserId,
    qty: Qty,
    idem: Option<IdempotencyKey>,
    shared: Arc<JobShared>,
    reply: oneshot::Sender<Reply>,
}

/// What a job's caller and the sale's task both see.
#[derive(Default)]
struct JobShared {
    /// WAITING, WITHDRAWN or SENT.
    state: AtomicU8,
    /// The call that carried it, and its place there (1-based).
    sent_as: std::sync::OnceLock<(Arc<str>, usize)>,
}

impl JobShared {
    /// The key that finds this reservation again.
    fn retry_key(&self, ids: &CallIds, idem: Option<&IdempotencyKey>) -> String {
        match (idem, self.sent_as.get()) {
            (Some(k), _) => k.as_str().to_owned(),
            (None, Some((call, index))) => retry_key(call, *index),
            (None, None) => ids.unused_key(),
        }
    }
}

impl Job {
    /// Claims the job for a call, unless its caller withdrew or left.
    fn claim(&self) -> bool {
        !self.reply.is_closed()
            && self
                .shared
                .state
                .compare_exchange(WAITING, SENT, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }
}

/// Call ids: a random token of this process and a counter, in hex (the
/// shape `lua/reserve.lua` expects in a retry key).
#[derive(Debug)]
struct CallIds {
    process: u32,
    next: AtomicU64,
}

impl CallIds {
    fn new() -> Self {
        let random = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        Self {
            process: (random >> 32) as u32 ^ random as u32,
            next: AtomicU64::new(1),
        }
    }

    fn next(&self) -> String {
        format!(
            "{:08x}{:x}",
            self.process,
            self.next.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// A key no call made: for a reservation withdrawn before any call
    /// carried it (a retry with it is a new reservation, made at most once).
    fn unused_key(&self) -> String {
        format!("rq-{}", self.next())
    }
}

/// The retry key of reservation `index` (1-based) of call `call`.
fn retry_key(call: &str, index: usize) -> String {
    format!("rk-{call}-{index}")
}

/// What a sale's task needs to call the script.
#[derive(Clone)]
pub(crate) struct ReserveCall {
    pub conn: super::RedisConn,
    pub script: Arc<Script>,
    pub timeout: Duration,
    pub backlog_limit: u64,
    pub stats: ReserveStats,
    ids: Arc<CallIds>,
    /// Per sale, the highest order seq a reply of this process carried:
    /// every call passes it, and a Redis whose counter is below it (it lost
    /// orders) fences the sale instead of giving an order id out twice.
    seen: Arc<Mutex<HashMap<SaleId, u64>>>,
    /// The live sales and their tokens (`Engine::set_live`).
    live: super::LiveMap,
    /// Per sale, the due-queue bucket new orders last fell in.
    buckets: Arc<Mutex<HashMap<SaleId, u64>>>,
}

impl ReserveCall {
    pub fn new(
        conn: super::RedisConn,
        script: Arc<Script>,
        timeout: Duration,
        backlog_limit: u64,
        live: super::LiveMap,
    ) -> Self {
        Self {
            conn,
            script,
            timeout,
            backlog_limit,
            stats: ReserveStats::default(),
            ids: Arc::new(CallIds::new()),
            seen: Default::default(),
            live,
            buckets: Default::default(),
        }
    }
}

/// Reserve script calls and the reservations they carried, since start.
#[derive(Clone, Debug, Default)]
pub struct ReserveStats {
    /// Script calls sent.
    pub calls: Counter,
    /// Reservations carried by those calls.
    pub reservations: Counter,
}

type Queues = Mutex<HashMap<SaleId, mpsc::Sender<Job>>>;

/// The per-sale queues of one engine.
pub(crate) struct Combiner {
    call: ReserveCall,
    batching: Batching,
    queues: Arc<Queues>,
}

impl Combiner {
    /// A retry key that no call used (for an answer made before any call).
    pub fn unused_key(&self) -> String {
        self.call.ids.unused_key()
    }

    /// An id no other call of this process carries (for the calls hash).
    pub fn call_id(&self) -> String {
        self.call.ids.next()
    }

    pub fn stats(&self) -> &ReserveStats {
        &self.call.stats
    }

    /// The highest order seq of `sale` a reply of this process carried.
    pub fn seen(&self, sale: SaleId) -> u64 {
        self.call.seen().get(&sale).copied().unwrap_or(0)
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
                queue_limit: batching.queue_limit.max(1),
                max_wait: batching.max_wait.max(Duration::from_millis(1)),
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
        let (tx, mut rx) = oneshot::channel();
        let shared = Arc::new(JobShared::default());
        let mut job = Job {
            user,
            qty,
            idem: idem.cloned(),
            shared: shared.clone(),
            reply: tx,
        };
        let failed = |source| {
            Err(ReserveFailed {
                source,
                retry_key: shared.retry_key(&self.call.ids, idem),
            })
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
                        let (q, jobs) = mpsc::channel(self.batching.queue_limit);
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
            match queue.try_send(job) {
                Ok(()) => {
                    let reply = tokio::select! {
                        reply = &mut rx => reply,
                        () = tokio::time::sleep(self.batching.max_wait) => {
                            if shared
                                .state
                                .compare_exchange(WAITING, WITHDRAWN, Ordering::AcqRel, Ordering::Acquire)
                                .is_ok()
                            {
                                return failed(EngineError::Overloaded(
                                    "the reservation waited too long in its sale's queue",
                                ));
                            }
                            // Its call is out: the Redis timeout bounds the wait.
                            rx.await
                        }
                    };
                    let reply = match reply {
                        Ok(reply) => reply,
                        Err(_) => failed(EngineError::Combined("the reserve task stopped".into())),
                    };
                    if matches!(&reply, Ok(a) if a.reply == Outcome::Refused(Refusal::NotFound)) {
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
                Err(mpsc::error::TrySendError::Full(_)) => {
                    return failed(EngineError::Overloaded("the sale's reserve queue is full"));
                }
                Err(mpsc::error::TrySendError::Closed(back)) => job = back,
            }
        }
        failed(EngineError::Combined("no reserve task for the sale".into()))
    }
}

/// A sale's task: drains its queue into script calls until the engine is
/// gone or no reservation came for `batching.idle`.
async fn run_sale(
    sale: SaleId,
    queues: std::sync::Weak<Queues>,
    mut jobs: mpsc::Receiver<Job>,
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
                    if job.claim() {
                        rest.push(job);
                    }
                }
                while !rest.is_empty() {
                    let batch: Vec<Job> = rest.drain(..rest.len().min(batching.max)).collect();
                    call.run(sale, &keys, batch).await;
                }
                break;
            }
        };
        // Waiting for a slot lets the next batch gather while calls are out.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        // A caller that gave up (withdrew, request timeout, client gone) is
        // not reserved for: its buyer got an error and may well retry.
        if !first.claim() {
            continue;
        }
        let mut batch = Vec::with_capacity(batching.max);
        batch.push(first);
        while batch.len() < batching.max {
            match jobs.try_recv() {
                Ok(job) if job.claim() => batch.push(job),
                Ok(_) => {}
                Err(_) => break,
            }
        }
        let (call, keys) = (call.clone(), keys.clone());
        tokio::spawn(async move {
            call.run(sale, &keys, batch).await;
            drop(slot);
        });
    }
}

impl ReserveCall {
    fn seen(&self) -> std::sync::MutexGuard<'_, HashMap<SaleId, u64>> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The due-queue bucket this process last saw new orders of `sale` in.
    fn bucket_hint(&self, sale: SaleId) -> u64 {
        self.buckets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&sale)
            .copied()
            .unwrap_or(0)
    }

    fn note_bucket(&self, sale: SaleId, bucket: u64) {
        let mut all = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let b = all.entry(sale).or_insert(0);
        *b = (*b).max(bucket);
    }

    async fn run(&self, sale: SaleId, keys: &SaleKeys, batch: Vec<Job>) {
        let call: Arc<str> = self.ids.next().into();
        // Only a sale MySQL lists as live is checked against what this
        // process has seen and against its token.
        let token = self
            .live
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&sale)
            .copied();
        let live = token.is_some();
        let seen = match token {
            Some(_) => self.seen().get(&sale).copied().unwrap_or(0),
            None => 0,
        };
        let token = match token {
            Some(t) if t != 0 => format!("{t:016x}"),
            _ => String::new(),
        };
        for (i, job) in batch.iter().enumerate() {
            let _ = job.shared.sent_as.set((call.clone(), i + 1));
        }
        // The buckets (due-queue and orders) the new orders will likely
        // fall in: where the counter stood at this process's last call, and
        // the next one. A call that needs others (for its new orders, or
        // for earlier orders a key finds) writes nothing and names them; it
        // is sent again (same id) declaring them.
        let from = self.bucket_hint(sale).max((seen + 1) / DUE_BUCKET);
        let mut buckets = vec![from, from + 1];
        self.stats.calls.inc();
        self.stats.reservations.inc_by(batch.len() as u64);
        let mut result;
        let mut attempts = 0;
        loop {
            let mut inv = self.script.prepare_invoke();
            for key in keys.reserve_keys() {
                inv.key(key);
            }
            for b in &buckets {
                for key in keys.bucket_keys(*b) {
                    inv.key(key);
                }
            }
            inv.arg(self.backlog_limit)
                .arg(&*call)
                .arg(seen)
                .arg(&token);
            for job in &batch {
                inv.arg(job.user.get())
                    .arg(job.qty.get())
                    .arg(job.idem.as_ref().map_or("", |k| k.as_str()));
            }
            // With acknowledged writes, one WAIT covers the whole call.
            result = match self
                .conn
                .write::<Vec<Outcome>>(&keys.sale, &inv, self.timeout)
                .await
            {
                Ok(replies) if replies.len() == batch.len() => Ok(replies),
                Ok(replies) => Err(EngineError::Protocol(format!(
                    "reserve: {} replies for {} reservations",
                    replies.len(),
                    batch.len()
                ))),
                Err(e) => Err(e),
            };
            attempts += 1;
            match result.as_ref().err().and_then(EngineError::needed_buckets) {
                Some(need) if attempts < 5 && !need.is_empty() => {
                    self.note_bucket(sale, need.iter().copied().min().unwrap_or(from));
                    // The sale's other calls in flight move the counter on
                    // meanwhile (slower with WAIT): declare the bucket after
                    // the last one named too.
                    let next = need.iter().copied().max().unwrap_or(from) + 1;
                    buckets.extend(need);
                    buckets.push(next);
                    buckets.sort_unstable();
                    buckets.dedup();
                }
                _ => break,
            }
        }
        match result {
            Ok(replies) => {
                let highest = replies.iter().filter_map(Outcome::seq).max();
                if let Some(h) = highest {
                    self.note_bucket(sale, h / DUE_BUCKET);
                }
                if let Some(h) = highest.filter(|&h| live && h > seen) {
                    let mut all = self.seen();
                    let e = all.entry(sale).or_insert(0);
                    *e = (*e).max(h);
                }
                for (job, reply) in batch.into_iter().zip(replies) {
                    let _ = job.reply.send(Ok(Answer {
                        reply,
                        job: job.shared,
                        ids: self.ids.clone(),
                    }));
                }
            }
            Err(e) => {
                for job in batch {
                    let retry_key = job.shared.retry_key(&self.ids, job.idem.as_ref());
                    let _ = job.reply.send(Err(ReserveFailed {
                        source: e.shared(),
                        retry_key,
                    }));
                }
            }
        }
    }
}
