//! What the audit finds: each kind of finding ([`FindingKind`]) with the
//! repair it proposes and the side that repair takes as the truth, and the
//! small builder ([`NewFinding`]) the checks write findings with.
//!
//! A new check adds its kind to the list below (its name is part of the
//! JSON output and of `repair_log`), says its default repair and truth in
//! [`FindingKind::default_repair`], and writes
//! `cx.find(kind, message)...push()` where it looks.

use std::fmt;

use crate::domain::{OrderId, SaleId};

/// Which side a repair takes as the truth.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Truth {
    /// Redis's orders (the hot path accepted every change there first).
    RedisOrders,
    /// MySQL (the only witness left of an order Redis lost).
    Mysql,
    /// Nothing to take sides on: the fix restarts stalled work.
    Neither,
}

impl Truth {
    /// The side as `repair_log` and the JSON spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Truth::RedisOrders => "redis_orders",
            Truth::Mysql => "mysql",
            Truth::Neither => "neither",
        }
    }

    /// Why this side is taken as the truth.
    pub fn why(&self) -> &'static str {
        match self {
            Truth::RedisOrders => {
                "Redis's orders: every change was accepted there first, atomically with its flow record"
            }
            Truth::Mysql => "MySQL: Redis lost this, and MySQL is the only witness left",
            Truth::Neither => "no side: the fix restarts work that stalled",
        }
    }
}

/// A repair the audit proposes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Fix {
    /// Write the order to MySQL as Redis holds it, then recompute the
    /// sale's MySQL inventory from its orders.
    WriteOrderToMysql {
        /// The order's seq.
        seq: u64,
        /// Also mark the order settled in Redis (its flow record is lost).
        mark_settled: bool,
    },
    /// Recompute the sale's MySQL inventory from its MySQL orders.
    RecomputeMysqlInventory,
    /// Put the order back into Redis as MySQL holds it.
    RestoreOrderInRedis {
        /// The order's seq.
        seq: u64,
    },
    /// Set Redis's counters to what Redis's orders add up to.
    RecomputeRedisCounters,
    /// Set a buyer's units in Redis to what their orders hold.
    SetBuyerUnits {
        /// The buyer.
        user: u64,
        /// The units their orders hold.
        units: i64,
    },
    /// Remove a due-queue entry that nothing waits on.
    DropDueEntry {
        /// The entry.
        member: String,
    },
    /// Give a pending order its missing deadline entry back.
    AddDeadline {
        /// The order's seq.
        seq: u64,
    },
    /// Run the expiry for the sale now.
    RunExpiry,
    /// Put a dead-lettered refund back on the retry queue.
    RequeueRefund {
        /// The order's seq.
        seq: u64,
    },
    /// Fence the sale and rebuild it from MySQL (what Redis lost).
    LoadSale,
    /// Write the outbox rows the order owes for its state in MySQL.
    WriteOutbox {
        /// The order's seq.
        seq: u64,
    },
}

