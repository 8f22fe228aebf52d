//! The record is forward-only: flow records that would move an order
//! backwards, rewrite what never changes, cannot be read at all, or that
//! MySQL refuses for good are quarantined with their reason; the sale's
//! later records still reach MySQL, and the audit lists what was refused.

use flashsale::config::Role;
use flashsale::engine::OrderStatus;
use redis::AsyncCommands;
use serde_json::Value;

use crate::audit::{audit, wait_backlog_empty};
use crate::helpers::*;
use crate::reconcile::assert_mysql_matches_redis;

/// Reserves for `user`; returns the order id and amount.
async fn order(app: &TestApp, sale: &str, user: u64) -> (String, i64) {
    let (s, o) = app.reserve(sale, user, None).await;
    assert_eq!(s, 201, "{o}");
    (
        o["order_id"].as_str().unwrap().to_owned(),
        o["amount_cents"].as_i64().unwrap(),
    )
}

async fn pay(app: &TestApp, id: &str, payment: &str, amount: i64) {
    let (s, b) = app.pay(id, payment, amount).await;
    assert_eq!(s, 200, "{b}");
}

fn seq(order_id: &str) -> u64 {
    order_id.split_once('-').unwrap().1.parse().unwrap()
}

/// `(seq, event, reason)` of the sale's quarantined records, oldest first.
async fn quarantined(pool: &sqlx::MySqlPool, sale: &str) -> Vec<(Option<u64>, String, String)> {
    sqlx::query_as("SELECT seq, event, reason FROM quarantined_flows WHERE sale_id = ? ORDER BY id")
        .bind(sale.parse::<u64>().unwrap())
        .fetch_all(pool)
        .await
        .unwrap()
}

async fn mysql_order(pool: &sqlx::MySqlPool, sale: &str, seq: u64) -> (String, Option<String>) {
    sqlx::query_as("SELECT status, payment_id FROM orders WHERE sale_id = ? AND seq = ?")
        .bind(sale.parse::<u64>().unwrap())
        .bind(seq)
        .fetch_one(pool)
        .await
        .unwrap()
}

