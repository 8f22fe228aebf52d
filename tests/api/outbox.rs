//! The transactional outbox: every change the reconciler applies leaves its
//! event in MySQL in the same transaction, once, whatever repeats; late
//! payments are recorded; the audit finds a missing row and writes it back.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use flashsale::audit::{AuditOptions, EventsAudit};
use flashsale::config::Role;
use flashsale::db::ledger;
use flashsale::engine::{FlowEntry, FlowEvent, FlowId, FlowRecord};
use flashsale::events::{Event, EventType};
use sqlx::MySqlPool;

use crate::helpers::*;
use crate::reconcile::wait_quiet;

/// The sale's outbox rows, oldest first: (order seq, type, body).
async fn outbox(pool: &MySqlPool, sale: &str) -> Vec<(Option<u64>, String, Event)> {
    let rows: Vec<(Option<u64>, String, String)> = sqlx::query_as(
        "SELECT order_seq, event_type, body FROM outbox WHERE sale_id = ? ORDER BY id",
    )
    .bind(sale.parse::<u64>().unwrap())
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(seq, t, body)| {
            let e = Event::parse(body.as_bytes()).expect("the body parses");
            assert_eq!(e.kind.as_str(), t, "the type column is the body's type");
            (seq, t, e)
        })
        .collect()
}

