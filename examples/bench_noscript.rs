//! NOSCRIPT handling against Redis Functions, for the reserve script.
//!
//! A Redis that lost its script cache (a promoted replica, a restart, a
//! `SCRIPT FLUSH`) answers the first EVALSHA of each script with NOSCRIPT,
//! and redis-rs's `Script` then sends SCRIPT LOAD and EVALSHA again. Redis
//! Functions (`FUNCTION LOAD` a library once, call it with `FCALL`) are
//! replicated and persisted instead. This measures, on one Redis in one
//! run: the first call after the cache is lost against a warm one (one
//! caller, and 64 callers at once), warm FCALL against warm EVALSHA
//! (latency and throughput), what a replica holds after a promotion, and
//! what deploying functions costs.
//!
//! The function library is built from the same Lua the engine sends: each
//! script's text (with `lua/prelude.lua` in front where the engine puts it)
//! becomes the body of `callback = function(KEYS, ARGV) ... end`, unchanged.
//! Its names carry a hash of its text (`flashsale_<hash>`,
//! `reserve_<hash>`), so two builds never call each other's code.
//!
//! Run it with `scripts/bench-noscript.sh`, which starts a Redis and a
//! replica of its own: it flushes the script cache and the functions of the
//! Redis at `--redis-url` many times and promotes the one at
//! `--replica-url`, so never point it at a Redis that serves anything.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use flashsale::domain::{Qty, SaleId, UserId};
use flashsale::engine::keys::DUE_BUCKET;
use flashsale::engine::{Engine, EngineOptions, Reservation, SaleKeys, SaleTerms, Topology};
use redis::aio::MultiplexedConnection;
use redis::Script;

#[derive(Parser, Debug)]
struct Args {
    /// The Redis to measure (its scripts and functions are flushed).
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// A replica of it (`--replicaof`), promoted at the end; none: the
    /// replication checks are skipped.
    #[arg(long)]
    replica_url: Option<String>,
    /// Rounds of "flush, first call, warm call".
    #[arg(long, default_value_t = 200)]
    rounds: usize,
    /// Callers hitting an empty cache at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Bursts of `concurrency` callers per case.
    #[arg(long, default_value_t = 30)]
    bursts: usize,
    /// Seconds per throughput run.
    #[arg(long, default_value_t = 2)]
    secs: u64,
    /// Throughput runs per way of calling (alternating).
    #[arg(long, default_value_t = 5)]
    runs: usize,
}

const PRELUDE: &str = include_str!("../lua/prelude.lua");

/// Every script of the engine (`src/engine/scripts.rs`): name, text, and
/// whether the prelude goes in front of it.
const SCRIPTS: [(&str, &str, bool); 20] = [
    ("reserve", include_str!("../lua/reserve.lua"), true),
    ("pay", include_str!("../lua/pay.lua"), true),
    ("cancel", include_str!("../lua/cancel.lua"), true),
    ("expire", include_str!("../lua/expire.lua"), true),
    ("refund", include_str!("../lua/refund.lua"), true),
    ("settle", include_str!("../lua/settle.lua"), false),
    (
        "audit_snapshot",
        include_str!("../lua/audit_snapshot.lua"),
        true,
    ),
    ("audit_fix", include_str!("../lua/audit_fix.lua"), true),
    ("load_sale", include_str!("../lua/load_sale.lua"), false),
    (
        "sale_snapshot",
        include_str!("../lua/sale_snapshot.lua"),
        false,
    ),
    ("read_orders", include_str!("../lua/read_orders.lua"), true),
    ("retire", include_str!("../lua/retire.lua"), true),
    ("guard", include_str!("../lua/guard.lua"), true),
    (
        "rebuild_begin",
        include_str!("../lua/rebuild_begin.lua"),
        true,
    ),
    (
        "rebuild_read",
        include_str!("../lua/rebuild_read.lua"),
        true,
    ),
    (
        "rebuild_write",
        include_str!("../lua/rebuild_write.lua"),
        true,
    ),
    ("rebuilt", include_str!("../lua/rebuilt.lua"), true),
    ("fence", include_str!("../lua/fence.lua"), true),
    (
        "rebuild_clear",
        include_str!("../lua/rebuild_clear.lua"),
        false,
    ),
    ("rebuild_put", include_str!("../lua/rebuild_put.lua"), false),
];

/// A script's text exactly as the engine sends it.
fn script_text(src: &str, prelude: bool) -> String {
    if prelude {
        format!("{PRELUDE}\n{src}")
    } else {
        src.to_owned()
    }
}

/// A function library of `functions` (name, body): each body runs as the
/// callback, with `KEYS` and `ARGV` its parameters, so the text of a
/// script works unchanged, and every local of the prelude (the sale's
/// terms it caches, the buckets a call declared) is new on each call, as
/// with EVALSHA. The prelude cannot move to the library's top level as is:
/// there `KEYS` is no global (Redis refuses the access), and the library's
/// locals live as long as the library, so `terms` and `declared_buckets`
/// would carry one call's sale into the next. Neither kind of script may
/// set a global (Redis 7 refuses both), and the scripts set none.
fn library(name: &str, functions: &[(String, String)]) -> String {
    let mut lib = format!("#!lua name={name}\n");
    for (f, body) in functions {
        lib.push_str(&format!(
            "redis.register_function{{function_name = '{f}', callback = function(KEYS, ARGV)\n{body}\nend}}\n"
        ));
    }
    lib
}

