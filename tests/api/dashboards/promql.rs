//! Reading PromQL and the Prometheus text format, as far as the checks of
//! the dashboard and the rules need: the metric and label names a query
//! uses, and the names and labels a `/metrics` page exports.

use std::collections::{BTreeMap, BTreeSet};

use super::rules::Rules;

/// The series names a `/metrics` page (or a textfile) exports, from its
/// `# TYPE` lines: a counter `x` is `x_total`, a histogram `x` is
/// `x_bucket`, `x_sum` and `x_count`.
pub(super) fn exported_names(page: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in page.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut words = rest.split_whitespace();
        let (Some(name), Some(kind)) = (words.next(), words.next()) else {
            continue;
        };
        match kind {
            "counter" => {
                let base = name.strip_suffix("_total").unwrap_or(name);
                names.insert(format!("{base}_total"));
            }
            "histogram" | "gaugehistogram" => {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
            "summary" => {
                for suffix in ["", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
            _ => {
                names.insert(name.to_owned());
            }
        }
    }
    names
}

/// Metric names that `expr` (at `place`) uses and nothing exports, or
/// recording rules it uses that no rule file defines.
pub(super) fn unknown_names(
    place: &str,
    expr: &str,
    exported: &BTreeSet<String>,
    rules: &Rules,
) -> Vec<String> {
    let mut problems = Vec::new();
    for name in metric_names(expr) {
        if name.contains(':') {
            if !rules.recorded().contains(&name) {
                problems.push(format!(
                    "{place}: recording rule {name} is defined in no deploy/prometheus/rules/*.yml\n    {expr}"
                ));
            }
        } else if !exported.contains(&name) {
            problems.push(format!(
                "{place}: {name} is not exported by flashsale\n    {expr}"
            ));
        }
    }
    problems
}

/// A PromQL token, as far as the checks here need one.
#[derive(Debug, PartialEq)]
enum Token {
    /// A name, a keyword, a number or a duration.
    Word(String),
    /// A string literal (its text is never a metric or label name).
    Text,
    Punct(char),
}

/// The tokens of a PromQL expression, comments dropped.
fn tokens(expr: &str) -> Vec<Token> {
    let chars: Vec<char> = expr.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if matches!(c, '"' | '\'' | '`') {
            i += 1;
            while i < chars.len() && chars[i] != c {
                i += if chars[i] == '\\' && c != '`' { 2 } else { 1 };
            }
            i += 1;
            out.push(Token::Text);
        } else if c == '#' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || matches!(chars[i], '_' | ':'))
            {
                i += 1;
            }
            out.push(Token::Word(chars[start..i].iter().collect()));
        } else {
            if !c.is_whitespace() {
                out.push(Token::Punct(c));
            }
            i += 1;
        }
    }
    out
}

/// The `flashsale_*` metric and `flashsale:*` recording rule names in a
/// PromQL expression, outside string literals and comments.
fn metric_names(expr: &str) -> Vec<String> {
    tokens(expr)
        .into_iter()
        .filter_map(|t| match t {
            Token::Word(w) if w.starts_with("flashsale_") || w.starts_with("flashsale:") => Some(w),
            _ => None,
        })
        .collect()
}

/// The label names each series of a `/metrics` page carries, by series
/// name, plus the two Prometheus adds to every scraped series.
pub(super) fn sample_labels(page: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in page
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let end = line.find(['{', ' ']).unwrap_or(line.len());
        let labels = out.entry(line[..end].to_owned()).or_default();
        labels.extend(["instance".to_owned(), "job".to_owned()]);
        let Some(mut rest) = line[end..].strip_prefix('{') else {
            continue;
        };
        // name="value",... where a value may hold `,`, `}` and `\"`.
        while let Some((name, after)) = rest.split_once("=\"") {
            labels.insert(name.trim_start_matches(',').trim().to_owned());
            let mut escaped = false;
            let close = after.char_indices().find(|&(_, c)| {
                let end = c == '"' && !escaped;
                escaped = c == '\\' && !escaped;
                end
            });
            let Some((at, _)) = close else { break };
            rest = &after[at + 1..];
            if rest.starts_with('}') {
                break;
            }
        }
    }
    out
}