async fn wait_for_rows(pool: &MySqlPool, sale: &str, kind: &str, want: usize) {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let n = outbox(pool, sale)
            .await
            .iter()
            .filter(|r| r.1 == kind)
            .count();
        if n >= want {
            return;
        }
        assert!(Instant::now() < until, "{n} {kind} events, not {want}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn refund(app: &TestApp, order_id: &str, user: u64) -> u16 {
    app.order_call("POST", order_id, "/refund", user).await.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_applied_change_leaves_one_event_and_a_late_payment_is_recorded() {
    let app = spawn_with(Target::fresh(), |c| {
        c.roles = vec![Role::Http, Role::Expiry, Role::Reconciler]
    })
    .await;
    let pool = MySqlPool::connect(&app.target.database_url).await.unwrap();
    let sale = app
        .create_sale(SaleSpec {
            stock: 3,
            payment_window_secs: 2,
            ..SaleSpec::default()
        })
        .await;
    let mut orders = BTreeMap::new();
    for user in 1..=3 {
        let (s, o) = app.reserve(&sale, user, None).await;
        assert_eq!(s, 201, "{o}");
        orders.insert(user, o);
    }
    let (s, _) = app.reserve(&sale, 4, None).await;
    assert_eq!(s, 409, "sold out");
    let id = |u: u64| orders[&u]["order_id"].as_str().unwrap().to_owned();
    let amount = |u: u64| orders[&u]["amount_cents"].as_i64().unwrap();

    // 1 pays, 2 cancels (stock comes back), 4 takes it: sold out again.
    assert_eq!(app.pay(&id(1), "pay-1", amount(1)).await.0, 200);
    assert_eq!(app.cancel(&id(2), 2).await.0, 200);
    // Money taken for an order no longer pending is recorded too: a payment
    // of the cancelled order, a second payment of the paid one.
    let (s, v) = app.pay(&id(2), "pay-2", amount(2)).await;
    assert_eq!((s, code(&v)), (409, "order_not_pending"));
    let (s, v) = app.pay(&id(1), "pay-1-again", amount(1)).await;
    assert_eq!((s, code(&v)), (409, "order_not_pending"));
    let (s, o4) = app.reserve(&sale, 4, None).await;
    assert_eq!(s, 201, "{o4}");
    // 3's deadline passes: its payment comes late (twice: the gateway retries).
    let deadline = app.orders(&sale).await[&3].deadline_ms;
    while app.redis_now_ms().await < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..2 {
        let (s, v) = app.pay(&id(3), "pay-late-3", amount(3)).await;
        assert_eq!((s, code(&v)), (409, "order_expired"));
    }
    // 1 asks for its money back once its payment settled.
    wait_for_rows(&pool, &sale, "order.paid", 1).await;
    let s = refund(&app, &id(1), 1).await;
    assert!(s == 200 || s == 202, "refund answered {s}");
    wait_quiet(&app, &sale, Duration::from_secs(20)).await;
    wait_for_rows(&pool, &sale, "order.refunded", 1).await;

    let rows = outbox(&pool, &sale).await;
    let kinds = |seq: u64| -> Vec<String> {
        rows.iter()
            .filter(|r| r.0 == Some(seq))
            .map(|r| r.1.clone())
            .collect()
    };
    assert_eq!(
        kinds(1),
        [
            "order.reserved",
            "order.paid",
            "payment.late",
            "order.refunded"
        ]
        .map(String::from)
        .to_vec()
    );
    assert_eq!(
        kinds(2),
        ["order.reserved", "order.cancelled", "payment.late"]
            .map(String::from)
            .to_vec()
    );
    assert_eq!(
        kinds(3),
        ["order.reserved", "order.closed", "payment.late"]
            .map(String::from)
            .to_vec(),
        "one late payment however often the gateway sent it"
    );
    assert_eq!(kinds(4)[0], "order.reserved");
    let sold_out = rows.iter().filter(|r| r.1 == "sale.sold_out").count();
    assert_eq!(sold_out, 2, "sold out when the third unit went, and again");

    // Bodies as API.md writes them.
    let paid = &rows.iter().find(|r| r.1 == "order.paid").unwrap().2;
    assert_eq!(paid.order_id.as_deref(), Some(id(1).as_str()));
    assert_eq!(paid.sale_id, sale);
    assert_eq!(paid.user_id.as_deref(), Some("1"));
    assert_eq!(paid.qty, Some(1));
    assert_eq!(paid.amount_cents, Some(amount(1)));
    assert_eq!(paid.payment_id.as_deref(), Some("pay-1"));
    assert_eq!(paid.schema_version, 1);
    let late_of = |u: u64| {
        rows.iter()
            .find(|r| r.1 == "payment.late" && r.2.order_id.as_deref() == Some(id(u).as_str()))
            .unwrap()
            .2
            .clone()
    };
    assert_eq!(late_of(2).payment_id.as_deref(), Some("pay-2"));
    assert_eq!(late_of(2).status.as_deref(), Some("cancelled"));
    assert_eq!(late_of(1).payment_id.as_deref(), Some("pay-1-again"));
    let paid_body = &rows.iter().find(|r| r.1 == "order.paid").unwrap().2;
    assert_eq!(
        paid_body.payment_id.as_deref(),
        Some("pay-1"),
        "the order's own payment stays"
    );
    let late = late_of(3);
    assert_eq!(late.payment_id.as_deref(), Some("pay-late-3"));
    assert_eq!(late.amount_cents, Some(amount(3)));
    assert_eq!(late.status.as_deref(), Some("closed"));
    let refunded = &rows.iter().find(|r| r.1 == "order.refunded").unwrap().2;
    assert!(refunded.restocked.is_some());
    let mut ids: Vec<&str> = rows.iter().map(|r| r.2.event_id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), rows.len(), "event ids are unique");

    let late_rows: Vec<(u64, String, i64)> =
        sqlx::query_as("SELECT seq, payment_id, amount_cents FROM late_payments WHERE sale_id = ? ORDER BY seq, payment_id")
            .bind(sale.parse::<u64>().unwrap())
            .fetch_all(&pool)
            .await
            .unwrap();
    let seq3: u64 = id(3).rsplit('-').next().unwrap().parse().unwrap();
    let seq = |u: u64| -> u64 { id(u).rsplit('-').next().unwrap().parse().unwrap() };
    assert_eq!(
        late_rows,
        vec![
            (seq(1), "pay-1-again".to_owned(), amount(1)),
            (seq(2), "pay-2".to_owned(), amount(2)),
            (seq3, "pay-late-3".to_owned(), amount(3)),
        ]
    );

    // The audit sees every paid and refunded order's events and no stale
    // outbox (no broker named: waiting rows are information).
    let report = audit_sale(&app, &pool, &sale).await;
    assert!(report.is_clean(), "{:?}", report.sales[0].findings);
    pool.close().await;
    app.finish().await;
}

/// A flow record applied again (a new flow id for a change MySQL already
/// holds, as after a resent script) writes no second event: the event id
/// comes from the change, and the outbox keeps one row per id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_applied_again_yields_the_same_single_event() {
    let app = spawn_with(Target::fresh(), |c| {
        c.roles = vec![Role::Http, Role::Reconciler]
    })
    .await;
    let pool = MySqlPool::connect(&app.target.database_url).await.unwrap();
    let sale = app.create_sale(SaleSpec::default()).await;
    let (s, o) = app.reserve(&sale, 7, None).await;
    assert_eq!(s, 201);
    let order_id = o["order_id"].as_str().unwrap();
    let amount = o["amount_cents"].as_i64().unwrap();
    assert_eq!(app.pay(order_id, "pay-7", amount).await.0, 200);
    wait_quiet(&app, &sale, Duration::from_secs(20)).await;
    wait_for_rows(&pool, &sale, "order.paid", 1).await;
    let before = outbox(&pool, &sale).await;

    // The paid order, as a pay record under flow ids MySQL never saw, twice.
    let sale_id = sale.parse().unwrap();
    let order = app
        .engine
        .order(order_id.parse().unwrap())
        .await
        .unwrap()
        .unwrap();
    for ms in [1, 2] {
        let record = FlowRecord {
            id: FlowId {
                ms: order.paid_ms.unwrap() as u64 + ms,
                seq: 0,
            },
            event: FlowEvent::Pay,
            order: order.clone(),
            restocked: false,
            key: None,
            n: None,
            late: None,
        };
        let mut tx = pool.begin().await.unwrap();
        let out = ledger::apply(&mut tx, sale_id, &[FlowEntry::Record(record)])
            .await
            .unwrap();
        tx.commit().await.unwrap();
        assert!(out.quarantined.is_empty(), "{:?}", out.quarantined);
        assert!(out.events.is_empty(), "nothing new: {:?}", out.events);
    }
    let after = outbox(&pool, &sale).await;
    assert_eq!(before, after);
    pool.close().await;
    app.finish().await;
}

