//! WebRTC egress: every viewer on one UDP socket, driven by one task.
//!
//! The forwarding decisions live in the sans-IO [`crate::forward::Core`]; this task moves
//! its datagrams (one socket for every viewer, the single port an edge-box owner opens,
//! with UDP segmentation offload through quinn-udp) and its messages to nodes (their
//! control channels), and feeds it node packets, viewer datagrams, offers and timers.

use crate::cascade::Downstreams;
use crate::forward::{Core, Sink};
use crate::ingest::{IngestEvent, NodeControl, NodeMedia, ReadyList};
use crate::metrics::{DropReason, RelayMetrics};
use crate::pool::{Admission, Pool};
use anyhow::Context;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use tokio::sync::{mpsc, oneshot, watch};

/// Packets taken from one node's queue per turn before the next ready node's: each node
/// gets its fair share of the egress task, however fast another one sends.
const INGEST_BATCH: usize = 64;
/// Ready nodes served per wake-up before the viewers are drained.
const READY_BATCH: usize = 16;
/// Kernel UDP buffer size for the viewer socket.
const SOCKET_BUFFER: usize = 4 << 20;

/// Requests from the signalling side.
#[derive(Debug)]
pub enum ViewerCommand {
    /// A browser's SDP offer; the reply carries the viewer id and the SDP answer.
    Offer {
        /// The offer's SDP text.
        sdp: String,
        /// Whether the viewer asks to play (granted when nobody else holds the role).
        wants_player: bool,
        /// In a pool: the session the viewer's token admits it to, and the token (which
        /// the node verifies itself when the player starts).
        admitted: Option<(Admission, String)>,
        /// Where the answer goes: viewer id, SDP answer, whether the viewer is the player.
        reply: oneshot::Sender<Result<(u64, String, bool), String>>,
        /// Dropped when the viewer's session closes (its signalling socket then closes);
        /// carries why when the node ended the session.
        closed: oneshot::Sender<String>,
    },
    /// The browser's signalling connection closed.
    Leave {
        /// Viewer id from the answer.
        id: u64,
    },
}

/// Creates a UDP socket with large kernel buffers, bound to `addr`.
pub fn big_buffer_socket(addr: SocketAddr, size: usize) -> anyhow::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if socket.set_recv_buffer_size(size).is_err() || socket.recv_buffer_size().unwrap_or(0) < size {
        tracing::warn!("UDP receive buffer below {size} bytes: raise net.core.rmem_max to avoid drops");
    }
    if socket.set_send_buffer_size(size).is_err() || socket.send_buffer_size().unwrap_or(0) < size {
        tracing::warn!("UDP send buffer below {size} bytes: raise net.core.wmem_max to avoid drops");
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into()).with_context(|| format!("binding UDP {addr}"))?;
    Ok(socket.into())
}

/// Binds the viewer socket.
pub fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::UdpSocket> {
    Ok(tokio::net::UdpSocket::from_std(big_buffer_socket(addr, SOCKET_BUFFER)?)?)
}

/// The viewers' UDP socket and its segmentation-offload state (quinn-udp).
pub struct UdpOut {
    socket: tokio::net::UdpSocket,
    state: quinn_udp::UdpSocketState,
    max_segments: usize,
}

impl UdpOut {
    fn new(socket: tokio::net::UdpSocket) -> anyhow::Result<Self> {
        let state = quinn_udp::UdpSocketState::new((&socket).into()).context("preparing the viewer socket")?;
        let max_segments = state.max_gso_segments().clamp(1, 16);
        Ok(Self { socket, state, max_segments })
    }
}

/// Consecutive datagrams to one destination, all the same size but the last: one
/// `sendmsg` with UDP_SEGMENT (GSO) where the kernel supports it.
#[derive(Default)]
struct GsoBatch {
    destination: Option<SocketAddr>,
    segment: usize,
    count: usize,
    closed: bool,
}

