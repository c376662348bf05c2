//! The render node's QUIC connection to its edge relay: a thin driver around
//! [`pylon_proto::link::NodeSide`], which owns the protocol (the signed hello, the relay's
//! welcome, sessions, keyframe requests, resends, bitrate).
//!
//! RTP packets travel as QUIC datagrams (unreliable, unordered: a late video packet is
//! worth nothing), control messages on one bidirectional stream. If the relay goes away
//! the node keeps rendering, discards packets (counted), and reconnects with exponential
//! backoff; every new connection starts with a keyframe.

use crate::capacity::CapacityWorker;
use crate::metrics::{DropReason, PacketDrop, ServerMetrics};
use crate::pipeline::{Outgoing, ReceivedInput};
use crate::pool::SessionGate;
use anyhow::{Context, anyhow};
use ed25519_dalek::SigningKey;
use pylon_indexer_client::api::cert_sha256;
use pylon_proto::framing::{self, StreamHello};
use pylon_proto::link::{self, LinkError, NodeConfig, NodeEvent, NodeSide, PlayerGate};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// Kernel socket buffer size: QUIC datagram bursts (a keyframe is dozens of packets)
/// overflow the default of a few hundred KB.
pub const SOCKET_BUFFER: usize = 8 << 20;

/// How the node knows it reached a real relay.
#[derive(Debug, Clone)]
pub enum RelayTrust {
    /// The relay's certificate (DER) in this file, trusted alone.
    File(PathBuf),
    /// Any relay of the pool, by the SHA-256 of the certificate it registered with the
    /// indexer (fetched anew before each connection); the id the relay then gives in its
    /// welcome must be the one registered with that certificate. The relays the node's
    /// sessions were matched to are linked first, then those in the node's `region`, at
    /// most `max_links` (links beyond are closed unless they carry the session).
    Pool {
        /// The indexer (its replicas).
        indexer: pylon_indexer_client::Client,
        /// The node's region.
        region: String,
        /// Most relays linked at once ([`MAX_LINKS`] by default).
        max_links: usize,
    },
}

/// How to reach the relay.
#[derive(Debug, Clone)]
pub struct UplinkConfig {
    /// The relay's QUIC ingest address.
    pub relay: SocketAddr,
    /// How its certificate is trusted.
    pub trust: RelayTrust,
    /// Server name in the relay's certificate.
    pub server_name: String,
    /// The stream description sent first on every connection.
    pub hello: StreamHello,
    /// Where the relay's bitrate requests go, and their bounds.
    pub bitrate: Option<BitrateControl>,
    /// The node's registered key, which signs its hello; `None` connects anonymously
    /// (only a relay outside a pool accepts that, and only on loopback unless told to).
    pub identity: Option<SigningKey>,
    /// The Vulkan device that answers checkers' proof-of-capacity challenges (the one the
    /// node renders on, as `--gpu` names it; `None`: the renderer's choice).
    pub gpu: Option<String>,
}

/// The encoder's target bitrate as the relay may set it (from the player's congestion
/// feedback), within the node's bounds.
#[derive(Debug, Clone)]
pub struct BitrateControl {
    /// The pipeline's target, bit/s ([`crate::pipeline::Pipeline::bitrate_target`]).
    pub target: Arc<AtomicU64>,
    /// Lowest target accepted, bit/s.
    pub min: u64,
    /// Highest target accepted, bit/s.
    pub max: u64,
}

/// What the link tells the node's title runner about sessions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionSignal {
    /// A player's session started (its token verified), for `title`.
    Started {
        /// Session id (hex; empty outside a pool).
        session: String,
        /// The title the player chose (empty outside a pool).
        title: String,
    },
    /// The player's session ended (the player left, or the relay connection is gone).
    Ended {
        /// Session id.
        session: String,
    },
}

/// What the node's title runner asks of the link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UplinkCommand {
    /// End the running session at the node: its title exited, crashed or never drew.
    EndSession {
        /// Why, for the player.
        reason: String,
    },
}

/// The link's side of the title runner's channels.
#[derive(Debug)]
pub struct SessionLink {
    /// Where session starts and ends go.
    pub signals: mpsc::UnboundedSender<SessionSignal>,
    /// What the runner asks.
    pub commands: mpsc::UnboundedReceiver<UplinkCommand>,
}

/// Creates a UDP socket with large kernel buffers and a quinn endpoint on it.
pub fn endpoint(bind: SocketAddr) -> anyhow::Result<quinn::Endpoint> {
    let socket = big_buffer_socket(bind)?;
    let runtime = quinn::default_runtime().ok_or_else(|| anyhow!("no async runtime for QUIC"))?;
    quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket, runtime).context("creating the QUIC endpoint")
}

