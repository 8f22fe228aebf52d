//! The floor of this HTTP stack: the service's own connection loop
//! (`flashsale::http::server::serve`: hyper, axum, the same runtime and
//! allocator) with
//! one axum handler that answers every reserve the sold-out answer's bytes,
//! `409` and a fixed JSON body, touching nothing else: no token check, no
//! Redis, no metrics. `loadtest/bench.sh` puts the sold-out flood beside it.
//!
//!   cargo run --release --example bench_bare_409 -- --listen 127.0.0.1:18183

use std::time::Duration;

use axum::http::{header, StatusCode};
use axum::routing::post;
use axum::Router;
use clap::Parser;
use flashsale::http::server::{serve, ConnLimits};
use tokio_util::sync::CancellationToken;

// The service's allocator (src/main.rs), so that this stays its floor.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:18183")]
    listen: std::net::SocketAddr,
}

/// The body the service answers a reserve of a sold-out sale with.
const SOLD_OUT: &str = r#"{"error":{"code":"sold_out","message":"sold out"}}"#;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let app = Router::new().route(
        "/api/v1/sales/{sale_id}/orders",
        post(|| async {
            (
                StatusCode::CONFLICT,
                [(header::CONTENT_TYPE, "application/json")],
                SOLD_OUT,
            )
        }),
    );
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let stop = CancellationToken::new();
    let on_signal = stop.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        on_signal.cancel();
    });
    let limits = ConnLimits {
        header_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(60),
        max_connections: 10_000,
        drain: Duration::from_secs(1),
    };
    serve(listener, app, limits, Default::default(), stop).await?;
    Ok(())
}
