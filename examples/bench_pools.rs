//! The reserve path over three ways of holding Redis connections, in one
//! run: redis-rs's multiplexed `ConnectionManager` (one connection, requests
//! pipelined), a deadpool-redis pool and a bb8 pool (a connection per
//! request in flight). Each drives the project's reserve script at the same
//! concurrency on keys of a sale loaded for it; the counted effect is the
//! orders created. Run with `scripts/bench-pools.sh`.

use std::time::{Duration, Instant};

use clap::Parser;
use flashsale::domain::SaleId;
use flashsale::engine::{Engine, EngineOptions, SaleTerms, Topology};
use futures::stream::{self, StreamExt};
use redis::AsyncCommands;

/// The reserve script exactly as the engine sends it.
const RESERVE: &str = concat!(
    include_str!("../lua/prelude.lua"),
    "\n",
    include_str!("../lua/reserve.lua")
);

#[derive(Parser, Debug)]
struct Args {
    /// Redis to run against.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// Reservations per way.
    #[arg(long, default_value_t = 200_000)]
    requests: u64,
    /// Requests in flight (and pool size).
    #[arg(long, default_value_t = 50)]
    concurrency: usize,
}

async fn sale(e: &Engine, id: u64, stock: i64) -> anyhow::Result<SaleId> {
    let id = SaleId::new(id)?;
    let now = e.now_ms().await?;
    e.load_sale(&SaleTerms {
        id,
        sku: "POOL".into(),
        title: "pool benchmark".into(),
        price_cents: 100,
        stock_total: stock,
        per_user_limit: 1,
        payment_window_ms: 3_600_000,
        start_ms: now - 1000,
        end_ms: now + 3_600_000,
        token: "bench".into(),
        paused: false,
    })
    .await?;
    Ok(id)
}

fn invocation<'a>(
    script: &'a redis::Script,
    e: &Engine,
    sale: SaleId,
    user: u64,
) -> redis::ScriptInvocation<'a> {
    let k = e.keys().sale(sale);
    let mut inv = script.prepare_invoke();
    inv.key(&k.sale)
        .key(&k.buyers)
        .key(&k.orders)
        .key(&k.deadlines)
        .key(&k.flow)
        .key(&k.idem)
        .key(&k.calls)
        .arg(u64::MAX)
        // The call's id: one call per buyer here.
        .arg(format!("{user:x}"))
        // The highest order seq seen: none (no rollback check).
        .arg(0)
        // The sale's token (loaded as "bench" above).
        .arg("bench")
        .arg(user)
        .arg(1)
        .arg("");
    inv
}

async fn created(e: &Engine, sale: SaleId) -> anyhow::Result<u64> {
    // Orders are never deleted: the order counter counts those made.
    let mut c = e.connection();
    let made: Option<u64> = c.hget(e.keys().sale(sale).sale, "seq").await?;
    Ok(made.unwrap_or(0))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let prefix = format!("fsbench_pools_{}", std::process::id());
    let e = Engine::connect(&EngineOptions {
        timeout: Duration::from_secs(10),
        flow_backlog_limit: u64::MAX,
        sold_out_ttl: Duration::ZERO,
        ..EngineOptions::new(Topology::Node(args.redis_url.clone()), &prefix)
    })?;
    let script = redis::Script::new(RESERVE);
    let n = args.requests;
    let conc = args.concurrency;
    let mut results = Vec::new();

    // Multiplexed: one ConnectionManager shared by every task.
    let s1 = sale(&e, 1, n as i64).await?;
    let manager = e.connection();
    let started = Instant::now();
    stream::iter(1..=n)
        .for_each_concurrent(conc, |u| {
            let (mut c, script, e) = (manager.clone(), &script, &e);
            async move {
                let _: Vec<Vec<String>> = invocation(script, e, s1, u)
                    .invoke_async(&mut c)
                    .await
                    .unwrap();
            }
        })
        .await;
    results.push((
        "multiplexed ConnectionManager (1 connection)",
        created(&e, s1).await?,
        started.elapsed(),
    ));

    // deadpool-redis.
    let s2 = sale(&e, 2, n as i64).await?;
    let mut cfg = deadpool_redis::Config::from_url(&args.redis_url);
    cfg.pool = Some(deadpool_redis::PoolConfig::new(conc));
    let pool = cfg.create_pool(Some(deadpool_redis::Runtime::Tokio1))?;
    let started = Instant::now();
    stream::iter(1..=n)
        .for_each_concurrent(conc, |u| {
            let (pool, script, e) = (&pool, &script, &e);
            async move {
                let mut c = pool.get().await.unwrap();
                let _: Vec<Vec<String>> = invocation(script, e, s2, u)
                    .invoke_async(&mut *c)
                    .await
                    .unwrap();
            }
        })
        .await;
    results.push((
        "deadpool-redis pool",
        created(&e, s2).await?,
        started.elapsed(),
    ));

    // bb8.
    let s3 = sale(&e, 3, n as i64).await?;
    let manager = bb8_redis::RedisConnectionManager::new(args.redis_url.as_str())?;
    let pool = bb8_redis::bb8::Pool::builder()
        .max_size(conc as u32)
        .build(manager)
        .await?;
    let started = Instant::now();
    stream::iter(1..=n)
        .for_each_concurrent(conc, |u| {
            let (pool, script, e) = (&pool, &script, &e);
            async move {
                let mut c = pool.get().await.unwrap();
                let _: Vec<Vec<String>> = invocation(script, e, s3, u)
                    .invoke_async(&mut *c)
                    .await
                    .unwrap();
            }
        })
        .await;
    results.push(("bb8 pool", created(&e, s3).await?, started.elapsed()));

    let reference = results[0].1 as f64 / results[0].2.as_secs_f64();
    println!("reserve script, {n} reservations per way, {conc} in flight (pools of {conc})");
    println!();
    println!("| connection handling | reservations/s | ratio to multiplexed |");
    println!("| --- | ---: | ---: |");
    for (name, made, took) in &results {
        anyhow::ensure!(*made == n, "{name}: {made} of {n} orders made");
        let rate = *made as f64 / took.as_secs_f64();
        println!("| {name} | {rate:.0} | {:.2} |", rate / reference);
    }
    let mut c = e.connection();
    let keys: Vec<String> = c.keys(format!("{prefix}:*")).await?;
    let _: () = c.del(keys).await?;
    Ok(())
}
