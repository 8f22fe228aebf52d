//! The reconciler's side of MySQL: a per-sale cursor locked for the length
//! of one transaction, and the batch of flow records applied under it.
//!
//! Exactly-once in effect comes from moving the cursor in the same
//! transaction as the rows: a batch is either committed with its cursor or
//! not at all, and records at or before the cursor are never read again.
//! `SKIP LOCKED` lets any number of reconcilers share the sales without
//! waiting on each other; one sale's records are applied by one at a time,
//! in stream order.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use chrono::{DateTime, Utc};
use sqlx::mysql::MySqlDatabaseError;
use sqlx::{Executor, MySql, MySqlPool, QueryBuilder, Transaction};

use super::forward::{judge, Held, Verdict};
use super::inventory;
use super::outbox::{self, NewRow};
use super::quarantine::{self, Quarantined};
use crate::domain::SaleId;
use crate::engine::{FlowEntry, FlowEvent, FlowId, FlowRecord, Order};
use crate::events::{Event, EventType};
use crate::units::Units;

fn at(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

/// Creates `sale`'s cursor row if it is missing. Called outside the batch
/// transaction: inserting under a locking read of a missing row would wait
/// on the transaction's own gap lock.
pub async fn ensure_cursor(pool: &MySqlPool, sale: SaleId) -> sqlx::Result<()> {
    let exists: Option<(u64,)> =
        sqlx::query_as("SELECT sale_id FROM reconcile_cursors WHERE sale_id = ?")
            .bind(sale.get())
            .fetch_optional(pool)
            .await?;
    if exists.is_none() {
        // Not INSERT IGNORE: that would turn a missing sale (foreign key)
        // into a warning and leave no cursor behind.
        sqlx::query(
            "INSERT INTO reconcile_cursors (sale_id) VALUES (?) \
             ON DUPLICATE KEY UPDATE sale_id = sale_id",
        )
        .bind(sale.get())
        .execute(pool)
        .await?;
    }
    Ok(())
}

/// Locks `sale`'s cursor (see [`ensure_cursor`]) for this transaction and
/// returns it; `None` when another reconciler holds it (then this one moves
/// on to other sales).
pub async fn lock_cursor(
    tx: &mut Transaction<'_, MySql>,
    sale: SaleId,
) -> sqlx::Result<Option<FlowId>> {
    Ok(lock_numbered_cursor(tx, sale).await?.map(|(c, _)| c))
}

/// As [`lock_cursor`], with the number of the last record applied.
pub async fn lock_numbered_cursor(
    tx: &mut Transaction<'_, MySql>,
    sale: SaleId,
) -> sqlx::Result<Option<(FlowId, u64)>> {
    let row: Option<(u64, u64, u64)> = sqlx::query_as(
        "SELECT last_ms, last_seq, last_n FROM reconcile_cursors \
         WHERE sale_id = ? FOR UPDATE SKIP LOCKED",
    )
    .bind(sale.get())
    .fetch_optional(&mut **tx)
    .await?;
    Ok(row.map(|(ms, seq, n)| (FlowId { ms, seq }, n)))
}

/// Units moved by changes, as inventory deltas (the total is 0: no change
/// moves it); [`Units::of_flow`] gives one record's.
pub type Deltas = Units;

fn flow_id(sale: SaleId, id: FlowId) -> String {
    format!("{sale}-{id}")
}

/// What one batch did.
#[derive(Debug, Default)]
pub struct BatchOutcome {
    /// Records written to `stock_flows` (applied, or repeating a state
    /// MySQL already held).
    pub applied: usize,
    /// Records whose flow id `stock_flows` already held (re-delivered):
    /// nothing done.
    pub already_applied: usize,
    /// Records refused and quarantined, in stream order.
    pub quarantined: Vec<Quarantined>,
    /// Outbox rows written, by type (for metrics).
    pub events: Vec<EventType>,
}

impl BatchOutcome {
    fn merge(&mut self, o: Self) {
        self.applied += o.applied;
        self.already_applied += o.already_applied;
        self.quarantined.extend(o.quarantined);
        self.events.extend(o.events);
    }
}

/// Applies `entries` (oldest first, all after the locked cursor) and moves
/// the cursor to the last one, inside `tx`.
///
/// The record is forward-only: each record is judged in stream order
/// against the order as MySQL holds it (rows locked) plus the batch's
/// earlier records, and a record that would move an order backwards or
/// rewrite what never changes, or that is not a flow record at all, is
/// quarantined instead of applied; the cursor moves past it either way.
/// When MySQL refuses the batch for a reason retrying cannot cure (see
/// [`is_permanent`]), the batch is applied again record by record, each
/// in its own savepoint, and the records MySQL refuses are quarantined.
/// Any other error (a lost connection, a deadlock) is returned: the caller
/// rolls back and retries.
pub async fn apply(
    tx: &mut Transaction<'_, MySql>,
    sale: SaleId,
    entries: &[FlowEntry],
) -> sqlx::Result<BatchOutcome> {
    let Some(last) = entries.last().map(FlowEntry::id) else {
        return Ok(BatchOutcome::default());
    };
    (&mut **tx).execute("SAVEPOINT fs_batch").await?;
    let first = match apply_entries(tx, sale, entries, Seen::Assume).await {
        Ok(Some(out)) => Ok(out),
        Ok(None) => {
            // A record `stock_flows` already holds (re-delivered): the
            // batch again, looking such records up first.
            (&mut **tx)
                .execute("ROLLBACK TO SAVEPOINT fs_batch")
                .await?;
            checked(tx, sale, entries).await
        }
        Err(e) => Err(e),
    };
    let out = match first {
        Err(e) if is_permanent(&e) => {
            tracing::warn!(sale = %sale, error = %e, "MySQL refused a batch; applying it record by record");
            (&mut **tx)
                .execute("ROLLBACK TO SAVEPOINT fs_batch")
                .await?;
            isolate(tx, sale, entries).await?
        }
        r => r?,
    };
    quarantine::insert(tx, sale, &out.quarantined).await?;
    let last_n = entries
        .iter()
        .filter_map(FlowEntry::number)
        .max()
        .unwrap_or(0);
    sqlx::query(
        "UPDATE reconcile_cursors SET last_ms = ?, last_seq = ?, applied = applied + ?, \
         last_n = GREATEST(last_n, ?) WHERE sale_id = ?",
    )
    .bind(last.ms)
    .bind(last.seq)
    .bind(out.applied as u64)
    .bind(last_n)
    .bind(sale.get())
    .execute(&mut **tx)
    .await?;
    Ok(out)
}

/// Applies `entries` one at a time, each in a savepoint; quarantines the
/// ones MySQL refuses for good.
async fn isolate(
    tx: &mut Transaction<'_, MySql>,
    sale: SaleId,
    entries: &[FlowEntry],
) -> sqlx::Result<BatchOutcome> {
    let mut out = BatchOutcome::default();
    for e in entries {
        (&mut **tx).execute("SAVEPOINT fs_record").await?;
        match checked(tx, sale, std::slice::from_ref(e)).await {
            Ok(o) => out.merge(o),
            Err(err) if is_permanent(&err) => {
                (&mut **tx)
                    .execute("ROLLBACK TO SAVEPOINT fs_record")
                    .await?;
                let reason = format!("MySQL refused it: {err}");
                out.quarantined.push(match e {
                    FlowEntry::Record(r) => Quarantined::refused(r, reason),
                    FlowEntry::Unreadable(u) => Quarantined::unreadable(u),
                });
            }
            Err(err) => return Err(err),
        }
    }
    Ok(out)
}

/// MySQL error numbers that retrying cannot cure: duplicate key, foreign
/// key, NOT NULL, CHECK (MySQL 3819, MariaDB 4025), a value out of range,
/// too long or of the wrong kind. Deadlocks (1213), lock wait timeouts
/// (1205), lost connections and everything not listed are retried.
const PERMANENT: [u32; 11] = [
    1048, 1062, 1264, 1292, 1366, 1406, 1451, 1452, 1690, 3819, 4025,
];

/// Whether MySQL refused a statement for a reason retrying cannot cure.
pub fn is_permanent(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(d) => d
            .try_downcast_ref::<MySqlDatabaseError>()
            .is_some_and(|m| PERMANENT.contains(&(m.number() as u32))),
        _ => false,
    }
}

