//! The Pylon edge relay.
//!
//! * [`ingest`]: accepts render nodes over QUIC (RTP in datagrams, control on a stream).
//! * [`forward`]: the sans-IO forwarding core — every viewer's `str0m` session, per-viewer
//!   rewriting, keyframe coalescing, input checks — driven with an explicit `now`.
//! * [`egress`]: the task around that core: one UDP socket for every viewer, the nodes'
//!   control channels.
//! * [`http`]: the web player, the WebSocket signalling endpoint and `/metrics` (axum).
//! * [`metrics`]: Prometheus metrics.
//! * [`tls`]: the relay's QUIC certificate, created once and kept in the data directory.
//! * [`pool`]: registration and heartbeats to the indexer, admission by session token.
//! * [`cascade`]: pulling a session's stream from the relay carrying it for spectators
//!   here, and sending one to a relay pulling it.
//! * [`impair`]: the UDP impairment proxy (`pylon-impair`) for testing links.
//! * [`rate`]: the player's bandwidth estimate (TWCC) → the encoder's bitrate, sans-IO.
//!
//! **Invariant:** the relay never decodes video; it reads RTP headers only.

pub mod cascade;
pub mod egress;
pub mod forward;
pub mod http;
pub mod impair;
pub mod ingest;
pub mod metrics;
pub mod pool;
pub mod rate;
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
    /// Join this pool (register with its indexer, admit viewers by token); `None` runs
    /// the relay on its own.
    pub pool: Option<pool::PoolConfig>,
    /// Outside a pool, take render nodes from any address, not only loopback.
    pub allow_anonymous_nodes: bool,
    /// Give each viewer's audio and video one stream id (`msid`) in the answer, so the
    /// browser lip-syncs them; off (`pylon-relay`'s default), each plays as soon as it can.
    pub av_sync: bool,
}

/// How long a draining relay waits for its viewers to move before it stops anyway.
pub const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Starts a relay's drain: no new viewers (the indexer is told), every viewer is asked to
/// move to another relay (the page's failover path), then the relay stops.
#[derive(Debug, Clone)]
pub struct Drain(std::sync::Arc<watch::Sender<bool>>);

impl Drain {
    /// A handle that drains nothing (for a [`RelayHandle`] describing a relay run elsewhere,
    /// e.g. as its own process, which drains on SIGTERM).
    pub fn detached() -> Self {
        Self(std::sync::Arc::new(watch::channel(false).0))
    }

    /// Starts draining (again: no effect).
    pub fn start(&self) {
        let _ = self.0.send(true);
    }
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
    /// The relay's id in the pool, if in one.
    pub pool_id: Option<String>,
    /// Drains the relay (then it stops).
    pub drain: Drain,
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

    // Every task stops on this: the caller's shutdown, or any task ending on its own (a
    // relay with a dead core task serves nobody, so the process must exit and be restarted).
    let (stop_tx, stop) = watch::channel(false);
    let mut outer = shutdown.clone();
    let forward_stop = stop_tx.clone();
    tokio::spawn(async move {
        stopped(&mut outer).await;
        let _ = forward_stop.send(true);
    });
    let membership = match &config.pool {
        Some(p) => Some(join_pool(p, &config.data_dir, http_addr, quic_addr, &identity.cert, &metrics, stop.clone())?),
        None => None,
    };
    let pool = membership.as_ref().map(|(pool, _, _)| pool.clone());
    let key = membership.as_ref().map(|(_, _, key)| key.clone());
    let (pulls_tx, pulls) = mpsc::unbounded_channel();
    let (ingest_tx, ingest_rx) = mpsc::channel(64);
    let (ready, ready_rx) = ingest::ReadyList::new();
    let (viewer_tx, viewer_rx) = mpsc::channel(64);
    let anonymous = if config.allow_anonymous_nodes {
        ingest::AnonymousNodes::Allowed
    } else {
        ingest::AnonymousNodes::LoopbackOnly
    };
    let (drain_tx, draining) = watch::channel(false);
    // Held while the relay runs (the caller may drop its handle).
    let drain_handle = Drain(std::sync::Arc::new(drain_tx));
    let mut tasks = pylon_runtime::tasks::CoreTasks::new();
    tasks.spawn(
        "egress",
        egress::run(
            udp,
            advertise,
            ingest_rx,
            (ready.clone(), ready_rx),
            viewer_rx,
            metrics.clone(),
            pool.clone(),
            config.av_sync,
            pulls_tx,
            draining.clone(),
            stop.clone(),
        ),
    );
    let ingest_config = ingest::IngestConfig {
        events: ingest_tx,
        ready,
        metrics: metrics.clone(),
        pool: pool.clone(),
        anonymous,
        key,
        pulls,
    };
    tasks.spawn("ingest", ingest::run(quic, ingest_config, stop.clone()));
    tokio::spawn(drain(draining.clone(), pool.clone(), metrics.clone(), stop_tx.clone(), stop.clone()));
    let app = http::router(http::AppState {
        viewers: viewer_tx,
        metrics: metrics.clone(),
        pool: pool.clone(),
        shutdown: stop.clone(),
        draining,
    });
    tasks.spawn("http", http::serve(http, app, stop.clone()));
    if let Some((_, task, _)) = membership {
        tasks.spawn("pool membership", async move { task.await?.context("the indexer refused this relay") });
    }
    if let Some(started) = started {
        let _ = started.send(RelayHandle {
            http_addr,
            webrtc_addr,
            quic_addr,
            cert_path: identity.cert_path.clone(),
            pool_id: pool.as_ref().map(|p| p.id().to_string()),
            drain: drain_handle.clone(),
        });
    }
    let result = tasks.supervise(&stop_tx).await;
    drop(drain_handle);
    result
}

