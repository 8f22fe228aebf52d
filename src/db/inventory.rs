//! A sale's `inventory` row: its stock counters as MySQL holds them. The
//! column lists come from [`Units::COUNTERS`], so a new counter needs no
//! change here.

use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use sqlx::{MySql, Row, Transaction};

use crate::domain::SaleId;
use crate::units::Units;

/// `SELECT i.total, i.available, ..., s.end_at FROM inventory i JOIN sales s ...`.
static READ: LazyLock<String> = LazyLock::new(|| {
    let columns: Vec<String> = Units::COUNTERS
        .iter()
        .map(|c| format!("i.{}", c.mysql))
        .collect();
    format!(
        "SELECT {}, s.end_at FROM inventory i JOIN sales s ON s.id = i.sale_id \
         WHERE i.sale_id = ?",
        columns.join(", ")
    )
});

/// `UPDATE inventory SET available = available + ?, ... WHERE sale_id = ?`.
static ADD: LazyLock<String> = LazyLock::new(|| {
    let set: Vec<String> = Units::moving()
        .map(|c| format!("{0} = {0} + ?", c.mysql))
        .collect();
    format!("UPDATE inventory SET {} WHERE sale_id = ?", set.join(", "))
});

/// `UPDATE inventory SET available = ?, ... WHERE sale_id = ?`.
static SET: LazyLock<String> = LazyLock::new(|| {
    let set: Vec<String> = Units::moving()
        .map(|c| format!("{} = ?", c.mysql))
        .collect();
    format!("UPDATE inventory SET {} WHERE sale_id = ?", set.join(", "))
});

/// The sale's inventory row and end time (None when MySQL lacks the sale).
pub async fn read(
    tx: &mut Transaction<'_, MySql>,
    sale: SaleId,
) -> sqlx::Result<Option<(Units, i64)>> {
    let Some(row) = sqlx::query(&READ)
        .bind(sale.get())
        .fetch_optional(&mut **tx)
        .await?
    else {
        return Ok(None);
    };
    let units = Units::try_from_fn(|c| row.try_get::<i32, _>(c.mysql).map(i64::from))?;
    let end_at: DateTime<Utc> = row.try_get("end_at")?;
    Ok(Some((units, end_at.timestamp_millis())))
}

/// Moves the sale's counters by `d` (its total stays).
pub async fn add(tx: &mut Transaction<'_, MySql>, sale: SaleId, d: &Units) -> sqlx::Result<()> {
    update(tx, &ADD, sale, d).await
}

/// Sets the sale's counters to `u` (its total stays).
pub async fn set(tx: &mut Transaction<'_, MySql>, sale: SaleId, u: &Units) -> sqlx::Result<()> {
    update(tx, &SET, sale, u).await
}

/// Runs `sql` ([`ADD`] or [`SET`]) with the moving counters of `u`.
async fn update(
    tx: &mut Transaction<'_, MySql>,
    sql: &str,
    sale: SaleId,
    u: &Units,
) -> sqlx::Result<()> {
    let mut q = sqlx::query(sql);
    for c in Units::moving() {
        q = q.bind(c.of(u));
    }
    q.bind(sale.get()).execute(&mut **tx).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_statement_names_every_counter_it_binds() {
        for c in Units::COUNTERS {
            assert!(READ.contains(&format!("i.{},", c.mysql)), "{}", *READ);
        }
        for sql in [&*ADD, &*SET] {
            assert_eq!(
                sql.matches('?').count(),
                Units::moving().count() + 1,
                "{sql}"
            );
            for c in Units::moving() {
                assert!(sql.contains(&format!("{} = ", c.mysql)), "{sql}");
            }
        }
    }
}
