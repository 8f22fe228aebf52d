//! The checks of one sale, in the order the module doc describes.

use std::time::Duration;

use serde_json::json;
use sqlx::MySqlPool;

use super::{AuditOptions, Finding, Fix, SaleReport, Truth};
use crate::db::{audit as q, ledger};
use crate::domain::{OrderId, SaleId};
use crate::engine::{AuditSnapshot, Engine, FlowId, Order, OrderStatus};

/// Orders compared per page.
const PAGE: u64 = 1000;

struct Ctx<'a> {
    engine: &'a Engine,
    db: &'a MySqlPool,
    sale: SaleId,
    report: SaleReport,
}

impl Ctx<'_> {
    #[allow(clippy::too_many_arguments)]
    fn find(
        &mut self,
        kind: &'static str,
        seq: Option<u64>,
        message: String,
        redis: Option<serde_json::Value>,
        mysql: Option<serde_json::Value>,
        fix: Option<Fix>,
        truth: Option<Truth>,
    ) {
        self.report.findings.push(Finding {
            kind,
            sale_id: self.sale.to_string(),
            order_id: seq.map(|s| OrderId::new(self.sale, s).to_string()),
            message,
            redis,
            mysql,
            fix,
            truth,
        });
    }
}

fn redis_counters(s: &AuditSnapshot) -> q::Counters {
    q::Counters {
        total: s.num("total"),
        available: s.num("avail"),
        pending: s.num("pending"),
        paid: s.num("paid"),
        cancelled: s.num("cancelled"),
        closed: s.num("closed"),
        refunded: s.num("refunded"),
        restocked: s.num("restocked"),
    }
}

fn order_json(o: &Order) -> serde_json::Value {
    json!({"status": o.status.as_str(), "user_id": o.user.to_string(), "qty": o.qty,
           "amount_cents": o.amount_cents, "payment_id": o.payment_id})
}

