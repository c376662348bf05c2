//! QUIC ingest: render nodes connect here and send RTP in datagrams. A thin driver around
//! [`pylon_proto::link::RelaySide`], which owns the protocol: the node's signed hello,
//! upstream loss repair, and nothing sent to a node before it is admitted.
//!
//! Admission: in a pool the node's key must be the one the indexer holds for the id it
//! claims, and the node neither revoked nor awaiting approval. Outside a pool a node is
//! admitted from loopback only, unless `--allow-anonymous-nodes`.
//!
//! Every connection is bounded: one bidirectional stream and no unidirectional ones,
//! small stream and connection windows, a capped datagram buffer, a handshake deadline,
//! its own media queue to the egress task (a flooding node fills only its own), and its
//! session control on a path input cannot crowd out.

use crate::metrics::RelayMetrics;
use crate::pool::{NodeCheck, Pool};
use crate::tls::Identity;
use anyhow::{Context, anyhow};
use bytes::Bytes;
use pylon_proto::framing::{self, CapacityReply, FrameInfo, StreamHello};
use pylon_proto::link::{self, LinkError, MediaDrop, RelayEvent, RelaySide, ToNode};
use pylon_proto::repair::RepairConfig;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// Kernel UDP buffer size for ingest: keyframes arrive as bursts of datagrams.
pub const SOCKET_BUFFER: usize = 8 << 20;
/// Datagrams quinn buffers per connection before dropping: bursts of keyframes while the
/// connection's task is busy (as much as the kernel's socket buffer holds).
pub const DATAGRAM_BUFFER: usize = SOCKET_BUFFER;
/// Flow-control window of the control stream: control messages are small.
pub const STREAM_WINDOW: u32 = 64 * 1024;
/// Flow-control window of a whole connection (stream data; datagrams have their own).
pub const CONNECTION_WINDOW: u32 = 256 * 1024;
/// Packets queued from one node to the egress task; past it that node's packets drop.
pub const NODE_QUEUE: usize = 2048;
/// Control bytes waiting for a node that does not read its stream; past it, it is closed.
pub const MAX_PENDING_CONTROL: usize = 1 << 20;

/// What one node's connection sends the egress task, in order, on its own queue.
#[derive(Debug)]
pub enum NodeMedia {
    /// One RTP packet (already checked to parse and deduplicated).
    Rtp {
        /// The whole RTP packet.
        packet: Bytes,
        /// When it arrived.
        arrival: Instant,
        /// The capture time (NTP): on the first packet of each video frame, on every audio
        /// packet.
        capture_ntp: Option<u64>,
        /// That capture time on this relay's monotonic clock (the node's wall clock read
        /// against this relay's): what str0m maps RTP times to in sender reports, so the
        /// browser can line audio up with video.
        captured: Option<Instant>,
        /// An audio (Opus) packet, not video.
        audio: bool,
    },
    /// The node says which input a frame first reflects.
    FrameInfo(FrameInfo),
    /// The node ended a session (its title exited, crashed or never drew).
    SessionOver {
        /// Session id.
        session: String,
        /// Why, for the player.
        reason: String,
    },
    /// The node's answer to its checker's capacity challenge.
    Capacity(CapacityReply),
}

/// How the egress task reaches one node: session control (player joined or left,
/// keyframe, bitrate) never waits behind input, and input is dropped, counted, when the
/// node's connection is behind.
#[derive(Debug, Clone)]
pub struct NodeControl {
    /// Session control, delivered in order; rare by construction (joins, leaves, one
    /// keyframe request per 300 ms, bitrate steps).
    pub session: mpsc::UnboundedSender<ToNode>,
    /// Player input, bounded.
    pub input: mpsc::Sender<ToNode>,
}

impl NodeControl {
    /// Queues `msg` on its path; `false` when input was dropped (the node is behind).
    pub fn send(&self, msg: ToNode) -> bool {
        let is_input =
            matches!(msg, ToNode::InputDatagram(_) | ToNode::Control(pylon_proto::framing::RelayMessage::Input(_)));
        if is_input { self.input.try_send(msg).is_ok() } else { self.session.send(msg).is_ok() }
    }
}

