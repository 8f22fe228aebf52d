//! A per-process memory of sales that Redis just answered sold out, so a
//! flood of buyers on a sold-out sale is answered without a Redis call.
//!
//! A mark lasts `ttl` at most, and this process clears it the moment one of
//! its own calls puts units back (cancel, expiry, a late payment that
//! closes, a refund): stock that comes back through this process reopens
//! the sale at once, and stock that comes back through another process is
//! seen within `ttl`.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use crate::domain::SaleId;

/// Sales marked sold out, until when.
#[derive(Debug, Default)]
pub struct SoldOut {
    ttl: Duration,
    until: RwLock<HashMap<SaleId, Instant>>,
}

impl SoldOut {
    /// Marks last `ttl` (zero turns the memory off).
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            until: RwLock::default(),
        }
    }

    /// Whether `sale` is marked sold out right now.
    pub fn is_marked(&self, sale: SaleId) -> bool {
        if self.ttl.is_zero() {
            return false;
        }
        let until = self.until.read().unwrap_or_else(|p| p.into_inner());
        until.get(&sale).is_some_and(|t| Instant::now() < *t)
    }

    /// Redis answered sold out for `sale`.
    pub fn mark(&self, sale: SaleId) {
        if self.ttl.is_zero() {
            return;
        }
        let mut until = self.until.write().unwrap_or_else(|p| p.into_inner());
        until.insert(sale, Instant::now() + self.ttl);
    }

    /// Units of `sale` came back on sale through this process.
    pub fn clear(&self, sale: SaleId) {
        let marked = {
            let until = self.until.read().unwrap_or_else(|p| p.into_inner());
            until.contains_key(&sale)
        };
        if marked {
            let mut until = self.until.write().unwrap_or_else(|p| p.into_inner());
            until.remove(&sale);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_expire_and_clear() {
        let sale = SaleId::new(1).unwrap();
        let s = SoldOut::new(Duration::from_millis(30));
        assert!(!s.is_marked(sale));
        s.mark(sale);
        assert!(s.is_marked(sale));
        s.clear(sale);
        assert!(!s.is_marked(sale));
        s.mark(sale);
        std::thread::sleep(Duration::from_millis(40));
        assert!(!s.is_marked(sale));
        let off = SoldOut::new(Duration::ZERO);
        off.mark(sale);
        assert!(!off.is_marked(sale));
    }
}
