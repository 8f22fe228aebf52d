//! Rebuild benchmark: how long the guard's rebuild takes to put a sale of
//! `--orders` orders (default 100,000) back into Redis from MySQL after
//! Redis lost every key of it, beside a reference measured in the same run:
//! the reconciler carrying the same orders' flow records into MySQL.
//!
//! The sale is made through the product's own paths: `sales::create`
//! (stock = orders + 1, one unit per buyer), `Engine::reserve` for distinct
//! buyers (concurrently), `Engine::pay` for `--paid-pct` of the orders,
//! `Engine::cancel` for `--cancels` of the rest; a `Reconciler` drains it all
//! into MySQL (timed: the reference). Then the sale's keys are deleted
//! (`Engine::drop_sale_keys`), it is fenced (`sales::load_missing`) and
//! `workers::guard::rebuild_now` is timed (the figure). The rebuilt sale is
//! checked against MySQL and against what Redis held before the loss; any
//! difference fails the run.
//!
//! Run it with `scripts/bench-rebuild.sh` (release build, local Redis and
//! MariaDB). It uses its own database and key prefix and removes both.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use clap::Parser;
use flashsale::db::{self, SaleRow};
use flashsale::domain::{IdempotencyKey, OrderId, Qty, SaleId, UserId};
use flashsale::engine::{
    Cancellation, Engine, EngineError, EngineOptions, Order, OrderStatus, Payment, Refusal,
    Reservation, Topology,
};
use flashsale::telemetry::Metrics;
use flashsale::workers::guard::rebuild_now;
use flashsale::workers::live::LiveSales;
use flashsale::workers::reconciler::{Reconciler, ReconcilerOptions};
use futures::stream::{self, StreamExt, TryStreamExt};
use redis::AsyncCommands;

