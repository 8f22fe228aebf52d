//! The audit CLI, run as operators run it: clean sales pass (also under
//! live traffic), each kind of corruption is its own finding, and
//! `--repair --yes` fixes it.

use std::collections::BTreeSet;
use std::time::Duration;

use flashsale::config::Role;
use redis::AsyncCommands;
use serde_json::Value;

use crate::helpers::*;
use crate::reconcile::{run_sale, wait_quiet};

/// Runs `flashsale audit` with `args` on the test's stores.
pub(crate) async fn audit(t: &Target, args: &[&str]) -> (i32, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_flashsale"))
        .arg("audit")
        .args(args)
        .envs(t.redis_env())
        .env("DATABASE_URL", &t.database_url)
        .env("FLASHSALE_KEY_PREFIX", &t.key_prefix)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.code() != Some(2),
        "the audit could not run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap(), stdout)
}

/// The finding kinds of a JSON report.
fn json_kinds(doc: &Value) -> BTreeSet<String> {
    doc["sales"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["findings"].as_array().unwrap().iter())
        .map(|f| f["kind"].as_str().unwrap().to_owned())
        .collect()
}

/// The finding kinds of a human report (`... [kind] ...` lines).
fn human_kinds(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| Some(l.split_once(": [")?.1.split_once(']')?.0.to_owned()))
        .collect()
}