/// A paid order whose outbox row went missing (written by hand, restored
/// from a backup without it) is an audit finding; the repair writes the
/// row back with the id the reconciler gave it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_finds_a_missing_event_and_writes_it_back() {
    let app = spawn_with(Target::fresh(), |c| {
        c.roles = vec![Role::Http, Role::Reconciler]
    })
    .await;
    let pool = MySqlPool::connect(&app.target.database_url).await.unwrap();
    let sale = app.create_sale(SaleSpec::default()).await;
    let (_, o) = app.reserve(&sale, 9, None).await;
    let order_id = o["order_id"].as_str().unwrap();
    let amount = o["amount_cents"].as_i64().unwrap();
    assert_eq!(app.pay(order_id, "pay-9", amount).await.0, 200);
    wait_quiet(&app, &sale, Duration::from_secs(20)).await;
    wait_for_rows(&pool, &sale, "order.paid", 1).await;
    let paid_id = outbox(&pool, &sale)
        .await
        .into_iter()
        .find(|r| r.1 == "order.paid")
        .unwrap()
        .2
        .event_id;
    sqlx::query("DELETE FROM outbox WHERE event_id = ?")
        .bind(&paid_id)
        .execute(&pool)
        .await
        .unwrap();

    let opts = audit_of(sale.parse().unwrap());
    let report = flashsale::audit::run(&app.engine, &pool, &opts)
        .await
        .unwrap();
    let kinds: Vec<&str> = report.findings().map(|f| f.kind.as_str()).collect();
    assert_eq!(kinds, ["outbox_missing"]);
    flashsale::audit::apply(&app.engine, &pool, &report)
        .await
        .unwrap();
    let again = flashsale::audit::run(&app.engine, &pool, &opts)
        .await
        .unwrap();
    assert!(again.is_clean(), "{:?}", again.sales[0].findings);
    let back = outbox(&pool, &sale).await;
    let paid = back.iter().find(|r| r.1 == "order.paid").unwrap();
    assert_eq!(paid.2.event_id, paid_id, "the same id as before");
    assert_eq!(
        back.iter()
            .filter(|r| r.2.kind == EventType::OrderReserved)
            .count(),
        1
    );

    // With a broker named, rows left unsent past the grace are a finding.
    let strict = AuditOptions {
        grace: Duration::ZERO,
        events: EventsAudit {
            broker: true,
            ..EventsAudit::default()
        },
        ..opts
    };
    let behind = flashsale::audit::run(&app.engine, &pool, &strict)
        .await
        .unwrap();
    let kinds: Vec<&str> = behind.findings().map(|f| f.kind.as_str()).collect();
    assert!(kinds.contains(&"outbox_behind"), "{kinds:?}");
    pool.close().await;
    app.finish().await;
}

