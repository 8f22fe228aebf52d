//! The Prometheus rules against a real Prometheus scraping real `flashsale
//! serve` processes, and the audit's textfile written by the real CLI.
//!
//! Needs Debian's `prometheus` (scripts/prometheus.sh ensure); without it the
//! test fails and says so.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::helpers::*;

const RULES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/prometheus/rules");

/// A Prometheus of the test's own: its own port and temporary folder,
/// stopped by its PID when dropped (also when the test fails).
struct OwnPrometheus {
    port: u16,
    dir: PathBuf,
    child: Child,
}

impl OwnPrometheus {
    /// Starts Prometheus scraping `targets` (job `flashsale`) every second,
    /// with the project's recording rules and its alerts, the alerts'
    /// `for:` shortened to 2 s so that a test waits seconds, not minutes
    /// (the expressions are the real ones).
    fn start(targets: &[String]) -> Self {
        let found = Command::new("prometheus")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        assert!(
            found.is_ok_and(|s| s.success()),
            "prometheus is not installed: run scripts/prometheus.sh ensure"
        );
        let dir = std::env::temp_dir().join(unique("fstest-prometheus"));
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let alerts = std::fs::read_to_string(Path::new(RULES).join("alerts.yml")).unwrap();
        let short: String = alerts
            .lines()
            .map(|l| match l.trim_start().strip_prefix("for: ") {
                Some(_) => format!("{}for: 2s\n", &l[..l.len() - l.trim_start().len()]),
                None => format!("{l}\n"),
            })
            .collect();
        assert_ne!(short, alerts, "no `for:` shortened");
        std::fs::write(dir.join("alerts.yml"), short).unwrap();
        let config = json!({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [
                format!("{RULES}/recording.yml"),
                dir.join("alerts.yml").display().to_string(),
            ],
            "scrape_configs": [{
                "job_name": "flashsale",
                "static_configs": [{"targets": targets}],
            }],
        });
        // JSON is YAML.
        std::fs::write(dir.join("prometheus.yml"), config.to_string()).unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus starts");
        Self { port, dir, child }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    async fn wait_ready(&self, client: &reqwest::Client) {
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = client.get(self.url("/-/ready")).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(
                Instant::now() < until,
                "prometheus not ready: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The instant query's samples as (labels, value).
    async fn query(&self, client: &reqwest::Client, promql: &str) -> Vec<(Value, f64)> {
        let v: Value = client
            .get(self.url("/api/v1/query"))
            .query(&[("query", promql)])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["status"], "success", "{promql}: {v}");
        v["data"]["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["metric"].clone(),
                    s["value"][1].as_str().unwrap().parse().unwrap(),
                )
            })
            .collect()
    }

