//! The HTTP API (axum): routes, shared state, and the protections at the
//! front door (body limit, request timeout, load shedding, rate limits;
//! connection limits in `server.rs`).
//!
//! Handlers translate between the contract (`shared/API.md`) and the engine;
//! they hold no business rules of their own beyond who may see what.

mod admin;
pub mod auth;
pub mod error;
mod layers;
pub mod limits;
pub mod ops;
mod orders;
mod payments;
mod points;
mod sales;
pub mod server;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Request};
use axum::middleware;
use axum::response::Response;
use axum::Router;
use serde::de::DeserializeOwned;
use sqlx::MySqlPool;
use tower::ServiceBuilder;

use crate::engine::Engine;
use crate::telemetry::Metrics;
use crate::workers::expiry::Wakeup;
use crate::workers::live::LiveSales;
pub use auth::Authenticator;
pub use error::ApiError;
pub use limits::{Rate, RateLimits};
pub use ops::Health;

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
    /// Rate limits per buyer and per client address.
    pub limits: RateLimits,
    /// Roles, shutdown and the stores, for `/readyz`.
    pub health: Health,
    /// The sales the workers walk (a sale created here joins at once).
    pub live: Arc<LiveSales>,
}

/// Limits at the front door.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Requests handled at once; past it, 503 at once.
    pub max_in_flight: usize,
    /// Longest time a request may take.
    pub request_timeout: Duration,
}

/// The route of the seckill endpoint (its 5xx answers carry a retry key).
const RESERVE_ROUTE: &str = "/api/v1/sales/{sale_id}/orders";

/// The whole API with its middleware.
pub fn router(state: AppState, limits: Limits) -> Router {
    let mut buyers = Router::new()
        .merge(sales::router())
        .merge(orders::router())
        .merge(points::router());
    if state.limits.limits_addresses() {
        buyers = buyers.layer(middleware::from_fn_with_state(
            state.clone(),
            limits::per_address,
        ));
    }
    // The gateway's callback is never limited by address.
    let api = buyers.merge(payments::router()).layer(
        ServiceBuilder::new()
            .layer(DefaultBodyLimit::max(BODY_LIMIT))
            .layer(layers::ShedLayer::new(
                limits.max_in_flight,
                limits.request_timeout,
            )),
    );
    // Sale controls are neither shed nor limited by address: an operator
    // must be able to pause a flooded sale.
    let admin = admin::router().layer(DefaultBodyLimit::max(BODY_LIMIT));
    Router::new()
        .merge(api)
        .merge(admin)
        .merge(ops::routes())
        .fallback(ops::not_found)
        .method_not_allowed_fallback(ops::method_not_allowed)
        .layer(layers::TrackLayer(state.clone()))
        .with_state(state)
}

/// Turns load-shedding and timeout errors into the contract's 503.
pub(crate) async fn overloaded(err: tower::BoxError) -> ApiError {
    if err.is::<tower::timeout::error::Elapsed>() {
        ApiError::Unavailable("request timed out".into())
    } else if err.is::<tower::load_shed::error::Overloaded>() {
        ApiError::Unavailable("overloaded: too many requests in flight".into())
    } else {
        ApiError::Internal(anyhow::anyhow!("middleware error: {err}"))
    }
}

/// A reserve's 5xx answer made before the handler could attach a retry key
/// (load shedding, the request timeout) gets one that no call used: nothing
/// was reserved for it, and a retry with it reserves at most once.
pub(super) async fn with_retry_key(state: &AppState, res: Response) -> Response {
    let (mut parts, body) = res.into_parts();
    let bytes = axum::body::to_bytes(body, BODY_LIMIT)
        .await
        .unwrap_or_default();
    let mut doc: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    if let Some(error) = doc.get_mut("error").and_then(|e| e.as_object_mut()) {
        if !error.contains_key("retry_key") {
            error.insert("retry_key".into(), state.engine.unused_retry_key().into());
            parts.headers.remove(axum::http::header::CONTENT_LENGTH);
            return Response::from_parts(parts, axum::body::Body::from(doc.to_string()));
        }
    }
    Response::from_parts(parts, axum::body::Body::from(bytes))
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
