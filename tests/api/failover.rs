//! Failover drills on Redis's own failover (Sentinel, Cluster): the primary
//! holding a live sale dies in the middle of a rush. With acknowledged
//! writes (WAIT 1) no buyer who got 201 loses the order; without them, a
//! loss the drill arranges is counted exactly. Each drill starts its own
//! topology and kills nodes of it: `scripts/test-topologies.sh drills` runs
//! them one at a time.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flashsale::config::Role;
use redis::AsyncCommands;
use serde_json::Value;

use crate::audit::{audit, wait_backlog_empty};
use crate::helpers::*;
use crate::topology::{Kind, OwnTopology};

fn all_roles(c: &mut flashsale::config::ServeConfig) {
    c.roles = vec![Role::Http, Role::Expiry, Role::Reconciler];
}

/// A fresh database and key prefix on `topo`, writes waiting for `wait`
/// replicas.
fn target_on(topo: &OwnTopology, wait: u32) -> Target {
    // REDIS_URL is not used: the topology's settings take precedence.
    let mut t = Target::fresh_on("redis://127.0.0.1:1");
    match topo.kind {
        Kind::Cluster => {
            t.redis_cluster = topo.env_var("FLASHSALE_REDIS_CLUSTER").map(str::to_owned);
        }
        Kind::Sentinel => {
            t.redis_sentinels = Some((
                topo.env_var("FLASHSALE_REDIS_SENTINELS")
                    .unwrap()
                    .to_owned(),
                topo.master_name().to_owned(),
            ));
        }
    }
    t.wait_replicas = wait;
    t
}

/// What the buyers of a rush saw.
#[derive(Default)]
struct Seen {
    /// (buyer, order id) of every 201.
    acked: Vec<(u64, String)>,
    /// Answers by status.
    statuses: BTreeMap<u16, u64>,
    /// When each 201 came.
    created_at: Vec<Instant>,
}

impl Seen {
    /// The failover as buyers saw it: the longest time without a 201 while
    /// buyers kept asking (the sale sells hundreds per second otherwise).
    fn longest_gap(&self) -> Duration {
        let mut at = self.created_at.clone();
        at.sort();
        at.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default()
    }
}