/// A bound UDP socket whose receive and send buffers are [`SOCKET_BUFFER`] (as far as the
/// kernel allows; the granted size is logged when smaller).
pub fn big_buffer_socket(bind: SocketAddr) -> anyhow::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket =
        Socket::new(Domain::for_address(bind), Type::DGRAM, Some(Protocol::UDP)).context("creating a UDP socket")?;
    for (what, set, get) in [
        (
            "receive",
            Socket::set_recv_buffer_size as fn(&Socket, usize) -> std::io::Result<()>,
            Socket::recv_buffer_size as fn(&Socket) -> std::io::Result<usize>,
        ),
        ("send", Socket::set_send_buffer_size, Socket::send_buffer_size),
    ] {
        if let Err(e) = set(&socket, SOCKET_BUFFER) {
            tracing::warn!("cannot set the UDP {what} buffer to {SOCKET_BUFFER} bytes: {e}");
        }
        if let Ok(got) = get(&socket)
            && got < SOCKET_BUFFER
        {
            tracing::warn!(
                "UDP {what} buffer is {got} bytes (wanted {SOCKET_BUFFER}); raise net.core.rmem_max/wmem_max to avoid drops"
            );
        }
    }
    socket.set_nonblocking(true)?;
    socket.bind(&bind.into()).with_context(|| format!("binding UDP {bind}"))?;
    Ok(socket.into())
}

/// A QUIC client configuration that trusts the relay certificate at `cert_path`.
pub fn client_config(cert_path: &PathBuf) -> anyhow::Result<quinn::ClientConfig> {
    let der = std::fs::read(cert_path).with_context(|| {
        format!("reading the relay certificate {} (the relay writes it on start)", cert_path.display())
    })?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from(der)).context("the relay certificate is not valid DER")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    quic_config(tls)
}

/// The pool's relays as the indexer lists them: certificate SHA-256 (hex) → the ids of the
/// relays that registered it (one, unless a relay registered another's certificate, which
/// gains it nothing: it cannot complete a handshake without the certificate's key).
pub type PinnedRelays = std::collections::HashMap<String, Vec<String>>;

/// A QUIC client configuration that trusts exactly the certificates in `pinned` (by their
/// SHA-256), whatever name they carry: the pool's registered relays.
pub fn pinned_client_config(pinned: PinnedRelays) -> anyhow::Result<quinn::ClientConfig> {
    quic_config(pylon_indexer_client::pinned::PinnedVerifier::client_config(pinned.into_keys())?)
}

/// The relay ids registered with the certificate `conn`'s peer presented, if pinned.
fn pinned_relay(conn: &quinn::Connection, pinned: &PinnedRelays) -> Option<Vec<String>> {
    let certs = conn.peer_identity()?.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok()?;
    pinned.get(&cert_sha256(certs.first()?)).cloned()
}

/// The QUIC side of a TLS client configuration: ALPN and [`transport_config`].
fn quic_config(mut tls: rustls::ClientConfig) -> anyhow::Result<quinn::ClientConfig> {
    tls.alpn_protocols = vec![framing::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config()));
    Ok(config)
}

/// How long a silent relay link lives, ms.
pub const LINK_IDLE_MS: u32 = 1_000;

/// QUIC transport settings of the node's side of the relay connection.
pub fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    // A relay that vanishes is noticed within a second (keep-alives every 200 ms), so a
    // session on it can move to another relay quickly.
    t.max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(LINK_IDLE_MS))));
    t.keep_alive_interval(Some(Duration::from_millis(200)));
    t.datagram_send_buffer_size(SOCKET_BUFFER);
    t.datagram_receive_buffer_size(Some(SOCKET_BUFFER));
    // Start at a size that fits a whole RTP packet; MTU discovery may raise it.
    t.initial_mtu(1400);
    // BBR, not a loss-based controller: a few percent of random loss on the way to the
    // relay must not throttle the stream below the video's bitrate (the relay repairs
    // the loss; the player's own congestion feedback sets the bitrate).
    t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
    t
}

/// How often a pooled node asks the indexer for the pool's relays (new relays are linked,
/// gone ones dropped).
pub const RELAY_REFRESH: Duration = Duration::from_secs(3);
/// Most relays a pooled node keeps links to by default (those its sessions were matched
/// to, then its region's, then the rest as the indexer lists them).
pub const MAX_LINKS: usize = 16;
/// Media and commands queued for one link before packets are dropped (counted).
const LINK_QUEUE: usize = 4096;

