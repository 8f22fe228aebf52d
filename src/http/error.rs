//! The one error type of the HTTP API and its contract body,
//! `{"error": {"code": "...", "message": "..."}}`.
//!
//! Every rejection (bad JSON, oversized body, unknown route, overload) goes
//! through here so that clients see one format. Server faults are logged with
//! their detail and answered with a generic message.

use axum::extract::rejection::BytesRejection;
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::domain::InvalidValue;
use crate::engine::{EngineError, OrderStatus, Refusal};

/// An API error with a stable `code`.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed JSON, wrong types, out-of-range values, bad id syntax.
    #[error("{0}")]
    InvalidRequest(String),
    /// Missing, malformed, expired or wrongly signed credentials.
    #[error("missing or invalid credentials")]
    Unauthorized,
    /// No such sale or order, or not the caller's.
    #[error("not found")]
    NotFound,
    /// Reserve before the sale's start.
    #[error("the sale has not started")]
    SaleNotStarted,
    /// Reserve at or after the sale's end.
    #[error("the sale has ended")]
    SaleEnded,
    /// Not enough stock left.
    #[error("sold out")]
    SoldOut,
    /// The buyer would exceed the per-user limit.
    #[error("the per-user limit of this sale would be exceeded")]
    LimitExceeded,
    /// The order is no longer pending.
    #[error("the order is {}", .0.as_str())]
    OrderNotPending(OrderStatus),
    /// A payment past the order's deadline.
    #[error("the order's payment deadline has passed")]
    OrderExpired,
    /// A refund of an order that is not paid.
    #[error("the order is {}, not paid", .0.as_str())]
    OrderNotPaid(OrderStatus),
    /// A payment for another amount than the order's.
    #[error("the amount differs from the order's amount")]
    AmountMismatch,
    /// A body over the limit.
    #[error("the request body is larger than 16 KiB")]
    PayloadTooLarge,
    /// A method the path does not take (the router adds `Allow`).
    #[error("this path does not take the method {0}")]
    MethodNotAllowed(Method),
    /// The caller sends too fast.
    #[error("too many requests")]
    RateLimited,
    /// A store is unreachable or the service is overloaded.
    #[error("service unavailable: {0}")]
    Unavailable(String),
    /// A fault of the server itself.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl ApiError {
    /// The stable error code of the contract.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidRequest(_) => "invalid_request",
            Self::Unauthorized => "unauthorized",
            Self::NotFound => "not_found",
            Self::SaleNotStarted => "sale_not_started",
            Self::SaleEnded => "sale_ended",
            Self::SoldOut => "sold_out",
            Self::LimitExceeded => "limit_exceeded",
            Self::OrderNotPending(_) => "order_not_pending",
            Self::OrderExpired => "order_expired",
            Self::OrderNotPaid(_) => "order_not_paid",
            Self::AmountMismatch => "amount_mismatch",
            Self::PayloadTooLarge => "payload_too_large",
            Self::MethodNotAllowed(_) => "method_not_allowed",
            Self::RateLimited => "rate_limited",
            Self::Unavailable(_) => "unavailable",
            Self::Internal(_) => "internal",
        }
    }

    /// The HTTP status of the contract.
    pub fn status_code(&self) -> StatusCode {
        match self {
            Self::InvalidRequest(_) | Self::AmountMismatch => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::SaleNotStarted
            | Self::SaleEnded
            | Self::SoldOut
            | Self::LimitExceeded
            | Self::OrderNotPending(_)
            | Self::OrderExpired
            | Self::OrderNotPaid(_) => StatusCode::CONFLICT,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let message = match &self {
            Self::Unavailable(detail) => {
                tracing::warn!(detail, "answering 503");
                "the service is unavailable; retry shortly".to_owned()
            }
            Self::Internal(e) => {
                tracing::error!(error = ?e, "internal error");
                "internal error".to_owned()
            }
            other => other.to_string(),
        };
        let status = match &self {
            Self::OrderNotPending(s) | Self::OrderNotPaid(s) => Some(s.as_str()),
            _ => None,
        };
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code(),
                message: &message,
                status,
            },
        };
        let mut res = (self.status_code(), Json(body)).into_response();
        if matches!(self, Self::Unavailable(_) | Self::RateLimited) {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        res
    }
}

/// The contract's error body: `{"error": {"code", "message", "status"?}}`.
#[derive(serde::Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(serde::Serialize)]
struct ErrorDetail<'a> {
    code: &'static str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<&'static str>,
}

impl From<InvalidValue> for ApiError {
    fn from(e: InvalidValue) -> Self {
        Self::InvalidRequest(e.0)
    }
}

/// Faults that retrying will not cure are `500 internal`: Redis ran the call
/// and refused it (a script's runtime error, a script's own refusal such as a
/// sale of another layout, a wrong key type) or answered in a shape the
/// script's contract does not allow. Everything else (a timeout, a lost or
/// refused connection, a server that is loading, failing over, busy or out of
/// memory) is `503 unavailable` with `Retry-After`.
impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match &e {
            EngineError::Protocol(_) => Self::Internal(e.into()),
            EngineError::Redis(r) if is_permanent(r) => Self::Internal(e.into()),
            _ => Self::Unavailable(e.to_string()),
        }
    }
}

/// Whether Redis refused the call itself, so that the same call would fail
/// again (see `impl From<EngineError> for ApiError`).
fn is_permanent(e: &redis::RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    match e.kind() {
        ErrorKind::Server(kind) => matches!(
            kind,
            ServerErrorKind::ResponseError
                | ServerErrorKind::ExecAbort
                | ServerErrorKind::CrossSlot
                | ServerErrorKind::NoPerm
        ),
        // Error codes redis-rs has no kind for: a script's own `error({err =
        // ...})`, WRONGTYPE, ... are permanent; these are the server's
        // passing states.
        ErrorKind::Extension => !matches!(
            e.code(),
            Some("BUSY" | "OOM" | "MISCONF" | "NOREPLICAS" | "UNBLOCKED")
        ),
        _ => false,
    }
}

impl From<BytesRejection> for ApiError {
    fn from(r: BytesRejection) -> Self {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Self::PayloadTooLarge
        } else {
            Self::InvalidRequest(r.body_text())
        }
    }
}

impl From<Refusal> for ApiError {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::NotFound => Self::NotFound,
            Refusal::NotStarted => Self::SaleNotStarted,
            Refusal::Ended => Self::SaleEnded,
            Refusal::SoldOut => Self::SoldOut,
            Refusal::LimitExceeded => Self::LimitExceeded,
            Refusal::BacklogFull => {
                Self::Unavailable("the sale's flow backlog is at its bound".into())
            }
        }
    }
}