/// Audits one sale.
pub(super) async fn audit_sale(
    engine: &Engine,
    db: &MySqlPool,
    sale: SaleId,
    opts: &AuditOptions,
) -> anyhow::Result<SaleReport> {
    let mut cx = Ctx {
        engine,
        db,
        sale,
        report: SaleReport {
            sale_id: sale.to_string(),
            ..SaleReport::default()
        },
    };
    // A missing sale (foreign key) makes this fail; the inventory read tells.
    let has_cursor = ledger::ensure_cursor(db, sale).await.is_ok();

    // 1. One consistent moment: the cursor locked, Redis read atomically,
    //    MySQL's inventory and order sums, and the records in between.
    let mut tx = db.begin().await?;
    let cursor = if has_cursor {
        Some(q::lock_cursor(&mut tx, sale).await?)
    } else {
        None
    };
    let snap = engine.audit_snapshot(sale).await?;
    let inventory = q::inventory(&mut tx, sale).await?;
    let (Some(cursor), Some((inv, end_ms))) = (cursor, inventory) else {
        tx.rollback().await?;
        let Some(s) = snap else {
            anyhow::bail!("no sale {sale} in Redis or MySQL");
        };
        cx.report.redis = Some(redis_counters(&s));
        cx.find(
            "sale_missing_in_mysql",
            None,
            "Redis holds a sale that MySQL does not; a person must look".into(),
            None,
            None,
            None,
            None,
        );
        return Ok(cx.report);
    };
    let Some(snap) = snap else {
        tx.rollback().await?;
        cx.find(
            "sale_missing_in_redis",
            None,
            "MySQL holds a sale that Redis does not".into(),
            None,
            Some(json!(inv)),
            Some(Fix::LoadSale),
            Some(Truth::Mysql),
        );
        return Ok(cx.report);
    };
    for (_, reason, n) in crate::db::rebuild::lost_counts(db, Some(sale)).await? {
        cx.report.information.push(match reason.as_str() {
            "id_reused" => format!(
                "{n} acknowledged order(s) lost: Redis gave their ids out again after going back in time (listed in lost_orders)"
            ),
            _ => format!(
                "{n} acknowledged order(s) lost with Redis before they reached MySQL (listed in lost_orders; their ids are never given out again)"
            ),
        });
    }
    // A fenced sale, or one whose Redis is behind MySQL, is the guard's to
    // rebuild: no per-order comparison and no repair meanwhile (a repair
    // would take a stale Redis for the truth).
    let settled = crate::db::rebuild::settled_point(&mut *tx, sale).await?;
    let redis_seq: u64 = snap
        .fields
        .get("seq")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let last_flow: Option<FlowId> = snap.last_flow.parse().ok();
    let mut fence = snap.fields.get("fence").cloned();
    if let Some(terms) = crate::db::sale_terms(&mut *tx, sale).await? {
        if snap.fields.get("db") != Some(&terms.token) {
            fence = Some("foreign".into());
        }
    }
    let behind = redis_seq < settled.max_seq
        || (settled.cursor != FlowId::default() && last_flow.is_none_or(|l| l < settled.cursor));
    if fence.is_some() || behind {
        tx.rollback().await?;
        let (kind, message) = match &fence {
            Some(reason) if reason == "foreign" => (
                "sale_foreign",
                "Redis holds another database's keys under this sale's name; never adopted: a person must look (`flashsale sale discard-foreign`)".to_owned(),
            ),
            Some(reason) => (
                "sale_fenced",
                format!("the sale is fenced ({reason}): Redis lost some of it; the reconciler rebuilds it from MySQL"),
            ),
            None => (
                "redis_behind",
                format!(
                    "Redis is behind MySQL (order counter {redis_seq} < {}, or flow position {} < {}); the guard fences and rebuilds it",
                    settled.max_seq, snap.last_flow, settled.cursor
                ),
            ),
        };
        cx.find(
            kind,
            None,
            message,
            Some(json!({"fence": fence, "seq": redis_seq, "flow": snap.last_flow})),
            Some(json!({"max_seq": settled.max_seq, "cursor": settled.cursor.to_string()})),
            None,
            None,
        );
        cx.report
            .skipped
            .push("per-order checks and repairs: the sale is fenced or behind MySQL".into());
        return Ok(cx.report);
    }
    let mysql_sums = q::order_sums(&mut tx, sale, inv.total).await?;
    let mut pending_changes = ledger::Deltas::default();
    let mut backlog = 0u64;
    let mut oldest: Option<FlowId> = None;
    let last: Option<FlowId> = snap.last_flow.parse().ok();
    let mut after = cursor;
    while let Some(last) = last {
        let page = engine.read_flow(sale, after, PAGE as usize).await?;
        let mut done = page.is_empty();
        for r in page.iter().filter(|r| r.id <= last) {
            pending_changes.add(ledger::Deltas::of(r));
            backlog += 1;
            oldest.get_or_insert(r.id);
        }
        if let Some(r) = page.last() {
            after = r.id;
            done |= r.id >= last;
        }
        if done {
            break;
        }
    }
    tx.rollback().await?;
    let plus = inv.plus(&pending_changes);

    let redis = redis_counters(&snap);
    cx.report.last_flow = snap.last_flow.clone();
    cx.report.redis = Some(redis);
    cx.report.mysql_plus_backlog = Some(plus);
    cx.report.backlog = backlog;
    cx.report.oldest_backlog_ms = oldest.map_or(0, |o| (snap.now_ms - o.ms as i64).max(0));
    let limit = snap.num("limit");
    check_counters(&mut cx, &redis, &inv, &mysql_sums, &plus);

    // 2. Order by order, MySQL read before Redis (see `compare_order`).
    // Orders MySQL holds beyond Redis's counter (a Redis that lost writes)
    // are scanned too.
    let mysql_max = q::max_seq(db, sale).await?;
    let redis_max = snap.num("seq").max(0) as u64;
    if mysql_max > redis_max {
        cx.find(
            "order_seq_behind",
            None,
            format!("Redis's order counter is {redis_max}, MySQL holds orders up to {mysql_max}: new orders would reuse ids"),
            Some(json!({"seq": redis_max})),
            Some(json!({"max_seq": mysql_max})),
            None,
            None,
        );
    }
    let max_seq = redis_max.max(mysql_max);
    let bar = progress(opts.progress, max_seq);
    let mut sums = q::Counters {
        total: redis.total,
        ..q::Counters::default()
    };
    sums.available = sums.total;
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
                        cx.find(
                            "order_unreadable",
                            Some(seq),
                            format!("Redis holds {p:?}"),
                            None,
                            None,
                            None,
                            None,
                        );
                        continue;
                    }
                },
                None => None,
            };
            if let Some(o) = &redis_order {
                sums.count_order(o, end_ms);
                if o.status == OrderStatus::Pending {
                    pending.push(seq.to_string());
                    if o.deadline_ms < snap.now_ms - grace_ms {
                        cx.find(
                            "overdue_pending",
                            Some(seq),
                            format!(
                                "pending {} ms past its deadline: expiry is behind",
                                snap.now_ms - o.deadline_ms
                            ),
                            Some(order_json(o)),
                            None,
                            Some(Fix::RunExpiry),
                            Some(Truth::Neither),
                        );
                    }
                }
            }
            compare_order(&mut cx, seq, redis_order.as_ref(), mysql.get(&seq), cursor).await?;
            cx.report.orders_checked += 1;
        }
        check_deadlines_exist(&mut cx, &pending).await?;
        bar.inc(to - from + 1);
        from = to + 1;
    }
    bar.finish_and_clear();

    // 3. Checks that need a still sale: skipped, and said so, when it moved.
    let after_snap = engine.audit_snapshot(sale).await?;
    let still = after_snap
        .as_ref()
        .is_some_and(|a| a.last_flow == snap.last_flow);
    if still {
        check_counters_against_orders(&mut cx, &redis, &sums);
    } else {
        cx.report
            .skipped
            .push("Redis counters against Redis orders: the sale changed during the audit".into());
    }
    // Buyers are compared with MySQL's orders, so only while those mirror
    // Redis's: a still sale, no backlog, and no order found to differ.
    let mirrored = !cx.report.findings.iter().any(|f| {
        matches!(
            f.kind,
            "order_mismatch"
                | "order_missing_in_mysql"
                | "order_missing_in_redis"
                | "flow_record_lost"
        )
    });
    let before_buyers = cx.report.findings.len();
    check_buyers(&mut cx, limit, still && backlog == 0 && mirrored).await?;
    let moved = engine
        .audit_snapshot(sale)
        .await?
        .is_none_or(|a| a.last_flow != snap.last_flow);
    if moved && cx.report.findings.len() > before_buyers {
        // A reserve or cancel between the reads: those differences are not findings.
        let kept: Vec<_> = cx
            .report
            .findings
            .drain(before_buyers..)
            .filter(|f| f.kind != "buyer_units")
            .collect();
        cx.report.findings.extend(kept);
        cx.report
            .skipped
            .push("buyers' units against their orders: the sale changed during the check".into());
    }
    check_due_queue(&mut cx).await?;
    check_dead_refunds(&mut cx, snap.now_ms).await?;
    check_quarantined(&mut cx).await?;
    if backlog > 0 && cx.report.oldest_backlog_ms > grace_ms {
        let age = cx.report.oldest_backlog_ms;
        cx.find(
            "backlog_stale",
            None,
            format!("{backlog} flow records wait for MySQL, the oldest for {age} ms: is the reconciler running?"),
            Some(json!({"backlog": backlog, "oldest_ms": age})),
            None,
            None,
            None,
        );
    }
    Ok(cx.report)
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

