//! The buyer's loyalty points, from MySQL (the points consumer's ledger):
//! no broker and no Redis needed to answer.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};

use super::auth::Buyer;
use super::sales::rfc3339;
use super::{ApiError, AppState};
use crate::points::ledger;

/// Most entries one answer lists.
const ENTRIES_SHOWN: u32 = 50;

pub(super) fn router() -> Router<AppState> {
    Router::new().route("/api/v1/users/me/points", get(show))
}

/// The points object of the contract.
#[derive(serde::Serialize)]
struct PointsView {
    user_id: String,
    balance: i64,
    entries: Vec<EntryView>,
}

#[derive(serde::Serialize)]
struct EntryView {
    event_id: String,
    order_id: String,
    points: i64,
    reason: String,
    at: String,
}

async fn show(
    State(state): State<AppState>,
    Buyer(user): Buyer,
) -> Result<Json<PointsView>, ApiError> {
    let (balance, entries) = ledger::statement(&state.db, user, ENTRIES_SHOWN)
        .await
        .map_err(|e| ApiError::Unavailable(format!("mysql: {e}")))?;
    Ok(Json(PointsView {
        user_id: user.to_string(),
        balance,
        entries: entries
            .into_iter()
            .map(|e| EntryView {
                event_id: e.event_id,
                order_id: e.order_id,
                points: e.points,
                reason: e.reason,
                at: rfc3339(e.at.timestamp_millis()),
            })
            .collect(),
    }))
}