impl GsoBatch {
    fn push(&mut self, udp: &UdpOut, buf: &mut Vec<u8>, destination: SocketAddr, data: &[u8], metrics: &RelayMetrics) {
        let fits = self.destination == Some(destination)
            && !self.closed
            && data.len() <= self.segment
            && self.count < udp.max_segments;
        if !fits {
            self.flush(udp, buf, metrics);
            self.destination = Some(destination);
            self.segment = data.len();
        }
        buf.extend_from_slice(data);
        self.count += 1;
        // A shorter datagram can only be the last of a batch.
        self.closed = data.len() < self.segment;
    }

    fn flush(&mut self, udp: &UdpOut, buf: &mut Vec<u8>, metrics: &RelayMetrics) {
        if let Some(destination) = self.destination.filter(|_| self.count > 0) {
            let transmit = quinn_udp::Transmit {
                destination,
                ecn: None,
                contents: buf,
                segment_size: (self.count > 1).then_some(self.segment),
                src_ip: None,
            };
            if udp.state.send((&udp.socket).into(), &transmit).is_err() {
                metrics.udp_send_errors.inc();
            }
        }
        buf.clear();
        *self = Self::default();
    }
}

/// The socket side of a [`Sink`]: each viewer's datagrams batched into
/// segmentation-offload sends.
struct UdpSink<'a> {
    udp: &'a UdpOut,
    buf: Vec<u8>,
    batch: GsoBatch,
    metrics: &'a RelayMetrics,
}

impl Sink for UdpSink<'_> {
    fn send(&mut self, destination: SocketAddr, data: &[u8]) {
        self.batch.push(self.udp, &mut self.buf, destination, data, self.metrics);
    }

    fn flush(&mut self) {
        self.batch.flush(self.udp, &mut self.buf, self.metrics);
    }
}

/// Sends the core's messages to the nodes' control channels and its ended sessions to
/// the pool.
fn dispatch(core: &mut Core, nodes: &HashMap<u64, NodeQueue>, pool: Option<&Pool>, metrics: &RelayMetrics) {
    for (node, msg) in core.poll_to_node() {
        let sent = nodes.get(&node).is_some_and(|n| n.control.send(msg));
        if !sent {
            metrics.input_refused.get_or_create(&DropReason { reason: "node_busy" }).inc();
        }
    }
    for session in core.poll_ended_sessions() {
        if let Some(pool) = pool {
            pool.session_ended(&session, "player left");
        }
    }
}

/// One admitted node, as the egress task holds it.
struct NodeQueue {
    control: NodeControl,
    media: mpsc::Receiver<NodeMedia>,
    scheduled: Arc<AtomicBool>,
    /// The relays pulling this stream, which its ingest task copies each packet to.
    downstreams: Downstreams,
}

