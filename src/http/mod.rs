//! The HTTP API (axum): routes, shared state, and the protections at the
//! front door (body limit, request timeout, load shedding).
//!
//! Handlers translate between the contract (`shared/API.md`) and the engine;
//! they hold no business rules of their own beyond who may see what.

pub mod auth;
pub mod error;
mod ops;
mod orders;
mod payments;
mod sales;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::error_handling::HandleErrorLayer;
use axum::extract::{DefaultBodyLimit, FromRequest, MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::Router;
use serde::de::DeserializeOwned;
use sqlx::MySqlPool;
use tower::ServiceBuilder;

use crate::engine::Engine;
use crate::telemetry::{method_label, route_label, Metrics, RequestLabels, RouteLabels};
use crate::workers::expiry::Wakeup;
pub use auth::Authenticator;
pub use error::ApiError;

/// Largest request body accepted.
pub const BODY_LIMIT: usize = 16 * 1024;

/// What every handler shares (a clone is one reference count).
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    /// Shares `parts` between every handler.
    pub fn new(parts: Shared) -> Self {
        Self(Arc::new(parts))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The parts of [`AppState`].
pub struct Shared {
    /// The Redis side.
    pub engine: Engine,
    /// The MySQL side (admin and readiness only; never the hot path).
    pub db: MySqlPool,
    /// Credentials.
    pub auth: Arc<Authenticator>,
    /// Metrics of this instance.
    pub metrics: Arc<Metrics>,
    /// Wakes this process's expiry workers for nearer deadlines and new sales.
    pub wakeup: Arc<Wakeup>,
}

/// Limits at the front door.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Requests handled at once; past it, 503 at once.
    pub max_in_flight: usize,
    /// Longest time a request may take.
    pub request_timeout: Duration,
}

/// The whole API with its middleware.
pub fn router(state: AppState, limits: Limits) -> Router {
    let shed = ServiceBuilder::new()
        .layer(HandleErrorLayer::new(overloaded))
        .load_shed()
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
            limits.max_in_flight,
        ))
        .timeout(limits.request_timeout);
    let api = Router::new()
        .merge(sales::router())
        .merge(orders::router())
        .merge(payments::router())
        .layer(shed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT));
    Router::new()
        .merge(api)
        .merge(ops::router())
        .fallback(ops::not_found)
        .method_not_allowed_fallback(ops::method_not_allowed)
        .layer(middleware::from_fn(ops::path_params_are_utf8))
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .with_state(state)
}

/// Turns load-shedding and timeout errors into the contract's 503.
async fn overloaded(err: tower::BoxError) -> ApiError {
    if err.is::<tower::timeout::error::Elapsed>() {
        ApiError::Unavailable("request timed out".into())
    } else if err.is::<tower::load_shed::error::Overloaded>() {
        ApiError::Unavailable("overloaded: too many requests in flight".into())
    } else {
        ApiError::Internal(anyhow::anyhow!("middleware error: {err}"))
    }
}

/// Counts and times every request by its route template.
async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = route_label(
        req.extensions()
            .get::<MatchedPath>()
            .map_or("unmatched", |p| p.as_str()),
    );
    let method = method_label(req.method());
    let started = Instant::now();
    let res = next.run(req).await;
    let m = &state.metrics;
    m.latency
        .get_or_create(&RouteLabels { route })
        .observe(started.elapsed().as_secs_f64());
    m.requests
        .get_or_create(&RequestLabels {
            route,
            method,
            status: res.status().as_u16(),
        })
        .inc();
    res
}

/// The raw request body, with the contract's errors for oversized or broken
/// bodies. Bodies are read as bytes and parsed here, whatever the content
/// type says, so every parse error has the contract's format.
pub struct Body(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        Ok(Self(Bytes::from_request(req, state).await?))
    }
}

impl Body {
    /// Parses the body as a JSON object (every request body of the API is
    /// one; serde alone would also take an array for a struct).
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        let first = self.0.iter().find(|b| !b.is_ascii_whitespace());
        if first != Some(&b'{') {
            return Err(ApiError::InvalidRequest(
                "the body must be a JSON object".into(),
            ));
        }
        serde_json::from_slice(&self.0)
            .map_err(|e| ApiError::InvalidRequest(format!("invalid JSON body: {e}")))
    }

    /// Parses the body as JSON, or `None` when it is empty.
    pub fn json_or_empty<T: DeserializeOwned>(&self) -> Result<Option<T>, ApiError> {
        if self.0.iter().all(u8::is_ascii_whitespace) {
            Ok(None)
        } else {
            self.json().map(Some)
        }
    }
}
