//! An order's life in Redis: reserve, pay, cancel and expire, each one
//! script call. Every change writes its flow record in the same call.

use super::keys::DUE_BUCKET;
use super::{Engine, EngineError, Order, ReserveFailed};
use crate::domain::{IdempotencyKey, OrderId, Qty, SaleId, UserId};

/// Why a reservation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No such sale in Redis.
    NotFound,
    /// Before the sale's start.
    NotStarted,
    /// At or after the sale's end.
    Ended,
    /// An admin paused the sale.
    Paused,
    /// Not enough units left.
    SoldOut,
    /// The buyer would hold more than the per-user limit.
    LimitExceeded,
    /// The sale's flow backlog is at its bound (MySQL is far behind).
    BacklogFull,
}

/// What a reservation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reservation {
    /// A new pending order.
    Created(Order),
    /// The order that the same idempotency key made before; nothing reserved.
    Existing(Order),
    /// Nothing reserved.
    Refused(Refusal),
}

/// What a payment did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payment {
    /// The order is now paid.
    Paid(Order),
    /// The order was paid before with this payment id; nothing changed.
    AlreadyPaid(Order),
    /// The deadline had passed; the order is closed, by this call
    /// (`closed_now`) or before.
    Expired {
        /// The closed order.
        order: Order,
        /// Whether this call closed it.
        closed_now: bool,
    },
    /// The order is cancelled, or paid with another payment id.
    NotPending(Order),
    /// The amount differs from the order's; nothing changed.
    AmountMismatch(Order),
    /// No such order.
    NotFound,
}

/// What a cancellation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cancellation {
    /// The order is now cancelled and its units are back on sale.
    Cancelled(Order),
    /// The order was not pending, or was overdue and this call closed it
    /// (`closed_now`).
    NotPending {
        /// The order as it stands.
        order: Order,
        /// Whether this call closed it.
        closed_now: bool,
    },
    /// No such order, or not the caller's.
    NotFound,
}

/// What a refund request did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refund {
    /// The order is refunded, by this call (`now`) or before.
    Refunded {
        /// The refunded order.
        order: Order,
        /// Whether this call refunded it.
        now: bool,
    },
    /// The order is refund_pending: it waits to settle, then is refunded
    /// without further calls (accepted by this call, or before).
    Accepted(Order),
    /// The order is not paid.
    NotPaid(Order),
    /// No such order, or not the caller's.
    NotFound,
    /// The sale is retired: Redis no longer takes its refunds (MySQL does).
    Retired,
}

/// One call's work on one sale's due-queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpiryBatch {
    /// Due entries claimed (payment deadlines and refund retries).
    pub claimed: usize,
    /// Orders closed at their deadline (the rest were already paid or cancelled).
    pub closed: usize,
    /// Entries still due after this call.
    pub still_due: usize,
    /// The earliest due time left, ms by Redis's clock.
    pub next_deadline_ms: Option<i64>,
    /// Redis's clock during the call.
    pub now_ms: i64,
    /// Refunds carried out (their orders had settled).
    pub refunded: usize,
    /// Refunds moved to the dead-letter (too old to keep retrying).
    pub dead_lettered: usize,
    /// Refunds of this sale still waiting for their orders to settle.
    pub refunds_waiting: i64,
    /// Close time minus deadline of each closed order, in ms.
    pub lateness_ms: Vec<i64>,
    /// Request-to-refund time of each refund carried out, in ms.
    pub refund_wait_ms: Vec<i64>,
}

/// A packed order of a reply.
fn unpacked(id: OrderId, packed: &str) -> Result<Order, EngineError> {
    Order::unpack(id, packed)
        .ok_or_else(|| EngineError::Protocol(format!("order {id}: {packed:?}")))
}

/// A reply type with a "no such order" answer: what an order script
/// answers for a sale Redis does not hold at all (and MySQL does not list).
trait NotFound {
    fn not_found() -> Self;
}

impl NotFound for super::scripts::pay::Reply {
    fn not_found() -> Self {
        Self::NotFound
    }
}

impl NotFound for super::scripts::cancel::Reply {
    fn not_found() -> Self {
        Self::NotFound
    }
}

impl NotFound for super::scripts::refund::Reply {
    fn not_found() -> Self {
        Self::NotFound
    }
}

