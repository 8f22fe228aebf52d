//! Quarantined flow records (`quarantined_flows`): what the reconciler
//! refused to apply, kept as received with the reason, in the same
//! transaction that moves the cursor past them.
//!
//! Nothing here ever applies or repairs a quarantined record: that is a
//! person's decision. The audit lists them as findings.

use chrono::{DateTime, Utc};
use sqlx::{MySql, MySqlPool, QueryBuilder, Transaction};

use crate::domain::SaleId;
use crate::engine::{FlowEvent, FlowId, FlowRecord, UnreadableRecord};

/// Longest reason kept (the column's width, in characters).
const REASON_CHARS: usize = 1024;
/// Longest record kept (a `TEXT` holds 65,535 bytes; 4 per character at most).
const RECORD_CHARS: usize = 16_000;
/// Longest event name kept.
const EVENT_CHARS: usize = 32;

fn clip(s: &str, chars: usize) -> String {
    match s.char_indices().nth(chars) {
        Some((end, _)) => s[..end].to_owned(),
        None => s.to_owned(),
    }
}

/// One record refused by the reconciler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantined {
    /// Its place in the sale's stream.
    pub flow: FlowId,
    /// The order it names, when it names one.
    pub seq: Option<u64>,
    /// Its event as received (possibly one no script writes).
    pub event: String,
    /// Its fields as received, as a JSON object.
    pub record: String,
    /// Why it was refused.
    pub reason: String,
}

impl Quarantined {
    /// A readable record refused for `reason`.
    pub fn refused(r: &FlowRecord, reason: String) -> Self {
        let mut fields = serde_json::json!({
            "ev": r.event.as_str(),
            "o": r.order.id.seq().to_string(),
            "s": r.order.pack(),
        });
        if r.event == FlowEvent::Refund {
            fields["r"] = (if r.restocked { "1" } else { "0" }).into();
        }
        if let Some(l) = &r.late {
            fields["p"] = l.payment_id.clone().into();
            fields["a"] = l.amount_cents.to_string().into();
        }
        Self {
            flow: r.id,
            seq: Some(r.order.id.seq()),
            event: r.event.as_str().to_owned(),
            record: fields.to_string(),
            reason,
        }
    }

    /// An entry that is not a flow record at all.
    pub fn unreadable(u: &UnreadableRecord) -> Self {
        Self {
            flow: u.id,
            seq: u.fields.get("o").and_then(|o| o.parse().ok()),
            event: u.fields.get("ev").cloned().unwrap_or_default(),
            record: serde_json::to_string(&u.fields).unwrap_or_default(),
            reason: format!("unreadable record: {}", u.error),
        }
    }
}

/// Writes `items` of `sale` inside the reconciler's transaction. A record
/// quarantined before (same flow id) stays as it was.
pub async fn insert(
    tx: &mut Transaction<'_, MySql>,
    sale: SaleId,
    items: &[Quarantined],
) -> sqlx::Result<()> {
    if items.is_empty() {
        return Ok(());
    }
    let mut q = QueryBuilder::<MySql>::new(
        "INSERT INTO quarantined_flows (flow_id, sale_id, seq, event, record, reason) ",
    );
    q.push_values(items, |mut b, i| {
        b.push_bind(format!("{sale}-{}", i.flow))
            .push_bind(sale.get())
            .push_bind(i.seq)
            .push_bind(clip(&i.event, EVENT_CHARS))
            .push_bind(clip(&i.record, RECORD_CHARS))
            .push_bind(clip(&i.reason, REASON_CHARS));
    });
    q.push(" ON DUPLICATE KEY UPDATE flow_id = flow_id");
    q.build().execute(&mut **tx).await?;
    Ok(())
}

/// A quarantined record as MySQL keeps it.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct QuarantinedRow {
    /// `"<sale_id>-<stream entry id>"`.
    pub flow_id: String,
    /// The order it names, when it names one.
    pub seq: Option<u64>,
    /// Its event as received.
    pub event: String,
    /// Its fields as received, as a JSON object.
    pub record: String,
    /// Why it was refused.
    pub reason: String,
    /// When.
    pub quarantined_at: DateTime<Utc>,
}

/// Every quarantined record of `sale`, oldest first.
pub async fn list(pool: &MySqlPool, sale: SaleId) -> sqlx::Result<Vec<QuarantinedRow>> {
    sqlx::query_as(
        "SELECT flow_id, seq, event, record, reason, quarantined_at \
         FROM quarantined_flows WHERE sale_id = ? ORDER BY id",
    )
    .bind(sale.get())
    .fetch_all(pool)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clips_on_character_boundaries() {
        assert_eq!(clip("abc", 5), "abc");
        assert_eq!(clip("aéb", 2), "aé");
    }
}
