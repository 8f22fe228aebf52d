//! The payment gateway's callback: signed, idempotent, judged by the
//! order's deadline on Redis's clock. Redis only.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::post;
use axum::{Json, Router};

use super::orders::OrderView;
use super::{ApiError, AppState, Body};
use crate::domain::OrderId;
use crate::engine::{Order, Payment};

pub(super) fn router() -> Router<AppState> {
    Router::new().route("/api/v1/payments/callback", post(callback))
}

#[derive(serde::Deserialize)]
struct Callback {
    order_id: String,
    payment_id: String,
    amount_cents: i64,
    status: String,
}

fn check_payment_id(id: &str) -> Result<(), ApiError> {
    let ok = (1..=128).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_graphic());
    if ok {
        Ok(())
    } else {
        Err(ApiError::InvalidRequest(
            "payment_id must be 1 to 128 printable ASCII characters".into(),
        ))
    }
}

async fn callback(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<OrderView>, ApiError> {
    let signature = headers.get("x-signature").and_then(|v| v.to_str().ok());
    if !state.auth.verify_payment_signature(signature, &body.0) {
        return Err(ApiError::Unauthorized);
    }
    let cb: Callback = body.json()?;
    let id: OrderId = cb.order_id.parse()?;
    check_payment_id(&cb.payment_id)?;
    if cb.amount_cents < 0 {
        return Err(ApiError::InvalidRequest(
            "amount_cents must not be negative".into(),
        ));
    }
    if cb.status != "succeeded" {
        // Acknowledged; a failed or pending payment changes nothing.
        let order = state.engine.order(id).await?.ok_or(ApiError::NotFound)?;
        tracing::info!(order = %id, status = %cb.status, "payment callback acknowledged without effect");
        return Ok(Json(order.into()));
    }
    let m = &state.metrics;
    let paid = |o: Order| Ok(Json(o.into()));
    match state
        .engine
        .pay(id, &cb.payment_id, cb.amount_cents)
        .await?
    {
        Payment::Paid(o) => {
            m.order_event("paid", 1);
            paid(o)
        }
        Payment::AlreadyPaid(o) => paid(o),
        Payment::Expired { order, closed_now } => {
            if closed_now {
                m.order_event("closed", 1);
            }
            tracing::info!(order = %order.id, "payment after the deadline refused; the gateway must refund it");
            Err(ApiError::OrderExpired)
        }
        Payment::NotPending(o) => Err(ApiError::OrderNotPending(o.status)),
        Payment::AmountMismatch(_) => Err(ApiError::AmountMismatch),
        Payment::NotFound => Err(ApiError::NotFound),
    }
}
