//! Logs (tracing) and metrics (Prometheus text format on `/metrics`).
//!
//! Each app instance owns its registry, so several instances in one process
//! (as in the tests) keep their counts apart. Nothing here decides anything.

use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Starts the process's log output on stderr: `RUST_LOG` filters (default
/// `info`), `FLASHSALE_LOG_FORMAT=json` switches to one JSON object per line.
pub fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("FLASHSALE_LOG_FORMAT").is_ok_and(|f| f == "json");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    // A second initialisation (tests) is harmless and ignored.
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Labels of a request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The matched route template.
    pub route: &'static str,
    /// The HTTP method.
    pub method: &'static str,
    /// The response status.
    pub status: u16,
}

/// Labels of a per-route histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// The matched route template.
    pub route: &'static str,
}

/// The route template as a `&'static str` label: each distinct template is
/// stored once for the life of the process (the router has a fixed few), so
/// labelling a request allocates nothing.
pub fn route_label(template: &str) -> &'static str {
    static ROUTES: std::sync::RwLock<Vec<&'static str>> = std::sync::RwLock::new(Vec::new());
    let find = |routes: &[&'static str]| routes.iter().copied().find(|r| *r == template);
    if let Some(r) = find(&ROUTES.read().unwrap_or_else(|p| p.into_inner())) {
        return r;
    }
    let mut routes = ROUTES.write().unwrap_or_else(|p| p.into_inner());
    find(&routes).unwrap_or_else(|| {
        let r: &'static str = Box::leak(template.to_owned().into_boxed_str());
        routes.push(r);
        r
    })
}

/// The HTTP method as a label (`OTHER` for extension methods).
pub fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

/// Labels of an order event counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    /// `paid`, `cancelled` or `closed`.
    pub event: &'static str,
}

/// Labels of an outcome counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// What happened (`created`, `sold_out`, ...).
    pub outcome: &'static str,
}

/// Labels of a store's health gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DependencyLabels {
    /// `redis` or `mysql`.
    pub dependency: &'static str,
}

/// Labels of a role's health gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoleLabels {
    /// `http`, `expiry`, `reconciler`, `sweep`, ...
    pub role: &'static str,
}

/// Labels of a rate-limit counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScopeLabels {
    /// `buyer` or `address`.
    pub scope: &'static str,
}

/// The service's metrics.
pub struct Metrics {
    /// Tells this instance's handles apart in the per-thread cache of
    /// [`Metrics::request`] and [`Metrics::reservation`].
    id: u64,
    registry: Mutex<Registry>,
    /// Requests by route, method and status.
    pub requests: Family<RequestLabels, Counter>,
    /// Request latency by route.
    pub latency: Family<RouteLabels, Histogram>,
    /// Reservation attempts by outcome.
    pub reservations: Family<OutcomeLabels, Counter>,
    /// Orders that reached a state, by state (this instance's share).
    pub order_events: Family<EventLabels, Counter>,
    /// Close time minus payment deadline of orders closed by expiry workers.
    pub expiry_lateness: Histogram,
    /// Deadline entries already due and not yet claimed, at the last look.
    pub expiry_due: Gauge,
    /// Reconciler transactions committed.
    pub reconciler_batches: Counter,
    /// Flow records applied to MySQL.
    pub reconciler_rows: Counter,
    /// Reconciler steps that failed and were retried.
    pub reconciler_retries: Counter,
    /// Flow records the reconciler refused and quarantined.
    pub flow_quarantined: Counter,
    /// Flow records not yet in MySQL, at the last look.
    pub reconciler_backlog: Gauge,
    /// Age of the oldest flow record not yet in MySQL, in ms.
    pub reconciler_lag_ms: Gauge,
    /// Orders the sweep closed in MySQL because Redis no longer knew them.
    pub sweep_corrections: Counter,
    /// Orders the sweep found still pending in Redis far past their deadline.
    pub sweep_overdue_in_redis: Counter,
    /// Refunds carried out, by when (`immediate` or `after_settlement`).
    pub refunds: Family<OutcomeLabels, Counter>,
    /// Refunds waiting for their orders to settle, at the last look.
    pub refunds_pending: Gauge,
    /// Refunds moved to the dead-letter.
    pub refunds_dead_lettered: Counter,
    /// Time from a refund's request to its completion.
    pub refund_wait: Histogram,
    /// Whether each store answered the last readiness probe (1) or not (0).
    pub dependency_up: Family<DependencyLabels, Gauge>,
    /// Whether `/readyz` answers 200 (1) or 503 (0), as of the last probe.
    pub ready: Gauge,
    /// Whether each role of this process runs (1) or has stopped (0).
    pub role_up: Family<RoleLabels, Gauge>,
    /// Restarts of each role after it panicked or ended by itself.
    pub role_restarts: Family<RoleLabels, Counter>,
    /// Requests refused by a rate limit, by scope.
    pub rate_limited: Family<ScopeLabels, Counter>,
    /// HTTP connections open.
    pub http_connections: Gauge,
    /// Reserve requests answered 5xx with a retry key (the outcome unknown
    /// to this process when it answered).
    pub reserve_unsure: Counter,
    /// The live list and retirement.
    pub live: LiveMetrics,
    /// Sales fenced and rebuilt after Redis lost data, and orders lost.
    pub loss: LossMetrics,
    /// The outbox, the relay and the points consumer.
    pub events: EventMetrics,
    /// The live sales' stock and state, read from Redis at scrape time.
    pub sales: SaleMetrics,
}

