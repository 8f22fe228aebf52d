//! The rolling-deploy drill: two `flashsale serve` processes (default roles)
//! share one database and key space behind a client that acts as a load
//! balancer; during a rush each is stopped with SIGTERM and started again
//! on its port, one after the other. Buyers see only answers they can act
//! on, every unit held belongs to an order its buyer knows, and the audit
//! is clean.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt};
use redis::AsyncCommands;
use reqwest::header::RETRY_AFTER;
use serde_json::{json, Value};

use crate::audit::audit;
use crate::helpers::*;

const STOCK: i64 = 300;
const BUYERS: u64 = 1_500;
const CONCURRENCY: usize = 64;
/// Time between two buyers' arrivals: the rush lasts about 7.5 s.
const ARRIVAL: Duration = Duration::from_millis(5);
/// The last buyers arrive only once both instances were restarted, so the
/// rush outlasts the deploy however slow the host is.
const AFTER_DEPLOY: u64 = 150;
/// How often a buyer retries a `503` at most.
const MAX_503_RETRIES: u32 = 10;
/// How often a request moves to the other instance at most (refused, or
/// cut before any answer).
const MAX_HOPS: u32 = 100;
/// The first user id of the rush.
const USERS_FROM: u64 = 10_000;
/// How long each instance keeps serving with `/readyz` failing once it is
/// told to stop (FLASHSALE_SHUTDOWN_DELAY_MS): the first drains through
/// the balancer's probes; the second, as configured by default, stops
/// accepting at once and the balancer's resending covers it.
const SHUTDOWN_DELAY_MS: [&str; 2] = ["600", "0"];
/// How often the balancer probes each instance's `/readyz`.
const PROBE_EVERY: Duration = Duration::from_millis(50);