/// What the uplink hands one relay link.
#[derive(Debug)]
enum LinkCommand {
    /// Media for the link's relay.
    Media(Outgoing),
    /// End the running session here (the title runner asked), telling the relay why.
    EndSession(String),
    /// The answer to a checker's challenge that came on this link.
    Capacity(crate::capacity::Answer),
    /// Refuse the challenge `seq` (the worker is busy or gone).
    RefuseCapacity(u32, &'static str),
}

/// What a link asks of the uplink.
#[derive(Debug)]
enum LinkReport {
    /// A checker's challenge arrived on link `link`.
    Challenge { link: String, seq: u32, challenge: pylon_proto::capacity::Challenge },
}

/// Where one link connects.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    /// The relay's id as the indexer lists it (`None` outside a pool: learnt from its welcome).
    id: Option<String>,
    /// Its QUIC address (`host:port`).
    addr: String,
}

/// One relay link's task, as the uplink keeps it.
struct LinkHandle {
    target: Target,
    commands: mpsc::Sender<LinkCommand>,
    /// The relay's id once it welcomed the node; `None` while not connected.
    welcomed: Arc<std::sync::Mutex<Option<String>>>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl LinkHandle {
    /// Whether the relay that welcomed this link is `relay` (compared under the lock: no
    /// copy, this runs per packet).
    fn is(&self, relay: &str) -> bool {
        self.welcomed.lock().unwrap_or_else(std::sync::PoisonError::into_inner).as_deref() == Some(relay)
    }

    fn is_welcomed(&self) -> bool {
        self.welcomed.lock().unwrap_or_else(std::sync::PoisonError::into_inner).is_some()
    }
}

/// The link to relay `relay`, once it welcomed the node.
fn link_to<'a>(links: &'a [LinkHandle], relay: &str) -> Option<&'a LinkHandle> {
    links.iter().find(|l| l.is(relay))
}

/// What every link shares.
struct Shared {
    endpoint: quinn::Endpoint,
    link_config: NodeConfig,
    /// A certificate file's configuration (outside a pool), read once at start.
    fixed: Option<quinn::ClientConfig>,
    /// The pool's relay certificates as last fetched.
    pinned: std::sync::Mutex<Option<PinnedRelays>>,
    server_name: String,
    /// Who plays, across all links.
    players: PlayerGate,
    keyframe: Arc<AtomicBool>,
    inputs: std::sync::mpsc::Sender<ReceivedInput>,
    gate: SessionGate,
    metrics: ServerMetrics,
    bitrate: Option<BitrateControl>,
    signals: Option<mpsc::UnboundedSender<SessionSignal>>,
    reports: mpsc::UnboundedSender<LinkReport>,
}

impl Shared {
    fn signal(&self, signal: SessionSignal) {
        if let Some(s) = &self.signals {
            let _ = s.send(signal);
        }
    }
}

