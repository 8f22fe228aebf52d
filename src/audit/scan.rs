//! The audit of one live sale, in three phases:
//!
//! 1. [`moment`]: the counters, in one consistent moment (Redis's counters
//!    and MySQL's inventory plus the flow backlog, at one point of the
//!    sale's flow stream); a sale missing on one side, fenced or behind
//!    MySQL stops here.
//! 2. [`orders`]: order by order, in pages, settled orders field by field.
//! 3. [`still`]: what needs a still sale (skipped, and said so, when it
//!    moved), then the due-queue, refunds, quarantined records and the
//!    backlog's age.
//!
//! Each check writes its findings with [`Ctx::find`].

mod moment;
mod orders;
pub(super) mod still;

use serde_json::json;
use sqlx::MySqlPool;

use super::{AuditOptions, FindingKind, NewFinding, SaleReport};
use crate::domain::SaleId;
use crate::engine::{Engine, Order};

/// Orders (and buyers) compared per page.
const PAGE: u64 = 1000;

/// One sale's audit as it goes: the stores, the sale and its report.
pub(super) struct Ctx<'a> {
    pub engine: &'a Engine,
    pub db: &'a MySqlPool,
    pub sale: SaleId,
    pub report: SaleReport,
}

impl<'a> Ctx<'a> {
    pub fn new(engine: &'a Engine, db: &'a MySqlPool, sale: SaleId) -> Self {
        Self {
            engine,
            db,
            sale,
            report: SaleReport {
                sale_id: sale.to_string(),
                ..SaleReport::default()
            },
        }
    }

    /// A finding of `kind` about this sale; `.push()` records it.
    pub fn find(&mut self, kind: FindingKind, message: impl Into<String>) -> NewFinding<'_> {
        NewFinding::new(&mut self.report.findings, self.sale, kind, message)
    }

    /// Notes a check left out, and why.
    pub fn skip(&mut self, why: &str) {
        self.report.skipped.push(why.to_owned());
    }
}

/// An order as findings show it.
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
    let mut cx = Ctx::new(engine, db, sale);
    let Some(at) = moment::read(&mut cx).await? else {
        return Ok(cx.report);
    };
    let sums = orders::scan(&mut cx, &at, opts).await?;
    still::check(&mut cx, &at, &sums, opts.grace).await?;
    still::check_outbox(&mut cx, opts).await?;
    Ok(cx.report)
}
