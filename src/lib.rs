//! flashsale: a flash-sale (seckill) engine. Redis carries the hot path in
//! atomic Lua scripts; MySQL is the system of record.
//!
//! Modules in data-flow order (rustfmt keeps the declarations below in
//! alphabetical order):
//! 1. [`http`]: a request comes in; [`domain`] values are parsed at the edge.
//! 2. [`engine`]: the Redis side: key layout, one typed call per Lua script
//!    (`lua/`), reservations combined per sale; [`units`] are the stock
//!    counters both stores keep.
//! 3. [`sales`]: putting a sale on, in MySQL and then Redis.
//! 4. [`workers`]: expiry, the reconciler (flow records into MySQL), the
//!    guard and rebuild after Redis lost data, the sweep, retirement, the
//!    live list, all under one supervisor.
//! 5. [`db`]: MySQL, the record: migrations, the ledger, the queries.
//! 6. [`audit`]: Redis, the flow backlog and MySQL compared, and repaired.
//! 7. Around them: [`config`], [`startup`] (building and running a
//!    process), [`telemetry`], [`cli`], [`demo`].
// The engine's async state machines (acknowledged writes box a future per
// call) run deeper than the compiler's default query depth.
#![recursion_limit = "256"]

/// RabbitMQ connections and the broker objects the API names.
pub mod amqp;
/// The audit: Redis, the flow backlog and MySQL compared, and repaired.
pub mod audit;
/// The command line.
pub mod cli;
/// Configuration by flags and environment.
pub mod config;
/// MySQL: pool, migrations, queries.
pub mod db;
/// A whole sale, end to end, on the local services.
pub mod demo;
/// Validated ids and quantities, parsed once at the edge.
pub mod domain;
/// The Redis side: key layout and typed calls of the Lua scripts.
pub mod engine;
/// Downstream events: the body the outbox holds and the relay publishes.
pub mod events;
/// The HTTP API: routes, errors, authentication, front-door limits.
pub mod http;
/// The loyalty-points consumer and its ledger.
pub mod points;
/// Putting a sale on, in MySQL and Redis.
pub mod sales;
/// Building and running a `serve` process.
pub mod startup;
/// Logs and metrics.
pub mod telemetry;
/// A sale's stock counters, with their Redis and MySQL names in one list.
pub mod units;
/// Background workers: expiry, reconciler, sweep, the live list of sales
/// and retirement of old sales.
pub mod workers;
