//! The HTTP server loop: hyper HTTP/1.1 with a timer, so that a client that
//! does not send a whole request head in time, or a keep-alive connection
//! left idle, is closed; and a cap on open connections, so that the process
//! never runs out of file descriptors (the rest wait in the listen backlog).
//!
//! Shutdown stops accepting, lets each connection finish the request it is
//! serving, closes idle ones at once, and waits for them up to a bound.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// Limits on connections.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Time a client has to send a whole request head.
    pub header_timeout: Duration,
    /// Time an idle keep-alive connection stays open at most.
    pub idle_timeout: Duration,
    /// Connections held open at most.
    pub max_connections: usize,
    /// How long shutdown waits for connections to finish.
    pub drain: Duration,
}

/// File descriptors kept for everything but client connections (Redis,
/// MySQL, the listener, logs).
const RESERVED_FDS: u64 = 256;

/// Raises the soft open-file limit so that `wanted` connections fit, and
/// returns the connection cap that does fit (lower, with a warning, when the
/// hard limit does not allow `wanted`).
pub fn fit_connections(wanted: usize) -> usize {
    let need = wanted as u64 + RESERVED_FDS;
    let limit = match rlimit::increase_nofile_limit(need) {
        Ok(limit) => limit,
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the open-file limit");
            rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft)
        }
    };
    let fit = usize::try_from(limit.saturating_sub(RESERVED_FDS))
        .unwrap_or(usize::MAX)
        .max(1);
    if fit < wanted {
        tracing::warn!(
            wanted,
            allowed = fit,
            open_file_limit = limit,
            "FLASHSALE_MAX_CONNECTIONS lowered to what the open-file limit allows"
        );
        fit
    } else {
        wanted
    }
}

/// Serves `app` on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnLimits,
    open: Gauge,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let conns = TaskTracker::new();
    loop {
        // Past the cap, connections wait in the kernel's backlog.
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            p = permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
        };
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors or a connection reset before accept:
                    // wait a little instead of spinning; never give up.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        conns.spawn(connection(
            stream,
            peer,
            app.clone(),
            limits,
            shutdown.clone(),
            (permit, open.clone()),
        ));
    }
    drop(listener);
    conns.close();
    if tokio::time::timeout(limits.drain, conns.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = conns.len(),
            "connections still open after the drain time; closing them"
        );
    }
    Ok(())
}

/// Requests in progress on one connection, and when the last one ended.
struct Activity {
    born: Instant,
    in_flight: AtomicUsize,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            born: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
        }
    }

    /// When the connection will have been idle for `idle`, as far as is
    /// known now (a request in progress pushes it a whole `idle` away).
    fn idle_deadline(&self, idle: Duration) -> Instant {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return Instant::now() + idle;
        }
        self.born + Duration::from_millis(self.last_ms.load(Ordering::Acquire)) + idle
    }

    fn idle_for(&self) -> Duration {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return Duration::ZERO;
        }
        let last = self.born + Duration::from_millis(self.last_ms.load(Ordering::Acquire));
        Instant::now().saturating_duration_since(last)
    }
}

/// Marks a request in progress until dropped.
struct Busy(Arc<Activity>);

impl Busy {
    fn new(activity: &Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        Self(activity.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let ms = self.0.born.elapsed().as_millis() as u64;
        self.0.last_ms.store(ms, Ordering::Release);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    limits: ConnLimits,
    shutdown: CancellationToken,
    (_permit, open): (OwnedSemaphorePermit, Gauge),
) {
    open.inc();
    let activity = Arc::new(Activity::new());
    let service = {
        let activity = activity.clone();
        hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            let mut req = req.map(axum::body::Body::new);
            req.extensions_mut().insert(ConnectInfo(peer));
            let busy = Busy::new(&activity);
            let app = app.clone();
            async move {
                let res = app.oneshot(req).await;
                drop(busy);
                res
            }
        })
    };
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let mut closing = false;
    loop {
        let idle_at = activity.idle_deadline(limits.idle_timeout);
        tokio::select! {
            ended = conn.as_mut() => {
                if let Err(e) = ended {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                break;
            }
            () = shutdown.cancelled(), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            () = tokio::time::sleep_until(idle_at), if !closing => {
                if activity.idle_for() >= limits.idle_timeout {
                    tracing::debug!(%peer, "closing an idle connection");
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
        }
    }
    open.dec();
}
