//! The audit's two outputs: a human report (one line per finding, then a
//! summary per sale) and one JSON document for machines.

use std::io::Write;

use super::{Finding, Report};

fn line(f: &Finding, plan: bool) -> String {
    let order = f
        .order_id
        .as_deref()
        .map(|o| format!(" order {o}"))
        .unwrap_or_default();
    let mut s = format!("sale {}{order}: [{}] {}", f.sale_id, f.kind, f.message);
    if plan {
        match (&f.fix, &f.truth) {
            (Some(fix), Some(truth)) => {
                s.push_str(&format!(
                    "\n    fix: {}\n    truth: {}",
                    fix.describe(),
                    truth.why()
                ));
            }
            _ => s.push_str("\n    fix: none automatic; a person must look"),
        }
    }
    s
}

fn equation(c: &crate::units::Units) -> String {
    format!(
        "total {} = available {} + pending {} + paid {} + refunded {} - restocked {}",
        c.total, c.available, c.pending, c.paid, c.refunded, c.restocked
    )
}

fn verdict(findings: usize) -> String {
    match findings {
        0 => "clean".to_owned(),
        1 => "1 finding".to_owned(),
        n => format!("{n} findings"),
    }
}

/// Writes the human report; with `plan`, each finding's repair and truth.
pub fn print_human(report: &Report, plan: bool, out: &mut impl Write) -> std::io::Result<()> {
    for f in report.findings() {
        writeln!(out, "{}", line(f, plan))?;
    }
    for s in &report.sales {
        if s.retired {
            let counters = s
                .mysql_plus_backlog
                .as_ref()
                .map_or("none".into(), equation);
            writeln!(
                out,
                "sale {}: retired; {} orders checked; MySQL {}; {}",
                s.sale_id,
                s.orders_checked,
                counters,
                verdict(s.findings.len())
            )?;
            continue;
        }
        let counters = s.redis.as_ref().map_or("none".into(), equation);
        writeln!(
            out,
            "sale {}: {} orders checked; Redis {}; flow backlog {} (oldest {} ms); {}",
            s.sale_id,
            s.orders_checked,
            counters,
            s.backlog,
            s.oldest_backlog_ms,
            verdict(s.findings.len())
        )?;
        for skipped in &s.skipped {
            writeln!(out, "  skipped: {skipped}")?;
        }
        for info in &s.information {
            writeln!(out, "  information: {info}")?;
        }
    }
    let n = report.findings().count();
    if n == 0 {
        writeln!(out, "audit: clean ({} sales)", report.sales.len())
    } else {
        writeln!(out, "audit: {n} findings in {} sales", report.sales.len())
    }
}

/// The report as one JSON document.
pub fn to_json(report: &Report) -> serde_json::Value {
    let findings = report.findings().count();
    serde_json::json!({
        "clean": findings == 0,
        "findings": findings,
        "sales": report.sales,
    })
}
