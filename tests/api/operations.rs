//! Operations endpoints and the command line.

use std::process::Command;

use serde_json::Value;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_metrics_and_openapi_answer() {
    let app = spawn_app().await;
    let get = |p: &str| app.client.get(app.url(p)).send();
    assert_eq!(get("/healthz").await.unwrap().status(), 200);
    assert_eq!(get("/readyz").await.unwrap().status(), 200);
    let sale = app.create_sale(SaleSpec::default()).await;
    app.reserve(&sale, 1, None).await;
    let metrics = get("/metrics").await.unwrap().text().await.unwrap();
    assert!(
        metrics.contains("flashsale_reservations_total{outcome=\"created\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("flashsale_http_request_duration_seconds_bucket"));
    let spec: Value = get("/api/v1/openapi.json")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(spec["openapi"].as_str().unwrap().starts_with("3."));
    assert!(spec["paths"]["/api/v1/sales/{sale_id}/orders"]["post"].is_object());
    app.finish().await;
}

/// A scrape alone (no `/readyz` call) keeps the health gauges current, and
/// reports each live sale's stock, units and state as Redis holds them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_reports_health_and_each_live_sale() {
    let app = spawn_app().await;
    let sale = app
        .create_sale(SaleSpec {
            stock: 10,
            per_user_limit: 3,
            ..SaleSpec::default()
        })
        .await;
    let mut orders = Vec::new();
    for user in 1..=3u64 {
        let (s, o) = app.reserve(&sale, user, None).await;
        assert_eq!(s, 201);
        orders.push(o["order_id"].as_str().unwrap().to_owned());
    }
    assert_eq!(app.pay(&orders[0], "pay-1", 1999).await.0, 200);
    assert_eq!(app.cancel(&orders[1], 2).await.0, 200);
    let metrics = app.metrics().await;
    for line in [
        "flashsale_ready 1".to_owned(),
        "flashsale_dependency_up{dependency=\"redis\"} 1".to_owned(),
        "flashsale_dependency_up{dependency=\"mysql\"} 1".to_owned(),
        format!("flashsale_sale_stock_total{{sale_id=\"{sale}\"}} 10"),
        format!("flashsale_sale_stock_available{{sale_id=\"{sale}\"}} 8"),
        format!("flashsale_sale_units{{sale_id=\"{sale}\",status=\"pending\"}} 1"),
        format!("flashsale_sale_units{{sale_id=\"{sale}\",status=\"paid\"}} 1"),
        format!("flashsale_sale_units{{sale_id=\"{sale}\",status=\"cancelled\"}} 1"),
        format!("flashsale_sale_state{{sale_id=\"{sale}\",state=\"open\"}} 1"),
        format!("flashsale_sale_state{{sale_id=\"{sale}\",state=\"paused\"}} 0"),
    ] {
        assert!(metrics.contains(&line), "no {line:?} in\n{metrics}");
    }
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_creates_a_sale_and_issues_tokens_the_api_accepts() {
    let app = spawn_app().await;
    let bin = env!("CARGO_BIN_EXE_flashsale");
    let t = &app.target;
    let out = Command::new(bin)
        .args([
            "sale",
            "create",
            "--sku",
            "CLI-1",
            "--title",
            "From the CLI",
        ])
        .args([
            "--price-cents",
            "500",
            "--stock",
            "3",
            "--per-user-limit",
            "1",
        ])
        .envs(t.redis_env())
        .env("DATABASE_URL", &t.database_url)
        .env("FLASHSALE_KEY_PREFIX", &t.key_prefix)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sale = String::from_utf8(out.stdout).unwrap().trim().to_owned();

    let out = Command::new(bin)
        .args(["token", "--user", "42"])
        .env("FLASHSALE_JWT_SECRET", JWT_SECRET)
        .output()
        .unwrap();
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let res = app
        .client
        .post(app.url(&format!("/api/v1/sales/{sale}/orders")))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let order: Value = res.json().await.unwrap();
    assert_eq!(order["user_id"], "42");
    assert_eq!(order["amount_cents"], 500);

    let refused = Command::new(bin)
        .args(["sale", "create", "--sku", "X", "--title", "T"])
        .args(["--price-cents", "5", "--stock", "0"])
        .env("DATABASE_URL", &t.database_url)
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(1));
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_a_whole_sale_and_its_audit_is_clean() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_flashsale"))
        .args([
            "demo",
            "--buyers",
            "600",
            "--stock",
            "100",
            "--payment-window-secs",
            "1",
        ])
        .env("RUST_LOG", "warn")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("audit: clean"), "{stdout}");
    assert!(stdout.contains("pending 0"), "{stdout}");
}
