//! The one error type of the HTTP API and its contract body,
//! `{"error": {"code": "...", "message": "..."}}`.
//!
//! Every rejection (bad JSON, oversized body, unknown route, overload) goes
//! through here so that clients see one format. Server faults are logged with
//! their detail and answered with a generic message.

use axum::body::Bytes;
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
    /// Reserve while an admin has the sale paused.
    #[error("the sale is paused")]
    SalePaused,
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
    #[error("too many requests; retry after {retry_after_secs} s")]
    RateLimited {
        /// Whole seconds until the caller may send again (at least 1).
        retry_after_secs: u64,
    },
    /// A store is unreachable or the service is overloaded.
    #[error("service unavailable: {0}")]
    Unavailable(String),
    /// A fault of the server itself.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
    /// A server-side error (5xx) of a reserve whose outcome is unknown:
    /// retrying with `Idempotency-Key: <retry_key>` finds its order, if it
    /// made one, and reserves at most once in all.
    #[error("{error}")]
    Unsure {
        /// The error the caller sees.
        error: Box<ApiError>,
        /// The key that finds the reservation again.
        retry_key: String,
    },
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
            Self::SalePaused => "sale_paused",
            Self::SoldOut => "sold_out",
            Self::LimitExceeded => "limit_exceeded",
            Self::OrderNotPending(_) => "order_not_pending",
            Self::OrderExpired => "order_expired",
            Self::OrderNotPaid(_) => "order_not_paid",
            Self::AmountMismatch => "amount_mismatch",
            Self::PayloadTooLarge => "payload_too_large",
            Self::MethodNotAllowed(_) => "method_not_allowed",
            Self::RateLimited { .. } => "rate_limited",
            Self::Unavailable(_) => "unavailable",
            Self::Internal(_) => "internal",
            Self::Unsure { error, .. } => error.code(),
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
            | Self::SalePaused
            | Self::SoldOut
            | Self::LimitExceeded
            | Self::OrderNotPending(_)
            | Self::OrderExpired
            | Self::OrderNotPaid(_) => StatusCode::CONFLICT,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Unsure { error, .. } => error.status_code(),
        }
    }

    /// Attaches the retry key of a reserve to a server-side error (client
    /// errors say for sure that nothing was reserved, and stay as they are).
    pub fn with_retry_key(self, retry_key: String) -> Self {
        if self.status_code().is_server_error() {
            Self::Unsure {
                error: Box::new(self),
                retry_key,
            }
        } else {
            self
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let Some(body) = self.fixed_body() {
            // No Retry-After: the fixed answers are neither 503 nor 429.
            return (
                self.status_code(),
                [(header::CONTENT_TYPE, JSON)],
                Bytes::from_static(body),
            )
                .into_response();
        }
        let (error, retry_key) = match self {
            Self::Unsure { error, retry_key } => (*error, Some(retry_key)),
            other => (other, None),
        };
        let message = match &error {
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
        let status = match &error {
            Self::OrderNotPending(s) | Self::OrderNotPaid(s) => Some(s.as_str()),
            _ => None,
        };
        let body = ErrorBody {
            error: ErrorDetail {
                code: error.code(),
                message: &message,
                status,
                retry_key: retry_key.as_deref(),
            },
        };
        let mut res = (error.status_code(), Json(body)).into_response();
        let retry_after = match error {
            Self::Unavailable(_) => Some(1),
            Self::RateLimited { retry_after_secs } => Some(retry_after_secs.max(1)),
            _ => None,
        };
        if let Some(secs) = retry_after {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        res
    }
}

/// The `Content-Type` of every error body (what `Json` sets).
const JSON: HeaderValue = HeaderValue::from_static("application/json");

/// The answers whose body never changes.
const FIXED: usize = 10;

impl ApiError {
    /// The body of an answer that is always the same bytes (no detail, no
    /// status, no retry key), made once by the same serializer as the
    /// others and kept: a flood of refusals (sold out, bad tokens) then
    /// formats and allocates nothing.
    fn fixed_body(&self) -> Option<&'static [u8]> {
        static BODIES: [std::sync::OnceLock<&'static [u8]>; FIXED] =
            [const { std::sync::OnceLock::new() }; FIXED];
        let slot = match self {
            Self::Unauthorized => 0,
            Self::NotFound => 1,
            Self::SaleNotStarted => 2,
            Self::SaleEnded => 3,
            Self::SalePaused => 4,
            Self::SoldOut => 5,
            Self::LimitExceeded => 6,
            Self::OrderExpired => 7,
            Self::AmountMismatch => 8,
            Self::PayloadTooLarge => 9,
            _ => return None,
        };
        Some(BODIES[slot].get_or_init(|| {
            let message = self.to_string();
            let body = ErrorBody {
                error: ErrorDetail {
                    code: self.code(),
                    message: &message,
                    status: None,
                    retry_key: None,
                },
            };
            let bytes = serde_json::to_vec(&body).expect("an error body serializes");
            Box::leak(bytes.into_boxed_slice())
        }))
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
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_key: Option<&'a str>,
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
        if e.is_permanent() {
            Self::Internal(e.into())
        } else {
            Self::Unavailable(e.to_string())
        }
    }
}

impl From<crate::engine::ReserveFailed> for ApiError {
    fn from(f: crate::engine::ReserveFailed) -> Self {
        Self::from(f.source).with_retry_key(f.retry_key)
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
            Refusal::Paused => Self::SalePaused,
            Refusal::SoldOut => Self::SoldOut,
            Refusal::LimitExceeded => Self::LimitExceeded,
            Refusal::BacklogFull => {
                Self::Unavailable("the sale's flow backlog is at its bound".into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kept bodies are the bytes the serializer makes for each answer.
    #[tokio::test]
    async fn fixed_bodies_are_the_serialized_ones() {
        let fixed = || {
            [
                ApiError::Unauthorized,
                ApiError::NotFound,
                ApiError::SaleNotStarted,
                ApiError::SaleEnded,
                ApiError::SalePaused,
                ApiError::SoldOut,
                ApiError::LimitExceeded,
                ApiError::OrderExpired,
                ApiError::AmountMismatch,
                ApiError::PayloadTooLarge,
            ]
        };
        for (i, error) in fixed().into_iter().enumerate() {
            let expected = serde_json::json!({
                "error": {"code": error.code(), "message": error.to_string()}
            })
            .to_string();
            // The first answer makes the body, the second reuses it.
            for _ in 0..2 {
                let res = fixed().into_iter().nth(i).unwrap().into_response();
                assert_eq!(res.status(), error.status_code());
                assert_eq!(res.headers()[header::CONTENT_TYPE], "application/json");
                assert!(res.headers().get(header::RETRY_AFTER).is_none());
                let body = axum::body::to_bytes(res.into_body(), 1 << 16)
                    .await
                    .unwrap();
                assert_eq!(std::str::from_utf8(&body).unwrap(), expected);
            }
        }
        assert!(ApiError::SoldOut
            .with_retry_key("k".into())
            .fixed_body()
            .is_some());
        assert!(ApiError::Unavailable("x".into())
            .with_retry_key("k".into())
            .fixed_body()
            .is_none());
    }
}
