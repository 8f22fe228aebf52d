//! Phase 2: order by order, in pages (bounded memory for any sale size).
//! MySQL's page is read before Redis's; an order is compared field by
//! field only when it is settled (its last flow record is at or before the
//! moment's cursor), so a change made during the audit never looks like a
//! mismatch. Orders MySQL holds beyond Redis's counter (a Redis that lost
//! writes) are scanned too.

use serde_json::json;

use super::moment::Moment;
use super::{order_json, Ctx, PAGE};
use crate::audit::{AuditOptions, FindingKind};
use crate::db::audit as q;
use crate::domain::OrderId;
use crate::engine::{FlowId, Order, OrderStatus};
use crate::units::Units;

/// Scans every order; returns what Redis's orders add up to.
pub(super) async fn scan(
    cx: &mut Ctx<'_>,
    at: &Moment,
    opts: &AuditOptions,
) -> anyhow::Result<Units> {
    let (engine, db, sale) = (cx.engine, cx.db, cx.sale);
    let mysql_max = q::max_seq(db, sale).await?;
    let redis_max = at.snap.num("seq").max(0) as u64;
    if mysql_max > redis_max {
        cx.find(
            FindingKind::OrderSeqBehind,
            format!("Redis's order counter is {redis_max}, MySQL holds orders up to {mysql_max}: new orders would reuse ids"),
        )
        .redis(json!({"seq": redis_max}))
        .mysql(json!({"max_seq": mysql_max}))
        .push();
    }
    let max_seq = redis_max.max(mysql_max);
    let bar = progress(opts.progress, max_seq);
    let mut sums = Units::opening(at.redis.total);
    let now_ms = at.snap.now_ms;
    let grace_ms = opts.grace.as_millis() as i64;
    let mut from = 1;
    while from <= max_seq {
        let to = (from + PAGE - 1).min(max_seq);
        let mysql = q::orders_in(db, sale, from, to).await?;
        let seqs: Vec<u64> = (from..=to).collect();
        let packed = engine.packed_orders(sale, &seqs).await?;
        let mut pending = Vec::new();
        for (&seq, p) in seqs.iter().zip(&packed) {
            let redis_order = match p {
                Some(p) => match Order::unpack(OrderId::new(sale, seq), p) {
                    Some(o) => Some(o),
                    None => {
                        cx.find(FindingKind::OrderUnreadable, format!("Redis holds {p:?}"))
                            .order(seq)
                            .push();
                        continue;
                    }
                },
                None => None,
            };
            if let Some(o) = &redis_order {
                sums.count_order(o, at.end_ms);
                if o.status == OrderStatus::Pending {
                    pending.push(seq.to_string());
                    if o.deadline_ms < now_ms - grace_ms {
                        cx.find(
                            FindingKind::OverduePending,
                            format!(
                                "pending {} ms past its deadline: expiry is behind",
                                now_ms - o.deadline_ms
                            ),
                        )
                        .order(seq)
                        .redis(order_json(o))
                        .push();
                    }
                }
            }
            compare_order(cx, seq, redis_order.as_ref(), mysql.get(&seq), at.cursor).await?;
            cx.report.orders_checked += 1;
        }
        check_deadlines_exist(cx, &pending).await?;
        bar.inc(to - from + 1);
        from = to + 1;
    }
    bar.finish_and_clear();
    Ok(sums)
}

fn progress(enabled: bool, len: u64) -> indicatif::ProgressBar {
    if !enabled || len < 10_000 {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "auditing orders {bar:40} {pos}/{len} ({per_sec}, {eta} left)",
    ) {
        bar.set_style(style);
    }
    bar
}