/// Runs the uplink until `shutdown` becomes true. Outside a pool: one link, to
/// `config.relay`. In a pool: a link to each relay the indexer lists as ready (so any of
/// them can carry a session: each measures its RTT to this node for matching), media only
/// to the relay the running session's player is on, and a session whose relay dies waits
/// [`link::RESUME_GRACE`] for its player to come back through another. Session starts and
/// ends go to `sessions` (the node's title runner), which may end a session.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    config: UplinkConfig,
    mut packets: mpsc::Receiver<Outgoing>,
    keyframe: Arc<AtomicBool>,
    inputs: std::sync::mpsc::Sender<ReceivedInput>,
    gate: SessionGate,
    metrics: ServerMetrics,
    sessions: Option<SessionLink>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let (signals, mut commands) = match sessions {
        Some(SessionLink { signals, commands }) => (Some(signals), commands),
        // Nobody asks anything: a receiver whose sender is dropped at once.
        None => (None, mpsc::unbounded_channel().1),
    };
    let mut capacity =
        CapacityWorker::start(config.gpu.clone(), metrics.clone()).context("starting the proof-of-capacity thread")?;
    let bind: SocketAddr = if config.relay.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse()?;
    let (fixed, indexer) = match &config.trust {
        // A certificate file is read once, at start (a missing one is an error now, not later).
        RelayTrust::File(path) => (Some(client_config(path)?), None),
        RelayTrust::Pool { indexer, region, max_links } => (None, Some((indexer.clone(), region.clone(), *max_links))),
    };
    let players = match gate.node() {
        Some(id) => PlayerGate::pooled(id),
        None => PlayerGate::open(),
    };
    let (reports, mut link_reports) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        endpoint: endpoint(bind)?,
        link_config: NodeConfig {
            stream: config.hello.clone(),
            identity: config.identity.clone(),
            bitrate_bounds: config.bitrate.as_ref().map(|b| (b.min, b.max)),
        },
        fixed,
        pinned: std::sync::Mutex::new(None),
        server_name: config.server_name.clone(),
        players: players.clone(),
        keyframe,
        inputs,
        gate: gate.clone(),
        metrics: metrics.clone(),
        bitrate: config.bitrate.clone(),
        signals,
        reports,
    });
    let mut links: Vec<LinkHandle> = Vec::new();
    if indexer.is_none() {
        links.push(spawn_link(&shared, Target { id: None, addr: config.relay.to_string() }));
    }
    // The link whose checker's challenge the worker is computing.
    let mut challenged: Option<String> = None;
    // The pool's relays, fetched by a task of their own: an indexer call must never hold up
    // the packets routed below.
    let (lists, mut relay_lists) = mpsc::channel(1);
    let max_links = indexer.as_ref().map_or(1, |(_, _, max)| (*max).max(1));
    if let Some((indexer, region, _)) = indexer.clone() {
        tokio::spawn(refresh_relays(indexer, region, shared.clone(), lists, shutdown.clone()));
    }
    let mut expiry = tokio::time::interval(Duration::from_millis(250));
    expiry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            packet = packets.recv() => match packet {
                Some(p) => route(&links, &players, &metrics, p),
                None => break,
            },
            Some(command) = commands.recv() => match command {
                UplinkCommand::EndSession { reason } => {
                    let link = players.session_relay().and_then(|r| link_to(&links, &r));
                    match link {
                        Some(l) => { let _ = l.commands.send(LinkCommand::EndSession(reason)).await; }
                        // Its relay link is lost: end it here (no relay to tell).
                        None => if let Some(session) = players.end(None, None) {
                            tracing::info!(session, "the node ended the session: {reason}");
                            gate.set_running(None);
                        },
                    }
                }
            },
            Some(LinkReport::Challenge { link, seq, challenge }) = link_reports.recv() => {
                match capacity.submit(seq, challenge, Instant::now()) {
                    Ok(()) => challenged = Some(link),
                    Err(reason) => {
                        if let Some(l) = link_to(&links, &link) {
                            let _ = l.commands.try_send(LinkCommand::RefuseCapacity(seq, reason));
                        }
                    }
                }
            },
            Some(answer) = capacity.next() => {
                let link = challenged.take();
                if let Some(l) = link.and_then(|r| link_to(&links, &r)) {
                    let _ = l.commands.send(LinkCommand::Capacity(answer)).await;
                }
            },
            _ = expiry.tick() => {
                if let Some(session) = players.expire(Instant::now()) {
                    tracing::warn!(session, "the session's player did not come back through another relay in {:?}; ending it", link::RESUME_GRACE);
                    gate.set_running(None);
                    shared.signal(SessionSignal::Ended { session });
                }
            },
            Some(targets) = relay_lists.recv() => relink(&shared, &mut links, targets, max_links),
            _ = shutdown.changed() => break,
        }
    }
    for l in &links {
        let _ = l.stop.send(true);
    }
    for l in links {
        let _ = l.task.await;
    }
    shared.endpoint.wait_idle().await;
    Ok(())
}

/// Every [`RELAY_REFRESH`]: the pool's relays from the indexer; their certificates go to
/// `shared` (for the next connections), the ready ones to `lists` (to link to).
async fn refresh_relays(
    indexer: pylon_indexer_client::Client,
    region: String,
    shared: Arc<Shared>,
    lists: mpsc::Sender<Vec<Target>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut refresh = tokio::time::interval(RELAY_REFRESH);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = refresh.tick() => {}
            // A session was matched to a relay this node may not be linked to: at once.
            _ = shared.gate.wanted_relays_changed() => {}
            _ = shutdown.changed() => return,
        }
        // The indexer's key (learnt at registration) vouches for each relay listed.
        let Some(key) = shared.gate.key() else { continue };
        let wanted = shared.gate.wanted_relays();
        let listed = indexer.relays().await.map_err(anyhow::Error::from).and_then(|relays| {
            let (pinned, targets, unattested) = pool_relays(relays, &key, &region, &wanted);
            if unattested > 0 {
                shared.metrics.relays_unattested.inc_by(unattested);
                tracing::warn!(unattested, "relays listed without the indexer's valid signature: not dialed");
            }
            anyhow::ensure!(!pinned.is_empty(), "the indexer lists no relay with a registered certificate yet");
            Ok((pinned, targets))
        });
        match listed {
            Ok((pinned, targets)) => {
                *shared.pinned.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(pinned);
                if lists.send(targets).await.is_err() {
                    return;
                }
            }
            Err(e) => tracing::warn!("cannot refresh the pool's relays ({e}); keeping the links there are"),
        }
    }
}

