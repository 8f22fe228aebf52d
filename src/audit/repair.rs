//! Applying the audit's plan. Each repair is checked again at the moment it
//! is applied (Redis repairs are compare-and-set scripts; MySQL repairs run
//! under the sale's reconciler cursor lock), so a repair never overwrites a
//! change made after the audit looked: it is skipped and reported instead.
//! Every applied repair is written to `repair_log`.

use sqlx::MySqlPool;

use super::{Finding, FindingKind, Fix, Report};
use crate::db::{audit as q, ledger};
use crate::domain::{OrderId, SaleId};
use crate::engine::{Engine, FlowId, Order, Repair, Repaired};
use crate::units::Units;

/// What happened to one planned repair.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Applied {
    /// The finding's kind.
    pub finding: FindingKind,
    /// The sale.
    pub sale_id: String,
    /// The repair.
    pub fix: Fix,
    /// Whether it changed something (false: the state had moved on, or
    /// there was nothing left to change).
    pub applied: bool,
}

impl Fix {
    /// The repair in words.
    pub fn describe(&self) -> String {
        match self {
            Fix::WriteOrderToMysql { seq, mark_settled } => format!(
                "write order seq {seq} to MySQL as Redis holds it and recompute the MySQL inventory{}",
                if *mark_settled { "; mark it settled in Redis" } else { "" }
            ),
            Fix::RecomputeMysqlInventory => "recompute the MySQL inventory from the MySQL orders".into(),
            Fix::RestoreOrderInRedis { seq } => format!("put order seq {seq} back into Redis as MySQL holds it"),
            Fix::RecomputeRedisCounters => "set Redis's counters to what Redis's orders add up to".into(),
            Fix::SetBuyerUnits { user, units } => format!("set buyer {user}'s units in Redis to {units}"),
            Fix::DropDueEntry { member } => format!("remove due-queue entry {member:?}"),
            Fix::AddDeadline { seq } => format!("add order seq {seq}'s payment deadline to the due-queue"),
            Fix::RunExpiry => "run the expiry for this sale now".into(),
            Fix::RequeueRefund { seq } => format!("put order seq {seq}'s refund back on the retry queue"),
            Fix::LoadSale => "fence the sale and rebuild it from MySQL".into(),
            Fix::WriteOutbox { seq } => format!("write the outbox rows order seq {seq} owes for its state in MySQL"),
        }
    }

    /// Order of application: Redis's orders first (they are the truth the
    /// later repairs recompute from), then what is derived from them.
    fn rank(&self) -> u8 {
        match self {
            Fix::LoadSale => 0,
            Fix::RestoreOrderInRedis { .. } => 1,
            Fix::WriteOrderToMysql { .. } => 2,
            Fix::RecomputeMysqlInventory => 3,
            Fix::RecomputeRedisCounters => 4,
            Fix::SetBuyerUnits { .. } => 5,
            Fix::DropDueEntry { .. } | Fix::AddDeadline { .. } => 6,
            Fix::RequeueRefund { .. } => 7,
            Fix::RunExpiry => 8,
            Fix::WriteOutbox { .. } => 9,
        }
    }
}

/// Applies every repair the report proposes, once each, in a safe order.
pub async fn apply(
    engine: &Engine,
    db: &MySqlPool,
    report: &Report,
) -> anyhow::Result<Vec<Applied>> {
    let mut plan: Vec<(&Finding, &Fix, &str)> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for s in &report.sales {
        for f in &s.findings {
            if let Some(fix) = &f.fix {
                if seen.insert((f.sale_id.as_str(), format!("{fix:?}"))) {
                    plan.push((f, fix, &s.last_flow));
                }
            }
        }
    }
    plan.sort_by_key(|(f, fix, _)| (f.sale_id.clone(), fix.rank()));
    let mut out = Vec::new();
    for (finding, fix, last_flow) in plan {
        let sale: SaleId = finding.sale_id.parse()?;
        let applied = apply_one(engine, db, sale, fix, last_flow).await?;
        if applied {
            let mut tx = db.begin().await?;
            let seq = finding
                .order_id
                .as_deref()
                .and_then(|o| o.parse::<OrderId>().ok())
                .map(|o| o.seq());
            let truth = finding.truth.map_or("neither", |t| t.as_str());
            q::log_repair(
                &mut tx,
                sale,
                seq,
                finding.kind.as_str(),
                &fix.describe(),
                truth,
                &finding.message,
            )
            .await?;
            tx.commit().await?;
        }
        out.push(Applied {
            finding: finding.kind,
            sale_id: finding.sale_id.clone(),
            fix: fix.clone(),
            applied,
        });
    }
    Ok(out)
}