fn check_counters(
    cx: &mut Ctx<'_>,
    redis: &q::Counters,
    inv: &q::Counters,
    mysql_sums: &q::Counters,
    plus: &q::Counters,
) {
    if redis.accounted() != redis.total {
        cx.find(
            "redis_conservation",
            None,
            format!(
                "Redis: available {} + pending {} + paid {} + refunded {} - restocked {} = {}, not the total {}",
                redis.available, redis.pending, redis.paid, redis.refunded, redis.restocked,
                redis.accounted(), redis.total
            ),
            Some(json!(redis)),
            None,
            Some(Fix::RecomputeRedisCounters),
            Some(Truth::RedisOrders),
        );
    }
    if let Some((name, v)) = redis.fields().into_iter().find(|(_, v)| *v < 0) {
        cx.find(
            "negative_stock",
            None,
            format!("Redis counter {name} is {v}"),
            Some(json!(redis)),
            None,
            Some(Fix::RecomputeRedisCounters),
            Some(Truth::RedisOrders),
        );
    }
    if inv != mysql_sums {
        cx.find(
            "mysql_inventory",
            None,
            format!(
                "MySQL inventory {} does not add up to its orders {}",
                fmt(inv),
                fmt(mysql_sums)
            ),
            None,
            Some(json!({"inventory": inv, "orders": mysql_sums})),
            Some(Fix::RecomputeMysqlInventory),
            Some(Truth::RedisOrders),
        );
    }
    let differ: Vec<String> = redis
        .fields()
        .iter()
        .zip(plus.fields())
        .filter(|(a, b)| a.1 != b.1)
        .map(|(a, b)| format!("{} redis={} mysql+backlog={}", a.0, a.1, b.1))
        .collect();
    if !differ.is_empty() {
        cx.find(
            "record_drift",
            None,
            format!(
                "Redis's counters and MySQL's inventory plus the flow backlog differ: {}",
                differ.join(", ")
            ),
            Some(json!(redis)),
            Some(json!(plus)),
            // MySQL that adds up to its own orders is not the side that drifted.
            Some(if inv == mysql_sums {
                Fix::RecomputeRedisCounters
            } else {
                Fix::RecomputeMysqlInventory
            }),
            Some(Truth::RedisOrders),
        );
    }
}

