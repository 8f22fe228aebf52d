//! Phase 3, after the order scan. Checks that need a still sale run only
//! when the flow stream did not move during the audit (and, for buyers,
//! when there is no backlog and no order differs); otherwise the report
//! says they were skipped. Then the sale's queues: the due-queue, the
//! dead-lettered refunds, the quarantined records and the backlog's age.

use std::time::Duration;

use serde_json::json;

use super::moment::Moment;
use super::{Ctx, PAGE};
use crate::audit::FindingKind;
use crate::db::audit as q;
use crate::units::Units;

/// Runs the phase; `sums` is what Redis's orders add up to (phase 2).
pub(super) async fn check(
    cx: &mut Ctx<'_>,
    at: &Moment,
    sums: &Units,
    grace: Duration,
) -> anyhow::Result<()> {
    let engine = cx.engine;
    let seen = &at.snap.last_flow;
    let still = engine
        .audit_snapshot(cx.sale)
        .await?
        .is_some_and(|a| a.last_flow == *seen);
    if still {
        check_counters_against_orders(cx, &at.redis, sums);
    } else {
        cx.skip("Redis counters against Redis orders: the sale changed during the audit");
    }
    // Buyers are compared with MySQL's orders, so only while those mirror
    // Redis's: a still sale, no backlog, and no order found to differ.
    let mirrored = !cx.report.findings.iter().any(|f| {
        matches!(
            f.kind,
            FindingKind::OrderMismatch
                | FindingKind::OrderMissingInMysql
                | FindingKind::OrderMissingInRedis
                | FindingKind::FlowRecordLost
        )
    });
    let before_buyers = cx.report.findings.len();
    let limit = at.snap.num("limit");
    check_buyers(cx, limit, still && at.backlog == 0 && mirrored).await?;
    let moved = engine
        .audit_snapshot(cx.sale)
        .await?
        .is_none_or(|a| a.last_flow != *seen);
    if moved && cx.report.findings.len() > before_buyers {
        // A reserve or cancel between the reads: those differences are not findings.
        let kept: Vec<_> = cx
            .report
            .findings
            .drain(before_buyers..)
            .filter(|f| f.kind != FindingKind::BuyerUnits)
            .collect();
        cx.report.findings.extend(kept);
        cx.skip("buyers' units against their orders: the sale changed during the check");
    }
    check_due_queue(cx).await?;
    check_dead_refunds(cx, at.snap.now_ms).await?;
    check_quarantined(cx).await?;
    let backlog = at.backlog;
    let age = cx.report.oldest_backlog_ms;
    if backlog > 0 && age > grace.as_millis() as i64 {
        cx.find(
            FindingKind::BacklogStale,
            format!("{backlog} flow records wait for MySQL, the oldest for {age} ms: is the reconciler running?"),
        )
        .redis(json!({"backlog": backlog, "oldest_ms": age}))
        .push();
    }
    Ok(())
}

fn check_counters_against_orders(cx: &mut Ctx<'_>, redis: &Units, sums: &Units) {
    if redis != sums {
        cx.find(
            FindingKind::RedisCounters,
            format!("Redis counters {redis} differ from what its orders add up to {sums}"),
        )
        .redis(json!({"counters": redis, "orders": sums}))
        .push();
    }
}