macro_rules! finding_kinds {
    ($( $(#[$doc:meta])* $kind:ident = $name:literal, )*) => {
        /// The kinds of finding, each a stable name in the JSON output, the
        /// human report (`[name]`) and `repair_log`.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
        #[serde(rename_all = "snake_case")]
        pub enum FindingKind {
            $( $(#[$doc])* $kind, )*
        }

        impl FindingKind {
            /// Every kind.
            pub const ALL: &'static [FindingKind] = &[$( FindingKind::$kind, )*];

            /// The kind's stable name.
            pub fn as_str(self) -> &'static str {
                match self {
                    $( FindingKind::$kind => $name, )*
                }
            }
        }
    };
}

finding_kinds! {
    // The moment: which sale there is to compare.
    /// Redis holds a sale MySQL does not.
    SaleMissingInMysql = "sale_missing_in_mysql",
    /// MySQL holds a sale Redis does not.
    SaleMissingInRedis = "sale_missing_in_redis",
    /// Redis holds another database's keys under the sale's name.
    SaleForeign = "sale_foreign",
    /// The sale is fenced (the guard rebuilds it).
    SaleFenced = "sale_fenced",
    /// Redis is behind MySQL (the guard fences and rebuilds it).
    RedisBehind = "redis_behind",
    /// An admin's control (pause, end) is in one store and not the other.
    SaleControlMismatch = "sale_control_mismatch",
    // The counters, at one moment.
    /// Redis's counters do not add up to the total.
    RedisConservation = "redis_conservation",
    /// A Redis counter below zero.
    NegativeStock = "negative_stock",
    /// MySQL's inventory does not add up to its orders.
    MysqlInventory = "mysql_inventory",
    /// Redis's counters differ from MySQL's inventory plus the backlog.
    RecordDrift = "record_drift",
    // Order by order.
    /// Redis's order counter is below MySQL's highest order.
    OrderSeqBehind = "order_seq_behind",
    /// Redis holds an order it cannot read.
    OrderUnreadable = "order_unreadable",
    /// A pending order past its deadline by more than the grace.
    OverduePending = "overdue_pending",
    /// An order both paid and closed.
    PaidAndClosed = "paid_and_closed",
    /// MySQL holds an order Redis does not.
    OrderMissingInRedis = "order_missing_in_redis",
    /// An unsettled order's last flow record is neither in the stream nor applied.
    FlowRecordLost = "flow_record_lost",
    /// Redis holds a settled order MySQL does not.
    OrderMissingInMysql = "order_missing_in_mysql",
    /// A settled order differs between Redis and MySQL.
    OrderMismatch = "order_mismatch",
    /// A pending order without its deadline entry.
    DeadlineMissing = "deadline_missing",
    // Checks that need a still sale, and the queues.
    /// Redis's counters differ from what its orders add up to.
    RedisCounters = "redis_counters",
    /// A buyer holds more units than the limit (or fewer than none).
    BuyerOverLimit = "buyer_over_limit",
    /// A buyer's units differ from what their orders hold.
    BuyerUnits = "buyer_units",
    /// A due-queue entry no order waits on.
    StaleDueEntry = "stale_due_entry",
    /// A refund that never settled was dead-lettered.
    RefundDeadLettered = "refund_dead_lettered",
    /// A flow record the reconciler refused.
    QuarantinedRecord = "quarantined_record",
    /// Flow records wait for MySQL longer than the grace.
    BacklogStale = "backlog_stale",
    // Downstream events.
    /// A paid or refunded order without its outbox row.
    OutboxMissing = "outbox_missing",
    /// Events wait for the broker longer than the grace (a broker is named).
    OutboxBehind = "outbox_behind",
    // Retired sales.
    /// A retired sale with orders still waiting.
    RetiredWithWork = "retired_with_work",
    /// A retired sale that Redis holds as live.
    RetiredSaleLiveInRedis = "retired_sale_live_in_redis",
    /// Flow records of a retired sale wait in Redis.
    RetiredSaleBacklog = "retired_sale_backlog",
}

impl fmt::Display for FindingKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a finding is about, beyond its sale: what its default repair needs.
#[derive(Debug, Clone, Default)]
pub struct About {
    /// The order's seq.
    pub seq: Option<u64>,
    /// The buyer, and the units their orders hold.
    pub buyer: Option<(u64, i64)>,
    /// The due-queue entry.
    pub entry: Option<String>,
}

impl FindingKind {
    /// The repair this kind proposes for a finding about `about`, and the
    /// side it takes as the truth. (None, None): a person must look; a
    /// repair of None beside a truth: `about` lacks what the repair needs.
    pub fn default_repair(self, about: &About) -> (Option<Fix>, Option<Truth>) {
        use FindingKind::*;
        use Truth::*;
        let seq = about.seq;
        let (fix, truth) = match self {
            OrderMismatch | OrderMissingInMysql | FlowRecordLost => (
                seq.map(|seq| Fix::WriteOrderToMysql {
                    seq,
                    // The lost record would have marked it settled.
                    mark_settled: self == FlowRecordLost,
                }),
                RedisOrders,
            ),
            MysqlInventory | RecordDrift => (Some(Fix::RecomputeMysqlInventory), RedisOrders),
            RedisConservation | NegativeStock | RedisCounters => {
                (Some(Fix::RecomputeRedisCounters), RedisOrders)
            }
            BuyerUnits | BuyerOverLimit => (
                about
                    .buyer
                    .map(|(user, units)| Fix::SetBuyerUnits { user, units }),
                RedisOrders,
            ),
            StaleDueEntry => (
                about
                    .entry
                    .clone()
                    .map(|member| Fix::DropDueEntry { member }),
                RedisOrders,
            ),
            DeadlineMissing => (seq.map(|seq| Fix::AddDeadline { seq }), RedisOrders),
            OrderMissingInRedis => (seq.map(|seq| Fix::RestoreOrderInRedis { seq }), Mysql),
            SaleMissingInRedis => (Some(Fix::LoadSale), Mysql),
            OverduePending => (Some(Fix::RunExpiry), Neither),
            RefundDeadLettered => (seq.map(|seq| Fix::RequeueRefund { seq }), Neither),
            OutboxMissing => (seq.map(|seq| Fix::WriteOutbox { seq }), Mysql),
            SaleMissingInMysql
            | SaleForeign
            | SaleFenced
            | RedisBehind
            | SaleControlMismatch
            | OrderSeqBehind
            | OrderUnreadable
            | PaidAndClosed
            | QuarantinedRecord
            | BacklogStale
            | OutboxBehind
            | RetiredWithWork
            | RetiredSaleLiveInRedis
            | RetiredSaleBacklog => return (None, None),
        };
        (fix, Some(truth))
    }

    /// The side this kind's repair takes as the truth (None: a person must
    /// look).
    pub fn truth(self) -> Option<Truth> {
        self.default_repair(&About::default()).1
    }
}

/// One thing that does not hold.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Finding {
    /// A stable name of the check.
    pub kind: FindingKind,
    /// The sale.
    pub sale_id: String,
    /// The order, when the finding is about one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order_id: Option<String>,
    /// What is wrong, with the numbers on each side.
    pub message: String,
    /// Redis's side.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis: Option<serde_json::Value>,
    /// MySQL's side.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mysql: Option<serde_json::Value>,
    /// The proposed repair (none: a person must look).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<Fix>,
    /// Which side the repair takes as the truth.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub truth: Option<Truth>,
}

/// A finding being written: its kind proposes the repair and the truth,
/// the check adds what it knows, and [`NewFinding::push`] records it.
#[must_use = "a finding is recorded by .push()"]
pub struct NewFinding<'a> {
    into: &'a mut Vec<Finding>,
    sale: SaleId,
    kind: FindingKind,
    message: String,
    about: About,
    redis: Option<serde_json::Value>,
    mysql: Option<serde_json::Value>,
    fix: Option<Option<Fix>>,
    truth: Option<Option<Truth>>,
}

impl<'a> NewFinding<'a> {
    /// A finding of `kind` about `sale`, to be pushed onto `into`.
    pub fn new(
        into: &'a mut Vec<Finding>,
        sale: SaleId,
        kind: FindingKind,
        message: impl Into<String>,
    ) -> Self {
        Self {
            into,
            sale,
            kind,
            message: message.into(),
            about: About::default(),
            redis: None,
            mysql: None,
            fix: None,
            truth: None,
        }
    }

    /// About the order with this seq.
    pub fn order(self, seq: u64) -> Self {
        self.order_if(Some(seq))
    }

    /// About the order with this seq, when there is one.
    pub fn order_if(mut self, seq: Option<u64>) -> Self {
        self.about.seq = seq;
        self
    }

    /// About a buyer, whose orders hold `units` (what a repair sets).
    pub fn buyer(mut self, user: u64, units: i64) -> Self {
        self.about.buyer = Some((user, units));
        self
    }

    /// About a due-queue entry.
    pub fn entry(mut self, member: impl Into<String>) -> Self {
        self.about.entry = Some(member.into());
        self
    }

    /// Redis's side.
    pub fn redis(mut self, v: serde_json::Value) -> Self {
        self.redis = Some(v);
        self
    }

    /// MySQL's side, when there is one.
    pub fn mysql_if(mut self, v: Option<serde_json::Value>) -> Self {
        self.mysql = v;
        self
    }

    /// MySQL's side.
    pub fn mysql(self, v: serde_json::Value) -> Self {
        self.mysql_if(Some(v))
    }

    /// Another repair than the kind's default (`None`: none automatic).
    pub fn fix(mut self, fix: Option<Fix>) -> Self {
        self.fix = Some(fix);
        self
    }

    /// Another truth than the kind's (`None`: no side).
    pub fn truth(mut self, truth: Option<Truth>) -> Self {
        self.truth = Some(truth);
        self
    }

    /// Records the finding.
    pub fn push(self) {
        let (fix, truth) = self.kind.default_repair(&self.about);
        let fix = self.fix.unwrap_or(fix);
        let truth = self.truth.unwrap_or(truth);
        self.into.push(Finding {
            kind: self.kind,
            sale_id: self.sale.to_string(),
            order_id: self
                .about
                .seq
                .map(|s| OrderId::new(self.sale, s).to_string()),
            message: self.message,
            redis: self.redis,
            mysql: self.mysql,
            fix,
            truth,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_serializes_as_its_name() {
        for k in FindingKind::ALL {
            assert_eq!(serde_json::to_value(k).unwrap(), k.as_str());
        }
    }

    #[test]
    fn a_kind_with_a_truth_proposes_a_repair_and_one_without_none() {
        let about = About {
            seq: Some(3),
            buyer: Some((7, 1)),
            entry: Some("3".into()),
        };
        for k in FindingKind::ALL {
            let (fix, truth) = k.default_repair(&about);
            assert_eq!(truth.is_some(), fix.is_some(), "{k}");
            assert_eq!(truth, k.truth(), "{k}");
        }
    }

    #[test]
    fn the_builder_fills_in_the_kinds_repair() {
        let sale = SaleId::new(4).unwrap();
        let mut out = Vec::new();
        NewFinding::new(&mut out, sale, FindingKind::FlowRecordLost, "lost")
            .order(9)
            .push();
        NewFinding::new(&mut out, sale, FindingKind::BuyerOverLimit, "over")
            .buyer(7, 2)
            .fix(None)
            .push();
        NewFinding::new(&mut out, sale, FindingKind::MysqlInventory, "inv")
            .truth(Some(Truth::Mysql))
            .push();
        let json = serde_json::to_value(&out).unwrap();
        assert_eq!(
            json,
            serde_json::json!([
                {"kind": "flow_record_lost", "sale_id": "4", "order_id": "4-9", "message": "lost",
                 "fix": {"action": "write_order_to_mysql", "seq": 9, "mark_settled": true},
                 "truth": "redis_orders"},
                {"kind": "buyer_over_limit", "sale_id": "4", "message": "over",
                 "truth": "redis_orders"},
                {"kind": "mysql_inventory", "sale_id": "4", "message": "inv",
                 "fix": {"action": "recompute_mysql_inventory"}, "truth": "mysql"},
            ])
        );
    }
}