/// A node's stream, as the egress task learns of it.
#[derive(Debug)]
pub enum IngestEvent {
    /// An admitted node announced its stream.
    StreamStarted {
        /// Connection id.
        node: u64,
        /// The stream's description.
        hello: StreamHello,
        /// Sends keyframe requests, session control and player input back to the node.
        control: NodeControl,
        /// This node's packets and frame info.
        media: mpsc::Receiver<NodeMedia>,
        /// Whether the node's id is on the ready list (see [`ReadyList`]).
        scheduled: Arc<AtomicBool>,
        /// Pulled from another relay for this session's spectators (a cascade), not a
        /// node's own link.
        pulled: Option<String>,
        /// The relays pulling this stream from here, which this connection's task copies
        /// each packet to.
        downstreams: crate::cascade::Downstreams,
    },
    /// The node's connection ended.
    StreamEnded {
        /// Connection id.
        node: u64,
    },
    /// Another relay (verified) pulls `session`'s stream: the egress task answers with
    /// the stream its player plays here, or why not.
    Pull {
        /// The session.
        session: String,
        /// The answer.
        reply: tokio::sync::oneshot::Sender<Result<Pulled, String>>,
    },
    /// This relay's pull of `session`'s stream ended (or failed to start).
    PullEnded {
        /// The session.
        session: String,
    },
    /// A relay pulling stream `node` asks for a keyframe.
    Keyframe {
        /// The stream's ingest connection.
        node: u64,
    },
}

/// A stream handed to a relay pulling it.
#[derive(Debug)]
pub struct Pulled {
    /// The stream's ingest connection here.
    pub source: u64,
    /// Its description (the node's), sent on as the pulling relay's hello.
    pub hello: StreamHello,
    /// The relays pulling it: the pulling relay joins them, and the stream's ingest task
    /// then copies every packet and frame info to it.
    pub downstreams: crate::cascade::Downstreams,
    /// Resolves (its sender dropped) when the egress task ends the pull: the session's
    /// player left or moved, or the stream ended.
    pub ended: tokio::sync::oneshot::Receiver<()>,
}

/// Nodes with media waiting for the egress task, each listed once: a node's id goes on the
/// list when its queue goes from idle to holding packets, and the egress task takes a
/// bounded turn from each listed node in order (round robin) — one wake-up per burst, and
/// a node that floods gets its turn, not the others'.
#[derive(Debug, Clone)]
pub struct ReadyList {
    tx: mpsc::UnboundedSender<u64>,
}

impl ReadyList {
    /// A list and the egress task's end of it.
    pub fn new() -> (Self, mpsc::UnboundedReceiver<u64>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self { tx }, rx)
    }

    /// Lists `node` unless it is listed already (its length is bounded by the nodes).
    pub fn schedule(&self, node: u64, scheduled: &AtomicBool) {
        if !scheduled.swap(true, Ordering::AcqRel) {
            let _ = self.tx.send(node);
        }
    }
}

/// Who the relay admits when it has no indexer to ask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnonymousNodes {
    /// Only nodes connecting from a loopback address (development, `make demo`).
    LoopbackOnly,
    /// Any node (`--allow-anonymous-nodes`).
    Allowed,
}

/// The transport limits of a node's connection.
pub fn transport_config() -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(5_000))))
        .keep_alive_interval(Some(Duration::from_secs(1)))
        .max_concurrent_bidi_streams(quinn::VarInt::from_u32(1))
        .max_concurrent_uni_streams(quinn::VarInt::from_u32(0))
        .stream_receive_window(quinn::VarInt::from_u32(STREAM_WINDOW))
        .receive_window(quinn::VarInt::from_u32(CONNECTION_WINDOW))
        .send_window(u64::from(CONNECTION_WINDOW) * 4)
        .datagram_receive_buffer_size(Some(DATAGRAM_BUFFER))
        .datagram_send_buffer_size(1 << 20)
        .initial_mtu(1400);
    transport
}

/// Binds the QUIC endpoint with a large UDP buffer and the relay's certificate.
pub fn endpoint(addr: SocketAddr, identity: &Identity) -> anyhow::Result<quinn::Endpoint> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(identity.key.clone().into());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![identity.cert.clone().into()], key)
        .context("loading the relay certificate")?;
    tls.alpn_protocols = vec![framing::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(Arc::new(transport_config()));
    let socket = crate::egress::big_buffer_socket(addr, SOCKET_BUFFER)?;
    let runtime = quinn::default_runtime().ok_or_else(|| anyhow!("no async runtime for QUIC"))?;
    quinn::Endpoint::new(quinn::EndpointConfig::default(), Some(server), socket, runtime)
        .context("creating the QUIC endpoint")
}