/// Records at or before the cursor are never read again, so the ledger
/// applies a batch assuming none was applied before and finds out from
/// `stock_flows`' key when one was: the batch is then applied again
/// looking each record up. Re-delivered records change nothing and write
/// no second event, new ones beside them are applied, and the stores end
/// as one delivery would leave them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_with_records_applied_before_applies_only_the_new_ones() {
    let app = spawn_with(Target::fresh(), |c| c.roles = vec![Role::Http]).await;
    let pool = MySqlPool::connect(&app.target.database_url).await.unwrap();
    let sale = app
        .create_sale(SaleSpec {
            stock: 100,
            ..SaleSpec::default()
        })
        .await;
    for user in 1..=11u64 {
        let (s, o) = app.reserve(&sale, user, None).await;
        assert_eq!(s, 201, "{o}");
        if user % 4 == 0 {
            let id = o["order_id"].as_str().unwrap();
            let amount = o["amount_cents"].as_i64().unwrap();
            assert_eq!(app.pay(id, &format!("pay-{user}"), amount).await.0, 200);
        }
    }
    let sale_id = sale.parse().unwrap();
    let entries = app
        .engine
        .read_flow_entries(sale_id, FlowId { ms: 0, seq: 0 }, 100)
        .await
        .unwrap();
    assert_eq!(entries.len(), 11 + 2, "11 reservations, 2 payments");
    // As the reconciler applies a batch: its cursor locked, moved with it.
    ledger::ensure_cursor(&pool, sale_id).await.unwrap();
    let apply = |batch: Vec<FlowEntry>| {
        let pool = pool.clone();
        async move {
            let mut tx = pool.begin().await.unwrap();
            ledger::lock_cursor(&mut tx, sale_id).await.unwrap();
            let out = ledger::apply(&mut tx, sale_id, &batch).await.unwrap();
            tx.commit().await.unwrap();
            assert!(out.quarantined.is_empty(), "{:?}", out.quarantined);
            (out.applied, out.already_applied, out.events.len())
        }
    };
    assert_eq!(apply(entries[..6].to_vec()).await, (6, 0, 6));
    // The first six again with the rest: only the rest is new.
    assert_eq!(apply(entries.clone()).await, (7, 6, 7));
    // All of it again: nothing is.
    assert_eq!(apply(entries.clone()).await, (0, 13, 0));

    // What the reconciler does after its commit: Redis learns what MySQL
    // settled (and trims it).
    app.engine
        .settle(sale_id, entries.last().unwrap().id())
        .await
        .unwrap();
    let rows = outbox(&pool, &sale).await;
    assert_eq!(rows.len(), 13, "one event per change");
    let opts = audit_of(sale_id);
    let report = flashsale::audit::run(&app.engine, &pool, &opts)
        .await
        .unwrap();
    assert!(report.is_clean(), "{:?}", report.sales[0].findings);
    pool.close().await;
    app.finish().await;
}