impl Engine {
    async fn run_order_script<R: redis::FromRedisValue + NotFound + Send>(
        &self,
        script: &redis::Script,
        id: OrderId,
        extra_keys: &[&str],
        args: &[&str],
    ) -> Result<R, EngineError> {
        if id.seq() > super::keys::MAX_SEQ {
            return Ok(R::not_found());
        }
        let sale = id.sale();
        let k = self.keys.sale(sale);
        let mut inv = script.prepare_invoke();
        for key in k.order_script_keys().iter().chain(extra_keys) {
            inv.key(*key);
        }
        for arg in args {
            inv.arg(*arg);
        }
        match self.write(&k.sale, &inv).await {
            Err(e) if e.is_no_sale() => self.missing(sale).map(|()| R::not_found()),
            other => other,
        }
    }

    /// Reserves `qty` units of `sale` for `user`: the seckill call. A
    /// failure carries the key that finds what the call made, if anything.
    pub async fn reserve(
        &self,
        sale: SaleId,
        user: UserId,
        qty: Qty,
        idem: Option<&IdempotencyKey>,
    ) -> Result<Reservation, ReserveFailed> {
        // A retried key must still find its order, so it always asks Redis.
        if idem.is_none() && self.sold_out.is_marked(sale) {
            return Ok(Reservation::Refused(Refusal::SoldOut));
        }
        let answer = self
            .combiner
            .reserve(sale, || self.keys.sale(sale), user, qty, idem)
            .await?;
        use super::scripts::reserve::{Outcome, Refusal as Refused};
        let refused = |r| Ok(Reservation::Refused(r));
        let with_order = |seq: u64, packed: &str, make: fn(Order) -> Reservation| {
            unpacked(OrderId::new(sale, seq), packed)
                .map(make)
                .map_err(|source| ReserveFailed {
                    source,
                    retry_key: answer.retry_key(idem),
                })
        };
        match &answer.reply {
            Outcome::Created { seq, packed } => with_order(*seq, packed, Reservation::Created),
            Outcome::Existing { seq, packed } => with_order(*seq, packed, Reservation::Existing),
            Outcome::SoldOut { left } => {
                // Only a sale with nothing left is remembered as sold out:
                // an ask larger than what is left refuses that ask alone.
                if *left == 0 {
                    self.sold_out.mark(sale);
                }
                refused(Refusal::SoldOut)
            }
            Outcome::Refused(Refused::NotFound) => match self.missing(sale) {
                Ok(()) => refused(Refusal::NotFound),
                Err(source) => Err(ReserveFailed {
                    source,
                    retry_key: answer.retry_key(idem),
                }),
            },
            Outcome::Refused(Refused::NotStarted) => refused(Refusal::NotStarted),
            Outcome::Refused(Refused::Ended) => refused(Refusal::Ended),
            Outcome::Refused(Refused::Paused) => refused(Refusal::Paused),
            Outcome::Refused(Refused::LimitExceeded) => refused(Refusal::LimitExceeded),
            Outcome::Refused(Refused::BacklogFull) => refused(Refusal::BacklogFull),
        }
    }

    /// Applies a successful payment of `amount_cents` with `payment_id`.
    pub async fn pay(
        &self,
        id: OrderId,
        payment_id: &str,
        amount_cents: i64,
    ) -> Result<Payment, EngineError> {
        use super::scripts::pay::Reply;
        let [due, orders] = self.keys.sale(id.sale()).bucket_keys(id.seq() / DUE_BUCKET);
        let reply: Reply = self
            .run_order_script(
                &self.scripts.pay,
                id,
                &[&due, &orders],
                &[&id.seq().to_string(), payment_id, &amount_cents.to_string()],
            )
            .await?;
        let order = |p: &str| unpacked(id, p);
        Ok(match reply {
            Reply::Paid(p) => Payment::Paid(order(&p)?),
            Reply::AlreadyPaid(p) => Payment::AlreadyPaid(order(&p)?),
            Reply::Expired { packed, closed_now } => {
                if closed_now {
                    self.sold_out.clear(id.sale());
                }
                Payment::Expired {
                    order: order(&packed)?,
                    closed_now,
                }
            }
            Reply::NotPending(p) => Payment::NotPending(order(&p)?),
            Reply::AmountMismatch(p) => Payment::AmountMismatch(order(&p)?),
            Reply::NotFound => Payment::NotFound,
        })
    }