/// Label names that `expr` matches on or groups by and that none of its
/// metrics carries in the scrape. Metrics with no series in the scrape (a
/// family nothing has counted yet) are not judged, nor are groupings in an
/// expression that reads a recording rule, `ALERTS` or such a metric.
pub(super) fn unknown_labels(
    place: &str,
    expr: &str,
    labels: &BTreeMap<String, BTreeSet<String>>,
) -> Vec<String> {
    let toks = tokens(expr);
    let mut problems = Vec::new();
    let mut seen = BTreeSet::new();
    let mut all_known = true;
    let word = |i: usize| match toks.get(i) {
        Some(Token::Word(w)) => Some(w.as_str()),
        _ => None,
    };
    for (i, t) in toks.iter().enumerate() {
        let Token::Word(w) = t else { continue };
        if w.contains(':') || w == "ALERTS" {
            all_known = false;
        }
        if !w.starts_with("flashsale_") || w.contains(':') {
            continue;
        }
        let Some(carried) = labels.get(w) else {
            all_known = false;
            continue;
        };
        seen.extend(carried.iter().cloned());
        if toks.get(i + 1) != Some(&Token::Punct('{')) {
            continue;
        }
        // Inside the braces: every name followed by `=` or `!` is a label.
        let mut j = i + 2;
        while j < toks.len() && toks[j] != Token::Punct('}') {
            let op = matches!(toks.get(j + 1), Some(Token::Punct('=' | '!')));
            if let (Some(label), true) = (word(j), op) {
                if !carried.contains(label) {
                    problems.push(format!("{place}: {w} has no label {label:?}\n    {expr}"));
                }
            }
            j += 1;
        }
    }
    if !all_known {
        return problems;
    }
    for (i, t) in toks.iter().enumerate() {
        let Token::Word(w) = t else { continue };
        let grouping = matches!(
            w.as_str(),
            "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
        );
        if !grouping || toks.get(i + 1) != Some(&Token::Punct('(')) {
            continue;
        }
        let mut j = i + 2;
        while j < toks.len() && toks[j] != Token::Punct(')') {
            if let Some(label) = word(j).filter(|l| !seen.contains(*l)) {
                problems.push(format!(
                    "{place}: `{w} ({label})`, a label none of its metrics has\n    {expr}"
                ));
            }
            j += 1;
        }
    }
    problems
}

/// The checks find what they are for (and pass what they must).
#[test]
fn the_checks_catch_a_wrong_name_or_label() {
    let page = "# TYPE flashsale_orders counter\n\
        flashsale_orders_total{event=\"paid\"} 1\n\
        # TYPE flashsale_http_request_duration_seconds histogram\n\
        flashsale_http_request_duration_seconds_bucket{route=\"/a/{b},c\\\"d\",le=\"0.1\"} 1\n\
        # TYPE flashsale_sale_units gauge\n\
        flashsale_sale_units{sale_id=\"1\",status=\"paid\"} 1\n";
    let exported = exported_names(page);
    let labels = sample_labels(page);
    assert_eq!(
        labels["flashsale_http_request_duration_seconds_bucket"],
        ["instance", "job", "le", "route"].map(String::from).into()
    );
    use super::rules::{parse_rules, RuleFile};
    let rules = Rules { files: Some(vec![RuleFile {
        name: "r.yml".into(),
        rules: parse_rules("r.yml", "groups:\n  - name: g\n    rules:\n      - record: flashsale:x:rate1m\n        expr: |\n          sum by (event) (\n            rate(flashsale_orders_total[1m]))\n      - alert: A\n        expr: 'up{job=\"flashsale_nothing\"} == 0' # a comment\n        annotations:\n          runbook_url: docs/RUNBOOK.md#a\n"),
    }]) };
    let parsed = &rules.files.as_ref().unwrap()[0].rules;
    assert_eq!(
        parsed[0].expr,
        "sum by (event) (\nrate(flashsale_orders_total[1m]))"
    );
    assert_eq!(parsed[1].expr, "up{job=\"flashsale_nothing\"} == 0");
    assert_eq!(parsed[1].runbook_url.as_deref(), Some("docs/RUNBOOK.md#a"));
    let check = |expr: &str| {
        let mut p = unknown_names("q", expr, &exported, &rules);
        p.extend(unknown_labels("q", expr, &labels));
        p.len()
    };
    for good in [
        "sum by (event) (rate(flashsale_orders_total[5m]))",
        "histogram_quantile(0.99, sum by (le, route) (rate(flashsale_http_request_duration_seconds_bucket[1m])))",
        "max by (sale_id, status) (flashsale_sale_units{status=~\"paid|pending\"}) # flashsale_gone",
        "flashsale:x:rate1m + on () group_left up{job=\"flashsale_gone\"}",
        "sum by (nothing) (flashsale:x:rate1m)",
    ] {
        assert_eq!(check(good), 0, "{good}");
    }
    for (bad, n) in [
        ("rate(flashsale_orders[5m])", 1),
        ("flashsale_http_request_duration_seconds", 1),
        ("flashsale:y:rate1m", 1),
        ("flashsale_sale_units{state=\"paid\"}", 1),
        ("sum by (sale) (flashsale_sale_units)", 1),
        ("sum(flashsale_orders_total) by (event, status)", 1),
    ] {
        assert_eq!(check(bad), n, "{bad}");
    }
}