/// Runs the egress loop until shutdown. Nodes with media waiting arrive on `ready`
/// (`relist` puts a node back when its turn did not empty its queue).
#[allow(clippy::too_many_arguments)]
pub async fn run(
    socket: tokio::net::UdpSocket,
    advertise: SocketAddr,
    mut ingest: mpsc::Receiver<IngestEvent>,
    (relist, mut ready): (ReadyList, mpsc::UnboundedReceiver<u64>),
    mut commands: mpsc::Receiver<ViewerCommand>,
    metrics: RelayMetrics,
    pool: Option<Pool>,
    av_sync: bool,
    pulls: mpsc::UnboundedSender<String>,
    draining: watch::Receiver<bool>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let udp = UdpOut::new(socket)?;
    let mut sink =
        UdpSink { udp: &udp, buf: Vec::with_capacity(16 * 1500), batch: GsoBatch::default(), metrics: &metrics };
    let mut core = Core::new(advertise, metrics.clone());
    core.set_av_sync(av_sync);
    let mut nodes: HashMap<u64, NodeQueue> = HashMap::new();
    let mut buf = vec![0u8; 2048];
    let mut players_reported = Instant::now();
    // Each viewer's signalling socket learns its session closed when its sender drops.
    let mut open_sessions: HashMap<u64, oneshot::Sender<String>> = HashMap::new();
    // Relays pulling a stream from this one (a cascade).
    let mut pulls_here: Vec<PullHere> = Vec::new();
    loop {
        let now = Instant::now();
        // Read before any viewer's leave is handled: the viewers were told to move after
        // the flag turned.
        if *draining.borrow() {
            core.set_draining();
        }
        core.handle_timeout(now, &mut sink);
        // The pool's heartbeat reports who really plays (metering follows it); once a
        // second is fresh enough for a 3 s heartbeat and costs nothing per packet.
        if let Some(pool) = &pool
            && now.saturating_duration_since(players_reported) >= std::time::Duration::from_secs(1)
        {
            pool.set_players(core.connected_players());
            for (session, reason) in pool.take_closed_by_indexer() {
                core.close_session(&session, &reason);
            }
            // A session whose player left (or moved) is no longer carried here: the relays
            // pulling it lose the stream, and their spectators' pages ask where it went.
            pulls_here.retain(|d| !d.ended.is_closed() && core.session_source(&d.session).is_some());
            metrics.downstream_relays.set(pulls_here.len() as i64);
            players_reported = now;
        }
        dispatch(&mut core, &nodes, pool.as_ref(), &metrics);
        let next = core.next_timeout(now);
        tokio::select! {
            r = udp.socket.recv_from(&mut buf) => {
                let (n, from) = match r {
                    Ok(r) => r,
                    Err(e) => {
                        // ICMP errors from a vanished peer surface here; they are not fatal.
                        tracing::debug!("UDP receive error: {e}");
                        continue;
                    }
                };
                let Some(data) = buf.get(..n) else { continue };
                core.receive(Instant::now(), from, data, &mut sink);
            }
            ev = ingest.recv() => {
                let Some(ev) = ev else { break };
                match ev {
                    IngestEvent::StreamStarted { node, hello, control, media, scheduled, pulled, downstreams } => {
                        nodes.insert(node, NodeQueue { control, media, scheduled, downstreams });
                        match pulled {
                            Some(session) => core.pulled_stream_started(Instant::now(), node, hello, session),
                            None => core.stream_started(Instant::now(), node, hello),
                        }
                    }
                    IngestEvent::StreamEnded { node } => {
                        nodes.remove(&node);
                        pulls_here.retain(|d| d.source != node);
                        metrics.downstream_relays.set(pulls_here.len() as i64);
                        core.stream_ended(Instant::now(), node);
                    }
                    IngestEvent::Pull { session, reply } => {
                        let _ = reply.send(downstream(&core, &nodes, &mut pulls_here, &session, &metrics));
                    }
                    IngestEvent::PullEnded { session } => core.pull_ended(Instant::now(), &session),
                    IngestEvent::Keyframe { node } => core.keyframe_for(Instant::now(), node),
                }
            }
            Some(first) = ready.recv() => {
                // A frame arrives as a burst of packets: take a bounded turn from each ready
                // node (round robin: one that still has packets goes to the back of the
                // list), then drain each viewer once — one pass over str0m's output per
                // burst rather than per packet.
                let mut next = Some(first);
                for _ in 0..READY_BATCH {
                    let Some(node) = next.take() else { break };
                    if let Some(queue) = nodes.get_mut(&node) {
                        // Cleared before taking, so a packet queued meanwhile lists it again.
                        queue.scheduled.store(false, Ordering::Release);
                        for _ in 0..INGEST_BATCH {
                            let Ok(m) = queue.media.try_recv() else { break };
                            handle_media(node, m, &mut core, &mut sink);
                        }
                        if !queue.media.is_empty() {
                            relist.schedule(node, &queue.scheduled);
                        }
                    }
                    next = ready.try_recv().ok();
                }
                if let Some(node) = next {
                    // Its turn comes after this flush.
                    if let Some(queue) = nodes.get(&node) {
                        queue.scheduled.store(false, Ordering::Release);
                        relist.schedule(node, &queue.scheduled);
                    }
                }
                core.flush(Instant::now(), &mut sink);
            }
            cmd = commands.recv() => {
                let Some(cmd) = cmd else { break };
                match cmd {
                    ViewerCommand::Offer { sdp, wants_player, admitted, reply, closed } => {
                        let answer = core.offer(Instant::now(), &sdp, wants_player, admitted);
                        if let Ok((id, _, _)) = &answer {
                            open_sessions.insert(*id, closed);
                        }
                        let _ = reply.send(answer);
                    }
                    ViewerCommand::Leave { id } => core.leave(id),
                }
            }
            _ = tokio::time::sleep_until(next.into()) => {}
            _ = crate::stopped(&mut shutdown) => break,
        }
        dispatch(&mut core, &nodes, pool.as_ref(), &metrics);
        for session in core.poll_pulls(Instant::now()) {
            if pulls.send(session.clone()).is_err() {
                core.pull_ended(Instant::now(), &session);
            }
        }
        for (id, reason) in core.poll_closed_viewers() {
            if let (Some(tx), Some(reason)) = (open_sessions.remove(&id), reason) {
                let _ = tx.send(reason);
            }
        }
    }
    core.close_all(Instant::now(), &mut sink);
    dispatch(&mut core, &nodes, pool.as_ref(), &metrics);
    Ok(())
}