/// Sends a packet where it belongs: to the running session's relay only; with no session,
/// outside a pool to the one relay (its viewers watch the node's own stream), in a pool
/// nowhere (no relay has a viewer of this node without a session); while the session's
/// relay is lost, nowhere (counted).
fn route(links: &[LinkHandle], players: &PlayerGate, metrics: &ServerMetrics, packet: Outgoing) {
    let drop = |reason| {
        metrics.rtp_packets_dropped.get_or_create(&PacketDrop { reason }).inc();
    };
    let media = matches!(packet, Outgoing::Rtp(..) | Outgoing::AudioRtp(..));
    let send = |l: &LinkHandle, p: Outgoing| {
        if l.commands.try_send(LinkCommand::Media(p)).is_err() && media {
            drop("link_busy");
        }
    };
    match players.session_relay() {
        Some(relay) => match link_to(links, &relay) {
            Some(l) => send(l, packet),
            None if media => drop("not_connected"),
            None => {}
        },
        None if players.running().is_some() => {
            if media {
                drop("relay_lost");
            }
        }
        None => {
            for l in links.iter().filter(|l| l.target.id.is_none()) {
                if l.is_welcomed() {
                    send(l, packet.clone());
                } else if media {
                    drop("not_connected");
                }
            }
        }
    }
}

/// Links to each of `targets` not linked yet and drops links to relays no longer listed
/// (unless the running session is on one: its player may still be there).
fn relink(shared: &Arc<Shared>, links: &mut Vec<LinkHandle>, mut targets: Vec<Target>, max_links: usize) {
    let session_relay = shared.players.session_relay();
    // The first `max_links` listed (the sessions' relays, then the node's region); the
    // session's relay is kept whatever happens.
    targets.truncate(max_links);
    links.retain(|l| {
        let keep = targets.contains(&l.target) || session_relay.as_deref().is_some_and(|r| l.is(r));
        if !keep {
            tracing::info!(relay = ?l.target.id, addr = l.target.addr, "no longer among the relays to link; unlinking");
            let _ = l.stop.send(true);
        }
        keep
    });
    for t in targets {
        if !links.iter().any(|l| l.target == t) {
            tracing::info!(relay = ?t.id, addr = t.addr, "linking to a relay of the pool");
            links.push(spawn_link(shared, t));
        }
    }
}

fn spawn_link(shared: &Arc<Shared>, target: Target) -> LinkHandle {
    let (commands, rx) = mpsc::channel(LINK_QUEUE);
    let (stop, stopped) = watch::channel(false);
    let welcomed = Arc::new(std::sync::Mutex::new(None));
    let task = tokio::spawn(run_link(shared.clone(), target.clone(), rx, welcomed.clone(), stopped));
    LinkHandle { target, commands, welcomed, stop, task }
}

/// One relay link: connect, serve, reconnect with backoff, until told to stop.
async fn run_link(
    shared: Arc<Shared>,
    target: Target,
    mut commands: mpsc::Receiver<LinkCommand>,
    welcomed: Arc<std::sync::Mutex<Option<String>>>,
    mut stop: watch::Receiver<bool>,
) {
    let metrics = &shared.metrics;
    let mut backoff = Duration::from_millis(100);
    let key = target.id.clone().unwrap_or_default();
    loop {
        if *stop.borrow() {
            break;
        }
        let result = async {
            let addr = tokio::net::lookup_host(&target.addr)
                .await
                .with_context(|| format!("resolving {}", target.addr))?
                .next()
                .ok_or_else(|| anyhow!("{} resolves to no address", target.addr))?;
            let pinned = shared.pinned.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
            let client = match (&shared.fixed, &pinned) {
                (Some(c), _) => c.clone(),
                (None, Some(p)) => pinned_client_config(p.clone())?,
                (None, None) => anyhow::bail!("the pool's relay certificates are not known yet"),
            };
            let attempt = shared.endpoint.connect_with(client, addr, &shared.server_name)?;
            let conn = tokio::select! {
                c = attempt => c.context("cannot reach the relay")?,
                _ = stop.changed() => return Ok(None),
            };
            Ok(Some((conn, pinned)))
        }
        .await;
        let (conn, pinned) = match result {
            Ok(Some(c)) => c,
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(relay = key, "{e:#}; retrying in {backoff:?}");
                if back_off(&mut backoff, &mut commands, &mut stop).await {
                    break;
                }
                continue;
            }
        };
        let mut exporter = [0u8; link::EXPORTER_LEN];
        if conn.export_keying_material(&mut exporter, link::EXPORTER_LABEL, b"").is_err() {
            tracing::error!("the QUIC connection cannot export keying material");
            break;
        }
        let mut node = NodeSide::new(
            shared.link_config.clone(),
            shared.players.clone(),
            &exporter,
            Instant::now(),
            crate::pool::now(),
        );
        metrics.relay_connects.inc();
        metrics.relay_connected.inc();
        tracing::info!(relay = key, addr = target.addr, "connected to the relay; waiting for its welcome");
        // Which relay this certificate was registered by: its welcome must say the same.
        let expected = pinned.as_ref().and_then(|p| pinned_relay(&conn, p));
        let link = Link { shared: &shared, expected_relay: expected, key: &key, welcomed: &welcomed };
        let result = serve_connection(&conn, &mut node, &mut commands, &link, &mut stop).await;
        *welcomed.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        metrics.relay_connected.dec();
        metrics.relay_disconnects.inc();
        let relay = node.relay().map(str::to_string);
        match result {
            Ok(()) => {
                conn.close(0u32.into(), b"render node shutting down");
                break;
            }
            Err(e) => {
                // Its player may come back through another relay: the session waits.
                if let Some(session) = node.lost(Instant::now() + link::RESUME_GRACE) {
                    tracing::warn!(
                        session,
                        relay,
                        "the session's relay link is lost; waiting for its player to come back"
                    );
                }
                tracing::warn!(relay, "relay connection lost: {e:#}; reconnecting in {backoff:?}");
                // A relay that refuses this node must not be hammered.
                if back_off(&mut backoff, &mut commands, &mut stop).await {
                    break;
                }
            }
        }
    }
}