/// A library whose names carry the hash of its functions' text: its name
/// and the name its function `base` goes by.
fn versioned(functions: &[(&str, String)], base: &str) -> (String, String, String) {
    let all: String = functions.iter().map(|(_, b)| b.as_str()).collect();
    let v = Script::new(&all).get_hash()[..12].to_owned();
    let named: Vec<(String, String)> = functions
        .iter()
        .map(|(f, b)| (format!("{f}_{v}"), b.clone()))
        .collect();
    let name = format!("flashsale_{v}");
    (library(&name, &named), name, format!("{base}_{v}"))
}

/// The token the benchmark's sales carry, as the service formats one.
const TOKEN: &str = "000000000000beef";
/// The flow backlog bound passed to the script (never reached here).
const BACKLOG: u64 = 1 << 40;

/// How one reserve call is sent.
#[derive(Clone, Copy)]
enum Via<'a> {
    /// EVALSHA through redis-rs's `Script` (NOSCRIPT: SCRIPT LOAD, EVALSHA).
    Script(&'a Script),
    /// FCALL of this function.
    Fcall(&'a str),
    /// FCALL, and on "Function not found" FUNCTION LOAD of the library and
    /// FCALL again: the fallback a caller of functions has to write itself.
    FcallOrLoad { name: &'a str, library: &'a str },
}

/// Reserve calls of one sale as the engine's combiner makes them: the
/// sale's keys, the due-queue buckets the new orders should fall in, a
/// fresh call id, the highest seq seen, the token, one fresh buyer per
/// reservation.
struct Reserver {
    keys: SaleKeys,
    run: String,
    calls: AtomicU64,
    users: AtomicU64,
    high: AtomicU64,
}

/// Calls sent again for a due-queue bucket they had not declared.
static REBUCKETED: AtomicU64 = AtomicU64::new(0);

impl Reserver {
    fn new(keys: SaleKeys, first_user: u64) -> Self {
        Self {
            keys,
            run: format!("{:08x}", std::process::id()),
            calls: AtomicU64::new(1),
            users: AtomicU64::new(first_user),
            high: AtomicU64::new(0),
        }
    }

    fn next_user(&self) -> u64 {
        self.users.fetch_add(1, Ordering::Relaxed)
    }

    /// One call carrying `batch` reservations; an error unless every one
    /// made an order.
    async fn reserve(
        &self,
        c: &mut MultiplexedConnection,
        via: Via<'_>,
        batch: usize,
    ) -> anyhow::Result<()> {
        let call = format!(
            "{}{:x}",
            self.run,
            self.calls.fetch_add(1, Ordering::Relaxed)
        );
        let seen = self.high.load(Ordering::Relaxed);
        let first_user = self.users.fetch_add(batch as u64, Ordering::Relaxed);
        let mut args = vec![
            BACKLOG.to_string(),
            call,
            seen.to_string(),
            TOKEN.to_owned(),
        ];
        for u in first_user..first_user + batch as u64 {
            args.extend([u.to_string(), "1".to_owned(), String::new()]);
        }
        let from = (seen + 1) / DUE_BUCKET;
        let mut buckets = vec![from, from + 1];
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut keys: Vec<String> = self
                .keys
                .reserve_keys()
                .iter()
                .map(|k| (*k).to_owned())
                .collect();
            keys.extend(buckets.iter().flat_map(|b| self.keys.bucket_keys(*b)));
            let reply: redis::RedisResult<Vec<Vec<String>>> = match via {
                Via::Script(s) => {
                    let mut inv = s.prepare_invoke();
                    for k in &keys {
                        inv.key(k);
                    }
                    for a in &args {
                        inv.arg(a);
                    }
                    inv.invoke_async(c).await
                }
                Via::Fcall(name) => fcall(c, name, &keys, &args).await,
                Via::FcallOrLoad { name, library } => match fcall(c, name, &keys, &args).await {
                    Err(e) if function_missing(&e) => {
                        load_library(c, library, false).await?;
                        fcall(c, name, &keys, &args).await
                    }
                    other => other,
                },
            };
            match reply {
                Ok(replies) => {
                    anyhow::ensure!(replies.len() == batch, "{} replies", replies.len());
                    for r in &replies {
                        anyhow::ensure!(r.first().map(String::as_str) == Some("ok"), "{r:?}");
                        let seq: u64 = r[1].parse()?;
                        self.high.fetch_max(seq, Ordering::Relaxed);
                    }
                    return Ok(());
                }
                Err(e) if e.code() == Some("NEEDBUCKETS") && attempt < 4 => {
                    REBUCKETED.fetch_add(1, Ordering::Relaxed);
                    buckets.extend(
                        e.detail()
                            .unwrap_or("")
                            .split_whitespace()
                            .filter_map(|w| w.parse::<u64>().ok()),
                    );
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

async fn fcall(
    c: &mut MultiplexedConnection,
    name: &str,
    keys: &[String],
    args: &[String],
) -> redis::RedisResult<Vec<Vec<String>>> {
    redis::cmd("FCALL")
        .arg(name)
        .arg(keys.len())
        .arg(keys)
        .arg(args)
        .query_async(c)
        .await
}

fn function_missing(e: &redis::RedisError) -> bool {
    e.to_string().contains("Function not found")
}

/// FUNCTION LOAD [REPLACE]; without REPLACE a library of the same name
/// already there counts as loaded (its name carries its text's hash).
async fn load_library(
    c: &mut MultiplexedConnection,
    library: &str,
    replace: bool,
) -> redis::RedisResult<()> {
    let mut cmd = redis::cmd("FUNCTION");
    cmd.arg("LOAD");
    if replace {
        cmd.arg("REPLACE");
    }
    match cmd.arg(library).query_async::<String>(c).await {
        Ok(_) => Ok(()),
        Err(e) if e.to_string().contains("already exists") => Ok(()),
        Err(e) => Err(e),
    }
}

async fn flush_scripts(c: &mut MultiplexedConnection) -> anyhow::Result<()> {
    let () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .arg("SYNC")
        .query_async(c)
        .await?;
    Ok(())
}

async fn flush_functions(c: &mut MultiplexedConnection) -> anyhow::Result<()> {
    let () = redis::cmd("FUNCTION")
        .arg("FLUSH")
        .arg("SYNC")
        .query_async(c)
        .await?;
    Ok(())
}

/// `INFO commandstats`: per command, (calls + rejected calls, usec).
async fn cmdstats(c: &mut MultiplexedConnection) -> anyhow::Result<HashMap<String, (u64, u64)>> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(c)
        .await?;
    let mut out = HashMap::new();
    for line in info.lines() {
        let Some((name, rest)) = line
            .strip_prefix("cmdstat_")
            .and_then(|l| l.split_once(':'))
        else {
            continue;
        };
        let field = |f: &str| -> u64 {
            rest.split(',')
                .find_map(|kv| kv.strip_prefix(f)?.strip_prefix('='))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        out.insert(
            name.to_owned(),
            (field("calls") + field("rejected_calls"), field("usec")),
        );
    }
    Ok(out)
}

/// Commands Redis counted between two `cmdstats`.
struct Counted(HashMap<String, (u64, u64)>, HashMap<String, (u64, u64)>);

impl Counted {
    fn calls(&self, cmd: &str) -> u64 {
        let get = |m: &HashMap<String, (u64, u64)>| m.get(cmd).map_or(0, |v| v.0);
        get(&self.1) - get(&self.0)
    }

    fn usec(&self, cmd: &str) -> u64 {
        let get = |m: &HashMap<String, (u64, u64)>| m.get(cmd).map_or(0, |v| v.1);
        get(&self.1) - get(&self.0)
    }
}

/// Round trips of a reserve call: the commands it sent.
const CALL_COMMANDS: [&str; 4] = ["evalsha", "script|load", "fcall", "function|load"];

fn round_trips(c: &Counted) -> u64 {
    CALL_COMMANDS.iter().map(|cmd| c.calls(cmd)).sum()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// p50, p99 and max in ms.
fn pct(samples: &[Duration]) -> (f64, f64, f64) {
    let mut s = samples.to_vec();
    s.sort_unstable();
    let at = |p: f64| ms(s[((s.len() - 1) as f64 * p).round() as usize]);
    (at(0.50), at(0.99), at(1.0))
}

async fn timed<F: Future<Output = anyhow::Result<()>>>(f: F) -> anyhow::Result<Duration> {
    let t = Instant::now();
    f.await?;
    Ok(t.elapsed())
}

fn engine(url: &str, prefix: &str) -> anyhow::Result<Engine> {
    Engine::connect(&EngineOptions {
        timeout: Duration::from_secs(10),
        flow_backlog_limit: BACKLOG,
        sold_out_ttl: Duration::ZERO,
        ..EngineOptions::new(Topology::Node(url.to_owned()), prefix)
    })
}

async fn load_sale(e: &Engine, id: u64) -> anyhow::Result<SaleId> {
    let id = SaleId::new(id)?;
    let now = e.now_ms().await?;
    e.load_sale(&SaleTerms {
        id,
        sku: "BENCH".into(),
        title: "bench".into(),
        price_cents: 100,
        stock_total: 1_000_000_000_000,
        token: TOKEN.into(),
        per_user_limit: 1,
        payment_window_ms: 600_000,
        start_ms: now - 60_000,
        end_ms: now + 3_600_000,
        paused: false,
    })
    .await?;
    Ok(id)
}

/// One row of a results table: p50, p99, max and round trips per call.
fn row(what: &str, samples: &[Duration], trips: f64) {
    let (p50, p99, max) = pct(samples);
    println!("| {what} | {p50:.3} | {p99:.3} | {max:.3} | {trips:.2} |");
}

/// `concurrency` reserve calls at once on one multiplexed connection:
/// time until all answered, and the errors.
/// Who makes the calls of a burst.
#[derive(Clone, Copy)]
enum Caller<'a> {
    /// The reserve script, sent as `Via` says.
    Direct(Via<'a>),
    /// `Engine::reserve` (its combiner sends them as it sees fit).
    Engine(&'a Engine, SaleId),
}

/// `n` reserve calls at once on one multiplexed connection: time until
/// all answered, and the errors.
async fn burst(
    r: &Reserver,
    c: &MultiplexedConnection,
    caller: Caller<'_>,
    n: usize,
) -> (Duration, Vec<String>) {
    let t = Instant::now();
    let calls = (0..n)
        .map(|_| {
            let mut c = c.clone();
            async move {
                match caller {
                    Caller::Direct(via) => r.reserve(&mut c, via, 1).await,
                    Caller::Engine(e, sale) => {
                        let user = UserId::new(r.next_user())?;
                        match e.reserve(sale, user, Qty::default(), None).await? {
                            Reservation::Created(_) => Ok(()),
                            _ => anyhow::bail!("the engine made no order"),
                        }
                    }
                }
            }
        })
        .collect();
    let results = join_every(calls).await;
    let took = t.elapsed();
    let errors = results
        .into_iter()
        .filter_map(|r| r.err().map(|e| format!("{e:#}")))
        .collect();
    (took, errors)
}

/// Polls every future of `futures` each time it is woken, so that all of
/// them send their first command before any reply is looked at
/// (`futures::future::join_all` yields after 32 polls).
async fn join_every<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut all: Vec<_> = futures
        .into_iter()
        .map(|f| Box::pin(futures::future::maybe_done(f)))
        .collect();
    std::future::poll_fn(|cx| {
        let mut done = true;
        for f in &mut all {
            done &= f.as_mut().poll(cx).is_ready();
        }
        if done {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    all.iter_mut()
        .filter_map(|f| f.as_mut().take_output())
        .collect()
}

/// Calls per second of `tasks` tasks calling in a loop for `secs`.
async fn throughput(
    r: &Reserver,
    c: &MultiplexedConnection,
    via: Via<'_>,
    tasks: usize,
    batch: usize,
    secs: u64,
) -> anyhow::Result<f64> {
    let until = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let workers = (0..tasks).map(|_| {
        let mut c = c.clone();
        async move {
            let mut n = 0u64;
            while Instant::now() < until {
                r.reserve(&mut c, via, batch).await?;
                n += 1;
            }
            anyhow::Ok(n)
        }
    });
    let mut total = 0;
    for n in futures::future::join_all(workers).await {
        total += n?;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

async fn script_exists(c: &mut MultiplexedConnection, sha: &str) -> anyhow::Result<bool> {
    let e: Vec<i64> = redis::cmd("SCRIPT")
        .arg("EXISTS")
        .arg(sha)
        .query_async(c)
        .await?;
    Ok(e.first() == Some(&1))
}

async fn has_library(c: &mut MultiplexedConnection, name: &str) -> anyhow::Result<bool> {
    let list: redis::Value = redis::cmd("FUNCTION")
        .arg("LIST")
        .arg("LIBRARYNAME")
        .arg(name)
        .query_async(c)
        .await?;
    // LIBRARYNAME is a pattern: the exact name must be among the names.
    Ok(flatten(list).iter().any(|s| s == name))
}

/// Every string and number of a reply, depth first.
fn flatten(v: redis::Value) -> Vec<String> {
    use redis::Value as V;
    match v {
        V::Array(items) | V::Set(items) => items.into_iter().flat_map(flatten).collect(),
        V::Map(pairs) => pairs
            .into_iter()
            .flat_map(|(k, v)| flatten(k).into_iter().chain(flatten(v)))
            .collect(),
        V::BulkString(b) => vec![String::from_utf8_lossy(&b).into_owned()],
        V::SimpleString(s) => vec![s],
        V::Int(n) => vec![n.to_string()],
        _ => vec![],
    }
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

async fn wait_link_up(c: &mut MultiplexedConnection) -> anyhow::Result<()> {
    for _ in 0..200 {
        let info: String = redis::cmd("INFO").arg("replication").query_async(c).await?;
        if info.contains("master_link_status:up") && !info.contains("master_sync_in_progress:1") {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("the replica's link to its primary did not come up")
}

/// Waits until the primary's replicas acknowledged everything so far.
async fn wait_replicated(c: &mut MultiplexedConnection) -> anyhow::Result<()> {
    let acked: i64 = redis::cmd("WAIT").arg(1).arg(5000).query_async(c).await?;
    anyhow::ensure!(acked >= 1, "no replica acknowledged the writes");
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.rounds > 0 && args.bursts > 0 && args.concurrency > 0 && args.runs > 0);
    let prefix = format!("fsbench_noscript_{}", std::process::id());
    let e = engine(&args.redis_url, &prefix)?;
    e.load_scripts().await?;
    let client = redis::Client::open(args.redis_url.as_str())?;
    let mut c = client.get_multiplexed_async_connection().await?;
    let version: String = {
        let info: String = redis::cmd("INFO").arg("server").query_async(&mut c).await?;
        info.lines()
            .find_map(|l| l.strip_prefix("redis_version:"))
            .unwrap_or("?")
            .trim()
            .to_owned()
    };

    let reserve_text = script_text(SCRIPTS[0].1, SCRIPTS[0].2);
    let script = Script::new(&reserve_text);
    let (lib, lib_name, func) = versioned(&[("reserve", reserve_text.clone())], "reserve");
    let fcall_load = Via::FcallOrLoad {
        name: &func,
        library: &lib,
    };
    load_library(&mut c, &lib, true).await?;

    println!(
        "NOSCRIPT against Redis Functions: reserve.lua (prelude + script, {} bytes), Redis {version} at {}, {} cores",
        reserve_text.len(),
        args.redis_url,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "library `{lib_name}`, function `{func}` ({} bytes); one reservation per call unless said",
        lib.len()
    );

    // 1. The first call after the cache is lost, one caller.
    let mut next_sale = 1;
    let sale = load_sale(&e, next_sale).await?;
    next_sale += 1;
    let r = Reserver::new(e.keys().sale(sale), 1);
    // The engine's calls go to a sale of their own: its orders would move
    // the due-queue buckets of `sale` under `r`'s feet.
    let e_sale = load_sale(&e, next_sale).await?;
    next_sale += 1;
    let (mut warm, mut cold, mut e_warm, mut e_cold, mut f_warm, mut f_cold) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let (mut warm_trips, mut cold_trips, mut f_warm_trips, mut f_cold_trips) = (0, 0, 0, 0);
    let (mut e_warm_trips, mut e_cold_trips) = (0, 0);
    let mut engine_failed = 0;
    for _ in 0..args.rounds {
        flush_scripts(&mut c).await?;
        let before = cmdstats(&mut c).await?;
        cold.push(timed(r.reserve(&mut c, Via::Script(&script), 1)).await?);
        let mid = cmdstats(&mut c).await?;
        warm.push(timed(r.reserve(&mut c, Via::Script(&script), 1)).await?);
        let after = cmdstats(&mut c).await?;
        cold_trips += round_trips(&Counted(before, mid.clone()));
        warm_trips += round_trips(&Counted(mid, after));

        // The same through the whole engine (its combiner and connection).
        for cache_lost in [true, false] {
            if cache_lost {
                flush_scripts(&mut c).await?;
            }
            let user = UserId::new(r.next_user())?;
            let before = cmdstats(&mut c).await?;
            let t = Instant::now();
            let res = e.reserve(e_sale, user, Qty::default(), None).await;
            let took = t.elapsed();
            let trips = round_trips(&Counted(before, cmdstats(&mut c).await?));
            if !matches!(res, Ok(Reservation::Created(_))) {
                engine_failed += 1;
            }
            if cache_lost {
                e_cold.push(took);
                e_cold_trips += trips;
            } else {
                e_warm.push(took);
                e_warm_trips += trips;
            }
        }

        flush_functions(&mut c).await?;
        let before = cmdstats(&mut c).await?;
        f_cold.push(timed(r.reserve(&mut c, fcall_load, 1)).await?);
        let mid = cmdstats(&mut c).await?;
        f_warm.push(timed(r.reserve(&mut c, fcall_load, 1)).await?);
        let after = cmdstats(&mut c).await?;
        f_cold_trips += round_trips(&Counted(before, mid.clone()));
        f_warm_trips += round_trips(&Counted(mid, after));
    }
    let n = args.rounds as f64;
    println!();
    println!(
        "## 1. First reserve call after the cache is lost, one caller ({} rounds: flush, first call, next call)",
        args.rounds
    );
    println!();
    println!("| call | p50 ms | p99 ms | max ms | round trips |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    row(
        "warm EVALSHA (redis-rs `Script`)",
        &warm,
        warm_trips as f64 / n,
    );
    row(
        "first EVALSHA after SCRIPT FLUSH (NOSCRIPT, SCRIPT LOAD, EVALSHA)",
        &cold,
        cold_trips as f64 / n,
    );
    let ((w50, w99, _), (c50, c99, _)) = (pct(&warm), pct(&cold));
    println!(
        "| extra cost of the first call | +{:.3} | +{:.3} | | +{:.2} |",
        c50 - w50,
        c99 - w99,
        (cold_trips as f64 - warm_trips as f64) / n
    );
    row(
        "warm `Engine::reserve` (combiner, engine connection)",
        &e_warm,
        e_warm_trips as f64 / n,
    );
    row(
        "first `Engine::reserve` after SCRIPT FLUSH",
        &e_cold,
        e_cold_trips as f64 / n,
    );
    row("warm FCALL", &f_warm, f_warm_trips as f64 / n);
    row(
        "first FCALL after FUNCTION FLUSH, with a FUNCTION LOAD fallback written by hand",
        &f_cold,
        f_cold_trips as f64 / n,
    );
    if engine_failed > 0 {
        println!("(engine reserve calls that did not make an order: {engine_failed})");
    }

    // 1b. Many callers hitting the empty cache at once.
    println!();
    println!(
        "## 1b. {} callers at once on one multiplexed connection ({} bursts per case)",
        args.concurrency, args.bursts
    );
    println!();
    println!("| case | all answered p50 ms | p99 ms | max ms | failed calls | loads per burst | EVALSHA/FCALL per burst | Redis busy per burst ms |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let by_engine = Caller::Engine(&e, e_sale);
    for (what, caller, flush) in [
        ("warm EVALSHA", Caller::Direct(Via::Script(&script)), 0),
        (
            "EVALSHA right after SCRIPT FLUSH",
            Caller::Direct(Via::Script(&script)),
            1,
        ),
        ("warm `Engine::reserve`", by_engine, 0),
        ("`Engine::reserve` right after SCRIPT FLUSH", by_engine, 1),
        ("warm FCALL", Caller::Direct(fcall_load), 0),
        (
            "FCALL right after FUNCTION FLUSH, FUNCTION LOAD fallback",
            Caller::Direct(fcall_load),
            2,
        ),
    ] {
        let mut took = vec![];
        let mut errors: Vec<String> = vec![];
        let (mut loads, mut calls, mut busy) = (0, 0, 0);
        for _ in 0..args.bursts {
            match flush {
                1 => flush_scripts(&mut c).await?,
                2 => flush_functions(&mut c).await?,
                _ => {}
            }
            let before = cmdstats(&mut c).await?;
            let (t, errs) = burst(&r, &c, caller, args.concurrency).await;
            let counted = Counted(before, cmdstats(&mut c).await?);
            loads += counted.calls("script|load") + counted.calls("function|load");
            calls += counted.calls("evalsha") + counted.calls("fcall");
            busy += CALL_COMMANDS.iter().map(|c| counted.usec(c)).sum::<u64>();
            took.push(t);
            errors.extend(errs);
        }
        let (p50, p99, max) = pct(&took);
        let b = args.bursts as f64;
        println!(
            "| {what} | {p50:.3} | {p99:.3} | {max:.3} | {} | {:.1} | {:.1} | {:.2} |",
            errors.len(),
            loads as f64 / b,
            calls as f64 / b,
            busy as f64 / b / 1000.0
        );
        if let Some(first) = errors.first() {
            println!("(first error: {first})");
        }
    }

    // 2. Warm FCALL against warm EVALSHA.
    script.load_async(&mut c).await?;
    load_library(&mut c, &lib, false).await?;
    let samples = args.rounds * 10;
    let (mut sha_lat, mut fn_lat) = (vec![], vec![]);
    let before = cmdstats(&mut c).await?;
    for i in 0..samples {
        // Alternate which goes first.
        for first in [i % 2 == 0, i % 2 != 0] {
            if first {
                sha_lat.push(timed(r.reserve(&mut c, Via::Script(&script), 1)).await?);
            } else {
                fn_lat.push(timed(r.reserve(&mut c, Via::Fcall(&func), 1)).await?);
            }
        }
    }
    let counted = Counted(before, cmdstats(&mut c).await?);
    let usec_per = |cmd: &str| counted.usec(cmd) as f64 / counted.calls(cmd).max(1) as f64;
    let ((s50, s99, _), (f50, f99, _)) = (pct(&sha_lat), pct(&fn_lat));
    println!();
    println!(
        "## 2. Warm FCALL against warm EVALSHA (same reserve, same sale; latency: {samples} calls each, interleaved, one caller)"
    );
    println!();
    println!("| measure | EVALSHA | FCALL | FCALL / EVALSHA |");
    println!("| --- | ---: | ---: | ---: |");
    println!(
        "| latency p50 ms | {s50:.3} | {f50:.3} | {:.2} |",
        f50 / s50
    );
    println!(
        "| latency p99 ms | {s99:.3} | {f99:.3} | {:.2} |",
        f99 / s99
    );
    let (su, fu) = (usec_per("evalsha"), usec_per("fcall"));
    println!(
        "| Redis time per call (INFO commandstats) us | {su:.1} | {fu:.1} | {:.2} |",
        fu / su
    );
    // The engine's shape under a flood of one sale: one reservation per
    // call from many callers, or its combiner's 2 calls in flight of 32.
    for (tasks, batch) in [(args.concurrency, 1), (2, 32)] {
        let mut rates: [Vec<f64>; 2] = [vec![], vec![]];
        for run in 0..args.runs {
            // Alternate which goes first.
            let mut order = [(0, Via::Script(&script)), (1, Via::Fcall(&func))];
            if run % 2 == 1 {
                order.reverse();
            }
            for (i, via) in order {
                let sale = load_sale(&e, next_sale).await?;
                next_sale += 1;
                let tr = Reserver::new(e.keys().sale(sale), 1);
                rates[i]
                    .push(throughput(&tr, &c, via, tasks, batch, args.secs).await? * batch as f64);
                e.drop_sale_keys(sale).await?;
            }
        }
        // Median (min-max) of the runs.
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (s_med, f_med) = (median(&mut rates[0]), median(&mut rates[1]));
        let spread = |v: &[f64], m: f64| format!("{m:.0} ({:.0}-{:.0})", v[0], v[v.len() - 1]);
        println!(
            "| reservations/s, {tasks} tasks, {batch} per call: median (min-max) of {} runs of {} s | {} | {} | {:.2} |",
            args.runs,
            args.secs,
            spread(&rates[0], s_med),
            spread(&rates[1], f_med),
            f_med / s_med
        );
    }
    let rebucketed = REBUCKETED.load(Ordering::Relaxed);
    if rebucketed > 0 {
        println!("(calls sent again for an undeclared due-queue bucket: {rebucketed})");
    }

    // 3. The cost of deploying functions.
    let mut lib_load = vec![];
    let mut sha_load = vec![];
    for _ in 0..20 {
        lib_load.push(timed(async { Ok(load_library(&mut c, &lib, true).await?) }).await?);
        flush_scripts(&mut c).await?;
        sha_load.push(timed(async { Ok(script.load_async(&mut c).await.map(|_| ())?) }).await?);
    }
    let all: Vec<(&str, String)> = SCRIPTS
        .iter()
        .map(|(n, src, p)| (*n, script_text(src, *p)))
        .collect();
    let (all_lib, all_name, _) = versioned(&all, "reserve");
    let (mut all_load, mut all_scripts) = (vec![], vec![]);
    for _ in 0..20 {
        all_load.push(timed(async { Ok(load_library(&mut c, &all_lib, true).await?) }).await?);
        flush_scripts(&mut c).await?;
        all_scripts.push(timed(async { Ok(e.load_scripts().await?) }).await?);
    }
    let fn_count = {
        let stats: redis::Value = redis::cmd("FUNCTION")
            .arg("STATS")
            .query_async(&mut c)
            .await?;
        let f = flatten(stats);
        f.iter()
            .position(|s| s == "functions_count")
            .and_then(|i| f.get(i + 1).cloned())
            .unwrap_or_default()
    };
    let _: String = redis::cmd("FUNCTION")
        .arg("DELETE")
        .arg(&all_name)
        .query_async(&mut c)
        .await?;
    println!();
    println!("## 3. Deploying (20 loads each)");
    println!();
    println!("| load | p50 ms | p99 ms | max ms | round trips |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    row(
        &format!(
            "FUNCTION LOAD REPLACE, reserve library ({} bytes)",
            lib.len()
        ),
        &lib_load,
        1.0,
    );
    row("SCRIPT LOAD reserve (empty cache)", &sha_load, 1.0);
    row(
        &format!(
            "FUNCTION LOAD REPLACE, all 20 scripts as one library ({} bytes; {} functions on the server with it)",
            all_lib.len(),
            fn_count
        ),
        &all_load,
        1.0,
    );
    row(
        "`Engine::load_scripts` (20 SCRIPT LOADs, empty cache)",
        &all_scripts,
        20.0,
    );

    // Two builds during a rolling deploy.
    println!();
    println!("Two builds on one Redis during a rolling deploy:");
    let demo = |v: &str| {
        library(
            "fsdemo",
            &[("fsdemo_version".to_owned(), format!("return '{v}'"))],
        )
    };
    let _ = redis::cmd("FUNCTION")
        .arg("DELETE")
        .arg("fsdemo")
        .query_async::<String>(&mut c)
        .await;
    let answer = |r: redis::RedisResult<String>| match r {
        Ok(v) => v,
        Err(e) => format!("error: {e}"),
    };
    redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg(demo("v1"))
        .query_async::<String>(&mut c)
        .await?;
    let again = redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg(demo("v2"))
        .query_async::<String>(&mut c)
        .await;
    println!(
        "- v2 loads library `fsdemo` (loaded by v1) without REPLACE: {}",
        answer(again)
    );
    redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg("REPLACE")
        .arg(demo("v2"))
        .query_async::<String>(&mut c)
        .await?;
    let v: String = redis::cmd("FCALL")
        .arg("fsdemo_version")
        .arg(0)
        .query_async(&mut c)
        .await?;
    println!(
        "- v2 loads it with REPLACE: a v1 process's FCALL fsdemo_version now answers {v:?} (v2's code)"
    );
    let other = redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg(library(
            "fsdemo_v3",
            &[("fsdemo_version".to_owned(), "return 'v3'".to_owned())],
        ))
        .query_async::<String>(&mut c)
        .await;
    println!(
        "- v3 loads a library of another name with the same function name: {}",
        answer(other)
    );
    let _: String = redis::cmd("FUNCTION")
        .arg("DELETE")
        .arg("fsdemo")
        .query_async(&mut c)
        .await?;
    let changed = format!("{reserve_text}\n-- the next build\n");
    let (lib2, name2, func2) = versioned(&[("reserve", changed)], "reserve");
    load_library(&mut c, &lib2, false).await?;
    let both = r.reserve(&mut c, Via::Fcall(&func), 1).await.is_ok()
        && r.reserve(&mut c, Via::Fcall(&func2), 1).await.is_ok();
    println!(
        "- hash-named libraries `{lib_name}` and `{name2}` side by side, each build calling its own: both answer: {}",
        yes(both)
    );
    let _: String = redis::cmd("FUNCTION")
        .arg("DELETE")
        .arg(&name2)
        .query_async(&mut c)
        .await?;
    flush_functions(&mut c).await?;
    let missing = fcall(&mut c, &func, &["k".to_owned()], &[]).await;
    println!(
        "- after FUNCTION FLUSH (or on an empty new node) FCALL answers: {}",
        match missing {
            Ok(_) => "a reply".to_owned(),
            Err(e) => format!("error: {e}"),
        }
    );

    // 4. A replica, promoted.
    if let Some(replica_url) = &args.replica_url {
        let rc = redis::Client::open(replica_url.as_str())?;
        let mut rc = rc.get_multiplexed_async_connection().await?;
        wait_link_up(&mut rc).await?;
        flush_scripts(&mut c).await?;
        e.load_scripts().await?;
        load_library(&mut c, &lib, true).await?;
        r.reserve(&mut c, Via::Script(&script), 1).await?;
        r.reserve(&mut c, Via::Fcall(&func), 1).await?;
        wait_replicated(&mut c).await?;
        let sha = script.get_hash();
        println!();
        println!(
            "## 4. Replica ({replica_url}): after SCRIPT LOAD of every script, FUNCTION LOAD, an EVALSHA and an FCALL on the primary, then REPLICAOF NO ONE"
        );
        println!();
        println!("| check | before | after |");
        println!("| --- | --- | --- |");
        let lib_before = has_library(&mut rc, &lib_name).await?;
        let sha_before = script_exists(&mut rc, sha).await?;
        let () = redis::cmd("REPLICAOF")
            .arg("NO")
            .arg("ONE")
            .query_async(&mut rc)
            .await?;
        let lib_after = has_library(&mut rc, &lib_name).await?;
        let sha_after = script_exists(&mut rc, sha).await?;
        println!(
            "| replica, before and after REPLICAOF NO ONE: has the function library | {} | {} |",
            yes(lib_before),
            yes(lib_after)
        );
        println!(
            "| same: has reserve.lua in its script cache (SCRIPT EXISTS) | {} | {} |",
            yes(sha_before),
            yes(sha_after)
        );
        let before = cmdstats(&mut rc).await?;
        let first_fcall = timed(r.reserve(&mut rc, Via::Fcall(&func), 1)).await?;
        let mid = cmdstats(&mut rc).await?;
        let first_sha = timed(r.reserve(&mut rc, Via::Script(&script), 1)).await?;
        let after = cmdstats(&mut rc).await?;
        let second_sha = timed(r.reserve(&mut rc, Via::Script(&script), 1)).await?;
        println!(
            "| first FCALL on the promoted replica | | {:.3} ms, {} round trip(s) |",
            ms(first_fcall),
            round_trips(&Counted(before, mid.clone()))
        );
        println!(
            "| first EVALSHA on the promoted replica (then warm: {:.3} ms) | | {:.3} ms, {} round trips |",
            ms(second_sha),
            ms(first_sha),
            round_trips(&Counted(mid, after))
        );

        // The old primary rejoins as a replica of the promoted one, with
        // its own functions gone: does the sync bring them back, and does
        // it keep its script cache?
        flush_functions(&mut c).await?;
        script.load_async(&mut c).await?;
        let lib_flushed = has_library(&mut c, &lib_name).await?;
        let sha_loaded = script_exists(&mut c, sha).await?;
        let full_syncs = |info: String| -> u64 {
            info.lines()
                .find_map(|l| l.strip_prefix("sync_full:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        let syncs_before = full_syncs(redis::cmd("INFO").arg("stats").query_async(&mut rc).await?);
        let url = url::Url::parse(replica_url)?;
        let () = redis::cmd("REPLICAOF")
            .arg(url.host_str().context("replica host")?)
            .arg(url.port().context("replica port")?)
            .query_async(&mut c)
            .await?;
        wait_link_up(&mut c).await?;
        let full =
            full_syncs(redis::cmd("INFO").arg("stats").query_async(&mut rc).await?) > syncs_before;
        println!(
            "| old primary, FUNCTION FLUSHed, rejoins as a replica of the promoted one ({}): has the library | {} | {} |",
            if full { "full sync" } else { "partial sync" },
            yes(lib_flushed),
            yes(has_library(&mut c, &lib_name).await?)
        );
        println!(
            "| same, before and after rejoining: has reserve.lua (SCRIPT LOADed just before) in its script cache | {} | {} |",
            yes(sha_loaded),
            yes(script_exists(&mut c, sha).await?)
        );
    }

    e.drop_sale_keys(sale).await.ok();
    Ok(())
}