/// Most relays pulling one stream from this relay.
pub const MAX_DOWNSTREAMS: usize = 8;

/// A relay pulling a stream from this one, as the egress task keeps it: which session,
/// from which stream; dropping `ended` ends the pull (its player left or moved).
struct PullHere {
    /// The session it pulls.
    session: String,
    /// The stream's ingest connection here.
    source: u64,
    ended: oneshot::Sender<()>,
}

/// Gives a relay pulling `session` its stream: the stream its player plays here. Its
/// packets go to it from that stream's ingest task (see [`Downstreams`]); this task only
/// decides who may pull, and ends pulls whose session is no longer here.
fn downstream(
    core: &Core,
    nodes: &HashMap<u64, NodeQueue>,
    pulls: &mut Vec<PullHere>,
    session: &str,
    metrics: &RelayMetrics,
) -> Result<crate::ingest::Pulled, String> {
    let (source, hello) =
        core.session_source(session).ok_or_else(|| "this relay does not carry that session".to_string())?;
    let queue = nodes.get(&source).ok_or_else(|| "this relay does not carry that session".to_string())?;
    pulls.retain(|d| !d.ended.is_closed());
    if pulls.iter().filter(|d| d.source == source).count() >= MAX_DOWNSTREAMS {
        return Err(format!("this stream already goes to {MAX_DOWNSTREAMS} relays"));
    }
    let (tx, rx) = oneshot::channel();
    pulls.push(PullHere { session: session.to_string(), source, ended: tx });
    metrics.downstream_relays.set(pulls.len() as i64);
    Ok(crate::ingest::Pulled { source, hello, downstreams: queue.downstreams.clone(), ended: rx })
}

fn handle_media(node: u64, media: NodeMedia, core: &mut Core, sink: &mut UdpSink<'_>) {
    match media {
        NodeMedia::FrameInfo(info) => core.frame_info(Instant::now(), node, info, sink),
        NodeMedia::Rtp { packet, arrival, capture_ntp, captured, audio: true } => {
            core.audio_rtp(node, &packet, arrival, capture_ntp, captured)
        }
        NodeMedia::Rtp { packet, arrival, capture_ntp, captured, audio: false } => {
            core.rtp(node, &packet, arrival, capture_ntp, captured)
        }
        NodeMedia::SessionOver { session, reason } => core.session_over(node, &session, &reason),
        NodeMedia::Capacity(reply) => core.capacity(Instant::now(), node, reply, sink),
    }
}
