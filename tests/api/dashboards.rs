//! The operations files against the service as it runs: every query of the
//! Grafana dashboard (`deploy/grafana/flashsale.json`) and of the Prometheus
//! rules (`deploy/prometheus/rules/*.yml`) names only metrics the service
//! exports (or recording rules the rules define), every query parses in a
//! real Prometheus, and every alert has its section in `docs/RUNBOOK.md`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flashsale::config::Role;
use serde_json::Value;

use crate::helpers::*;

mod promql;
mod rules;

use promql::{exported_names, sample_labels, unknown_labels, unknown_names};
use rules::Rules;

/// The alerts the rules must define, each with a `## <name>` section in the
/// runbook (the names are shared with deploy/prometheus/rules/alerts.yml).
const ALERTS: [&str; 26] = [
    "FlashsaleInstanceDown",
    "FlashsaleInstanceNotReady",
    "FlashsaleRedisUnreachable",
    "FlashsaleMysqlUnreachable",
    "FlashsaleSaleFenced",
    "FlashsaleOrdersLost",
    "FlashsaleReconcilerLagHigh",
    "FlashsaleFlowBacklogGrowing",
    "FlashsaleFlowBacklogNearBound",
    "FlashsaleExpiryLate",
    "FlashsaleOrdersPastDeadline",
    "FlashsaleRefundsWaiting",
    "FlashsaleRefundsDeadLettered",
    "FlashsaleFlowQuarantined",
    "FlashsaleRoleDown",
    "FlashsaleRoleMissing",
    "FlashsaleHttp5xxRatioHigh",
    "FlashsaleRateLimitedShareHigh",
    "FlashsaleLiveListStale",
    "FlashsaleRedisWritesUnacknowledged",
    "FlashsaleOutboxLagging",
    "FlashsaleRelayFailing",
    "FlashsalePointsDeadLetters",
    "FlashsalePointsLagging",
    "FlashsaleAuditFindings",
    "FlashsaleAuditStale",
];