fn settling(c: &mut flashsale::config::ServeConfig) {
    c.roles = vec![Role::Http, Role::Reconciler];
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poison_record_and_a_backwards_record_are_quarantined_and_the_sale_goes_on() {
    let app = spawn_with(Target::fresh(), settling).await;
    let sale = app
        .create_sale(SaleSpec {
            stock: 20,
            ..SaleSpec::default()
        })
        .await;
    let k = app.sale_keys(&sale);
    let mut c = app.engine.connection();

    // Settled in MySQL: order 1 paid (pay-1), orders 2 and 3 pending.
    let (o1, a1) = order(&app, &sale, 1).await;
    let (o2, a2) = order(&app, &sale, 2).await;
    let (o3, _) = order(&app, &sale, 3).await;
    pay(&app, &o1, "pay-1", a1).await;
    wait_backlog_empty(&app, &sale).await;
    let pool = sqlx::MySqlPool::connect(&app.target.database_url)
        .await
        .unwrap();
    assert_eq!(
        mysql_order(&pool, &sale, seq(&o1)).await,
        ("paid".into(), Some("pay-1".into()))
    );

    // The poison: an entry with an unknown event, then a record that would
    // take paid order 1 back to closed with another payment id (what a
    // Redis gone back in time writes), in the shape the scripts write.
    let mut backwards = app.orders(&sale).await[&seq(&o1)].clone();
    let now = app.redis_now_ms().await;
    backwards.status = OrderStatus::Closed;
    backwards.closed_ms = Some(now);
    backwards.last_flow = String::new();
    backwards.payment_id = Some("pay-x".into());
    let as_is = app.orders(&sale).await[&seq(&o2)].pack();
    let (_, _): (String, String) = redis::pipe()
        .xadd(
            &k.flow,
            "*",
            &[("ev", "bogus"), ("o", &seq(&o2).to_string()), ("s", &as_is)],
        )
        .xadd(
            &k.flow,
            "*",
            &[
                ("ev", "close"),
                ("o", &seq(&o1).to_string()),
                ("s", &backwards.pack()),
            ],
        )
        .query_async(&mut c)
        .await
        .unwrap();

    // Later records of the sale: a payment, a cancel, new orders, a refund.
    pay(&app, &o2, "pay-2", a2).await;
    let (s, b) = app.cancel(&o3, 3).await;
    assert_eq!(s, 200, "{b}");
    let (o4, _) = order(&app, &sale, 4).await;
    let (o5, a5) = order(&app, &sale, 5).await;
    pay(&app, &o5, "pay-5", a5).await;
    wait_backlog_empty(&app, &sale).await;
    let res = app
        .client
        .post(app.url(&format!("/api/v1/orders/{o5}/refund")))
        .bearer_auth(buyer_token(5))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "a settled paid order refunds at once");
    wait_backlog_empty(&app, &sale).await;

    // Both quarantined, with their reasons; nothing of theirs applied.
    let q = quarantined(&pool, &sale).await;
    assert_eq!(q.len(), 2, "{q:?}");
    assert_eq!(q[0].0, Some(seq(&o2)));
    assert_eq!(q[0].1, "bogus");
    assert!(q[0].2.contains("unknown event \"bogus\""), "{}", q[0].2);
    assert_eq!((q[1].0, q[1].1.as_str()), (Some(seq(&o1)), "close"));
    assert!(
        q[1].2.contains("illegal transition paid -> closed")
            && q[1].2.contains("payment id changed pay-1 -> pay-x"),
        "{}",
        q[1].2
    );
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("flashsale_flow_quarantined_total 2"),
        "{metrics}"
    );
    assert_eq!(
        mysql_order(&pool, &sale, seq(&o1)).await,
        ("paid".into(), Some("pay-1".into())),
        "the paid order stays paid with its payment id"
    );
    assert_eq!(mysql_order(&pool, &sale, seq(&o2)).await.0, "paid");
    assert_eq!(mysql_order(&pool, &sale, seq(&o3)).await.0, "cancelled");
    assert_eq!(mysql_order(&pool, &sale, seq(&o4)).await.0, "pending");
    assert_eq!(mysql_order(&pool, &sale, seq(&o5)).await.0, "refunded");
    // Orders, inventory and flow rows equal Redis's: the quarantined
    // records moved no unit and left no flow row.
    assert_mysql_matches_redis(&app, &sale).await;

    // The audit lists them, and only them, for a person; no repair.
    let (code, json) = audit(&app.target, &["--json"]).await;
    assert_eq!(code, 1, "{json}");
    let doc: Value = serde_json::from_str(&json).unwrap();
    let report = &doc["sales"][0];
    assert_eq!(report["orders_checked"], 5, "the rest is still audited");
    let findings = report["findings"].as_array().unwrap();
    assert_eq!(findings.len(), 2, "{json}");
    for f in findings {
        assert_eq!(f["kind"], "quarantined_record", "{f}");
        assert!(f.get("fix").is_none(), "{f}");
    }
    assert!(findings[1]["message"]
        .as_str()
        .unwrap()
        .contains("illegal transition paid -> closed"));
    assert_eq!(findings[1]["order_id"], o1.as_str());
    let (code, human) = audit(&app.target, &[]).await;
    assert_eq!(code, 1);
    assert!(human.contains("[quarantined_record]"), "{human}");
    let (code, plan) = audit(&app.target, &["--repair"]).await;
    assert_eq!(code, 1);
    assert!(
        plan.contains("fix: none automatic; a person must look"),
        "{plan}"
    );
    let (code, out) = audit(&app.target, &["--repair", "--yes"]).await;
    assert_eq!(code, 1, "quarantined records are not repaired away: {out}");
    assert_eq!(quarantined(&pool, &sale).await.len(), 2);
    let logged: (i64,) = sqlx::query_as("SELECT COUNT(*) FROM repair_log")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(logged.0, 0, "nothing repaired");
    assert_eq!(
        mysql_order(&pool, &sale, seq(&o1)).await,
        ("paid".into(), Some("pay-1".into()))
    );
    pool.close().await;
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_record_mysql_refuses_for_good_is_quarantined_and_its_batch_applied() {
    // No reconciler yet: the records pile up and go in one batch.
    let app = spawn_on(Target::fresh()).await;
    let sale = app
        .create_sale(SaleSpec {
            stock: 20,
            ..SaleSpec::default()
        })
        .await;
    let k = app.sale_keys(&sale);
    let mut c = app.engine.connection();
    let (o1, _) = order(&app, &sale, 1).await;
    // A legal step that MySQL cannot store (a payment id longer than its
    // column), between records that it can.
    let mut too_long = app.orders(&sale).await[&seq(&o1)].clone();
    too_long.status = OrderStatus::Paid;
    too_long.paid_ms = Some(app.redis_now_ms().await);
    too_long.last_flow = String::new();
    too_long.payment_id = Some("p".repeat(300));
    let _: String = c
        .xadd(
            &k.flow,
            "*",
            &[
                ("ev", "pay"),
                ("o", &seq(&o1).to_string()),
                ("s", &too_long.pack()),
            ],
        )
        .await
        .unwrap();
    let (o2, a2) = order(&app, &sale, 2).await;
    pay(&app, &o2, "pay-2", a2).await;

    let reconciler = spawn_with(app.target.clone(), settling).await;
    wait_backlog_empty(&app, &sale).await;
    let pool = sqlx::MySqlPool::connect(&app.target.database_url)
        .await
        .unwrap();
    let q = quarantined(&pool, &sale).await;
    assert_eq!(q.len(), 1, "{q:?}");
    assert_eq!((q[0].0, q[0].1.as_str()), (Some(seq(&o1)), "pay"));
    assert!(q[0].2.starts_with("MySQL refused it"), "{}", q[0].2);
    assert_eq!(
        mysql_order(&pool, &sale, seq(&o1)).await,
        ("pending".into(), None)
    );
    assert_eq!(
        mysql_order(&pool, &sale, seq(&o2)).await,
        ("paid".into(), Some("pay-2".into()))
    );
    assert_mysql_matches_redis(&app, &sale).await;
    pool.close().await;
    reconciler.finish().await;
    app.finish().await;
}