pub(crate) async fn wait_backlog_empty(app: &TestApp, sale: &str) {
    let k = app.sale_keys(sale);
    let mut c = app.engine.connection();
    let until = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let n: u64 = c.xlen(&k.flow).await.unwrap();
        if n == 0 {
            return;
        }
        assert!(std::time::Instant::now() < until, "backlog never emptied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A sale of 10 orders, 5 of them paid, all settled in MySQL.
async fn settled_sale(app: &TestApp) -> (String, Vec<String>) {
    let sale = app
        .create_sale(SaleSpec {
            stock: 50,
            ..SaleSpec::default()
        })
        .await;
    let mut ids = Vec::new();
    for u in 1..=10u64 {
        let (s, o) = app.reserve(&sale, u, None).await;
        assert_eq!(s, 201);
        let id = o["order_id"].as_str().unwrap().to_owned();
        if u <= 5 {
            let (s, _) = app
                .pay(&id, &format!("p{u}"), o["amount_cents"].as_i64().unwrap())
                .await;
            assert_eq!(s, 200);
        }
        ids.push(id);
    }
    wait_backlog_empty(app, &sale).await;
    (sale, ids)
}

/// Audits (JSON and human), expects exactly `kind` among the findings,
/// checks that the plan alone changes nothing, repairs, and audits clean.
async fn expect_found_and_repaired(app: &TestApp, kind: &str) {
    let t = &app.target;
    let (code, json) = audit(t, &["--json"]).await;
    assert_eq!(code, 1, "{json}");
    let doc: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(doc["clean"], false);
    let kinds = json_kinds(&doc);
    assert!(kinds.contains(kind), "{kind} not in {kinds:?}");
    let (code, human) = audit(t, &[]).await;
    assert_eq!(code, 1);
    assert_eq!(
        human_kinds(&human),
        kinds,
        "the human report names the same findings:\n{human}"
    );

    let (code, plan) = audit(t, &["--repair"]).await;
    assert_eq!(code, 1);
    assert!(plan.contains("fix: ") && plan.contains("truth: "), "{plan}");
    let (code, _) = audit(t, &["--json"]).await;
    assert_eq!(code, 1, "the plan alone changed nothing");

    let (code, out) = audit(t, &["--repair", "--yes"]).await;
    assert_eq!(code, 0, "{out}");
    let (code, out) = audit(t, &[]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("audit: clean"));
    let pool = sqlx::MySqlPool::connect(&t.database_url).await.unwrap();
    let logged: (i64,) = sqlx::query_as("SELECT COUNT(*) FROM repair_log WHERE finding = ?")
        .bind(kind)
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    assert!(
        logged.0 >= 1 || kind == "redis_conservation",
        "{kind} repair logged"
    );
}

fn settling(c: &mut flashsale::config::ServeConfig) {
    c.roles = vec![Role::Http, Role::Reconciler];
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_settled_sale_audits_clean_and_stays_clean_under_live_traffic() {
    let app = spawn_with(Target::fresh(), |c| {
        c.roles = vec![Role::Http, Role::Expiry, Role::Reconciler]
    })
    .await;
    let sale = app
        .create_sale(SaleSpec {
            stock: 40_000,
            payment_window_secs: 1,
            ..SaleSpec::default()
        })
        .await;
    run_sale(&app.engine, sale.parse().unwrap(), 600, 1).await;
    wait_quiet(&app, &sale, Duration::from_secs(30)).await;
    let (code, out) = audit(&app.target, &[]).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("sale {sale}: 600 orders checked")),
        "{out}"
    );

    // Reserves, payments, cancels and expiries run while the audit reads.
    let engine = app.engine.clone();
    let sale_id = sale.parse().unwrap();
    let traffic = tokio::spawn(async move { run_sale(&engine, sale_id, 30_000, 1_000).await });
    let mut within = 0;
    while !traffic.is_finished() {
        let (code, out) = audit(&app.target, &["--json"]).await;
        assert_eq!(code, 0, "a false finding under live traffic: {out}");
        if !traffic.is_finished() {
            within += 1; // this audit began and ended while the traffic ran
        }
    }
    traffic.await.unwrap();
    assert!(within >= 1, "no audit ran wholly during the traffic");
    wait_quiet(&app, &sale, Duration::from_secs(60)).await;
    let (code, out) = audit(&app.target, &[]).await;
    assert_eq!(code, 0, "{out}");
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_deleted_from_redis_is_found_and_restored() {
    let app = spawn_with(Target::fresh(), settling).await;
    let (sale, ids) = settled_sale(&app).await;
    let seq: u64 = ids[0].rsplit('-').next().unwrap().parse().unwrap();
    let mut c = app.engine.connection();
    let _: () = c
        .hdel(app.sale_keys(&sale).orders_bucket(seq), seq)
        .await
        .unwrap();
    expect_found_and_repaired(&app, "order_missing_in_redis").await;
    let back = app.orders(&sale).await;
    assert_eq!(back[&seq].status.as_str(), "paid");
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_stock_counter_is_found_and_repaired() {
    let app = spawn_with(Target::fresh(), settling).await;
    let (sale, _) = settled_sale(&app).await;
    let mut c = app.engine.connection();
    let _: () = c
        .hincr(app.sale_keys(&sale).sale, "avail", 3)
        .await
        .unwrap();
    expect_found_and_repaired(&app, "redis_conservation").await;
    assert_eq!(app.sale_field(&sale, "avail").await, 40);
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_flow_record_is_found_and_repaired() {
    // No reconciler runs in the app: the test applies batches itself.
    let app = spawn_app().await;
    let (sale, ids) = {
        let sale = app.create_sale(SaleSpec::default()).await;
        let (_, o) = app.reserve(&sale, 1, None).await;
        (
            sale,
            vec![(
                o["order_id"].as_str().unwrap().to_owned(),
                o["amount_cents"].as_i64().unwrap(),
            )],
        )
    };
    let pool = sqlx::MySqlPool::connect(&app.target.database_url)
        .await
        .unwrap();
    let reconciler = flashsale::workers::reconciler::Reconciler::new(
        app.engine.clone(),
        pool.clone(),
        app.live.clone(),
        std::sync::Arc::new(flashsale::telemetry::Metrics::default()),
        Default::default(),
    );
    reconciler.try_step().await.unwrap();
    let (s, _) = app.pay(&ids[0].0, "p", ids[0].1).await;
    assert_eq!(s, 200);
    let k = app.sale_keys(&sale);
    let mut c = app.engine.connection();
    let page: redis::streams::StreamRangeReply = c.xrange_all(&k.flow).await.unwrap();
    assert_eq!(page.ids.len(), 1, "the payment's record waits");
    let _: () = c.xdel(&k.flow, &[&page.ids[0].id]).await.unwrap();
    expect_found_and_repaired(&app, "flow_record_lost").await;
    let (status,): (String,) = sqlx::query_as("SELECT status FROM orders")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(status, "paid");
    pool.close().await;
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_row_changed_in_mysql_is_found_and_rewritten() {
    let app = spawn_with(Target::fresh(), settling).await;
    let (sale, ids) = settled_sale(&app).await;
    let seq: u64 = ids[2].rsplit('-').next().unwrap().parse().unwrap();
    let pool = sqlx::MySqlPool::connect(&app.target.database_url)
        .await
        .unwrap();
    sqlx::query("UPDATE orders SET amount_cents = 1, status = 'cancelled' WHERE seq = ?")
        .bind(seq)
        .execute(&pool)
        .await
        .unwrap();
    expect_found_and_repaired(&app, "order_mismatch").await;
    let (status, amount): (String, i64) =
        sqlx::query_as("SELECT status, amount_cents FROM orders WHERE seq = ?")
            .bind(seq)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((status.as_str(), amount), ("paid", 1999));
    let _ = sale;
    pool.close().await;
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_deadline_entry_is_found_and_dropped() {
    let app = spawn_with(Target::fresh(), settling).await;
    let (sale, ids) = settled_sale(&app).await;
    let paid_seq: u64 = ids[0].rsplit('-').next().unwrap().parse().unwrap();
    let k = app.sale_keys(&sale);
    let mut c = app.engine.connection();
    let later = app.redis_now_ms().await + 3_600_000;
    // An entry for the paid order in its bucket, the bucket indexed.
    let _: () = c
        .zadd(k.due_bucket(paid_seq), paid_seq, later)
        .await
        .unwrap();
    let _: () = redis::cmd("ZADD")
        .arg(&k.deadlines)
        .arg("LT")
        .arg(later)
        .arg(paid_seq / flashsale::engine::keys::DUE_BUCKET)
        .query_async(&mut c)
        .await
        .unwrap();
    expect_found_and_repaired(&app, "stale_due_entry").await;
    let id = sale.parse().unwrap();
    let score = app
        .engine
        .due_scores(id, &[paid_seq.to_string()])
        .await
        .unwrap();
    assert_eq!(score, [None]);
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buyers_changed_units_are_found_and_repaired() {
    let app = spawn_with(Target::fresh(), settling).await;
    let (sale, _) = settled_sale(&app).await;
    let k = app.sale_keys(&sale);
    let mut c = app.engine.connection();
    let _: () = c.hset(&k.buyers, 3u64, 0).await.unwrap();
    expect_found_and_repaired(&app, "buyer_units").await;
    let units: i64 = c.hget(&k.buyers, 3u64).await.unwrap();
    assert_eq!(units, 1);
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repair_that_would_erase_a_payment_is_left_to_a_person() {
    let app = spawn_with(Target::fresh(), settling).await;
    let (sale, ids) = settled_sale(&app).await;
    // Redis went back in time for order 1: paid with p1 in MySQL, pending
    // with no payment in Redis (stored form: status letter + user first,
    // the payment id after the seventh '|').
    let seq: u64 = ids[0].rsplit('-').next().unwrap().parse().unwrap();
    let k = app.sale_keys(&sale);
    let mut c = app.engine.connection();
    let stored: String = c.hget(k.orders_bucket(seq), seq).await.unwrap();
    let mut fields: Vec<&str> = stored.splitn(8, '|').collect();
    let pending = format!("p{}", &fields[0][1..]);
    fields[0] = &pending;
    fields[3] = "";
    fields[7] = "";
    let _: () = c
        .hset(k.orders_bucket(seq), seq, fields.join("|"))
        .await
        .unwrap();

    let (code, json) = audit(&app.target, &["--json"]).await;
    assert_eq!(code, 1, "{json}");
    let doc: Value = serde_json::from_str(&json).unwrap();
    let finding = doc["sales"][0]["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["kind"] == "order_mismatch")
        .unwrap_or_else(|| panic!("{json}"))
        .clone();
    assert!(finding["fix"].is_null(), "{finding}");
    assert!(
        finding["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("payment id p1")
            || finding.to_string().contains("payment id p1"),
        "{finding}"
    );
    let (code, _) = audit(&app.target, &["--repair", "--yes"]).await;
    assert_eq!(code, 1, "a person decides: the finding stays");
    let pool = sqlx::MySqlPool::connect(&app.target.database_url)
        .await
        .unwrap();
    let (status, payment): (String, Option<String>) =
        sqlx::query_as("SELECT status, payment_id FROM orders WHERE seq = ?")
            .bind(seq)
            .fetch_one(&pool)
            .await
            .unwrap();
    pool.close().await;
    assert_eq!((status.as_str(), payment.as_deref()), ("paid", Some("p1")));
    app.finish().await;
}