fn fmt(c: &q::Counters) -> String {
    c.fields()
        .iter()
        .map(|(n, v)| format!("{n}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
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
                "paid_and_closed",
                Some(seq),
                format!(
                    "{side} holds the order both paid and closed ({}); a person must look",
                    o.status.as_str()
                ),
                Some(order_json(o)),
                None,
                None,
                None,
            );
        }
    }
    match (redis, mysql) {
        (None, None) => {}
        (None, Some(m)) => cx.find(
            "order_missing_in_redis",
            Some(seq),
            format!(
                "MySQL holds the order ({}), Redis does not",
                m.status.as_str()
            ),
            None,
            Some(order_json(m)),
            Some(Fix::RestoreOrderInRedis { seq }),
            Some(Truth::Mysql),
        ),
        (Some(r), m) => {
            let last: Option<FlowId> = r.last_flow.parse().ok();
            let settled = last.is_some_and(|l| l <= cursor);
            if !settled {
                let present = cx.engine.flow_record_exists(cx.sale, &r.last_flow).await?;
                if !present && !applied_since(cx, last).await? {
                    let (detail, fix, truth) = write_to_mysql(
                        format!(
                            "the order's last flow record {} is neither in the stream nor in MySQL",
                            r.last_flow
                        ),
                        m,
                        r,
                        true,
                    );
                    cx.find(
                        "flow_record_lost",
                        Some(seq),
                        detail,
                        Some(order_json(r)),
                        m.map(order_json),
                        fix,
                        truth,
                    );
                }
                return Ok(());
            }
            match m {
                None => cx.find(
                    "order_missing_in_mysql",
                    Some(seq),
                    format!(
                        "Redis holds a settled order ({}) that MySQL does not",
                        r.status.as_str()
                    ),
                    Some(order_json(r)),
                    None,
                    Some(Fix::WriteOrderToMysql {
                        seq,
                        mark_settled: false,
                    }),
                    Some(Truth::RedisOrders),
                ),
                Some(m) if order_json(m) != order_json(r) => {
                    let (detail, fix, truth) = write_to_mysql(
                        format!(
                            "status {}/{}, qty {}/{}, amount {}/{} (Redis/MySQL)",
                            r.status.as_str(),
                            m.status.as_str(),
                            r.qty,
                            m.qty,
                            r.amount_cents,
                            m.amount_cents
                        ),
                        Some(m),
                        r,
                        false,
                    );
                    cx.find(
                        "order_mismatch",
                        Some(seq),
                        detail,
                        Some(order_json(r)),
                        Some(order_json(m)),
                        fix,
                        truth,
                    )
                }
                Some(_) => {}
            }
        }
    }
    Ok(())
}

/// The repair that writes Redis's order `r` over MySQL's `m`, with the
/// finding's `detail`. Redis is the truth only while that moves the record
/// forward: a repair that would change the buyer, the units or a payment id
/// MySQL holds (Redis went back in time) is left to a person, and the
/// detail says what it would rewrite.
fn write_to_mysql(
    mut detail: String,
    m: Option<&Order>,
    r: &Order,
    mark_settled: bool,
) -> (String, Option<Fix>, Option<Truth>) {
    match m.and_then(|m| crate::db::forward::rewrite_refused(m, r)) {
        None => (
            detail,
            Some(Fix::WriteOrderToMysql {
                seq: r.id.seq(),
                mark_settled,
            }),
            Some(Truth::RedisOrders),
        ),
        Some(why) => {
            detail.push_str(&format!(
                "; not repaired automatically, Redis would rewrite the record ({why}): a person decides"
            ));
            (detail, None, None)
        }
    }
}

