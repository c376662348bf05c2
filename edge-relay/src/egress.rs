//! WebRTC egress: every viewer on one UDP socket, driven by one task.
//!
//! `str0m` is sans-IO: each viewer is an [`Rtc`] state machine that this task feeds with
//! datagrams, timeouts and RTP packets, and drains for datagrams to send. One task per
//! socket (not per peer) keeps all viewers on the single port an edge-box owner opens.
//!
//! RTP from the node is forwarded as RTP (str0m's RTP mode): payload untouched, sequence
//! numbers and timestamps shifted per viewer so that a viewer's stream stays continuous
//! when the node reconnects, and the playout-delay extension set to min = max = 0 so the
//! browser renders each frame as soon as it is decoded.

use crate::ingest::{IngestEvent, ToNode};
use crate::metrics::RelayMetrics;
use crate::pool::{Admission, Pool};
use crate::rate::RateController;
use anyhow::Context;
use pylon_proto::framing::{ControlMessage, FrameInfo, StreamHello};
use pylon_proto::input::{INPUT_HEADER_LEN, MAX_INPUT_MESSAGE, peek_header};
use pylon_proto::rtp::RtpPacket;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use str0m::bwe::{Bitrate, BweKind};
use str0m::change::SdpOffer;
use str0m::channel::ChannelId;
use str0m::format::Codec;
use str0m::media::{Frequency, MediaKind, MediaTime, Mid, Pt};
use str0m::net::{Protocol, Receive};
use str0m::rtp::{AbsCaptureTime, ExtensionValues, SeqNo};
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc, RtcConfig};
use tokio::sync::{mpsc, oneshot, watch};

/// Most viewers one relay serves at once.
pub const MAX_VIEWERS: usize = 512;
/// Keyframe requests to the node are at most this frequent; more are coalesced.
pub const KEYFRAME_REQUEST_INTERVAL: Duration = Duration::from_millis(300);
/// Payload type of H.264 (constrained baseline, packetization mode 1) in our SDP, and its RTX.
const H264_PT: u8 = 108;
const H264_RTX_PT: u8 = 109;
/// Ingest events handled before the viewers are drained.
const INGEST_BATCH: usize = 64;
/// How long a sent packet stays available to answer a viewer's NACK (RTX): many round
/// trips of any last hop; a packet older than that belongs to a frame too old to show.
pub const RTX_CACHE_AGE: Duration = Duration::from_secs(1);
/// Upper bound on the packets that cache holds per viewer (1 s of a ~25 Mbit/s stream).
/// The payloads are shared by every viewer of a stream (one `Arc` per node packet), so
/// a viewer's share is only str0m's packet header state (a few hundred bytes each).
pub const RTX_CACHE_PACKETS: usize = 2500;
/// str0m's default: queued resends are dropped while retransmissions exceed 15 % of a
/// viewer's bytes (a hopeless link is not flooded further).
const RTX_RATIO_CAP: Option<f32> = Some(0.15);
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

/// Sustained input messages per second a player may send, and the burst allowed.
pub const INPUT_RATE: f64 = 600.0;
/// See [`INPUT_RATE`].
pub const INPUT_BURST: f64 = 1200.0;

/// A token bucket on input messages, driven by an explicit `now`.
#[derive(Debug, Clone)]
pub struct InputRateLimiter {
    tokens: f64,
    last: Instant,
    rate: f64,
    burst: f64,
}

impl InputRateLimiter {
    /// A full bucket refilling at `rate` per second, holding at most `burst`.
    pub fn new(now: Instant, rate: f64, burst: f64) -> Self {
        Self { tokens: burst, last: now, rate, burst }
    }

