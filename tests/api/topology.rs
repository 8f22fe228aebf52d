//! Real Redis topologies of the test's own: a Cluster (3 primaries, 3
//! replicas) or a Sentinel set (primary, replica, 3 sentinels), started by
//! `scripts/redis-topology.sh` in a fresh folder on free loopback ports, with
//! the faults a failover drill needs (kill, stop, continue, restart,
//! promote). It never touches the shared Redis, and every answer it gives
//! comes from asking the nodes, never from what it started with.
#![allow(dead_code)] // The drills that use the rest of it come later.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use redis::{FromRedisValue, Value};

use crate::helpers::unique;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/redis-topology.sh");

/// Which topology.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Cluster,
    Sentinel,
}

/// A process's role as `DIR/nodes` last recorded it (at start, or at the
/// script's last `wait`); ask [`OwnTopology::role`] for the role now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Primary,
    Replica,
    Sentinel,
}

/// One process of the topology.
#[derive(Clone, Debug)]
pub struct Node {
    pub role: Role,
    pub port: u16,
    /// The PID now running it (updated by [`OwnTopology::restart`]).
    pub pid: u32,
    /// `redis-server <conf>` (`--sentinel` for a sentinel) starts it again
    /// on the same port and data folder.
    pub conf: PathBuf,
}

/// A running topology; dropping it stops every process and removes its
/// folder (kept, with the logs, when the test panicked).
pub struct OwnTopology {
    pub kind: Kind,
    pub dir: PathBuf,
    pub nodes: Vec<Node>,
    /// `DIR/topology.env`: `FLASHSALE_REDIS_CLUSTER`, or
    /// `FLASHSALE_REDIS_SENTINELS` and `FLASHSALE_REDIS_SENTINEL_MASTER`.
    pub env: Vec<(String, String)>,
}

impl OwnTopology {
    /// 3 primaries + 3 replicas with this `cluster-node-timeout`. Below 5000
    /// only for drills: two busy cores make shorter ones fail over by
    /// themselves.
    pub async fn cluster(node_timeout_ms: u64) -> Self {
        Self::start(Kind::Cluster, "cluster", node_timeout_ms).await
    }

    /// Primary, replica and 3 sentinels (quorum 2) with this
    /// `down-after-milliseconds`.
    pub async fn sentinel(down_after_ms: u64) -> Self {
        Self::start(Kind::Sentinel, "sentinel", down_after_ms).await
    }

