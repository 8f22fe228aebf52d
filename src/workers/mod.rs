//! Background workers that run beside the HTTP API (or alone, in their own
//! processes): each is a `try_step` inside a loop, so tests can drive one
//! step at a time, and each loop stops when its cancellation token fires.

pub mod expiry;
pub mod guard;
pub mod live;
pub mod reconciler;
pub mod relay;
pub mod retire;
pub mod supervisor;
pub mod sweep;
