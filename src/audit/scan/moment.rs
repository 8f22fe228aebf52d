//! Phase 1: the counters, in one consistent moment. The sale's reconciler
//! cursor is locked in MySQL (waiting for a running batch to end) while
//! Redis's counters and its flow stream's position are read atomically, and
//! MySQL's inventory and order sums in the same transaction; the changes of
//! the flow records between the cursor and that position are added to
//! MySQL's side. Live traffic cannot produce a false finding here: both
//! sides are read at one point of the sale's flow stream.

use serde_json::json;

use super::{Ctx, PAGE};
use crate::audit::{FindingKind, Fix};
use crate::db::{audit as q, ledger};
use crate::engine::{AuditSnapshot, FlowId};
use crate::units::Units;

/// What the moment read, for the phases after it.
pub(in crate::audit) struct Moment {
    /// Redis's sale hash and flow stream position.
    pub snap: AuditSnapshot,
    /// The reconciler's cursor at the moment.
    pub cursor: FlowId,
    /// The sale's end (a refund before it restocked).
    pub end_ms: i64,
    /// Redis's counters.
    pub redis: Units,
    /// Flow records waiting for MySQL at the moment.
    pub backlog: u64,
}

/// Reads the moment and checks the counters; `None` when the sale cannot be
/// compared further (missing on one side, fenced, behind MySQL): the
/// finding says why.
pub(super) async fn read(cx: &mut Ctx<'_>) -> anyhow::Result<Option<Moment>> {
    let (engine, db, sale) = (cx.engine, cx.db, cx.sale);
    // A missing sale (foreign key) makes this fail; the inventory read tells.
    let has_cursor = ledger::ensure_cursor(db, sale).await.is_ok();

    let mut tx = db.begin().await?;
    let cursor = if has_cursor {
        Some(q::lock_cursor(&mut tx, sale).await?)
    } else {
        None
    };
    let snap = engine.audit_snapshot(sale).await?;
    let inventory = crate::db::inventory::read(&mut tx, sale).await?;
    let (Some(cursor), Some((inv, end_ms))) = (cursor, inventory) else {
        tx.rollback().await?;
        let Some(s) = snap else {
            anyhow::bail!("no sale {sale} in Redis or MySQL");
        };
        cx.report.redis = Some(s.units());
        cx.find(
            FindingKind::SaleMissingInMysql,
            "Redis holds a sale that MySQL does not; a person must look",
        )
        .push();
        return Ok(None);
    };
    let Some(snap) = snap else {
        tx.rollback().await?;
        cx.find(
            FindingKind::SaleMissingInRedis,
            "MySQL holds a sale that Redis does not",
        )
        .mysql(json!(inv))
        .push();
        return Ok(None);
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
    let terms = crate::db::sale_terms(&mut *tx, sale).await?;
    if let Some(terms) = &terms {
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
                FindingKind::SaleForeign,
                "Redis holds another database's keys under this sale's name; never adopted: a person must look (`flashsale sale discard-foreign`)".to_owned(),
            ),
            Some(reason) => (
                FindingKind::SaleFenced,
                format!("the sale is fenced ({reason}): Redis lost some of it; the reconciler rebuilds it from MySQL"),
            ),
            None => (
                FindingKind::RedisBehind,
                format!(
                    "Redis is behind MySQL (order counter {redis_seq} < {}, or flow position {} < {}); the guard fences and rebuilds it",
                    settled.max_seq, snap.last_flow, settled.cursor
                ),
            ),
        };
        cx.find(kind, message)
            .redis(json!({"fence": fence, "seq": redis_seq, "flow": snap.last_flow}))
            .mysql(json!({"max_seq": settled.max_seq, "cursor": settled.cursor.to_string()}))
            .push();
        cx.skip("per-order checks and repairs: the sale is fenced or behind MySQL");
        return Ok(None);
    }
    let mysql_sums = q::order_sums(&mut tx, sale, inv.total).await?;
    let mut pending_changes = ledger::Deltas::default();
    let mut backlog = 0u64;
    let mut oldest: Option<FlowId> = None;
    let mut after = cursor;
    while let Some(last) = last_flow {
        let page = engine.read_flow(sale, after, PAGE as usize).await?;
        let mut done = page.is_empty();
        for r in page.iter().filter(|r| r.id <= last) {
            pending_changes += Units::of_flow(r);
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
    let plus = inv + pending_changes;

    let redis = snap.units();
    cx.report.last_flow = snap.last_flow.clone();
    cx.report.redis = Some(redis);
    cx.report.mysql_plus_backlog = Some(plus);
    cx.report.backlog = backlog;
    cx.report.oldest_backlog_ms = oldest.map_or(0, |o| (snap.now_ms - o.ms as i64).max(0));
    check_counters(cx, &redis, &inv, &mysql_sums, &plus);
    if let Some(terms) = terms {
        check_controls(cx, controls_in(&snap.fields), terms).await?;
    }
    Ok(Some(Moment {
        snap,
        cursor,
        end_ms,
        redis,
        backlog,
    }))
}

/// A sale's controls as Redis holds them: paused, and its end.
fn controls_in(fields: &std::collections::HashMap<String, String>) -> (bool, Option<i64>) {
    (
        fields.get("paused").is_some_and(|p| p == "1"),
        fields.get("end_ms").and_then(|e| e.parse().ok()),
    )
}

/// An admin's pause or end in both stores (`sales::control` changes Redis,
/// then MySQL, under MySQL's row lock: a MySQL failure in between leaves
/// them apart until the control is sent again). A difference is read again
/// a moment later before it counts: a control in flight changes one store
/// before the other.
async fn check_controls(
    cx: &mut Ctx<'_>,
    mut redis: (bool, Option<i64>),
    mut terms: crate::engine::SaleTerms,
) -> anyhow::Result<()> {
    let same =
        |r: (bool, Option<i64>), t: &crate::engine::SaleTerms| r == (t.paused, Some(t.end_ms));
    if same(redis, &terms) {
        return Ok(());
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let (engine, db, sale) = (cx.engine, cx.db, cx.sale);
    let (Some(snap), Some(again)) = (
        engine.audit_snapshot(sale).await?,
        crate::db::sale_terms(db, sale).await?,
    ) else {
        return Ok(());
    };
    (redis, terms) = (controls_in(&snap.fields), again);
    if same(redis, &terms) {
        return Ok(());
    }
    cx.find(
        FindingKind::SaleControlMismatch,
        format!(
            "Redis and MySQL disagree on the sale's controls (paused {} vs {}, end {:?} vs {} ms): \
             send the control the sale should be under again (`flashsale sale pause|resume|end`)",
            redis.0, terms.paused, redis.1, terms.end_ms
        ),
    )
    .redis(json!({"paused": redis.0, "end_ms": redis.1}))
    .mysql(json!({"paused": terms.paused, "end_ms": terms.end_ms}))
    .push();
    Ok(())
}

fn check_counters(cx: &mut Ctx<'_>, redis: &Units, inv: &Units, mysql_sums: &Units, plus: &Units) {
    if redis.accounted() != redis.total {
        cx.find(
            FindingKind::RedisConservation,
            format!(
                "Redis: available {} + pending {} + paid {} + refunded {} - restocked {} = {}, not the total {}",
                redis.available, redis.pending, redis.paid, redis.refunded, redis.restocked,
                redis.accounted(), redis.total
            ),
        )
        .redis(json!(redis))
        .push();
    }
    if let Some((name, v)) = redis.fields().find(|(_, v)| *v < 0) {
        cx.find(
            FindingKind::NegativeStock,
            format!("Redis counter {name} is {v}"),
        )
        .redis(json!(redis))
        .push();
    }
    if inv != mysql_sums {
        cx.find(
            FindingKind::MysqlInventory,
            format!("MySQL inventory {inv} does not add up to its orders {mysql_sums}"),
        )
        .mysql(json!({"inventory": inv, "orders": mysql_sums}))
        .push();
    }
    let differ: Vec<String> = redis
        .fields()
        .zip(plus.fields())
        .filter(|(a, b)| a.1 != b.1)
        .map(|(a, b)| format!("{} redis={} mysql+backlog={}", a.0, a.1, b.1))
        .collect();
    if !differ.is_empty() {
        let f = cx
            .find(
                FindingKind::RecordDrift,
                format!(
                    "Redis's counters and MySQL's inventory plus the flow backlog differ: {}",
                    differ.join(", ")
                ),
            )
            .redis(json!(redis))
            .mysql(json!(plus));
        // MySQL that adds up to its own orders is not the side that drifted.
        if inv == mysql_sums {
            f.fix(Some(Fix::RecomputeRedisCounters)).push();
        } else {
            f.push();
        }
    }
}
