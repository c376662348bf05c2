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
    /// welcome must be the one registered with that certificate.
    Pool(pylon_indexer_client::Client),
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
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(PinnedVerifier { pinned, provider: provider.clone() });
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    quic_config(tls)
}

/// The relay ids registered with the certificate `conn`'s peer presented, if pinned.
fn pinned_relay(conn: &quinn::Connection, pinned: &PinnedRelays) -> Option<Vec<String>> {
    let certs = conn.peer_identity()?.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok()?;
    pinned.get(&cert_sha256(certs.first()?)).cloned()
}

/// Trusts a server certificate only if its SHA-256 is pinned; the handshake's signature is
/// checked against that certificate's key as usual.
#[derive(Debug)]
struct PinnedVerifier {
    pinned: PinnedRelays,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if self.pinned.contains_key(&cert_sha256(end_entity)) {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &rustls::pki_types::CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        // TLS 1.3 only (QUIC).
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// The QUIC side of a TLS client configuration: ALPN and [`transport_config`].
fn quic_config(mut tls: rustls::ClientConfig) -> anyhow::Result<quinn::ClientConfig> {
    tls.alpn_protocols = vec![framing::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config()));
    Ok(config)
}

/// QUIC transport settings of the node's side of the relay connection.
pub fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    // A relay that vanishes is noticed within 5 s (keep-alives every second).
    t.max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(5_000))));
    t.keep_alive_interval(Some(Duration::from_secs(1)));
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

/// Runs the uplink until `shutdown` becomes true: connect, send, reconnect. Session
/// starts and ends go to `sessions` (the node's title runner), which may end a session.
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
    let endpoint = endpoint(bind)?;
    // A certificate file is read once, at start (a missing one is an error now, not later).
    let fixed = match &config.trust {
        RelayTrust::File(path) => Some(client_config(path)?),
        RelayTrust::Pool(_) => None,
    };
    let indexer = match &config.trust {
        RelayTrust::Pool(indexer) => Some(indexer),
        RelayTrust::File(_) => None,
    };
    let mut backoff = Duration::from_millis(100);
    // The pool's relay certificates as last fetched: an indexer that cannot be reached
    // must not keep the node from its relay.
    let mut last_pinned: Option<PinnedRelays> = None;
    // Who may play, carried from one connection to the next (ended sessions stay ended).
    let mut players = match gate.node() {
        Some(id) => PlayerGate::pooled(id),
        None => PlayerGate::open(),
    };
    let link_config = NodeConfig {
        stream: config.hello.clone(),
        identity: config.identity.clone(),
        bitrate_bounds: config.bitrate.as_ref().map(|b| (b.min, b.max)),
    };
    loop {
        if *shutdown.borrow() {
            break;
        }
        // In a pool, the relays to trust as the indexer lists them now, or as it listed
        // them last when it cannot be reached.
        if let Some(indexer) = indexer {
            match pool_relays(indexer).await {
                Ok(pinned) => last_pinned = Some(pinned),
                Err(e) if last_pinned.is_some() => {
                    tracing::warn!("cannot refresh the pool's relay certificates ({e}); trusting those last listed");
                }
                Err(e) => tracing::warn!("cannot learn the pool's relay certificates ({e}); retrying in {backoff:?}"),
            }
        }
        let (client, pinned) = match (&fixed, &last_pinned) {
            (Some(c), _) => (c.clone(), None),
            (None, Some(pinned)) => (pinned_client_config(pinned.clone())?, Some(pinned)),
            (None, None) => {
                if back_off(&mut backoff, &mut packets, &metrics, &mut shutdown).await {
                    break;
                }
                continue;
            }
        };
        let attempt = endpoint.connect_with(client, config.relay, &config.server_name)?;
        let conn = tokio::select! {
            c = attempt => c,
            _ = shutdown.changed() => break,
        };
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("cannot reach the relay ({e}); retrying in {backoff:?}");
                if back_off(&mut backoff, &mut packets, &metrics, &mut shutdown).await {
                    break;
                }
                continue;
            }
        };
        let mut exporter = [0u8; link::EXPORTER_LEN];
        if conn.export_keying_material(&mut exporter, link::EXPORTER_LABEL, b"").is_err() {
            return Err(anyhow!("the QUIC connection cannot export keying material"));
        }
        let players_now = std::mem::replace(&mut players, PlayerGate::open());
        let mut node = NodeSide::new(link_config.clone(), players_now, &exporter, Instant::now(), crate::pool::now());
        metrics.relay_connects.inc();
        metrics.relay_connected.set(1);
        tracing::info!("connected to the relay; waiting for its welcome");
        // Which relay this certificate was registered by: its welcome must say the same.
        let expected_relay = pinned.and_then(|p| pinned_relay(&conn, p));
        let link = Link {
            expected_relay,
            keyframe: &keyframe,
            inputs: &inputs,
            gate: &gate,
            metrics: &metrics,
            bitrate: config.bitrate.as_ref(),
            signals: signals.as_ref(),
        };
        let result =
            serve_connection(&conn, &mut node, &mut packets, &mut commands, &mut capacity, &link, &mut shutdown).await;
        // The relay's viewers are gone with the connection: so is the session.
        let (carried, ended) = node.into_gate();
        players = carried;
        if let Some(session) = ended {
            tracing::info!(session, "player session ended with the relay connection");
            link.signal(SessionSignal::Ended { session });
        }
        gate.set_running(None);
        metrics.relay_connected.set(0);
        metrics.relay_disconnects.inc();
        match result {
            Ok(()) => {
                conn.close(0u32.into(), b"render node shutting down");
                break;
            }
            Err(e) => {
                tracing::warn!("relay connection lost: {e:#}; reconnecting in {backoff:?}");
                // A relay that refuses this node must not be hammered.
                if back_off(&mut backoff, &mut packets, &metrics, &mut shutdown).await {
                    break;
                }
            }
        }
    }
    endpoint.wait_idle().await;
    Ok(())
}

