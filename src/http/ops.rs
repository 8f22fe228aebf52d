//! Operations routes: liveness, readiness, metrics and the OpenAPI document.
//! They sit outside load shedding so that probes answer under overload.

use std::time::Duration;

use axum::extract::rejection::RawPathParamsRejection;
use axum::extract::{FromRequestParts, RawPathParams, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use super::{ApiError, AppState};

/// The published contract.
const OPENAPI: &str = include_str!("../../docs/openapi.json");

pub(super) fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/openapi.json", get(openapi))
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let limit = Duration::from_secs(2);
    let redis = state.engine.ping().await.is_ok();
    let mysql = matches!(
        tokio::time::timeout(limit, crate::db::ping(&state.db)).await,
        Ok(Ok(()))
    );
    let status = if redis && mysql {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let word = |ok: bool| if ok { "ok" } else { "down" };
    (
        status,
        Json(serde_json::json!({"redis": word(redis), "mysql": word(mysql)})),
    )
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
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

/// A path parameter that is not UTF-8 once percent-decoded (`/sales/%FF`)
/// gets the contract's `400 invalid_request` here, before a handler's `Path`
/// extractor would refuse it in plain text. Only paths with a `%` are looked
/// at, so the hot path pays one scan of its bytes.
pub(super) async fn path_params_are_utf8(req: Request, next: Next) -> Response {
    if !req.uri().path().contains('%') {
        return next.run(req).await;
    }
    let (mut parts, body) = req.into_parts();
    if let Err(RawPathParamsRejection::InvalidUtf8InPathParam(e)) =
        RawPathParams::from_request_parts(&mut parts, &()).await
    {
        return ApiError::InvalidRequest(e.body_text()).into_response();
    }
    next.run(Request::from_parts(parts, body)).await
}
