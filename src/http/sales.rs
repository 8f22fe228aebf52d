//! Sale routes: the admin puts a sale on; anyone reads it, from Redis, or
//! from MySQL once the sale is retired (MySQL alone answers for it then,
//! whether or not Redis still holds its expiring keys).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};

use super::auth::Admin;
use super::{ApiError, AppState, Body};
use crate::db::retired::RetiredSale;
use crate::domain::SaleId;
use crate::engine::{SaleSnapshot, SaleState};
use crate::sales::{self, CreateError, SaleRequest};

pub(super) fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/sales", post(create))
        .route("/api/v1/sales/{sale_id}", get(show))
}

/// An RFC 3339 UTC time with milliseconds.
pub(super) fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The sale object of the contract.
#[derive(serde::Serialize)]
pub(super) struct SaleView {
    sale_id: String,
    sku: String,
    title: String,
    price_cents: i64,
    stock_total: i64,
    stock_available: i64,
    per_user_limit: i64,
    payment_window_secs: i64,
    start_at: String,
    end_at: String,
    state: SaleState,
}

impl From<RetiredSale> for SaleView {
    fn from(s: RetiredSale) -> Self {
        Self {
            sale_id: s.id.to_string(),
            sku: s.sku,
            title: s.title,
            price_cents: s.price_cents,
            stock_total: s.stock_total.into(),
            stock_available: s.available.into(),
            per_user_limit: s.per_user_limit.into(),
            payment_window_secs: s.payment_window_secs.into(),
            start_at: rfc3339(s.start_at.timestamp_millis()),
            end_at: rfc3339(s.end_at.timestamp_millis()),
            state: SaleState::Ended,
        }
    }
}

impl From<SaleSnapshot> for SaleView {
    fn from(s: SaleSnapshot) -> Self {
        let state = s.state();
        Self {
            sale_id: s.id.to_string(),
            sku: s.sku,
            title: s.title,
            price_cents: s.price_cents,
            stock_total: s.stock_total,
            stock_available: s.stock_available,
            per_user_limit: s.per_user_limit,
            payment_window_secs: s.payment_window_ms / 1000,
            start_at: rfc3339(s.start_ms),
            end_at: rfc3339(s.end_ms),
            state,
        }
    }
}

async fn create(
    State(state): State<AppState>,
    _admin: Admin,
    body: Body,
) -> Result<(StatusCode, Json<SaleView>), ApiError> {
    let row = body.json::<SaleRequest>()?.validate()?;
    let snapshot = sales::create(&state.db, &state.engine, &row)
        .await
        .map_err(|e| match e {
            CreateError::Database(e) => ApiError::Unavailable(format!("mysql: {e:#}")),
            CreateError::Engine(e) => e.into(),
            e @ CreateError::Foreign(..) => ApiError::Internal(e.into()),
        })?;
    state.live.add(snapshot.id, snapshot.end_ms, snapshot.token);
    state.wakeup.sale_added();
    tracing::info!(sale = %snapshot.id, sku = %snapshot.sku, stock = snapshot.stock_total, "sale created");
    Ok((StatusCode::CREATED, Json(snapshot.into())))
}

async fn show(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<SaleView>, ApiError> {
    let id: SaleId = id.parse()?;
    match state.engine.sale(id).await? {
        Some(snapshot) if !snapshot.retired => Ok(Json(snapshot.into())),
        // Retired (its keys still expiring) or unknown to Redis: MySQL
        // answers for a retired sale; any other stays a 404.
        in_redis => {
            let retired = crate::db::retired::retired_sale(&state.db, id)
                .await
                .map_err(|e| ApiError::Unavailable(format!("mysql: {e}")))?;
            match (retired, in_redis) {
                (Some(sale), _) => Ok(Json(sale.into())),
                // Retired in Redis, MySQL's commit on its way: Redis's
                // copy no longer moves.
                (None, Some(snapshot)) => Ok(Json(snapshot.into())),
                (None, None) => Err(ApiError::NotFound),
            }
        }
    }
}
