//! The audit of a retired sale. MySQL is its record and the only side
//! compared: its inventory against its orders, and no order left pending
//! or waiting for a refund. Redis's copy, while its keys have not expired,
//! is not compared (refunds after retirement change MySQL alone); it is
//! only checked for what would be lost: a sale Redis holds as live, or
//! flow records that no reconciler will carry to MySQL any more. A retired
//! sale whose Redis keys expired is clean, never "missing in Redis".

use serde_json::json;
use sqlx::MySqlPool;

use super::{Finding, Fix, SaleReport, Truth};
use crate::db::audit as q;
use crate::domain::SaleId;
use crate::engine::Engine;

fn finding(
    sale: SaleId,
    kind: &'static str,
    message: String,
    fix: Option<(Fix, Truth)>,
) -> Finding {
    Finding {
        kind,
        sale_id: sale.to_string(),
        order_id: None,
        message,
        redis: None,
        mysql: None,
        truth: fix.as_ref().map(|f| f.1),
        fix: fix.map(|f| f.0),
    }
}

/// Audits a sale that MySQL holds as retired.
pub(super) async fn audit_retired(
    engine: &Engine,
    db: &MySqlPool,
    sale: SaleId,
) -> anyhow::Result<SaleReport> {
    let mut report = SaleReport {
        sale_id: sale.to_string(),
        retired: true,
        ..SaleReport::default()
    };
    // One transaction: a refund applied meanwhile moves an order and the
    // inventory together, so the two reads agree.
    let mut tx = db.begin().await?;
    let (inv, _) = q::inventory(&mut tx, sale)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no sale {sale} in MySQL"))?;
    let sums = q::order_sums(&mut tx, sale, inv.total).await?;
    let statuses = q::orders_by_status(&mut tx, sale).await?;
    tx.rollback().await?;
    report.mysql_plus_backlog = Some(inv);
    report.orders_checked = statuses.iter().map(|s| s.1.max(0) as u64).sum();
    if inv != sums {
        let mut f = finding(
            sale,
            "mysql_inventory",
            format!("MySQL inventory {inv:?} does not add up to its orders {sums:?}"),
            Some((Fix::RecomputeMysqlInventory, Truth::Mysql)),
        );
        f.mysql = Some(json!({"inventory": inv, "orders": sums}));
        report.findings.push(f);
    }
    let waiting: Vec<String> = statuses
        .iter()
        .filter(|(s, n)| matches!(s.as_str(), "pending" | "refund_pending") && *n > 0)
        .map(|(s, n)| format!("{n} {s}"))
        .collect();
    if !waiting.is_empty() {
        report.findings.push(finding(
            sale,
            "retired_with_work",
            format!(
                "the sale is retired but MySQL holds orders still waiting ({}); a person must look",
                waiting.join(", ")
            ),
            None,
        ));
    }
    // Records the reconciler refused stay a person's call after retirement.
    for q in crate::db::quarantine::list(db, sale).await? {
        let mut f = finding(
            sale,
            "quarantined_record",
            format!(
                "flow record {} ({}) was quarantined, not applied: {}",
                q.flow_id, q.event, q.reason
            ),
            None,
        );
        f.order_id = q
            .seq
            .map(|s| crate::domain::OrderId::new(sale, s).to_string());
        f.mysql = Some(json!(q));
        report.findings.push(f);
    }
    match engine.audit_snapshot(sale).await? {
        None => {}
        Some(snap) if !snap.fields.contains_key("retired") => {
            report.findings.push(finding(
                sale,
                "retired_sale_live_in_redis",
                "the sale is retired in MySQL but Redis holds it as live: changes made there would never reach MySQL; a person must look".into(),
                None,
            ));
        }
        Some(snap) => {
            if snap.flow_len > 0 {
                report.backlog = snap.flow_len;
                report.findings.push(finding(
                    sale,
                    "retired_sale_backlog",
                    format!(
                        "{} flow records of the retired sale wait in Redis; no reconciler carries them to MySQL any more; a person must look",
                        snap.flow_len
                    ),
                    None,
                ));
            }
            report.skipped.push(
                "Redis against MySQL: the sale is retired, MySQL is its record (Redis's keys are expiring)"
                    .into(),
            );
        }
    }
    Ok(report)
}
