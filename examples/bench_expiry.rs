//! Expiry benchmark: drain rate of due orders and lateness under a steady
//! stream of expiries, beside the raw rate of the same Lua claim script
//! driven by a bare client (the reference), all in one run.
//!
//! Run it with `scripts/bench-expiry.sh` (release build, local Redis). It
//! writes to its own key prefix on the Redis at `REDIS_URL` and deletes its
//! keys afterwards.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use flashsale::db::retired::LiveSale;
use flashsale::domain::{Qty, SaleId, UserId};
use flashsale::engine::keys::DUE_BUCKET;
use flashsale::engine::{Engine, EngineOptions, Order, SaleTerms, Topology};
use flashsale::telemetry::Metrics;
use flashsale::workers::expiry::{ExpiryOptions, ExpiryWorker, Wakeup};
use flashsale::workers::live::LiveSales;
use redis::AsyncCommands;
use tokio_util::sync::CancellationToken;

/// The claim script exactly as the engine sends it (prelude + expire.lua).
const CLAIM_SCRIPT: &str = concat!(
    include_str!("../lua/prelude.lua"),
    "\n",
    include_str!("../lua/expire.lua")
);

#[derive(Parser, Debug)]
struct Args {
    /// Redis to run against.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// Due orders per drain measurement.
    #[arg(long, default_value_t = 1_000_000)]
    orders: u64,
    /// Claim batch sizes to measure.
    #[arg(long, value_delimiter = ',', default_value = "128,512")]
    batches: Vec<usize>,
    /// Expiry worker counts to drain with (each beside the bare script):
    /// 1, 2 or both.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    workers: Vec<usize>,
    /// Steady expiry stream: orders per second.
    #[arg(long, default_value_t = 2000)]
    stream_rate: u64,
    /// Steady expiry stream: seconds.
    #[arg(long, default_value_t = 10)]
    stream_secs: u64,
    /// The burst (every order due at one moment, one worker running): how
    /// long after the loading starts they fall due. Loading must be done
    /// by then (the run says when it was not). Default: 1.5 times the
    /// longest load of as many orders in the drains above, plus a second
    /// (without drains: 80 us an order, a slow host of this kind loading
    /// at ~40 us, at least 4 s).
    #[arg(long)]
    due_in_ms: Option<i64>,
    /// The burst's claim size (default: the worker's, FLASHSALE_EXPIRY_BATCH).
    #[arg(long, default_value_t = ExpiryOptions::default().batch)]
    burst_batch: usize,
    /// Only load `--orders` pending orders into this existing sale (made by
    /// `flashsale sale create`, `FLASHSALE_KEY_PREFIX`'s keys), all due
    /// `--due-in-ms` from now, for a running server's expiry role to close;
    /// prints `due_ms=<when>`.
    #[arg(long)]
    load_due: Option<u64>,
    /// Only read how late this sale's orders were closed (closed time minus
    /// deadline, Redis's clock) and print it as `closed=.. late_p50_ms=..
    /// late_p99_ms=.. late_max_ms=.. drain_per_sec=..` (the drain: closed
    /// orders over the time from the first deadline to the last close).
    #[arg(long)]
    lateness_of: Option<u64>,
    /// Key prefix for `--load-due` and `--lateness-of`.
    #[arg(long, env = "FLASHSALE_KEY_PREFIX", default_value = "flashsale")]
    prefix: String,
}

fn engine(url: &str, prefix: &str) -> anyhow::Result<Engine> {
    Engine::connect(&EngineOptions {
        timeout: Duration::from_secs(10),
        flow_backlog_limit: u64::MAX,
        sold_out_ttl: Duration::ZERO,
        ..EngineOptions::new(Topology::Node(url.to_owned()), prefix)
    })
}

/// How long before the benchmark's clock its sales started.
const SALE_AGE_MS: i64 = 3_600_000;