async fn check_buyers(cx: &mut Ctx<'_>, limit: i64, still: bool) -> anyhow::Result<()> {
    if !still {
        cx.skip("buyers' units against their orders: the sale changed, has a backlog, or MySQL's orders differ from Redis's");
    }
    let mut cursor = 0;
    loop {
        let (next, page) = cx.engine.buyers_page(cx.sale, cursor).await?;
        let users: Vec<u64> = page.iter().map(|p| p.0).collect();
        let held = if still {
            q::buyer_units_of(cx.db, cx.sale, &users).await?
        } else {
            Default::default()
        };
        for (user, units) in page {
            let expected = held.get(&user).copied().unwrap_or(0);
            if units > limit || units < 0 {
                let f = cx
                    .find(
                        FindingKind::BuyerOverLimit,
                        format!("buyer {user} holds {units} units; the limit is {limit}"),
                    )
                    .buyer(user, expected)
                    .redis(json!({"user_id": user.to_string(), "units": units}));
                // What their orders hold is known only on a still sale.
                if still {
                    f.push();
                } else {
                    f.fix(None).push();
                }
            } else if still && expected != units {
                buyer_mismatch(cx, user, units, expected);
            }
        }
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    if !still {
        return Ok(());
    }
    // Buyers whose orders hold units but whom Redis lost.
    let mut after = 0;
    loop {
        let page = q::buyer_units_page(cx.db, cx.sale, after, PAGE).await?;
        let users: Vec<u64> = page.iter().map(|p| p.0).collect();
        let units = cx.engine.buyer_units(cx.sale, &users).await?;
        for ((user, expected), got) in page.iter().zip(units) {
            if got.is_none() && *expected != 0 {
                buyer_mismatch(cx, *user, 0, *expected);
            }
        }
        match page.last() {
            Some(last) if page.len() as u64 == PAGE => after = last.0,
            _ => break,
        }
    }
    Ok(())
}

fn buyer_mismatch(cx: &mut Ctx<'_>, user: u64, units: i64, expected: i64) {
    cx.find(
        FindingKind::BuyerUnits,
        format!("buyer {user}: Redis counts {units} units, their orders hold {expected}"),
    )
    .buyer(user, expected)
    .redis(json!({"user_id": user.to_string(), "units": units}))
    .mysql(json!({"user_id": user.to_string(), "units": expected}))
    .push();
}

/// Due-queue entries whose order no longer waits on them. A suspect is read
/// again before it counts, since a payment removes its entry and changes its
/// order in one step but the audit reads the two apart.
async fn check_due_queue(cx: &mut Ctx<'_>) -> anyhow::Result<()> {
    let mut cursor = 0;
    loop {
        let (next, page) = cx.engine.due_page(cx.sale, cursor).await?;
        let mut suspects = Vec::new();
        for (member, _) in &page {
            let (seq, wants) = match member.strip_prefix('r') {
                Some(rest) => (rest.split(':').next().unwrap_or(""), "refund_pending|"),
                None => (member.as_str(), "pending|"),
            };
            let Ok(seq) = seq.parse::<u64>() else {
                suspects.push((member.clone(), 0, wants));
                continue;
            };
            suspects.push((member.clone(), seq, wants));
        }
        let seqs: Vec<u64> = suspects.iter().map(|s| s.1).collect();
        let orders = cx.engine.packed_orders(cx.sale, &seqs).await?;
        let stale: Vec<(String, u64)> = suspects
            .into_iter()
            .zip(orders)
            .filter(|((_, _, wants), o)| !o.as_deref().is_some_and(|o| o.starts_with(wants)))
            .map(|((m, s, _), _)| (m, s))
            .collect();
        let members: Vec<String> = stale.iter().map(|s| s.0.clone()).collect();
        let still_there = cx.engine.due_scores(cx.sale, &members).await?;
        for ((member, seq), score) in stale.into_iter().zip(still_there) {
            if score.is_some() {
                cx.find(
                    FindingKind::StaleDueEntry,
                    format!("due-queue entry {member:?} has no order waiting on it"),
                )
                .order_if((seq > 0).then_some(seq))
                .redis(json!({"member": member}))
                .entry(member)
                .push();
            }
        }
        cursor = next;
        if cursor == 0 {
            return Ok(());
        }
    }
}

async fn check_dead_refunds(cx: &mut Ctx<'_>, now_ms: i64) -> anyhow::Result<()> {
    for (seq, entry) in cx.engine.dead_refunds(cx.sale).await? {
        let requested: i64 = entry
            .split('|')
            .next()
            .and_then(|r| r.parse().ok())
            .unwrap_or(0);
        let age = Duration::from_millis((now_ms - requested).max(0) as u64);
        cx.find(
            FindingKind::RefundDeadLettered,
            format!(
                "refund asked for {}s ago never settled and was dead-lettered",
                age.as_secs()
            ),
        )
        .order(seq)
        .redis(json!({"entry": entry}))
        .push();
    }
    Ok(())
}

/// Flow records the reconciler refused: never repaired automatically, since
/// which side is right is a person's call. (Retired sales too.)
pub(in crate::audit) async fn check_quarantined(cx: &mut Ctx<'_>) -> anyhow::Result<()> {
    for q in crate::db::quarantine::list(cx.db, cx.sale).await? {
        cx.find(
            FindingKind::QuarantinedRecord,
            format!(
                "flow record {} ({}) was quarantined, not applied: {}",
                q.flow_id, q.event, q.reason
            ),
        )
        .order_if(q.seq)
        .mysql(json!(q))
        .push();
    }
    Ok(())
}

/// Downstream events of the sale, in MySQL alone: every paid order has its
/// `order.paid` outbox row and every refunded one its `order.refunded` row
/// (orders changed before the outbox's retention, less a margin of a tenth
/// of it and at least an hour, are left out: the purge may have taken
/// their rows); with a broker named, no event waits to be
/// published longer than the grace (without one, waiting events are
/// information: nothing publishes them).
pub(in crate::audit) async fn check_outbox(
    cx: &mut Ctx<'_>,
    opts: &crate::audit::AuditOptions,
) -> anyhow::Result<()> {
    // A margin inside the retention: the purge runs by MySQL's clock (and
    // may run with another retention than this audit was given), the
    // order's times are Redis's; an order near the edge is left out rather
    // than reported for a row the purge took.
    let retention = opts.events.retention;
    let margin = (retention / 10).max(std::time::Duration::from_secs(3600));
    let window = retention.saturating_sub(margin);
    let since =
        chrono::Utc::now() - chrono::Duration::from_std(window).unwrap_or(chrono::TimeDelta::MAX);
    let missing = q::orders_missing_events(cx.db, cx.sale, since, PAGE).await?;
    for m in &missing {
        cx.find(
            FindingKind::OutboxMissing,
            format!(
                "order seq {} is {} in MySQL but the outbox has no {} event for it",
                m.seq, m.status, m.event_type
            ),
        )
        .order(m.seq)
        .mysql(json!({"status": m.status, "missing": m.event_type}))
        .push();
    }
    if missing.len() as u64 >= PAGE {
        cx.skip("outbox rows of further orders: the first page already has findings");
    }
    let grace = chrono::Duration::from_std(opts.grace).unwrap_or(chrono::TimeDelta::MAX);
    let (waiting, late) = q::unsent_events(cx.db, cx.sale, chrono::Utc::now() - grace).await?;
    if !opts.events.broker {
        if waiting > 0 {
            cx.report.information.push(format!(
                "{waiting} events wait in the outbox: no broker is named (FLASHSALE_AMQP_URL), so the relay does not run"
            ));
        }
    } else if late > 0 {
        cx.find(
            FindingKind::OutboxBehind,
            format!(
                "{late} events wait for the broker longer than {} s: is the relay running, does RabbitMQ answer?",
                opts.grace.as_secs()
            ),
        )
        .mysql(json!({"unsent": waiting, "past_grace": late}))
        .push();
    }
    Ok(())
}
