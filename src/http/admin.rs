//! Sale controls (admin): pause, resume and end a sale
//! (`POST /api/v1/sales/{id}/pause|resume|end`). They sit outside the load
//! shedding and the per-address limits that guard the buyers' routes, so an
//! operator can pause a sale while it is flooded.

use axum::extract::{Path, State};
use axum::routing::post;
use axum::{Json, Router};

use super::auth::Admin;
use super::sales::SaleView;
use super::{ApiError, AppState};
use crate::domain::SaleId;
use crate::engine::SaleControl;
use crate::sales::{self, ControlError, Controlled};

pub(super) fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/sales/{sale_id}/pause", post(pause))
        .route("/api/v1/sales/{sale_id}/resume", post(resume))
        .route("/api/v1/sales/{sale_id}/end", post(end))
}

async fn pause(
    state: State<AppState>,
    admin: Admin,
    id: Path<String>,
) -> Result<Json<SaleView>, ApiError> {
    control(state, admin, id, SaleControl::Pause).await
}

async fn resume(
    state: State<AppState>,
    admin: Admin,
    id: Path<String>,
) -> Result<Json<SaleView>, ApiError> {
    control(state, admin, id, SaleControl::Resume).await
}

async fn end(
    state: State<AppState>,
    admin: Admin,
    id: Path<String>,
) -> Result<Json<SaleView>, ApiError> {
    control(state, admin, id, SaleControl::End).await
}

async fn control(
    State(state): State<AppState>,
    _admin: Admin,
    Path(id): Path<String>,
    control: SaleControl,
) -> Result<Json<SaleView>, ApiError> {
    let id: SaleId = id.parse()?;
    let done = sales::control(&state.db, &state.engine, id, control)
        .await
        .map_err(|e| match e {
            ControlError::NotFound => ApiError::NotFound,
            ControlError::Ended => ApiError::SaleEnded,
            ControlError::Database(e) => ApiError::Unavailable(format!("mysql: {e:#}")),
            ControlError::Engine(e) => e.into(),
        })?;
    match done {
        Controlled::Live(snapshot) => Ok(Json((*snapshot).into())),
        Controlled::Retired => crate::db::retired::retired_sale(&state.db, id)
            .await
            .map_err(|e| ApiError::Unavailable(format!("mysql: {e}")))?
            .map(|s| Json(s.into()))
            .ok_or(ApiError::NotFound),
    }
}