/// The pool's relays from the indexer: the certificates to trust (SHA-256 → relay ids, of
/// every relay not revoked or awaiting approval) and the ready ones to link to — first
/// those the node's open sessions were matched to (`wanted`), then those in the node's
/// `region` —, of those entries the indexer's key `indexer` vouches for; and how many it
/// did not.
fn pool_relays(
    mut relays: Vec<pylon_indexer_client::api::RelayEntry>,
    indexer: &ed25519_dalek::VerifyingKey,
    region: &str,
    wanted: &[String],
) -> (PinnedRelays, Vec<Target>, u64) {
    let mut pinned = PinnedRelays::new();
    let mut targets = Vec::new();
    let mut unattested = 0;
    // Stable: within each group, the indexer's order (by id).
    relays.sort_by_key(|r| (!wanted.contains(&r.id), r.region != region));
    for r in relays.into_iter().filter(|r| r.state != "revoked" && r.state != "pending" && !r.cert_sha256.is_empty()) {
        if !r.attested_by(indexer) {
            unattested += 1;
            continue;
        }
        if r.state == "ready" && !r.quic_addr.is_empty() {
            targets.push(Target { id: Some(r.id.clone()), addr: r.quic_addr.clone() });
        }
        pinned.entry(r.cert_sha256).or_default().push(r.id);
    }
    (pinned, targets, unattested)
}

/// Waits `backoff` before the next try, discarding what is queued for the link meanwhile,
/// and doubles it up to 5 s; returns true if the link was told to stop meanwhile.
async fn back_off(
    backoff: &mut Duration,
    commands: &mut mpsc::Receiver<LinkCommand>,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    let deadline = tokio::time::Instant::now() + *backoff;
    *backoff = (*backoff * 2).min(Duration::from_secs(5));
    loop {
        tokio::select! {
            c = commands.recv() => if c.is_none() { return true; },
            _ = tokio::time::sleep_until(deadline) => return false,
            _ = stop.changed() => return true,
        }
    }
}

/// What one connection hands the link's events to.
struct Link<'a> {
    shared: &'a Shared,
    /// In a pool: the relay ids registered with the certificate this connection presented.
    expected_relay: Option<Vec<String>>,
    /// The link's name for the uplink (the relay's listed id; empty outside a pool).
    key: &'a str,
    welcomed: &'a std::sync::Mutex<Option<String>>,
}

impl Link<'_> {
    /// Carries out what the state machine decided.
    fn on_event(&self, event: NodeEvent) {
        let Shared { metrics, gate, keyframe, inputs, bitrate, .. } = self.shared;
        match event {
            NodeEvent::Established { relay } => {
                tracing::info!(relay, "the relay admitted this node");
                *self.welcomed.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(relay);
            }
            NodeEvent::KeyframeRequested => {
                metrics.keyframe_requests.inc();
                keyframe.store(true, Ordering::Relaxed);
            }
            NodeEvent::Input(message) => {
                let _ = inputs.send(ReceivedInput { message, arrived: Instant::now() });
            }
            NodeEvent::InputRefused(reason) => {
                metrics.input_rejected.get_or_create(&DropReason { reason }).inc();
            }
            NodeEvent::SessionStarted { session, title } => {
                metrics.sessions_started.inc();
                tracing::info!(session, title, "player session started");
                gate.set_running(Some(session.clone()));
                self.shared.signal(SessionSignal::Started { session, title });
            }
            NodeEvent::SessionResumed { session, relay } => {
                metrics.sessions_resumed.inc();
                tracing::info!(session, relay, "the player's session moved to this relay; the game goes on");
                gate.set_running(Some(session));
            }
            NodeEvent::SessionRefused(e) => {
                metrics.sessions_refused.inc();
                tracing::warn!("refused a session token from the relay: {e}");
            }
            NodeEvent::SessionEnded(session) => {
                tracing::info!(session, "player session ended");
                gate.set_running(None);
                self.shared.signal(SessionSignal::Ended { session });
            }
            NodeEvent::Bitrate(target) => {
                if let Some(b) = bitrate {
                    tracing::debug!(target, "bitrate from the relay");
                    b.target.store(target, Ordering::Relaxed);
                }
            }
            NodeEvent::Resent { sent, missed } => {
                metrics.rtp_resent.inc_by(u64::from(sent));
                metrics.rtp_resend_missed.inc_by(u64::from(missed));
            }
            // Handed to the capacity worker by `flush`.
            NodeEvent::CapacityChallenge { .. } => {}
        }
    }
}

