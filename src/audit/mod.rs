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
//!
//! Where things are: `finding.rs` (the kinds of finding, each with its
//! default repair and the side it takes as the truth, and the builder the
//! checks write findings with), `scan.rs` (a live sale's audit in its three
//! phases: `scan/moment.rs` the counters at one moment, `scan/orders.rs`
//! the order scan, `scan/still.rs` the checks that need a still sale and
//! the queues), `retired.rs`, `repair.rs` (the plan and how each repair is
//! applied; the Redis repairs are [`crate::engine::Repair`]), `report.rs`
//! and `textfile.rs` (the result for Prometheus). Its SQL is in
//! `crate::db::audit` and `crate::db::inventory`; the stock counters are
//! [`crate::units::Units`].

mod finding;
mod repair;
mod report;
mod retired;
mod scan;
pub mod textfile;

use std::time::Duration;

use sqlx::MySqlPool;

use crate::domain::SaleId;
use crate::engine::Engine;
use crate::units::Units;
pub use finding::{About, Finding, FindingKind, Fix, NewFinding, Truth};
pub use repair::{apply, Applied};
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
    /// How the outbox is checked.
    pub events: EventsAudit,
}

/// What the audit needs to know of downstream events.
#[derive(Debug, Clone, Copy)]
pub struct EventsAudit {
    /// How long sent outbox rows are kept (`FLASHSALE_OUTBOX_RETENTION_SECS`):
    /// orders changed longer ago may have lost their rows to the purge.
    pub retention: Duration,
    /// Whether a broker is named (`FLASHSALE_AMQP_URL`): only then is an
    /// event still unsent past the grace a finding.
    pub broker: bool,
}

impl Default for EventsAudit {
    fn default() -> Self {
        Self {
            retention: Duration::from_secs(7 * 86_400),
            broker: false,
        }
    }
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
    pub redis: Option<Units>,
    /// MySQL's inventory plus the backlog's changes.
    pub mysql_plus_backlog: Option<Units>,
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
            retired::audit_retired(engine, db, sale, opts).await?
        } else {
            scan::audit_sale(engine, db, sale, opts).await?
        };
        report.sales.push(one);
    }
    Ok(report)
}