#[derive(Parser, Debug)]
struct Args {
    /// Redis to run against.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// MySQL server (the benchmark creates and drops its own database).
    #[arg(long, default_value = "mysql://root@127.0.0.1:3306")]
    mysql: String,
    /// Orders in the sale (one per buyer, distinct buyers).
    #[arg(long, default_value_t = 100_000)]
    orders: u64,
    /// Concurrent calls while reserving, paying and cancelling.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Percentage of the orders paid.
    #[arg(long, default_value_t = 30)]
    paid_pct: u64,
    /// Unpaid orders cancelled by their buyers.
    #[arg(long, default_value_t = 1000)]
    cancels: u64,
    /// Orders read back one by one with `Engine::order` after the rebuild
    /// and compared with MySQL (every order is also compared in bulk).
    #[arg(long, default_value_t = 2000)]
    sample: u64,
    /// Leave the database and the keys in place (to look at a failure).
    #[arg(long)]
    keep: bool,
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// The sale hash's fields.
async fn sale_hash(e: &Engine, sale: SaleId) -> anyhow::Result<HashMap<String, String>> {
    let mut c = e.connection();
    Ok(c.hgetall(e.keys().sale(sale).sale).await?)
}

/// Every order 1..=top as Redis holds it (None where missing).
async fn redis_orders(e: &Engine, sale: SaleId, top: u64) -> anyhow::Result<Vec<Option<Order>>> {
    let seqs: Vec<u64> = (1..=top).collect();
    let packed = e.packed_orders(sale, &seqs).await?;
    seqs.iter()
        .zip(packed)
        .map(|(&seq, p)| {
            p.map(|p| {
                let id = OrderId::new(sale, seq);
                Order::unpack(id, &p).with_context(|| format!("order {id}: {p:?}"))
            })
            .transpose()
        })
        .collect()
}

/// The buyers hash without buyers at zero units.
async fn buyers(e: &Engine, sale: SaleId) -> anyhow::Result<BTreeMap<u64, i64>> {
    let mut c = e.connection();
    let all: HashMap<u64, i64> = c.hgetall(e.keys().sale(sale).buyers).await?;
    Ok(all.into_iter().filter(|(_, n)| *n != 0).collect())
}

/// The due-queue: its index (bucket -> score) and every bucket's entries.
type DueQueue = (BTreeMap<String, f64>, BTreeMap<String, Vec<(String, f64)>>);

async fn due_queue(e: &Engine, sale: SaleId) -> anyhow::Result<DueQueue> {
    let k = e.keys().sale(sale);
    let mut c = e.connection();
    let index: Vec<(String, f64)> = c.zrange_withscores(&k.deadlines, 0, -1).await?;
    let mut buckets = BTreeMap::new();
    for chunk in index.chunks(500) {
        let mut pipe = redis::pipe();
        for (b, _) in chunk {
            pipe.zrange_withscores(format!("{}:{b}", k.deadlines), 0, -1);
        }
        let got: Vec<Vec<(String, f64)>> = pipe.query_async(&mut c).await?;
        for ((b, _), entries) in chunk.iter().zip(got) {
            buckets.insert(b.clone(), entries);
        }
    }
    Ok((index.into_iter().collect(), buckets))
}

/// The names of the sale's keys, without the sale's own prefix, the
/// sale's membership of the sales index, and the keys' memory in bytes
/// (`MEMORY USAGE ... SAMPLES 0`: every element counted).
async fn key_names(e: &Engine, sale: SaleId) -> anyhow::Result<(Vec<String>, bool, u64)> {
    let k = e.keys().sale(sale);
    let mut c = e.connection();
    let mut names: Vec<String> = Vec::new();
    let mut iter: redis::AsyncIter<String> = c.scan_match(k.pattern()).await?;
    while let Some(key) = iter.next_item().await {
        names.push(key?);
    }
    drop(iter);
    let base = k.sale.strip_suffix(":sale").unwrap_or(&k.sale).to_owned();
    let mut short: Vec<String> = names
        .iter()
        .map(|n| n.strip_prefix(&base).unwrap_or(n).to_owned())
        .filter(|n| !n.starts_with(":deadlines:") && !n.starts_with(":orders:"))
        .collect();
    for kind in [":deadlines:", ":orders:"] {
        let buckets = names
            .iter()
            .filter(|n| n.strip_prefix(&base).is_some_and(|n| n.starts_with(kind)))
            .count();
        short.push(format!("{kind}<{buckets} buckets>"));
    }
    short.sort();
    let indexed: bool = c.sismember(e.keys().sales_index(), sale.get()).await?;
    let mut bytes = 0;
    for chunk in names.chunks(500) {
        let mut pipe = redis::pipe();
        for key in chunk {
            pipe.cmd("MEMORY")
                .arg("USAGE")
                .arg(key)
                .arg("SAMPLES")
                .arg(0);
        }
        let got: Vec<Option<u64>> = pipe.query_async(&mut c).await?;
        bytes += got.into_iter().flatten().sum::<u64>();
    }
    Ok((short, indexed, bytes))
}

/// What each (seq, user, key) sent again as the buyer's key answers, in
/// short: "dup <seq>", "ok <seq>" or the refusal.
async fn retry_answers(
    e: &Engine,
    sale: SaleId,
    keys: &[&(u64, u64, String)],
) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::with_capacity(keys.len());
    for (_, user, key) in keys {
        let k: IdempotencyKey = key.parse()?;
        out.push(
            match e
                .reserve(sale, UserId::new(*user)?, Qty::default(), Some(&k))
                .await
            {
                Ok(Reservation::Existing(o)) => format!("dup {}", o.id.seq()),
                Ok(Reservation::Created(o)) => format!("ok {}", o.id.seq()),
                other => format!("{other:?}"),
            },
        );
    }
    Ok(out)
}

