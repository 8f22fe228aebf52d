//! The Redis key layout: every key name is built here and nowhere else.
//!
//! All keys of one sale share the hash tag `{s<sale id>}`, so every script,
//! which touches one sale's keys only, runs unchanged on Redis Cluster. A
//! deployment prefix keeps two deployments (or two tests) on one Redis apart.

use crate::domain::SaleId;

/// The Redis layout of a sale that this build reads and writes (the sale
/// hash's `layout` field, `LAYOUT` in `lua/prelude.lua`). Scripts refuse a
/// sale of another layout instead of misreading it.
pub const LAYOUT: u32 = 3;

/// Orders per bucket (`DUE_BUCKET` in `lua/prelude.lua`), of the due-queue
/// and of the orders alike: small enough that a bucket keeps Redis's
/// compact (listpack) sorted-set or hash encoding.
pub const DUE_BUCKET: u64 = 64;

/// The largest order sequence a sale can reach. Lua numbers are doubles, so
/// an integer beyond 2^53 does not survive the scripts' `tonumber` (its
/// bucket would round to another one): no sale's counter gets there, and an
/// order id beyond it names no order, answered without asking Redis.
pub const MAX_SEQ: u64 = 1 << 53;

/// The bucket numbers that can hold orders of a sale whose order counter
/// is `counter` (orders `1..=counter`): `0..=counter / DUE_BUCKET`, none
/// for a sale without orders.
pub fn order_buckets(counter: u64) -> std::ops::Range<u64> {
    match counter {
        0 => 0..0,
        c => 0..c / DUE_BUCKET + 1,
    }
}

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
    /// The orders' base name, never a key itself: the orders of bucket
    /// `n` (order seqs `n * DUE_BUCKET .. (n + 1) * DUE_BUCKET`, the same
    /// numbering as the due-queue's) live in the hash `<orders>:<n>`, order
    /// sequence -> order in the stored form of `lua/prelude.lua`; 64
    /// pending orders keep a bucket in Redis's compact hash encoding.
    pub orders: String,
    /// The due-queue's index: sorted set of bucket numbers, each scored by
    /// its bucket's earliest entry. Bucket `n` is the sorted set
    /// `<deadlines>:<n>` of the entries (payment deadlines: the order seq;
    /// refund retries: `r<seq>:<attempt>:<requested_ms>`) of orders
    /// `n * DUE_BUCKET .. (n + 1) * DUE_BUCKET`, scored by when they fall
    /// due (ms); see `lua/prelude.lua`.
    pub deadlines: String,
    /// Stream: flow records waiting for the reconciler.
    pub flow: String,
    /// Hash: refunds that never settled in time (seq -> requested ms|attempts).
    pub dead_refunds: String,
    /// Hash: reserve call id -> what the call did (`lua/reserve.lua`), so a
    /// resent call answers the first one's result and a retry key finds the
    /// order its failed request made.
    pub calls: String,
    /// String with a short expiry: written, with a WAIT, before the
    /// reconciler commits records it read (`FLASHSALE_REDIS_WAIT_REPLICAS`),
    /// so that MySQL never holds a record the replicas lack.
    pub barrier: String,
}

impl SaleKeys {
    /// The KEYS every order script takes first, in this order (the
    /// helpers of `lua/prelude.lua` name them by position): sale, buyers,
    /// orders, due-queue index, flow stream.
    pub fn order_script_keys(&self) -> [&str; 5] {
        [
            &self.sale,
            &self.buyers,
            &self.orders,
            &self.deadlines,
            &self.flow,
        ]
    }

    /// The KEYS of `lua/reserve.lua`: the order keys, the idempotency
    /// hash, the calls hash.
    pub fn reserve_keys(&self) -> [&str; 7] {
        let [a, b, c, d, e] = self.order_script_keys();
        [a, b, c, d, e, &self.idem, &self.calls]
    }

    /// The KEYS of `lua/expire.lua` and `lua/refund.lua`: the order keys
    /// and the refund dead-letter.
    pub(crate) fn with_dead_refunds(&self) -> [&str; 6] {
        let [a, b, c, d, e] = self.order_script_keys();
        [a, b, c, d, e, &self.dead_refunds]
    }

    /// The due-queue bucket that holds the entries of order `seq`.
    pub fn due_bucket(&self, seq: u64) -> String {
        self.due_bucket_no(seq / DUE_BUCKET)
    }

    /// Due-queue bucket number `n`.
    pub fn due_bucket_no(&self, n: u64) -> String {
        format!("{}:{n}", self.deadlines)
    }

    /// The orders bucket that holds order `seq`.
    pub fn orders_bucket(&self, seq: u64) -> String {
        self.orders_bucket_no(seq / DUE_BUCKET)
    }

    /// Orders bucket number `n`.
    pub fn orders_bucket_no(&self, n: u64) -> String {
        format!("{}:{n}", self.orders)
    }

    /// Both keys of bucket `n` (its due-queue sorted set and its orders
    /// hash): what a script that works on orders of that bucket declares
    /// (`declare_buckets` in `lua/prelude.lua`).
    pub fn bucket_keys(&self, n: u64) -> [String; 2] {
        [self.due_bucket_no(n), self.orders_bucket_no(n)]
    }

    /// A SCAN pattern that matches every key of the sale and no other.
    pub fn pattern(&self) -> String {
        let base = self.sale.strip_suffix(":sale").unwrap_or(&self.sale);
        let mut out = String::with_capacity(base.len() + 3);
        for c in base.chars() {
            if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                out.push('\\');
            }
            out.push(c);
        }
        out.push_str(":*");
        out
    }
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
            calls: format!("{base}:calls"),
            barrier: format!("{base}:barrier"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The constants both languages use are written once in each; this
    /// test keeps them equal.
    #[test]
    fn the_scripts_use_the_same_layout_and_bucket_size() {
        let prelude = include_str!("../../lua/prelude.lua");
        assert!(
            prelude.contains(&format!("local LAYOUT = '{LAYOUT}'\n")),
            "LAYOUT differs between lua/prelude.lua and keys.rs"
        );
        assert!(
            prelude.contains(&format!("local DUE_BUCKET = {DUE_BUCKET}\n")),
            "DUE_BUCKET differs between lua/prelude.lua and keys.rs"
        );
    }

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
            &keys.calls,
        ] {
            let open = k.find('{').unwrap();
            let close = k.find('}').unwrap();
            assert_eq!(&k[open..=close], "{s42}", "{k}");
        }
        assert!(Keys::new("a{b").is_err());
        assert_eq!(keys.due_bucket(130), "fs:{s42}:deadlines:2");
        assert_eq!(keys.orders_bucket(130), "fs:{s42}:orders:2");
        assert_eq!(
            keys.bucket_keys(0),
            ["fs:{s42}:deadlines:0", "fs:{s42}:orders:0"]
        );
        assert!(order_buckets(0).is_empty());
        assert_eq!(order_buckets(63), 0..1);
        assert_eq!(order_buckets(64), 0..2);
        assert_eq!(
            Keys::new("a*b")
                .unwrap()
                .sale(SaleId::new(7).unwrap())
                .pattern(),
            "a\\*b:{s7}:*"
        );
    }
}