/// Every HTTP answer any buyer saw, by what was asked and its status.
#[derive(Default)]
struct Seen {
    answers: BTreeMap<(&'static str, u16), u64>,
    /// 5xx answers other than `503` with `Retry-After`, with their bodies.
    bad: Vec<String>,
    /// Requests resent because an instance refused the connection, or cut
    /// it before any answer: by instance and "refused" or "cut".
    hops: BTreeMap<(usize, &'static str), u64>,
}

/// A client that behaves like a load balancer in front of the instances:
/// it probes each one's `/readyz` and sends a request to a ready one; when
/// the connection is refused or closed before any answer, the same request
/// goes to the other.
struct Balancer {
    client: reqwest::Client,
    bases: Vec<String>,
    /// What the last probe of each instance found.
    ready: Vec<AtomicBool>,
    seen: Mutex<Seen>,
    /// Set while an instance is being restarted.
    deploying: AtomicBool,
    /// Orders created while an instance was being restarted.
    won_in_deploy: AtomicU64,
    /// Probes answered 503 (an instance draining, still serving).
    draining: AtomicU64,
}

/// A request, built anew for each try on the instance at the given base URL.
type Build<'a> = &'a (dyn Fn(&reqwest::Client, &str) -> reqwest::RequestBuilder + Sync);

impl Balancer {
    /// Sends the request to instance `first` (the other when the probes
    /// found it not ready), then to the other on transport failures; a `503` with `Retry-After` is tried again after that delay
    /// (capped at 2 s). Any other answer is final.
    async fn send(&self, what: &'static str, first: usize, build: Build<'_>) -> (u16, Value) {
        let (mut hops, mut waits) = (0, 0);
        let n = self.bases.len();
        let mut at = (first..first + n)
            .find(|i| self.ready[i % n].load(Ordering::Acquire))
            .unwrap_or(first);
        loop {
            let base = &self.bases[at % n];
            let res = match build(&self.client, base).send().await {
                Ok(res) => res,
                Err(e) => {
                    hops += 1;
                    assert!(hops <= MAX_HOPS, "{what}: no instance answers: {e}");
                    let how = if e.is_connect() { "refused" } else { "cut" };
                    *self
                        .seen
                        .lock()
                        .unwrap()
                        .hops
                        .entry((at % n, how))
                        .or_default() += 1;
                    at += 1;
                    if hops % 2 == 0 {
                        // Both refused in turn: give the restart a moment.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    continue;
                }
            };
            let status = res.status().as_u16();
            let retry_after = res
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
            let body: Value = match res.bytes().await {
                Ok(b) => serde_json::from_slice(&b).unwrap_or(Value::Null),
                Err(_) => {
                    // Cut in the middle of the answer: the same request again.
                    hops += 1;
                    assert!(hops <= MAX_HOPS, "{what}: answers keep being cut");
                    *self
                        .seen
                        .lock()
                        .unwrap()
                        .hops
                        .entry((at % n, "cut"))
                        .or_default() += 1;
                    at += 1;
                    continue;
                }
            };
            {
                let mut seen = self.seen.lock().unwrap();
                *seen.answers.entry((what, status)).or_default() += 1;
                let acceptable = status < 500 || (status == 503 && retry_after.is_some());
                if !acceptable {
                    seen.bad.push(format!(
                        "{what}: {status} (Retry-After {retry_after:?}) {body}"
                    ));
                }
            }
            match retry_after {
                Some(secs) if status == 503 && waits < MAX_503_RETRIES => {
                    waits += 1;
                    tokio::time::sleep(Duration::from_secs(secs.min(2))).await;
                }
                _ => return (status, body),
            }
        }
    }

    /// Probes every instance's `/readyz` each [`PROBE_EVERY`] until
    /// `stop`; an instance that does not answer 200 is out of the pool.
    async fn probe(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(500))
            .build()
            .unwrap();
        while !stop.is_cancelled() {
            for (base, ready) in self.bases.iter().zip(&self.ready) {
                let status = client
                    .get(format!("{base}/readyz"))
                    .send()
                    .await
                    .map(|r| r.status().as_u16());
                if status.as_ref().is_ok_and(|s| *s == 503) {
                    self.draining.fetch_add(1, Ordering::Relaxed);
                }
                ready.store(status.is_ok_and(|s| s == 200), Ordering::Release);
            }
            tokio::time::sleep(PROBE_EVERY).await;
        }
    }
}

/// What a buyer does with the order they won: half pay, a quarter cancel
/// (so units come back on sale during the rush), a quarter leave it pending.
fn plan(user: u64) -> &'static str {
    match user % 4 {
        0 | 1 => "paid",
        2 => "cancelled",
        _ => "pending",
    }
}

/// One buyer: reserve with their own idempotency key, then act on the order.
/// Returns the order they know of and its status, if they won one.
async fn buyer(lb: &Balancer, sale: &str, user: u64) -> Option<(String, &'static str)> {
    let token = buyer_token(user);
    let key = format!("deploy-{user}");
    let reserve = |c: &reqwest::Client, base: &str| {
        c.post(format!("{base}/api/v1/sales/{sale}/orders"))
            .bearer_auth(&token)
            .header("Idempotency-Key", &key)
            .json(&json!({"qty": 1}))
    };
    let (status, body) = lb.send("reserve", user as usize, &reserve).await;
    match (status, code(&body)) {
        (201, _) => {}
        (409, "sold_out") => return None,
        other => panic!("buyer {user}: reserve answered {other:?}: {body}"),
    }
    let order = body["order_id"].as_str().unwrap().to_owned();
    if lb.deploying.load(Ordering::Acquire) {
        lb.won_in_deploy.fetch_add(1, Ordering::Relaxed);
    }
    let want = plan(user);
    match want {
        "paid" => {
            let callback = json!({"order_id": order, "payment_id": format!("pay-{order}"),
                "amount_cents": body["amount_cents"], "status": "succeeded"})
            .to_string();
            let pay = |c: &reqwest::Client, base: &str| {
                c.post(format!("{base}/api/v1/payments/callback"))
                    .header("X-Signature", sign(callback.as_bytes()))
                    .header("Content-Type", "application/json")
                    .body(callback.clone())
            };
            let (status, body) = lb.send("pay", user as usize + 1, &pay).await;
            assert_eq!(status, 200, "paying {order}: {body}");
        }
        "cancelled" => {
            let cancel = |c: &reqwest::Client, base: &str| {
                c.post(format!("{base}/api/v1/orders/{order}/cancel"))
                    .bearer_auth(&token)
            };
            let (status, body) = lb.send("cancel", user as usize + 1, &cancel).await;
            // A cancel whose answer was lost on the way is answered
            // "already cancelled" when it is sent again.
            let done = status == 200
                || (status == 409 && body["error"]["status"].as_str() == Some("cancelled"));
            assert!(done, "cancelling {order}: {status} {body}");
        }
        _ => {}
    }
    Some((order, want))
}

/// One instance: its port, its shutdown delay, and the process serving on
/// it (none while it is being restarted).
struct Instance {
    port: u16,
    delay_ms: &'static str,
    process: Option<ServeProcess>,
}

impl Instance {
    fn start(&mut self, target: &Target) {
        let listen = format!("127.0.0.1:{}", self.port);
        // The default roles: HTTP, expiry and the reconciler.
        self.process = Some(ServeProcess::start(
            target,
            "http,expiry,reconciler",
            &[
                ("FLASHSALE_LISTEN", listen.as_str()),
                ("FLASHSALE_SHUTDOWN_DELAY_MS", self.delay_ms),
            ],
        ));
    }

