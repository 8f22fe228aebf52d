//! An order's life in Redis: reserve, pay, cancel and expire, each one
//! script call. Every change writes its flow record in the same call.

use super::{Engine, EngineError, Order, ReserveFailed, SaleKeys};
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

impl SaleKeys {
    /// The keys every order script takes first (see `lua/prelude.lua`).
    pub(crate) fn order_script_keys(&self) -> [&str; 5] {
        [
            &self.sale,
            &self.buyers,
            &self.orders,
            &self.deadlines,
            &self.flow,
        ]
    }
}

/// Parses a `{tag, packed_order}` reply.
fn order_in(id: OrderId, reply: &[String]) -> Result<Order, EngineError> {
    reply
        .get(1)
        .and_then(|p| Order::unpack(id, p))
        .ok_or_else(|| EngineError::Protocol(format!("order {id}: {reply:?}")))
}

impl Engine {
    async fn run_order_script(
        &self,
        script: &redis::Script,
        sale: SaleId,
        extra_keys: &[&str],
        args: &[&str],
    ) -> Result<Vec<String>, EngineError> {
        let k = self.keys.sale(sale);
        let mut inv = script.prepare_invoke();
        for key in k.order_script_keys().iter().chain(extra_keys) {
            inv.key(*key);
        }
        for arg in args {
            inv.arg(*arg);
        }
        let mut c = self.conn.clone();
        match self.timed(inv.invoke_async(&mut c)).await {
            Err(e) if e.is_no_sale() => self.missing(sale).map(|()| vec!["not_found".into()]),
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
        let reply = &answer.reply;
        let bad = || ReserveFailed {
            source: EngineError::Protocol(format!("reserve: {reply:?}")),
            retry_key: answer.retry_key(idem),
        };
        let refused = |r| Ok(Reservation::Refused(r));
        let with_order = |make: fn(Order) -> Reservation| {
            let seq = reply.get(1).and_then(|s| s.parse().ok()).ok_or_else(bad)?;
            let id = OrderId::new(sale, seq);
            let packed: Vec<String> = reply.iter().skip(1).cloned().collect();
            order_in(id, &packed).map(make).map_err(|_| bad())
        };
        match reply.first().map(String::as_str) {
            Some("ok") => with_order(Reservation::Created),
            Some("dup") => with_order(Reservation::Existing),
            Some("not_found") => match self.missing(sale) {
                Ok(()) => refused(Refusal::NotFound),
                Err(source) => Err(ReserveFailed {
                    source,
                    retry_key: answer.retry_key(idem),
                }),
            },
            Some("sale_not_started") => refused(Refusal::NotStarted),
            Some("sale_ended") => refused(Refusal::Ended),
            Some("sold_out") => {
                // Only a sale with nothing left is remembered as sold out:
                // an ask larger than what is left refuses that ask alone.
                if reply.get(1).is_some_and(|left| left == "0") {
                    self.sold_out.mark(sale);
                }
                refused(Refusal::SoldOut)
            }
            Some("limit_exceeded") => refused(Refusal::LimitExceeded),
            Some("backlog_full") => refused(Refusal::BacklogFull),
            _ => Err(bad()),
        }
    }

    /// Applies a successful payment of `amount_cents` with `payment_id`.
    pub async fn pay(
        &self,
        id: OrderId,
        payment_id: &str,
        amount_cents: i64,
    ) -> Result<Payment, EngineError> {
        let reply = self
            .run_order_script(
                &self.scripts.pay,
                id.sale(),
                &[],
                &[&id.seq().to_string(), payment_id, &amount_cents.to_string()],
            )
            .await?;
        let order = || order_in(id, &reply);
        let closed_now = reply.get(2).is_some_and(|c| c == "1");
        Ok(match reply.first().map(String::as_str) {
            Some("ok") => Payment::Paid(order()?),
            Some("dup") => Payment::AlreadyPaid(order()?),
            Some("order_expired") => {
                if closed_now {
                    self.sold_out.clear(id.sale());
                }
                Payment::Expired {
                    order: order()?,
                    closed_now,
                }
            }
            Some("order_not_pending") => Payment::NotPending(order()?),
            Some("amount_mismatch") => Payment::AmountMismatch(order()?),
            Some("not_found") => Payment::NotFound,
            _ => return Err(EngineError::Protocol(format!("pay: {reply:?}"))),
        })
    }

    /// Cancels a pending order on behalf of `user`, its owner.
    pub async fn cancel(&self, id: OrderId, user: UserId) -> Result<Cancellation, EngineError> {
        let reply = self
            .run_order_script(
                &self.scripts.cancel,
                id.sale(),
                &[],
                &[&id.seq().to_string(), &user.to_string()],
            )
            .await?;
        let order = || order_in(id, &reply);
        let closed_now = reply.get(2).is_some_and(|c| c == "1");
        if reply.first().is_some_and(|t| t == "ok") || closed_now {
            self.sold_out.clear(id.sale());
        }
        Ok(match reply.first().map(String::as_str) {
            Some("ok") => Cancellation::Cancelled(order()?),
            Some("order_not_pending") => Cancellation::NotPending {
                order: order()?,
                closed_now,
            },
            Some("not_found") => Cancellation::NotFound,
            _ => return Err(EngineError::Protocol(format!("cancel: {reply:?}"))),
        })
    }

    /// Refunds a paid order on behalf of its owner (`Some`) or the admin
    /// (`None`): at once when settled, otherwise accepted and queued.
    pub async fn refund(&self, id: OrderId, caller: Option<UserId>) -> Result<Refund, EngineError> {
        let reply = self
            .run_order_script(
                &self.scripts.refund,
                id.sale(),
                &[&self.keys.sale(id.sale()).dead_refunds],
                &[
                    &id.seq().to_string(),
                    &caller.map_or(String::new(), |u| u.to_string()),
                    &self.refunds.first_retry.as_millis().to_string(),
                ],
            )
            .await?;
        let order = || order_in(id, &reply);
        Ok(match reply.first().map(String::as_str) {
            Some("ok") => {
                let now = reply.get(2).is_some_and(|n| n == "1");
                if now {
                    self.sold_out.clear(id.sale());
                }
                Refund::Refunded {
                    order: order()?,
                    now,
                }
            }
            Some("accepted") => Refund::Accepted(order()?),
            Some("order_not_paid") => Refund::NotPaid(order()?),
            Some("not_found") => Refund::NotFound,
            Some("retired") => Refund::Retired,
            _ => return Err(EngineError::Protocol(format!("refund: {reply:?}"))),
        })
    }

    /// Works off up to `limit` due entries of `sale`'s due-queue: closes
    /// orders still pending past their deadline, retries waiting refunds.
    pub async fn expire(&self, sale: SaleId, limit: usize) -> Result<ExpiryBatch, EngineError> {
        let k = self.keys.sale(sale);
        let mut inv = self.scripts.expire.prepare_invoke();
        for key in k.order_script_keys() {
            inv.key(key);
        }
        let p = &self.refunds;
        inv.key(&k.dead_refunds)
            .arg(limit.max(1))
            .arg(p.first_retry.as_millis() as u64)
            .arg(p.max_retry.as_millis() as u64)
            .arg(p.dead_letter_after.as_millis() as u64);
        let mut c = self.conn.clone();
        let reply: Vec<i64> = self.timed(inv.invoke_async(&mut c)).await?;
        let count = |v: i64| usize::try_from(v).unwrap_or(0);
        let bad = || EngineError::Protocol(format!("expire: {reply:?}"));
        let head = reply.get(..8).ok_or_else(bad)?;
        let (closed, refunded) = (count(head[1]), count(head[5]));
        if closed + refunded > 0 {
            self.sold_out.clear(sale);
        }
        let lateness_ms = reply.get(8..8 + closed).ok_or_else(bad)?.to_vec();
        let refund_wait_ms = reply
            .get(8 + closed..8 + closed + refunded)
            .ok_or_else(bad)?
            .to_vec();
        Ok(ExpiryBatch {
            claimed: count(head[0]),
            closed,
            still_due: count(head[2]),
            next_deadline_ms: (head[3] >= 0).then_some(head[3]),
            now_ms: head[4],
            refunded,
            dead_lettered: count(head[6]),
            refunds_waiting: head[7],
            lateness_ms,
            refund_wait_ms,
        })
    }

    /// Reads one order; `None` when Redis does not know it.
    pub async fn order(&self, id: OrderId) -> Result<Option<Order>, EngineError> {
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
