//! Every malformed, oversized, unauthenticated, out-of-range or unknown-id
//! request gets its contract error and changes nothing.

use std::collections::HashMap;

use redis::AsyncCommands;
use reqwest::{Method, RequestBuilder};
use serde_json::{json, Value};

use crate::helpers::*;

/// Everything Redis holds for one sale (counters, orders, buyers, flow).
async fn sale_state(app: &TestApp, sale: &str) -> (HashMap<String, String>, i64, i64, i64, i64) {
    let k = app.sale_keys(sale);
    let mut c = app.engine.connection();
    (
        c.hgetall(&k.sale).await.unwrap(),
        app.order_seqs(sale).await.len() as i64,
        c.hlen(&k.buyers).await.unwrap(),
        app.due_len(sale).await,
        c.xlen(&k.flow).await.unwrap(),
    )
}

async fn sales_in_mysql(app: &TestApp) -> i64 {
    let pool = sqlx::MySqlPool::connect(&app.target.database_url)
        .await
        .unwrap();
    let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM sales")
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    n
}

async fn expect(req: RequestBuilder, status: u16, error_code: &str, case: &str) {
    let res = req.send().await.unwrap();
    assert_eq!(res.status().as_u16(), status, "{case}");
    assert!(
        res.headers()[reqwest::header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("application/json"),
        "{case}"
    );
    let body: Value = res.json().await.unwrap();
    assert_eq!(code(&body), error_code, "{case}: {body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{case}"
    );
}

fn expired_token(user: &str) -> String {
    let now = chrono::Utc::now().timestamp();
    let claims = json!({"sub": user, "exp": now - 5, "iat": now - 100});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .unwrap()
}

fn token_with(claims: Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_sale_creation_is_refused_and_creates_nothing() {
    let app = spawn_app().await;
    let good = json!({"sku": "S", "title": "T", "price_cents": 100, "stock": 5,
        "start_at": "2026-01-01T00:00:00Z", "end_at": "2030-01-01T00:00:00Z",
        "per_user_limit": 1, "payment_window_secs": 60});
    let post = || app.client.post(app.url("/api/v1/sales"));
    let with = |field: &str, v: Value| {
        let mut b = good.clone();
        b[field] = v;
        b
    };

    expect(post().json(&good), 401, "unauthorized", "no token").await;
    expect(
        post().bearer_auth("wrong").json(&good),
        401,
        "unauthorized",
        "bad admin token",
    )
    .await;
    expect(
        post().bearer_auth(buyer_token(1)).json(&good),
        401,
        "unauthorized",
        "buyer as admin",
    )
    .await;
    let admin = || post().bearer_auth(ADMIN_TOKEN);
    expect(
        admin().body("{not json"),
        400,
        "invalid_request",
        "malformed JSON",
    )
    .await;
    expect(admin().body(""), 400, "invalid_request", "empty body").await;
    let bad_fields = [
        ("stock", json!("5")),
        ("stock", json!(0)),
        ("stock", json!(10_000_001)),
        ("stock", json!(1.5)),
        ("per_user_limit", json!(0)),
        ("payment_window_secs", json!(0)),
        ("price_cents", json!(-1)),
        ("sku", json!("")),
        ("start_at", json!("yesterday")),
        ("end_at", json!("2026-01-01T00:00:00Z")),
        ("start_at", json!("0000-06-01T00:00:00Z")),
        ("end_at", json!("9999-12-31T23:00:00-05:00")),
        ("surprise", json!(1)),
    ];
    for (field, v) in bad_fields {
        let case = format!("{field} = {v}");
        expect(admin().json(&with(field, v)), 400, "invalid_request", &case).await;
    }
    let huge = with("title", json!("x".repeat(17 * 1024)));
    expect(admin().json(&huge), 413, "payload_too_large", "17 KiB body").await;
    assert_eq!(sales_in_mysql(&app).await, 0);

    // The good request still works, also for a sale that ends after 2038
    // (MySQL's TIMESTAMP range, not its DATETIME's).
    assert_eq!(admin().json(&good).send().await.unwrap().status(), 201);
    let late = with("end_at", json!("2100-01-01T00:00:00Z"));
    assert_eq!(admin().json(&late).send().await.unwrap().status(), 201);
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_reservations_are_refused_and_change_nothing() {
    let app = spawn_app().await;
    let sale = app.create_sale(SaleSpec::default()).await;
    let before = sale_state(&app, &sale).await;
    let path = format!("/api/v1/sales/{sale}/orders");
    let post = |token: &str| {
        app.client
            .request(Method::POST, app.url(&path))
            .bearer_auth(token)
    };
    let buyer = buyer_token(3);

    let no_auth = app.client.post(app.url(&path)).json(&json!({"qty": 1}));
    expect(no_auth, 401, "unauthorized", "no token").await;
    let unauthorized = [
        ("garbage", "not-a-jwt".to_owned()),
        ("expired", expired_token("3")),
        (
            "wrong secret",
            token_with(json!({"sub": "3", "exp": 9_999_999_999u64}), "other"),
        ),
        (
            "sub zero",
            token_with(json!({"sub": "0", "exp": 9_999_999_999u64}), JWT_SECRET),
        ),
        (
            "sub not a number",
            token_with(json!({"sub": "bob", "exp": 9_999_999_999u64}), JWT_SECRET),
        ),
        ("no exp", token_with(json!({"sub": "3"}), JWT_SECRET)),
        ("admin token", ADMIN_TOKEN.to_owned()),
    ];
    for (case, token) in &unauthorized {
        expect(
            post(token).json(&json!({"qty": 1})),
            401,
            "unauthorized",
            case,
        )
        .await;
    }
    let invalid = [
        ("qty 0", json!({"qty": 0})),
        ("qty negative", json!({"qty": -1})),
        ("qty string", json!({"qty": "1"})),
        ("qty too large", json!({"qty": 10_001})),
        ("qty fraction", json!({"qty": 1.5})),
        ("unknown field", json!({"qty": 1, "coupon": "x"})),
        ("not an object", json!([1])),
    ];
    for (case, body) in &invalid {
        expect(post(&buyer).json(body), 400, "invalid_request", case).await;
    }
    expect(
        post(&buyer).body("{\"qty\":"),
        400,
        "invalid_request",
        "truncated JSON",
    )
    .await;
    for key in ["", "has space", "semi;colon", &"k".repeat(65)] {
        let req = post(&buyer).header("Idempotency-Key", key).json(&json!({}));
        expect(req, 400, "invalid_request", &format!("key {key:?}")).await;
    }
    let huge = format!("{{\"qty\": 1, \"pad\": \"{}\"}}", "x".repeat(17 * 1024));
    expect(
        post(&buyer).body(huge),
        413,
        "payload_too_large",
        "17 KiB body",
    )
    .await;
    for bad_id in ["abc", "0", "-1", "1.5"] {
        let req = app
            .client
            .post(app.url(&format!("/api/v1/sales/{bad_id}/orders")))
            .bearer_auth(&buyer);
        expect(req, 400, "invalid_request", &format!("sale id {bad_id}")).await;
    }
    let unknown = app
        .client
        .post(app.url("/api/v1/sales/987654321/orders"))
        .bearer_auth(&buyer);
    expect(unknown, 404, "not_found", "unknown sale").await;

    assert_eq!(sale_state(&app, &sale).await, before, "nothing changed");

    // An empty body means one unit.
    let res = post(&buyer_token(4)).send().await.unwrap();
    assert_eq!(res.status(), 201);
    // JSON has one number type: a whole float is an integer.
    let res = post(&buyer_token(5))
        .json(&json!({"qty": 1.0}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    // The contract requires only sub and exp: a token without iat is fine.
    let minimal = token_with(json!({"sub": "3", "exp": 9_999_999_999u64}), JWT_SECRET);
    let res = post(&minimal)
        .json(&json!({"qty": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_ids_and_routes_answer_in_the_contract_format() {
    let app = spawn_app().await;
    let get = |path: &str, token: &str| app.client.get(app.url(path)).bearer_auth(token);
    let buyer = buyer_token(4);
    expect(
        get("/api/v1/sales/abc", &buyer),
        400,
        "invalid_request",
        "sale id syntax",
    )
    .await;
    expect(
        get("/api/v1/sales/424242", &buyer),
        404,
        "not_found",
        "unknown sale",
    )
    .await;
    expect(
        get("/api/v1/orders/xyz", &buyer),
        400,
        "invalid_request",
        "order id syntax",
    )
    .await;
    expect(
        get("/api/v1/orders/1-", &buyer),
        400,
        "invalid_request",
        "order id syntax",
    )
    .await;
    expect(
        get("/api/v1/orders/424242-1", &buyer),
        404,
        "not_found",
        "unknown order",
    )
    .await;
    expect(
        get("/api/v1/orders/1-1", "bad"),
        401,
        "unauthorized",
        "bad token",
    )
    .await;
    expect(
        get("/no/such/route", &buyer),
        404,
        "not_found",
        "unknown route",
    )
    .await;
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_method_a_path_does_not_take_gets_405_with_allow_and_the_contract_body() {
    let app = spawn_app().await;
    let sale = app.create_sale(SaleSpec::default()).await;
    let cases = [
        (Method::DELETE, format!("/api/v1/sales/{sale}"), "GET,HEAD"),
        (Method::PUT, format!("/api/v1/sales/{sale}"), "GET,HEAD"),
        (Method::GET, format!("/api/v1/sales/{sale}/orders"), "POST"),
        (Method::GET, "/api/v1/sales".to_owned(), "POST"),
        (Method::PATCH, "/api/v1/orders/1-1".to_owned(), "GET,HEAD"),
        (Method::GET, "/api/v1/orders/1-1/cancel".to_owned(), "POST"),
        (Method::GET, "/api/v1/payments/callback".to_owned(), "POST"),
        (Method::POST, "/healthz".to_owned(), "GET,HEAD"),
        (Method::OPTIONS, "/metrics".to_owned(), "GET,HEAD"),
        (Method::TRACE, "/api/v1/openapi.json".to_owned(), "GET,HEAD"),
    ];
    for (method, path, allow) in cases {
        let case = format!("{method} {path}");
        let req = || {
            app.client
                .request(method.clone(), app.url(&path))
                .bearer_auth(buyer_token(1))
        };
        let res = req().send().await.unwrap();
        assert_eq!(
            res.headers()
                .get(reqwest::header::ALLOW)
                .map(|v| v.to_str().unwrap()),
            Some(allow),
            "{case}"
        );
        expect(req(), 405, "method_not_allowed", &case).await;
    }
    // A path that does not exist stays 404 whatever the method.
    let unknown = app.client.delete(app.url("/no/such/route"));
    expect(unknown, 404, "not_found", "unknown route, other method").await;
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_segment_that_is_not_utf8_gets_the_contract_error() {
    let app = spawn_app().await;
    let sale = app.create_sale(SaleSpec::default()).await;
    let before = sale_state(&app, &sale).await;
    let buyer = buyer_token(5);
    let cases = [
        (Method::POST, "/api/v1/sales/%FF/orders"),
        (Method::GET, "/api/v1/sales/%FF"),
        (Method::GET, "/api/v1/sales/1%C3%28"),
        (Method::GET, "/api/v1/orders/1-%FE"),
        (Method::POST, "/api/v1/orders/%80-1/cancel"),
        (Method::POST, "/api/v1/orders/1-%ED%A0%80/refund"),
    ];
    for (method, path) in cases {
        let req = app
            .client
            .request(method.clone(), app.url(path))
            .bearer_auth(&buyer);
        expect(req, 400, "invalid_request", &format!("{method} {path}")).await;
    }
    // Percent-encoded UTF-8 is decoded as usual ("%31" is "1").
    let encoded: String = sale.bytes().map(|b| format!("%{b:02X}")).collect();
    let res = app
        .client
        .get(app.url(&format!("/api/v1/sales/{encoded}")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(sale_state(&app, &sale).await, before, "nothing changed");
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_of_another_redis_layout_is_refused_not_misread() {
    let app = spawn_app().await;
    let sale = app
        .create_sale(SaleSpec {
            per_user_limit: 2,
            ..SaleSpec::default()
        })
        .await;
    let (s, order) = app.reserve(&sale, 1, None).await;
    assert_eq!(s, 201);
    let order_id = order["order_id"].as_str().unwrap().to_owned();
    // The sale as a build with another layout would have left it.
    let k = app.sale_keys(&sale);
    let mut c = app.engine.connection();
    let _: () = c.hset(&k.sale, "layout", "2").await.unwrap();
    let before = sale_state(&app, &sale).await;

    // A refusal that every retry would meet again: 500 internal, not a
    // retryable 503.
    let (s, body) = app.reserve(&sale, 2, None).await;
    assert_eq!((s, code(&body)), (500, "internal"), "{body}");
    assert!(body["error"]["retry_key"].is_string(), "{body}");
    let (s, body) = app.pay(&order_id, "pay-1", 1999).await;
    assert_eq!((s, code(&body)), (500, "internal"), "{body}");
    let (s, body) = app.cancel(&order_id, 1).await;
    assert_eq!((s, code(&body)), (500, "internal"), "{body}");
    let expired = app.engine.expire(sale.parse().unwrap(), 100).await;
    assert!(expired.is_err(), "{expired:?}");
    assert_eq!(sale_state(&app, &sale).await, before, "nothing changed");
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lua_runtime_error_is_500_internal_not_a_retryable_503() {
    let app = spawn_app().await;
    let sale = app.create_sale(SaleSpec::default()).await;
    // A sale hash no build writes: the reserve script compares Redis's clock
    // with a start that is not a number, a Lua runtime error (ERR
    // user_script...), before its first write.
    let k = app.sale_keys(&sale);
    let mut c = app.engine.connection();
    let _: () = c.hset(&k.sale, "start_ms", "soon").await.unwrap();
    let before = sale_state(&app, &sale).await;

    for user in [1, 1, 2] {
        let res = app
            .client
            .post(app.url(&format!("/api/v1/sales/{sale}/orders")))
            .bearer_auth(buyer_token(user))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 500);
        assert!(res.headers().get(reqwest::header::RETRY_AFTER).is_none());
        let body: Value = res.json().await.unwrap();
        assert_eq!(code(&body), "internal", "{body}");
        assert_eq!(
            body["error"]["message"], "internal error",
            "no detail leaks"
        );
    }
    assert_eq!(sale_state(&app, &sale).await, before, "nothing changed");
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_numbers_no_sale_can_reach_are_unknown_orders_not_errors() {
    // Lua numbers are doubles: a number past 2^53 would round to another
    // orders bucket inside the scripts. Such an order cannot exist, so each
    // call answers as for any order that is not there.
    let app = spawn_app().await;
    let sale = app.create_sale(SaleSpec::default()).await;
    let (status, _) = app.reserve(&sale, 3, None).await;
    assert_eq!(status, 201);
    let before = sale_state(&app, &sale).await;
    let (unknown_pay, unknown_body) = app.pay(&format!("{sale}-4242"), "pay_x", 100).await;
    for seq in [
        "9007199254740993",
        "18295883520659363325",
        "18446744073709551615",
    ] {
        let id = format!("{sale}-{seq}");
        for (method, action) in [("GET", ""), ("POST", "/cancel"), ("POST", "/refund")] {
            let (status, body) = app.order_call(method, &id, action, 3).await;
            assert_eq!(
                (status, code(&body)),
                (404, "not_found"),
                "{method} {id}{action}"
            );
        }
        let (status, body) = app.pay(&id, "pay_x", 100).await;
        assert_eq!(
            (status, code(&body)),
            (unknown_pay, code(&unknown_body)),
            "pay {id}"
        );
    }
    assert_eq!(sale_state(&app, &sale).await, before, "nothing changed");
    assert!(
        !app.metrics().await.contains("status=\"500\""),
        "no call was an internal error"
    );
    app.finish().await;
}