/// Whether the reconciler has applied `id` since the audit read its cursor.
async fn applied_since(cx: &Ctx<'_>, id: Option<FlowId>) -> anyhow::Result<bool> {
    let Some(id) = id else { return Ok(false) };
    let now: Option<(u64, u64)> =
        sqlx::query_as("SELECT last_ms, last_seq FROM reconcile_cursors WHERE sale_id = ?")
            .bind(cx.sale.get())
            .fetch_optional(cx.db)
            .await?;
    Ok(now.is_some_and(|(ms, seq)| id <= FlowId { ms, seq }))
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
                "deadline_missing",
                Some(seq),
                "the order is pending but has no payment deadline entry: it would never expire"
                    .into(),
                None,
                None,
                Some(Fix::AddDeadline { seq }),
                Some(Truth::RedisOrders),
            );
        }
    }
    Ok(())
}

fn check_counters_against_orders(cx: &mut Ctx<'_>, redis: &q::Counters, sums: &q::Counters) {
    if redis != sums {
        cx.find(
            "redis_counters",
            None,
            format!(
                "Redis counters {} differ from what its orders add up to {}",
                fmt(redis),
                fmt(sums)
            ),
            Some(json!({"counters": redis, "orders": sums})),
            None,
            Some(Fix::RecomputeRedisCounters),
            Some(Truth::RedisOrders),
        );
    }
}

async fn check_buyers(cx: &mut Ctx<'_>, limit: i64, still: bool) -> anyhow::Result<()> {
    if !still {
        cx.report
            .skipped
            .push("buyers' units against their orders: the sale changed, has a backlog, or MySQL's orders differ from Redis's".into());
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
            if units > limit || units < 0 {
                cx.find(
                    "buyer_over_limit",
                    None,
                    format!("buyer {user} holds {units} units; the limit is {limit}"),
                    Some(json!({"user_id": user.to_string(), "units": units})),
                    None,
                    still.then(|| Fix::SetBuyerUnits {
                        user,
                        units: held.get(&user).copied().unwrap_or(0),
                    }),
                    Some(Truth::RedisOrders),
                );
            } else if still {
                let expected = held.get(&user).copied().unwrap_or(0);
                if expected != units {
                    buyer_mismatch(cx, user, units, expected);
                }
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
        "buyer_units",
        None,
        format!("buyer {user}: Redis counts {units} units, their orders hold {expected}"),
        Some(json!({"user_id": user.to_string(), "units": units})),
        Some(json!({"user_id": user.to_string(), "units": expected})),
        Some(Fix::SetBuyerUnits {
            user,
            units: expected,
        }),
        Some(Truth::RedisOrders),
    );
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
                    "stale_due_entry",
                    (seq > 0).then_some(seq),
                    format!("due-queue entry {member:?} has no order waiting on it"),
                    Some(json!({"member": member})),
                    None,
                    Some(Fix::DropDueEntry { member }),
                    Some(Truth::RedisOrders),
                );
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
            "refund_dead_lettered",
            Some(seq),
            format!(
                "refund asked for {}s ago never settled and was dead-lettered",
                age.as_secs()
            ),
            Some(json!({"entry": entry})),
            None,
            Some(Fix::RequeueRefund { seq }),
            Some(Truth::Neither),
        );
    }
    Ok(())
}

/// Flow records the reconciler refused: never repaired automatically, since
/// which side is right is a person's call.
async fn check_quarantined(cx: &mut Ctx<'_>) -> anyhow::Result<()> {
    for q in crate::db::quarantine::list(cx.db, cx.sale).await? {
        cx.find(
            "quarantined_record",
            q.seq,
            format!(
                "flow record {} ({}) was quarantined, not applied: {}",
                q.flow_id, q.event, q.reason
            ),
            None,
            Some(json!(q)),
            None,
            None,
        );
    }
    Ok(())
}