/// The certificates of the pool's relays (not revoked, not awaiting approval), from the
/// indexer: SHA-256 → relay id.
async fn pool_relays(indexer: &pylon_indexer_client::Client) -> anyhow::Result<PinnedRelays> {
    let relays = indexer.relays().await?;
    let mut pinned = PinnedRelays::new();
    for r in relays.into_iter().filter(|r| r.state != "revoked" && r.state != "pending" && !r.cert_sha256.is_empty()) {
        pinned.entry(r.cert_sha256).or_default().push(r.id);
    }
    anyhow::ensure!(!pinned.is_empty(), "the indexer lists no relay with a registered certificate yet");
    Ok(pinned)
}

/// Waits `backoff` before the next try, discarding packets meanwhile (counted), and doubles
/// it up to 5 s; returns true if shutdown was asked meanwhile.
async fn back_off(
    backoff: &mut Duration,
    packets: &mut mpsc::Receiver<Outgoing>,
    metrics: &ServerMetrics,
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    let deadline = tokio::time::Instant::now() + *backoff;
    *backoff = (*backoff * 2).min(Duration::from_secs(5));
    loop {
        tokio::select! {
            p = packets.recv() => {
                if p.is_none() { return true; }
                metrics.rtp_packets_dropped.get_or_create(&PacketDrop { reason: "not_connected" }).inc();
            }
            _ = tokio::time::sleep_until(deadline) => return false,
            _ = shutdown.changed() => return true,
        }
    }
}

/// What the connection hands the link's events to.
struct Link<'a> {
    /// In a pool without a certificate file: the relay ids registered with the
    /// certificate this connection presented.
    expected_relay: Option<Vec<String>>,
    keyframe: &'a AtomicBool,
    inputs: &'a std::sync::mpsc::Sender<ReceivedInput>,
    gate: &'a SessionGate,
    metrics: &'a ServerMetrics,
    bitrate: Option<&'a BitrateControl>,
    signals: Option<&'a mpsc::UnboundedSender<SessionSignal>>,
}

impl Link<'_> {
    fn signal(&self, signal: SessionSignal) {
        if let Some(s) = self.signals {
            let _ = s.send(signal);
        }
    }

    /// Carries out what the state machine decided.
    fn on_event(&self, event: NodeEvent) {
        let metrics = self.metrics;
        match event {
            NodeEvent::Established { relay } => tracing::info!(relay, "the relay admitted this node; streaming"),
            NodeEvent::KeyframeRequested => {
                metrics.keyframe_requests.inc();
                self.keyframe.store(true, Ordering::Relaxed);
            }
            NodeEvent::Input(message) => {
                let _ = self.inputs.send(ReceivedInput { message, arrived: Instant::now() });
            }
            NodeEvent::InputRefused(reason) => {
                metrics.input_rejected.get_or_create(&DropReason { reason }).inc();
            }
            NodeEvent::SessionStarted { session, title } => {
                metrics.sessions_started.inc();
                tracing::info!(session, title, "player session started");
                self.gate.set_running(Some(session.clone()));
                self.signal(SessionSignal::Started { session, title });
            }
            NodeEvent::SessionRefused(e) => {
                metrics.sessions_refused.inc();
                tracing::warn!("refused a session token from the relay: {e}");
            }
            NodeEvent::SessionEnded(session) => {
                tracing::info!(session, "player session ended");
                self.gate.set_running(None);
                self.signal(SessionSignal::Ended { session });
            }
            NodeEvent::Bitrate(target) => {
                if let Some(b) = self.bitrate {
                    tracing::debug!(target, "bitrate from the relay");
                    b.target.store(target, Ordering::Relaxed);
                }
            }
            NodeEvent::Resent { sent, missed } => {
                metrics.rtp_resent.inc_by(u64::from(sent));
                metrics.rtp_resend_missed.inc_by(u64::from(missed));
            }
            // Handed to the capacity worker by `flush`, which can answer on the link.
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
    capacity: &CapacityWorker,
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
                if let Err(reason) = capacity.submit(seq, challenge, Instant::now()) {
                    node.refuse_capacity(seq, reason);
                }
            }
            event => link.on_event(event),
        }
    }
    while let Some(d) = node.poll_datagram() {
        if conn.send_datagram(d.into()).is_err() {
            link.metrics.rtp_packets_dropped.get_or_create(&PacketDrop { reason: "send_error" }).inc();
        }
    }
    if let Some(bytes) = node.poll_transmit() {
        send.write_all(&bytes).await.context("writing the control stream")?;
    }
    Ok(())
}

