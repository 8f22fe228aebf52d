//! The audit of a retired sale. MySQL is its record and the only side
//! compared: its inventory against its orders, and no order left pending
//! or waiting for a refund. Redis's copy, while its keys have not expired,
//! is not compared (refunds after retirement change MySQL alone); it is
//! only checked for what would be lost: a sale Redis holds as live, or
//! flow records that no reconciler will carry to MySQL any more. A retired
//! sale whose Redis keys expired is clean, never "missing in Redis".

use serde_json::json;
use sqlx::MySqlPool;

use super::scan::{still::check_quarantined, Ctx};
use super::{FindingKind, SaleReport, Truth};
use crate::db::audit as q;
use crate::domain::SaleId;
use crate::engine::Engine;
use crate::units::Units;

/// The counters as this finding's message has always written them (the
/// form of Rust's `Debug` of the former `Counters` struct).
fn listed(u: &Units) -> String {
    let fields: Vec<String> = u.fields().map(|(n, v)| format!("{n}: {v}")).collect();
    format!("Counters {{ {} }}", fields.join(", "))
}

/// Audits a sale that MySQL holds as retired.
pub(super) async fn audit_retired(
    engine: &Engine,
    db: &MySqlPool,
    sale: SaleId,
    opts: &super::AuditOptions,
) -> anyhow::Result<SaleReport> {
    let mut cx = Ctx::new(engine, db, sale);
    cx.report.retired = true;
    // One transaction: a refund applied meanwhile moves an order and the
    // inventory together, so the two reads agree.
    let mut tx = db.begin().await?;
    let (inv, _) = crate::db::inventory::read(&mut tx, sale)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no sale {sale} in MySQL"))?;
    let sums = q::order_sums(&mut tx, sale, inv.total).await?;
    let statuses = q::orders_by_status(&mut tx, sale).await?;
    tx.rollback().await?;
    cx.report.mysql_plus_backlog = Some(inv);
    cx.report.orders_checked = statuses.iter().map(|s| s.1.max(0) as u64).sum();
    if inv != sums {
        cx.find(
            FindingKind::MysqlInventory,
            format!(
                "MySQL inventory {} does not add up to its orders {}",
                listed(&inv),
                listed(&sums)
            ),
        )
        .mysql(json!({"inventory": inv, "orders": sums}))
        // MySQL is the retired sale's record.
        .truth(Some(Truth::Mysql))
        .push();
    }
    let waiting: Vec<String> = statuses
        .iter()
        .filter(|(s, n)| matches!(s.as_str(), "pending" | "refund_pending") && *n > 0)
        .map(|(s, n)| format!("{n} {s}"))
        .collect();
    if !waiting.is_empty() {
        cx.find(
            FindingKind::RetiredWithWork,
            format!(
                "the sale is retired but MySQL holds orders still waiting ({}); a person must look",
                waiting.join(", ")
            ),
        )
        .push();
    }
    // Records the reconciler refused stay a person's call after retirement.
    check_quarantined(&mut cx).await?;
    super::scan::still::check_outbox(&mut cx, opts).await?;
    match engine.audit_snapshot(sale).await? {
        None => {}
        Some(snap) if !snap.fields.contains_key("retired") => {
            cx.find(
                FindingKind::RetiredSaleLiveInRedis,
                "the sale is retired in MySQL but Redis holds it as live: changes made there would never reach MySQL; a person must look",
            )
            .push();
        }
        Some(snap) => {
            if snap.flow_len > 0 {
                cx.report.backlog = snap.flow_len;
                cx.find(
                    FindingKind::RetiredSaleBacklog,
                    format!(
                        "{} flow records of the retired sale wait in Redis; no reconciler carries them to MySQL any more; a person must look",
                        snap.flow_len
                    ),
                )
                .push();
            }
            cx.skip(
                "Redis against MySQL: the sale is retired, MySQL is its record (Redis's keys are expiring)",
            );
        }
    }
    Ok(cx.report)
}
