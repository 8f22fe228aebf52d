//! The front door under abuse: oversized asks, floods, slow and idle
//! clients, reservations whose Redis call timed out, probes, secrets.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use futures::future::join_all;
use redis::AsyncCommands;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::*;

/// POSTs a reservation of `qty` units; returns status, Retry-After and body.
pub(crate) async fn reserve_qty(
    app: &TestApp,
    sale: &str,
    user: u64,
    qty: i64,
    key: Option<&str>,
) -> (u16, Option<String>, Value) {
    let mut req = app
        .client
        .post(app.url(&format!("/api/v1/sales/{sale}/orders")))
        .bearer_auth(buyer_token(user))
        .json(&json!({ "qty": qty }));
    if let Some(k) = key {
        req = req.header("Idempotency-Key", k);
    }
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    let retry_after = res
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    (status, retry_after, res.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_buyers_oversized_ask_turns_no_other_buyer_away() {
    let app = spawn_app().await;
    for limit in [1, 100_000] {
        let sale = app
            .create_sale(SaleSpec {
                stock: 100,
                per_user_limit: limit,
                ..SaleSpec::default()
            })
            .await;
        // The attacker floods big asks while 30 ordinary buyers buy one each.
        let attack = async {
            let mut codes = BTreeMap::new();
            for _ in 0..20 {
                let (s, _, body) = reserve_qty(&app, &sale, 1, 10_000, None).await;
                *codes.entry((s, code(&body).to_owned())).or_insert(0) += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            codes
        };
        let buyers = join_all((100..130).map(|u| {
            let sale = sale.clone();
            let app = &app;
            async move {
                tokio::time::sleep(Duration::from_millis(u % 7 * 15)).await;
                reserve_qty(app, &sale, u, 1, None).await
            }
        }));
        let (codes, buyers) = tokio::join!(attack, buyers);
        for (s, _, body) in &buyers {
            assert_eq!(
                *s, 201,
                "limit {limit}: an ordinary buyer was refused: {body}"
            );
        }
        // The attacker is refused by their own limit, or for their ask
        // alone (or slowed down by the rate limit).
        let expected = if limit == 1 {
            "limit_exceeded"
        } else {
            "sold_out"
        };
        let refusals: Vec<&str> = codes
            .keys()
            .map(|(_, c)| c.as_str())
            .filter(|c| *c != "rate_limited")
            .collect();
        assert_eq!(refusals, vec![expected], "{codes:?}");
        assert_eq!(app.get_sale(&sale).await["stock_available"], 70);
    }
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buyer_past_the_rate_gets_429_and_reserves_nothing_more() {
    let app = spawn_app().await;
    let sale = app
        .create_sale(SaleSpec {
            stock: 1000,
            per_user_limit: 1000,
            ..SaleSpec::default()
        })
        .await;
    // The default: 10/s with a burst of 20 (and one more per 100 ms that
    // the 30 requests take to get through a busy machine).
    let started = Instant::now();
    let answers = join_all((0..30).map(|_| reserve_qty(&app, &sale, 5, 1, None))).await;
    let refilled = (started.elapsed().as_millis() / 100) as usize + 1;
    let made = answers.iter().filter(|(s, _, _)| *s == 201).count();
    let limited: Vec<_> = answers.iter().filter(|(s, _, _)| *s == 429).collect();
    assert!((20..=20 + refilled).contains(&made), "{made} made");
    assert!(!limited.is_empty() || refilled >= 10, "none limited");
    assert_eq!(made + limited.len(), 30);
    for (_, retry_after, body) in limited {
        assert_eq!(code(body), "rate_limited");
        let secs: u64 = retry_after.as_deref().unwrap().parse().unwrap();
        assert!(secs >= 1);
    }
    assert_eq!(app.sale_field(&sale, "pending").await, made as i64);
    // Another buyer has a budget of their own.
    assert_eq!(reserve_qty(&app, &sale, 6, 1, None).await.0, 201);
    // Past a second, the buyer may buy again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(reserve_qty(&app, &sale, 5, 1, None).await.0, 201);
    assert!(app
        .metrics()
        .await
        .contains("flashsale_rate_limited_total{scope=\"buyer\"}"));
    app.finish().await;

    // A rate of 0 turns the limit off.
    let app = spawn_with(Target::fresh(), |c| c.http.buyer_rate_per_sec = 0).await;
    let sale = app
        .create_sale(SaleSpec {
            stock: 1000,
            per_user_limit: 1000,
            ..SaleSpec::default()
        })
        .await;
    let answers = join_all((0..40).map(|_| reserve_qty(&app, &sale, 5, 1, None))).await;
    assert!(answers.iter().all(|(s, _, _)| *s == 201));
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_address_limit_spares_the_payment_callback() {
    let app = spawn_with(Target::fresh(), |c| {
        c.http.ip_rate_per_sec = 1;
        c.http.ip_burst = Some(3);
    })
    .await;
    let get = |p: String| app.client.get(app.url(&p)).send();
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(
            get("/api/v1/sales/1".into())
                .await
                .unwrap()
                .status()
                .as_u16(),
        );
    }
    assert_eq!(&statuses[..3], &[404, 404, 404], "{statuses:?}");
    assert_eq!(&statuses[3..], &[429, 429], "{statuses:?}");
    // The gateway shares the address, and is never limited by it.
    for _ in 0..5 {
        let (s, _) = app.pay("1-1", "p", 1).await;
        assert_eq!(s, 404);
    }
    // Probes are not API routes: never limited.
    assert_eq!(get("/healthz".into()).await.unwrap().status(), 200);
    app.finish().await;
}

/// Reads from `conn` until it closes; how long that took, or `None` if it
/// stayed open for `patience`.
async fn closed_within(conn: &mut TcpStream, patience: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(
            tokio::time::Instant::from_std(started + patience),
            conn.read(&mut buf),
        )
        .await
        {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n";

/// Sends one whole request and reads its response head.
async fn ask(conn: &mut TcpStream) -> String {
    conn.write_all(HEALTHZ).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_heads_and_idle_connections_are_closed() {
    let app = spawn_with(Target::fresh(), |c| {
        c.http.header_timeout_secs = 1;
        c.http.idle_timeout_secs = 2;
    })
    .await;
    // A request head that never ends.
    let mut slow = TcpStream::connect(app.addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")
        .await
        .unwrap();
    let took = closed_within(&mut slow, Duration::from_secs(5))
        .await
        .expect("the slow client was not closed");
    assert!(took >= Duration::from_millis(900), "{took:?}");

    // A keep-alive connection left idle after one request.
    let mut idle = TcpStream::connect(app.addr).await.unwrap();
    assert!(ask(&mut idle).await.starts_with("HTTP/1.1 200"));
    let took = closed_within(&mut idle, Duration::from_secs(6))
        .await
        .expect("the idle connection was not closed");
    assert!(took <= Duration::from_millis(3500), "{took:?}");

    // A connection in use stays open.
    let mut busy = TcpStream::connect(app.addr).await.unwrap();
    for _ in 0..4 {
        assert!(ask(&mut busy).await.starts_with("HTTP/1.1 200"));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_wait_in_the_backlog() {
    let app = spawn_with(Target::fresh(), |c| c.http.max_connections = 2).await;
    let mut first = TcpStream::connect(app.addr).await.unwrap();
    let mut second = TcpStream::connect(app.addr).await.unwrap();
    assert!(ask(&mut first).await.starts_with("HTTP/1.1 200"));
    assert!(ask(&mut second).await.starts_with("HTTP/1.1 200"));
    // The third is taken by the kernel but not served while two are open.
    let mut third = TcpStream::connect(app.addr).await.unwrap();
    third.write_all(HEALTHZ).await.unwrap();
    let mut buf = [0u8; 1024];
    let early = tokio::time::timeout(Duration::from_millis(700), third.read(&mut buf)).await;
    assert!(early.is_err(), "served past the cap: {early:?}");
    assert!(app
        .metrics_via(&mut second)
        .await
        .contains("flashsale_http_connections 2"));
    drop(first);
    let n = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buf))
        .await
        .expect("served once a connection closed")
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    app.finish().await;
}

impl TestApp {
    /// `/metrics` over an open connection (a new one may wait past a cap).
    async fn metrics_via(&self, conn: &mut TcpStream) -> String {
        conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        let mut buf = vec![0u8; 65536];
        // The body ends with "# EOF\n" in the OpenMetrics format.
        while !out.ends_with(b"# EOF\n") {
            let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
                .await
                .expect("metrics")
                .unwrap();
            assert!(n > 0, "closed");
            out.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// Pauses every client of `redis` for `ms` (the server keeps the calls and
/// runs them afterwards).
async fn pause(redis: &OwnRedis, ms: u64) {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(ms)
        .arg("ALL")
        .query_async(&mut c)
        .await
        .unwrap();
}

/// Reserves for buyers `users` while Redis is paused for `pause_ms`; then
/// each buyer that got no order retries with its retry key. Afterwards each
/// buyer holds exactly the one order it was told about, and Redis holds no
/// other order.
async fn reserve_through_a_pause(app: &TestApp, redis: &OwnRedis, pause_ms: u64) -> usize {
    let sale = app
        .create_sale(SaleSpec {
            stock: 100,
            per_user_limit: 5,
            ..SaleSpec::default()
        })
        .await;
    pause(redis, pause_ms).await;
    let users: Vec<u64> = (1..=20).collect();
    let first = join_all(users.iter().map(|u| reserve_qty(app, &sale, *u, 1, None))).await;
    tokio::time::sleep(Duration::from_millis(pause_ms + 300)).await;
    let mut told: BTreeMap<u64, String> = BTreeMap::new();
    let mut unsure = 0;
    for (user, (status, _, body)) in users.iter().zip(&first) {
        let order = match status {
            201 => body.clone(),
            500 | 503 => {
                unsure += 1;
                let key = body["error"]["retry_key"]
                    .as_str()
                    .unwrap_or_else(|| panic!("a 5xx without a retry key: {body}"));
                let (s, _, again) = reserve_qty(app, &sale, *user, 1, Some(key)).await;
                assert_eq!(s, 201, "{again}");
                // The same key again: the same order, nothing more.
                let (s2, _, twice) = reserve_qty(app, &sale, *user, 1, Some(key)).await;
                assert_eq!((s2, &twice["order_id"]), (201, &again["order_id"]));
                again
            }
            other => panic!("unexpected {other}: {body}"),
        };
        assert_eq!(order["user_id"], user.to_string());
        told.insert(*user, order["order_id"].as_str().unwrap().to_owned());
    }
    // Redis holds exactly the orders the buyers were told about.
    let seqs = app.order_seqs(&sale).await;
    let in_redis: BTreeSet<String> = seqs.iter().map(|s| format!("{sale}-{s}")).collect();
    assert_eq!(in_redis, told.values().cloned().collect::<BTreeSet<_>>());
    assert_eq!(app.sale_field(&sale, "pending").await, 20);
    unsure
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reserve_that_timed_out_is_found_again_by_its_retry_key() {
    let redis = OwnRedis::start().await;
    let app = spawn_with(Target::fresh_on(&redis.url()), |c| {
        c.store.redis_timeout_ms = 1000;
        c.http.request_timeout_ms = 2500;
        c.http.buyer_rate_per_sec = 0;
    })
    .await;
    // Shorter than the Redis timeout: every buyer simply waits.
    assert_eq!(reserve_through_a_pause(&app, &redis, 300).await, 0);
    // Longer than the Redis timeout, shorter than the request timeout.
    assert!(reserve_through_a_pause(&app, &redis, 1600).await > 0);
    // Longer than the request timeout.
    assert!(reserve_through_a_pause(&app, &redis, 3500).await > 0);
    assert!(app
        .metrics()
        .await
        .contains("flashsale_reserve_unsure_total"));
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_reserve_call_twice_has_its_effect_once() {
    // A call resent after a dropped connection, driven directly.
    let app = spawn_app().await;
    let sale = app
        .create_sale(SaleSpec {
            stock: 2,
            per_user_limit: 1,
            ..SaleSpec::default()
        })
        .await;
    let k = app.sale_keys(&sale);
    let mut c = app.engine.connection();
    let token: String = c.hget(&k.sale, "db").await.unwrap();
    let script = redis::Script::new(&format!(
        "{}\n{}",
        include_str!("../../lua/prelude.lua"),
        include_str!("../../lua/reserve.lua")
    ));
    let call = |id: &'static str| {
        let mut inv = script.prepare_invoke();
        for key in k.reserve_keys() {
            inv.key(key);
        }
        inv.arg(1_000_000).arg(id).arg(0).arg(&token);
        for user in [1, 2, 3] {
            inv.arg(user).arg(1).arg("");
        }
        inv
    };
    let mut c = app.engine.connection();
    let first: Vec<Vec<String>> = call("abc1").invoke_async(&mut c).await.unwrap();
    let again: Vec<Vec<String>> = call("abc1").invoke_async(&mut c).await.unwrap();
    let tags = |r: &[Vec<String>]| r.iter().map(|x| x[0].clone()).collect::<Vec<_>>();
    assert_eq!(tags(&first), ["ok", "ok", "sold_out"]);
    assert_eq!(tags(&again), ["ok", "ok", "sold_out"]);
    assert_eq!(first[0][1], again[0][1]);
    assert_eq!(first[1][1], again[1][1]);
    assert_eq!(app.sale_field(&sale, "pending").await, 2);
    assert_eq!(app.sale_field(&sale, "seq").await, 2);
    // Buyer 3's retry key of that call finds nothing: a new reservation
    // (sold out now), under that key.
    let (s, _, body) = reserve_qty(&app, &sale, 3, 1, Some("rk-abc1-3")).await;
    assert_eq!((s, code(&body)), (409, "sold_out"));
    // Buyer 2's finds their order; another buyer using it finds nothing.
    let (s, _, body) = reserve_qty(&app, &sale, 2, 1, Some("rk-abc1-2")).await;
    assert_eq!(
        (s, body["order_id"].as_str().unwrap()),
        (201, &*format!("{sale}-2"))
    );
    let (s, _, _) = reserve_qty(&app, &sale, 9, 1, Some("rk-abc1-2")).await;
    assert_eq!(s, 409);
    assert_eq!(app.sale_field(&sale, "pending").await, 2);
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_redis_not_mysql_and_worker_processes_serve_probes() {
    let mut db = OwnMariaDb::start().await;
    let target = Target {
        database_url: db.url(&unique("fstest")),
        ..Target::fresh()
    };
    let app = spawn_on(target.clone()).await;
    let ready = || app.client.get(app.url("/readyz")).send();
    let res = ready().await.unwrap();
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["mysql"], "ok");
    assert_eq!(body["roles"]["http"], "ok");

    // MySQL down: selling goes on, and readiness says so without failing.
    db.kill();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let res = ready().await.unwrap();
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(
        (body["redis"].as_str(), body["mysql"].as_str()),
        (Some("ok"), Some("down"))
    );
    // A probe flood shares one answer a second and never starves anything.
    let flood = join_all((0..200).map(|_| ready())).await;
    assert!(flood
        .iter()
        .all(|r| matches!(r.as_ref().map(|r| r.status().as_u16()), Ok(200 | 503))));
    assert!(app
        .metrics()
        .await
        .contains("flashsale_dependency_up{dependency=\"mysql\"} 0"));
    db.restart().await;
    app.finish().await;

    // A worker-only process needs no HTTP secrets and serves the probes on
    // FLASHSALE_METRICS_LISTEN.
    let t = Target::fresh();
    let port = free_port();
    let mut worker = ServeProcess::adopt(
        std::process::Command::new(env!("CARGO_BIN_EXE_flashsale"))
            .arg("serve")
            .envs(t.redis_env())
            .env("DATABASE_URL", &t.database_url)
            .env("FLASHSALE_KEY_PREFIX", &t.key_prefix)
            .env("FLASHSALE_ROLES", "expiry,reconciler")
            .env("FLASHSALE_METRICS_LISTEN", format!("127.0.0.1:{port}"))
            .env_remove("FLASHSALE_JWT_SECRET")
            .env_remove("FLASHSALE_ADMIN_TOKEN")
            .env_remove("FLASHSALE_PAYMENT_SECRET")
            .env("RUST_LOG", "warn")
            .spawn()
            .unwrap(),
    );
    let client = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let ready = loop {
        if let Ok(r) = client.get(format!("{base}/readyz")).send().await {
            break r;
        }
        assert!(Instant::now() < deadline, "the worker never served probes");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(ready.status(), 200);
    let body: Value = ready.json().await.unwrap();
    assert_eq!(body["roles"]["expiry"], "ok");
    assert_eq!(body["roles"]["reconciler"], "ok");
    let healthz = client.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(healthz.status(), 200);
    let metrics = client.get(format!("{base}/metrics")).send().await.unwrap();
    assert!(metrics
        .text()
        .await
        .unwrap()
        .contains("flashsale_role_up{role=\"expiry\"} 1"));
    // The API is not served there.
    let api = client
        .get(format!("{base}/api/v1/sales/1"))
        .send()
        .await
        .unwrap();
    assert_eq!(api.status(), 404);
    worker.kill();
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_or_missing_secrets_are_refused_by_name() {
    let t = Target::fresh();
    let run = |jwt: Option<&str>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_flashsale"));
        cmd.arg("serve")
            .envs(t.redis_env())
            .env("DATABASE_URL", &t.database_url)
            .env("FLASHSALE_KEY_PREFIX", &t.key_prefix)
            .env("FLASHSALE_LISTEN", "127.0.0.1:0")
            .env("FLASHSALE_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("FLASHSALE_PAYMENT_SECRET", PAYMENT_SECRET)
            .env_remove("FLASHSALE_JWT_SECRET");
        if let Some(j) = jwt {
            cmd.env("FLASHSALE_JWT_SECRET", j);
        }
        cmd.output().unwrap()
    };
    for jwt in [Some("short-secret"), None] {
        let out = run(jwt);
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("FLASHSALE_JWT_SECRET"), "{err}");
    }
    // Secrets are not flags (they would show in `ps`).
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flashsale"))
        .args(["serve", "--jwt-secret", JWT_SECRET])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    // The token command reads its secret from the environment too.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flashsale"))
        .args(["token", "--user", "1"])
        .env("FLASHSALE_JWT_SECRET", "too-short")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_reserve_queue_refuses_at_once() {
    use flashsale::domain::{Qty, UserId};
    use flashsale::engine::{Engine, EngineError};
    let redis = OwnRedis::start().await;
    let app = spawn_on(Target::fresh_on(&redis.url())).await;
    let sale = app.create_sale(SaleSpec::default()).await;
    let mut cfg = app.target.config();
    cfg.store.reserve_batch = 1;
    cfg.store.reserve_in_flight = 1;
    cfg.store.reserve_queue_limit = Some(1);
    let engine = Engine::connect(&cfg.store.engine_options().unwrap()).unwrap();
    let sale_id = sale.parse().unwrap();
    pause(&redis, 3000).await;
    // One call on the wire, one reservation waiting for a slot, one queued:
    // each sent in turn, so the queue is full whatever the load.
    let mut held = Vec::new();
    for u in 1..=3 {
        let e = engine.clone();
        held.push(tokio::spawn(async move {
            e.reserve(sale_id, UserId::new(u).unwrap(), Qty::default(), None)
                .await
        }));
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let started = Instant::now();
    let refused = engine
        .reserve(sale_id, UserId::new(9).unwrap(), Qty::default(), None)
        .await;
    // At once: not after the queue wait (the Redis timeout, 1 s).
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    let failed = refused.expect_err("the queue is full");
    assert!(
        matches!(failed.source, EngineError::Overloaded(_)),
        "{failed:?}"
    );
    assert!(failed.retry_key.starts_with("rq-"), "{}", failed.retry_key);
    for h in held {
        let _ = h.await.unwrap();
    }
    app.finish().await;
}