/// What every node connection shares.
#[derive(Clone)]
pub(crate) struct Shared {
    pub(crate) events: mpsc::Sender<IngestEvent>,
    ready: ReadyList,
    pub(crate) metrics: RelayMetrics,
    pub(crate) pool: Option<Pool>,
    anonymous: AnonymousNodes,
    pub(crate) relay_id: String,
    /// The relay's pool key: signs its pulls and the streams it sends to relays pulling.
    pub(crate) key: Option<ed25519_dalek::SigningKey>,
    /// Dials relays to pull from.
    pub(crate) endpoint: quinn::Endpoint,
}

/// Connection numbers, for nodes' links and pulls alike.
pub(crate) static NEXT_NODE: AtomicU64 = AtomicU64::new(1);

/// What the ingest task needs besides its endpoint.
pub struct IngestConfig {
    /// Streams to the egress task.
    pub events: mpsc::Sender<IngestEvent>,
    /// Nodes with media waiting.
    pub ready: ReadyList,
    /// Relay metrics.
    pub metrics: RelayMetrics,
    /// The pool, if in one.
    pub pool: Option<Pool>,
    /// Who is admitted without a pool.
    pub anonymous: AnonymousNodes,
    /// The relay's pool key (signs pulls and the streams sent to relays pulling).
    pub key: Option<ed25519_dalek::SigningKey>,
    /// Sessions whose stream to pull from the relay carrying them (from the egress task).
    pub pulls: mpsc::UnboundedReceiver<String>,
}

/// Accepts node connections (and other relays pulling a stream) until shutdown, and
/// pulls the streams the egress task asks for. A node that queues media for the egress
/// task is put on `ready`.
pub async fn run(
    endpoint: quinn::Endpoint,
    config: IngestConfig,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let IngestConfig { events, ready, metrics, pool, anonymous, key, mut pulls } = config;
    let relay_id = pool.as_ref().map_or_else(String::new, |p| p.id().to_string());
    let shared = Shared { events, ready, metrics, pool, anonymous, relay_id, key, endpoint: endpoint.clone() };
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            Some(session) = pulls.recv() => {
                tokio::spawn(crate::cascade::pull_session(shared.clone(), session, shutdown.clone()));
                continue;
            }
            _ = crate::stopped(&mut shutdown) => break,
        };
        let Some(incoming) = incoming else { break };
        let node = NEXT_NODE.fetch_add(1, Ordering::Relaxed);
        let (shared, shutdown) = (shared.clone(), shutdown.clone());
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    shared.metrics.node_handshake_failures.inc();
                    tracing::warn!(node, "node handshake failed: {e}");
                    return;
                }
            };
            shared.metrics.nodes_connected.inc();
            let result = serve_node(node, &conn, &shared, Mode::Accepted, shutdown).await;
            shared.metrics.nodes_connected.dec();
            match result {
                Ok(()) => tracing::info!(node, "render node left"),
                Err(e) => tracing::warn!(node, "render node connection ended: {e:#}"),
            }
        });
    }
    endpoint.close(0u32.into(), b"relay shutting down");
    endpoint.wait_idle().await;
    Ok(())
}

/// Tells the egress task and the pool view that a started stream is over, however the
/// connection ends.
struct StreamGuard<'a> {
    shared: &'a Shared,
    node: u64,
    node_id: String,
    started: bool,
    pulled: bool,
}

impl Drop for StreamGuard<'_> {
    fn drop(&mut self) {
        if !self.started {
            return;
        }
        if let Some(pool) = self.shared.pool.as_ref().filter(|_| !self.pulled) {
            pool.node_gone(&self.node_id);
        }
        let events = self.shared.events.clone();
        let node = self.node;
        tokio::spawn(async move {
            let _ = events.send(IngestEvent::StreamEnded { node }).await;
        });
    }
}