/// Labels of a per-sale series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SaleLabels {
    /// The sale id.
    pub sale_id: u64,
}

/// Labels of a sale's units by where they stand.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SaleUnitsLabels {
    /// The sale id.
    pub sale_id: u64,
    /// `pending`, `paid`, `cancelled`, `closed`, `refunded`, `restocked`.
    pub status: &'static str,
}

/// Labels of a sale's state series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SaleStateLabels {
    /// The sale id.
    pub sale_id: u64,
    /// `upcoming`, `open`, `paused`, `sold_out` or `ended`.
    pub state: &'static str,
}

/// The live sales as Redis holds them, read when `/metrics` is scraped
/// (every instance serving HTTP reports the same values: aggregate them
/// with `max by (sale_id)`). A sale that leaves the live list, or that
/// Redis cannot answer for (fenced, or Redis down), has no series.
#[derive(Default)]
pub struct SaleMetrics {
    /// Units put on sale.
    pub stock_total: Family<SaleLabels, Gauge>,
    /// Units still on sale.
    pub stock_available: Family<SaleLabels, Gauge>,
    /// Units by where they stand.
    pub units: Family<SaleUnitsLabels, Gauge>,
    /// 1 for the sale's state now, 0 for the others.
    pub state: Family<SaleStateLabels, Gauge>,
    /// Held while the families are cleared, filled and rendered, so that
    /// two scrapes at once never show a half-filled set.
    pub(crate) refresh: Mutex<()>,
}

/// Every state a sale's `state` series reports.
pub const SALE_STATES: [&str; 5] = ["upcoming", "open", "paused", "sold_out", "ended"];

impl SaleMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "sale_stock_total",
            "Units put on sale, per live sale (read from Redis at scrape time)",
            self.stock_total.clone(),
        );
        registry.register(
            "sale_stock_available",
            "Units still on sale, per live sale (read from Redis at scrape time)",
            self.stock_available.clone(),
        );
        registry.register(
            "sale_units",
            "Units of a live sale by where they stand: pending, paid, cancelled, closed, refunded, restocked",
            self.units.clone(),
        );
        registry.register(
            "sale_state",
            "1 for a live sale's state now (upcoming, open, paused, sold_out, ended), 0 for the others",
            self.state.clone(),
        );
    }

    fn clear(&self) {
        self.stock_total.clear();
        self.stock_available.clear();
        self.units.clear();
        self.state.clear();
    }
}

/// Labels of a fence counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FenceLabels {
    /// `missing`, `behind`, `foreign`, `rebuilding`.
    pub reason: String,
}