async fn load_sale(e: &Engine, id: u64, stock: i64, window_ms: i64) -> anyhow::Result<SaleId> {
    let id = SaleId::new(id)?;
    let now = e.now_ms().await?;
    e.load_sale(&SaleTerms {
        id,
        sku: "BENCH".into(),
        title: "bench".into(),
        price_cents: 100,
        stock_total: stock,
        token: "bench".into(),
        per_user_limit: 1,
        payment_window_ms: window_ms,
        start_ms: now - SALE_AGE_MS,
        end_ms: now + 3_600_000,
        paused: false,
    })
    .await?;
    Ok(id)
}

/// Writes `n` pending orders as the reserve script would have left them
/// (counters, buyers, orders, due-queue). `due: None` makes them overdue,
/// created 61 s ago give or take 1 s; `due: Some(ms)` makes every one fall
/// due at that moment (Redis's clock), as a burst of reservations one
/// payment window earlier would. The sale's start and window come from its
/// hash, so a sale made by `flashsale sale create` can be loaded too.
async fn load_due_orders(e: &Engine, sale: SaleId, n: u64, due: Option<i64>) -> anyhow::Result<()> {
    let k = e.keys().sale(sale);
    let mut c = e.connection();
    let now = e.now_ms().await?;
    let (start, window, stock): (i64, i64, i64) = redis::pipe()
        .hget(&k.sale, "start_ms")
        .hget(&k.sale, "window_ms")
        .hget(&k.sale, "avail")
        .query_async(&mut c)
        .await?;
    anyhow::ensure!(
        stock >= n as i64,
        "sale {sale} has {stock} units left, not {n}"
    );
    let chunk = 10_000;
    // Each due-queue bucket is indexed by its earliest deadline.
    let mut heads = std::collections::BTreeMap::<u64, i64>::new();
    for first in (1..=n).step_by(chunk) {
        let mut p = redis::pipe();
        for seq in first..(first + chunk as u64).min(n + 1) {
            let deadline = match due {
                Some(at) => at,
                None => now - 60_000 + (seq % 1000) as i64,
            };
            let created = deadline - window;
            anyhow::ensure!(
                created >= start,
                "orders would be made before the sale started"
            );
            // The orders bucket's stored form (see store_order in
            // lua/prelude.lua): status letter + user, qty, times since the
            // sale's start.
            p.hset(
                k.orders_bucket(seq),
                seq,
                format!("p{seq}|1|{}|||||", created - start),
            )
            .ignore();
            p.hset(&k.buyers, seq, 1).ignore();
            p.zadd(k.due_bucket(seq), seq, deadline).ignore();
            let head = heads.entry(seq / DUE_BUCKET).or_insert(deadline);
            *head = (*head).min(deadline);
        }
        p.query_async::<()>(&mut c).await?;
    }
    for (bucket, head) in heads {
        let _: () = c.zadd(&k.deadlines, bucket, head).await?;
    }
    let _: () = redis::pipe()
        .hset(&k.sale, "avail", stock - n as i64)
        .hset(&k.sale, "pending", n)
        .hset(&k.sale, "seq", n)
        .query_async(&mut c)
        .await?;
    Ok(())
}

async fn drop_sale(e: &Engine, sale: SaleId) -> anyhow::Result<()> {
    e.drop_sale_keys(sale).await?;
    Ok(())
}

/// The reference: the claim script in a tight loop on one plain connection.
async fn raw_drain(
    e: &Engine,
    url: &str,
    sale: SaleId,
    batch: usize,
) -> anyhow::Result<(u64, f64)> {
    let k = e.keys().sale(sale);
    let client = redis::Client::open(url)?;
    let mut c = client.get_multiplexed_async_connection().await?;
    let script = redis::Script::new(CLAIM_SCRIPT);
    let started = Instant::now();
    let mut closed = 0u64;
    // The buckets to declare: the first of the index, then as each call
    // answers them (as the engine does).
    let mut buckets: Vec<u64> = c.zrange(&k.deadlines, 0, 15).await?;
    loop {
        let mut inv = script.key(&k.sale);
        inv.key(&k.buyers)
            .key(&k.orders)
            .key(&k.deadlines)
            .key(&k.flow)
            .key(&k.dead_refunds);
        for b in &buckets {
            for key in k.bucket_keys(*b) {
                inv.key(key);
            }
        }
        let reply: Vec<i64> = inv.arg(batch).invoke_async(&mut c).await?;
        closed += reply[1] as u64;
        let tail = 8 + reply[1] as usize + reply[5] as usize;
        buckets = reply[tail..].iter().map(|b| *b as u64).collect();
        if reply[0] == 0 && reply[2] == 0 {
            break;
        }
    }
    Ok((closed, started.elapsed().as_secs_f64()))
}