/// Whether the node whose proven key is `key`, claiming `stream.node`, may stream here.
async fn admission(
    shared: &Shared,
    conn: &quinn::Connection,
    stream: &StreamHello,
    key: Option<Box<ed25519_dalek::VerifyingKey>>,
) -> Result<(), String> {
    match &shared.pool {
        Some(pool) => {
            let Some(key) = key else {
                return Err("this relay is in a pool: a node must sign its hello with its registered key".into());
            };
            match pool.check_node(&stream.node, &key).await {
                NodeCheck::Admitted => Ok(()),
                refused => Err(refused.to_string()),
            }
        }
        None => {
            let loopback = conn.remote_address().ip().is_loopback();
            if loopback || shared.anonymous == AnonymousNodes::Allowed {
                Ok(())
            } else {
                Err("this relay takes nodes from loopback only (start it with --allow-anonymous-nodes)".into())
            }
        }
    }
}

/// Writes the last control bytes (a goodbye) and waits, briefly, for the node to have
/// them: closing the connection at once would discard them, and the node would not learn
/// why it was refused.
pub(crate) async fn say_goodbye(send: &mut quinn::SendStream, pending: &[u8]) {
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        let _ = send.write_all(pending).await;
        let _ = send.finish();
        let _ = send.stopped().await;
    })
    .await;
}

/// Which end of a stream's link this relay is.
#[derive(Debug)]
pub(crate) enum Mode {
    /// A node (or a relay pulling a stream) dialed this relay.
    Accepted,
    /// This relay dialed the relay carrying `session` to pull its stream; that relay's
    /// hello must be signed by `carrier`, its registered key.
    Pulling {
        /// The session pulled.
        session: String,
        /// The carrying relay's key.
        carrier: Box<ed25519_dalek::VerifyingKey>,
    },
}