    /// Takes one token if there is one.
    pub fn allow(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now.max(self.last);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Label of the reliable, ordered input channel (keys, buttons, gamepads, touch; and
/// frame information back to the player).
pub const INPUT_CHANNEL: &str = "input";
/// Label of the unordered, unreliable channel for supersedable input (mouse motion).
pub const MOTION_CHANNEL: &str = "input-motion";

/// What polling a viewer produced for the rest of the relay.
#[derive(Debug, Default)]
struct Drained {
    wants_keyframe: bool,
    to_node: Vec<ToNode>,
}

/// The player's bitrate bounds the relay asks for (the node clamps to its own).
const PLAYER_MIN_BPS: u64 = 300_000;
const PLAYER_MAX_BPS: u64 = 50_000_000;
/// Where the player's bandwidth estimate starts.
const PLAYER_START_BPS: u64 = 6_000_000;

/// A viewer's RTC session and forwarding state.
struct Viewer {
    id: u64,
    rtc: Rtc,
    player: bool,
    input_channel: Option<ChannelId>,
    motion_channel: Option<ChannelId>,
    limiter: InputRateLimiter,
    mid: Option<Mid>,
    pt: Option<Pt>,
    connected: bool,
    next_timeout: Instant,
    /// Added to the node's extended sequence number to get this viewer's.
    seq_offset: Option<i64>,
    /// Added (wrapping) to the node's RTP timestamp to get this viewer's.
    ts_offset: u32,
    last_seq: u64,
    last_ts: u32,
    /// Arrival to sent of the last frame's last packet, µs (shown in the player's overlay).
    relay_us: u32,
    /// In a pool, the player's session id and token.
    session: Option<(String, String)>,
    /// NACKs the viewer had sent at the last stats event.
    nacks_seen: u64,
    /// The player's bandwidth estimate → encoder bitrate (spectators have none).
    rate: Option<RateController>,
    /// The node stream (ingest connection) this viewer watches, once there is one.
    source: Option<u64>,
    /// In a pool, the node its session runs on: it watches that node's stream only.
    wants_node: Option<String>,
    /// Packets were written since the last drain (drained once per batch of ingest).
    dirty: bool,
    /// Arrival of the last frame's last packet written, for `relay_us` once it is sent.
    frame_arrival: Option<Instant>,
    /// Arrival of the oldest packet written since the last drain (the relay's own delay).
    first_arrival: Option<Instant>,
    /// Datagrams waiting to leave in one send (reused).
    tx_buf: Vec<u8>,
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

impl Viewer {
    /// Whether this viewer may watch a stream from `node` (pool id, empty outside one).
    fn matches(&self, node: &str) -> bool {
        self.wants_node.as_deref().is_none_or(|n| n == node)
    }
}

/// The relay's node streams, by ingest connection.
type Sources = std::collections::BTreeMap<u64, Source>;

/// The stream a new viewer should watch: its node's, or the newest.
fn pick_source(sources: &Sources, wants_node: Option<&str>) -> Option<u64> {
    sources.iter().rev().find(|(_, s)| wants_node.is_none_or(|n| n == s.hello.node)).map(|(id, _)| *id)
}

/// The node stream being relayed.
struct Source {
    hello: StreamHello,
    control: mpsc::Sender<ToNode>,
    last_seq: Option<u64>,
    last_keyframe_request: Option<Instant>,
    keyframe_pending: bool,
    /// This stream's counters (Prometheus, labelled by stream).
    counters: crate::metrics::StreamCounters,
}

impl Source {
    /// Unwraps a 16-bit sequence number into a 64-bit one near the last seen.
    fn extend(&mut self, seq: u16) -> u64 {
        let ext = pylon_proto::rtp::extend_sequence(self.last_seq, seq);
        if self.last_seq.is_none_or(|l| ext > l) {
            self.last_seq = Some(ext);
        }
        ext
    }

    fn request_keyframe(&mut self, now: Instant, metrics: &RelayMetrics) {
        if self.last_keyframe_request.is_some_and(|t| now.duration_since(t) < KEYFRAME_REQUEST_INTERVAL) {
            // Coalesced: sent when the interval has passed (see `flush_keyframe_request`).
            self.keyframe_pending = true;
            return;
        }
        self.keyframe_pending = false;
        self.last_keyframe_request = Some(now);
        if self.control.try_send(ToNode::Control(ControlMessage::KeyframeRequest)).is_ok() {
            metrics.keyframe_requests_upstream.inc();
            self.counters.keyframe_requests.inc();
        }
    }

    /// Passes on what a viewer produced: its keyframe request and its input.
    fn deliver(&mut self, drained: Drained, now: Instant, metrics: &RelayMetrics) {
        if drained.wants_keyframe {
            self.request_keyframe(now, metrics);
        }
        for msg in drained.to_node {
            if self.control.try_send(msg).is_err() {
                metrics.input_refused.get_or_create(&crate::metrics::DropReason { reason: "node_busy" }).inc();
            }
        }
    }

    /// Sends a control message to the node on its reliable stream.
    fn send_control(&mut self, msg: ControlMessage, metrics: &RelayMetrics) {
        if self.control.try_send(ToNode::Control(msg)).is_err() {
            metrics.input_refused.get_or_create(&crate::metrics::DropReason { reason: "node_busy" }).inc();
        }
    }

    fn flush_keyframe_request(&mut self, now: Instant, metrics: &RelayMetrics) {
        if self.keyframe_pending {
            self.request_keyframe(now, metrics);
        }
    }
}

fn rtc_config(player: bool) -> RtcConfig {
    // Stats once a second: the viewers' NACK counts for /metrics. The RTX cache is sized
    // by time once the video stream exists (see `RTX_CACHE_AGE`).
    let mut config = RtcConfig::new()
        .clear_codecs()
        .set_rtp_mode(true)
        .set_stats_interval(Some(Duration::from_secs(1)))
        .set_send_buffer_video(RTX_CACHE_PACKETS);
    config.codec_config().add_h264(H264_PT.into(), Some(H264_RTX_PT.into()), true, 0x42e01f);
    if !player {
        // Transport-wide sequence numbers only feed the bandwidth estimate, which only the
        // player drives; without them a spectator's session keeps no send history for
        // TWCC (about 90 KiB each).
        config = config.clear_extension_map();
    }
    config
        .set_extension(4, str0m::rtp::Extension::RtpMid)
        .set_extension(12, str0m::rtp::Extension::PlayoutDelay)
        .set_extension(13, str0m::rtp::Extension::AbsoluteCaptureTime)
        // Congestion control (TWCC) for the player only: its path sets the bitrate.
        .enable_bwe(player.then(|| Bitrate::bps(PLAYER_START_BPS)))
}

/// Runs the egress loop until shutdown.
pub async fn run(
    socket: tokio::net::UdpSocket,
    advertise: SocketAddr,
    mut ingest: mpsc::Receiver<IngestEvent>,
    mut commands: mpsc::Receiver<ViewerCommand>,
    metrics: RelayMetrics,
    pool: Option<Pool>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let udp = UdpOut::new(socket)?;
    let mut viewers: Vec<Viewer> = Vec::new();
    let mut sources = Sources::new();
    let mut next_id: u64 = 1;
    let mut buf = vec![0u8; 2048];
    loop {
        let now = Instant::now();
        // Only viewers whose timer is due: the others were drained right after their last
        // input, so this loop stays O(due viewers) per event, not O(all viewers).
        for v in viewers.iter_mut().filter(|v| v.next_timeout <= now) {
            let _ = v.rtc.handle_input(Input::Timeout(now));
            let drained = drain(v, &udp, &metrics);
            forward(drained, v.source, &mut sources, now, &metrics);
        }
        retain_alive(&mut viewers, &mut sources, pool.as_ref(), &metrics);
        for s in sources.values_mut() {
            s.flush_keyframe_request(now, &metrics);
        }
        let next = viewers.iter().map(|v| v.next_timeout).min().unwrap_or(now + Duration::from_millis(100));
        let next = next.min(now + Duration::from_millis(100)).max(now);
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
                let now = Instant::now();
                let Some(data) = buf.get(..n) else { continue };
                let Ok(receive) = Receive::new(Protocol::Udp, from, advertise, data) else {
                    metrics.udp_unknown.inc();
                    continue;
                };
                let input = Input::Receive(now, receive);
                match viewers.iter_mut().find(|v| v.rtc.accepts(&input)) {
                    Some(v) => {
                        if let Err(e) = v.rtc.handle_input(input) {
                            tracing::debug!(viewer = v.id, "viewer input error: {e}");
                            v.rtc.disconnect();
                        }
                        let drained = drain(v, &udp, &metrics);
                        forward(drained, v.source, &mut sources, now, &metrics);
                    }
                    None => {
                        metrics.udp_unknown.inc();
                    }
                }
            }
            ev = ingest.recv() => {
                let Some(ev) = ev else { break };
                // A frame arrives as a burst of packets: take what is queued (up to a bound),
                // then drain each viewer once — one pass over str0m's output per burst
                // rather than per packet.
                handle_ingest(ev, &mut viewers, &mut sources, &udp, &metrics);
                for _ in 0..INGEST_BATCH {
                    let Ok(ev) = ingest.try_recv() else { break };
                    handle_ingest(ev, &mut viewers, &mut sources, &udp, &metrics);
                }
                let now = Instant::now();
                for v in viewers.iter_mut().filter(|v| v.dirty) {
                    v.dirty = false;
                    let drained = drain(v, &udp, &metrics);
                    if let Some(first) = v.first_arrival.take() {
                        // Ingest arrival → handed to the kernel, for the batch's oldest packet.
                        metrics.forward_seconds.observe(first.elapsed().as_secs_f64());
                    }
                    if let Some(arrival) = v.frame_arrival.take() {
                        // Relay time of the frame's last packet: arrival to handed to the socket.
                        v.relay_us = u32::try_from(arrival.elapsed().as_micros()).unwrap_or(u32::MAX);
                    }
                    forward(drained, v.source, &mut sources, now, &metrics);
                }
            }
            cmd = commands.recv() => {
                let Some(cmd) = cmd else { break };
                match cmd {
                    ViewerCommand::Offer { sdp, wants_player, admitted, reply } => {
                        // One player per stream: in a pool per node, alone per stream watched.
                        let wants_node = admitted.as_ref().map(|(a, _)| a.node.clone());
                        let source = pick_source(&sources, wants_node.as_deref());
                        let seat_taken = viewers.iter().any(|v| {
                            v.player && v.rtc.is_alive() && match &wants_node {
                                Some(n) => v.wants_node.as_ref() == Some(n),
                                None => v.source == source,
                            }
                        });
                        let player = wants_player && !seat_taken;
                        let result = if viewers.len() >= MAX_VIEWERS {
                            Err(format!("this relay is full ({MAX_VIEWERS} viewers)"))
                        } else if admitted.as_ref().is_some_and(|(a, _)| a.player) && seat_taken {
                            Err("another viewer is already playing this session".into())
                        } else {
                            accept_offer(&sdp, advertise, next_id, player)
                        };
                        match result {
                            Ok(mut viewer) => {
                                let answer = viewer.1;
                                viewer.0.source = source;
                                viewer.0.wants_node = wants_node;
                                if let Some((a, token)) = admitted.filter(|(a, _)| a.player) {
                                    // The node verifies the token itself before it takes input.
                                    if let Some(s) = source.and_then(|id| sources.get_mut(&id)) {
                                        s.send_control(ControlMessage::SessionStart(token.clone()), &metrics);
                                    }
                                    viewer.0.session = Some((a.session, token));
                                }
                                viewers.push(viewer.0);
                                update_stream_gauges(&viewers, &sources, &metrics);
                                metrics.viewer_sessions.inc();
                                let _ = reply.send(Ok((next_id, answer, player)));
                                next_id += 1;
                            }
                            Err(e) => {
                                metrics.bad_offers.inc();
                                let _ = reply.send(Err(e));
                            }
                        }
                    }
                    ViewerCommand::Leave { id } => {
                        if let Some(v) = viewers.iter_mut().find(|v| v.id == id) {
                            tracing::info!(viewer = id, "viewer left");
                            v.rtc.disconnect();
                        }
                    }
                }
            }
            _ = tokio::time::sleep_until(next.into()) => {}
            _ = crate::stopped(&mut shutdown) => break,
        }
    }
    for v in viewers.iter_mut() {
        v.rtc.disconnect();
        let _ = drain(v, &udp, &metrics);
    }
    retain_alive(&mut viewers, &mut sources, pool.as_ref(), &metrics);
    Ok(())
}

/// A stream's label: the node's pool id, or its connection number outside a pool.
fn stream_label(connection: u64, hello: &StreamHello) -> String {
    if hello.node.is_empty() { format!("connection-{connection}") } else { hello.node.clone() }
}

/// Viewers per stream, labelled by the node's pool id (or the connection number).
fn update_stream_gauges(viewers: &[Viewer], sources: &Sources, metrics: &RelayMetrics) {
    metrics.stream_viewers.clear();
    for (id, s) in sources {
        let n = viewers.iter().filter(|v| v.source == Some(*id) && v.rtc.is_alive()).count();
        let label = crate::metrics::StreamLabel { stream: stream_label(*id, &s.hello) };
        metrics.stream_viewers.get_or_create(&label).set(n as i64);
    }
}

fn retain_alive(viewers: &mut Vec<Viewer>, sources: &mut Sources, pool: Option<&Pool>, metrics: &RelayMetrics) {
    let before = viewers.len();
    viewers.retain(|v| {
        if v.rtc.is_alive() {
            return true;
        }
        if v.connected {
            metrics.viewers.dec();
        }
        tracing::info!(viewer = v.id, "viewer session closed");
        if let Some((session, _)) = &v.session {
            // The player left: the node stops taking input, the token is spent, the
            // indexer stops metering.
            if let Some(s) = v.source.and_then(|id| sources.get_mut(&id)) {
                s.send_control(ControlMessage::SessionEnd(session.clone()), metrics);
            }
            if let Some(pool) = pool {
                pool.session_ended(session, "player left");
            }
        }
        false
    });
    if viewers.len() != before {
        update_stream_gauges(viewers, sources, metrics);
    }
}

fn accept_offer(sdp: &str, advertise: SocketAddr, id: u64, player: bool) -> Result<(Viewer, String), String> {
    let offer = SdpOffer::from_sdp_string(sdp).map_err(|e| format!("malformed SDP offer: {e}"))?;
    let now = Instant::now();
    let mut rtc = rtc_config(player).build(now);
    if player {
        rtc.bwe().set_desired_bitrate(Bitrate::bps(PLAYER_MAX_BPS));
    }
    let candidate = Candidate::host(advertise, "udp").map_err(|e| format!("bad relay address: {e}"))?;
    rtc.add_local_candidate(candidate);
    let answer = rtc.sdp_api().accept_offer(offer).map_err(|e| format!("cannot answer the offer: {e}"))?;
    let viewer = Viewer {
        id,
        rtc,
        player,
        input_channel: None,
        motion_channel: None,
        limiter: InputRateLimiter::new(now, INPUT_RATE, INPUT_BURST),
        mid: None,
        pt: None,
        connected: false,
        next_timeout: now,
        seq_offset: None,
        ts_offset: 0,
        last_seq: 0,
        last_ts: 0,
        relay_us: 0,
        session: None,
        nacks_seen: 0,
        rate: player.then(|| RateController::new(PLAYER_MIN_BPS, PLAYER_MAX_BPS)),
        source: None,
        wants_node: None,
        dirty: false,
        frame_arrival: None,
        first_arrival: None,
        tx_buf: Vec::with_capacity(16 * 1500),
    };
    Ok((viewer, with_rrtr(&answer.to_sdp_string())))
}

/// Adds `a=rtcp-fb:<H.264> rrtr` to an answer: the browser then sends RTCP XR receiver
/// reference times, str0m answers with DLRR, and the browser learns its RTT to the relay.
/// Without it a receive-only browser assumes 100 ms and waits that long before asking
/// again for a retransmission that was lost too — a visible freeze.
fn with_rrtr(sdp: &str) -> String {
    let nack = format!("a=rtcp-fb:{H264_PT} nack\r\n");
    sdp.replacen(&nack, &format!("{nack}a=rtcp-fb:{H264_PT} rrtr\r\n"), 1)
}

/// Polls a viewer until it only waits for time, sending its datagrams. Returns what the
/// node must hear: a keyframe request (the viewer just connected, or sent PLI/FIR) and
/// the player's input.
#[must_use]
fn drain(v: &mut Viewer, udp: &UdpOut, metrics: &RelayMetrics) -> Drained {
    let mut out = Drained::default();
    // A frame's packets to one viewer leave in as few segmentation-offload sends as the
    // kernel allows, rather than one system call each.
    let mut batch = GsoBatch::default();
    loop {
        let output = match v.rtc.poll_output() {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(viewer = v.id, "viewer session failed: {e}");
                v.rtc.disconnect();
                batch.flush(udp, &mut v.tx_buf, metrics);
                return out;
            }
        };
        match output {
            Output::Timeout(t) => {
                v.next_timeout = t;
                batch.flush(udp, &mut v.tx_buf, metrics);
                return out;
            }
            Output::Transmit(t) => batch.push(udp, &mut v.tx_buf, t.destination, &t.contents, metrics),
            Output::Event(e) => match e {
                Event::Connected => {
                    v.connected = true;
                    metrics.viewers.inc();
                    tracing::info!(viewer = v.id, "viewer connected");
                    out.wants_keyframe = true;
                }
                Event::IceConnectionStateChange(IceConnectionState::Disconnected) => {
                    tracing::info!(viewer = v.id, "viewer unreachable (ICE disconnected)");
                    v.rtc.disconnect();
                }
                Event::MediaAdded(m) if m.kind == MediaKind::Video => {
                    v.mid = Some(m.mid);
                    if let Some(stream) = v.rtc.direct_api().stream_tx_by_mid(m.mid, None) {
                        stream.set_rtx_cache(RTX_CACHE_PACKETS, RTX_CACHE_AGE, RTX_RATIO_CAP);
                    }
                    v.pt = v
                        .rtc
                        .codec_config()
                        .find(|p| p.spec().codec == Codec::H264 && p.spec().format.packetization_mode == Some(1))
                        .map(|p| p.pt());
                }
                Event::ChannelOpen(id, label) => match label.as_str() {
                    INPUT_CHANNEL => v.input_channel = Some(id),
                    MOTION_CHANNEL => v.motion_channel = Some(id),
                    _ => tracing::debug!(viewer = v.id, "ignoring data channel {label:?}"),
                },
                Event::ChannelData(data) => {
                    let reliable = Some(data.id) != v.motion_channel;
                    if let Some(msg) = check_input(v, &data.data, Instant::now(), metrics) {
                        metrics.input_forwarded.inc();
                        out.to_node.push(if reliable {
                            ToNode::Control(ControlMessage::Input(msg))
                        } else {
                            ToNode::InputDatagram(msg)
                        });
                    }
                }
                Event::EgressBitrateEstimate(BweKind::Twcc { estimate, .. }) => {
                    if let Some(rate) = v.rate.as_mut() {
                        metrics.player_estimate_bps.set(estimate.as_u64() as i64);
                        if let Some(bps) = rate.on_estimate(Instant::now(), estimate.as_u64()) {
                            metrics.player_target_bps.set(bps as i64);
                            out.to_node
                                .push(ToNode::Control(ControlMessage::Bitrate(u32::try_from(bps).unwrap_or(u32::MAX))));
                        }
                    }
                }
                Event::MediaEgressStats(stats) => {
                    // Answered by str0m from this viewer's send buffer (RTX), never upstream.
                    metrics.viewer_nacks.inc_by(stats.nacks.saturating_sub(v.nacks_seen));
                    v.nacks_seen = v.nacks_seen.max(stats.nacks);
                }
                Event::KeyframeRequest(_) => {
                    metrics.viewer_keyframe_requests.inc();
                    out.wants_keyframe = true;
                }
                _ => {}
            },
        }
    }
}

/// The relay's checks on player input: role, size, header, rate. The message itself is
/// forwarded unchanged; the node validates its contents.
fn check_input(v: &mut Viewer, data: &[u8], now: Instant, metrics: &RelayMetrics) -> Option<Vec<u8>> {
    let refuse = |reason: &'static str| {
        metrics.input_refused.get_or_create(&crate::metrics::DropReason { reason }).inc();
        None
    };
    if !v.player {
        return refuse("spectator");
    }
    if data.len() > MAX_INPUT_MESSAGE || data.len() < INPUT_HEADER_LEN {
        return refuse("size");
    }
    if peek_header(data).is_err() {
        return refuse("malformed");
    }
    if !v.limiter.allow(now) {
        return refuse("rate_limited");
    }
    Some(data.to_vec())
}

