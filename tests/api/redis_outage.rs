//! Redis going away: the API answers 503 quickly, never panics, and recovers
//! by itself. Each test runs a redis-server of its own; the shared one is
//! never touched.

use std::time::{Duration, Instant};

use futures::future::join_all;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_means_quick_503_and_recovery_when_it_returns() {
    let mut redis = OwnRedis::start().await;
    let app = spawn_on(Target::fresh_on(&redis.url())).await;
    let sale = app.create_sale(SaleSpec::default()).await;
    let (s, first) = app.reserve(&sale, 1, None).await;
    assert_eq!(s, 201);

    redis.kill();
    for user in 2..5 {
        let started = Instant::now();
        let res = app
            .client
            .post(app.url(&format!("/api/v1/sales/{sale}/orders")))
            .bearer_auth(buyer_token(user))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 503);
        assert_eq!(res.headers()["retry-after"], "1");
        let body: serde_json::Value = res.json().await.unwrap();
        assert_eq!(code(&body), "unavailable");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }
    let sale_view = app.client.get(app.url(&format!("/api/v1/sales/{sale}")));
    assert_eq!(sale_view.send().await.unwrap().status(), 503);
    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let health = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);

    redis.restart().await;
    let deadline = Instant::now() + Duration::from_secs(15);
    let order = loop {
        let (s, body) = app.reserve(&sale, 9, None).await;
        if s == 201 {
            break body;
        }
        assert_eq!(s, 503, "{body}");
        assert!(Instant::now() < deadline, "did not recover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_ne!(order["order_id"], first["order_id"]);
    // Nothing was lost or half-done while Redis was away.
    assert_eq!(app.sale_field(&sale, "avail").await, 8);
    assert_eq!(app.sale_field(&sale, "pending").await, 2);
    // Readiness is probed at most once a second: within one, it says so.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
        if ready.status() == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "readiness did not recover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_shed_with_503_instead_of_queued() {
    let redis = OwnRedis::start().await;
    let app = spawn_with(Target::fresh_on(&redis.url()), |c| c.http.max_in_flight = 2).await;
    let sale = app
        .create_sale(SaleSpec {
            stock: 100,
            ..SaleSpec::default()
        })
        .await;
    // Stall Redis so that the first requests hold their slots.
    let blocker = tokio::spawn({
        let url = redis.url();
        async move {
            let client = redis::Client::open(url).unwrap();
            let mut c = client.get_multiplexed_async_connection().await.unwrap();
            // The reply may time out on the client side; the stall is what counts.
            let _: redis::RedisResult<()> = redis::cmd("DEBUG")
                .arg("SLEEP")
                .arg("0.6")
                .query_async(&mut c)
                .await;
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let results = join_all((1..=12u64).map(|u| app.reserve(&sale, u, None))).await;
    blocker.await.unwrap();
    let created = results.iter().filter(|(s, _)| *s == 201).count();
    let shed = results
        .iter()
        .filter(|(s, b)| *s == 503 && code(b) == "unavailable")
        .count();
    assert_eq!(created + shed, 12, "{results:?}");
    assert!(shed >= 1, "nothing was shed: {results:?}");
    assert!(created >= 1, "nothing got through: {results:?}");
    assert_eq!(app.sale_field(&sale, "avail").await, 100 - created as i64);
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_in_flight_requests_finish() {
    let redis = OwnRedis::start().await;
    let mut app = spawn_on(Target::fresh_on(&redis.url())).await;
    let sale = app.create_sale(SaleSpec::default()).await;
    let blocker = {
        let url = redis.url();
        tokio::spawn(async move {
            let client = redis::Client::open(url).unwrap();
            let mut c = client.get_multiplexed_async_connection().await.unwrap();
            // The reply may time out on the client side; the stall is what counts.
            let _: redis::RedisResult<()> = redis::cmd("DEBUG")
                .arg("SLEEP")
                .arg("0.4")
                .query_async(&mut c)
                .await;
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let in_flight = {
        let client = app.client.clone();
        let url = app.url(&format!("/api/v1/sales/{sale}/orders"));
        tokio::spawn(async move {
            client
                .post(url)
                .bearer_auth(buyer_token(1))
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    app.stop().await;
    assert_eq!(in_flight.await.unwrap(), 201);
    blocker.await.unwrap();
    app.target.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_set_to_lose_writes_is_named_and_refused_on_request() {
    let lossy =
        OwnRedis::start_with(&["--appendonly", "no", "--maxmemory-policy", "allkeys-lru"]).await;
    let target = Target::fresh_on(&lossy.url());
    let mut cfg = target.config();
    cfg.require_durable_redis = true;
    let refused = flashsale::startup::App::build(cfg).await;
    let err = format!("{:#}", refused.err().expect("refused"));
    assert!(err.contains("maxmemory-policy allkeys-lru"), "{err}");
    assert!(err.contains("appendonly no"), "{err}");
    // Without the flag it starts (and says so in its log).
    let app = spawn_on(target.clone()).await;
    app.finish().await;

    // AOF with fsync every second passes, with a warning.
    let durable = OwnRedis::start_with(&["--appendfsync", "everysec"]).await;
    let target = Target::fresh_on(&durable.url());
    let app = spawn_with(target, |c| c.require_durable_redis = true).await;
    app.finish().await;
}
