//! Operations routes: liveness, readiness, metrics and the OpenAPI document.
//! They sit outside load shedding so that probes answer under overload.

use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
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