/// Once `draining` turns true: tells the indexer (no new viewers), lets the viewers move
/// (signalling tells each page to, and refuses new offers), waits until none is left or
/// [`DRAIN_TIMEOUT`], then stops the relay.
async fn drain(
    mut draining: watch::Receiver<bool>,
    pool: Option<pool::Pool>,
    metrics: metrics::RelayMetrics,
    stop_tx: watch::Sender<bool>,
    mut stop: watch::Receiver<bool>,
) {
    tokio::select! {
        d = draining.wait_for(|d| *d) => if d.is_err() { return },
        _ = stopped(&mut stop) => return,
    }
    let viewers = metrics.viewers.get();
    tracing::info!(viewers, "draining: no new viewers; the viewers here move to other relays");
    if let Some(pool) = &pool
        && let Err(e) = pool.drain().await
    {
        tracing::warn!("could not tell the indexer this relay is draining: {e}");
    }
    let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
    while metrics.viewers.get() > 0 && tokio::time::Instant::now() < deadline {
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => {}
            _ = stopped(&mut stop) => return,
        }
    }
    tracing::info!(viewers = metrics.viewers.get(), "drained; stopping");
    let _ = stop_tx.send(true);
}

type Membership =
    (pool::Pool, tokio::task::JoinHandle<Result<(), pylon_indexer_client::ClientError>>, ed25519_dalek::SigningKey);

/// Loads the relay's identity key and starts registering and heartbeating.
fn join_pool(
    config: &pool::PoolConfig,
    data_dir: &std::path::Path,
    http_addr: SocketAddr,
    quic_addr: SocketAddr,
    cert: &[u8],
    metrics: &metrics::RelayMetrics,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<Membership> {
    let key = pylon_indexer_client::keys::load_or_create(data_dir, "relay-key").context("loading the relay's key")?;
    let id = config.id.clone().unwrap_or_else(|| {
        let pk = pylon_indexer_client::encode_key(&key.verifying_key());
        format!("relay-{}", pk.chars().filter(char::is_ascii_alphanumeric).take(10).collect::<String>().to_lowercase())
    });
    let client = pylon_indexer_client::Client::with_replicas(&config.indexer, key.clone())
        .context("creating the indexer client")?;
    let registration = pylon_indexer_client::api::RegisterRelay {
        id: id.clone(),
        owner: config.owner.clone(),
        public_key: client.public_key(),
        public_url: config.public_url.clone().unwrap_or_else(|| format!("http://{http_addr}")),
        quic_addr: config.public_quic.clone().unwrap_or_else(|| quic_addr.to_string()),
        region: config.region.clone(),
        capacity: config.capacity,
        // Nodes of the pool pin this relay's QUIC certificate by it.
        cert_sha256: pylon_indexer_client::api::cert_sha256(cert),
    };
    let (pool, ended) = pool::Pool::new(&id, Some(client.clone()));
    let viewers = metrics.viewers.clone();
    let task = tokio::spawn(pool::run(
        client,
        registration,
        pool.clone(),
        move || viewers.get().max(0) as u32,
        ended,
        shutdown,
    ));
    Ok((pool, task, key))
}

/// Resolves once `shutdown` turns true (or its sender is gone).
pub use pylon_runtime::stopped;