/// The series of the audit's textfile (`flashsale audit --textfile`), for
/// a build without that flag.
const AUDIT_TEXTFILE: [&str; 4] = [
    "flashsale_audit_findings",
    "flashsale_audit_last_run_timestamp_seconds",
    "flashsale_audit_last_success_timestamp_seconds",
    "flashsale_audit_up",
];

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[tokio::test]
async fn the_dashboard_and_the_rules_name_only_exported_metrics() {
    let app = spawn_with(Target::fresh(), |c| {
        c.roles = vec![Role::Http, Role::Expiry, Role::Reconciler];
    })
    .await;
    run_a_short_sale(&app).await;
    let page = app.metrics().await;
    let labels = sample_labels(&page);
    let mut exported = exported_names(&page);
    // `flashsale points` registers the same `telemetry::Metrics` as
    // `serve`, so the page above holds its names too.
    exported.extend(audit_textfile_names(&app.target));
    app.finish().await;
    for family in [
        "flashsale_http_requests_total",
        "flashsale_expiry_lateness_seconds_bucket",
    ] {
        assert!(exported.contains(family), "{family} not in {exported:?}");
    }

    let rules = Rules::load();
    let mut problems = Vec::new();
    let dashboard = Dashboard::load();
    problems.extend(dashboard.problems());
    for (place, expr) in dashboard.queries() {
        problems.extend(unknown_names(&place, &expr, &exported, &rules));
        problems.extend(unknown_labels(&place, &expr, &labels));
    }
    match &rules.files {
        None => println!(
            "note: deploy/prometheus/rules/ is absent on this branch; its check is skipped"
        ),
        Some(files) => {
            for rule in files.iter().flat_map(|f| &f.rules) {
                problems.extend(unknown_names(&rule.place(), &rule.expr, &exported, &rules));
                problems.extend(unknown_labels(&rule.place(), &rule.expr, &labels));
            }
        }
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

#[tokio::test]
async fn every_alert_has_its_runbook_section() {
    let runbook = read("docs/RUNBOOK.md");
    let anchors = heading_anchors(&runbook);
    let mut problems = Vec::new();
    for alert in ALERTS {
        if !runbook.lines().any(|l| l == format!("## {alert}")) {
            problems.push(format!("docs/RUNBOOK.md has no section `## {alert}`"));
        }
    }
    // The runbook's links to its own sections lead somewhere.
    for link in runbook.split("](#").skip(1) {
        let anchor = link.split(')').next().unwrap_or_default();
        if !anchors.contains(anchor) {
            problems.push(format!(
                "docs/RUNBOOK.md links to #{anchor}, which is no heading"
            ));
        }
    }
    match Rules::load().files {
        None => println!(
            "note: deploy/prometheus/rules/ is absent on this branch; runbook_url check skipped"
        ),
        Some(files) => {
            let mut defined = BTreeSet::new();
            for rule in files.iter().flat_map(|f| &f.rules) {
                let Some(alert) = &rule.alert else { continue };
                defined.insert(alert.clone());
                let Some(url) = &rule.runbook_url else {
                    problems.push(format!("{}: no runbook_url", rule.place()));
                    continue;
                };
                match url.split_once('#') {
                    Some((page, anchor)) if page.ends_with("RUNBOOK.md") => {
                        if !anchors.contains(anchor) {
                            problems.push(format!(
                                "{}: runbook_url {url}: no heading with anchor #{anchor} in docs/RUNBOOK.md",
                                rule.place()
                            ));
                        }
                    }
                    _ => problems.push(format!(
                        "{}: runbook_url {url} is not docs/RUNBOOK.md#<anchor>",
                        rule.place()
                    )),
                }
            }
            if files.iter().any(|f| f.name == "alerts.yml") {
                for alert in ALERTS.iter().filter(|a| !defined.contains(**a)) {
                    problems.push(format!(
                        "deploy/prometheus/rules/alerts.yml: no alert {alert}"
                    ));
                }
            }
        }
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

#[tokio::test]
async fn every_query_parses_in_prometheus() {
    let prometheus = Prometheus::start().await;
    let mut queries = Dashboard::load().queries();
    if let Some(files) = Rules::load().files {
        for rule in files.iter().flat_map(|f| &f.rules) {
            queries.push((rule.place(), rule.expr.clone()));
        }
    }
    let mut problems = Vec::new();
    for (place, expr) in &queries {
        if let Err(e) = prometheus.query(&grafana_to_promql(expr)).await {
            problems.push(format!("{place}: {e}\n    {expr}"));
        }
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

/// Reservations, a payment, a cancel, an expiry and a refund on a sale of
/// the app's own, so that every family that waits for an event has one.
async fn run_a_short_sale(app: &TestApp) {
    let sale = app
        .create_sale(SaleSpec {
            stock: 5,
            payment_window_secs: 2,
            ..Default::default()
        })
        .await;
    let mut orders = Vec::new();
    for user in 1..=3 {
        let (status, order) = app.reserve(&sale, user, None).await;
        assert_eq!(status, 201, "{order}");
        orders.push(order["order_id"].as_str().unwrap().to_owned());
    }
    let (status, body) = app.pay(&orders[0], "pay_dash_1", 1999).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = app.cancel(&orders[1], 2).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = app.order_call("POST", &orders[0], "/refund", 1).await;
    assert!(status == 200 || status == 202, "{status} {body}");
    // Order 3 is left to its deadline; the refund waits for settlement.
    for (order, user, want) in [(&orders[0], 1, "refunded"), (&orders[2], 3, "closed")] {
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let (_, o) = app.order_call("GET", order, "", user).await;
            if o["status"] == want {
                break;
            }
            assert!(
                Instant::now() < until,
                "order {order} still {}",
                o["status"]
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The audit textfile's names: from `flashsale audit --textfile` when this
/// build has the flag, else the agreed list.
fn audit_textfile_names(target: &Target) -> BTreeSet<String> {
    let bin = env!("CARGO_BIN_EXE_flashsale");
    let help = Command::new(bin)
        .args(["audit", "--help"])
        .output()
        .unwrap();
    if !String::from_utf8_lossy(&help.stdout).contains("--textfile") {
        println!("note: this build has no `flashsale audit --textfile`; using the agreed names");
        return AUDIT_TEXTFILE.iter().map(|s| (*s).to_owned()).collect();
    }
    let file = std::env::temp_dir()
        .join(unique("fstest-audit"))
        .with_extension("prom");
    let out = Command::new(bin)
        .args(["audit", "--textfile"])
        .arg(&file)
        .envs(target.redis_env())
        .env("DATABASE_URL", &target.database_url)
        .env("FLASHSALE_KEY_PREFIX", &target.key_prefix)
        .env_remove("FLASHSALE_AMQP_URL")
        .output()
        .unwrap();
    let text = std::fs::read_to_string(&file).unwrap_or_else(|e| {
        panic!(
            "flashsale audit --textfile wrote no {}: {e}\n{}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let _ = std::fs::remove_file(&file);
    exported_names(&text)
}

/// A dashboard query as Prometheus takes it: Grafana's variables replaced.
fn grafana_to_promql(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$__interval", "1m")
        .replace("$__range", "1h")
        .replace("${sale_id}", ".*")
        .replace("$sale_id", ".*")
}

/// A JSON string's text ("" for anything else).
fn text(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

/// The dashboard's JSON.
struct Dashboard(Value);

impl Dashboard {
    const PATH: &'static str = "deploy/grafana/flashsale.json";

    fn load() -> Self {
        Self(serde_json::from_str(&read(Self::PATH)).expect("the dashboard is JSON"))
    }

    /// Every panel but rows, rows' own panels included, in order.
    fn panels(&self) -> Vec<&Value> {
        let mut out = Vec::new();
        for p in self.0["panels"].as_array().into_iter().flatten() {
            if p["type"] == "row" {
                out.extend(p["panels"].as_array().into_iter().flatten());
            } else {
                out.push(p);
            }
        }
        out
    }

    /// Each query of a panel or a template variable, with where it is.
    fn queries(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for p in self.panels() {
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = t["expr"].as_str() {
                    let place = format!(
                        "{} panel {:?} target {}",
                        Self::PATH,
                        text(&p["title"]),
                        text(&t["refId"])
                    );
                    out.push((place, expr.to_owned()));
                }
            }
        }
        for v in self.0["templating"]["list"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let query = v["query"]["query"].as_str().or(v["definition"].as_str());
            if let (true, Some(q)) = (v["type"] == "query", query) {
                // label_values(metric, label) is Grafana's, not PromQL: its metric is checked.
                let metric = q
                    .strip_prefix("label_values(")
                    .and_then(|r| r.split(',').next())
                    .unwrap_or(q);
                out.push((
                    format!("{} variable {}", Self::PATH, text(&v["name"])),
                    metric.to_owned(),
                ));
            }
        }
        out
    }

    /// What a panel lacks: a title, a datasource (the `${datasource}`
    /// variable), a target with a query; and the two variables the panels use.
    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let var_source = |v: &Value| v["uid"] == "${datasource}" || v == "${datasource}";
        for (n, p) in self.panels().into_iter().enumerate() {
            let title = p["title"].as_str().unwrap_or_default();
            let place = format!("{} panel {n} {title:?} (id {})", Self::PATH, p["id"]);
            if title.trim().is_empty() {
                problems.push(format!("{place}: no title"));
            }
            let targets = p["targets"].as_array().cloned().unwrap_or_default();
            if targets.is_empty() {
                problems.push(format!("{place}: no target"));
            }
            for t in &targets {
                if t["expr"].as_str().is_none_or(|e| e.trim().is_empty()) {
                    problems.push(format!("{place}: target {} has no expr", text(&t["refId"])));
                }
                if !var_source(&p["datasource"]) && !var_source(&t["datasource"]) {
                    problems.push(format!(
                        "{place}: target {} has no datasource (the ${{datasource}} variable)",
                        text(&t["refId"])
                    ));
                }
            }
        }
        let vars = self.0["templating"]["list"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let var = |name: &str| vars.iter().find(|v| v["name"] == name).cloned();
        match var("datasource") {
            Some(v) if v["type"] == "datasource" && v["query"] == "prometheus" => {}
            _ => problems.push(format!(
                "{}: no Prometheus datasource variable `datasource`",
                Self::PATH
            )),
        }
        match var("sale_id") {
            Some(v) if v["definition"] == "label_values(flashsale_sale_stock_total, sale_id)" => {}
            _ => problems.push(format!(
                "{}: no variable `sale_id` from label_values(flashsale_sale_stock_total, sale_id)",
                Self::PATH
            )),
        }
        problems
    }
}

/// GitHub's anchors of a Markdown page's headings (outside code blocks):
/// lower case, spaces to `-`, punctuation but `-` and `_` dropped.
fn heading_anchors(markdown: &str) -> BTreeSet<String> {
    let mut anchors = BTreeSet::new();
    let mut in_code = false;
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            continue;
        }
        let Some(heading) = line
            .strip_prefix('#')
            .map(|h| h.trim_start_matches('#'))
            .and_then(|h| h.strip_prefix(' '))
            .filter(|_| !in_code)
        else {
            continue;
        };
        let anchor = heading
            .trim()
            .to_lowercase()
            .chars()
            .filter_map(|c| match c {
                ' ' => Some('-'),
                c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                _ => None,
            })
            .collect();
        anchors.insert(anchor);
    }
    anchors
}

/// Anchors as GitHub makes them; a `#` line in a code block is no heading.
#[test]
fn headings_get_github_anchors() {
    let anchors =
        heading_anchors("# Run-book\n## Redis loss: a sale, fenced\n```sh\n# not a heading\n```\n");
    assert_eq!(
        anchors,
        ["redis-loss-a-sale-fenced", "run-book"]
            .map(String::from)
            .into()
    );
}

/// A Prometheus server of the test's own (no targets), to parse queries.
struct Prometheus {
    child: Child,
    dir: PathBuf,
    url: String,
    client: reqwest::Client,
}

impl Prometheus {
    async fn start() -> Self {
        let dir = std::env::temp_dir().join(unique("fstest-prometheus"));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("prometheus.yml");
        std::fs::write(&config, "global:\n  scrape_interval: 15s\n").unwrap();
        let port = free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus is installed (Debian's `prometheus` package)");
        let p = Self {
            child,
            dir,
            url: format!("http://127.0.0.1:{port}"),
            client: reqwest::Client::new(),
        };
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = p.client.get(format!("{}/-/ready", p.url)).send().await;
            if ready.is_ok_and(|r| r.status() == 200) {
                return p;
            }
            assert!(
                Instant::now() < until,
                "prometheus did not get ready at {}",
                p.url
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Runs `expr` as an instant query; the error Prometheus gives, if any.
    async fn query(&self, expr: &str) -> Result<(), String> {
        let url =
            url::Url::parse_with_params(&format!("{}/api/v1/query", self.url), [("query", expr)])
                .unwrap();
        let res = self
            .client
            .get(url)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let body: Value = res.json().await.map_err(|e| e.to_string())?;
        if body["status"] == "success" {
            Ok(())
        } else {
            Err(format!("{}: {}", body["errorType"], body["error"]))
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