/// How [`apply_entries`] tells re-delivered records (their flow id is in
/// `stock_flows`, they change nothing) from new ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    /// Looks the batch's flow ids up before anything else.
    LookUp,
    /// Assumes there are none, which is nearly always so (records at or
    /// before the cursor are never read again): `stock_flows`' primary key
    /// refuses a repeated flow id, and refused records (not written there)
    /// are looked up. Either way a re-delivered record makes
    /// [`apply_entries`] return `None`, having written nothing that must be
    /// kept: the caller rolls back to its savepoint and applies the batch
    /// again with [`Seen::LookUp`]. When it returns `Some`, no record was
    /// re-delivered, and it did exactly what [`Seen::LookUp`] would have.
    Assume,
}

/// [`apply_entries`] with [`Seen::LookUp`].
async fn checked(
    tx: &mut Transaction<'_, MySql>,
    sale: SaleId,
    entries: &[FlowEntry],
) -> sqlx::Result<BatchOutcome> {
    Ok(apply_entries(tx, sale, entries, Seen::LookUp)
        .await?
        .unwrap_or_default())
}

/// MySQL's duplicate-key error.
fn is_duplicate(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(d) => d
            .try_downcast_ref::<MySqlDatabaseError>()
            .is_some_and(|m| m.number() == 1062),
        _ => false,
    }
}