    /// SIGTERM; returns whether it exited with 0, and how long it took.
    async fn stop(&mut self) -> (bool, Duration) {
        let mut p = self.process.take().expect("running");
        let started = Instant::now();
        let clean = tokio::task::spawn_blocking(move || p.terminate(Duration::from_secs(20)))
            .await
            .unwrap();
        (clean, started.elapsed())
    }
}

/// Waits until `/readyz` on `port` answers 200; returns how long it took.
async fn wait_ready(port: u16, within: Duration) -> Duration {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let started = Instant::now();
    loop {
        let res = client
            .get(format!("http://127.0.0.1:{port}/readyz"))
            .send()
            .await;
        if res.is_ok_and(|r| r.status() == 200) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "instance on {port} not ready after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_during_a_rush_loses_nothing_and_shows_no_5xx() {
    let began = Instant::now();
    // An HTTP-only app of the test's own creates the sale and reads the
    // stores; buyers never reach it.
    let admin = spawn_app().await;
    let sale = admin
        .create_sale(SaleSpec {
            stock: STOCK,
            ..SaleSpec::default()
        })
        .await;
    let target = admin.target.clone();
    let mut instances: Vec<Instance> = [free_port(), free_port()]
        .into_iter()
        .zip(SHUTDOWN_DELAY_MS)
        .map(|(port, delay_ms)| {
            let mut i = Instance {
                port,
                delay_ms,
                process: None,
            };
            i.start(&target);
            i
        })
        .collect();
    for i in &instances {
        wait_ready(i.port, Duration::from_secs(30)).await;
    }
    let lb = Arc::new(Balancer {
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(15))
            .build()
            .unwrap(),
        bases: instances
            .iter()
            .map(|i| format!("http://127.0.0.1:{}", i.port))
            .collect(),
        ready: instances.iter().map(|_| AtomicBool::new(true)).collect(),
        seen: Mutex::default(),
        deploying: AtomicBool::new(false),
        won_in_deploy: AtomicU64::new(0),
        draining: AtomicU64::new(0),
    });
    let probing = tokio_util::sync::CancellationToken::new();
    tokio::spawn(lb.clone().probe(probing.clone()));

    let (deployed_tx, deployed_rx) = tokio::sync::watch::channel(false);
    let rush = {
        let (lb, sale) = (lb.clone(), sale.clone());
        tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            let arrivals = stream::iter(0..BUYERS).then(move |i| {
                let mut deployed = deployed_rx.clone();
                async move {
                    tokio::time::sleep_until(start + ARRIVAL * i as u32).await;
                    if i >= BUYERS - AFTER_DEPLOY {
                        deployed.wait_for(|done| *done).await.unwrap();
                    }
                    USERS_FROM + i
                }
            });
            let known = Mutex::new(BTreeMap::new());
            arrivals
                .for_each_concurrent(CONCURRENCY, |user| {
                    let (lb, sale, known) = (&lb, &sale, &known);
                    async move {
                        if let Some((order, status)) = buyer(lb, sale, user).await {
                            let old = known.lock().unwrap().insert(order.clone(), (user, status));
                            assert!(old.is_none(), "{order} won by two buyers: {old:?}, {user}");
                        }
                    }
                })
                .await;
            known.into_inner().unwrap()
        })
    };

    // The deploy: each instance in turn, while buyers keep coming.
    let rush_began = Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    lb.deploying.store(true, Ordering::Release);
    for (n, i) in instances.iter_mut().enumerate() {
        let (clean, stopped) = i.stop().await;
        assert!(clean, "instance {n} did not exit cleanly on SIGTERM");
        i.start(&target);
        let ready = wait_ready(i.port, Duration::from_secs(30)).await;
        println!(
            "instance {n} (shutdown delay {} ms): exited {stopped:?} after SIGTERM, ready {ready:?} after its start ({:?} into the rush)",
            i.delay_ms,
            rush_began.elapsed()
        );
    }
    // Once the balancer has seen the last one ready again.
    tokio::time::sleep(PROBE_EVERY * 2).await;
    lb.deploying.store(false, Ordering::Release);
    deployed_tx.send(true).unwrap();
    let known = tokio::time::timeout(Duration::from_secs(60), rush)
        .await
        .expect("the rush ends")
        .unwrap();

    let seen = std::mem::take(&mut *lb.seen.lock().unwrap());
    let mut summary: Vec<String> = seen
        .answers
        .iter()
        .map(|((what, status), n)| format!("{what} {status}: {n}"))
        .collect();
    for ((n, how), hops) in &seen.hops {
        summary.push(format!("resent, instance {n} {how}: {hops}"));
    }
    println!("buyers saw: {}", summary.join(", "));
    probing.cancel();
    let won_in_deploy = lb.won_in_deploy.load(Ordering::Relaxed);
    println!("orders won while an instance was being restarted: {won_in_deploy}");
    assert!(won_in_deploy > 0, "the deploy came after the selling");
    let draining = lb.draining.load(Ordering::Relaxed);
    println!("probes that found an instance draining (503, still serving): {draining}");
    assert!(
        draining > 0,
        "no instance was seen draining before it closed"
    );
    assert!(
        seen.bad.is_empty(),
        "answers no buyer can act on: {:#?}",
        seen.bad
    );
    // The instance with a shutdown delay left the pool through its
    // readiness before it stopped accepting: nothing sent to it was lost.
    let from_drained: u64 = seen.hops.range((0, "")..(1, "")).map(|(_, n)| n).sum();
    assert_eq!(
        from_drained, 0,
        "requests resent away from the drained instance"
    );
    let won = known.len() as i64;
    let holding = known.values().filter(|(_, s)| *s != "cancelled").count() as i64;
    assert_eq!(holding, STOCK, "the rush sells the whole stock");
    assert!(won > STOCK, "cancelled units went back on sale: {won} won");

    // Redis: the orders are exactly the ones buyers know, each as its buyer left it.
    let expect: BTreeMap<String, (u64, &str)> = known;
    let in_redis: BTreeMap<String, (u64, String)> = admin
        .orders(&sale)
        .await
        .into_values()
        .map(|o| {
            (
                o.id.to_string(),
                (o.user.get(), o.status.as_str().to_owned()),
            )
        })
        .collect();
    compare("Redis", &expect, &in_redis);
    let (pending, paid, available) = (
        admin.sale_field(&sale, "pending").await,
        admin.sale_field(&sale, "paid").await,
        admin.sale_field(&sale, "avail").await,
    );
    assert!(pending + paid <= STOCK, "oversold: {pending} + {paid}");
    assert_eq!((pending + paid, available), (STOCK, 0));

    // MySQL, once the reconcilers have settled every flow record.
    let k = admin.sale_keys(&sale);
    let mut c = admin.engine.connection();
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let backlog: u64 = c.xlen(&k.flow).await.unwrap();
        if backlog == 0 {
            break;
        }
        assert!(Instant::now() < until, "{backlog} flow records not settled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pool = sqlx::MySqlPool::connect(&target.database_url)
        .await
        .unwrap();
    let rows: Vec<(u64, u64, String)> =
        sqlx::query_as("SELECT seq, user_id, status FROM orders WHERE sale_id = ?")
            .bind(sale.parse::<u64>().unwrap())
            .fetch_all(&pool)
            .await
            .unwrap();
    let in_mysql: BTreeMap<String, (u64, String)> = rows
        .into_iter()
        .map(|(seq, user, status)| (format!("{sale}-{seq}"), (user, status)))
        .collect();
    compare("MySQL", &expect, &in_mysql);
    let (total, pending, paid): (i32, i32, i32) =
        sqlx::query_as("SELECT total, pending, paid FROM inventory WHERE sale_id = ?")
            .bind(sale.parse::<u64>().unwrap())
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(
        pending + paid <= total,
        "oversold in MySQL: {pending} + {paid} of {total}"
    );
    pool.close().await;

    let (exit, report) = audit(&target, &[]).await;
    assert_eq!(exit, 0, "the audit found drift:\n{report}");

    for (n, i) in instances.iter_mut().enumerate() {
        let (clean, _) = i.stop().await;
        assert!(clean, "instance {n} did not exit cleanly at the end");
    }
    println!(
        "{won} orders won, {} buyers, drill took {:?}",
        BUYERS,
        began.elapsed()
    );
    admin.finish().await;
}

/// Panics, naming the differences, unless `store` holds exactly the orders
/// buyers know, each with its buyer and the status they left it in.
fn compare(
    name: &str,
    known: &BTreeMap<String, (u64, &str)>,
    store: &BTreeMap<String, (u64, String)>,
) {
    let unknown: BTreeSet<_> = store.keys().filter(|o| !known.contains_key(*o)).collect();
    let missing: BTreeSet<_> = known.keys().filter(|o| !store.contains_key(*o)).collect();
    assert!(
        unknown.is_empty() && missing.is_empty(),
        "{name}: orders no buyer knows {unknown:?}; orders buyers hold that {name} lacks {missing:?}"
    );
    for (order, (user, status)) in known {
        let (u, s) = &store[order];
        assert_eq!(
            (u, s.as_str()),
            (user, *status),
            "{name}: order {order} differs from what its buyer knows"
        );
    }
}
