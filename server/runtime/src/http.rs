//! Serving HTTP to anyone on the network: an anonymous client can hold only a bounded
//! share of the server.
//!
//! * at most [`HttpLimits::per_address`] connections from one IP address and
//!   [`HttpLimits::total`] in all; past them a new connection is closed at once (counted);
//! * the request head must arrive within [`HttpLimits::header_timeout`] (slowloris);
//! * a request must be answered within [`HttpLimits::request_timeout`] (WebSocket
//!   upgrades answer at once and then live on their own terms);
//! * request bodies are capped at [`HttpLimits::max_body`];
//! * on shutdown, connections are closed gracefully.

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::watch;
use tower::ServiceExt;

/// The limits of one HTTP server.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Open connections from one IP address at most.
    pub per_address: usize,
    /// Open connections at most.
    pub total: usize,
    /// Time to receive a request's head.
    pub header_timeout: Duration,
    /// Time to answer a request.
    pub request_timeout: Duration,
    /// Largest request body, bytes.
    pub max_body: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            per_address: 64,
            total: 8192,
            header_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            max_body: 256 * 1024,
        }
    }
}

/// Counters of what the limits refused, for a server's `/metrics`.
#[derive(Debug, Default)]
pub struct HttpRefusals {
    /// Connections closed because their address (or the server) had too many.
    pub connections: AtomicU64,
}

/// Open connections per address.
#[derive(Debug, Default)]
struct Connections {
    by_address: HashMap<IpAddr, usize>,
    total: usize,
}

/// Holds a connection's place until dropped.
struct Place {
    table: Arc<Mutex<Connections>>,
    address: IpAddr,
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut t = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        t.total = t.total.saturating_sub(1);
        if let Some(n) = t.by_address.get_mut(&self.address) {
            *n -= 1;
            if *n == 0 {
                t.by_address.remove(&self.address);
            }
        }
    }
}

fn take_place(table: &Arc<Mutex<Connections>>, address: IpAddr, limits: &HttpLimits) -> Option<Place> {
    let mut t = table.lock().unwrap_or_else(PoisonError::into_inner);
    let n = t.by_address.get(&address).copied().unwrap_or(0);
    if n >= limits.per_address || t.total >= limits.total {
        return None;
    }
    t.by_address.insert(address, n + 1);
    t.total += 1;
    Some(Place { table: table.clone(), address })
}

/// Applies the request-level limits (timeout, body size) to `app`.
pub fn guard(app: Router, limits: &HttpLimits) -> Router {
    app.layer(axum::extract::DefaultBodyLimit::max(limits.max_body)).layer(
        tower_http::timeout::TimeoutLayer::with_status_code(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            limits.request_timeout,
        ),
    )
}

/// Serves `app` on `listener` within `limits` until `shutdown` turns true.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: HttpLimits,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    serve_counted(listener, app, limits, shutdown, Arc::default()).await
}

/// [`serve`], counting refusals into `refusals`.
pub async fn serve_counted(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: HttpLimits,
    mut shutdown: watch::Receiver<bool>,
    refusals: Arc<HttpRefusals>,
) -> std::io::Result<()> {
    let app = guard(app, &limits);
    let table: Arc<Mutex<Connections>> = Arc::default();
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_timeout).keep_alive(true);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: pass, do not spin.
                    tracing::warn!("HTTP accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = crate::stopped(&mut shutdown) => break,
        };
        let Some(place) = take_place(&table, peer.ip(), &limits) else {
            refusals.connections.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, "HTTP connection refused: too many from this address");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = hyper::service::service_fn({
            let app = app.clone();
            move |req: hyper::Request<hyper::body::Incoming>| {
                let app = app.clone();
                let mut req = req.map(axum::body::Body::new);
                // Handlers that rate-limit by client address read it as axum's ConnectInfo.
                req.extensions_mut().insert(axum::extract::ConnectInfo(peer));
                async move { app.oneshot(req).await }
            }
        });
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _place = place;
            if let Err(e) = conn.await {
                tracing::debug!(%peer, "HTTP connection ended: {e}");
            }
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(Duration::from_secs(5)) => tracing::warn!("HTTP connections still open after 5 s; closing"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn start(limits: HttpLimits) -> (std::net::SocketAddr, watch::Sender<bool>, Arc<HttpRefusals>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = watch::channel(false);
        let app = Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let refusals = Arc::new(HttpRefusals::default());
        tokio::spawn(serve_counted(listener, app, limits, rx, refusals.clone()));
        (addr, tx, refusals)
    }

    #[tokio::test]
    async fn one_address_holds_at_most_its_share_of_connections() {
        let limits = HttpLimits { per_address: 4, ..HttpLimits::default() };
        let (addr, _stop, refusals) = start(limits).await;
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        // The fifth is closed at once: a read sees the end of the stream.
        let mut fifth = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(2), fifth.read(&mut buf)).await.unwrap().unwrap_or(0);
        assert_eq!(n, 0);
        assert_eq!(refusals.connections.load(Ordering::Relaxed), 1);
        // A place freed is a place taken again.
        drop(held.pop());
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut again = tokio::net::TcpStream::connect(addr).await.unwrap();
        again.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.unwrap();
        let mut reply = String::new();
        again.read_to_string(&mut reply).await.unwrap();
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    }

    #[tokio::test]
    async fn a_client_that_never_finishes_its_request_head_is_cut_off() {
        let limits = HttpLimits { header_timeout: Duration::from_millis(300), ..HttpLimits::default() };
        let (addr, _stop, _) = start(limits).await;
        let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n").await.unwrap();
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(3), slow.read_to_end(&mut buf)).await;
        assert!(read.is_ok(), "the half-sent request was not cut off");
    }
}
