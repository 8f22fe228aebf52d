//! Order routes: the seckill endpoint and reading an order, from Redis.
//! A retired sale's orders are read and refunded in MySQL alone (see
//! `db::retired`): Redis no longer carries its changes to MySQL.

use std::convert::Infallible;

use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};

use super::auth::{Buyer, Caller};
use super::sales::rfc3339;
use super::{ApiError, AppState, Body};
use crate::db::retired::{self, RetiredRefund};
use crate::domain::{IdempotencyKey, OrderId, Qty, SaleId};
use crate::engine::{Cancellation, Order, OrderStatus, Refund, Reservation};
use crate::telemetry::{OutcomeLabels, ScopeLabels};

pub(super) fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/sales/{sale_id}/orders", post(reserve))
        .route("/api/v1/orders/{order_id}", get(show))
        .route("/api/v1/orders/{order_id}/cancel", post(cancel))
        .route("/api/v1/orders/{order_id}/refund", post(refund))
}

/// The order object of the contract.
#[derive(serde::Serialize)]
pub(super) struct OrderView {
    order_id: String,
    sale_id: String,
    user_id: String,
    qty: u32,
    amount_cents: i64,
    status: OrderStatus,
    created_at: String,
    payment_deadline: String,
    paid_at: Option<String>,
    closed_at: Option<String>,
    refunded_at: Option<String>,
}

impl From<Order> for OrderView {
    fn from(o: Order) -> Self {
        Self {
            order_id: o.id.to_string(),
            sale_id: o.id.sale().to_string(),
            user_id: o.user.to_string(),
            qty: o.qty,
            amount_cents: o.amount_cents,
            status: o.status,
            created_at: rfc3339(o.created_ms),
            payment_deadline: rfc3339(o.deadline_ms),
            paid_at: o.paid_ms.map(rfc3339),
            closed_at: o.closed_ms.map(rfc3339),
            refunded_at: o.refunded_ms.map(rfc3339),
        }
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ReserveRequest {
    #[serde(default = "one", deserialize_with = "whole_number")]
    qty: i64,
}

fn one() -> i64 {
    1
}

/// An integer, also when spelled as a whole float (`2.0`): JSON has one
/// number type, and the published schema's `integer` admits both spellings.
fn whole_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    let n = <serde_json::Number as serde::Deserialize>::deserialize(d)?;
    n.as_i64()
        .or_else(|| {
            // Whole floats up to 2^53 name one integer exactly.
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && f.abs() <= 9_007_199_254_740_992.0)
                .map(|f| f as i64)
        })
        .ok_or_else(|| serde::de::Error::custom(format!("expected an integer, found {n}")))
}

/// The raw `Idempotency-Key` header of a request, read without copying
/// the other headers (it is parsed after the rate limit, by
/// [`idempotency_key`]).
struct IdempotencyHeader(Option<HeaderValue>);

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyHeader {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Infallible> {
        static NAME: HeaderName = HeaderName::from_static("idempotency-key");
        Ok(Self(parts.headers.get(&NAME).cloned()))
    }
}

fn idempotency_key(header: Option<&HeaderValue>) -> Result<Option<IdempotencyKey>, ApiError> {
    match header {
        None => Ok(None),
        Some(v) => {
            let s = v.to_str().map_err(|_| {
                ApiError::InvalidRequest("Idempotency-Key must be printable ASCII".into())
            })?;
            Ok(Some(s.parse()?))
        }
    }
}

async fn reserve(
    State(state): State<AppState>,
    Buyer(user): Buyer,
    Path(sale): Path<String>,
    IdempotencyHeader(idem): IdempotencyHeader,
    body: Body,
) -> Result<(StatusCode, Json<OrderView>), ApiError> {
    let m = &state.metrics;
    if let Err(e) = state.limits.admit_buyer(user) {
        m.rate_limited
            .get_or_create(&ScopeLabels { scope: "buyer" })
            .inc();
        return Err(e);
    }
    let sale: SaleId = sale.parse()?;
    let key = idempotency_key(idem.as_ref())?;
    let qty = match body.json_or_empty::<ReserveRequest>()? {
        Some(r) => Qty::new(r.qty)?,
        None => Qty::default(),
    };
    let outcome = state.engine.reserve(sale, user, qty, key.as_ref()).await;
    let outcome = outcome.map_err(|failed| {
        m.reserve_unsure.inc();
        ApiError::from(failed)
    })?;
    match outcome {
        Reservation::Created(order) => {
            m.reservation("created");
            state.wakeup.deadline_added(order.deadline_ms);
            Ok((StatusCode::CREATED, Json(order.into())))
        }
        Reservation::Existing(order) => {
            m.reservation("replayed");
            Ok((StatusCode::CREATED, Json(order.into())))
        }
        Reservation::Refused(r) => {
            let err = ApiError::from(r);
            m.reservation(err.code());
            Err(err)
        }
    }
}