/// Serves one link whose far end sends a stream: a render node's (accepted), or another
/// relay's for a session pulled from it ([`Mode::Pulling`]). An accepted link whose first
/// message is a pull is handed to [`crate::cascade::serve_downstream`].
pub(crate) async fn serve_node(
    node: u64,
    conn: &quinn::Connection,
    shared: &Shared,
    mode: Mode,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let metrics = &shared.metrics;
    let mut exporter = [0u8; link::EXPORTER_LEN];
    conn.export_keying_material(&mut exporter, link::EXPORTER_LABEL, b"")
        .map_err(|_| anyhow!("the QUIC connection cannot export keying material"))?;
    let mut link = RelaySide::new(&shared.relay_id, &exporter, RepairConfig::default(), Instant::now());
    let (mut send, mut recv) = match &mode {
        Mode::Accepted => tokio::time::timeout(link::HANDSHAKE_TIMEOUT, conn.accept_bi())
            .await
            .map_err(|_| anyhow!("no control stream within {:?}", link::HANDSHAKE_TIMEOUT))?
            .context("accepting the control stream")?,
        Mode::Pulling { session, .. } => {
            let key = shared.key.as_ref().ok_or_else(|| anyhow!("pulling needs the relay's pool key"))?;
            let (mut send, recv) = conn.open_bi().await.context("opening the control stream")?;
            send.write_all(&link::pull_request(&exporter, &shared.relay_id, session, key))
                .await
                .context("asking for the stream")?;
            (send, recv)
        }
    };
    let pulled = match &mode {
        Mode::Pulling { session, .. } => Some(session.clone()),
        Mode::Accepted => None,
    };
    let mut guard = StreamGuard { shared, node, node_id: String::new(), started: false, pulled: pulled.is_some() };
    let mut buf = vec![0u8; 4096];
    let mut pending: Vec<u8> = Vec::new();
    let (session_tx, mut session_rx) = mpsc::unbounded_channel::<ToNode>();
    let (input_tx, mut input_rx) = mpsc::channel::<ToNode>(256);
    let control = NodeControl { session: session_tx, input: input_tx };
    let mut media_tx: Option<mpsc::Sender<NodeMedia>> = None;
    let scheduled = Arc::new(AtomicBool::new(false));
    let downstreams = crate::cascade::Downstreams::default();
    let mut stream: Option<crate::metrics::StreamCounters> = None;
    let mut pool_tick = tokio::time::interval(Duration::from_secs(1));
    let mut counted = link.repair_stats();
    let far = || tokio::time::Instant::now() + Duration::from_secs(3600);
    let close = |link_err: &LinkError| {
        let code: u32 = match link_err {
            LinkError::Refused(_) => 2,
            LinkError::Goodbye(_) => 0,
            _ => 1,
        };
        conn.close(code.into(), link_err.to_string().as_bytes());
    };
    loop {
        let timeout = link.poll_timeout().map_or_else(far, tokio::time::Instant::from_std);
        let result: Result<(), LinkError> = tokio::select! {
            d = conn.read_datagram() => {
                let d = d.context("reading datagrams")?;
                let arrival = Instant::now();
                match link.handle_datagram(arrival, &d) {
                    Ok(media) => {
                        if media.repaired {
                            metrics.upstream_repaired.inc();
                            if let Some(s) = &stream { s.upstream_repaired.inc(); }
                        }
                        let rtp_len = d.len() - media.rtp_offset;
                        metrics.rtp_in_packets.inc();
                        metrics.rtp_in_bytes.inc_by(rtp_len as u64);
                        let packet = d.slice(media.rtp_offset..);
                        let captured = media.capture_ntp.and_then(pylon_proto::framing::from_ntp).map(|t| {
                            // How long ago it was captured, at most a second (clocks apart).
                            let age = std::time::SystemTime::now().duration_since(t).unwrap_or_default();
                            arrival.checked_sub(age.min(Duration::from_secs(1))).unwrap_or(arrival)
                        });
                        let queued = media_tx.as_ref().is_some_and(|tx| {
                            tx.try_send(NodeMedia::Rtp {
                                packet: packet.clone(),
                                arrival,
                                capture_ntp: media.capture_ntp,
                                captured,
                                audio: media.audio,
                            })
                            .is_ok()
                        });
                        if queued { shared.ready.schedule(node, &scheduled); } else { metrics.dropped("egress_queue_full"); }
                        // Relays pulling the stream get it from here, not through the egress task.
                        downstreams.copy_rtp(&packet, media.capture_ntp, media.audio, arrival, metrics);
                    }
                    Err(MediaDrop::Duplicate) => metrics.dropped("duplicate"),
                    Err(reason) => metrics.dropped(reason.label()),
                }
                Ok(())
            }
            Some(msg) = session_rx.recv() => link.send(msg).map(|_| ()),
            Some(msg) = input_rx.recv() => {
                if !link.send(msg).unwrap_or(false) {
                    metrics.input_refused.get_or_create(&crate::metrics::DropReason { reason: "node_busy" }).inc();
                }
                Ok(())
            }
            read = recv.read(&mut buf) => {
                match read.context("reading the control stream")? {
                    None => return Ok(()),
                    Some(n) => link.handle_control(Instant::now(), buf.get(..n).unwrap_or_default()),
                }
            }
            written = send.write(&pending), if !pending.is_empty() => {
                let n = written.context("writing to the control stream")?;
                pending.drain(..n);
                Ok(())
            }
            _ = tokio::time::sleep_until(timeout) => link.handle_timeout(Instant::now()),
            _ = pool_tick.tick() => {
                link.set_rtt(conn.rtt());
                match shared.pool.as_ref().filter(|_| pulled.is_none()) {
                    Some(pool) if link.is_established() => {
                        if pool.is_revoked(&guard.node_id) {
                            link.close("this node is revoked");
                            Err(LinkError::Refused("this node is revoked".into()))
                        } else {
                            pool.set_node_rtt(&guard.node_id, conn.rtt());
                            Ok(())
                        }
                    }
                    _ => Ok(()),
                }
            }
            _ = crate::stopped(&mut shutdown) => {
                link.close("relay shutting down");
                Err(LinkError::Goodbye("relay shutting down".into()))
            }
        };
        // Upstream repair's work since the last event (requests on timers; gaps given up on
        // timers and when a jump overflows the repair map).
        let stats = link.repair_stats();
        metrics.upstream_given_up.inc_by(stats.given_up - counted.given_up);
        let asked = stats.requested - counted.requested;
        metrics.upstream_nacks.inc_by(asked);
        if let Some(s) = &stream {
            s.upstream_nacks.inc_by(asked);
        }
        counted = stats;
        // Carry out what the link decided.
        while let Some(event) = link.poll_event() {
            match event {
                RelayEvent::Hello { stream: hello, key } => {
                    tracing::info!(
                        node,
                        id = %hello.node,
                        signed = key.is_some(),
                        "render node says it streams {}x{} at {} fps with {}",
                        hello.width,
                        hello.height,
                        hello.fps,
                        hello.encoder
                    );
                    let admitted = match &mode {
                        Mode::Accepted => admission(shared, conn, &hello, key).await,
                        Mode::Pulling { carrier, .. } if key.as_deref() == Some(&**carrier) => Ok(()),
                        Mode::Pulling { .. } => Err("not signed by the relay carrying the session".to_string()),
                    };
                    if let Err(why) = admitted {
                        metrics.nodes_refused.inc();
                        let e = link.refuse(&why);
                        pending.extend(link.poll_transmit().unwrap_or_default());
                        say_goodbye(&mut send, &pending).await;
                        close(&e);
                        return Err(anyhow!("refused node {:?}: {why}", hello.node));
                    }
                    link.admit(Instant::now());
                    link.set_rtt(conn.rtt());
                    guard.node_id = hello.node.clone();
                    if let Some(pool) = shared.pool.as_ref().filter(|_| pulled.is_none()) {
                        pool.set_node_rtt(&hello.node, conn.rtt());
                    }
                    stream = Some(metrics.stream_counters(&crate::forward::stream_label(node, &hello)));
                    let (tx, rx) = mpsc::channel(NODE_QUEUE);
                    media_tx = Some(tx);
                    shared
                        .events
                        .send(IngestEvent::StreamStarted {
                            node,
                            hello,
                            control: control.clone(),
                            media: rx,
                            scheduled: scheduled.clone(),
                            pulled: pulled.clone(),
                            downstreams: downstreams.clone(),
                        })
                        .await
                        .map_err(|_| anyhow!("egress task gone"))?;
                    guard.started = true;
                }
                RelayEvent::FrameInfo(info) => {
                    downstreams.copy_frame_info(info);
                    if media_tx.as_ref().is_some_and(|tx| tx.try_send(NodeMedia::FrameInfo(info)).is_ok()) {
                        shared.ready.schedule(node, &scheduled);
                    }
                }
                RelayEvent::Capacity(reply) => {
                    // Never dropped here (a missing chunk would spoil the whole answer); the
                    // channel's bound holds the node back, and the core caps what it passes.
                    if let Some(tx) = &media_tx
                        && tx.send(NodeMedia::Capacity(reply)).await.is_ok()
                    {
                        shared.ready.schedule(node, &scheduled);
                    }
                }
                RelayEvent::Pull { relay, session, key } if matches!(mode, Mode::Accepted) => {
                    drop(guard);
                    return crate::cascade::serve_downstream(
                        conn,
                        (send, recv),
                        &exporter,
                        shared,
                        crate::cascade::PullRequest { relay, session, key: *key },
                        shutdown,
                    )
                    .await;
                }
                RelayEvent::Pull { .. } => {
                    return Err(anyhow!("the relay pulled from asked to pull in turn"));
                }
                RelayEvent::SessionOver { session, reason } => {
                    tracing::info!(node, session, "the node ended the session: {reason}");
                    // Never dropped: the player must hear why its game ended.
                    if let Some(tx) = &media_tx
                        && tx.send(NodeMedia::SessionOver { session, reason }).await.is_ok()
                    {
                        shared.ready.schedule(node, &scheduled);
                    }
                }
            }
        }
        while let Some(d) = link.poll_datagram() {
            let _ = conn.send_datagram(Bytes::from(d));
        }
        if let Some(bytes) = link.poll_transmit() {
            pending.extend_from_slice(&bytes);
            if pending.len() > MAX_PENDING_CONTROL {
                metrics.bad_control_messages.inc();
                conn.close(1u32.into(), b"control stream backed up");
                return Err(anyhow!("the node does not read its control stream"));
            }
        }
        if let Err(e) = result {
            if matches!(
                e,
                LinkError::Framing(_) | LinkError::HelloExpected | LinkError::DuplicateHello | LinkError::BadSignature
            ) {
                metrics.bad_control_messages.inc();
            }
            if matches!(e, LinkError::BadSignature) {
                metrics.nodes_refused.inc();
            }
            say_goodbye(&mut send, &pending).await;
            close(&e);
            return match e {
                LinkError::Goodbye(reason) => {
                    tracing::info!(node, "link closed: {reason}");
                    Ok(())
                }
                e => Err(anyhow!("{e}")),
            };
        }
    }
}