/// Compares one order. MySQL's row was read before Redis's order: a change
/// after the MySQL read moves the Redis order's last flow id past the
/// cursor, so only settled orders (last flow at or before the cursor) are
/// compared field by field, and live traffic gives no false finding.
async fn compare_order(
    cx: &mut Ctx<'_>,
    seq: u64,
    redis: Option<&Order>,
    mysql: Option<&Order>,
    cursor: FlowId,
) -> anyhow::Result<()> {
    for (side, o) in [("Redis", redis), ("MySQL", mysql)] {
        if let Some(o) = o.filter(|o| o.paid_ms.is_some() && o.closed_ms.is_some()) {
            cx.find(
                FindingKind::PaidAndClosed,
                format!(
                    "{side} holds the order both paid and closed ({}); a person must look",
                    o.status.as_str()
                ),
            )
            .order(seq)
            .redis(order_json(o))
            .push();
        }
    }
    match (redis, mysql) {
        (None, None) => {}
        (None, Some(m)) => cx
            .find(
                FindingKind::OrderMissingInRedis,
                format!(
                    "MySQL holds the order ({}), Redis does not",
                    m.status.as_str()
                ),
            )
            .order(seq)
            .mysql(order_json(m))
            .push(),
        (Some(r), m) => {
            let last: Option<FlowId> = r.last_flow.parse().ok();
            let settled = last.is_some_and(|l| l <= cursor);
            if !settled {
                let present = cx.engine.flow_record_exists(cx.sale, &r.last_flow).await?;
                if !present && !applied_since(cx, last).await? {
                    write_to_mysql(
                        cx,
                        FindingKind::FlowRecordLost,
                        format!(
                            "the order's last flow record {} is neither in the stream nor in MySQL",
                            r.last_flow
                        ),
                        r,
                        m,
                    );
                }
                return Ok(());
            }
            match m {
                None => cx
                    .find(
                        FindingKind::OrderMissingInMysql,
                        format!(
                            "Redis holds a settled order ({}) that MySQL does not",
                            r.status.as_str()
                        ),
                    )
                    .order(seq)
                    .redis(order_json(r))
                    .push(),
                Some(m) if order_json(m) != order_json(r) => write_to_mysql(
                    cx,
                    FindingKind::OrderMismatch,
                    format!(
                        "status {}/{}, qty {}/{}, amount {}/{} (Redis/MySQL)",
                        r.status.as_str(),
                        m.status.as_str(),
                        r.qty,
                        m.qty,
                        r.amount_cents,
                        m.amount_cents
                    ),
                    r,
                    Some(m),
                ),
                Some(_) => {}
            }
        }
    }
    Ok(())
}

/// A finding whose repair writes Redis's order `r` over MySQL's `m`, with
/// the finding's `detail`. Redis is the truth only while that moves the
/// record forward: a repair that would change the buyer, the units or a
/// payment id MySQL holds (Redis went back in time) is left to a person,
/// and the detail says what it would rewrite.
fn write_to_mysql(
    cx: &mut Ctx<'_>,
    kind: FindingKind,
    mut detail: String,
    r: &Order,
    m: Option<&Order>,
) {
    let refused = m.and_then(|m| crate::db::forward::rewrite_refused(m, r));
    if let Some(why) = &refused {
        detail.push_str(&format!(
            "; not repaired automatically, Redis would rewrite the record ({why}): a person decides"
        ));
    }
    let f = cx
        .find(kind, detail)
        .order(r.id.seq())
        .redis(order_json(r))
        .mysql_if(m.map(order_json));
    if refused.is_some() {
        f.fix(None).truth(None).push();
    } else {
        f.push();
    }
}

/// Whether the reconciler has applied `id` since the audit read its cursor.
async fn applied_since(cx: &Ctx<'_>, id: Option<FlowId>) -> anyhow::Result<bool> {
    let Some(id) = id else { return Ok(false) };
    let now = q::cursor(cx.db, cx.sale).await?;
    Ok(now.is_some_and(|now| id <= now))
}

async fn check_deadlines_exist(cx: &mut Ctx<'_>, pending: &[String]) -> anyhow::Result<()> {
    let scores = cx.engine.due_scores(cx.sale, pending).await?;
    let missing: Vec<u64> = pending
        .iter()
        .zip(scores)
        .filter(|(_, s)| s.is_none())
        .filter_map(|(m, _)| m.parse().ok())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    // Paid or cancelled since? Then the entry went with the pending state.
    let again = cx.engine.packed_orders(cx.sale, &missing).await?;
    for (seq, p) in missing.into_iter().zip(again) {
        let still_pending = p.as_deref().is_some_and(|p| p.starts_with("pending|"));
        if still_pending {
            cx.find(
                FindingKind::DeadlineMissing,
                "the order is pending but has no payment deadline entry: it would never expire",
            )
            .order(seq)
            .push();
        }
    }
    Ok(())
}
