//! The Pylon edge relay.
//!
//! * [`ingest`]: accepts render nodes over QUIC (RTP in datagrams, control on a stream).
//! * [`egress`]: one task driving every viewer's `str0m` WebRTC session over one UDP
//!   socket, forwarding RTP without decoding it.
//! * [`http`]: the web player, the WebSocket signalling endpoint and `/metrics` (axum).
//! * [`metrics`]: Prometheus metrics.
//! * [`tls`]: the relay's QUIC certificate, created once and kept in the data directory.
//!
//! **Invariant:** the relay never decodes video; it reads RTP headers only.

pub mod egress;
pub mod http;
pub mod ingest;
pub mod metrics;
pub mod tls;

use anyhow::Context;
use std::net::SocketAddr;
use std::path::PathBuf;
use tokio::sync::{mpsc, watch};

/// Relay settings.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// HTTP address: player page, signalling WebSocket, metrics.
    pub http_addr: SocketAddr,
    /// UDP address every WebRTC viewer talks to.
    pub webrtc_addr: SocketAddr,
    /// Address put in ICE candidates, if different from `webrtc_addr` (NAT, namespaces).
    pub advertise_addr: Option<SocketAddr>,
    /// QUIC address render nodes connect to.
    pub quic_addr: SocketAddr,
    /// Where the certificate and key live.
    pub data_dir: PathBuf,
}

/// A running relay's bound addresses.
#[derive(Debug, Clone)]
pub struct RelayHandle {
    /// Bound HTTP address.
    pub http_addr: SocketAddr,
    /// Bound WebRTC UDP address.
    pub webrtc_addr: SocketAddr,
    /// Bound QUIC address.
    pub quic_addr: SocketAddr,
    /// Path of the certificate render nodes must trust.
    pub cert_path: PathBuf,
}

/// Binds every socket and runs the relay until `shutdown` turns true.
/// `started` receives the bound addresses once everything listens.
pub async fn run(
    config: RelayConfig,
    shutdown: watch::Receiver<bool>,
    started: Option<tokio::sync::oneshot::Sender<RelayHandle>>,
) -> anyhow::Result<()> {
    let metrics = metrics::RelayMetrics::new();
    let identity = tls::load_or_create(&config.data_dir)?;
    let quic = ingest::endpoint(config.quic_addr, &identity)?;
    let quic_addr = quic.local_addr()?;
    let udp = egress::bind(config.webrtc_addr)?;
    let webrtc_addr = udp.local_addr()?;
    let http = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("binding HTTP {}", config.http_addr))?;
    let http_addr = http.local_addr()?;
    let advertise = config.advertise_addr.unwrap_or(webrtc_addr);
    tracing::info!(http = %http_addr, webrtc_udp = %webrtc_addr, advertised = %advertise, quic = %quic_addr, "relay listening");

    let (ingest_tx, ingest_rx) = mpsc::channel(16_384);
    let (viewer_tx, viewer_rx) = mpsc::channel(64);
    let egress = tokio::spawn(egress::run(udp, advertise, ingest_rx, viewer_rx, metrics.clone(), shutdown.clone()));
    let ingest = tokio::spawn(ingest::run(quic, ingest_tx, metrics.clone(), shutdown.clone()));
    let app = http::router(http::AppState { viewers: viewer_tx, metrics: metrics.clone() });
    let mut http_shutdown = shutdown.clone();
    let server = tokio::spawn(async move {
        axum::serve(http, app)
            .with_graceful_shutdown(async move {
                stopped(&mut http_shutdown).await;
            })
            .await
    });
    if let Some(started) = started {
        let _ = started.send(RelayHandle { http_addr, webrtc_addr, quic_addr, cert_path: identity.cert_path.clone() });
    }
    let (e, i, s) = tokio::join!(egress, ingest, server);
    e??;
    i??;
    s??;
    Ok(())
}

/// Resolves once `shutdown` turns true (or its sender is gone).
pub async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}