async fn show(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<OrderView>, ApiError> {
    let id: OrderId = id.parse()?;
    let order = match state.engine.order(id).await? {
        Some(o) if !state.engine.sale_retired(id.sale()).await? => o,
        in_redis => retired_order(&state, id, in_redis).await?,
    };
    if !caller.may_see(order.user) {
        return Err(ApiError::NotFound);
    }
    Ok(Json(order.into()))
}

fn mysql_error(e: impl std::fmt::Display) -> ApiError {
    ApiError::Unavailable(format!("mysql: {e:#}"))
}

/// An order Redis does not hold, or holds in a retired sale: MySQL's row
/// when its sale is retired (in MySQL, or in Redis, which then no longer
/// moves and has nothing MySQL lacks); any other order is not found.
async fn retired_order(
    state: &AppState,
    id: OrderId,
    in_redis: Option<Order>,
) -> Result<Order, ApiError> {
    match retired::order(&state.db, id).await.map_err(mysql_error)? {
        Some((order, retired)) if retired || in_redis.is_some() => Ok(order),
        _ => in_redis.ok_or(ApiError::NotFound),
    }
}

async fn cancel(
    State(state): State<AppState>,
    Buyer(user): Buyer,
    Path(id): Path<String>,
) -> Result<Json<OrderView>, ApiError> {
    let id: OrderId = id.parse()?;
    match state.engine.cancel(id, user).await? {
        Cancellation::Cancelled(order) => {
            state.metrics.order_event("cancelled", 1);
            Ok(Json(order.into()))
        }
        Cancellation::NotPending { order, closed_now } => {
            if closed_now {
                state.metrics.order_event("closed", 1);
            }
            Err(ApiError::OrderNotPending(order.status))
        }
        Cancellation::NotFound => Err(ApiError::NotFound),
    }
}

async fn refund(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<OrderView>), ApiError> {
    let id: OrderId = id.parse()?;
    let as_user = match caller {
        Caller::Admin => None,
        Caller::Buyer(u) => Some(u),
    };
    match state.engine.refund(id, as_user).await? {
        Refund::Refunded { order, now } => {
            if now {
                state
                    .metrics
                    .refunds
                    .get_or_create(&OutcomeLabels {
                        outcome: "immediate",
                    })
                    .inc();
                state.metrics.refund_wait.observe(0.0);
            }
            Ok((StatusCode::OK, Json(order.into())))
        }
        Refund::Accepted(order) => Ok((StatusCode::ACCEPTED, Json(order.into()))),
        Refund::NotPaid(order) => Err(ApiError::OrderNotPaid(order.status)),
        // Redis no longer holds the order, or its sale is retired: MySQL
        // refunds the orders of a retired sale (no restock: it has ended).
        in_redis @ (Refund::NotFound | Refund::Retired) => {
            match retired::refund(&state.db, id, as_user)
                .await
                .map_err(mysql_error)?
            {
                RetiredRefund::Refunded { order, now } => {
                    if now {
                        state
                            .metrics
                            .refunds
                            .get_or_create(&OutcomeLabels {
                                outcome: "after_retirement",
                            })
                            .inc();
                    }
                    Ok((StatusCode::OK, Json(order.into())))
                }
                RetiredRefund::NotPaid(order) => Err(ApiError::OrderNotPaid(order.status)),
                RetiredRefund::NotFound => Err(ApiError::NotFound),
                // Redis retired the sale and MySQL's commit is on its way
                // (the reconciler's next pass finishes it).
                RetiredRefund::NotRetired if in_redis == Refund::Retired => {
                    Err(ApiError::Unavailable("the sale is being retired".into()))
                }
                RetiredRefund::NotRetired => Err(ApiError::NotFound),
            }
        }
    }
}