/// Redis losing data: what the guard fenced, what the rebuild did, and the
/// acknowledged orders that were lost (see `workers::guard`).
#[derive(Default)]
pub struct LossMetrics {
    /// Sales the guard found fenced, by reason, at its last pass.
    pub fenced: Family<FenceLabels, Gauge>,
    /// Sales rebuilt from MySQL.
    pub rebuilds: Counter,
    /// Time of the last rebuild, in seconds.
    pub rebuild_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Acknowledged orders counted lost, per sale.
    pub orders_lost: Family<SaleLabels, Counter>,
}

impl LossMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "sales_fenced",
            "Sales fenced (503) at the guard's last pass, by reason: missing, behind, foreign, rebuilding",
            self.fenced.clone(),
        );
        registry.register(
            "sale_rebuilds",
            "Fenced sales rebuilt from MySQL and what Redis still held",
            self.rebuilds.clone(),
        );
        registry.register(
            "sale_rebuild_seconds",
            "Duration of the last rebuild of a sale",
            self.rebuild_seconds.clone(),
        );
        registry.register(
            "orders_lost",
            "Orders acknowledged to a buyer that reached neither MySQL nor the Redis that survived a loss, per sale",
            self.orders_lost.clone(),
        );
    }
}

/// Labels of a per-event-type series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventTypeLabels {
    /// The event type (`order.paid`, ...).
    pub event_type: &'static str,
}

/// Downstream events: the outbox, the relay (`workers::relay`) and the
/// points consumer (`points`).
pub struct EventMetrics {
    /// Outbox rows written by the reconciler, by type.
    pub outbox_written: Family<EventTypeLabels, Counter>,
    /// Outbox rows not yet confirmed by the broker, at the relay's last look.
    pub outbox_backlog: Gauge,
    /// Age of the oldest unsent outbox row, in seconds, at the relay's last look.
    pub outbox_oldest_age_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Events the broker confirmed, by type.
    pub published: Family<EventTypeLabels, Counter>,
    /// Publishes sent and not yet confirmed.
    pub confirms_pending: Gauge,
    /// Publish rounds that failed (a lost connection, a nack, MySQL) and were retried.
    pub relay_failures: Counter,
    /// Sent outbox rows purged after the retention period.
    pub outbox_purged: Counter,
    /// Events the points consumer applied, by outcome (`applied`, `duplicate`, `ignored`).
    pub points_consumed: Family<OutcomeLabels, Counter>,
    /// Messages the points consumer could not parse and dead-lettered.
    pub points_dead_lettered: Counter,
    /// Messages waiting in the points queue, at the consumer's last look.
    pub points_queue_depth: Gauge,
    /// Time from an event's change in Redis to its points entry.
    pub points_lag: Histogram,
}

impl EventMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "outbox_written",
            "Outbox rows written by the reconciler, by event type",
            self.outbox_written.clone(),
        );
        registry.register(
            "outbox_backlog",
            "Outbox rows not yet confirmed by the broker, at the relay's last look",
            self.outbox_backlog.clone(),
        );
        registry.register(
            "outbox_oldest_age_seconds",
            "Age of the oldest unsent outbox row, at the relay's last look",
            self.outbox_oldest_age_seconds.clone(),
        );
        registry.register(
            "events_published",
            "Events the broker confirmed, by event type",
            self.published.clone(),
        );
        registry.register(
            "relay_confirms_pending",
            "Events published and not yet confirmed by the broker",
            self.confirms_pending.clone(),
        );
        registry.register(
            "relay_failures",
            "Relay rounds that failed (lost connection, nack, MySQL) and were retried",
            self.relay_failures.clone(),
        );
        registry.register(
            "outbox_purged",
            "Sent outbox rows purged after the retention period",
            self.outbox_purged.clone(),
        );
        registry.register(
            "points_events",
            "Events the points consumer handled, by outcome",
            self.points_consumed.clone(),
        );
        registry.register(
            "points_dead_lettered",
            "Messages the points consumer could not parse and dead-lettered",
            self.points_dead_lettered.clone(),
        );
        registry.register(
            "points_queue_depth",
            "Messages waiting in the points queue, at the consumer's last look",
            self.points_queue_depth.clone(),
        );
        registry.register(
            "points_lag_seconds",
            "Time from a change in Redis to its points entry",
            self.points_lag.clone(),
        );
    }
}

