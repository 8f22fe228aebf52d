//! The record is forward-only: the rules by which the reconciler judges a
//! flow record against its order as MySQL holds it (see `ledger::apply`).
//!
//! A record may move an order one legal step forward (pending -> paid |
//! cancelled | closed; paid -> refund_pending | refunded; refund_pending ->
//! refunded), or repeat the state MySQL already holds (a harmless
//! re-delivery). It never changes an order's buyer, units or amount, never
//! changes or erases a payment id once set, and only a reserve starts an
//! order. Anything else is refused; this module only judges, it never writes.

use crate::engine::{FlowEvent, FlowRecord, Order, OrderStatus};

/// An order as MySQL holds it: what a record may not change, and where it
/// stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Held {
    /// The buyer.
    pub(crate) user: u64,
    /// Units.
    pub(crate) qty: i64,
    /// Price times units, in cents.
    pub(crate) amount_cents: i64,
    /// Its status as stored (an unknown one allows no transition).
    pub(crate) status: String,
    /// The gateway's payment id, once paid.
    pub(crate) payment_id: Option<String>,
}

impl Held {
    /// The order as a record leaves it.
    pub(crate) fn of(o: &Order) -> Self {
        Self {
            user: o.user.get(),
            qty: i64::from(o.qty),
            amount_cents: o.amount_cents,
            status: o.status.as_str().to_owned(),
            payment_id: o.payment_id.clone(),
        }
    }
}

/// What to do with one record.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// A legal step forward.
    Apply,
    /// The state MySQL already holds: keep the flow row, change nothing.
    Repeat,
    /// Refused, with the reasons.
    Refuse(String),
}

/// The status a record of `event` leaves its order in.
fn status_after(event: FlowEvent) -> OrderStatus {
    match event {
        FlowEvent::Reserve => OrderStatus::Pending,
        FlowEvent::Pay => OrderStatus::Paid,
        FlowEvent::Cancel => OrderStatus::Cancelled,
        FlowEvent::Close => OrderStatus::Closed,
        FlowEvent::RefundRequest => OrderStatus::RefundPending,
        FlowEvent::Refund => OrderStatus::Refunded,
        // Not used by `judge` (a late payment leaves any status as it is).
        FlowEvent::LatePay => OrderStatus::Closed,
    }
}

/// The transitions the record may carry: pending -> paid | cancelled |
/// closed; paid -> refund_pending | refunded; refund_pending -> refunded.
pub fn is_legal(from: OrderStatus, to: OrderStatus) -> bool {
    use OrderStatus::*;
    matches!(
        (from, to),
        (Pending, Paid | Cancelled | Closed)
            | (Paid, RefundPending | Refunded)
            | (RefundPending, Refunded)
    )
}

/// Why writing the order as `redis` holds it over the order as `mysql`
/// holds it would rewrite a fact the record never gives up (another buyer,
/// other units, a payment id changed or erased: a paid order going back to
/// pending or closed loses its payment id); `None` otherwise. The audit
/// leaves such a repair to a person: Redis may have gone back in time.
pub fn rewrite_refused(mysql: &Order, redis: &Order) -> Option<String> {
    let mut why = Vec::new();
    if mysql.user != redis.user {
        why.push(format!("buyer {} -> {}", mysql.user, redis.user));
    }
    if mysql.qty != redis.qty {
        why.push(format!("units {} -> {}", mysql.qty, redis.qty));
    }
    if let Some(p) = &mysql.payment_id {
        if redis.payment_id.as_ref() != Some(p) {
            why.push(format!(
                "payment id {p} -> {} (status {} -> {})",
                redis.payment_id.as_deref().unwrap_or("none"),
                mysql.status.as_str(),
                redis.status.as_str()
            ));
        }
    }
    (!why.is_empty()).then(|| why.join("; "))
}

