//! Validated value types for the ids and quantities that enter at the edge.
//!
//! Everything past the HTTP and CLI edge takes these types, so the inside never
//! re-checks a sale id, an order id, a user id, a quantity or an idempotency key.
//! This module owns parsing and display only; it never touches Redis or MySQL.

use std::fmt;
use std::str::FromStr;

/// Why a value from outside was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidValue(pub String);

fn parse_positive_u64(s: &str, what: &str) -> Result<u64, InvalidValue> {
    // Decimal digits only: no sign, no spaces, no leading "+".
    if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(InvalidValue(format!(
            "{what} must be a positive decimal integer"
        )));
    }
    match s.parse::<u64>() {
        Ok(0) | Err(_) => Err(InvalidValue(format!(
            "{what} must be a positive 64-bit integer"
        ))),
        Ok(v) => Ok(v),
    }
}

/// A sale's id: the MySQL row id, a positive integer, a string in JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SaleId(u64);

impl SaleId {
    /// Wraps an id that came from MySQL (always positive).
    pub fn new(id: u64) -> Result<Self, InvalidValue> {
        if id == 0 {
            return Err(InvalidValue("sale id must be positive".into()));
        }
        Ok(Self(id))
    }
    /// The numeric id.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl FromStr for SaleId {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_positive_u64(s, "sale id").map(Self)
    }
}

impl fmt::Display for SaleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A buyer's id: the JWT `sub` claim, a positive 64-bit integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(u64);

impl UserId {
    /// Wraps a positive id.
    pub fn new(id: u64) -> Result<Self, InvalidValue> {
        if id == 0 {
            return Err(InvalidValue("user id must be positive".into()));
        }
        Ok(Self(id))
    }
    /// The numeric id.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl FromStr for UserId {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_positive_u64(s, "user id").map(Self)
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// An order's id, `"<sale id>-<sequence>"`: it names its sale, so no lookup is
/// needed to find the keys that hold it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OrderId {
    sale: SaleId,
    seq: u64,
}

impl OrderId {
    /// The order with sequence number `seq` within `sale`.
    pub fn new(sale: SaleId, seq: u64) -> Self {
        Self { sale, seq }
    }
    /// The sale the order belongs to.
    pub fn sale(self) -> SaleId {
        self.sale
    }
    /// The order's sequence number within its sale (from 1).
    pub fn seq(self) -> u64 {
        self.seq
    }
}

impl FromStr for OrderId {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (sale, seq) = s
            .split_once('-')
            .ok_or_else(|| InvalidValue("order id must look like <sale id>-<number>".into()))?;
        Ok(Self {
            sale: sale.parse()?,
            seq: parse_positive_u64(seq, "order number")?,
        })
    }
}

impl fmt::Display for OrderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.sale, self.seq)
    }
}

/// Units in one reservation: 1 to [`Qty::MAX`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Qty(u32);

impl Qty {
    /// The largest quantity one request may ask for.
    pub const MAX: u32 = 10_000;

    /// Checks the range.
    pub fn new(q: i64) -> Result<Self, InvalidValue> {
        if (1..=Self::MAX as i64).contains(&q) {
            Ok(Self(q as u32))
        } else {
            Err(InvalidValue(format!(
                "qty must be between 1 and {}",
                Self::MAX
            )))
        }
    }
    /// The number of units.
    pub fn get(self) -> u32 {
        self.0
    }
}

impl Default for Qty {
    fn default() -> Self {
        Self(1)
    }
}

/// A client's `Idempotency-Key`: 1 to 64 characters of `[A-Za-z0-9_-]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// The key as sent.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for IdempotencyKey {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok = (1..=64).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(InvalidValue(
                "Idempotency-Key must be 1 to 64 characters of A-Z, a-z, 0-9, '_' and '-'".into(),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_strictly() {
        assert_eq!("42".parse::<SaleId>().unwrap().get(), 42);
        for bad in ["", "0", "-1", "+4", "4 ", "abc", "18446744073709551616"] {
            assert!(bad.parse::<SaleId>().is_err(), "{bad:?}");
        }
        let o: OrderId = "42-17".parse().unwrap();
        assert_eq!((o.sale().get(), o.seq()), (42, 17));
        assert_eq!(o.to_string(), "42-17");
        for bad in ["42", "42-", "-17", "42-0", "42-1-2", "x-1"] {
            assert!(bad.parse::<OrderId>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn qty_and_keys_have_ranges() {
        assert!(Qty::new(0).is_err());
        assert!(Qty::new(Qty::MAX as i64 + 1).is_err());
        assert_eq!(Qty::new(3).unwrap().get(), 3);
        assert!("abc_-1".parse::<IdempotencyKey>().is_ok());
        assert!("".parse::<IdempotencyKey>().is_err());
        assert!("a b".parse::<IdempotencyKey>().is_err());
        assert!("x".repeat(65).parse::<IdempotencyKey>().is_err());
    }
}