impl Default for EventMetrics {
    fn default() -> Self {
        Self {
            outbox_written: Family::default(),
            outbox_backlog: Gauge::default(),
            outbox_oldest_age_seconds: Gauge::default(),
            published: Family::default(),
            confirms_pending: Gauge::default(),
            relay_failures: Counter::default(),
            outbox_purged: Counter::default(),
            points_consumed: Family::default(),
            points_dead_lettered: Counter::default(),
            points_queue_depth: Gauge::default(),
            points_lag: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
        }
    }
}

/// The live list of sales (see `workers::live`) and retirement.
#[derive(Default)]
pub struct LiveMetrics {
    /// Sales on the live list.
    pub sales: Gauge,
    /// Seconds since the list was last read from MySQL (-1: never).
    pub age_seconds: Gauge,
    /// Reads of the list from MySQL that failed (the last good list stayed).
    pub refresh_failures: Counter,
    /// Sales this process retired.
    pub retired: Counter,
}

impl LiveMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "live_sales",
            "Sales on the live list that workers walk (not retired, read from MySQL)",
            self.sales.clone(),
        );
        registry.register(
            "live_sales_age_seconds",
            "Seconds since the live list was last read from MySQL (-1: never)",
            self.age_seconds.clone(),
        );
        registry.register(
            "live_sales_refresh_failures",
            "Reads of the live list from MySQL that failed; the last good list stayed in use",
            self.refresh_failures.clone(),
        );
        registry.register(
            "sales_retired",
            "Sales this process retired (ended, settled, no refund waiting)",
            self.retired.clone(),
        );
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("flashsale");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<RouteLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(exponential_buckets(0.000_25, 2.0, 16))) as fn() -> Histogram,
        );
        let reservations = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by route, method and status",
            requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency by route",
            latency.clone(),
        );
        registry.register(
            "reservations",
            "Reservation attempts by outcome",
            reservations.clone(),
        );
        let order_events = Family::<EventLabels, Counter>::default();
        registry.register(
            "orders",
            "Orders that reached a state (paid, cancelled, closed), by state",
            order_events.clone(),
        );
        let expiry_lateness = Histogram::new(exponential_buckets(0.000_5, 2.0, 16));
        registry.register(
            "expiry_lateness_seconds",
            "Close time minus payment deadline, by Redis's clock, of expired orders",
            expiry_lateness.clone(),
        );
        let expiry_due = Gauge::default();
        registry.register(
            "expiry_due",
            "Payment deadlines already due and not yet claimed by a worker",
            expiry_due.clone(),
        );
        let reconciler_batches = Counter::default();
        let reconciler_rows = Counter::default();
        let reconciler_retries = Counter::default();
        let flow_quarantined = Counter::default();
        let reconciler_backlog = Gauge::default();
        let reconciler_lag_ms = Gauge::default();
        let sweep_corrections = Counter::default();
        let sweep_overdue_in_redis = Counter::default();
        registry.register(
            "reconciler_batches",
            "Reconciler transactions committed",
            reconciler_batches.clone(),
        );
        registry.register(
            "reconciler_rows",
            "Flow records applied to MySQL",
            reconciler_rows.clone(),
        );
        registry.register(
            "reconciler_retries",
            "Reconciler steps that failed and were retried",
            reconciler_retries.clone(),
        );
        registry.register(
            "flow_quarantined",
            "Flow records the reconciler refused to apply and quarantined (see the audit)",
            flow_quarantined.clone(),
        );
        registry.register(
            "reconciler_backlog",
            "Flow records in Redis not yet applied to MySQL",
            reconciler_backlog.clone(),
        );
        registry.register(
            "reconciler_lag_milliseconds",
            "Age of the oldest flow record not yet applied to MySQL",
            reconciler_lag_ms.clone(),
        );
        registry.register(
            "sweep_corrections",
            "Overdue pending orders unknown to Redis that the sweep closed in MySQL",
            sweep_corrections.clone(),
        );
        registry.register(
            "sweep_overdue_in_redis",
            "Orders found still pending in Redis far past their deadline",
            sweep_overdue_in_redis.clone(),
        );
        let refunds = Family::<OutcomeLabels, Counter>::default();
        let refunds_pending = Gauge::default();
        let refunds_dead_lettered = Counter::default();
        let refund_wait = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "refunds",
            "Refunds carried out, immediate or after settlement",
            refunds.clone(),
        );
        registry.register(
            "refunds_pending",
            "Refunds waiting for their orders to settle",
            refunds_pending.clone(),
        );
        registry.register(
            "refunds_dead_lettered",
            "Refunds moved to the dead-letter after the configured age",
            refunds_dead_lettered.clone(),
        );
        registry.register(
            "refund_wait_seconds",
            "Time from a refund request to the refund",
            refund_wait.clone(),
        );
        let dependency_up = Family::<DependencyLabels, Gauge>::default();
        let role_up = Family::<RoleLabels, Gauge>::default();
        let role_restarts = Family::<RoleLabels, Counter>::default();
        registry.register(
            "role_restarts",
            "Restarts of a role after it panicked or ended by itself",
            role_restarts.clone(),
        );
        let rate_limited = Family::<ScopeLabels, Counter>::default();
        let http_connections = Gauge::default();
        let reserve_unsure = Counter::default();
        registry.register(
            "dependency_up",
            "Whether a store answered the last readiness probe (1) or not (0)",
            dependency_up.clone(),
        );
        registry.register(
            "role_up",
            "Whether a role of this process runs (1) or has stopped (0)",
            role_up.clone(),
        );
        registry.register(
            "rate_limited",
            "Requests refused with 429 by a rate limit, by scope (buyer, address)",
            rate_limited.clone(),
        );
        registry.register(
            "http_connections",
            "HTTP connections open",
            http_connections.clone(),
        );
        registry.register(
            "reserve_unsure",
            "Reserve requests answered 5xx with a retry key",
            reserve_unsure.clone(),
        );
        let ready = Gauge::default();
        registry.register(
            "ready",
            "1 when /readyz answers 200 (Redis answers, every role runs, not shutting down), 0 when 503, as of the last probe (a scrape probes when the last one is older than a second)",
            ready.clone(),
        );
        let live = LiveMetrics::default();
        live.register(&mut registry);
        let loss = LossMetrics::default();
        loss.register(&mut registry);
        let events = EventMetrics::default();
        events.register(&mut registry);
        let sales = SaleMetrics::default();
        sales.register(&mut registry);
        Self {
            registry: Mutex::new(registry),
            sales,
            live,
            loss,
            events,
            dependency_up,
            ready,
            role_up,
            role_restarts,
            rate_limited,
            http_connections,
            reserve_unsure,
            refunds,
            refunds_pending,
            refunds_dead_lettered,
            refund_wait,
            reconciler_batches,
            reconciler_rows,
            reconciler_retries,
            flow_quarantined,
            id: NEXT_METRICS_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            reconciler_backlog,
            reconciler_lag_ms,
            sweep_corrections,
            sweep_overdue_in_redis,
            requests,
            latency,
            reservations,
            order_events,
            expiry_lateness,
            expiry_due,
        }
    }
}

