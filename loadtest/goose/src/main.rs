//! Goose load test of the seckill endpoint, `POST /api/v1/sales/{id}/orders`:
//! the same scenario as `loadtest/k6/seckill.js`. Every iteration is a
//! distinct buyer with a token made from the shared secret; every answer is
//! checked against the contract (201 with an order, or an allowed error).
//!
//! ```text
//! SALE_ID=1 FLASHSALE_JWT_SECRET=dev-jwt-secret-change-me-32-bytes-min \
//!   cargo run --release -p flashsale-goose -- --host http://127.0.0.1:8080 \
//!   --users 50 --increase-rate 50 --run-time 30s --threshold "error-rate<1%"
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use flashsale::domain::UserId;
use goose::prelude::*;
use secrecy::SecretString;

struct Setup {
    path: String,
    secret: SecretString,
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let sale = std::env::var("SALE_ID").expect("SALE_ID names the sale to load");
        let secret = std::env::var("FLASHSALE_JWT_SECRET")
            .unwrap_or_else(|_| "dev-jwt-secret-change-me-32-bytes-min".into());
        Setup {
            path: format!("/api/v1/sales/{sale}/orders"),
            secret: SecretString::from(secret),
        }
    })
}

/// The error codes the contract allows on this endpoint, by status.
fn allowed(status: u16, code: &str) -> bool {
    match status {
        400 => code == "invalid_request",
        401 => code == "unauthorized",
        404 => code == "not_found",
        409 => matches!(
            code,
            "sale_not_started" | "sale_ended" | "sold_out" | "limit_exceeded"
        ),
        413 => code == "payload_too_large",
        429 => code == "rate_limited",
        503 => code == "unavailable",
        _ => false,
    }
}

async fn reserve(user: &mut GooseUser) -> TransactionResult {
    static NEXT_BUYER: AtomicU64 = AtomicU64::new(1);
    let s = setup();
    let buyer = UserId::new(NEXT_BUYER.fetch_add(1, Ordering::Relaxed)).expect("positive");
    let token = flashsale::http::auth::issue_token(&s.secret, buyer, 3600).expect("token");
    let builder = user
        .get_request_builder(&GooseMethod::Post, &s.path)?
        .bearer_auth(token)
        .header("Content-Type", "application/json")
        .body(r#"{"qty":1}"#);
    let request = GooseRequest::builder()
        .set_request_builder(builder)
        .name("reserve")
        .build();
    let mut goose = user.request(request).await?;
    let Ok(response) = goose.response else {
        return Ok(()); // transport errors are recorded by goose itself
    };
    let status = response.status().as_u16();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    let ok = match status {
        201 => body["status"] == "pending" && body["user_id"] == buyer.to_string().as_str(),
        _ => allowed(status, body["error"]["code"].as_str().unwrap_or("")),
    };
    if ok && (status == 201 || status == 409) {
        // Sold out and per-user limits are the expected answers of a flash sale.
        user.set_success(&mut goose.request)?;
    } else if !ok {
        return user.set_failure(
            &format!("{status} outside the contract: {body}"),
            &mut goose.request,
            None,
            None,
        );
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), GooseError> {
    setup();
    GooseAttack::initialize()?
        .register_scenario(scenario!("Seckill").register_transaction(transaction!(reserve)))
        .execute()
        .await?;
    Ok(())
}
