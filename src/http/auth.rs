//! Who is calling: buyers by HS256 JWT, the admin by a static bearer token,
//! the payment gateway by an HMAC-SHA256 signature of the raw body.
//!
//! Secrets are compared in constant time and never logged. This module only
//! authenticates; what a caller may touch is decided by the handlers.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::RwLock;

use axum::extract::FromRequestParts;
use axum::http::{header, request::Parts};
use hmac::{Hmac, Mac};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use super::error::ApiError;
use super::AppState;
use crate::domain::UserId;

/// A buyer token's claims.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    /// Optional: the contract requires only `sub` and `exp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iat: Option<u64>,
}

/// Issues buyer tokens (`flashsale token`, tests, load tests).
pub fn issue_token(secret: &SecretString, user: UserId, ttl_secs: u64) -> anyhow::Result<String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let claims = Claims {
        sub: user.to_string(),
        exp: now + ttl_secs,
        iat: Some(now),
    };
    let key = EncodingKey::from_secret(secret.expose_secret().as_bytes());
    Ok(jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &key,
    )?)
}

/// A buyer token that passed verification: the whole token, its buyer and
/// expiry.
struct Verified {
    token: Box<str>,
    user: UserId,
    exp: u64,
}

/// Bytes of a token's end that place it in the memory: the end of a JWT is
/// its HMAC signature, which differs between any two tokens, so hashing it
/// alone spreads them as well as hashing the whole string (and costs a
/// fifth). Only a placement: a token is found only by the whole string.
const PLACED_BY: usize = 32;

/// Verified tokens by a hash of their end (already a hash: used as is).
type Memory = HashMap<u64, Verified, BuildHasherDefault<AsIs>>;

/// A hasher for keys that are hashes already.
#[derive(Default)]
struct AsIs(u64);

impl Hasher for AsIs {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Verified tokens kept at most; past it the memory starts over.
const VERIFIED_MAX: usize = 100_000;

fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The keys and secrets that authenticate callers.
pub struct Authenticator {
    decoding: DecodingKey,
    validation: Validation,
    verified: RwLock<Memory>,
    /// Keyed at random per process: where a token is placed is not known
    /// outside.
    placing: RandomState,
    admin_token: SecretString,
    payment_secret: SecretString,
}

impl Authenticator {
    /// Builds the verifier from the configured secrets.
    pub fn new(
        jwt_secret: &SecretString,
        admin_token: SecretString,
        payment_secret: SecretString,
    ) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = 0;
        Self {
            decoding: DecodingKey::from_secret(jwt_secret.expose_secret().as_bytes()),
            validation,
            verified: RwLock::default(),
            placing: RandomState::new(),
            admin_token,
            payment_secret,
        }
    }

    /// A verifier for a process without the HTTP role (which needs no
    /// secrets): keyed with random secrets nobody holds, so it accepts no
    /// credential at all.
    pub fn refusing_all() -> Self {
        use std::hash::{BuildHasher, Hasher};
        let random = || {
            (0..4)
                .map(|_| {
                    let h = std::collections::hash_map::RandomState::new()
                        .build_hasher()
                        .finish();
                    format!("{h:016x}")
                })
                .collect::<String>()
        };
        Self::new(
            &SecretString::from(random()),
            SecretString::from(random()),
            SecretString::from(random()),
        )
    }

    fn is_admin(&self, token: &str) -> bool {
        let expected = self.admin_token.expose_secret().as_bytes();
        bool::from(token.as_bytes().ct_eq(expected))
    }

    /// The buyer a token names. A buyer retrying through a flood sends the
    /// same token again and again: a token that verified once is remembered
    /// (the exact string, so nothing else can match it) until its `exp`,
    /// judged as `jsonwebtoken` judges it, and is not verified again.
    fn buyer(&self, token: &str) -> Result<UserId, ApiError> {
        let now = unix_secs();
        let place = self
            .placing
            .hash_one(&token.as_bytes()[token.len().saturating_sub(PLACED_BY)..]);
        {
            let verified = self.verified.read().unwrap_or_else(|p| p.into_inner());
            if let Some(v) = verified.get(&place) {
                if *v.token == *token && v.exp >= now {
                    return Ok(v.user);
                }
            }
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|_| ApiError::Unauthorized)?;
        let user: UserId = data
            .claims
            .sub
            .parse()
            .map_err(|_| ApiError::Unauthorized)?;
        let mut verified = self.verified.write().unwrap_or_else(|p| p.into_inner());
        if verified.len() >= VERIFIED_MAX {
            verified.clear();
        }
        // Another token of the same place (64 bits alike: all but never)
        // is replaced; it is verified again when it comes back.
        verified.insert(
            place,
            Verified {
                token: token.into(),
                user,
                exp: data.claims.exp,
            },
        );
        Ok(user)
    }

