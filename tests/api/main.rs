//! Integration tests: the real app against the real Redis and MariaDB.

mod audit;
mod bad_input;
mod dashboards;
mod deploy;
mod downstream;
mod events;
mod expiry;
mod failover;
mod front_door;
mod helpers;
mod lifecycle;
mod operations;
mod outbox;
mod points;
mod prometheus;
mod quarantine;
mod reconcile;
mod redis_loss;
mod redis_outage;
mod refund;
mod reserve;
mod retire;
mod sale_controls;
mod topology;
