//! The Redis key layout: every key name is built here and nowhere else.
//!
//! All keys of one sale share the hash tag `{s<sale id>}`, so every script,
//! which touches one sale's keys only, runs unchanged on Redis Cluster. A
//! deployment prefix keeps two deployments (or two tests) on one Redis apart.

use crate::domain::SaleId;

/// Builds key names under one deployment prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

/// The keys of one sale, in the order the scripts take them as `KEYS`.
#[derive(Debug, Clone)]
pub struct SaleKeys {
    /// Hash: the sale's terms, stock counters and order sequence.
    pub sale: String,
    /// Hash: user id -> units the buyer holds in pending and paid orders.
    pub buyers: String,
    /// Hash: `"<user>:<idempotency key>"` -> order sequence.
    pub idem: String,
    /// Hash: order sequence -> packed order.
    pub orders: String,
    /// Sorted set: order sequence scored by payment deadline (ms).
    pub deadlines: String,
    /// Stream: flow records waiting for the reconciler.
    pub flow: String,
    /// Hash: refunds that never settled in time (seq -> requested ms|attempts).
    pub dead_refunds: String,
}

impl Keys {
    /// A key space under `prefix`, which must not contain `{` or `}` (it
    /// would break the hash tag).
    pub fn new(prefix: &str) -> anyhow::Result<Self> {
        anyhow::ensure!(
            !prefix.is_empty() && !prefix.contains(['{', '}']),
            "the key prefix must be non-empty and contain no braces"
        );
        Ok(Self {
            prefix: prefix.to_owned(),
        })
    }

    /// The deployment prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The set of sale ids loaded into Redis (read by workers to find sales).
    pub fn sales_index(&self) -> String {
        format!("{}:sales", self.prefix)
    }

    /// All keys of one sale.
    pub fn sale(&self, sale: SaleId) -> SaleKeys {
        let base = format!("{}:{{s{}}}", self.prefix, sale);
        SaleKeys {
            sale: format!("{base}:sale"),
            buyers: format!("{base}:buyers"),
            idem: format!("{base}:idem"),
            orders: format!("{base}:orders"),
            deadlines: format!("{base}:deadlines"),
            flow: format!("{base}:flow"),
            dead_refunds: format!("{base}:dead_refunds"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sale_key_shares_one_hash_tag() {
        let keys = Keys::new("fs").unwrap().sale(SaleId::new(42).unwrap());
        for k in [
            &keys.sale,
            &keys.buyers,
            &keys.idem,
            &keys.orders,
            &keys.deadlines,
            &keys.flow,
            &keys.dead_refunds,
        ] {
            let open = k.find('{').unwrap();
            let close = k.find('}').unwrap();
            assert_eq!(&k[open..=close], "{s42}", "{k}");
        }
        assert!(Keys::new("a{b").is_err());
    }
}