/// Judges record `r` against its order as held so far (`None`: MySQL has
/// no such order).
pub(crate) fn judge(held: Option<&Held>, r: &FlowRecord) -> Verdict {
    let o = &r.order;
    let mut why = Vec::new();
    // A late payment carries its order as it stands (closed, cancelled,
    // paid under another payment id): it never moves it.
    if r.event != FlowEvent::LatePay && o.status != status_after(r.event) {
        why.push(format!(
            "a {} record carries status {}",
            r.event.as_str(),
            o.status.as_str()
        ));
    }
    let Some(held) = held else {
        if r.event != FlowEvent::Reserve {
            why.push(format!(
                "order unknown to MySQL starts with a {} record, not a reserve",
                r.event.as_str()
            ));
        }
        return if why.is_empty() {
            Verdict::Apply
        } else {
            Verdict::Refuse(why.join("; "))
        };
    };
    let to = o.status.as_str();
    if r.event == FlowEvent::LatePay && held.status != to {
        // It tells of a payment, never moves the order: the order's own
        // change (its close) comes first, in its own record.
        why.push(format!(
            "a late payment carries status {to} of an order that is {}",
            held.status
        ));
    }
    if held.status != to {
        match OrderStatus::parse(&held.status) {
            Some(from) if is_legal(from, o.status) => {}
            _ => why.push(format!("illegal transition {} -> {to}", held.status)),
        }
    }
    if held.user != o.user.get() {
        why.push(format!("buyer changed {} -> {}", held.user, o.user));
    }
    if held.qty != i64::from(o.qty) {
        why.push(format!("units changed {} -> {}", held.qty, o.qty));
    }
    if held.amount_cents != o.amount_cents {
        why.push(format!(
            "amount changed {} -> {}",
            held.amount_cents, o.amount_cents
        ));
    }
    let none = || "none".to_owned();
    match (&held.payment_id, &o.payment_id) {
        (Some(p), new) if new.as_ref() != Some(p) => why.push(format!(
            "payment id changed {p} -> {}",
            new.clone().unwrap_or_else(none)
        )),
        (None, Some(_)) if held.status == to => {
            why.push(format!("repeats status {to} with a new payment id"));
        }
        _ => {}
    }
    if why.is_empty() && held.status == to {
        return Verdict::Repeat;
    }
    if why.is_empty() {
        Verdict::Apply
    } else {
        Verdict::Refuse(why.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::FlowId;

    fn record(event: FlowEvent, packed: &str) -> FlowRecord {
        FlowRecord {
            id: FlowId { ms: 1, seq: 0 },
            event,
            order: Order::unpack("1-5".parse().unwrap(), packed).unwrap(),
            restocked: false,
            key: None,
            n: None,
            late: None,
        }
    }

    const PENDING: &str = "pending|7|1|100|10|20|||||";
    const PAID: &str = "paid|7|1|100|10|20|15||||pay-1";

    #[test]
    fn legal_steps_apply_and_repeats_change_nothing() {
        let reserve = record(FlowEvent::Reserve, PENDING);
        assert_eq!(judge(None, &reserve), Verdict::Apply);
        let pending = Held::of(&reserve.order);
        assert_eq!(judge(Some(&pending), &reserve), Verdict::Repeat);
        let pay = record(FlowEvent::Pay, PAID);
        assert_eq!(judge(Some(&pending), &pay), Verdict::Apply);
        let paid = Held::of(&pay.order);
        assert_eq!(judge(Some(&paid), &pay), Verdict::Repeat);
        let request = record(
            FlowEvent::RefundRequest,
            "refund_pending|7|1|100|10|20|15||||pay-1",
        );
        assert_eq!(judge(Some(&paid), &request), Verdict::Apply);
        let refund = record(FlowEvent::Refund, "refunded|7|1|100|10|20|15||30||pay-1");
        assert_eq!(judge(Some(&paid), &refund), Verdict::Apply);
        assert_eq!(
            judge(Some(&Held::of(&request.order)), &refund),
            Verdict::Apply
        );
        let close = record(FlowEvent::Close, "closed|7|1|100|10|20||20|||");
        assert_eq!(judge(Some(&pending), &close), Verdict::Apply);
    }

    #[test]
    fn backwards_and_rewrites_are_refused_with_reasons() {
        let paid = Held::of(&record(FlowEvent::Pay, PAID).order);
        let close = record(FlowEvent::Close, "closed|7|1|100|10|20||20|||pay-2");
        assert_eq!(
            judge(Some(&paid), &close),
            Verdict::Refuse(
                "illegal transition paid -> closed; payment id changed pay-1 -> pay-2".into()
            )
        );
        let other_buyer = record(FlowEvent::Reserve, "pending|9|2|200|10|20|||||");
        let pending = Held::of(&record(FlowEvent::Reserve, PENDING).order);
        assert_eq!(
            judge(Some(&pending), &other_buyer),
            Verdict::Refuse(
                "buyer changed 7 -> 9; units changed 1 -> 2; amount changed 100 -> 200".into()
            )
        );
        assert_eq!(
            judge(None, &record(FlowEvent::Pay, PAID)),
            Verdict::Refuse(
                "order unknown to MySQL starts with a pay record, not a reserve".into()
            )
        );
        assert_eq!(
            judge(Some(&pending), &record(FlowEvent::Close, PAID)),
            Verdict::Refuse("a close record carries status paid".into())
        );
    }
}