async fn apply_one(
    engine: &Engine,
    db: &MySqlPool,
    sale: SaleId,
    fix: &Fix,
    last_flow: &str,
) -> anyhow::Result<bool> {
    let cas = |repair: Repair| async move {
        Ok::<_, anyhow::Error>(engine.repair(sale, &repair).await? == Repaired::Applied)
    };
    Ok(match fix {
        Fix::WriteOutbox { seq } => {
            let mut tx = db.begin().await?;
            crate::db::outbox::write_order_history(&mut tx, OrderId::new(sale, *seq)).await?;
            tx.commit().await?;
            true
        }
        Fix::WriteOrderToMysql { seq, mark_settled } => {
            ledger::ensure_cursor(db, sale).await?;
            let mut tx = db.begin().await?;
            let cursor = q::lock_cursor(&mut tx, sale).await?;
            let Some(order) = engine.order(OrderId::new(sale, *seq)).await? else {
                return Ok(false);
            };
            // Safe only when no record of this order can still reach MySQL:
            // it is settled, or (a lost record) none of its records waits.
            let settled = order.last_flow.parse::<FlowId>().is_ok_and(|l| l <= cursor);
            let safe =
                settled || (*mark_settled && !backlog_has(engine, sale, cursor, *seq).await?);
            if !safe {
                return Ok(false);
            }
            q::force_order(&mut tx, &order).await?;
            q::recompute_inventory(&mut tx, sale).await?;
            tx.commit().await?;
            if *mark_settled {
                return cas(Repair::MarkSettled {
                    seq: *seq,
                    seen: order.pack(),
                    last_flow: cursor,
                })
                .await;
            }
            true
        }
        Fix::RecomputeMysqlInventory => {
            ledger::ensure_cursor(db, sale).await?;
            let mut tx = db.begin().await?;
            q::lock_cursor(&mut tx, sale).await?;
            q::recompute_inventory(&mut tx, sale).await?;
            tx.commit().await?;
            true
        }
        Fix::RestoreOrderInRedis { seq } => {
            let rows = q::orders_in(db, sale, *seq, *seq).await?;
            let Some(mut order) = rows.get(seq).cloned() else {
                return Ok(false);
            };
            ledger::ensure_cursor(db, sale).await?;
            let cursor = q::cursor(db, sale)
                .await?
                .ok_or_else(|| anyhow::anyhow!("sale {sale} has no reconciler cursor"))?;
            // Settled: MySQL holds all of it.
            order.last_flow = cursor.to_string();
            cas(Repair::RestoreOrder {
                seq: *seq,
                packed: order.pack(),
            })
            .await?
        }
        Fix::RecomputeRedisCounters => recompute_redis_counters(engine, sale).await?,
        Fix::SetBuyerUnits { user, units } => {
            cas(Repair::BuyerUnits {
                seen_flow: last_flow.to_owned(),
                user: *user,
                units: *units,
            })
            .await?
        }
        Fix::DropDueEntry { member } => {
            cas(Repair::DropDueEntry {
                member: member.clone(),
            })
            .await?
        }
        Fix::AddDeadline { seq } => cas(Repair::AddDeadline { seq: *seq }).await?,
        Fix::RequeueRefund { seq } => cas(Repair::RequeueRefund { seq: *seq }).await?,
        Fix::RunExpiry => {
            let mut closed = 0;
            loop {
                let b = engine.expire(sale, 500).await?;
                closed += b.closed;
                if b.still_due == 0 {
                    break;
                }
            }
            closed > 0
        }
        Fix::LoadSale => {
            crate::sales::load_missing(db, engine, Some(sale)).await?;
            crate::workers::guard::rebuild_now(engine, db, sale)
                .await?
                .is_some()
        }
    })
}

/// Whether a flow record of order `seq` waits after `cursor`.
async fn backlog_has(
    engine: &Engine,
    sale: SaleId,
    cursor: FlowId,
    seq: u64,
) -> anyhow::Result<bool> {
    let mut after = cursor;
    loop {
        let page = engine.read_flow(sale, after, 1000).await?;
        if page.iter().any(|r| r.order.id.seq() == seq) {
            return Ok(true);
        }
        match page.last() {
            Some(r) if page.len() == 1000 => after = r.id,
            _ => return Ok(false),
        }
    }
}

/// Sums Redis's orders (paged) and sets the counters, unless the sale moved
/// while summing.
async fn recompute_redis_counters(engine: &Engine, sale: SaleId) -> anyhow::Result<bool> {
    let Some(before) = engine.audit_snapshot(sale).await? else {
        return Ok(false);
    };
    let end_ms = before.num("end_ms");
    let mut sums = Units::opening(before.units().total);
    let max_seq = before.num("seq").max(0) as u64;
    let mut from = 1;
    while from <= max_seq {
        let to = (from + 999).min(max_seq);
        let seqs: Vec<u64> = (from..=to).collect();
        for (seq, p) in seqs.iter().zip(engine.packed_orders(sale, &seqs).await?) {
            if let Some(o) = p.and_then(|p| Order::unpack(OrderId::new(sale, *seq), &p)) {
                sums.count_order(&o, end_ms);
            }
        }
        from = to + 1;
    }
    let repair = Repair::Counters {
        seen_flow: before.last_flow.clone(),
        units: sums,
    };
    Ok(engine.repair(sale, &repair).await? == Repaired::Applied)
}