/// The flow ids of `ids` that `stock_flows` holds.
async fn held_flows(
    tx: &mut Transaction<'_, MySql>,
    sale: SaleId,
    ids: impl Iterator<Item = FlowId>,
) -> sqlx::Result<HashSet<String>> {
    let mut q = QueryBuilder::<MySql>::new("SELECT flow_id FROM stock_flows WHERE flow_id IN (");
    let mut list = q.separated(", ");
    for id in ids {
        list.push_bind(flow_id(sale, id));
    }
    q.push(")");
    Ok(q.build_query_scalar::<String>()
        .fetch_all(&mut **tx)
        .await?
        .into_iter()
        .collect())
}

/// Judges and applies `entries`, without moving the cursor; `None` (only
/// with [`Seen::Assume`]) when one was re-delivered.
async fn apply_entries(
    tx: &mut Transaction<'_, MySql>,
    sale: SaleId,
    entries: &[FlowEntry],
    seen: Seen,
) -> sqlx::Result<Option<BatchOutcome>> {
    let mut out = BatchOutcome::default();
    let mut records = Vec::with_capacity(entries.len());
    for e in entries {
        match e {
            FlowEntry::Record(r) => records.push(r),
            FlowEntry::Unreadable(u) => out.quarantined.push(Quarantined::unreadable(u)),
        }
    }
    if records.is_empty() {
        return Ok(Some(out));
    }

    // Re-delivered records (their flow id is in `stock_flows`) are no-ops.
    if seen == Seen::LookUp {
        let held = held_flows(tx, sale, records.iter().map(|r| r.id)).await?;
        let before = records.len();
        records.retain(|r| !held.contains(&flow_id(sale, r.id)));
        out.already_applied = before - records.len();
        if records.is_empty() {
            return Ok(Some(out));
        }
    }

    // The batch's orders as MySQL holds them, locked until the commit.
    let mut q = QueryBuilder::<MySql>::new(
        "SELECT seq, user_id, CAST(qty AS SIGNED), amount_cents, status, payment_id \
         FROM orders WHERE sale_id = ",
    );
    q.push_bind(sale.get());
    let distinct: BTreeSet<u64> = records.iter().map(|r| r.order.id.seq()).collect();
    match (distinct.first(), distinct.last()) {
        // Every seq from the first to the last (a batch of reservations):
        // one range instead of a list MySQL sorts into as many ranges.
        (Some(&lo), Some(&hi)) if hi - lo + 1 == distinct.len() as u64 => {
            q.push(" AND seq BETWEEN ")
                .push_bind(lo)
                .push(" AND ")
                .push_bind(hi);
        }
        _ => {
            q.push(" AND seq IN (");
            let mut seqs = q.separated(", ");
            for seq in &distinct {
                seqs.push_bind(*seq);
            }
            q.push(")");
        }
    }
    q.push(" FOR UPDATE");
    let rows: Vec<(u64, u64, i64, i64, String, Option<String>)> =
        q.build_query_as().fetch_all(&mut **tx).await?;
    let mut held: HashMap<u64, Held> = rows
        .into_iter()
        .map(|(seq, user, qty, amount_cents, status, payment_id)| {
            let h = Held {
                user,
                qty,
                amount_cents,
                status,
                payment_id,
            };
            (seq, h)
        })
        .collect();

    let mut rows = Vec::with_capacity(records.len());
    // Whether each of `rows` moves its order (false: repeats MySQL's state).
    let mut moves = Vec::with_capacity(records.len());
    let mut last_state: BTreeMap<u64, &Order> = BTreeMap::new();
    let mut keys: HashMap<u64, &str> = HashMap::new();
    let mut d = Deltas::default();
    let mut refused = Vec::new();
    for r in records {
        let seq = r.order.id.seq();
        match judge(held.get(&seq), r) {
            Verdict::Apply => {
                if let Some(k) = r.key.as_deref() {
                    keys.insert(seq, k);
                }
                held.insert(seq, Held::of(&r.order));
                last_state.insert(seq, &r.order);
                d += Units::of_flow(r);
                rows.push(r);
                moves.push(true);
            }
            Verdict::Repeat => {
                rows.push(r);
                moves.push(false);
            }
            Verdict::Refuse(reason) => {
                refused.push(r.id);
                out.quarantined.push(Quarantined::refused(r, reason));
            }
        }
    }
    if seen == Seen::Assume {
        // A refused record writes no flow row for the key to refuse.
        if !refused.is_empty() && !held_flows(tx, sale, refused.into_iter()).await?.is_empty() {
            return Ok(None);
        }
    }
    out.applied = rows.len();
    if rows.is_empty() {
        return Ok(Some(out));
    }

    let mut flows = QueryBuilder::<MySql>::new(
        "INSERT INTO stock_flows (flow_id, sale_id, seq, event, qty, status, event_at) ",
    );
    flows.push_values(&rows, |mut b, r| {
        b.push_bind(flow_id(sale, r.id))
            .push_bind(sale.get())
            .push_bind(r.order.id.seq())
            .push_bind(r.event.as_str())
            .push_bind(r.order.qty)
            .push_bind(r.order.status.as_str())
            .push_bind(at(r.id.ms as i64));
    });
    match flows.build().execute(&mut **tx).await {
        Err(e) if seen == Seen::Assume && is_duplicate(&e) => return Ok(None),
        r => r?,
    };

    if !last_state.is_empty() {
        upsert_orders(tx, last_state.into_values(), &keys).await?;
    }
    out.events = write_events(tx, sale, &rows, &moves).await?;
    if d != Deltas::default() {
        inventory::add(tx, sale, &d).await?;
    }
    Ok(Some(out))
}