/// Writes what the link queued (control bytes, resends) and hands its events on.
async fn flush(
    node: &mut NodeSide,
    send: &mut quinn::SendStream,
    conn: &quinn::Connection,
    link: &Link<'_>,
) -> anyhow::Result<()> {
    while let Some(event) = node.poll_event() {
        match event {
            NodeEvent::Established { relay } if link.expected_relay.as_ref().is_some_and(|e| !e.contains(&relay)) => {
                let registered = link.expected_relay.as_deref().unwrap_or_default().join(", ");
                return Err(anyhow!(
                    "the relay calls itself {relay} but presented the certificate registered by {registered}"
                ));
            }
            NodeEvent::CapacityChallenge { seq, challenge } => {
                let relay = node.relay().unwrap_or(link.key).to_string();
                let _ = link.shared.reports.send(LinkReport::Challenge { link: relay, seq, challenge });
            }
            event => link.on_event(event),
        }
    }
    while let Some(d) = node.poll_datagram() {
        let len = d.len() as u64;
        match conn.send_datagram(d.into()) {
            Ok(()) => {
                link.shared.metrics.link_bytes_sent.inc_by(len);
            }
            Err(_) => {
                link.shared.metrics.rtp_packets_dropped.get_or_create(&PacketDrop { reason: "send_error" }).inc();
            }
        }
    }
    if let Some(bytes) = node.poll_transmit() {
        send.write_all(&bytes).await.context("writing the control stream")?;
    }
    Ok(())
}

