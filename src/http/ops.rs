//! Operations routes: liveness, readiness, metrics and the OpenAPI document.
//! They sit outside the API's load shedding, behind a small concurrency cap
//! of their own, so that probes answer under overload and a probe flood
//! cannot starve anything else: readiness is computed at most once a second
//! (concurrent probes share the answer) over its own one-connection MySQL
//! pool, never the reconciler's.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::error_handling::HandleErrorLayer;
use axum::extract::State;
use axum::http::{header, Method, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use sqlx::MySqlPool;
use tower::ServiceBuilder;

use super::{ApiError, AppState};
use crate::telemetry::{DependencyLabels, RoleLabels};

/// The published contract.
const OPENAPI: &str = include_str!("../../docs/openapi.json");

/// Operations requests handled at once; past it, 503 at once.
const OPS_IN_FLIGHT: usize = 32;

/// How long one readiness answer is reused.
const READY_FRESH: Duration = Duration::from_secs(1);

/// The routes every process serves, whatever its roles, behind their own
/// concurrency cap.
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/openapi.json", get(openapi))
        .layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(super::overloaded))
                .load_shed()
                .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
                    OPS_IN_FLIGHT,
                )),
        )
}

/// The operations routes alone (a process without the HTTP role).
pub fn router(state: AppState) -> Router {
    routes()
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// What this process knows of its own health: its roles and whether it is
/// shutting down; `/readyz` adds the stores.
pub struct Health {
    shutting_down: AtomicBool,
    roles: Mutex<Vec<(&'static str, bool)>>,
    /// The last readiness answer and when it was made.
    last: tokio::sync::Mutex<Option<(Instant, Readiness)>>,
    /// A pool of one connection, for probes only.
    probe_db: MySqlPool,
}

impl Health {
    /// Probes MySQL through `probe_db` (its own small pool).
    pub fn new(probe_db: MySqlPool) -> Self {
        Self {
            shutting_down: AtomicBool::new(false),
            roles: Mutex::default(),
            last: tokio::sync::Mutex::default(),
            probe_db,
        }
    }

    /// Records whether `role` runs.
    pub fn set_role(&self, role: &'static str, up: bool) {
        let mut roles = self.roles.lock().unwrap_or_else(|p| p.into_inner());
        match roles.iter_mut().find(|(r, _)| *r == role) {
            Some(entry) => entry.1 = up,
            None => roles.push((role, up)),
        }
    }

    /// The process is shutting down: readiness fails from now on.
    pub fn shutting_down(&self) {
        self.shutting_down.store(true, Ordering::Release);
    }

    fn roles(&self) -> Vec<(&'static str, bool)> {
        self.roles.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The stores as the last probe found them.
#[derive(Clone, Copy)]
struct Readiness {
    redis: bool,
    mysql: bool,
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

/// Whether `/readyz` answers 200 (Redis answers, not shutting down, every
/// role up), recorded in `flashsale_ready`.
fn record_ready(
    state: &AppState,
    stores: Readiness,
    shutting_down: bool,
    roles: &[(&'static str, bool)],
) -> bool {
    let ready = stores.redis && !shutting_down && roles.iter().all(|(_, up)| *up);
    state.metrics.ready.set(i64::from(ready));
    ready
}

/// 503 only when this process cannot take writes: Redis unreachable, one
/// of its roles down, or shutting down. MySQL down is reported, not fatal:
/// selling goes on while the reconciler waits.
async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let health = &state.health;
    let stores = fresh_readiness(&state).await;
    let roles = health.roles();
    let shutting_down = health.shutting_down.load(Ordering::Acquire);
    let ready = record_ready(&state, stores, shutting_down, &roles);
    let word = |ok: bool| if ok { "ok" } else { "down" };
    let roles: serde_json::Map<String, serde_json::Value> = roles
        .into_iter()
        .map(|(r, up)| (r.to_owned(), word(up).into()))
        .collect();
    (
        if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        Json(serde_json::json!({
            "redis": word(stores.redis),
            "mysql": word(stores.mysql),
            "roles": roles,
            "shutting_down": shutting_down,
        })),
    )
}

/// The stores as a probe found them within [`READY_FRESH`], probing now
/// when the last probe is older (`/readyz` and `/metrics` share it, so a
/// scrape keeps the health gauges current without a probe of its own each
/// time).
async fn fresh_readiness(state: &AppState) -> Readiness {
    let mut last = state.health.last.lock().await;
    match *last {
        Some((at, r)) if at.elapsed() < READY_FRESH => r,
        _ => {
            let r = probe(state).await;
            *last = Some((Instant::now(), r));
            r
        }
    }
}

/// Pings both stores, each within a bound, and records what it found.
async fn probe(state: &AppState) -> Readiness {
    let limit = Duration::from_secs(2);
    let redis = async { state.engine.ping().await.is_ok() };
    let mysql = async {
        matches!(
            tokio::time::timeout(limit, crate::db::ping(&state.health.probe_db)).await,
            Ok(Ok(()))
        )
    };
    let (redis, mysql) = tokio::join!(redis, mysql);
    for (dependency, up) in [("redis", redis), ("mysql", mysql)] {
        state
            .metrics
            .dependency_up
            .get_or_create(&DependencyLabels { dependency })
            .set(i64::from(up));
    }
    for (role, up) in state.health.roles() {
        state
            .metrics
            .role_up
            .get_or_create(&RoleLabels { role })
            .set(i64::from(up));
    }
    Readiness { redis, mysql }
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    // The health gauges are as fresh as the scrape: what `/readyz` would
    // answer now (`flashsale_ready`), each store, each role.
    let (stores, sales) = tokio::join!(fresh_readiness(&state), live_snapshots(&state));
    let health = &state.health;
    let shutting_down = health.shutting_down.load(Ordering::Acquire);
    record_ready(&state, stores, shutting_down, &health.roles());
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render_with_sales(&sales),
    )
}

/// The live sales as Redis holds them now, for the per-sale series. A
/// scrape never waits long on Redis: what has not answered within a second
/// (Redis down, a fenced sale) is left out, and the rest is reported.
async fn live_snapshots(state: &AppState) -> Vec<crate::engine::SaleSnapshot> {
    let reads = state.live.ids().into_iter().map(|id| async move {
        tokio::time::timeout(Duration::from_secs(1), state.engine.sale(id))
            .await
            .ok()
            .and_then(Result::ok)
            .flatten()
    });
    futures::future::join_all(reads)
        .await
        .into_iter()
        .flatten()
        .filter(|s| !s.retired)
        .collect()
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

pub(super) async fn not_found() -> ApiError {
    ApiError::NotFound
}

/// A method the path does not take: `405 method_not_allowed`. The router
/// adds the `Allow` header (the methods the path takes) to this answer.
pub(super) async fn method_not_allowed(method: Method) -> ApiError {
    ApiError::MethodNotAllowed(method)
}