    async fn start(kind: Kind, word: &str, ms: u64) -> Self {
        let dir = std::env::temp_dir().join(unique("fstest-topo"));
        let d = dir.to_string_lossy().into_owned();
        script(&["start", word, &d, &ms.to_string()]).await;
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(name)).unwrap_or_else(|e| panic!("{d}/{name}: {e}"))
        };
        let nodes = read("nodes").lines().map(parse_node).collect();
        let env = read("topology.env")
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Self {
            kind,
            dir,
            nodes,
            env,
        }
    }

    /// A value of `DIR/topology.env`.
    pub fn env_var(&self, name: &str) -> Option<&str> {
        let found = self.env.iter().find(|(k, _)| k == name);
        found.map(|(_, v)| v.as_str())
    }

    /// The Sentinel set's master name.
    pub fn master_name(&self) -> &str {
        self.env_var("FLASHSALE_REDIS_SENTINEL_MASTER")
            .expect("a Sentinel set names its master")
    }

    /// The node on `port`; panics when there is none.
    pub fn node(&self, port: u16) -> &Node {
        let found = self.nodes.iter().find(|n| n.port == port);
        found.unwrap_or_else(|| panic!("no node on port {port}"))
    }

    /// Redis nodes (primaries and replicas as started), no sentinels.
    pub fn data_ports(&self) -> Vec<u16> {
        self.ports_where(|r| r != Role::Sentinel)
    }

    /// The sentinels (none in a cluster).
    pub fn sentinel_ports(&self) -> Vec<u16> {
        self.ports_where(|r| r == Role::Sentinel)
    }

    fn ports_where(&self, keep: impl Fn(Role) -> bool) -> Vec<u16> {
        let kept = self.nodes.iter().filter(|n| keep(n.role));
        kept.map(|n| n.port).collect()
    }

    /// The primary serving `key`, as most answering nodes see it (cluster:
    /// `CLUSTER NODES`; Sentinel: the sentinels, `key` aside). A killed
    /// primary stays the answer until the topology has noticed.
    pub async fn primary_of(&self, key: &str) -> u16 {
        let mut votes: HashMap<u16, usize> = HashMap::new();
        match self.kind {
            Kind::Cluster => {
                let slot = self.keyslot(key).await;
                for port in self.data_ports() {
                    if let Ok(text) = ask::<String>(port, redis::cmd("CLUSTER").arg("NODES")).await
                    {
                        if let Some(owner) = slot_owner(&text, slot) {
                            *votes.entry(owner).or_default() += 1;
                        }
                    }
                }
            }
            Kind::Sentinel => {
                for port in self.sentinel_ports() {
                    if let Some(primary) = self.named_primary(port).await {
                        *votes.entry(primary).or_default() += 1;
                    }
                }
            }
        }
        let best = votes.into_iter().max_by_key(|&(port, n)| (n, port));
        best.unwrap_or_else(|| panic!("no node of {} names a primary", self.dir.display()))
            .0
    }

    /// The replicas connected to `primary_port` now (its `ROLE`), sorted;
    /// empty when it is not a primary or does not answer.
    pub async fn replicas_of(&self, primary_port: u16) -> Vec<u16> {
        let Ok(role) = ask::<Vec<Value>>(primary_port, &redis::cmd("ROLE")).await else {
            return vec![];
        };
        if role.first().and_then(text).as_deref() != Some("master") {
            return vec![];
        }
        let Some(Value::Array(replicas)) = role.get(2) else {
            return vec![];
        };
        let mut ports: Vec<u16> = replicas
            .iter()
            .filter_map(|r| match r {
                Value::Array(fields) => fields.get(1).and_then(text)?.parse().ok(),
                _ => None,
            })
            .collect();
        ports.sort_unstable();
        ports
    }

    /// `ROLE`'s first word now: `master`, `slave` or `sentinel`; `None`
    /// when the node does not answer.
    pub async fn role(&self, port: u16) -> Option<String> {
        let role = ask::<Vec<Value>>(port, &redis::cmd("ROLE")).await.ok()?;
        role.first().and_then(text)
    }

    /// SIGKILL, no goodbye; returns once the process is gone.
    pub fn kill(&self, port: u16) {
        let pid = self.node(port).pid;
        signal("-KILL", pid);
        let deadline = Instant::now() + Duration::from_secs(5);
        while alive(pid) {
            assert!(Instant::now() < deadline, "pid {pid} outlived SIGKILL");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGSTOP: the node hangs, its sockets stay open.
    pub fn stop(&self, port: u16) {
        signal("-STOP", self.node(port).pid);
    }

    /// SIGCONT after [`Self::stop`].
    pub fn cont(&self, port: u16) {
        signal("-CONT", self.node(port).pid);
    }

    /// Starts the killed node again from its conf (same port, data folder
    /// and, in a cluster, identity) and waits until it answers PING. Its
    /// role is the topology's business: see [`Self::wait_ready`].
    pub async fn restart(&mut self, port: u16) {
        let node = self.node(port).clone();
        assert!(
            !alive(node.pid),
            "node {port} (pid {}) still runs",
            node.pid
        );
        let pidfile = pidfile_of(&node.conf);
        let _ = std::fs::remove_file(&pidfile);
        let mut cmd = Command::new("redis-server");
        cmd.arg(&node.conf);
        if node.role == Role::Sentinel {
            cmd.arg("--sentinel");
        }
        // Daemonized: returns once the server forked.
        let out = tokio::task::spawn_blocking(move || cmd.output())
            .await
            .unwrap()
            .expect("redis-server is installed");
        assert!(out.status.success(), "restart {port}: {}", show(&out));
        let deadline = Instant::now() + Duration::from_secs(10);
        let pid = loop {
            let pid = std::fs::read_to_string(&pidfile).ok();
            let pid = pid.and_then(|p| p.trim().parse::<u32>().ok());
            if let Some(pid) = pid {
                if ask::<String>(port, &redis::cmd("PING")).await.is_ok() {
                    break pid;
                }
            }
            assert!(Instant::now() < deadline, "node {port} did not restart");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        for n in self.nodes.iter_mut().filter(|n| n.port == port) {
            n.pid = pid;
        }
        self.record_pid(port, pid);
    }

    /// The script's readiness check again (every node answers; cluster: state
    /// ok on all, 16384 slots covered, each primary with a linked replica;
    /// Sentinel: the sentinels agree on the primary and list the replica,
    /// linked, in every sentinel's own view). Panics with what is missing
    /// after 45 s. A Sentinel set takes ~20 s after a primary came back or
    /// was demoted (see the script); call this before the next fault.
    pub async fn wait_ready(&self) {
        script(&["wait", &self.dir.to_string_lossy()]).await;
    }

    /// Makes `replica_port` the primary by Redis's own means (cluster:
    /// `CLUSTER FAILOVER TAKEOVER` on it; Sentinel: `SENTINEL failover` while
    /// the primary answers, otherwise the sentinels' own failover) and waits
    /// until every answering node agrees.
    pub async fn promote(&self, replica_port: u16) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut next_try = Instant::now();
        while !self.agrees_primary(replica_port).await {
            assert!(
                Instant::now() < deadline,
                "{replica_port} was not promoted within 30 s"
            );
            if Instant::now() >= next_try {
                // A refused request (not synced yet, a failover in progress)
                // is made again soon; an accepted one only when it has had
                // the time a failover takes.
                let accepted = self.ask_promotion(replica_port).await;
                let pause = if accepted { 10_000 } else { 500 };
                next_try = Instant::now() + Duration::from_millis(pause);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Asks once; true when Redis accepted the request.
    async fn ask_promotion(&self, replica_port: u16) -> bool {
        match self.kind {
            Kind::Cluster => {
                if self.role(replica_port).await.as_deref() != Some("slave") {
                    return false;
                }
                let takeover = redis::cmd("CLUSTER")
                    .arg("FAILOVER")
                    .arg("TAKEOVER")
                    .clone();
                ask::<Value>(replica_port, &takeover).await.is_ok()
            }
            Kind::Sentinel => {
                let primary = self.primary_of("").await;
                let primary_up = ask::<String>(primary, &redis::cmd("PING")).await.is_ok();
                if primary == replica_port || !primary_up {
                    return false; // The sentinels fail over by themselves.
                }
                let failover = redis::cmd("SENTINEL")
                    .arg("FAILOVER")
                    .arg(self.master_name())
                    .clone();
                for s in self.sentinel_ports() {
                    if ask::<Value>(s, &failover).await.is_ok() {
                        return true;
                    }
                }
                false
            }
        }
    }

    /// Every answering node (cluster) or sentinel names `port` the primary,
    /// and then `port` says so itself (in that order: a node promoted and
    /// at once turned back into a replica is caught).
    async fn agrees_primary(&self, port: u16) -> bool {
        match self.kind {
            Kind::Cluster => {
                for p in self.data_ports() {
                    let Ok(text) = ask::<String>(p, redis::cmd("CLUSTER").arg("NODES")).await
                    else {
                        continue;
                    };
                    let serving = text.lines().any(|line| {
                        let f: Vec<&str> = line.split_whitespace().collect();
                        f.len() > 8 && addr_port(f[1]) == Some(port) && f[2].contains("master")
                    });
                    if !serving {
                        return false;
                    }
                }
            }
            Kind::Sentinel => {
                for s in self.sentinel_ports() {
                    if ask::<String>(s, &redis::cmd("PING")).await.is_ok()
                        && self.named_primary(s).await != Some(port)
                    {
                        return false;
                    }
                }
            }
        }
        self.role(port).await.as_deref() == Some("master")
    }

    async fn keyslot(&self, key: &str) -> i64 {
        for port in self.data_ports() {
            let cmd = redis::cmd("CLUSTER").arg("KEYSLOT").arg(key).clone();
            if let Ok(slot) = ask::<i64>(port, &cmd).await {
                return slot;
            }
        }
        panic!("no node of {} answers", self.dir.display())
    }

    /// The primary a sentinel names.
    async fn named_primary(&self, sentinel: u16) -> Option<u16> {
        let cmd = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(self.master_name())
            .clone();
        let addr = ask::<Option<(String, String)>>(sentinel, &cmd)
            .await
            .ok()??;
        addr.1.parse().ok()
    }

    /// Records `port`'s new PID in `DIR/nodes` (the script's `stop` reads it;
    /// the roles there are the script's).
    fn record_pid(&self, port: u16, pid: u32) {
        let path = self.dir.join("nodes");
        let lines: String = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|line| {
                let mut f: Vec<String> = line.splitn(4, ' ').map(str::to_owned).collect();
                if f.len() == 4 && f[1] == port.to_string() {
                    f[2] = pid.to_string();
                }
                f.join(" ") + "\n"
            })
            .collect();
        std::fs::write(path, lines).unwrap();
    }
}

impl Drop for OwnTopology {
    fn drop(&mut self) {
        let out = Command::new(SCRIPT)
            .arg("stop")
            .arg(&self.dir)
            .output()
            .map(|o| show(&o));
        if std::thread::panicking() {
            eprintln!("topology: kept {} for its logs", self.dir.display());
        } else {
            let stopped = out.expect("the topology script runs");
            assert!(
                stopped.contains("stopped") || stopped.contains("nothing"),
                "{stopped}"
            );
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Runs the script; panics with its output when it fails.
async fn script(args: &[&str]) -> String {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let out = tokio::task::spawn_blocking(move || Command::new(SCRIPT).args(&args).output())
        .await
        .unwrap()
        .expect("the topology script runs");
    assert!(out.status.success(), "{SCRIPT}: {}", show(&out));
    show(&out)
}

fn show(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// One command on a connection of its own, bounded in time so a stopped
/// (SIGSTOP) node is an error, not a hang.
async fn ask<T: FromRedisValue>(port: u16, cmd: &redis::Cmd) -> Result<T, String> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(Duration::from_secs(2)));
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
    let asked = async {
        let mut c = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        cmd.query_async::<T>(&mut c).await
    };
    match tokio::time::timeout(Duration::from_secs(3), asked).await {
        Ok(answer) => answer.map_err(|e| e.to_string()),
        Err(_) => Err(format!("{port} did not answer in 3 s")),
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

/// `ROLE PORT PID CONF`, a line of `DIR/nodes`.
fn parse_node(line: &str) -> Node {
    let f: Vec<&str> = line.splitn(4, ' ').collect();
    assert_eq!(f.len(), 4, "bad nodes line {line:?}");
    let role = match f[0] {
        "primary" => Role::Primary,
        "replica" => Role::Replica,
        "sentinel" => Role::Sentinel,
        other => panic!("unknown role {other:?}"),
    };
    Node {
        role,
        port: f[1].parse().unwrap(),
        pid: f[2].parse().unwrap(),
        conf: PathBuf::from(f[3]),
    }
}

/// The port of `127.0.0.1:PORT@BUS`.
fn addr_port(addr: &str) -> Option<u16> {
    let (_, rest) = addr.rsplit_once(':')?;
    rest.split('@').next()?.parse().ok()
}

/// The primary that claims `slot` in a `CLUSTER NODES` view.
fn slot_owner(nodes: &str, slot: i64) -> Option<u16> {
    nodes.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 9 || !f[2].contains("master") {
            return None;
        }
        let owns = f[8..].iter().any(|range| {
            let (lo, hi) = range.split_once('-').unwrap_or((range, range));
            matches!((lo.parse::<i64>(), hi.parse::<i64>()), (Ok(lo), Ok(hi)) if lo <= slot && slot <= hi)
        });
        owns.then(|| addr_port(f[1])).flatten()
    })
}

/// The `pidfile` a conf names (a sentinel's rewritten conf quotes it).
fn pidfile_of(conf: &Path) -> PathBuf {
    let text = std::fs::read_to_string(conf).unwrap();
    let line = text.lines().rev().find_map(|l| l.strip_prefix("pidfile "));
    PathBuf::from(
        line.expect("every conf names a pidfile")
            .trim()
            .trim_matches('"'),
    )
}

fn signal(sig: &str, pid: u32) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill {sig} {pid} failed");
}

/// True while `pid` runs (a zombie counts as gone: nothing reaps the
/// daemons here).
fn alive(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat.rsplit_once(") ").and_then(|(_, s)| s.chars().next());
    matches!(state, Some(s) if s != 'Z' && s != 'X')
}

// ------------------------------------------------------------------ drills ---

/// SET through `primary`, acknowledged by its replica.
async fn write_acked(primary: u16, key: &str, value: &str) {
    let set = redis::cmd("SET").arg(key).arg(value).clone();
    ask::<Value>(primary, &set).await.unwrap();
    let acked: i64 = ask(primary, redis::cmd("WAIT").arg(1).arg(5000))
        .await
        .unwrap();
    assert_eq!(acked, 1, "the replica did not acknowledge {key}");
}

async fn get(port: u16, key: &str) -> Option<String> {
    ask(port, redis::cmd("GET").arg(key)).await.unwrap()
}

/// Kills the primary of `key`, sees its replica take over within 15 s with
/// the acknowledged write, restarts the old primary and sees it come back
/// as a replica, then promotes it back.
async fn fail_over_and_rejoin(mut t: OwnTopology, started: Instant) {
    let label = format!("{:?}", t.kind);
    eprintln!("{label}: ready in {:?}", started.elapsed());
    let key = "topology:{drill}";
    let old = t.primary_of(key).await;
    let replicas = t.replicas_of(old).await;
    assert_eq!(replicas.len(), 1, "{old} has replicas {replicas:?}");
    let heir = replicas[0];
    write_acked(old, key, "before").await;

    t.kill(old);
    let killed = Instant::now();
    loop {
        // The heir has the acknowledged write, and takes writes (a replica
        // refuses them, a cluster replica redirects even reads).
        if t.primary_of(key).await == heir {
            if let Ok(found) = ask::<Option<String>>(heir, redis::cmd("GET").arg(key)).await {
                let set = redis::cmd("SET").arg(key).arg("after").clone();
                if ask::<Value>(heir, &set).await.is_ok() {
                    assert_eq!(found.as_deref(), Some("before"), "{label}: write lost");
                    break;
                }
            }
        }
        assert!(
            killed.elapsed() < Duration::from_secs(15),
            "{label}: no new primary 15 s after the kill"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("{label}: {heir} took over in {:?}", killed.elapsed());

    let restarted = Instant::now();
    t.restart(old).await;
    while t.role(old).await.as_deref() != Some("slave") {
        assert!(
            restarted.elapsed() < Duration::from_secs(30),
            "{label}: {old} is not a replica 30 s after its restart"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "{label}: {old} back as a replica in {:?}",
        restarted.elapsed()
    );
    t.wait_ready().await;
    eprintln!("{label}: ready again in {:?}", restarted.elapsed());
    assert_eq!(t.replicas_of(heir).await, vec![old]);

    let promoting = Instant::now();
    t.promote(old).await;
    eprintln!("{label}: {old} promoted back in {:?}", promoting.elapsed());
    assert_eq!(t.primary_of(key).await, old);
    assert_eq!(get(old, key).await.as_deref(), Some("after"));
    t.wait_ready().await;
    eprintln!("{label}: ready again in {:?}", promoting.elapsed());
    assert_eq!(t.replicas_of(old).await, vec![heir]);
}

#[tokio::test]
#[ignore = "drill: kills nodes; scripts/test-topologies.sh runs the drills one at a time"]
async fn cluster_fails_over_and_rejoins() {
    let started = Instant::now();
    let t = OwnTopology::cluster(2000).await;
    assert_eq!(t.data_ports().len(), 6);
    let seeds = t.env_var("FLASHSALE_REDIS_CLUSTER").unwrap();
    assert_eq!(seeds.split(',').count(), 6, "{seeds}");
    fail_over_and_rejoin(t, started).await;
}

#[tokio::test]
#[ignore = "drill: kills nodes; scripts/test-topologies.sh runs the drills one at a time"]
async fn sentinel_fails_over_and_rejoins() {
    let started = Instant::now();
    let t = OwnTopology::sentinel(2000).await;
    assert_eq!(t.sentinel_ports().len(), 3);
    assert_eq!(t.master_name(), "flashsale");
    fail_over_and_rejoin(t, started).await;
}