/// Sends media and handles control until the connection fails (`Err`) or the link is
/// stopped (`Ok`).
async fn serve_connection(
    conn: &quinn::Connection,
    node: &mut NodeSide,
    commands: &mut mpsc::Receiver<LinkCommand>,
    link: &Link<'_>,
    stop: &mut watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let metrics = &link.shared.metrics;
    let (mut send, mut recv) = conn.open_bi().await.context("opening the control stream")?;
    flush(node, &mut send, conn, link).await?;
    let mut read_buf = vec![0u8; 4096];
    let mut datagram = Vec::with_capacity(1500);
    let far = || tokio::time::Instant::now() + Duration::from_secs(3600);
    let dropped = |reason| {
        metrics.rtp_packets_dropped.get_or_create(&PacketDrop { reason }).inc();
    };
    loop {
        let timeout = node.poll_timeout().map_or_else(far, tokio::time::Instant::from_std);
        tokio::select! {
            command = commands.recv() => match command {
                None => return Ok(()),
                Some(LinkCommand::Media(Outgoing::FrameInfo(info))) => node.send_frame_info(info),
                Some(LinkCommand::Media(Outgoing::AudioRtp(rtp, capture))) => match node.send_audio(Instant::now(), &rtp, capture, &mut datagram) {
                    Ok(()) => match conn.send_datagram(bytes::Bytes::copy_from_slice(&datagram)) {
                        Ok(()) => {
                            metrics.link_bytes_sent.inc_by(datagram.len() as u64);
                        }
                        Err(_) => dropped("send_error"),
                    },
                    Err(_) => dropped("not_welcomed"),
                },
                Some(LinkCommand::Media(Outgoing::Rtp(rtp, capture))) => match node.send_rtp(Instant::now(), &rtp, capture, &mut datagram) {
                    Ok(()) => match conn.send_datagram(bytes::Bytes::copy_from_slice(&datagram)) {
                        Ok(()) => {
                            metrics.link_bytes_sent.inc_by(datagram.len() as u64);
                        }
                        Err(e) => {
                            dropped("send_error");
                            match e {
                                quinn::SendDatagramError::TooLarge => tracing::warn!("RTP packet of {} bytes too large for a datagram", rtp.len()),
                                e => return Err(e.into()),
                            }
                        }
                    },
                    Err(_) => dropped("not_welcomed"),
                },
                Some(LinkCommand::EndSession(reason)) => {
                    if let Some(session) = node.end_session(&reason) {
                        tracing::info!(session, "the node ended the session: {reason}");
                        link.shared.gate.set_running(None);
                    }
                }
                Some(LinkCommand::Capacity(answer)) => match answer.result {
                    Ok(p) => node.answer_capacity(answer.seq, &p.words, p.gpu_us, p.wall_us),
                    Err(reason) => node.refuse_capacity(answer.seq, &reason),
                },
                Some(LinkCommand::RefuseCapacity(seq, reason)) => node.refuse_capacity(seq, reason),
            },
            read = recv.read(&mut read_buf) => {
                let n = read.context("reading the control stream")?.ok_or_else(|| anyhow!("the relay closed the control stream"))?;
                // Session tokens arrive here: verify them with the indexer's key, which
                // the membership task learns at registration (not copied per packet).
                if let Some(k) = link.shared.gate.key() {
                    node.gate().set_key(k);
                }
                if let Err(e) = node.handle_control(Instant::now(), read_buf.get(..n).unwrap_or_default()) {
                    if matches!(e, LinkError::Framing(_)) {
                        metrics.bad_control_messages.inc();
                    }
                    flush(node, &mut send, conn, link).await?;
                    return Err(anyhow!("relay link: {e}"));
                }
            }
            d = conn.read_datagram() => {
                let d = d.context("reading datagrams")?;
                node.handle_datagram(Instant::now(), &d);
            }
            _ = tokio::time::sleep_until(timeout) => {
                node.handle_timeout(Instant::now()).map_err(|e| anyhow!("relay link: {e}"))?;
            }
            _ = stop.changed() => {
                node.close("render node shutting down");
                let _ = flush(node, &mut send, conn, link).await;
                let _ = send.finish();
                return Ok(());
            }
        }
        flush(node, &mut send, conn, link).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;
    use pylon_indexer_client::api::{RelayEntry, attest_relay};

    fn entry(id: &str, state: &str, indexer: &SigningKey) -> RelayEntry {
        let (quic_addr, cert, key) = (format!("{id}.example:4433"), "ab".repeat(32), format!("key-of-{id}"));
        let attestation = attest_relay(indexer, id, &quic_addr, &cert, &key);
        let region = if id.ends_with('z') { "far" } else { "here" }.into();
        RelayEntry {
            id: id.into(),
            state: state.into(),
            quic_addr,
            public_key: key,
            cert_sha256: cert,
            region,
            attestation,
        }
    }

    #[test]
    fn only_relays_the_indexer_signed_for_are_dialed_and_pinned() {
        let indexer = SigningKey::from_bytes(&[7; 32]);
        let someone = SigningKey::from_bytes(&[8; 32]);
        let mut redirected = entry("relay-c", "ready", &indexer);
        redirected.quic_addr = "attacker.example:4433".into();
        let mut repinned = entry("relay-d", "ready", &indexer);
        repinned.cert_sha256 = "cd".repeat(32);
        let mut unsigned = entry("relay-f", "ready", &indexer);
        unsigned.attestation.clear();
        let relays = vec![
            entry("relay-a", "ready", &indexer),
            entry("relay-b", "draining", &indexer),
            redirected,
            repinned,
            entry("relay-e", "ready", &someone),
            unsigned,
            entry("relay-g", "revoked", &indexer),
        ];
        let (pinned, targets, unattested) = pool_relays(relays, &indexer.verifying_key(), "here", &[]);
        let dialed: Vec<_> = targets.iter().map(|t| t.id.clone().unwrap()).collect();
        assert_eq!(dialed, ["relay-a"]);
        assert_eq!(pinned.values().flatten().cloned().collect::<Vec<_>>(), ["relay-a", "relay-b"]);
        assert_eq!(unattested, 4);
    }

    #[test]
    fn relays_in_the_nodes_region_are_linked_first() {
        let indexer = SigningKey::from_bytes(&[7; 32]);
        let relays = ["relay-az", "relay-b", "relay-cz", "relay-d"].map(|id| entry(id, "ready", &indexer)).to_vec();
        let (_, targets, _) = pool_relays(relays.clone(), &indexer.verifying_key(), "here", &[]);
        let order: Vec<_> = targets.iter().map(|t| t.id.clone().unwrap()).collect();
        assert_eq!(order, ["relay-b", "relay-d", "relay-az", "relay-cz"]);
        // A relay a session was matched to comes before all of them, whatever its region:
        // it is within the links kept, however many relays the region has.
        let (_, targets, _) = pool_relays(relays, &indexer.verifying_key(), "here", &["relay-cz".into()]);
        let order: Vec<_> = targets.iter().map(|t| t.id.clone().unwrap()).collect();
        assert_eq!(order, ["relay-cz", "relay-b", "relay-d", "relay-az"]);
    }
}