    /// The alerts pending or firing.
    async fn alerts(&self, client: &reqwest::Client) -> Vec<Value> {
        let v: Value = client
            .get(self.url("/api/v1/alerts"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["data"]["alerts"].as_array().unwrap().clone()
    }
}

impl Drop for OwnPrometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn wait_healthy(client: &reqwest::Client, addr: &str) {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let r = client.get(format!("http://{addr}/healthz")).send().await;
        if r.is_ok_and(|r| r.status() == 200) {
            return;
        }
        assert!(Instant::now() < until, "{addr} does not answer /healthz");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether the reconciler's RoleMissing alert is in `state`.
fn role_missing(alerts: &[Value], state: &str) -> bool {
    alerts.iter().any(|a| {
        a["labels"]["alertname"] == "FlashsaleRoleMissing"
            && a["labels"]["role"] == "reconciler"
            && a["state"] == state
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_counts_the_sales_reservations_and_alerts_when_the_reconciler_is_gone() {
    let target = Target::fresh();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let http_addr = format!("127.0.0.1:{}", free_port());
    let mut http = ServeProcess::start(
        &target,
        "http,expiry",
        &[("FLASHSALE_LISTEN", http_addr.as_str())],
    );
    // One process at a time creates and migrates the database.
    wait_healthy(&client, &http_addr).await;
    let rec_addr = format!("127.0.0.1:{}", free_port());
    let mut reconciler = ServeProcess::start(
        &target,
        "reconciler",
        &[("FLASHSALE_METRICS_LISTEN", rec_addr.as_str())],
    );
    wait_healthy(&client, &rec_addr).await;
    let prom = OwnPrometheus::start(&[http_addr.clone(), rec_addr.clone()]);
    prom.wait_ready(&client).await;

    let res = client
        .post(format!("http://{http_addr}/api/v1/sales"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({
            "sku": "PROM-1", "title": "Scraped", "price_cents": 1000, "stock": 20,
            "start_at": "2020-01-01T00:00:00Z", "end_at": "2099-01-01T00:00:00Z",
            "per_user_limit": 1, "payment_window_secs": 900,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let sale = res.json::<Value>().await.unwrap()["sale_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let reserved = 7;
    for user in 1..=reserved {
        let res = client
            .post(format!("http://{http_addr}/api/v1/sales/{sale}/orders"))
            .bearer_auth(buyer_token(user))
            .json(&json!({"qty": 1}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 201);
    }

    // The recording rule gives the sale's exact reserve count.
    let sold = format!("flashsale:sale_units_sold:max{{sale_id=\"{sale}\"}}");
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let got = prom.query(&client, &sold).await;
        if got.first().map(|s| s.1) == Some(reserved as f64) {
            assert_eq!(got.len(), 1, "{got:?}");
            break;
        }
        assert!(
            Instant::now() < until,
            "{sold} = {got:?}, want {reserved}; {}",
            prom.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // The counter of the same scrape may lag the Redis read by one
    // request (a scrape between the script's reply and the count): wait.
    let created = "sum(flashsale_reservations_total{outcome=\"created\"})";
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let got = prom.query(&client, created).await;
        if got.first().map(|s| s.1) == Some(reserved as f64) {
            break;
        }
        assert!(
            Instant::now() < until,
            "{created} = {got:?}, want {reserved}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // With the reconciler scraped, its RoleMissing alert is quiet (before
    // the first scrape it may have fired: nothing reported the role yet).
    let until = Instant::now() + Duration::from_secs(30);
    let mut quiet_since = Instant::now();
    loop {
        let alerts = prom.alerts(&client).await;
        if role_missing(&alerts, "pending") || role_missing(&alerts, "firing") {
            quiet_since = Instant::now();
        } else if quiet_since.elapsed() > Duration::from_secs(4) {
            break;
        }
        assert!(
            Instant::now() < until,
            "FlashsaleRoleMissing active with the reconciler up: {alerts:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // The only reconciler stops: its alert fires.
    assert!(reconciler.terminate(Duration::from_secs(20)));
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let alerts = prom.alerts(&client).await;
        if role_missing(&alerts, "firing") {
            break;
        }
        assert!(
            Instant::now() < until,
            "FlashsaleRoleMissing{{role=\"reconciler\"}} not firing: {alerts:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // The HTTP process still runs expiry: that role is not reported missing.
    let alerts = prom.alerts(&client).await;
    assert!(
        !alerts
            .iter()
            .any(|a| a["labels"]["alertname"] == "FlashsaleRoleMissing"
                && a["labels"]["role"] == "expiry"),
        "{alerts:?}"
    );
    drop(prom);
    http.terminate(Duration::from_secs(20));
    target.cleanup().await;
}

/// `flashsale audit --textfile` with the test's target in its environment.
fn audit_textfile(target: &Target, path: &Path, redis_url: Option<&str>) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flashsale"));
    cmd.arg("audit")
        .arg("--textfile")
        .arg(path)
        .envs(target.redis_env())
        .env("DATABASE_URL", &target.database_url)
        .env("FLASHSALE_KEY_PREFIX", &target.key_prefix)
        .env("RUST_LOG", "warn");
    if let Some(url) = redis_url {
        cmd.env("REDIS_URL", url)
            .env("FLASHSALE_REDIS_CLUSTER", "")
            .env("FLASHSALE_REDIS_SENTINELS", "");
    }
    cmd.output().unwrap()
}

fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_writes_its_textfile_also_when_it_cannot_run() {
    let app = spawn_with(Target::fresh(), |c| {
        c.roles = vec![
            flashsale::config::Role::Http,
            flashsale::config::Role::Reconciler,
        ];
    })
    .await;
    let sale = app.create_sale(SaleSpec::default()).await;
    for user in 1..=3 {
        assert_eq!(app.reserve(&sale, user, None).await.0, 201);
    }
    let dir = std::env::temp_dir().join(unique("fstest-textfile"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("flashsale_audit.prom");

    let out = audit_textfile(&app.target, &path, None);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(sample(&text, "flashsale_audit_up"), Some(1.0), "{text}");
    let findings: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("flashsale_audit_findings{"))
        .collect();
    assert!(findings.len() > 20, "{text}");
    assert!(findings.iter().all(|l| l.ends_with(" 0")), "{text}");
    let success = sample(&text, "flashsale_audit_last_success_timestamp_seconds").unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((now - success).abs() < 120.0, "{success} vs {now}");
    // Prometheus's own parser takes it.
    let check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&path).unwrap())
        .output()
        .expect("promtool is installed (scripts/prometheus.sh ensure)");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );

    // Redis unreachable: exit 2, the file says so and keeps the success.
    let nowhere = format!("redis://127.0.0.1:{}", free_port());
    let out = audit_textfile(&app.target, &path, Some(&nowhere));
    assert_eq!(out.status.code(), Some(2));
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(sample(&text, "flashsale_audit_up"), Some(0.0), "{text}");
    assert_eq!(
        sample(&text, "flashsale_audit_last_success_timestamp_seconds"),
        Some(success)
    );
    assert!(sample(&text, "flashsale_audit_last_run_timestamp_seconds").unwrap() >= success);
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert_eq!(left.len(), 1, "only the textfile, no temporary file");
    std::fs::remove_dir_all(&dir).unwrap();
    app.finish().await;
}
