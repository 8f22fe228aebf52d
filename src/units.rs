//! A sale's stock counters, in one type: [`Units`].
//!
//! The same eight counters live in three places: the sale hash in Redis
//! (`lua/prelude.lua` keeps them), the `inventory` row in MySQL, and the
//! audit's report. The list in this file is the one place that names each
//! counter on every side (its Rust/JSON name, its Redis hash field and its
//! MySQL column) and says whether orders move it. Everything else iterates
//! [`Units::COUNTERS`] or reads the names from [`REDIS`] and [`MYSQL`], so
//! adding a counter is one line here plus its column (a migration), its
//! field in the Lua scripts that move it, and its arm in [`Units::count`] /
//! [`Units::moved_by`].
//!
//! It is a module of its own, beside `domain`, because both `engine` (the
//! Redis side) and `db` (the MySQL side) use it and neither owns the other's
//! names; `domain` never touches either store.

use std::fmt;
use std::ops::{Add, AddAssign};

use crate::engine::{FlowEvent, FlowRecord, Order, OrderStatus};

/// One stock counter: its names on each side and how to reach it in a
/// [`Units`].
#[derive(Clone, Copy)]
pub struct Counter {
    /// The Rust field, and the name in reports and JSON.
    pub name: &'static str,
    /// The field of the sale hash in Redis.
    pub redis: &'static str,
    /// The column of the `inventory` table in MySQL.
    pub mysql: &'static str,
    /// Whether orders move it (false: set once, when the sale is put on).
    pub moves: bool,
    get: fn(&Units) -> i64,
    get_mut: fn(&mut Units) -> &mut i64,
}

impl Counter {
    /// Its value in `u`.
    pub fn of(&self, u: &Units) -> i64 {
        (self.get)(u)
    }

    /// Its value in `u`, to change.
    pub fn of_mut<'a>(&self, u: &'a mut Units) -> &'a mut i64 {
        (self.get_mut)(u)
    }
}

impl fmt::Debug for Counter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Counter")
            .field("name", &self.name)
            .field("redis", &self.redis)
            .field("mysql", &self.mysql)
            .field("moves", &self.moves)
            .finish()
    }
}

