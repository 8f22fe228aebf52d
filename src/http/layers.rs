//! The middleware every API request passes, written as plain tower services
//! rather than `axum::middleware::from_fn` and a stack of tower layers: each
//! of those clones the boxed inner route and boxes a future per request,
//! which on the sold-out flood cost more than the handler's own work. Here
//! the inner service is called in place and one future is boxed per layer.
//!
//! - [`Track`]: counts and times every request by its route template, gives
//!   a reserve's 5xx answer a retry key, and answers a path parameter that
//!   is not UTF-8 with the contract's 400.
//! - [`Shed`]: requests in flight past a cap are answered 503 at once, and a
//!   request that takes longer than the request timeout is answered 503.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::rejection::RawPathParamsRejection;
use axum::extract::{FromRequestParts, MatchedPath, RawPathParams, Request};
use axum::response::{IntoResponse, Response};
use futures::future::BoxFuture;
use futures::FutureExt;
use tower::{Layer, Service};

use super::{with_retry_key, ApiError, AppState, RESERVE_ROUTE};
use crate::telemetry::method_label;

/// Layer of [`Track`].
#[derive(Clone)]
pub(super) struct TrackLayer(pub(super) AppState);

impl<S> Layer<S> for TrackLayer {
    type Service = Track<S>;

    fn layer(&self, inner: S) -> Track<S> {
        Track {
            inner,
            state: self.0.clone(),
        }
    }
}

/// Counts and times every request by its route template (see the module).
#[derive(Clone)]
pub(super) struct Track<S> {
    inner: S,
    state: AppState,
}

impl<S> Service<Request> for Track<S>
where
    S: Service<Request, Response = Response, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let started = Instant::now();
        let state = self.state.clone();
        let method = method_label(req.method());
        // The matched route's template is shared by every request of the
        // route: holding it costs a reference count, not a copy.
        let route = req.extensions().get::<MatchedPath>().cloned();
        let answer = match non_utf8_path_param(req) {
            Ok(req) => Ok(self.inner.call(req)),
            Err(refused) => Err(refused.into_response()),
        };
        Box::pin(async move {
            let mut res = match answer {
                Ok(fut) => fut.await?,
                Err(refused) => refused,
            };
            let template = route.as_ref().map_or("unmatched", |p| p.as_str());
            if template == RESERVE_ROUTE && res.status().is_server_error() {
                res = with_retry_key(&state, res).await;
            }
            state.metrics.request(
                template,
                method,
                res.status().as_u16(),
                started.elapsed().as_secs_f64(),
            );
            Ok(res)
        })
    }
}

/// A path parameter that is not UTF-8 once percent-decoded (`/sales/%FF`)
/// gets the contract's `400 invalid_request` here, before a handler's `Path`
/// extractor would refuse it in plain text. Only paths with a `%` are looked
/// at, so the hot path pays one scan of its bytes.
fn non_utf8_path_param(req: Request) -> Result<Request, ApiError> {
    if !req.uri().path().contains('%') {
        return Ok(req);
    }
    let (mut parts, body) = req.into_parts();
    // Reading the parameters the router stored never waits.
    if let Some(Err(RawPathParamsRejection::InvalidUtf8InPathParam(e))) =
        RawPathParams::from_request_parts(&mut parts, &()).now_or_never()
    {
        return Err(ApiError::InvalidRequest(e.body_text()));
    }
    Ok(Request::from_parts(parts, body))
}

/// Layer of [`Shed`].
#[derive(Clone)]
pub(super) struct ShedLayer(Arc<Gate>);

/// Requests in flight and the limits.
struct Gate {
    in_flight: AtomicUsize,
    max_in_flight: usize,
    timeout: Duration,
}

impl ShedLayer {
    /// At most `max_in_flight` requests at once, each for `timeout` at most.
    pub(super) fn new(max_in_flight: usize, timeout: Duration) -> Self {
        Self(Arc::new(Gate {
            in_flight: AtomicUsize::new(0),
            max_in_flight,
            timeout,
        }))
    }
}

impl<S> Layer<S> for ShedLayer {
    type Service = Shed<S>;

    fn layer(&self, inner: S) -> Shed<S> {
        Shed {
            inner,
            gate: self.0.clone(),
        }
    }
}

/// Load shedding and the request timeout (see the module).
#[derive(Clone)]
pub(super) struct Shed<S> {
    inner: S,
    gate: Arc<Gate>,
}

/// One request in flight, until dropped.
struct Permit(Arc<Gate>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<S> Service<Request> for Shed<S>
where
    S: Service<Request, Response = Response, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let gate = &self.gate;
        if gate.in_flight.fetch_add(1, Ordering::AcqRel) >= gate.max_in_flight {
            gate.in_flight.fetch_sub(1, Ordering::AcqRel);
            let refused = ApiError::Unavailable("overloaded: too many requests in flight".into());
            return Box::pin(std::future::ready(Ok(refused.into_response())));
        }
        let permit = Permit(gate.clone());
        let timeout = gate.timeout;
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = match tokio::time::timeout(timeout, fut).await {
                Ok(res) => res?,
                Err(_) => ApiError::Unavailable("request timed out".into()).into_response(),
            };
            drop(permit);
            Ok(res)
        })
    }
}