/// An order without its last flow id (a rebuilt order's last flow is
/// MySQL's cursor by design).
fn comparable(o: &Order) -> Order {
    Order {
        last_flow: String::new(),
        ..o.clone()
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(args.orders > 0 && args.paid_pct <= 100, "bad arguments");
    let tag = format!("fsbench_rebuild_{}", std::process::id());
    let db_url = format!("{}/{tag}", args.mysql);
    let pool = db::connect(&db_url).await?;
    let e = Engine::connect(&EngineOptions {
        timeout: Duration::from_secs(30),
        flow_backlog_limit: u64::MAX,
        sold_out_ttl: Duration::ZERO,
        ..EngineOptions::new(Topology::Node(args.redis_url.clone()), &tag)
    })?;
    e.load_scripts().await?;

    let now = chrono::Utc::now();
    let row = SaleRow {
        sku: "BENCH-REBUILD".into(),
        title: "rebuild bench".into(),
        price_cents: 100,
        // One unit more than the orders: a new buyer after the rebuild.
        stock: args.orders as i64 + 1,
        per_user_limit: 1,
        payment_window_secs: 3600,
        start_at: now - chrono::Duration::minutes(1),
        end_at: now + chrono::Duration::hours(2),
    };
    let sale = flashsale::sales::create(&pool, &e, &row).await?.id;

    let outcome = run(&args, &pool, &e, sale).await;

    if args.keep {
        eprintln!(
            "kept: database {db_url}, Redis keys {}",
            e.keys().sale(sale).pattern()
        );
        return outcome;
    }
    let cleanup = async {
        e.drop_sale_keys(sale).await?;
        let mut c = e.connection();
        let _: () = c.del(e.keys().sales_index()).await?;
        pool.close().await;
        db::drop_database(&db_url).await
    }
    .await;
    if let (Err(_), Err(c)) = (&outcome, &cleanup) {
        eprintln!("cleaning up failed too: {c:#}");
    }
    outcome.and(cleanup)
}

async fn run(args: &Args, pool: &sqlx::MySqlPool, e: &Engine, sale: SaleId) -> anyhow::Result<()> {
    let n = args.orders;
    let load_start = load();

    // 1. Reserve, pay, cancel: all through the engine, as the API would.
    eprintln!(
        "reserving {n} orders for distinct buyers ({} concurrent)",
        args.concurrency
    );
    let started = Instant::now();
    let mut orders: Vec<Order> = stream::iter(1..=n)
        .map(|u| async move {
            match e.reserve(sale, UserId::new(u)?, Qty::default(), None).await {
                Ok(Reservation::Created(o)) => Ok(o),
                other => bail!("reserve for buyer {u}: {other:?}"),
            }
        })
        .buffer_unordered(args.concurrency)
        .try_collect()
        .await?;
    let reserve_secs = started.elapsed().as_secs_f64();
    orders.sort_by_key(|o| o.id.seq());
    ensure!(
        orders.iter().map(|o| o.id.seq()).eq(1..=n),
        "order seqs are not 1..={n}"
    );
    let to_pay: Vec<&Order> = orders
        .iter()
        .enumerate()
        .filter(|(i, _)| (*i as u64) % 100 < args.paid_pct)
        .map(|(_, o)| o)
        .collect();
    let to_cancel: Vec<&Order> = orders
        .iter()
        .enumerate()
        .filter(|(i, _)| (*i as u64) % 100 >= args.paid_pct)
        .map(|(_, o)| o)
        .take(args.cancels as usize)
        .collect();
    eprintln!(
        "paying {} orders, cancelling {}",
        to_pay.len(),
        to_cancel.len()
    );
    stream::iter(&to_pay)
        .map(|o| async move {
            match e
                .pay(o.id, &format!("bench-pay-{}", o.id.seq()), o.amount_cents)
                .await?
            {
                Payment::Paid(_) => Ok(()),
                other => bail!("pay {}: {other:?}", o.id),
            }
        })
        .buffer_unordered(args.concurrency)
        .try_collect::<()>()
        .await?;
    stream::iter(&to_cancel)
        .map(|o| async move {
            match e.cancel(o.id, o.user).await? {
                Cancellation::Cancelled(_) => Ok(()),
                other => bail!("cancel {}: {other:?}", o.id),
            }
        })
        .buffer_unordered(args.concurrency)
        .try_collect::<()>()
        .await?;
    let records = n + to_pay.len() as u64 + to_cancel.len() as u64;

    // 2. The reference: the reconciler carries every record into MySQL.
    eprintln!("draining {records} flow records into MySQL (the reference)");
    let r = Reconciler::new(
        e.clone(),
        pool.clone(),
        Arc::new(LiveSales::default()),
        Arc::new(Metrics::default()),
        ReconcilerOptions::default(),
    );
    let started = Instant::now();
    let mut applied = 0u64;
    loop {
        let got = r.reconcile_sale(sale).await?;
        if got == 0 {
            break;
        }
        applied += got as u64;
    }
    let drain = started.elapsed();
    ensure!(
        applied == records,
        "the reconciler applied {applied} of {records} records"
    );

    // What Redis held before the loss, to compare the rebuilt sale with.
    let before_hash = sale_hash(e, sale).await?;
    let before_orders = redis_orders(e, sale, n).await?;
    ensure!(
        before_orders.iter().all(Option::is_some),
        "Redis lacks orders before the loss"
    );
    let before_buyers = buyers(e, sale).await?;
    let before_due = due_queue(e, sale).await?;
    let before_keys_names = key_names(e, sale).await?;
    let mut c = e.connection();
    // The keys orders were made under (here the combiner's retry keys, kept
    // in Redis as call records, in MySQL per order): a sample of them sent
    // again must find the same orders after the rebuild as before.
    let keyed: Vec<(u64, u64, String)> = sqlx::query_as(
        "SELECT seq, user_id, idem_key FROM orders WHERE sale_id = ? AND idem_key IS NOT NULL",
    )
    .bind(sale.get())
    .fetch_all(pool)
    .await?;
    let key_step = (keyed.len() / 200).max(1);
    let key_sample: Vec<&(u64, u64, String)> = keyed.iter().step_by(key_step).collect();
    let before_keys = retry_answers(e, sale, &key_sample).await?;

    // 3. Redis loses the sale; it is fenced, then rebuilt (the figure).
    let deleted = e.drop_sale_keys(sale).await?;
    eprintln!("deleted the sale's {deleted} Redis keys");
    let fenced = flashsale::sales::load_missing(pool, e, Some(sale)).await?;
    ensure!(
        fenced == 1,
        "load_missing fenced {fenced} sales, expected 1"
    );
    match e.sale(sale).await {
        Err(EngineError::Fenced(reason)) if reason == "missing" => {}
        other => bail!("the sale is not fenced `missing` after load_missing: {other:?}"),
    }
    let load_before_rebuild = load();
    eprintln!("rebuilding from MySQL (load average {load_before_rebuild})");
    let started = Instant::now();
    let report = rebuild_now(e, pool, sale)
        .await?
        .context("rebuild_now did nothing (returned None)")?;
    let rebuild = started.elapsed();
    let load_end = load();
    eprintln!("rebuilt: {report:?}");
    ensure!(
        report.orders as u64 == n,
        "rebuilt {} orders of {n}",
        report.orders
    );
    ensure!(
        report.lost == 0,
        "the rebuild counted {} orders lost",
        report.lost
    );
    ensure!(report.fence == "missing", "fence {:?}", report.fence);

    // 4. Checks: the sale hash against MySQL's inventory row ...
    let h = sale_hash(e, sale).await?;
    ensure!(!h.contains_key("fence"), "still fenced: {h:?}");
    let inv: (i64, i64, i64, i64, i64, i64, i64, i64) = sqlx::query_as(
        "SELECT total, available, pending, paid, cancelled, closed, refunded, restocked \
         FROM inventory WHERE sale_id = ?",
    )
    .bind(sale.get())
    .fetch_one(pool)
    .await?;
    let mysql_counters = [
        ("total", inv.0),
        ("avail", inv.1),
        ("pending", inv.2),
        ("paid", inv.3),
        ("cancelled", inv.4),
        ("closed", inv.5),
        ("refunded", inv.6),
        ("restocked", inv.7),
    ];
    let mut bad = Vec::new();
    for (field, want) in mysql_counters {
        let got = h.get(field).and_then(|v| v.parse::<i64>().ok());
        if got != Some(want) {
            bad.push(format!("{field}: Redis {got:?}, MySQL {want}"));
        }
        let before = before_hash.get(field).and_then(|v| v.parse::<i64>().ok());
        if got != before {
            bad.push(format!(
                "{field}: Redis after {got:?}, before the loss {before:?}"
            ));
        }
    }
    let paid = to_pay.len() as i64;
    let cancelled = to_cancel.len() as i64;
    let expected = [
        ("avail", cancelled + 1),
        ("pending", n as i64 - paid - cancelled),
        ("paid", paid),
        ("cancelled", cancelled),
    ];
    for (field, want) in expected {
        if h.get(field).and_then(|v| v.parse::<i64>().ok()) != Some(want) {
            bad.push(format!(
                "{field}: Redis {:?}, the run made {want}",
                h.get(field)
            ));
        }
    }
    // ... the order counter against MySQL's highest seq ...
    let max_seq: u64 = sqlx::query_scalar(
        "SELECT CAST(COALESCE(MAX(seq), 0) AS UNSIGNED) FROM orders WHERE sale_id = ?",
    )
    .bind(sale.get())
    .fetch_one(pool)
    .await?;
    let seq = h.get("seq").and_then(|v| v.parse::<u64>().ok());
    if seq != Some(max_seq) || max_seq != n {
        bad.push(format!(
            "seq: Redis {seq:?}, MySQL's highest {max_seq}, orders {n}"
        ));
    }
    if report.counter != n {
        bad.push(format!("report.counter {}, orders {n}", report.counter));
    }
    // ... a sample read back one by one against MySQL's rows ...
    let rows: Vec<(u64, u64, String, Option<String>)> =
        sqlx::query_as("SELECT seq, user_id, status, payment_id FROM orders WHERE sale_id = ?")
            .bind(sale.get())
            .fetch_all(pool)
            .await?;
    let mysql: HashMap<u64, (u64, String, Option<String>)> = rows
        .into_iter()
        .map(|(s, u, st, p)| (s, (u, st, p)))
        .collect();
    ensure!(
        mysql.len() as u64 == n,
        "MySQL holds {} orders of {n}",
        mysql.len()
    );
    let step = (n / args.sample.max(1)).max(1);
    let mut sampled = 0;
    for s in (1..=n)
        .step_by(step as usize)
        .chain(to_cancel.iter().take(50).map(|o| o.id.seq()))
    {
        let id = OrderId::new(sale, s);
        let got = e.order(id).await?;
        let want = &mysql[&s];
        match got {
            Some(o)
                if o.user.get() == want.0
                    && o.status.as_str() == want.1
                    && o.payment_id == want.2 => {}
            other => bad.push(format!("order {id}: Redis {other:?}, MySQL {want:?}")),
        }
        sampled += 1;
    }
    // ... every order, the buyers and the keys against Redis before the loss ...
    let after_orders = redis_orders(e, sale, n).await?;
    let mut differing = 0;
    for (b, a) in before_orders.iter().zip(&after_orders) {
        let b = b.as_ref().map(comparable);
        let a = a.as_ref().map(comparable);
        if a != b {
            if differing < 5 {
                bad.push(format!(
                    "order before the loss {b:?}, after the rebuild {a:?}"
                ));
            }
            differing += 1;
        }
    }
    if differing > 0 {
        bad.push(format!(
            "{differing} orders differ from what Redis held before the loss"
        ));
    }
    let after_buyers = buyers(e, sale).await?;
    if after_buyers != before_buyers {
        bad.push(format!(
            "buyers: {} holding units before the loss, {} after",
            before_buyers.len(),
            after_buyers.len()
        ));
    }
    let after_idem: u64 = c.hlen(e.keys().sale(sale).idem).await?;
    if after_idem != keyed.len() as u64 {
        bad.push(format!(
            "keys: MySQL holds {} orders' keys, the rebuilt idempotency hash {after_idem}",
            keyed.len()
        ));
    }
    let after_keys = retry_answers(e, sale, &key_sample).await?;
    for ((seq, _, key), (b, a)) in key_sample.iter().zip(before_keys.iter().zip(&after_keys)) {
        if a != b || *b != format!("dup {seq}") {
            bad.push(format!(
                "order {seq}'s key {key} sent again: {b} before the loss, {a} after"
            ));
        }
    }
    // ... the due-queue exactly as before the loss ...
    let after_due = due_queue(e, sale).await?;
    if after_due.0 != before_due.0 {
        bad.push(format!(
            "due-queue index: {} buckets before the loss, {} after (or different scores)",
            before_due.0.len(),
            after_due.0.len()
        ));
    }
    if after_due.1 != before_due.1 {
        bad.push("due-queue buckets differ from before the loss".to_owned());
    }
    // (What else differs, for the record: the sale hash's other fields and
    // the set of keys.)
    let after_keys_names = key_names(e, sale).await?;
    let mut fields: Vec<&String> = h.keys().chain(before_hash.keys()).collect();
    fields.sort();
    fields.dedup();
    let hash_diff: Vec<String> = fields
        .into_iter()
        .filter(|f| h.get(*f) != before_hash.get(*f))
        .map(|f| format!("{f}: {:?} -> {:?}", before_hash.get(f), h.get(f)))
        .collect();
    // ... every pending order due at its deadline ...
    let pending: Vec<&Order> = after_orders
        .iter()
        .flatten()
        .filter(|o| o.status == OrderStatus::Pending)
        .collect();
    let members: Vec<String> = pending.iter().map(|o| o.id.seq().to_string()).collect();
    let mut scores = Vec::with_capacity(members.len());
    for chunk in members.chunks(5000) {
        scores.extend(e.due_scores(sale, chunk).await?);
    }
    let undue = pending
        .iter()
        .zip(&scores)
        .filter(|(o, s)| **s != Some(o.deadline_ms as f64))
        .count();
    if undue > 0 {
        bad.push(format!(
            "{undue} of {} pending orders not due at their deadline",
            pending.len()
        ));
    }
    // ... and the rebuilt sale serves: a holder is refused, a new buyer gets
    // the next seq, and the reconciler carries that order into MySQL.
    let holder = to_pay[0];
    match e.reserve(sale, holder.user, Qty::default(), None).await {
        Ok(Reservation::Refused(Refusal::LimitExceeded)) => {}
        other => bad.push(format!("a paid buyer reserving again: {other:?}")),
    }
    match e
        .reserve(sale, UserId::new(n + 1)?, Qty::default(), None)
        .await
    {
        Ok(Reservation::Created(o)) if o.id.seq() == n + 1 => {}
        other => bad.push(format!(
            "a new buyer after the rebuild: {other:?}, expected seq {}",
            n + 1
        )),
    }
    let mut after = 0;
    loop {
        let got = r.reconcile_sale(sale).await?;
        if got == 0 {
            break;
        }
        after += got;
    }
    let new_row: Option<(u64,)> =
        sqlx::query_as("SELECT user_id FROM orders WHERE sale_id = ? AND seq = ?")
            .bind(sale.get())
            .bind(n + 1)
            .fetch_optional(pool)
            .await?;
    if after != 1 || new_row != Some((n + 1,)) {
        bad.push(format!(
            "after the rebuild the reconciler applied {after} records (expected 1); MySQL's order {}: {new_row:?}",
            n + 1
        ));
    }
    if !bad.is_empty() {
        bail!("the rebuilt sale is wrong:\n  {}", bad.join("\n  "));
    }
    // For scale: the rebuild's MySQL read alone (the same query, warm).
    let started = Instant::now();
    let mut tx = pool.begin().await?;
    let read = db::rebuild::orders(&mut tx, sale, Default::default()).await?;
    tx.rollback().await?;
    let read_secs = started.elapsed().as_secs_f64();
    ensure!(read.len() as u64 == n + 1, "read {} orders", read.len());

    let rb = rebuild.as_secs_f64();
    let dr = drain.as_secs_f64();
    println!(
        "rebuild benchmark: Redis {}, MySQL {}; load average {load_start} at the start, \
         {load_before_rebuild} before the rebuild, {load_end} after it",
        args.redis_url, args.mysql
    );
    println!(
        "sale {sale}: {n} orders reserved in {reserve_secs:.2} s ({:.0}/s, {} concurrent), {paid} paid, \
         {cancelled} cancelled, {} pending; {records} flow records",
        n as f64 / reserve_secs,
        args.concurrency,
        n as i64 - paid - cancelled
    );
    println!(
        "rebuild: {} orders written back, {} lost, counter {}, its own clock {:.3} s (for scale: \
         reading the sale's orders from MySQL alone, warm, {read_secs:.3} s); checks passed \
         (counters = MySQL's inventory, seq = MySQL's highest, {sampled} orders read back one by one, \
         all {n} orders, buyers and {} deadlines = Redis before the loss, {after_idem} keys = MySQL's, \
         {} keys sent again found the same orders as before the loss; a new buyer got seq {})",
        report.orders,
        report.lost,
        report.counter,
        report.took.as_secs_f64(),
        pending.len(),
        key_sample.len(),
        n + 1
    );
    println!(
        "differences from before the loss (not failures): sale hash fields {hash_diff:?}; \
         keys {:?} (in the sales index: {}, {:.1} MB) -> {:?} (in the sales index: {}, {:.1} MB)",
        before_keys_names.0,
        before_keys_names.1,
        before_keys_names.2 as f64 / 1e6,
        after_keys_names.0,
        after_keys_names.1,
        after_keys_names.2 as f64 / 1e6
    );
    println!();
    println!(
        "| orders | rebuild (s) | rebuild, orders/s | reference: reconciler drain of the same orders' {records} records into MySQL (s) | ratio rebuild / drain |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: |");
    println!(
        "| {n} | {rb:.2} | {:.0} | {dr:.2} | {:.2} |",
        n as f64 / rb,
        rb / dr
    );
    Ok(())
}