/// The outbox rows of applied records (`rows`, with whether each moved its
/// order), written in the batch's transaction: one event per record (a
/// repeat too: its event id is the one the first write had, so the outbox
/// keeps one row), late payments recorded in `late_payments`, and
/// `sale.sold_out` each time a record takes the available stock to 0.
/// Called before the batch's deltas reach the inventory row.
async fn write_events(
    tx: &mut Transaction<'_, MySql>,
    sale: SaleId,
    rows: &[&FlowRecord],
    moves: &[bool],
) -> sqlx::Result<Vec<EventType>> {
    let mut available = inventory::read(tx, sale)
        .await?
        .map_or(0, |(u, _)| u.available);
    let mut late = Vec::new();
    let mut events = Vec::with_capacity(rows.len() + 1);
    for (r, &moved) in rows.iter().zip(moves) {
        let at_ms = r.id.ms as i64;
        let mut event = match &r.late {
            Some(l) => {
                late.push((r, l));
                Event::late_payment(&r.order, l, at_ms)
            }
            None => Event::of_order(EventType::of_flow(r.event), &r.order, at_ms),
        };
        if r.event == FlowEvent::Refund {
            event.restocked = Some(r.restocked);
        }
        events.push(NewRow {
            sale,
            order_seq: Some(r.order.id.seq()),
            event,
        });
        if moved {
            let before = available;
            available += Units::of_flow(r).available;
            if before > 0 && available == 0 {
                events.push(NewRow {
                    sale,
                    order_seq: None,
                    event: Event::sold_out(sale, r.id),
                });
            }
        }
    }
    if !late.is_empty() {
        let mut q = QueryBuilder::<MySql>::new(
            "INSERT IGNORE INTO late_payments (sale_id, seq, payment_id, amount_cents, received_at) ",
        );
        q.push_values(&late, |mut b, (r, l)| {
            b.push_bind(sale.get())
                .push_bind(r.order.id.seq())
                .push_bind(&l.payment_id)
                .push_bind(l.amount_cents)
                .push_bind(at(r.id.ms as i64));
        });
        q.build().execute(&mut **tx).await?;
    }
    outbox::insert(tx, &events).await
}