/// `buyers` buyers, `concurrency` at a time, each sending one reservation
/// under an Idempotency-Key of their own until it is answered for good
/// (201 or 409), as API.md asks of a client after a 503.
fn rush(
    app: &TestApp,
    sale: &str,
    buyers: u64,
    concurrency: u64,
) -> (Arc<Mutex<Seen>>, Vec<tokio::task::JoinHandle<()>>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let next = Arc::new(std::sync::atomic::AtomicU64::new(1));
    let tasks = (0..concurrency)
        .map(|_| {
            let (client, url, seen, next) =
                (app.client.clone(), app.url(""), seen.clone(), next.clone());
            let sale = sale.to_owned();
            tokio::spawn(async move {
                loop {
                    let u = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if u > buyers {
                        return;
                    }
                    let key = format!("drill-{u}");
                    let until = Instant::now() + Duration::from_secs(90);
                    loop {
                        assert!(Instant::now() < until, "buyer {u} never got an answer");
                        let res = client
                            .post(format!("{url}/api/v1/sales/{sale}/orders"))
                            .bearer_auth(buyer_token(u))
                            .header("Idempotency-Key", &key)
                            .json(&serde_json::json!({"qty": 1}))
                            .send()
                            .await;
                        let Ok(res) = res else {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        };
                        let status = res.status().as_u16();
                        let body: Value = res.json().await.unwrap_or(Value::Null);
                        let done = {
                            let mut s = seen.lock().unwrap();
                            *s.statuses.entry(status).or_default() += 1;
                            match status {
                                201 | 200 => {
                                    s.created_at.push(Instant::now());
                                    let id = body["order_id"].as_str().unwrap().to_owned();
                                    s.acked.push((u, id));
                                    true
                                }
                                409 => true,
                                503 => false,
                                other => panic!("buyer {u}: {other} {body}"),
                            }
                        };
                        if done {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            })
        })
        .collect();
    (seen, tasks)
}

/// One buyer after another reserving on a sale, each answer timed.
struct Rush {
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<Vec<(Instant, u16)>>,
}

impl Rush {
    fn start(app: &TestApp, sale: &str) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (client, url, sale, halt) = (
            app.client.clone(),
            app.url(""),
            sale.to_owned(),
            stop.clone(),
        );
        let task = tokio::spawn(async move {
            let mut out = Vec::new();
            let mut u = 1_000_000;
            while !halt.load(std::sync::atomic::Ordering::Relaxed) {
                u += 1;
                let res = client
                    .post(format!("{url}/api/v1/sales/{sale}/orders"))
                    .bearer_auth(buyer_token(u))
                    .json(&serde_json::json!({"qty": 1}))
                    .send()
                    .await;
                let status = res.map_or(0, |r| r.status().as_u16());
                out.push((Instant::now(), status));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            out
        });
        Self { stop, task }
    }

    async fn stop(self) -> Vec<(Instant, u16)> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.task.await.unwrap()
    }
}

/// The sale's orders counted lost: (seq, reason).
async fn lost_orders(pool: &sqlx::MySqlPool, sale: &str) -> Vec<(u64, String)> {
    sqlx::query_as("SELECT seq, reason FROM lost_orders WHERE sale_id = ? ORDER BY seq")
        .bind(sale.parse::<u64>().unwrap())
        .fetch_all(pool)
        .await
        .unwrap()
}

/// Kill -9 of the primary holding a live sale while 2,000 buyers rush its
/// 200 units, the node restarted 3 s later (it rejoins as a replica). With
/// every write acknowledged by a replica (`wait` 1), every buyer who got
/// 201 keeps the order; without (`wait` 0), an acknowledged order the
/// promoted replica lacks is counted lost, and its unit sold again. Either
/// way no unit is oversold, no id given out twice, the audit is clean.
async fn a_primary_killed_mid_rush(topo: OwnTopology, wait: u32) {
    let mut topo = topo;
    let target = target_on(&topo, wait);
    let app = spawn_with(target.clone(), all_roles).await;
    let sale = app
        .create_sale(SaleSpec {
            stock: 200,
            per_user_limit: 1,
            payment_window_secs: 600,
            ..SaleSpec::default()
        })
        .await;
    let primary = topo.primary_of(&app.sale_keys(&sale).sale).await;
    // On a cluster, a sale on another shard: it keeps selling throughout.
    let mut other = None;
    if topo.kind == Kind::Cluster {
        for _ in 0..20 {
            let s = app
                .create_sale(SaleSpec {
                    stock: 100_000,
                    ..SaleSpec::default()
                })
                .await;
            if topo.primary_of(&app.sale_keys(&s).sale).await != primary {
                other = Some(s);
                break;
            }
        }
        assert!(other.is_some(), "a sale on another shard");
    }
    let elsewhere = other.as_ref().map(|s| Rush::start(&app, s));
    let (seen, buyers) = rush(&app, &sale, 2_000, 32);
    let until = Instant::now() + Duration::from_secs(30);
    while seen.lock().unwrap().acked.len() < 40 {
        assert!(Instant::now() < until, "the rush made no orders");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let killed_at = Instant::now();
    topo.kill(primary);
    let at_kill = seen.lock().unwrap().acked.len();
    tokio::time::sleep(Duration::from_secs(3)).await;
    topo.restart(primary).await;
    for b in buyers {
        b.await.unwrap();
    }
    if let Some(r) = elsewhere {
        let answers = r.stop().await;
        let during: Vec<_> = answers
            .iter()
            .filter(|(at, _)| *at > killed_at && *at < killed_at + Duration::from_secs(3))
            .collect();
        eprintln!(
            "the sale on another shard: {} answers in the 3 s after the kill",
            during.len()
        );
        assert!(
            during.iter().filter(|(_, s)| *s == 201).count() > 10,
            "the other shard's sale kept selling"
        );
        assert!(during.iter().all(|(_, s)| *s == 201), "{during:?}");
    }
    let s = std::mem::take(&mut *seen.lock().unwrap());
    eprintln!(
        "{:?} WAIT {wait}: {} acknowledged ({} before the kill), answers {:?}, buyers saw no 201 for {:?} at most (the failover as they saw it)",
        topo.kind,
        s.acked.len(),
        at_kill,
        s.statuses,
        s.longest_gap(),
    );
    assert_eq!(s.statuses.get(&500), None, "never a 500");
    assert!(
        s.statuses.get(&503).copied().unwrap_or(0) > 0,
        "the failover was seen"
    );
    let ids: std::collections::BTreeSet<&String> = s.acked.iter().map(|(_, id)| id).collect();
    assert_eq!(ids.len(), s.acked.len(), "no order id given to two buyers");

    // The topology settles (the restarted node is a replica again, every
    // sentinel agrees); whatever the new primary lacks, the guard notices
    // within a pass and the reconciler rebuilds.
    topo.wait_ready().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    app.wait_serving(&sale, Duration::from_secs(20)).await;
    wait_backlog_empty(&app, &sale).await;
    let held = app.orders(&sale).await;
    let pool = sqlx::MySqlPool::connect(&target.database_url)
        .await
        .unwrap();
    let lost = lost_orders(&pool, &sale).await;
    let mut acked_lost = 0;
    for (user, id) in &s.acked {
        let seq: u64 = id.rsplit('-').next().unwrap().parse().unwrap();
        match held.get(&seq) {
            Some(o) => assert_eq!(o.user.get(), *user, "{id}"),
            None => {
                assert_eq!(wait, 0, "acknowledged order {id} lost with WAIT {wait}");
                assert!(
                    lost.iter().any(|(l, _)| *l == seq),
                    "{id} lost and not counted"
                );
                acked_lost += 1;
            }
        }
    }
    eprintln!(
        "{:?} WAIT {wait}: {acked_lost} acknowledged order(s) lost, {} counted lost in all",
        topo.kind,
        lost.len()
    );
    // Every unit sold once: to a buyer who got 201 and still has it.
    assert_eq!(s.acked.len(), 200 + acked_lost, "{:?}", s.statuses);
    let live = held
        .values()
        .filter(|o| o.status == flashsale::engine::OrderStatus::Pending)
        .count();
    assert_eq!(live, 200, "no unit oversold");
    assert_eq!(app.sale_field(&sale, "avail").await, 0);
    let mysql: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM orders WHERE sale_id = ? AND status = 'pending'")
            .bind(sale.parse::<u64>().unwrap())
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(mysql, 200, "MySQL holds every sold unit");
    let (code, out) = audit(&target, &["--sale", &sale]).await;
    assert_eq!(code, 0, "{out}");
    pool.close().await;
    app.finish().await;
}

/// Without acknowledged writes, a loss the drill knows exactly: the replica
/// is frozen (SIGSTOP) and cut off, N orders are acknowledged by the
/// primary alone, the primary is killed, the replica thawed and promoted. Nothing is
/// oversold, no id is given out twice, and the service counts N lost.
async fn a_failover_without_wait_counts_exactly_the_orders_it_lost(topo: OwnTopology) {
    const N: u64 = 7;
    let target = target_on(&topo, 0);
    // The front door alone while the orders are made, so that MySQL has
    // none of them: what the promoted replica lacks is lost for good.
    let front = spawn_with(target.clone(), |c| c.roles = vec![Role::Http]).await;
    let sale = front
        .create_sale(SaleSpec {
            stock: 100,
            per_user_limit: 1,
            ..SaleSpec::default()
        })
        .await;
    let k = front.sale_keys(&sale);
    let primary = topo.primary_of(&k.sale).await;
    let replica = topo.replicas_of(primary).await[0];
    for u in 1..=5u64 {
        assert_eq!(front.reserve(&sale, u, None).await.0, 201);
    }
    // The replica has those five.
    let on_replica = redis::Client::open(format!("redis://127.0.0.1:{replica}")).unwrap();
    let mut rc = on_replica.get_multiplexed_async_connection().await.unwrap();
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        if topo.kind == Kind::Cluster {
            let _: () = redis::cmd("READONLY").query_async(&mut rc).await.unwrap();
        }
        let seq: Option<u64> = rc.hget(&k.sale, "seq").await.unwrap();
        if seq == Some(5) {
            break;
        }
        assert!(Instant::now() < until, "the replica never caught up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Frozen, the replica would still find the next writes in its socket
    // when thawed: the primary also drops its link to it, so they never
    // leave the primary.
    topo.stop(replica);
    let on_primary = redis::Client::open(format!("redis://127.0.0.1:{primary}")).unwrap();
    let mut pc = on_primary.get_multiplexed_async_connection().await.unwrap();
    let dropped: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("replica")
        .query_async(&mut pc)
        .await
        .unwrap();
    assert_eq!(dropped, 1, "the replica's link");
    for u in 6..6 + N {
        assert_eq!(front.reserve(&sale, u, None).await.0, 201);
    }
    topo.kill(primary);
    topo.cont(replica);
    topo.promote(replica).await;

    crate::redis_loss::after_a_known_loss(front, &target, &sale, 5, N, 100).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "drill: kills nodes; scripts/test-topologies.sh runs the drills one at a time"]
async fn cluster_wait_1_keeps_every_acknowledged_order() {
    a_primary_killed_mid_rush(OwnTopology::cluster(2000).await, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "drill: kills nodes; scripts/test-topologies.sh runs the drills one at a time"]
async fn cluster_wait_0_counts_what_a_kill_mid_rush_lost() {
    a_primary_killed_mid_rush(OwnTopology::cluster(2000).await, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "drill: kills nodes; scripts/test-topologies.sh runs the drills one at a time"]
async fn sentinel_wait_0_counts_what_a_kill_mid_rush_lost() {
    a_primary_killed_mid_rush(OwnTopology::sentinel(2000).await, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "drill: kills nodes; scripts/test-topologies.sh runs the drills one at a time"]
async fn sentinel_wait_1_keeps_every_acknowledged_order() {
    a_primary_killed_mid_rush(OwnTopology::sentinel(2000).await, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "drill: kills nodes; scripts/test-topologies.sh runs the drills one at a time"]
async fn cluster_wait_0_counts_exactly_what_it_lost() {
    a_failover_without_wait_counts_exactly_the_orders_it_lost(OwnTopology::cluster(2000).await)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "drill: kills nodes; scripts/test-topologies.sh runs the drills one at a time"]
async fn sentinel_wait_0_counts_exactly_what_it_lost() {
    a_failover_without_wait_counts_exactly_the_orders_it_lost(OwnTopology::sentinel(2000).await)
        .await;
}

/// A loopback proxy in front of one Redis port that can cut a connection
/// once, right after Redis ran a given script and before its answer
/// reaches the client: the "did it run?" case of a dropped connection.
struct CuttingProxy {
    port: u16,
    /// The script (its SHA1) whose next answer is dropped with the connection.
    armed: Arc<Mutex<Option<String>>>,
    cuts: Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl CuttingProxy {
    /// Listens on `port`, forwarding to `upstream`.
    async fn start(port: u16, upstream: u16) -> Self {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let armed: Arc<Mutex<Option<String>>> = Arc::default();
        let cuts = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (a, n) = (armed.clone(), cuts.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (armed, cuts) = (a.clone(), n.clone());
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                    else {
                        return;
                    };
                    pump(client, server, armed, cuts).await;
                });
            }
        });
        Self {
            port,
            armed,
            cuts,
            task,
        }
    }

    fn arm(&self, sha: &str) {
        *self.armed.lock().unwrap() = Some(sha.to_owned());
    }
}

impl Drop for CuttingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Both directions of one proxied connection. Once a request carrying the
/// armed SHA went up, the next bytes coming down are dropped and both
/// sockets closed (one cut per arming).
async fn pump(
    client: tokio::net::TcpStream,
    server: tokio::net::TcpStream,
    armed: Arc<Mutex<Option<String>>>,
    cuts: Arc<std::sync::atomic::AtomicU64>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let cut_next = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = cut_next.clone();
    let up = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match cr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let hit = {
                let mut a = armed.lock().unwrap();
                let hit = a
                    .as_ref()
                    .is_some_and(|sha| buf[..n].windows(sha.len()).any(|w| w == sha.as_bytes()));
                if hit {
                    *a = None;
                }
                hit
            };
            if hit {
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            if sw.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    let down = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match sr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if cut_next.load(std::sync::atomic::Ordering::SeqCst) {
                cuts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                return; // The answer is dropped; the connection closes.
            }
            if cw.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

/// The cluster client resends a request whose connection dropped before
/// the answer came: a reserve that ran once in Redis and is sent again
/// reserves once, and its buyer gets the first run's order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reserve_resent_after_a_cut_connection_reserves_once() {
    // One cluster node holding every slot, announcing the proxy's port, so
    // that every connection the cluster client makes goes through it.
    let proxy_port = free_port();
    let redis = OwnRedis::start_with(&[
        "--cluster-enabled",
        "yes",
        "--cluster-announce-port",
        &proxy_port.to_string(),
        "--appendfsync",
        "everysec",
    ])
    .await;
    let direct = redis::Client::open(redis.url()).unwrap();
    let mut d = direct.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("CLUSTER")
        .arg("ADDSLOTSRANGE")
        .arg(0)
        .arg(16383)
        .query_async(&mut d)
        .await
        .unwrap();
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let info: String = redis::cmd("CLUSTER")
            .arg("INFO")
            .query_async(&mut d)
            .await
            .unwrap();
        if info.contains("cluster_state:ok") {
            break;
        }
        assert!(Instant::now() < until, "the one-node cluster never came up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The proxy listens where the node says it is.
    let proxy = CuttingProxy::start(proxy_port, redis.port).await;
    let mut target = Target::fresh_on("redis://127.0.0.1:1");
    target.redis_cluster = Some(format!("redis://127.0.0.1:{}", proxy.port));
    let app = spawn_on(target).await;
    let sale = app.create_sale(SaleSpec::default()).await;
    let reserve = redis::Script::new(&format!(
        "{}\n{}",
        include_str!("../../lua/prelude.lua"),
        include_str!("../../lua/reserve.lua")
    ));
    let runs = |stats: String| -> u64 {
        let line = stats
            .lines()
            .find(|l| l.starts_with("cmdstat_evalsha:"))
            .unwrap_or("calls=0,");
        line.split("calls=")
            .nth(1)
            .unwrap()
            .split(',')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let stats = || async {
        let mut d = direct.get_multiplexed_async_connection().await.unwrap();
        let s: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut d)
            .await
            .unwrap();
        s
    };
    let before = runs(stats().await);
    proxy.arm(reserve.get_hash());
    let (s, o) = app.reserve(&sale, 7, None).await;
    assert_eq!(
        proxy.cuts.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "cut once"
    );
    let after = runs(stats().await);
    assert!(
        after >= before + 2,
        "the call was sent again ({before} -> {after})"
    );
    assert_eq!(s, 201, "{o}");
    assert_eq!(o["order_id"], format!("{sale}-1"), "the first run's order");
    assert_eq!(app.sale_field(&sale, "seq").await, 1, "one order made");
    assert_eq!(
        app.sale_field(&sale, "pending").await,
        1,
        "one unit reserved"
    );
    let (s, o) = app.reserve(&sale, 8, None).await;
    assert_eq!(
        (s, o["order_id"].as_str()),
        (201, Some(&*format!("{sale}-2")))
    );
    app.finish().await;
}

/// With writes waiting for one replica, on a primary and a replica of the
/// test's own: a write whose WAIT times out (the replica froze just after
/// the replica check) is answered 503 with a retry key and counted; once
/// the frozen replica's lag shows, writes are refused before they run
/// (503, nothing written); when it thaws, the retry key finds the order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_its_replica_a_write_is_refused_or_answered_with_a_retry_key() {
    let primary = OwnRedis::start_with(&["--appendfsync", "everysec"]).await;
    let replica = OwnRedis::start_with(&[
        "--replicaof",
        "127.0.0.1",
        &primary.port.to_string(),
        "--appendfsync",
        "everysec",
    ])
    .await;
    let mut target = Target::fresh_on(&primary.url());
    target.wait_replicas = 1;
    let app = spawn_on(target).await;
    let sale = app.create_sale(SaleSpec::default()).await;
    // The replica is in sync: a write is acknowledged.
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let (s, o) = app.reserve(&sale, 1, None).await;
        if s == 201 {
            break;
        }
        assert_eq!(s, 503, "{o}");
        assert!(Instant::now() < until, "the replica never came up: {o}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Frozen right after a check that found it well: the next write runs,
    // its WAIT times out, the buyer gets 503 with a retry key.
    let (s, _) = app.reserve(&sale, 2, None).await;
    assert_eq!(s, 201);
    replica.signal("STOP");
    let (s, retry_after, body) = crate::front_door::reserve_qty(&app, &sale, 3, 1, None).await;
    assert_eq!((s, retry_after.is_some()), (503, true), "{body}");
    let key = body["error"]["retry_key"].as_str().unwrap().to_owned();
    assert_eq!(
        app.sale_field(&sale, "seq").await,
        3,
        "it ran on the primary"
    );
    assert!(app
        .metrics()
        .await
        .contains("flashsale_redis_writes_unacknowledged_total 1"));
    // Once its lag shows (a replica acknowledges every second), writes are
    // refused before they run.
    let refused = || async {
        let m = app.metrics().await;
        let line = m
            .lines()
            .find(|l| l.starts_with("flashsale_redis_writes_refused_replicas_total "))
            .unwrap()
            .to_owned();
        line.rsplit(' ').next().unwrap().parse::<u64>().unwrap()
    };
    let before = refused().await;
    let until = Instant::now() + Duration::from_secs(10);
    while refused().await == before {
        let (s, _) = app.reserve(&sale, 4, Some("frozen")).await;
        assert_eq!(s, 503);
        assert!(Instant::now() < until, "writes were never refused");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let seq = app.sale_field(&sale, "seq").await;
    let (s, retry_after, body) = crate::front_door::reserve_qty(&app, &sale, 5, 1, None).await;
    assert_eq!((s, retry_after.is_some()), (503, true), "{body}");
    assert_eq!(app.sale_field(&sale, "seq").await, seq, "nothing written");
    // Thawed, the replica catches up; the buyer's retry key finds the order
    // the unacknowledged write made.
    replica.signal("CONT");
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let (s, _, body) = crate::front_door::reserve_qty(&app, &sale, 3, 1, Some(&key)).await;
        if s == 201 || s == 200 {
            assert_eq!(body["order_id"], format!("{sale}-3"), "{body}");
            break;
        }
        assert_eq!(s, 503, "{body}");
        assert!(Instant::now() < until, "{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        app.sale_field(&sale, "seq").await,
        seq,
        "the retry made no second order"
    );
    app.finish().await;
}