impl Metrics {
    /// Renders every metric in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }

    /// Renders every metric with the live sales' series replaced by
    /// `sales` (their snapshots as Redis holds them now, with each one's
    /// units by where they stand).
    pub fn render_with_sales(&self, sales: &[crate::engine::SaleSnapshot]) -> String {
        let _one_at_a_time = self.sales.refresh.lock().unwrap_or_else(|p| p.into_inner());
        self.sales.clear();
        for s in sales {
            let sale_id = s.id.get();
            let labels = SaleLabels { sale_id };
            self.sales
                .stock_total
                .get_or_create(&labels)
                .set(s.stock_total);
            self.sales
                .stock_available
                .get_or_create(&labels)
                .set(s.stock_available);
            for (status, n) in s.units.fields() {
                if status != "total" && status != "available" {
                    self.sales
                        .units
                        .get_or_create(&SaleUnitsLabels { sale_id, status })
                        .set(n);
                }
            }
            let now = s.state().label();
            for state in SALE_STATES {
                self.sales
                    .state
                    .get_or_create(&SaleStateLabels { sale_id, state })
                    .set(i64::from(state == now));
            }
        }
        self.render()
    }

    /// Registers the counters of acknowledged writes (Redis WAIT).
    pub fn register_replication_stats(&self, stats: &crate::engine::ReplicationStats) {
        let mut registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        registry.register(
            "redis_writes_unacknowledged",
            "Writes that ran on the Redis primary but whose WAIT confirmed fewer replicas than FLASHSALE_REDIS_WAIT_REPLICAS in time (answered 503 with a retry key)",
            stats.unacknowledged.clone(),
        );
        registry.register(
            "redis_writes_refused_replicas",
            "Writes refused before running: the Redis primary had fewer replicas connected than FLASHSALE_REDIS_WAIT_REPLICAS",
            stats.refused.clone(),
        );
    }