/// Inserts new orders, or sets existing rows to the given state. Every
/// state given was judged a legal step forward (see [`judge`](super::forward::judge)), so the
/// update takes it as it is; what never changes (buyer, units, amount) is
/// never written over.
async fn upsert_orders<'a>(
    tx: &mut Transaction<'_, MySql>,
    orders: impl Iterator<Item = &'a Order>,
    keys: &HashMap<u64, &str>,
) -> sqlx::Result<()> {
    let mut q = QueryBuilder::<MySql>::new(
        "INSERT INTO orders (sale_id, seq, user_id, qty, amount_cents, status, created_at, \
         payment_deadline, paid_at, closed_at, refunded_at, payment_id, idem_key) ",
    );
    q.push_values(orders, |mut b, o| {
        b.push_bind(o.id.sale().get())
            .push_bind(o.id.seq())
            .push_bind(o.user.get())
            .push_bind(o.qty)
            .push_bind(o.amount_cents)
            .push_bind(o.status.as_str())
            .push_bind(at(o.created_ms))
            .push_bind(at(o.deadline_ms))
            .push_bind(o.paid_ms.map(at))
            .push_bind(o.closed_ms.map(at))
            .push_bind(o.refunded_ms.map(at))
            .push_bind(o.payment_id.clone())
            .push_bind(keys.get(&o.id.seq()).copied());
    });
    q.push(
        " ON DUPLICATE KEY UPDATE paid_at = VALUES(paid_at), closed_at = VALUES(closed_at), \
         refunded_at = VALUES(refunded_at), payment_id = VALUES(payment_id), \
         status = VALUES(status), idem_key = COALESCE(idem_key, VALUES(idem_key))",
    );
    q.build().execute(&mut **tx).await?;
    Ok(())
}
