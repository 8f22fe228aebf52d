//! The audit's result as a Prometheus textfile, for node_exporter's textfile
//! collector (`flashsale audit --textfile PATH`), so that alerts see drift
//! and an audit that stopped running (deploy/prometheus/rules/alerts.yml).
//!
//! The file is replaced whole (written beside itself, then renamed), so the
//! collector never reads half of it. A run that could not finish still
//! writes it: `flashsale_audit_up 0`, with the last success and the last
//! completed run's findings carried over from the file it replaces.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;

use super::{FindingKind, Report};

const FINDINGS: &str = "flashsale_audit_findings";
const LAST_SUCCESS: &str = "flashsale_audit_last_success_timestamp_seconds";

/// The textfile's content: `report` is the finished run (`None`: the run
/// failed), `now` the run's time in Unix seconds, `previous` the content of
/// the file this one replaces (empty when there is none).
pub fn render(report: Option<&Report>, now: f64, previous: &str) -> String {
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
    };
    gauge(
        FINDINGS,
        "Findings of the last completed flashsale audit, by check",
    );
    gauge(
        "flashsale_audit_last_run_timestamp_seconds",
        "When flashsale audit last ran, finished or not",
    );
    gauge(LAST_SUCCESS, "When flashsale audit last completed");
    gauge(
        "flashsale_audit_up",
        "Whether the last flashsale audit completed (1) or could not run (0)",
    );
    let mut body = String::new();
    match report {
        Some(report) => {
            // Every check, found or not, so a cleared finding reads 0.
            for kind in FindingKind::ALL {
                let n = report.findings().filter(|f| f.kind == *kind).count();
                let _ = writeln!(body, "{FINDINGS}{{check=\"{kind}\"}} {n}");
            }
        }
        None => {
            for line in previous.lines() {
                if line.starts_with(&format!("{FINDINGS}{{")) {
                    body.push_str(line);
                    body.push('\n');
                }
            }
        }
    }
    let _ = writeln!(body, "flashsale_audit_last_run_timestamp_seconds {now:.3}");
    match (report, previous_success(previous)) {
        (Some(_), _) => {
            let _ = writeln!(body, "{LAST_SUCCESS} {now:.3}");
        }
        (None, Some(then)) => {
            let _ = writeln!(body, "{LAST_SUCCESS} {then}");
        }
        (None, None) => {}
    }
    let _ = writeln!(body, "flashsale_audit_up {}", u8::from(report.is_some()));
    // HELP and TYPE lines first, then the samples, as the format wants.
    out + &body
}

/// The last success recorded in a previous file, as written there.
fn previous_success(previous: &str) -> Option<&str> {
    previous.lines().find_map(|l| {
        l.strip_prefix(LAST_SUCCESS)?
            .strip_prefix(' ')
            .filter(|v| v.parse::<f64>().is_ok())
    })
}

/// Writes the textfile at `path` for this run: a temporary file beside it
/// (a name the collector ignores, it reads `*.prom` only), then a rename.
pub fn write(path: &Path, report: Option<&Report>) -> std::io::Result<()> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let previous = std::fs::read_to_string(path).unwrap_or_default();
    let content = render(report, now, &previous);
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("the textfile path names no file"))?;
    let tmp = path.with_file_name(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(content.as_bytes())?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{Finding, SaleReport};

    fn finding(kind: FindingKind) -> Finding {
        Finding {
            kind,
            sale_id: "1".into(),
            order_id: None,
            message: "m".into(),
            redis: None,
            mysql: None,
            fix: None,
            truth: None,
        }
    }

    fn sample<'a>(text: &'a str, series: &str) -> Option<&'a str> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
    }

    #[test]
    fn a_finished_run_counts_every_check_and_records_its_success() {
        let report = Report {
            sales: vec![SaleReport {
                findings: vec![
                    finding(FindingKind::RecordDrift),
                    finding(FindingKind::RecordDrift),
                    finding(FindingKind::OverduePending),
                ],
                ..SaleReport::default()
            }],
        };
        let text = render(Some(&report), 1700000000.5, "");
        let drift = "flashsale_audit_findings{check=\"record_drift\"}";
        assert_eq!(sample(&text, drift), Some("2"));
        let overdue = "flashsale_audit_findings{check=\"overdue_pending\"}";
        assert_eq!(sample(&text, overdue), Some("1"));
        let clean = "flashsale_audit_findings{check=\"negative_stock\"}";
        assert_eq!(sample(&text, clean), Some("0"));
        let checks = text.lines().filter(|l| l.starts_with(FINDINGS)).count();
        assert_eq!(checks, FindingKind::ALL.len());
        assert_eq!(sample(&text, LAST_SUCCESS), Some("1700000000.500"));
        assert_eq!(
            sample(&text, "flashsale_audit_last_run_timestamp_seconds"),
            Some("1700000000.500")
        );
        assert_eq!(sample(&text, "flashsale_audit_up"), Some("1"));
        // The format: every HELP and TYPE before the first sample.
        let first_sample = text.lines().position(|l| !l.starts_with('#')).unwrap();
        assert!(text.lines().skip(first_sample).all(|l| !l.starts_with('#')));
    }

    #[test]
    fn a_failed_run_keeps_the_last_success_and_findings() {
        let report = Report {
            sales: vec![SaleReport {
                findings: vec![finding(FindingKind::BuyerUnits)],
                ..SaleReport::default()
            }],
        };
        let before = render(Some(&report), 100.0, "");
        let text = render(None, 200.0, &before);
        assert_eq!(sample(&text, "flashsale_audit_up"), Some("0"));
        assert_eq!(sample(&text, LAST_SUCCESS), Some("100.000"));
        assert_eq!(
            sample(&text, "flashsale_audit_last_run_timestamp_seconds"),
            Some("200.000")
        );
        let units = "flashsale_audit_findings{check=\"buyer_units\"}";
        assert_eq!(sample(&text, units), Some("1"));
        // Failing again keeps them still.
        let again = render(None, 300.0, &text);
        assert_eq!(sample(&again, LAST_SUCCESS), Some("100.000"));
        assert_eq!(sample(&again, units), Some("1"));
    }

    #[test]
    fn a_first_run_that_fails_has_no_success_to_report() {
        let text = render(None, 200.0, "");
        assert_eq!(sample(&text, "flashsale_audit_up"), Some("0"));
        assert_eq!(sample(&text, LAST_SUCCESS), None);
        assert!(!text.lines().any(|l| l.starts_with(FINDINGS)));
    }

    #[test]
    fn the_file_is_replaced_whole() {
        let dir = std::env::temp_dir().join(format!(
            "flashsale-textfile-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("flashsale_audit.prom");
        write(&path, Some(&Report::default())).unwrap();
        write(&path, None).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(sample(&text, "flashsale_audit_up"), Some("0"));
        assert!(sample(&text, LAST_SUCCESS).is_some());
        // Nothing left beside it.
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            names,
            vec![std::ffi::OsString::from("flashsale_audit.prom")]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