/// A live list of one sale (the benchmark has no MySQL to read it from).
fn only(sale: SaleId) -> Arc<LiveSales> {
    Arc::new(LiveSales::of(&[LiveSale {
        id: sale,
        end_ms: i64::MAX,
        token: 0,
    }]))
}

/// The product: expiry workers (their run loop) until the set is empty.
async fn worker_drain(
    e: &Engine,
    sale: SaleId,
    batch: usize,
    workers: usize,
) -> anyhow::Result<(u64, f64)> {
    let k = e.keys().sale(sale);
    let stop = CancellationToken::new();
    let started = Instant::now();
    let metrics = Arc::new(Metrics::default());
    let live = only(sale);
    let mut handles = Vec::new();
    for _ in 0..workers {
        let w = ExpiryWorker::new(
            e.clone(),
            live.clone(),
            metrics.clone(),
            Arc::new(Wakeup::default()),
            ExpiryOptions {
                batch,
                ..ExpiryOptions::default()
            },
        );
        handles.push(tokio::spawn(w.run(stop.clone())));
    }
    let mut c = e.connection();
    loop {
        let left: u64 = c.zcard(&k.deadlines).await?;
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    stop.cancel();
    for h in handles {
        h.await?;
    }
    let closed: u64 = c.hget(&k.sale, "closed").await?;
    Ok((closed, secs))
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Lateness under a steady stream: reserves at `rate`/s with a 1 s payment
/// window while one worker runs; lateness = close time - deadline.
async fn steady_stream(e: &Engine, sale: SaleId, rate: u64, secs: u64) -> anyhow::Result<Vec<i64>> {
    let stop = CancellationToken::new();
    let wakeup = Arc::new(Wakeup::default());
    let worker = ExpiryWorker::new(
        e.clone(),
        only(sale),
        Arc::new(Metrics::default()),
        wakeup.clone(),
        ExpiryOptions::default(),
    );
    let handle = tokio::spawn(worker.run(stop.clone()));
    let total = rate * secs;
    let tick = Duration::from_millis(10);
    let per_tick = (rate / 100).max(1);
    let mut interval = tokio::time::interval(tick);
    let mut user = 0u64;
    while user < total {
        interval.tick().await;
        let mut batch = Vec::new();
        for _ in 0..per_tick.min(total - user) {
            user += 1;
            let e = e.clone();
            let wakeup = wakeup.clone();
            batch.push(tokio::spawn(async move {
                let r = e
                    .reserve(sale, UserId::new(user).unwrap(), Qty::default(), None)
                    .await;
                if let Ok(flashsale::engine::Reservation::Created(o)) = r {
                    wakeup.deadline_added(o.deadline_ms);
                }
            }));
        }
        for b in batch {
            b.await?;
        }
    }
    until_none_pending(e, sale, Duration::from_millis(50)).await?;
    stop.cancel();
    handle.await?;
    Ok(Closings::of(e, sale).await?.late)
}

/// Waits until `sale` has no pending order left, looking every `poll`.
async fn until_none_pending(e: &Engine, sale: SaleId, poll: Duration) -> anyhow::Result<()> {
    let k = e.keys().sale(sale);
    let mut c = e.connection();
    loop {
        let pending: i64 = c.hget(&k.sale, "pending").await?;
        if pending == 0 {
            return Ok(());
        }
        tokio::time::sleep(poll).await;
    }
}

/// How late a sale's closed orders were closed.
struct Closings {
    /// Closed time minus deadline of each closed order, ms, sorted.
    late: Vec<i64>,
    /// Earliest deadline and latest close among them (Redis's clock).
    span: Option<(i64, i64)>,
}

impl Closings {
    async fn of(e: &Engine, sale: SaleId) -> anyhow::Result<Self> {
        let mut c = e.connection();
        let k = e.keys().sale(sale);
        let counter: Option<u64> = c.hget(&k.sale, "seq").await?;
        let mut seqs: Vec<u64> = Vec::new();
        for b in flashsale::engine::keys::order_buckets(counter.unwrap_or(0)) {
            let held: Vec<u64> = c.hkeys(k.orders_bucket_no(b)).await?;
            seqs.extend(held);
        }
        let packed = e.packed_orders(sale, &seqs).await?;
        let closed: Vec<(i64, i64)> = seqs
            .into_iter()
            .zip(packed)
            .filter_map(|(seq, p)| Order::unpack(flashsale::domain::OrderId::new(sale, seq), &p?))
            .filter_map(|o| o.closed_ms.map(|c| (o.deadline_ms, c)))
            .collect();
        let mut late: Vec<i64> = closed.iter().map(|(d, c)| c - d).collect();
        late.sort_unstable();
        let span = closed
            .iter()
            .map(|&(d, _)| d)
            .min()
            .zip(closed.iter().map(|&(_, c)| c).max());
        Ok(Self { late, span })
    }

    /// Closed orders per second from the first deadline to the last close.
    fn drain_per_sec(&self) -> f64 {
        match self.span {
            Some((first_due, last_close)) => {
                self.late.len() as f64 / ((last_close - first_due).max(1) as f64 / 1000.0)
            }
            None => 0.0,
        }
    }

    fn summary(&self) -> String {
        format!(
            "closed={} late_p50_ms={} late_p99_ms={} late_max_ms={} drain_per_sec={:.0}",
            self.late.len(),
            percentile(&self.late, 0.50),
            percentile(&self.late, 0.99),
            self.late.last().copied().unwrap_or(0),
            self.drain_per_sec()
        )
    }
}

/// `load_due_orders` (already due), keeping the longest load's ms in `longest`.
async fn load_timed(
    e: &Engine,
    sale: SaleId,
    n: u64,
    longest: &mut Option<i64>,
) -> anyhow::Result<()> {
    let t = Instant::now();
    load_due_orders(e, sale, n, None).await?;
    let ms = t.elapsed().as_millis() as i64;
    *longest = Some(longest.map_or(ms, |m| m.max(ms)));
    Ok(())
}

/// The burst: `n` orders all due at one moment, one expiry worker (its run
/// loop) already running and waiting for them, as when a rush of buyers
/// reserved within the same instant one payment window ago and none paid.
/// The same shape as the BullMQ peer (loadtest/bullmq/drain.mjs): drain
/// rate from the due time to the last close, and each order's lateness.
async fn burst(
    e: &Engine,
    sale: SaleId,
    n: u64,
    due_in_ms: i64,
    batch: usize,
) -> anyhow::Result<Closings> {
    let due = e.now_ms().await? + due_in_ms;
    load_due_orders(e, sale, n, Some(due)).await?;
    let loaded = e.now_ms().await?;
    if loaded > due {
        eprintln!(
            "bench_expiry: loading took {} ms, past the due time: raise --due-in-ms",
            loaded - due + due_in_ms
        );
    }
    let stop = CancellationToken::new();
    let worker = ExpiryWorker::new(
        e.clone(),
        only(sale),
        Arc::new(Metrics::default()),
        Arc::new(Wakeup::default()),
        ExpiryOptions {
            batch,
            ..ExpiryOptions::default()
        },
    );
    let handle = tokio::spawn(worker.run(stop.clone()));
    until_none_pending(e, sale, Duration::from_millis(20)).await?;
    stop.cancel();
    handle.await?;
    let closings = Closings::of(e, sale).await?;
    anyhow::ensure!(
        closings.late.len() as u64 == n,
        "closed {} of {n}",
        closings.late.len()
    );
    Ok(closings)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.load_due.is_some() || args.lateness_of.is_some() {
        let e = engine(&args.redis_url, &args.prefix)?;
        e.load_scripts().await?;
        if let Some(id) = args.load_due {
            let due = e.now_ms().await? + args.due_in_ms.unwrap_or(4000);
            load_due_orders(&e, SaleId::new(id)?, args.orders, Some(due)).await?;
            let loaded = e.now_ms().await?;
            anyhow::ensure!(
                loaded <= due,
                "loading ended {} ms past the due time: raise --due-in-ms",
                loaded - due
            );
            println!("due_ms={due} loaded_ms={loaded}");
        }
        if let Some(id) = args.lateness_of {
            println!("{}", Closings::of(&e, SaleId::new(id)?).await?.summary());
        }
        return Ok(());
    }
    let prefix = format!("fsbench_{}", std::process::id());
    let e = engine(&args.redis_url, &prefix)?;
    e.load_scripts().await?;
    println!(
        "expiry benchmark: {} due orders per drain, Redis at {}",
        args.orders, args.redis_url
    );
    println!();
    println!("| batch | reference: bare client, claim script (orders/s) | expiry worker x1 (orders/s) | ratio | expiry workers x2 (orders/s) | ratio |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: |");
    let mut next_id = 1;
    // The longest load of `--orders` due orders: the burst's lead follows it.
    let mut load_ms: Option<i64> = None;
    anyhow::ensure!(
        args.workers.iter().all(|w| (1..=2).contains(w)),
        "--workers takes 1, 2 or 1,2"
    );
    for &batch in &args.batches {
        let rate = |closed: u64, secs: f64, expected: u64| -> anyhow::Result<f64> {
            anyhow::ensure!(closed == expected, "closed {closed} of {expected} orders");
            Ok(closed as f64 / secs)
        };
        let sale = load_sale(&e, next_id, args.orders as i64, 1000).await?;
        next_id += 1;
        load_timed(&e, sale, args.orders, &mut load_ms).await?;
        let (closed, secs) = raw_drain(&e, &args.redis_url, sale, batch).await?;
        let reference = rate(closed, secs, args.orders)?;
        drop_sale(&e, sale).await?;

        let mut cells = String::new();
        for workers in [1, 2] {
            if !args.workers.contains(&workers) {
                cells.push_str(" - | - |");
                continue;
            }
            let sale = load_sale(&e, next_id, args.orders as i64, 1000).await?;
            next_id += 1;
            load_timed(&e, sale, args.orders, &mut load_ms).await?;
            let (closed, secs) = worker_drain(&e, sale, batch, workers).await?;
            let r = rate(closed, secs, args.orders)?;
            cells.push_str(&format!(" {r:.0} | {:.2} |", r / reference));
            drop_sale(&e, sale).await?;
        }
        println!("| {batch} | {reference:.0} |{cells}");
    }

    let sale = load_sale(&e, next_id, args.orders as i64, 1000).await?;
    next_id += 1;
    let lead = args.due_in_ms.unwrap_or(match load_ms {
        Some(ms) => ms * 3 / 2 + 1000,
        None => (args.orders as i64 * 80 / 1000).max(4000),
    });
    let b = burst(&e, sale, args.orders, lead, args.burst_batch).await?;
    drop_sale(&e, sale).await?;
    println!();
    println!(
        "burst: {} orders due at once, 1 worker (batch {}) waiting for them: {}",
        args.orders,
        args.burst_batch,
        b.summary()
    );

    let sale = load_sale(
        &e,
        next_id,
        (args.stream_rate * args.stream_secs) as i64,
        1000,
    )
    .await?;
    let late = steady_stream(&e, sale, args.stream_rate, args.stream_secs).await?;
    drop_sale(&e, sale).await?;
    println!();
    println!(
        "steady stream: {} orders at {}/s, 1 s payment window, 1 worker (claims of {}, {} while this process reserves): \
         lateness p50 {} ms, p99 {} ms, max {} ms ({} closed)",
        args.stream_rate * args.stream_secs,
        args.stream_rate,
        ExpiryOptions::default().batch,
        ExpiryOptions::default().busy_batch,
        percentile(&late, 0.50),
        percentile(&late, 0.99),
        late.last().copied().unwrap_or(0),
        late.len()
    );
    Ok(())
}
