//! Payment callback and cancel: signed, idempotent, one terminal state per
//! order, and the deadline (by Redis's clock) decides a late payment.

use std::time::Duration;

use futures::future::join_all;
use serde_json::json;

use crate::helpers::*;

async fn one_order(app: &TestApp, sale: &str, user: u64) -> (String, i64) {
    let (s, order) = app.reserve(sale, user, None).await;
    assert_eq!(s, 201, "{order}");
    (
        order["order_id"].as_str().unwrap().to_owned(),
        order["amount_cents"].as_i64().unwrap(),
    )
}

fn count(events: &[(String, u64)], ev: &str) -> usize {
    events.iter().filter(|(e, _)| e == ev).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_replayed_concurrently_pays_once() {
    let app = spawn_app().await;
    let sale = app.create_sale(SaleSpec::default()).await;
    let (id, amount) = one_order(&app, &sale, 1).await;

    let results = join_all((0..10).map(|_| app.pay(&id, "pay_1", amount))).await;
    for (s, body) in &results {
        assert_eq!(*s, 200, "{body}");
        assert_eq!(body["status"], "paid");
        assert!(body["paid_at"].is_string());
    }
    assert_eq!(app.sale_field(&sale, "paid").await, 1);
    assert_eq!(app.sale_field(&sale, "pending").await, 0);
    assert_eq!(count(&app.flow_events(&sale).await, "pay"), 1);
    let deadlines = app.due_len(&sale).await;
    assert_eq!(deadlines, 0, "a paid order leaves the deadline set");

    // Another payment for the paid order is refused; the buyer still holds one.
    let (s, body) = app.pay(&id, "pay_2", amount).await;
    assert_eq!((s, code(&body)), (409, "order_not_pending"));
    assert_eq!(body["error"]["status"], "paid");
    let (s, body) = app.cancel(&id, 1).await;
    assert_eq!((s, code(&body)), (409, "order_not_pending"));
    assert_eq!(app.sale_field(&sale, "paid").await, 1);
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_callbacks_change_nothing() {
    let app = spawn_app().await;
    let sale = app.create_sale(SaleSpec::default()).await;
    let (id, amount) = one_order(&app, &sale, 1).await;
    let body = json!({"order_id": id, "payment_id": "p", "amount_cents": amount,
        "status": "succeeded"})
    .to_string();
    let post = |sig: Option<String>, body: String| {
        let mut req = app
            .client
            .post(app.url("/api/v1/payments/callback"))
            .body(body);
        if let Some(sig) = sig {
            req = req.header("X-Signature", sig);
        }
        req.send()
    };
    let cases = [
        ("no signature", None, body.clone()),
        (
            "bad signature",
            Some("sha256=00ff".to_owned()),
            body.clone(),
        ),
        ("not hex", Some("sha256=xyz".to_owned()), body.clone()),
        (
            "no prefix",
            Some(sign(body.as_bytes())[7..].to_owned()),
            body.clone(),
        ),
        (
            "body changed after signing",
            Some(sign(body.as_bytes())),
            body.replace("\"p\"", "\"q\""),
        ),
    ];
    for (case, sig, b) in cases {
        let res = post(sig, b).await.unwrap();
        assert_eq!(res.status(), 401, "{case}");
        let v: serde_json::Value = res.json().await.unwrap();
        assert_eq!(code(&v), "unauthorized", "{case}");
    }
    let (s, v) = app.pay(&id, "p", amount + 1).await;
    assert_eq!((s, code(&v)), (400, "amount_mismatch"));
    let (s, v) = app.pay_with_status(&id, "p", amount, "failed").await;
    assert_eq!((s, v["status"].as_str()), (200, Some("pending")));
    let (s, v) = app.pay(&format!("{sale}-999"), "p", amount).await;
    assert_eq!((s, code(&v)), (404, "not_found"));
    let (s, v) = app.pay("nonsense", "p", amount).await;
    assert_eq!((s, code(&v)), (400, "invalid_request"));
    let (s, v) = app.pay(&id, "", amount).await;
    assert_eq!((s, code(&v)), (400, "invalid_request"));

    assert_eq!(app.sale_field(&sale, "pending").await, 1);
    assert_eq!(app.sale_field(&sale, "paid").await, 0);
    assert_eq!(
        app.flow_events(&sale).await.len(),
        1,
        "only the reserve record"
    );
    let (s, v) = app.pay(&id, "p", amount).await;
    assert_eq!((s, v["status"].as_str()), (200, Some("paid")));
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_returns_the_unit_and_only_the_owner_may_cancel() {
    let app = spawn_app().await;
    let sale = app
        .create_sale(SaleSpec {
            stock: 1,
            ..SaleSpec::default()
        })
        .await;
    let (id, amount) = one_order(&app, &sale, 1).await;
    let (s, v) = app.reserve(&sale, 2, None).await;
    assert_eq!((s, code(&v)), (409, "sold_out"));

    let (s, v) = app.cancel(&id, 2).await;
    assert_eq!((s, code(&v)), (404, "not_found"), "another buyer's order");
    let admin_cancel = app
        .client
        .post(app.url(&format!("/api/v1/orders/{id}/cancel")))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(admin_cancel.status(), 401, "cancel is the owner's");
    assert_eq!(app.sale_field(&sale, "avail").await, 0);

    let (s, v) = app.cancel(&id, 1).await;
    assert_eq!((s, v["status"].as_str()), (200, Some("cancelled")));
    assert!(v["closed_at"].is_string());
    assert_eq!(app.sale_field(&sale, "avail").await, 1);
    assert_eq!(app.sale_field(&sale, "cancelled").await, 1);

    let (s, v) = app.cancel(&id, 1).await;
    assert_eq!((s, code(&v)), (409, "order_not_pending"));
    assert_eq!(v["error"]["status"], "cancelled");
    let (s, v) = app.pay(&id, "late", amount).await;
    assert_eq!((s, code(&v)), (409, "order_not_pending"));
    assert_eq!(app.sale_field(&sale, "avail").await, 1, "returned once");

    // The unit is on sale again, and the first buyer's limit is free again.
    let (s, _) = app.reserve(&sale, 1, None).await;
    assert_eq!(s, 201);
    let events = app.flow_events(&sale).await;
    assert_eq!(
        (count(&events, "reserve"), count(&events, "cancel")),
        (2, 1)
    );
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_payment_before_any_worker_ran_closes_the_order() {
    // No expiry worker runs in this app.
    let app = spawn_app().await;
    let sale = app
        .create_sale(SaleSpec {
            payment_window_secs: 1,
            ..SaleSpec::default()
        })
        .await;
    let (id, amount) = one_order(&app, &sale, 1).await;
    let deadline = app.orders(&sale).await.values().next().unwrap().deadline_ms;
    while app.redis_now_ms().await < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        app.sale_field(&sale, "pending").await,
        1,
        "nobody closed it yet"
    );

    let (s, v) = app.pay(&id, "pay_late", amount).await;
    assert_eq!((s, code(&v)), (409, "order_expired"));
    let order = app.orders(&sale).await.into_values().next().unwrap();
    assert_eq!(order.status.as_str(), "closed");
    assert_eq!(app.sale_field(&sale, "avail").await, 10);

    // Replays and a cancel change nothing more: the stock came back once.
    let (s, v) = app.pay(&id, "pay_late", amount).await;
    assert_eq!((s, code(&v)), (409, "order_expired"));
    let (s, v) = app.cancel(&id, 1).await;
    assert_eq!((s, code(&v)), (409, "order_not_pending"));
    assert_eq!(app.sale_field(&sale, "avail").await, 10);
    assert_eq!(app.sale_field(&sale, "closed").await, 1);
    let events = app.flow_events(&sale).await;
    assert_eq!((count(&events, "close"), count(&events, "pay")), (1, 0));
    let left = app.due_len(&sale).await;
    assert_eq!(left, 0);
    app.finish().await;
}

/// A cancel that Redis runs twice (resent after a dropped connection)
/// answers "cancelled" both times; another call for the same order, later,
/// is told the order is no longer pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_cancel_call_twice_answers_cancelled_twice() {
    let app = spawn_app().await;
    let sale = app.create_sale(SaleSpec::default()).await;
    let (order_id, _) = one_order(&app, &sale, 5).await;
    let k = app.sale_keys(&sale);
    let script = redis::Script::new(&format!(
        "{}\n{}",
        include_str!("../../lua/prelude.lua"),
        include_str!("../../lua/cancel.lua")
    ));
    let call = |id: &'static str| {
        let mut inv = script.prepare_invoke();
        for key in k.order_script_keys() {
            inv.key(key);
        }
        inv.key(&k.calls)
            .key(k.due_bucket(1))
            .key(k.orders_bucket(1));
        inv.arg(1).arg(5).arg(id);
        inv
    };
    let mut c = app.engine.connection();
    let tag = |r: &[String]| r[0].clone();
    let first: Vec<String> = call("c0ffee1").invoke_async(&mut c).await.unwrap();
    let again: Vec<String> = call("c0ffee1").invoke_async(&mut c).await.unwrap();
    let other: Vec<String> = call("c0ffee2").invoke_async(&mut c).await.unwrap();
    assert_eq!(tag(&first), "ok");
    assert_eq!(tag(&again), "ok", "the resent call answers as the first");
    assert_eq!(tag(&other), "order_not_pending");
    assert_eq!(
        app.sale_field(&sale, "cancelled").await,
        1,
        "cancelled once"
    );
    assert_eq!(app.sale_field(&sale, "pending").await, 0);
    // Through the API, a second cancel is a new call: 409.
    let (s, body) = app.cancel(&order_id, 5).await;
    assert_eq!((s, code(&body)), (409, "order_not_pending"), "{body}");
    app.finish().await;
}