    /// Adds the engine's reserve call counters to this registry.
    pub fn register_reserve_stats(&self, stats: &crate::engine::ReserveStats) {
        let mut registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        registry.register(
            "reserve_script_calls",
            "Reserve script calls sent to Redis (each carries one or more reservations)",
            stats.calls.clone(),
        );
        registry.register(
            "reserve_script_reservations",
            "Reservations carried by reserve script calls",
            stats.reservations.clone(),
        );
    }

    /// Counts orders reaching `event` (`paid`, `cancelled`, `closed`).
    pub fn order_event(&self, event: &'static str, n: u64) {
        self.order_events
            .get_or_create(&EventLabels { event })
            .inc_by(n);
    }

    /// Counts one reservation outcome.
    pub fn reservation(&self, outcome: &'static str) {
        HOT.with_borrow_mut(|hot| {
            let found = hot
                .outcomes
                .iter()
                .find(|(id, o, _)| *id == self.id && *o == outcome);
            if let Some((_, _, c)) = found {
                c.inc();
                return;
            }
            let c = self
                .reservations
                .get_or_create(&OutcomeLabels { outcome })
                .clone();
            c.inc();
            hot.bound();
            hot.outcomes.push((self.id, outcome, c));
        });
    }

    /// Counts one HTTP request of the route template `template` and
    /// `method` answered `status` after `seconds`.
    pub fn request(&self, template: &str, method: &'static str, status: u16, seconds: f64) {
        HOT.with_borrow_mut(|hot| {
            let found = hot.requests.iter().find(|e| {
                e.metrics == self.id
                    && e.status == status
                    && e.method == method
                    && e.route == template
            });
            if let Some(e) = found {
                e.latency.observe(seconds);
                e.requests.inc();
                return;
            }
            let route = route_label(template);
            let latency = self.latency.get_or_create(&RouteLabels { route }).clone();
            let requests = self
                .requests
                .get_or_create(&RequestLabels {
                    route,
                    method,
                    status,
                })
                .clone();
            latency.observe(seconds);
            requests.inc();
            hot.bound();
            hot.requests.push(HotRequest {
                metrics: self.id,
                route,
                method,
                status,
                requests,
                latency,
            });
        });
    }
}

/// Gives each [`Metrics`] its own id.
static NEXT_METRICS_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// The series every request touches, resolved once per thread: a lookup in
/// a family hashes the labels under the family's lock, while a handle is a
/// shared counter (or histogram) that a clone reaches directly. Families of
/// these series are never cleared, so a handle stays the family's series.
#[derive(Default)]
struct Hot {
    requests: Vec<HotRequest>,
    outcomes: Vec<(u64, &'static str, Counter)>,
}

struct HotRequest {
    metrics: u64,
    route: &'static str,
    method: &'static str,
    status: u16,
    requests: Counter,
    latency: Histogram,
}

/// Handles a thread keeps at most per kind; past it the cache starts over
/// (many instances in one process, as in the tests).
const HOT_MAX: usize = 256;

impl Hot {
    fn bound(&mut self) {
        if self.requests.len() >= HOT_MAX {
            self.requests.clear();
        }
        if self.outcomes.len() >= HOT_MAX {
            self.outcomes.clear();
        }
    }
}

thread_local! {
    static HOT: std::cell::RefCell<Hot> = std::cell::RefCell::default();
}
