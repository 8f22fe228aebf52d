//! Rate limits at the front door: per buyer on the seckill endpoint, and
//! optionally per client address on the API (never on the payment
//! callback, which the gateway sends from few addresses).
//!
//! Both are GCRA limiters (the `governor` crate) kept in this process's
//! memory: with N instances behind a load balancer a buyer may send up to N
//! times the rate in all. What a limit refuses costs no Redis call.

use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

use super::{ApiError, AppState};
use crate::domain::UserId;
use crate::telemetry::ScopeLabels;

/// A requests-per-second rate with its burst; a rate of zero is no limit.
#[derive(Debug, Clone, Copy)]
pub struct Rate {
    /// Requests per second, sustained.
    pub per_sec: u32,
    /// Requests at once before the rate applies.
    pub burst: u32,
}

/// One keyed limiter, or none when its rate is zero.
struct Keyed<K: Hash + Eq + Clone>(Option<DefaultKeyedRateLimiter<K>>);

impl<K: Hash + Eq + Clone> Keyed<K> {
    fn new(rate: Rate) -> Self {
        Self(NonZeroU32::new(rate.per_sec).map(|per_sec| {
            let burst = NonZeroU32::new(rate.burst).unwrap_or(per_sec);
            DefaultKeyedRateLimiter::keyed(Quota::per_second(per_sec).allow_burst(burst))
        }))
    }

    /// `Err(RateLimited)` with the whole seconds until `key` may send again.
    fn check(&self, key: &K) -> Result<(), ApiError> {
        let Some(limiter) = &self.0 else {
            return Ok(());
        };
        limiter.check_key(key).map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            ApiError::RateLimited {
                retry_after_secs: wait.as_secs() + u64::from(wait.subsec_nanos() > 0),
            }
        })
    }

    /// Forgets keys whose state is back to fresh (bounds the memory).
    fn purge(&self) -> usize {
        self.0.as_ref().map_or(0, |l| {
            l.retain_recent();
            l.shrink_to_fit();
            l.len()
        })
    }
}

/// This process's rate limiters.
pub struct RateLimits {
    buyer: Keyed<u64>,
    address: Keyed<IpAddr>,
}

impl RateLimits {
    /// Limiters for buyers and client addresses (a zero rate: none).
    pub fn new(buyer: Rate, address: Rate) -> Self {
        Self {
            buyer: Keyed::new(buyer),
            address: Keyed::new(address),
        }
    }

    /// Admits one reserve request of `user`, or refuses it with 429.
    pub fn admit_buyer(&self, user: UserId) -> Result<(), ApiError> {
        self.buyer.check(&user.get())
    }

    /// Forgets idle buyers and addresses; returns how many are tracked.
    pub fn purge(&self) -> usize {
        self.buyer.purge() + self.address.purge()
    }

    /// Whether any address limit is on.
    pub fn limits_addresses(&self) -> bool {
        self.address.0.is_some()
    }
}

/// How often idle keys are forgotten.
pub const PURGE_EVERY: Duration = Duration::from_secs(10);

/// Middleware: the per-address limit. The address is the TCP peer (behind
/// a load balancer, the balancer's: keep the limit off there).
pub async fn per_address(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    if let Some(ip) = peer {
        if let Err(e) = state.limits.address.check(&ip) {
            state
                .metrics
                .rate_limited
                .get_or_create(&ScopeLabels { scope: "address" })
                .inc();
            return e.into_response();
        }
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buyer_gets_the_burst_then_waits_whole_seconds() {
        let limits = RateLimits::new(
            Rate {
                per_sec: 1,
                burst: 3,
            },
            Rate {
                per_sec: 0,
                burst: 1,
            },
        );
        let (a, b) = (UserId::new(1).unwrap(), UserId::new(2).unwrap());
        for _ in 0..3 {
            limits.admit_buyer(a).unwrap();
        }
        match limits.admit_buyer(a) {
            Err(ApiError::RateLimited { retry_after_secs }) => assert_eq!(retry_after_secs, 1),
            other => panic!("expected 429, got {other:?}"),
        }
        // Another buyer has a budget of their own.
        limits.admit_buyer(b).unwrap();
        assert!(!limits.limits_addresses());
        let off = RateLimits::new(
            Rate {
                per_sec: 0,
                burst: 1,
            },
            Rate {
                per_sec: 0,
                burst: 1,
            },
        );
        for _ in 0..1000 {
            off.admit_buyer(a).unwrap();
        }
    }
}
