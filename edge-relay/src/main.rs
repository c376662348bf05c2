//! `pylon-relay`: the Pylon edge relay.

use clap::Parser;
use pylon_relay::RelayConfig;
use std::net::SocketAddr;
use std::path::PathBuf;
use tokio::sync::watch;

/// Pylon edge relay: takes render nodes' streams over QUIC and serves them to browsers
/// over WebRTC, every viewer on one UDP port, without decoding the video.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Args {
    /// HTTP address for the player page, the signalling WebSocket (/ws) and /metrics.
    #[arg(long, env = "PYLON_HTTP_ADDR", default_value = "127.0.0.1:8080")]
    http_addr: SocketAddr,
    /// UDP address every WebRTC viewer talks to (one port for all viewers).
    #[arg(long, env = "PYLON_WEBRTC_ADDR", default_value = "127.0.0.1:3478")]
    webrtc_addr: SocketAddr,
    /// Address announced to browsers as the ICE candidate, when it differs from
    /// --webrtc-addr (a public address behind NAT, or an address in another namespace).
    #[arg(long, env = "PYLON_ADVERTISE_ADDR")]
    advertise_addr: Option<SocketAddr>,
    /// UDP address render nodes connect to over QUIC.
    #[arg(long, env = "PYLON_QUIC_ADDR", default_value = "127.0.0.1:4433")]
    quic_addr: SocketAddr,
    /// Directory for the relay's certificate and key (created on first start).
    #[arg(long, env = "PYLON_DATA_DIR", default_value = ".pylon/relay")]
    data_dir: PathBuf,
    /// Join the pool of the indexer at this URL (e.g. http://127.0.0.1:8090): register,
    /// heartbeat, report RTT to nodes, and admit viewers only with a session token it
    /// signed. Several replicas of one indexer: their URLs comma-separated (or the flag
    /// repeated), tried in order, failing over to the next when one cannot be reached.
    /// Without it the relay runs alone and any browser may watch or play. In a pool,
    /// SIGTERM (or Ctrl-C) drains the relay: no new viewers, every viewer moves to another
    /// relay of the pool (same game), then it exits (within 30 s); a second signal stops
    /// it at once.
    #[arg(long, env = "PYLON_INDEXER", value_delimiter = ',', num_args = 1..)]
    indexer: Vec<String>,
    /// The relay's id in the pool (default: `relay-` and the start of its public key).
    #[arg(long, env = "PYLON_RELAY_ID")]
    relay_id: Option<String>,
    /// Owner account the relay's traffic is credited to.
    #[arg(long, env = "PYLON_OWNER", default_value = "local")]
    owner: String,
    /// Region name shown to the indexer.
    #[arg(long, env = "PYLON_REGION", default_value = "local")]
    region: String,
    /// URL browsers reach this relay at (default: http://<--http-addr>).
    #[arg(long, env = "PYLON_PUBLIC_URL")]
    public_url: Option<String>,
    /// QUIC address render nodes reach this relay at (default: --quic-addr).
    #[arg(long, env = "PYLON_PUBLIC_QUIC")]
    public_quic: Option<String>,
    /// Viewers this relay serves at most (told to the indexer).
    #[arg(long, env = "PYLON_CAPACITY", default_value_t = 200)]
    capacity: u32,
    /// Without --indexer, take render nodes from any address (default: loopback only,
    /// since nothing can check who they are). In a pool every node proves its key.
    #[arg(long, env = "PYLON_ALLOW_ANONYMOUS_NODES")]
    allow_anonymous_nodes: bool,
    /// Put each viewer's sound and picture in one stream so the browser lip-syncs them.
    /// Off by default: each plays as soon as it can, and the page's sync guard holds the
    /// picture (this viewer's playout delay) only while the audible sound trails it by more
    /// than 15 ms. Measured in Chromium (e2e_audio, the demo's shots, medians over 8 shots):
    /// without either the sound trailed by 20–33 ms, and by 70–112 ms in CI runs where the
    /// browser's audio jitter buffer had grown to 55–90 ms; with the guard by 15 ms under
    /// load (picture held 10 ms); with --av-sync by 16–37 ms (the picture held the sound's
    /// whole delay behind it whenever the sound is late, heard or not).
    #[arg(long, env = "PYLON_AV_SYNC")]
    av_sync: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    pylon_runtime::init_tracing("info,str0m=warn,quinn=warn");
    let args = Args::parse();
    if args.webrtc_addr.ip().is_unspecified() && args.advertise_addr.is_none() {
        anyhow::bail!(
            "--webrtc-addr {} is a wildcard: pass --advertise-addr with the address browsers can reach",
            args.webrtc_addr
        );
    }
    let config = RelayConfig {
        http_addr: args.http_addr,
        webrtc_addr: args.webrtc_addr,
        advertise_addr: args.advertise_addr,
        quic_addr: args.quic_addr,
        data_dir: args.data_dir,
        pool: (!args.indexer.is_empty()).then_some(pylon_relay::pool::PoolConfig {
            indexer: args.indexer,
            id: args.relay_id,
            owner: args.owner,
            region: args.region,
            public_url: args.public_url,
            public_quic: args.public_quic,
            capacity: args.capacity,
        }),
        allow_anonymous_nodes: args.allow_anonymous_nodes,
        av_sync: args.av_sync,
    };
    let pooled = config.pool.is_some();
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let mut relay = tokio::spawn(pylon_relay::run(config, shutdown_rx, Some(started_tx)));
    let handle = tokio::select! {
        r = &mut relay => return r?,
        h = started_rx => h.ok(),
    };
    tokio::select! {
        // A relay that stops on its own failed (a core task ended): exit non-zero.
        r = &mut relay => return r?,
        _ = pylon_runtime::shutdown_signal() => {}
    }
    // In a pool the viewers move to other relays first (a second signal stops at once).
    if let Some(handle) = handle.filter(|_| pooled) {
        tracing::info!("draining: viewers move to other relays, then the relay stops (a second signal stops it now)");
        handle.drain.start();
        tokio::select! {
            r = &mut relay => return r?,
            _ = pylon_runtime::shutdown_signal() => {}
        }
    }
    tracing::info!("shutting down: telling viewers and nodes");
    let _ = shutdown_tx.send(true);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    Ok(())
}