    /// Cancels a pending order on behalf of `user`, its owner. The call
    /// carries an id, so that Redis running it twice (a request resent after
    /// a dropped connection) answers the first run's "cancelled".
    pub async fn cancel(&self, id: OrderId, user: UserId) -> Result<Cancellation, EngineError> {
        use super::scripts::cancel::Reply;
        let k = self.keys.sale(id.sale());
        let [due, orders] = k.bucket_keys(id.seq() / DUE_BUCKET);
        let reply: Reply = self
            .run_order_script(
                &self.scripts.cancel,
                id,
                &[&k.calls, &due, &orders],
                &[
                    &id.seq().to_string(),
                    &user.to_string(),
                    &self.combiner.call_id(),
                ],
            )
            .await?;
        Ok(match reply {
            Reply::Cancelled(p) => {
                self.sold_out.clear(id.sale());
                Cancellation::Cancelled(unpacked(id, &p)?)
            }
            Reply::NotPending { packed, closed_now } => {
                if closed_now {
                    self.sold_out.clear(id.sale());
                }
                Cancellation::NotPending {
                    order: unpacked(id, &packed)?,
                    closed_now,
                }
            }
            Reply::NotFound => Cancellation::NotFound,
        })
    }

    /// Refunds a paid order on behalf of its owner (`Some`) or the admin
    /// (`None`): at once when settled, otherwise accepted and queued.
    pub async fn refund(&self, id: OrderId, caller: Option<UserId>) -> Result<Refund, EngineError> {
        use super::scripts::refund::Reply;
        let k = self.keys.sale(id.sale());
        let [due, orders] = k.bucket_keys(id.seq() / DUE_BUCKET);
        let reply: Reply = self
            .run_order_script(
                &self.scripts.refund,
                id,
                &[&k.dead_refunds, &due, &orders],
                &[
                    &id.seq().to_string(),
                    &caller.map_or(String::new(), |u| u.to_string()),
                    &self.refunds.first_retry.as_millis().to_string(),
                ],
            )
            .await?;
        Ok(match reply {
            Reply::Refunded { packed, now } => {
                if now {
                    self.sold_out.clear(id.sale());
                }
                Refund::Refunded {
                    order: unpacked(id, &packed)?,
                    now,
                }
            }
            Reply::Accepted(p) => Refund::Accepted(unpacked(id, &p)?),
            Reply::NotPaid(p) => Refund::NotPaid(unpacked(id, &p)?),
            Reply::NotFound => Refund::NotFound,
            Reply::Retired => Refund::Retired,
        })
    }

    /// Works off up to `limit` due entries of `sale`'s due-queue: closes
    /// orders still pending past their deadline, retries waiting refunds.
    pub async fn expire(&self, sale: SaleId, limit: usize) -> Result<ExpiryBatch, EngineError> {
        let k = self.keys.sale(sale);
        // The buckets to work: the first of the index, as the last call
        // answered them (read here for a sale this process has not seen).
        let cached = self
            .expiry_buckets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&sale)
            .cloned();
        let buckets = match cached {
            Some(b) => b,
            None => {
                let mut c = self.conn.clone();
                let first: Vec<u64> = self
                    .timed(async {
                        redis::AsyncCommands::zrange(&mut c, &k.deadlines, 0, 15).await
                    })
                    .await?;
                first
            }
        };
        let mut inv = self.scripts.expire.prepare_invoke();
        for key in k.with_dead_refunds() {
            inv.key(key);
        }
        for b in &buckets {
            for key in k.bucket_keys(*b) {
                inv.key(key);
            }
        }
        let p = &self.refunds;
        inv.arg(limit.max(1))
            .arg(p.first_retry.as_millis() as u64)
            .arg(p.max_retry.as_millis() as u64)
            .arg(p.dead_letter_after.as_millis() as u64);
        let mut c = self.conn.clone();
        let r: super::scripts::expire::Reply = self.timed(inv.invoke_async(&mut c)).await?;
        self.expiry_buckets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(sale, r.next_buckets.clone());
        if r.closed + r.refunded > 0 {
            self.sold_out.clear(sale);
        }
        let count = |v: i64| usize::try_from(v).unwrap_or(0);
        Ok(ExpiryBatch {
            claimed: count(r.claimed),
            closed: r.closed,
            still_due: count(r.still_due),
            next_deadline_ms: r.next_due_ms,
            now_ms: r.now_ms,
            refunded: r.refunded,
            dead_lettered: count(r.dead_lettered),
            refunds_waiting: r.refunds_waiting,
            lateness_ms: r.lateness_ms,
            refund_wait_ms: r.refund_wait_ms,
        })
    }

    /// Reads one order; `None` when Redis does not know it.
    pub async fn order(&self, id: OrderId) -> Result<Option<Order>, EngineError> {
        if id.seq() > super::keys::MAX_SEQ {
            return Ok(None);
        }
        let packed = self.packed_orders(id.sale(), &[id.seq()]).await?;
        packed
            .into_iter()
            .next()
            .flatten()
            .map(|p| {
                Order::unpack(id, &p)
                    .ok_or_else(|| EngineError::Protocol(format!("order {id}: {p:?}")))
            })
            .transpose()
    }
}