/// Hands what a viewer produced to the node it watches.
fn forward(drained: Drained, source: Option<u64>, sources: &mut Sources, now: Instant, metrics: &RelayMetrics) {
    let Some(s) = source.and_then(|id| sources.get_mut(&id)) else {
        if !drained.to_node.is_empty() {
            metrics.input_refused.get_or_create(&crate::metrics::DropReason { reason: "no_node" }).inc();
        }
        return;
    };
    s.deliver(drained, now, metrics);
}

/// Tells the stream's player which input a frame reflects, in the player's own RTP timestamps.
fn send_frame_info(viewers: &mut [Viewer], source: u64, info: FrameInfo) {
    for v in
        viewers.iter_mut().filter(|v| v.player && v.connected && v.seq_offset.is_some() && v.source == Some(source))
    {
        let Some(id) = v.input_channel else { continue };
        let ts = info.rtp_timestamp.wrapping_add(v.ts_offset);
        let text = format!(
            r#"{{"type":"frame","ts":{ts},"seq":{},"render_ms":{:.2},"encode_ms":{:.2},"node_ms":{:.2},"relay_ms":{:.3}}}"#,
            info.input_seq,
            f64::from(info.render_us) / 1000.0,
            f64::from(info.encode_us) / 1000.0,
            f64::from(info.node_us) / 1000.0,
            f64::from(v.relay_us) / 1000.0
        );
        if let Some(mut channel) = v.rtc.channel(id) {
            let _ = channel.write(false, text.as_bytes());
        }
    }
}