macro_rules! units {
    (@moves fixed) => { false };
    (@moves moving) => { true };
    ($( $(#[$doc:meta])* $field:ident: redis $redis:literal, mysql $mysql:literal, $moves:ident; )*) => {
        /// Units of a sale's stock by counter: Redis's counters, MySQL's
        /// inventory, what orders add up to, or what changes move (then the
        /// total is 0: no order moves it).
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
        pub struct Units {
            $( $(#[$doc])* pub $field: i64, )*
        }

        /// One name per counter (see [`REDIS`] and [`MYSQL`]).
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub struct Names {
            $( $(#[$doc])* pub $field: &'static str, )*
        }

        /// Each counter's field in the Redis sale hash.
        pub const REDIS: Names = Names { $( $field: $redis, )* };

        /// Each counter's column in MySQL's `inventory` table.
        pub const MYSQL: Names = Names { $( $field: $mysql, )* };

        impl Units {
            /// Every counter, in a fixed order (the order of reports,
            /// repairs and SQL column lists).
            pub const COUNTERS: &'static [Counter] = &[
                $( Counter {
                    name: stringify!($field),
                    redis: $redis,
                    mysql: $mysql,
                    moves: units!(@moves $moves),
                    get: |u| u.$field,
                    get_mut: |u| &mut u.$field,
                }, )*
            ];
        }

        impl AddAssign for Units {
            fn add_assign(&mut self, o: Self) {
                $( self.$field += o.$field; )*
            }
        }
    };
}

units! {
    /// Units put on sale.
    total: redis "total", mysql "total", fixed;
    /// Units on sale now.
    available: redis "avail", mysql "available", moving;
    /// Units in pending orders.
    pending: redis "pending", mysql "pending", moving;
    /// Units in paid (and refund_pending) orders.
    paid: redis "paid", mysql "paid", moving;
    /// Units of cancelled orders.
    cancelled: redis "cancelled", mysql "cancelled", moving;
    /// Units of closed orders.
    closed: redis "closed", mysql "closed", moving;
    /// Units refunded.
    refunded: redis "refunded", mysql "refunded", moving;
    /// Refunded units that went back on sale.
    restocked: redis "restocked", mysql "restocked", moving;
}

impl Add for Units {
    type Output = Self;

    fn add(mut self, o: Self) -> Self {
        self += o;
        self
    }
}

impl fmt::Display for Units {
    /// `total=10 available=4 ...`, every counter by its name.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (name, v)) in self.fields().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{name}={v}")?;
        }
        Ok(())
    }
}

impl Units {
    /// The counters that orders move (all but the total).
    pub fn moving() -> impl Iterator<Item = &'static Counter> {
        Self::COUNTERS.iter().filter(|c| c.moves)
    }

    /// Units with each counter's value from `value`.
    pub fn from_fn(mut value: impl FnMut(&Counter) -> i64) -> Self {
        let mut u = Self::default();
        for c in Self::COUNTERS {
            *c.of_mut(&mut u) = value(c);
        }
        u
    }

    /// As [`Units::from_fn`], for values that may fail to read.
    pub fn try_from_fn<E>(mut value: impl FnMut(&Counter) -> Result<i64, E>) -> Result<Self, E> {
        let mut u = Self::default();
        for c in Self::COUNTERS {
            *c.of_mut(&mut u) = value(c)?;
        }
        Ok(u)
    }

    /// The counters' names (reports, JSON) and values, in a fixed order.
    pub fn fields(&self) -> impl Iterator<Item = (&'static str, i64)> + '_ {
        Self::COUNTERS.iter().map(move |c| (c.name, c.of(self)))
    }

    /// The counters as Redis sale hash fields and values.
    pub fn redis_fields(&self) -> impl Iterator<Item = (&'static str, String)> + '_ {
        Self::COUNTERS
            .iter()
            .map(move |c| (c.redis, c.of(self).to_string()))
    }

    /// A new sale's counters: all of `total` on sale.
    pub fn opening(total: i64) -> Self {
        Self {
            total,
            available: total,
            ..Self::default()
        }
    }

    /// available + pending + paid + refunded - restocked, which must be the
    /// total (the conservation every audit checks).
    pub fn accounted(&self) -> i64 {
        self.available + self.pending + self.paid + self.refunded - self.restocked
    }

    /// Sets `available` to what the total leaves after the other counters
    /// (the conservation, solved for it).
    pub fn derive_available(&mut self) {
        self.available = self.total - self.pending - self.paid - self.refunded + self.restocked;
    }

    /// Adds `qty` units of an order in `status` to the sums by status
    /// (`restocked`: of a refunded order, the units that went back on sale);
    /// `available` is left to [`Units::derive_available`].
    pub fn count(&mut self, status: OrderStatus, qty: i64, restocked: i64) {
        match status {
            OrderStatus::Pending => self.pending += qty,
            OrderStatus::Paid | OrderStatus::RefundPending => self.paid += qty,
            OrderStatus::Cancelled => self.cancelled += qty,
            OrderStatus::Closed => self.closed += qty,
            OrderStatus::Refunded => {
                self.refunded += qty;
                self.restocked += restocked;
            }
        }
    }

    /// Adds one order's units to the sums by status (`end_ms`: the sale's
    /// end; a refund before it restocked), and derives `available` again.
    pub fn count_order(&mut self, o: &Order, end_ms: i64) {
        let q = i64::from(o.qty);
        let restocked = if o.refunded_ms.is_some_and(|r| r < end_ms) {
            q
        } else {
            0
        };
        self.count(o.status, q, restocked);
        self.derive_available();
    }

    /// What one change of `qty` units moves (`restocked`: a refund put the
    /// units back on sale).
    pub fn moved_by(event: FlowEvent, qty: i64, restocked: bool) -> Self {
        let q = qty;
        let mut d = Self::default();
        match event {
            FlowEvent::Reserve => {
                d.available = -q;
                d.pending = q;
            }
            FlowEvent::Pay => {
                d.pending = -q;
                d.paid = q;
            }
            FlowEvent::Cancel => {
                d.pending = -q;
                d.available = q;
                d.cancelled = q;
            }
            FlowEvent::Close => {
                d.pending = -q;
                d.available = q;
                d.closed = q;
            }
            FlowEvent::RefundRequest | FlowEvent::LatePay => {}
            FlowEvent::Refund => {
                d.paid = -q;
                d.refunded = q;
                if restocked {
                    d.available = q;
                    d.restocked = q;
                }
            }
        }
        d
    }

    /// What `record` moves.
    pub fn of_flow(record: &FlowRecord) -> Self {
        Self::moved_by(record.event, i64::from(record.order.qty), record.restocked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_names_each_counter_once_on_every_side() {
        for side in [
            |c: &Counter| c.name,
            |c: &Counter| c.redis,
            |c: &Counter| c.mysql,
        ] {
            let mut names: Vec<&str> = Units::COUNTERS.iter().map(side).collect();
            names.sort_unstable();
            names.dedup();
            assert_eq!(names.len(), Units::COUNTERS.len());
        }
        assert_eq!(REDIS.available, "avail");
        assert_eq!(MYSQL.available, "available");
        assert_eq!(Units::moving().count(), Units::COUNTERS.len() - 1);
    }

    #[test]
    fn the_scripts_keep_the_same_counters() {
        // lua/prelude.lua's header lists the counters the scripts move.
        let prelude: Vec<&str> = include_str!("../lua/prelude.lua")
            .lines()
            .map(|l| l.trim_start_matches('-').trim())
            .collect();
        let names: Vec<&str> = Units::moving().map(|c| c.redis).collect();
        let listed = format!("unit counters ({})", names.join(", "));
        assert!(
            prelude.join(" ").contains(&listed),
            "lua/prelude.lua does not list {listed:?}"
        );
    }

    #[test]
    fn every_change_keeps_the_conservation() {
        let mut u = Units::opening(10);
        for (event, restocked) in [
            (FlowEvent::Reserve, false),
            (FlowEvent::Pay, false),
            (FlowEvent::RefundRequest, false),
            (FlowEvent::Refund, true),
            (FlowEvent::Reserve, false),
            (FlowEvent::Cancel, false),
            (FlowEvent::Reserve, false),
            (FlowEvent::Close, false),
        ] {
            u += Units::moved_by(event, 3, restocked);
            assert_eq!(u.accounted(), u.total, "after {event:?}: {u}");
        }
        assert_eq!(
            u,
            Units {
                total: 10,
                available: 10,
                refunded: 3,
                restocked: 3,
                cancelled: 3,
                closed: 3,
                ..Units::default()
            }
        );
        assert_eq!(
            u.to_string(),
            "total=10 available=10 pending=0 paid=0 cancelled=3 closed=3 refunded=3 restocked=3"
        );
    }
}