    /// Checks `X-Signature: sha256=<hex>` against the raw body.
    pub fn verify_payment_signature(&self, header: Option<&str>, body: &[u8]) -> bool {
        let Some(hex_sig) = header.and_then(|h| h.trim().strip_prefix("sha256=")) else {
            return false;
        };
        let Ok(sig) = hex::decode(hex_sig) else {
            return false;
        };
        let Ok(mut mac) =
            Hmac::<Sha256>::new_from_slice(self.payment_secret.expose_secret().as_bytes())
        else {
            return false;
        };
        mac.update(body);
        mac.verify_slice(&sig).is_ok()
    }
}

fn bearer(parts: &Parts) -> Result<&str, ApiError> {
    parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or(ApiError::Unauthorized)
}

/// A caller with a valid buyer token.
#[derive(Debug, Clone, Copy)]
pub struct Buyer(pub UserId);

/// A caller with the admin token.
#[derive(Debug, Clone, Copy)]
pub struct Admin;

/// A caller who is either the admin or a buyer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// The admin: may read any order.
    Admin,
    /// A buyer: may read their own orders.
    Buyer(UserId),
}

impl Caller {
    /// Whether the caller may see an order of `owner`.
    pub fn may_see(self, owner: UserId) -> bool {
        match self {
            Self::Admin => true,
            Self::Buyer(u) => u == owner,
        }
    }
}

impl FromRequestParts<AppState> for Buyer {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        state.auth.buyer(bearer(parts)?).map(Buyer)
    }
}

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        if state.auth.is_admin(bearer(parts)?) {
            Ok(Admin)
        } else {
            Err(ApiError::Unauthorized)
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer(parts)?;
        if state.auth.is_admin(token) {
            Ok(Caller::Admin)
        } else {
            state.auth.buyer(token).map(Caller::Buyer)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Authenticator {
        Authenticator::new(
            &SecretString::from("jwt"),
            SecretString::from("admin"),
            SecretString::from("pay"),
        )
    }

    #[test]
    fn tokens_round_trip_and_wrong_secrets_fail() {
        let user = UserId::new(7).unwrap();
        let token = issue_token(&SecretString::from("jwt"), user, 60).unwrap();
        assert_eq!(auth().buyer(&token).unwrap(), user);
        let forged = issue_token(&SecretString::from("other"), user, 60).unwrap();
        assert!(auth().buyer(&forged).is_err());
        assert!(auth().buyer("not.a.jwt").is_err());
    }

    #[test]
    fn a_remembered_token_still_expires_and_forgeries_never_match_it() {
        let a = auth();
        let user = UserId::new(9).unwrap();
        // exp = this second: valid now, expired once the clock moves on.
        let token = issue_token(&SecretString::from("jwt"), user, 0).unwrap();
        assert_eq!(a.buyer(&token).unwrap(), user);
        assert_eq!(a.buyer(&token).unwrap(), user, "answered from memory");
        let mut forged = token.clone();
        forged.pop();
        forged.push(if token.ends_with('A') { 'B' } else { 'A' });
        assert!(a.buyer(&forged).is_err());
        // Another buyer's claims under the remembered token's signature:
        // the same end, so the same place in the memory, yet not a match.
        let other = issue_token(&SecretString::from("jwt"), UserId::new(10).unwrap(), 60).unwrap();
        let signature = token.rsplit('.').next().unwrap();
        let (claims, _) = other.rsplit_once('.').unwrap();
        let spliced = format!("{claims}.{signature}");
        assert!(spliced.len() > PLACED_BY && signature.len() >= PLACED_BY);
        assert!(a.buyer(&spliced).is_err());
        assert_eq!(a.buyer(&token).unwrap(), user, "still remembered");
        std::thread::sleep(std::time::Duration::from_millis(1100));
        assert!(a.buyer(&token).is_err(), "expired, though remembered");
    }

    #[test]
    fn signatures_are_checked_against_the_raw_body() {
        let mut mac = Hmac::<Sha256>::new_from_slice(b"pay").unwrap();
        mac.update(b"{}");
        let good = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        let a = auth();
        assert!(a.verify_payment_signature(Some(&good), b"{}"));
        assert!(!a.verify_payment_signature(Some(&good), b"{ }"));
        assert!(!a.verify_payment_signature(None, b"{}"));
        assert!(!a.verify_payment_signature(Some("sha256=zz"), b"{}"));
    }
}
