//! The audit: proves that Redis, the flow backlog and MySQL agree, sale by
//! sale, and plans (and, when told to, applies) the repair of what does not.
//!
//! It reads while the sale is live without false findings: the counters are
//! compared in one atomic step (MySQL's inventory at the reconciler's cursor,
//! held locked for that moment, plus the records still in the stream, against
//! Redis's counters read atomically), orders are compared only once settled,
//! and checks that need a still sale are skipped, and said so, when it moved.
//! Everything is paged, so memory stays bounded whatever the sale's size.
//! A retired sale is audited in MySQL alone (`retired.rs`).

mod repair;
mod report;
mod retired;
mod scan;

use std::time::Duration;

use sqlx::MySqlPool;

use crate::domain::SaleId;
use crate::engine::Engine;
pub use repair::apply;
pub use report::{print_human, to_json};

/// What to audit and how.
#[derive(Debug, Clone)]
pub struct AuditOptions {
    /// One sale, or every sale in either store.
    pub sale: Option<SaleId>,
    /// How far past its deadline a pending order may be, or a flow record
    /// may wait, before it is a finding.
    pub grace: Duration,
    /// Draw a progress bar on stderr (only drawn when it is a terminal).
    pub progress: bool,
}

/// Which side a repair takes as the truth.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Truth {
    /// Redis's orders (the hot path accepted every change there first).
    RedisOrders,
    /// MySQL (the only witness left of an order Redis lost).
    Mysql,
    /// Nothing to take sides on: the fix restarts stalled work.
    Neither,
}

/// A repair the audit proposes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Fix {
    /// Write the order to MySQL as Redis holds it, then recompute the
    /// sale's MySQL inventory from its orders.
    WriteOrderToMysql {
        /// The order's seq.
        seq: u64,
        /// Also mark the order settled in Redis (its flow record is lost).
        mark_settled: bool,
    },
    /// Recompute the sale's MySQL inventory from its MySQL orders.
    RecomputeMysqlInventory,
    /// Put the order back into Redis as MySQL holds it.
    RestoreOrderInRedis {
        /// The order's seq.
        seq: u64,
    },
    /// Set Redis's counters to what Redis's orders add up to.
    RecomputeRedisCounters,
    /// Set a buyer's units in Redis to what their orders hold.
    SetBuyerUnits {
        /// The buyer.
        user: u64,
        /// The units their orders hold.
        units: i64,
    },
    /// Remove a due-queue entry that nothing waits on.
    DropDueEntry {
        /// The entry.
        member: String,
    },
    /// Give a pending order its missing deadline entry back.
    AddDeadline {
        /// The order's seq.
        seq: u64,
    },
    /// Run the expiry for the sale now.
    RunExpiry,
    /// Put a dead-lettered refund back on the retry queue.
    RequeueRefund {
        /// The order's seq.
        seq: u64,
    },
    /// Fence the sale and rebuild it from MySQL (what Redis lost).
    LoadSale,
}

/// One thing that does not hold.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Finding {
    /// A stable name of the check.
    pub kind: &'static str,
    /// The sale.
    pub sale_id: String,
    /// The order, when the finding is about one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order_id: Option<String>,
    /// What is wrong, with the numbers on each side.
    pub message: String,
    /// Redis's side.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis: Option<serde_json::Value>,
    /// MySQL's side.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mysql: Option<serde_json::Value>,
    /// The proposed repair (none: a person must look).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<Fix>,
    /// Which side the repair takes as the truth.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub truth: Option<Truth>,
}

/// One sale's audit.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SaleReport {
    /// The sale.
    pub sale_id: String,
    /// Orders compared.
    pub orders_checked: u64,
    /// Flow records waiting for MySQL.
    pub backlog: u64,
    /// Age of the oldest of them, ms.
    pub oldest_backlog_ms: i64,
    /// Redis's counters.
    pub redis: Option<crate::db::audit::Counters>,
    /// MySQL's inventory plus the backlog's changes.
    pub mysql_plus_backlog: Option<crate::db::audit::Counters>,
    /// What does not hold.
    pub findings: Vec<Finding>,
    /// Checks left out, and why.
    pub skipped: Vec<String>,
    /// What the service has recorded and accounted for (orders lost with
    /// Redis and counted): information, not drift.
    pub information: Vec<String>,
    /// The sale is retired: MySQL alone was audited (its inventory is in
    /// `mysql_plus_backlog`).
    pub retired: bool,
    /// The flow stream's last id when the audit read the counters (repairs
    /// that depend on a still sale check it has not moved).
    #[serde(skip)]
    pub last_flow: String,
}

/// The whole audit.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    /// Per sale.
    pub sales: Vec<SaleReport>,
}

impl Report {
    /// Every finding.
    pub fn findings(&self) -> impl Iterator<Item = &Finding> {
        self.sales.iter().flat_map(|s| s.findings.iter())
    }

    /// Whether every invariant holds.
    pub fn is_clean(&self) -> bool {
        self.findings().next().is_none()
    }
}

/// Audits the chosen sales.
pub async fn run(engine: &Engine, db: &MySqlPool, opts: &AuditOptions) -> anyhow::Result<Report> {
    let sales = match opts.sale {
        Some(s) => vec![s],
        None => {
            let mut ids: Vec<u64> = crate::db::audit::sale_ids(db).await?;
            ids.extend(engine.sale_ids().await?.into_iter().map(SaleId::get));
            ids.sort_unstable();
            ids.dedup();
            ids.into_iter()
                .filter_map(|i| SaleId::new(i).ok())
                .collect()
        }
    };
    let mut report = Report::default();
    for sale in sales {
        let one = if crate::db::retired::is_retired(db, sale).await? {
            retired::audit_retired(engine, db, sale).await?
        } else {
            scan::audit_sale(engine, db, sale, opts).await?
        };
        report.sales.push(one);
    }
    Ok(report)
}