fn handle_ingest(
    ev: IngestEvent,
    viewers: &mut [Viewer],
    sources: &mut Sources,
    socket: &UdpOut,
    metrics: &RelayMetrics,
) {
    match ev {
        IngestEvent::StreamStarted { node, hello, control } => {
            let mut s = Source {
                counters: metrics.stream_counters(&stream_label(node, &hello)),
                hello,
                control,
                last_seq: None,
                last_keyframe_request: None,
                keyframe_pending: false,
            };
            s.request_keyframe(Instant::now(), metrics);
            // Viewers move to the new stream: those of its node in a pool (it reconnected),
            // every viewer outside one (the newest node is the stream). They rebase their
            // sequence numbers and timestamps on it.
            let pooled = !s.hello.node.is_empty();
            for v in viewers.iter_mut().filter(|v| v.rtc.is_alive()) {
                let moves = if pooled { v.wants_node.as_deref() == Some(s.hello.node.as_str()) } else { v.matches("") };
                if !moves {
                    continue;
                }
                if let Some(old) = v.source.filter(|old| *old != node) {
                    tracing::info!(viewer = v.id, old, new = node, "viewer moves to the node's new stream");
                }
                v.source = Some(node);
                v.seq_offset = None;
                // A player already here starts its session on the new stream.
                if let Some((_, token)) = &v.session {
                    s.send_control(ControlMessage::SessionStart(token.clone()), metrics);
                }
            }
            sources.insert(node, s);
            update_stream_gauges(viewers, sources, metrics);
        }
        IngestEvent::FrameInfo { node, info } => {
            send_frame_info(viewers, node, info);
            for v in viewers.iter_mut().filter(|v| v.player && v.source == Some(node)) {
                let _ = drain(v, socket, metrics);
            }
        }
        IngestEvent::StreamEnded { node } => {
            sources.remove(&node);
            for v in viewers.iter_mut().filter(|v| v.source == Some(node)) {
                v.source = None;
            }
            update_stream_gauges(viewers, sources, metrics);
        }
        IngestEvent::Rtp { node, packet, arrival, capture_ntp } => {
            let Some(s) = sources.get_mut(&node) else {
                metrics.dropped("no_viewer_stream");
                return;
            };
            let Ok(rtp) = RtpPacket::parse(&packet) else {
                metrics.dropped("bad_rtp");
                return;
            };
            s.counters.packets_in.inc();
            s.counters.bytes_in.inc_by(packet.len() as u64);
            let ext_seq = s.extend(rtp.header.sequence);
            let frame_ticks = 90_000 / u32::from(s.hello.fps.max(1));
            // One copy of the payload for every viewer (and every viewer's RTX cache).
            let payload: std::sync::Arc<[u8]> = rtp.payload.into();
            // Playout delay min = max = 0: render each frame as soon as it is decoded.
            let exts = ExtensionValues {
                play_delay_min: Some(MediaTime::new(0, Frequency::HUNDREDTHS)),
                play_delay_max: Some(MediaTime::new(0, Frequency::HUNDREDTHS)),
                // The node's capture time, so the browser knows each frame's age.
                abs_capture_time: capture_ntp
                    .and_then(pylon_proto::framing::from_ntp)
                    .map(|capture_time| AbsCaptureTime { capture_time, clock_offset: None }),
                ..Default::default()
            };
            for v in viewers.iter_mut().filter(|v| v.connected && v.source == Some(node)) {
                let (Some(mid), Some(pt)) = (v.mid, v.pt) else { continue };
                let offset = *v.seq_offset.get_or_insert_with(|| {
                    // Continue this viewer's numbering where it left off.
                    v.ts_offset = v.last_ts.wrapping_add(frame_ticks).wrapping_sub(rtp.header.timestamp);
                    (v.last_seq as i64 + 1) - ext_seq as i64
                });
                let seq = (ext_seq as i64 + offset).max(1) as u64;
                let ts = rtp.header.timestamp.wrapping_add(v.ts_offset);
                let mut api = v.rtc.direct_api();
                let Some(stream) = api.stream_tx_by_mid(mid, None) else { continue };
                let write = str0m::rtp::RtpWrite::new(pt, SeqNo::from(seq), ts, arrival, payload.clone())
                    .marker(rtp.header.marker)
                    .ext_vals(exts.clone())
                    .nackable(true);
                stream.write_rtp(write);
                if seq > v.last_seq {
                    v.last_seq = seq;
                    v.last_ts = ts;
                }
                metrics.rtp_out_packets.inc();
                s.counters.packets_out.inc();
                v.dirty = true;
                v.first_arrival.get_or_insert(arrival);
                if rtp.header.marker {
                    v.frame_arrival = Some(arrival);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_ask_the_browser_for_rtt_reports() {
        let sdp = "m=video 9 UDP/TLS/RTP/SAVPF 108 109\r\na=rtcp-fb:108 nack\r\na=rtcp-fb:108 nack pli\r\n";
        let out = with_rrtr(sdp);
        assert_eq!(out.matches("a=rtcp-fb:108 rrtr\r\n").count(), 1, "{out}");
        assert!(out.contains("a=rtcp-fb:108 nack pli\r\n"));
    }

    #[test]
    fn rate_limiter_allows_the_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut l = InputRateLimiter::new(t0, 100.0, 10.0);
        assert_eq!((0..20).filter(|_| l.allow(t0)).count(), 10, "the burst");
        assert!(!l.allow(t0));
        // 100 ms later: ten more tokens.
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!((0..20).filter(|_| l.allow(t1)).count(), 10);
        // A clock that goes backwards grants nothing.
        assert!(!l.allow(t0));
        // A long pause refills only up to the burst.
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!((0..50).filter(|_| l.allow(t2)).count(), 10);
    }
}