/// Sends media and handles control until the connection fails (`Err`) or shutdown (`Ok`).
async fn serve_connection(
    conn: &quinn::Connection,
    node: &mut NodeSide,
    packets: &mut mpsc::Receiver<Outgoing>,
    commands: &mut mpsc::UnboundedReceiver<UplinkCommand>,
    capacity: &mut CapacityWorker,
    link: &Link<'_>,
    shutdown: &mut watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let metrics = link.metrics;
    let (mut send, mut recv) = conn.open_bi().await.context("opening the control stream")?;
    flush(node, &mut send, conn, link, capacity).await?;
    let mut read_buf = vec![0u8; 4096];
    let mut datagram = Vec::with_capacity(1500);
    let far = || tokio::time::Instant::now() + Duration::from_secs(3600);
    loop {
        let timeout = node.poll_timeout().map_or_else(far, tokio::time::Instant::from_std);
        tokio::select! {
            packet = packets.recv() => {
                match packet {
                    None => return Ok(()),
                    Some(Outgoing::FrameInfo(info)) => node.send_frame_info(info),
                    Some(Outgoing::AudioRtp(rtp, capture)) => match node.send_audio(Instant::now(), &rtp, capture, &mut datagram) {
                        Ok(()) => {
                            if conn.send_datagram(bytes::Bytes::copy_from_slice(&datagram)).is_err() {
                                metrics.rtp_packets_dropped.get_or_create(&PacketDrop { reason: "send_error" }).inc();
                            }
                        }
                        Err(_) => {
                            metrics.rtp_packets_dropped.get_or_create(&PacketDrop { reason: "not_welcomed" }).inc();
                        }
                    },
                    Some(Outgoing::Rtp(rtp, capture)) => match node.send_rtp(Instant::now(), &rtp, capture, &mut datagram) {
                        Ok(()) => {
                            if let Err(e) = conn.send_datagram(bytes::Bytes::copy_from_slice(&datagram)) {
                                metrics.rtp_packets_dropped.get_or_create(&PacketDrop { reason: "send_error" }).inc();
                                match e {
                                    quinn::SendDatagramError::TooLarge => tracing::warn!("RTP packet of {} bytes too large for a datagram", rtp.len()),
                                    e => return Err(e.into()),
                                }
                            }
                        }
                        Err(_) => {
                            metrics.rtp_packets_dropped.get_or_create(&PacketDrop { reason: "not_welcomed" }).inc();
                        }
                    },
                }
            }
            read = recv.read(&mut read_buf) => {
                let n = read.context("reading the control stream")?.ok_or_else(|| anyhow!("the relay closed the control stream"))?;
                // Session tokens arrive here: verify them with the indexer's key, which
                // the membership task learns at registration (not copied per packet).
                if let Some(k) = link.gate.key() {
                    node.gate_mut().set_key(k);
                }
                if let Err(e) = node.handle_control(Instant::now(), read_buf.get(..n).unwrap_or_default()) {
                    if matches!(e, LinkError::Framing(_)) {
                        metrics.bad_control_messages.inc();
                    }
                    flush(node, &mut send, conn, link, capacity).await?;
                    return Err(anyhow!("relay link: {e}"));
                }
            }
            Some(answer) = capacity.next() => match answer.result {
                Ok(p) => node.answer_capacity(answer.seq, &p.words, p.gpu_us, p.wall_us),
                Err(reason) => node.refuse_capacity(answer.seq, &reason),
            },
            Some(command) = commands.recv() => match command {
                UplinkCommand::EndSession { reason } => {
                    if let Some(session) = node.end_session(&reason) {
                        tracing::info!(session, "the node ended the session: {reason}");
                        link.gate.set_running(None);
                    }
                }
            },
            d = conn.read_datagram() => {
                let d = d.context("reading datagrams")?;
                node.handle_datagram(Instant::now(), &d);
            }
            _ = tokio::time::sleep_until(timeout) => {
                node.handle_timeout(Instant::now()).map_err(|e| anyhow!("relay link: {e}"))?;
            }
            _ = shutdown.changed() => {
                node.close("render node shutting down");
                let _ = flush(node, &mut send, conn, link, capacity).await;
                let _ = send.finish();
                return Ok(());
            }
        }
        flush(node, &mut send, conn, link, capacity).await?;
    }
}
