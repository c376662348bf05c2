//! The relay's forwarding core, without I/O.
//!
//! [`Core`] holds every viewer's WebRTC session (`str0m`, itself sans-IO) and forwarding
//! state, and every node stream's keyframe policy. It is fed events — a viewer's datagram,
//! a node's RTP packet, an offer, a timeout — each with an explicit `now`, and answers
//! with datagrams for a [`Sink`] and control messages for nodes ([`Core::poll_to_node`]).
//! The egress task ([`crate::egress`]) moves those over sockets and channels; the tests
//! drive the same core on a simulated clock through a seeded lossy link.
//!
//! What the core decides:
//! * **Rewriting per viewer** ([`Rewrite`]): RTP is forwarded as RTP (str0m's RTP mode),
//!   payload untouched, sequence numbers and timestamps shifted per viewer so that a
//!   viewer's stream stays continuous when it moves to a node's new stream; playout delay
//!   min = max = 0 so the browser renders each frame as soon as it is decoded.
//! * **Loss repair on the last hop**: each viewer's NACKs are answered by str0m from that
//!   viewer's RTX cache, which holds the last [`RTX_CACHE_AGE`] of packets; the payloads
//!   are one shared `Arc<[u8]>` per node packet, so the cache costs a viewer only str0m's
//!   per-packet header state. A viewer's NACK never goes upstream: packets the relay
//!   itself lost are asked for once, for every viewer, by the ingest side's
//!   [`pylon_proto::repair::UpstreamRepair`], which sees the gap before any viewer does.
//! * **Keyframes** ([`KeyframePolicy`]): PLI/FIR from any viewer of a stream, and every
//!   viewer joining, are coalesced into at most one request upstream per
//!   [`KEYFRAME_REQUEST_INTERVAL`].
//! * **Bitrate**: the player's TWCC estimate only, through [`RateController`].
//! * **Input**: the player's only; spectators', oversized, malformed and flooding
//!   messages are refused and counted.

use crate::metrics::{DropReason, RelayMetrics, StreamCounters, StreamLabel};
use crate::pool::Admission;
use crate::rate::RateController;
use pylon_proto::framing::{CapacityReply, FrameInfo, RelayMessage, StreamHello};
use pylon_proto::input::{INPUT_HEADER_LEN, MAX_INPUT_MESSAGE, peek_header};
pub use pylon_proto::link::ToNode;
use pylon_proto::rtp::RtpPacket;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use str0m::bwe::{Bitrate, BweKind};
use str0m::change::SdpOffer;
use str0m::channel::ChannelId;
use str0m::format::Codec;
use str0m::media::{Frequency, MediaKind, MediaTime, Mid, Pt};
use str0m::net::{Protocol, Receive};
use str0m::rtp::{AbsCaptureTime, ExtensionValues, SeqNo};
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc, RtcConfig};

/// Most viewers one relay serves at once.
pub const MAX_VIEWERS: usize = 512;
/// A viewer whose ICE and DTLS have not completed this long after its offer is dropped:
/// half-open sessions cannot fill the relay.
pub const ICE_DEADLINE: Duration = Duration::from_secs(15);
/// Viewers of one pool session at most (its player and spectators): one spectator link
/// cannot be shared with the whole internet.
pub const MAX_VIEWERS_PER_SESSION: usize = 9;
/// Keyframe requests to the node are at most this frequent; more are coalesced.
pub const KEYFRAME_REQUEST_INTERVAL: Duration = Duration::from_millis(300);
/// How long a sent packet stays available to answer a viewer's NACK (RTX): many round
/// trips of any last hop; a packet older than that belongs to a frame too old to show.
pub const RTX_CACHE_AGE: Duration = Duration::from_secs(1);
/// Upper bound on the packets that cache holds per viewer (1 s of a ~25 Mbit/s stream).
/// The payloads are shared by every viewer of a stream (one `Arc` per node packet), so
/// a viewer's share is only str0m's packet header state (a few hundred bytes each).
pub const RTX_CACHE_PACKETS: usize = 2500;
/// Queued resends are dropped while a viewer's retransmitted bytes over the last second
/// exceed half of its sent bytes: a hopeless link is not flooded further. str0m's default
/// (15 %) dropped resends inside ordinary loss bursts — the simulated 5 % and 10 % bursty
/// links lost packets for good under it (`tests/sim.rs`).
const RTX_RATIO_CAP: Option<f32> = Some(0.5);
/// Payload type of H.264 (constrained baseline, packetization mode 1) in our SDP, and its RTX.
const H264_PT: u8 = 108;
const H264_RTX_PT: u8 = 109;
/// The player's bitrate bounds the relay asks for (the node clamps to its own).
const PLAYER_MIN_BPS: u64 = 300_000;
const PLAYER_MAX_BPS: u64 = 50_000_000;
/// What str0m probes the player's path for: a little over what the video can use (the
/// node's default ceiling is 6 Mbit/s, and the encoder gets 85 % of the estimate). Probing
/// for the rate controller's 50 Mbit/s ceiling, once frames left in bursts, sent probe
/// clusters far past a 4 Mbit/s link: the bottleneck overflowed and the loss-based estimate
/// collapsed (encoder at 0.6 Mbit/s, frozen a quarter of the time).
const PLAYER_DESIRED_BPS: u64 = 8_000_000;
/// Where the player's bandwidth estimate starts.
const PLAYER_START_BPS: u64 = 6_000_000;
/// How long the core waits at most when nothing is due (keyframe requests, idle).
const IDLE_WAKE: Duration = Duration::from_millis(100);

/// Sustained input messages per second a player may send, and the burst allowed.
pub const INPUT_RATE: f64 = 600.0;
/// See [`INPUT_RATE`].
pub const INPUT_BURST: f64 = 1200.0;

/// Label of the reliable, ordered input channel (keys, buttons, gamepads, touch; and
/// frame information back to the player).
pub const INPUT_CHANNEL: &str = "input";
/// Label of the unordered, unreliable channel for supersedable input (mouse motion).
pub const MOTION_CHANNEL: &str = "input-motion";
/// Bytes of proof-of-capacity answers passed to one viewer, at most: a few answers to the
/// largest challenge a session takes (`pylon_proto::capacity::MAX_SESSION_N`, 4 MiB each),
/// so a node cannot fill a relay's memory through a checker that stopped reading.
pub const CAPACITY_BUDGET: usize = 16 << 20;
/// Bytes the player's data channels may hold unsent: the largest capacity answer
/// (`MAX_SESSION_N`² words) and room for the page's other messages.
pub const PLAYER_SCTP_BUFFER: usize = (pylon_proto::capacity::MAX_SESSION_N as usize).pow(2) * 4 + (256 << 10);

/// Where the core's datagrams go. The egress task batches each viewer's datagrams into
/// segmentation-offload sends; tests deliver them through a simulated link.
pub trait Sink {
    /// One datagram for `destination`.
    fn send(&mut self, destination: SocketAddr, data: &[u8]);
    /// The current viewer has nothing more to send for now.
    fn flush(&mut self);
}

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

/// Coalesces a stream's keyframe requests: the first goes upstream at once, later ones
/// within [`KEYFRAME_REQUEST_INTERVAL`] become one request when the interval has passed.
/// However many viewers ask, the node (and the player's picture) sees at most one
/// keyframe request per interval.
#[derive(Debug, Clone, Default)]
pub struct KeyframePolicy {
    last_sent: Option<Instant>,
    pending: bool,
}

impl KeyframePolicy {
    /// A viewer (or the relay) wants a keyframe; true when a request goes upstream now.
    pub fn request(&mut self, now: Instant) -> bool {
        if self.last_sent.is_some_and(|t| now.saturating_duration_since(t) < KEYFRAME_REQUEST_INTERVAL) {
            self.pending = true;
            return false;
        }
        self.pending = false;
        self.last_sent = Some(now);
        true
    }

    /// True when a coalesced request is due now (and is then sent).
    pub fn poll(&mut self, now: Instant) -> bool {
        self.pending && self.request(now)
    }

    /// When a coalesced request falls due, if one waits.
    pub fn next_due(&self) -> Option<Instant> {
        self.last_sent.filter(|_| self.pending).map(|t| t + KEYFRAME_REQUEST_INTERVAL)
    }
}

/// A viewer's sequence-number and timestamp rewriting: the node's extended sequence
/// numbers and RTP timestamps shifted so that the viewer's numbering stays continuous
/// across a move to another stream (the node reconnected).
#[derive(Debug, Clone, Default)]
pub struct Rewrite {
    /// Added to the node's extended sequence number to get this viewer's.
    seq_offset: Option<i64>,
    /// Added (wrapping) to the node's RTP timestamp to get this viewer's.
    ts_offset: u32,
    last_seq: u64,
    last_ts: u32,
}

impl Rewrite {
    /// The next packet starts a new mapping (a new stream), continuing this numbering.
    pub fn rebase(&mut self) {
        self.seq_offset = None;
    }

    /// Whether a mapping is established (a packet was forwarded since the last rebase).
    pub fn is_mapped(&self) -> bool {
        self.seq_offset.is_some()
    }

    /// This viewer's sequence number and timestamp for a node packet. `frame_ticks` is
    /// one frame in 90 kHz ticks: a new mapping starts one frame after the last one sent.
    pub fn map(&mut self, ext_seq: u64, timestamp: u32, frame_ticks: u32) -> (u64, u32) {
        let offset = *self.seq_offset.get_or_insert_with(|| {
            self.ts_offset = self.last_ts.wrapping_add(frame_ticks).wrapping_sub(timestamp);
            (self.last_seq as i64 + 1) - ext_seq as i64
        });
        let seq = (ext_seq as i64 + offset).max(1) as u64;
        let ts = timestamp.wrapping_add(self.ts_offset);
        if seq > self.last_seq {
            self.last_seq = seq;
            self.last_ts = ts;
        }
        (seq, ts)
    }

    /// A node timestamp in this viewer's timeline.
    pub fn timestamp(&self, node_ts: u32) -> u32 {
        node_ts.wrapping_add(self.ts_offset)
    }
}

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
    /// The audio m-line and Opus payload type, when the viewer's offer has audio.
    audio_mid: Option<Mid>,
    audio_pt: Option<Pt>,
    /// The RED payload type (RFC 2198) wrapping Opus, when the viewer takes it.
    audio_red: Option<Pt>,
    audio_rewrite: Rewrite,
    connected: bool,
    next_timeout: Instant,
    rewrite: Rewrite,
    /// Arrival to sent of the last frame's last packet, µs (shown in the player's overlay).
    relay_us: u32,
    /// In a pool, the player's session id and token.
    session: Option<(String, String)>,
    /// In a pool, the session it watches or plays (its token's).
    watching: Option<String>,
    /// When its offer was answered (ICE must complete by [`ICE_DEADLINE`]).
    created: Instant,
    /// NACKs and PLI/FIRs the viewer had sent at the last stats event.
    nacks_seen: u64,
    plis_seen: u64,
    /// The player's bandwidth estimate → encoder bitrate (spectators have none).
    rate: Option<RateController>,
    /// The node stream (ingest connection) this viewer watches, once there is one.
    source: Option<u64>,
    /// In a pool, the node its session runs on: it watches that node's stream only.
    wants_node: Option<String>,
    /// A spectator of a session whose player is on another relay: it watches the stream
    /// this relay pulls from that relay (a cascade), never the node's own link here.
    pull: Option<String>,
    /// Packets were written since the last drain (drained once per batch of ingest).
    dirty: bool,
    /// Bytes of capacity answers passed to it ([`CAPACITY_BUDGET`] at most).
    capacity_bytes: usize,
    /// Arrival of the last frame's last packet written, for `relay_us` once it is sent.
    frame_arrival: Option<Instant>,
    /// Arrival of the oldest packet written since the last drain (the relay's own delay).
    first_arrival: Option<Instant>,
    /// The last video frame start written: its RTP timestamp (this viewer's numbering) and
    /// the node's capture time, for the [`CLOCK_INTERVAL`] message.
    video_clock: Option<(u32, u64)>,
    /// When the viewer's page is next told how both streams' RTP times map to capture times.
    clock_due: Instant,
    /// How long the page asked its picture be held for lip sync ([`MAX_PICTURE_HOLD`] at
    /// most): sent as this viewer's playout delay (min = max), normally 0.
    picture_hold: MediaTime,
}

impl Viewer {
    /// Whether this viewer may watch a stream from `node` (pool id, empty outside one).
    fn matches(&self, node: &str) -> bool {
        self.wants_node.as_deref().is_none_or(|n| n == node)
    }
}

/// What polling a viewer produced for the rest of the relay.
#[derive(Debug, Default)]
struct Drained {
    wants_keyframe: bool,
    to_node: Vec<ToNode>,
    /// NACKs and PLI/FIRs reported since the last stats event.
    nacks: u64,
    plis: u64,
}

/// A node stream being relayed.
struct Source {
    hello: StreamHello,
    /// Pulled from another relay for this session's spectators (a cascade), not the
    /// node's own link.
    pulled: Option<String>,
    last_seq: Option<u64>,
    keyframes: KeyframePolicy,
    /// This stream's counters (Prometheus, labelled by stream).
    counters: StreamCounters,
    /// Arrival of the first packet of the frame now arriving.
    frame_started: Option<Instant>,
    /// The capture time of the frame now arriving (its first packet carries it).
    frame_captured: Option<Instant>,
    /// The audio stream's highest extended sequence number.
    audio_last_seq: Option<u64>,
    /// The last audio packet forwarded (extended sequence number, timestamp, payload): the
    /// redundant block of the next one (RFC 2198) for viewers that take RED.
    audio_prev: Option<(u64, u32, Arc<[u8]>)>,
    /// When the newest audio packet arrived.
    audio_arrived: Option<Instant>,
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
}

/// The relay's node streams, by ingest connection.
type Sources = BTreeMap<u64, Source>;

/// A stream's label: the node's pool id, or its connection number outside a pool.
pub fn stream_label(connection: u64, hello: &StreamHello) -> String {
    if hello.node.is_empty() { format!("connection-{connection}") } else { hello.node.clone() }
}

/// What a viewer's page hears when its node's link drops, and when it comes back.
const NODE_LOST: &str = r#"{"type":"node","state":"lost"}"#;
const NODE_BACK: &str = r#"{"type":"node","state":"back"}"#;
/// What a player's page hears when its node has no link here yet (the indexer matched the
/// session to this relay, and the node links to it once told): wait, rather than move.
const NODE_LINKING: &str = r#"{"type":"node","state":"linking"}"#;

/// Writes `text` on the viewer's input channel (when it has one), sent at its next turn
/// (due at once).
fn tell(v: &mut Viewer, now: Instant, text: &str) {
    let Some(id) = v.input_channel else { return };
    if let Some(mut channel) = v.rtc.channel(id) {
        let _ = channel.write(false, text.as_bytes());
        v.next_timeout = now;
    }
}

/// The forwarding core: every viewer and every node stream of one relay.
pub struct Core {
    advertise: SocketAddr,
    metrics: RelayMetrics,
    viewers: Vec<Viewer>,
    sources: Sources,
    next_id: u64,
    /// Messages for nodes, by ingest connection, until [`Core::poll_to_node`].
    to_node: Vec<(u64, ToNode)>,
    /// Pool sessions whose player left, until [`Core::poll_ended_sessions`].
    ended: Vec<String>,
    /// Viewers whose session closed, until [`Core::poll_closed_viewers`].
    closed: Vec<u64>,
    /// Why the node ended a viewer's session, for its page.
    closing: HashMap<u64, String>,
    /// Audio and video of a viewer in one stream (`msid`) for lip sync (`--av-sync`).
    av_sync: bool,
    /// Sessions whose stream is being pulled from another relay (`None`) or is to be
    /// pulled again after the instant given (the last pull ended).
    pulling: BTreeMap<String, Option<Instant>>,
    /// The relay drains: its players leave for other relays and their sessions go on.
    draining: bool,
}

/// How long after a pull ended (the relay carrying the session failed, or refused) the
/// stream is pulled again for the spectators still waiting.
pub const PULL_RETRY: Duration = Duration::from_secs(1);

impl Core {
    /// A core whose viewers reach it at `advertise` (its ICE host candidate).
    pub fn new(advertise: SocketAddr, metrics: RelayMetrics) -> Self {
        Self {
            advertise,
            metrics,
            viewers: Vec::new(),
            sources: Sources::new(),
            next_id: 1,
            to_node: Vec::new(),
            ended: Vec::new(),
            closed: Vec::new(),
            closing: HashMap::new(),
            av_sync: false,
            pulling: BTreeMap::new(),
            draining: false,
        }
    }

    /// The relay drains: a player leaving from now on is moving to another relay, so its
    /// session is not ended (neither at the node, which waits for it elsewhere, nor at the
    /// indexer, which the next relay reports to, or ends it if the player never arrives).
    pub fn set_draining(&mut self) {
        self.draining = true;
    }

    /// Sessions whose stream this relay should pull from the relay carrying it now: some
    /// spectator here watches it, its player is elsewhere, and no pull is under way.
    /// Each is returned once per pull; [`Core::pull_ended`] allows the next.
    pub fn poll_pulls(&mut self, now: Instant) -> Vec<String> {
        let wanted: std::collections::BTreeSet<String> = self
            .viewers
            .iter()
            .filter(|v| v.rtc.is_alive() && v.source.is_none())
            .filter_map(|v| v.pull.clone())
            .collect();
        let mut due = Vec::new();
        for session in &wanted {
            match self.pulling.get(session) {
                Some(None) => {}
                Some(Some(at)) if *at > now => {}
                _ => {
                    self.pulling.insert(session.clone(), None);
                    due.push(session.clone());
                }
            }
        }
        self.pulling.retain(|s, state| state.is_none() || wanted.contains(s));
        due
    }

    /// A pull of `session`'s stream ended (or never started): another may start after
    /// [`PULL_RETRY`] if spectators still wait for it.
    pub fn pull_ended(&mut self, now: Instant, session: &str) {
        self.pulling.insert(session.to_string(), Some(now + PULL_RETRY));
    }

    /// The stream of the node `session`'s player plays here (its ingest connection and
    /// description): what another relay pulling the session gets.
    pub fn session_source(&self, session: &str) -> Option<(u64, StreamHello)> {
        let id = self.player_of(session)?.source?;
        self.sources.get(&id).filter(|s| s.pulled.is_none()).map(|s| (id, s.hello.clone()))
    }

    /// The viewer playing `session` here, if its player is here.
    fn player_of(&self, session: &str) -> Option<&Viewer> {
        self.viewers.iter().find(|v| v.rtc.is_alive() && v.session.as_ref().is_some_and(|(s, _)| s == session))
    }

    /// A keyframe for stream `node`, asked by a relay pulling it (coalesced with this
    /// relay's own viewers' requests).
    pub fn keyframe_for(&mut self, now: Instant, node: u64) {
        if let Some(s) = self.sources.get_mut(&node)
            && s.keyframes.request(now)
        {
            send_keyframe_request(node, s, &mut self.to_node, &self.metrics);
        }
    }

    /// Whether viewers' answers put audio and video in one stream for lip sync.
    pub fn set_av_sync(&mut self, on: bool) {
        self.av_sync = on;
    }

    /// Messages for nodes since the last call: (ingest connection, message).
    pub fn poll_to_node(&mut self) -> std::vec::Drain<'_, (u64, ToNode)> {
        self.to_node.drain(..)
    }

    /// Pool sessions whose player is connected (ICE and DTLS up) now: what the indexer
    /// meters, rather than what the node claims.
    pub fn connected_players(&self) -> Vec<String> {
        self.viewers
            .iter()
            .filter(|v| v.connected && v.rtc.is_alive())
            .filter_map(|v| v.session.as_ref().map(|(s, _)| s.clone()))
            .collect()
    }

    /// Viewers whose session closed since the last call, with why when the node ended it.
    pub fn poll_closed_viewers(&mut self) -> Vec<(u64, Option<String>)> {
        let closing = &mut self.closing;
        std::mem::take(&mut self.closed).into_iter().map(|id| (id, closing.remove(&id))).collect()
    }

    /// Node `node` ended `session` (its title exited, crashed or never drew): its player
    /// and spectators are closed and told why.
    pub fn session_over(&mut self, node: u64, session: &str, reason: &str) {
        // A node ends its own sessions only.
        self.close_viewers(Some(node), session, reason);
    }

    /// The indexer ended `session` (its node stopped answering, or it was swept): its
    /// player and spectators here are closed and told why.
    pub fn close_session(&mut self, session: &str, reason: &str) {
        self.close_viewers(None, session, reason);
    }

    /// Closes the viewers of `session` (those of node `node` only, when given), telling
    /// their pages `reason`.
    fn close_viewers(&mut self, node: Option<u64>, session: &str, reason: &str) {
        for v in self.viewers.iter_mut().filter(|v| node.is_none_or(|n| v.source == Some(n))) {
            let plays = v.session.as_ref().is_some_and(|(s, _)| s == session);
            if plays || v.watching.as_deref() == Some(session) {
                tracing::info!(viewer = v.id, session, "closing the viewer: {reason}");
                self.closing.insert(v.id, reason.to_string());
                v.rtc.disconnect();
            }
        }
    }

    /// Pool sessions whose player left since the last call.
    pub fn poll_ended_sessions(&mut self) -> Vec<String> {
        std::mem::take(&mut self.ended)
    }

    /// When the core next needs [`Core::handle_timeout`].
    pub fn next_timeout(&self, now: Instant) -> Instant {
        let viewers = self.viewers.iter().map(|v| v.next_timeout);
        let keyframes = self.sources.values().filter_map(|s| s.keyframes.next_due());
        viewers.chain(keyframes).min().unwrap_or(now + IDLE_WAKE).min(now + IDLE_WAKE).max(now)
    }

    /// A browser's SDP offer. Returns the viewer id, the SDP answer and whether the viewer
    /// got the player's seat. `admitted` is the pool's admission and the token.
    pub fn offer(
        &mut self,
        now: Instant,
        sdp: &str,
        wants_player: bool,
        admitted: Option<(Admission, String)>,
    ) -> Result<(u64, String, bool), String> {
        // One player per stream: in a pool per node, alone per stream watched.
        let wants_node = admitted.as_ref().map(|(a, _)| a.node.clone());
        // A spectator whose player is not here watches the stream pulled for its session.
        let pull = admitted
            .as_ref()
            .filter(|(a, _)| !a.player)
            .map(|(a, _)| a.session.clone())
            .filter(|session| self.player_of(session).is_none());
        let source = match &pull {
            Some(session) => {
                self.sources.iter().find(|(_, s)| s.pulled.as_deref() == Some(session.as_str())).map(|(id, _)| *id)
            }
            None => pick_source(&self.sources, wants_node.as_deref()),
        };
        let seat_taken = self.viewers.iter().any(|v| {
            v.player
                && v.rtc.is_alive()
                && match &wants_node {
                    Some(n) => v.wants_node.as_ref() == Some(n),
                    None => v.source == source,
                }
        });
        let player = wants_player && !seat_taken;
        let watching = admitted.as_ref().map(|(a, _)| a.session.clone());
        let session_viewers =
            self.viewers.iter().filter(|v| v.rtc.is_alive() && watching.is_some() && v.watching == watching).count();
        let result = if self.viewers.len() >= MAX_VIEWERS {
            Err(format!("this relay is full ({MAX_VIEWERS} viewers)"))
        } else if session_viewers >= MAX_VIEWERS_PER_SESSION {
            Err(format!("this session already has {MAX_VIEWERS_PER_SESSION} viewers"))
        } else if admitted.as_ref().is_some_and(|(a, _)| a.player) && seat_taken {
            Err("another viewer is already playing this session".into())
        } else {
            accept_offer(now, sdp, self.advertise, self.next_id, player, self.av_sync)
        };
        let (mut viewer, answer) = match result {
            Ok(ok) => ok,
            Err(e) => {
                self.metrics.bad_offers.inc();
                return Err(e);
            }
        };
        viewer.source = source;
        viewer.wants_node = wants_node;
        viewer.pull = pull;
        viewer.watching = watching;
        if let Some((a, token)) = admitted.filter(|(a, _)| a.player) {
            // The node verifies the token itself before it takes any input.
            if let Some(id) = source {
                self.to_node.push((id, ToNode::Control(RelayMessage::SessionStart(token.clone()))));
            }
            viewer.session = Some((a.session, token));
        }
        let id = self.next_id;
        self.next_id += 1;
        self.viewers.push(viewer);
        self.update_stream_gauges();
        self.metrics.viewer_sessions.inc();
        Ok((id, answer, player))
    }

    /// The viewer's signalling connection closed: its session ends.
    pub fn leave(&mut self, id: u64) {
        if let Some(v) = self.viewers.iter_mut().find(|v| v.id == id) {
            tracing::info!(viewer = id, "viewer left");
            v.rtc.disconnect();
        }
    }

    /// A datagram from a viewer (or a stranger: counted and dropped).
    pub fn receive(&mut self, now: Instant, from: SocketAddr, data: &[u8], sink: &mut impl Sink) {
        let Ok(receive) = Receive::new(Protocol::Udp, from, self.advertise, data) else {
            self.metrics.udp_unknown.inc();
            return;
        };
        let input = Input::Receive(now, receive);
        let Some(v) = self.viewers.iter_mut().find(|v| v.rtc.accepts(&input)) else {
            self.metrics.udp_unknown.inc();
            return;
        };
        if let Err(e) = v.rtc.handle_input(input) {
            tracing::debug!(viewer = v.id, "viewer input error: {e}");
            v.rtc.disconnect();
        }
        let drained = drain(v, now, sink, &self.metrics);
        let source = v.source;
        self.deliver(drained, source, now);
    }

    /// Timers: viewers whose str0m timer is due, coalesced keyframe requests, closed
    /// sessions. Only due viewers are polled, so this is O(due viewers), not O(viewers).
    pub fn handle_timeout(&mut self, now: Instant, sink: &mut impl Sink) {
        for i in 0..self.viewers.len() {
            let v = &mut self.viewers[i];
            if !v.connected && now.saturating_duration_since(v.created) >= ICE_DEADLINE && v.rtc.is_alive() {
                tracing::info!(viewer = v.id, "ICE did not complete within {ICE_DEADLINE:?}: dropped");
                self.metrics.viewers_timed_out.inc();
                v.rtc.disconnect();
            }
            if v.next_timeout > now {
                continue;
            }
            let _ = v.rtc.handle_input(Input::Timeout(now));
            let drained = drain(v, now, sink, &self.metrics);
            let source = v.source;
            self.deliver(drained, source, now);
        }
        self.retain_alive();
        for (id, s) in &mut self.sources {
            if s.keyframes.poll(now) {
                send_keyframe_request(*id, s, &mut self.to_node, &self.metrics);
            }
        }
    }

    /// A node's stream started (a node connected, or reconnected).
    pub fn stream_started(&mut self, now: Instant, node: u64, hello: StreamHello) {
        self.start_stream(now, node, hello, None);
    }

    /// A stream pulled from another relay for `session`'s spectators started.
    pub fn pulled_stream_started(&mut self, now: Instant, node: u64, hello: StreamHello, session: String) {
        self.pulling.remove(&session);
        self.start_stream(now, node, hello, Some(session));
    }

    fn start_stream(&mut self, now: Instant, node: u64, hello: StreamHello, pulled: Option<String>) {
        let mut s = Source {
            pulled,
            counters: self.metrics.stream_counters(&stream_label(node, &hello)),
            hello,
            last_seq: None,
            keyframes: KeyframePolicy::default(),
            frame_started: None,
            frame_captured: None,
            audio_last_seq: None,
            audio_prev: None,
            audio_arrived: None,
        };
        if s.keyframes.request(now) {
            send_keyframe_request(node, &mut s, &mut self.to_node, &self.metrics);
        }
        // Viewers move to the new stream: those of its node in a pool (it reconnected),
        // every viewer outside one (the newest node is the stream). They rebase their
        // sequence numbers and timestamps on it.
        let pooled = !s.hello.node.is_empty();
        let mut moved = 0usize;
        for v in self.viewers.iter_mut().filter(|v| v.rtc.is_alive()) {
            let moves = if pooled {
                v.wants_node.as_deref() == Some(s.hello.node.as_str()) && v.pull == s.pulled
            } else {
                v.matches("")
            };
            if !moves {
                continue;
            }
            if let Some(old) = v.source.filter(|old| *old != node) {
                tracing::info!(viewer = v.id, old, new = node, "viewer moves to the node's new stream");
            }
            if v.source.is_none() && v.connected {
                // It was told the node went away: the picture comes back.
                tell(v, now, NODE_BACK);
            }
            v.source = Some(node);
            moved += 1;
            v.rewrite.rebase();
            v.audio_rewrite.rebase();
            // A player already here starts its session on the new stream.
            if let Some((_, token)) = &v.session {
                self.to_node.push((node, ToNode::Control(RelayMessage::SessionStart(token.clone()))));
            }
        }
        if let Some(session) = &s.pulled {
            tracing::info!(node, session, viewers = moved, "the pulled stream started; its spectators here watch it");
        }
        self.sources.insert(node, s);
        self.update_stream_gauges();
    }

    /// A node's stream ended: its viewers wait for the node to come back, and their pages
    /// are told (`{"type":"node","state":"lost"}`, then `"back"` when it reconnects; the
    /// indexer ends the session if it never does).
    pub fn stream_ended(&mut self, now: Instant, node: u64) {
        if let Some(gone) = self.sources.remove(&node) {
            let label = stream_label(node, &gone.hello);
            if !self.sources.iter().any(|(id, s)| stream_label(*id, &s.hello) == label) {
                self.metrics.forget_stream(&label);
            }
        }
        for v in self.viewers.iter_mut().filter(|v| v.source == Some(node)) {
            v.source = None;
            if v.connected {
                tell(v, now, NODE_LOST);
            }
        }
        self.update_stream_gauges();
    }

    /// The node says which input a frame first reflects: the stream's player hears it in
    /// its own RTP timestamps, at once.
    pub fn frame_info(&mut self, now: Instant, node: u64, info: FrameInfo, sink: &mut impl Sink) {
        for v in self
            .viewers
            .iter_mut()
            .filter(|v| v.player && v.connected && v.rewrite.is_mapped() && v.source == Some(node))
        {
            let Some(id) = v.input_channel else { continue };
            let ts = v.rewrite.timestamp(info.rtp_timestamp);
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
            let drained = drain(v, now, sink, &self.metrics);
            // Nothing from the player is dropped: its output goes to its node.
            if let Some(s) = self.sources.get_mut(&node) {
                deliver_to(node, s, drained, now, &mut self.to_node, &self.metrics);
            }
        }
    }

    /// A node's answer to a capacity challenge: to its player (the checker that sent the
    /// challenge; a node answers only in a checker's session), the commitment and refusals
    /// as text, the product's chunks as binary messages (`seq` u32, `offset` u32, bytes,
    /// big endian), at most [`CAPACITY_BUDGET`] bytes of them per viewer.
    pub fn capacity(&mut self, now: Instant, node: u64, reply: CapacityReply, sink: &mut impl Sink) {
        let metrics = &self.metrics;
        let Some(v) = self
            .viewers
            .iter_mut()
            .find(|v| v.player && v.connected && v.source == Some(node) && v.input_channel.is_some())
        else {
            metrics.capacity_dropped.get_or_create(&DropReason { reason: "no_player" }).inc();
            return;
        };
        let written = match &reply {
            CapacityReply::Commit { seq, digest, gpu_us, wall_us } => {
                let text = format!(
                    r#"{{"type":"capacity","seq":{seq},"digest":"{}","gpu_us":{gpu_us},"wall_us":{wall_us}}}"#,
                    hex::encode(digest)
                );
                (false, text.into_bytes())
            }
            CapacityReply::Refused { seq, reason } => {
                let text = serde_json::json!({ "type": "capacity", "seq": seq, "refused": reason }).to_string();
                (false, text.into_bytes())
            }
            CapacityReply::Chunk { seq, offset, data } => {
                if v.capacity_bytes + data.len() > CAPACITY_BUDGET {
                    metrics.capacity_dropped.get_or_create(&DropReason { reason: "over_budget" }).inc();
                    return;
                }
                v.capacity_bytes += data.len();
                metrics.capacity_bytes.inc_by(data.len() as u64);
                (true, pylon_proto::capacity::chunk_message(*seq, *offset, data))
            }
        };
        let sent = v.input_channel.and_then(|id| v.rtc.channel(id)).map(|mut c| c.write(written.0, &written.1));
        if !matches!(sent, Some(Ok(true))) {
            metrics.capacity_dropped.get_or_create(&DropReason { reason: "channel_full" }).inc();
        }
        let drained = drain(v, now, sink, metrics);
        if let Some(s) = self.sources.get_mut(&node) {
            deliver_to(node, s, drained, now, &mut self.to_node, metrics);
        }
    }

    /// One RTP packet from a node: written to every viewer of its stream (sent on the
    /// next [`Core::flush`], so a burst of packets costs one drain per viewer).
    ///
    /// `captured` is the frame's capture time on the relay's clock, given to str0m as the
    /// packets' wallclock (sender reports then map RTP time to the node's capture clock,
    /// as for audio).
    pub fn rtp(
        &mut self,
        node: u64,
        packet: &[u8],
        arrival: Instant,
        capture_ntp: Option<u64>,
        captured: Option<Instant>,
    ) {
        let Some(s) = self.sources.get_mut(&node) else {
            self.metrics.dropped("no_viewer_stream");
            return;
        };
        let Ok(rtp) = RtpPacket::parse(packet) else {
            self.metrics.dropped("bad_rtp");
            return;
        };
        s.counters.packets_in.inc();
        s.counters.bytes_in.inc_by(packet.len() as u64);
        let started = *s.frame_started.get_or_insert(arrival);
        if rtp.header.marker {
            // How far the uplink spread this frame: its first to its last packet's arrival.
            self.metrics.frame_arrival_spread_seconds.observe(arrival.saturating_duration_since(started).as_secs_f64());
            s.frame_started = None;
        }
        let ext_seq = s.extend(rtp.header.sequence);
        if captured.is_some() {
            s.frame_captured = captured;
        }
        let wallclock = s.frame_captured.filter(|c| *c <= arrival).unwrap_or(arrival);
        let frame_ticks = 90_000 / u32::from(s.hello.fps.max(1));
        // One copy of the payload for every viewer (and every viewer's RTX cache).
        let payload: Arc<[u8]> = rtp.payload.into();
        // Playout delay min = max = the viewer's picture hold (below), normally 0: render
        // each frame as soon as it is decoded.
        let exts = ExtensionValues {
            // The node's capture time, so the browser knows each frame's age.
            abs_capture_time: capture_ntp
                .and_then(pylon_proto::framing::from_ntp)
                .map(|capture_time| AbsCaptureTime { capture_time, clock_offset: None }),
            ..Default::default()
        };
        for v in self.viewers.iter_mut().filter(|v| v.connected && v.source == Some(node)) {
            let (Some(mid), Some(pt)) = (v.mid, v.pt) else { continue };
            let (seq, ts) = v.rewrite.map(ext_seq, rtp.header.timestamp, frame_ticks);
            if let Some(ntp) = capture_ntp {
                v.video_clock = Some((ts, ntp));
            }
            let mut api = v.rtc.direct_api();
            let Some(stream) = api.stream_tx_by_mid(mid, None) else { continue };
            let mut exts = exts.clone();
            exts.play_delay_min = Some(v.picture_hold);
            exts.play_delay_max = Some(v.picture_hold);
            let write = str0m::rtp::RtpWrite::new(pt, SeqNo::from(seq), ts, wallclock, payload.clone())
                .marker(rtp.header.marker)
                .ext_vals(exts)
                .nackable(true);
            stream.write_rtp(write);
            self.metrics.rtp_out_packets.inc();
            s.counters.packets_out.inc();
            v.dirty = true;
            v.first_arrival.get_or_insert(arrival);
            if rtp.header.marker {
                v.frame_arrival = Some(arrival);
            }
        }
    }

    /// One audio RTP packet (Opus) from a node: written to every viewer of its stream that
    /// took audio, unchanged but for its sequence number and timestamp (each viewer's own
    /// numbering, continuous across node reconnects), with the node's capture time as its
    /// wallclock. Once per [`CLOCK_INTERVAL`] the viewer's page is told this packet's and the
    /// last video frame's RTP timestamps with their capture times (`clock_message`).
    pub fn audio_rtp(
        &mut self,
        node: u64,
        packet: &[u8],
        arrival: Instant,
        capture_ntp: Option<u64>,
        captured: Option<Instant>,
    ) {
        let Some(s) = self.sources.get_mut(&node) else {
            self.metrics.dropped("no_viewer_stream");
            return;
        };
        let Ok(rtp) = RtpPacket::parse(packet) else {
            self.metrics.dropped("bad_rtp");
            return;
        };
        let ext_seq = pylon_proto::rtp::extend_sequence(s.audio_last_seq, rtp.header.sequence);
        if s.audio_last_seq.is_none_or(|l| ext_seq > l) {
            s.audio_last_seq = Some(ext_seq);
            if let Some(before) = s.audio_arrived.replace(arrival) {
                self.metrics.audio_arrival_gap_seconds.observe(arrival.saturating_duration_since(before).as_secs_f64());
            }
        }
        let wallclock = captured.filter(|c| *c <= arrival).unwrap_or(arrival);
        let payload: Arc<[u8]> = rtp.payload.into();
        // The previous frame rides along (RFC 2198) for viewers that take RED: one lost
        // packet on the last hop costs no sound. Built once, shared by those viewers.
        let previous = s
            .audio_prev
            .as_ref()
            .filter(|(prev_seq, _, _)| *prev_seq + 1 == ext_seq)
            .map(|(_, prev_ts, prev)| (rtp.header.timestamp.wrapping_sub(*prev_ts), prev.clone()));
        let mut red: Option<(u8, Arc<[u8]>)> = None;
        if s.audio_last_seq == Some(ext_seq) {
            s.audio_prev = Some((ext_seq, rtp.header.timestamp, payload.clone()));
        }
        for v in self.viewers.iter_mut().filter(|v| v.connected && v.source == Some(node)) {
            let (Some(mid), Some(opus_pt)) = (v.audio_mid, v.audio_pt) else { continue };
            // 480 ticks: one 10 ms Opus frame at 48 kHz.
            let (seq, ts) = v.audio_rewrite.map(ext_seq, rtp.header.timestamp, 480);
            if let (Some(audio), Some(video), Some(id)) = (capture_ntp, v.video_clock, v.input_channel)
                && arrival >= v.clock_due
                && let Some(mut channel) = v.rtc.channel(id)
            {
                v.clock_due = arrival + CLOCK_INTERVAL;
                let _ = channel.write(false, clock_message((ts, audio), video, self.av_sync).as_bytes());
            }
            let (pt, body) = match v.audio_red {
                Some(red_pt) => {
                    let body = match &red {
                        Some((for_pt, body)) if *for_pt == *opus_pt => body.clone(),
                        _ => {
                            let mut out = Vec::with_capacity(payload.len() * 2 + 5);
                            let prev = previous.as_ref().map(|(offset, p)| (*offset, &p[..]));
                            pylon_proto::rtp::red_payload(*opus_pt, prev, &payload, &mut out);
                            let body: Arc<[u8]> = out.into();
                            red = Some((*opus_pt, body.clone()));
                            body
                        }
                    };
                    (red_pt, body)
                }
                None => (opus_pt, payload.clone()),
            };
            let mut api = v.rtc.direct_api();
            let Some(stream) = api.stream_tx_by_mid(mid, None) else { continue };
            let write = str0m::rtp::RtpWrite::new(pt, SeqNo::from(seq), ts, wallclock, body)
                .marker(rtp.header.marker)
                .nackable(true);
            stream.write_rtp(write);
            self.metrics.audio_out_packets.inc();
            v.dirty = true;
            v.first_arrival.get_or_insert(arrival);
        }
    }

    /// Sends what the packets since the last flush gave each viewer.
    pub fn flush(&mut self, now: Instant, sink: &mut impl Sink) {
        for i in 0..self.viewers.len() {
            let v = &mut self.viewers[i];
            if !v.dirty {
                continue;
            }
            v.dirty = false;
            let drained = drain(v, now, sink, &self.metrics);
            if let Some(first) = v.first_arrival.take() {
                // Ingest arrival → handed to the socket, for the batch's oldest packet.
                self.metrics.forward_seconds.observe(now.saturating_duration_since(first).as_secs_f64());
            }
            if let Some(arrival) = v.frame_arrival.take() {
                // Relay time of the frame's last packet: arrival to handed to the socket.
                v.relay_us = u32::try_from(now.saturating_duration_since(arrival).as_micros()).unwrap_or(u32::MAX);
            }
            let source = v.source;
            self.deliver(drained, source, now);
        }
    }

    /// Closes every viewer's session (the relay is shutting down).
    pub fn close_all(&mut self, now: Instant, sink: &mut impl Sink) {
        for v in &mut self.viewers {
            v.rtc.disconnect();
            let _ = drain(v, now, sink, &self.metrics);
        }
        self.retain_alive();
    }

    /// Passes on what a viewer produced to the node stream it watches.
    fn deliver(&mut self, drained: Drained, source: Option<u64>, now: Instant) {
        if let Some(id) = source
            && let Some(s) = self.sources.get_mut(&id)
        {
            deliver_to(id, s, drained, now, &mut self.to_node, &self.metrics);
        } else if !drained.to_node.is_empty() {
            self.metrics.input_refused.get_or_create(&DropReason { reason: "no_node" }).inc();
        }
    }

    /// Drops closed sessions; a leaving player ends its pool session.
    fn retain_alive(&mut self) {
        let before = self.viewers.len();
        let (sources, metrics, to_node, ended) = (&self.sources, &self.metrics, &mut self.to_node, &mut self.ended);
        let draining = self.draining;
        let closed = &mut self.closed;
        self.viewers.retain(|v| {
            if v.rtc.is_alive() {
                return true;
            }
            closed.push(v.id);
            if v.connected {
                metrics.viewers.dec();
            }
            tracing::info!(viewer = v.id, "viewer session closed");
            if let Some((session, _)) = v.session.as_ref().filter(|_| !draining) {
                // The player left: the node stops taking input, the token is spent, the
                // indexer stops metering.
                if let Some(id) = v.source.filter(|id| sources.contains_key(id)) {
                    to_node.push((id, ToNode::Control(RelayMessage::SessionEnd(session.clone()))));
                }
                ended.push(session.clone());
            }
            false
        });
        if self.viewers.len() != before {
            self.update_stream_gauges();
        }
    }

    /// Viewers per stream, labelled by the node's pool id (or the connection number).
    fn update_stream_gauges(&self) {
        self.metrics.stream_viewers.clear();
        for (id, s) in &self.sources {
            let n = self.viewers.iter().filter(|v| v.source == Some(*id) && v.rtc.is_alive()).count();
            let label = StreamLabel { stream: stream_label(*id, &s.hello) };
            self.metrics.stream_viewers.get_or_create(&label).set(n as i64);
        }
    }
}

fn send_keyframe_request(id: u64, s: &mut Source, to_node: &mut Vec<(u64, ToNode)>, metrics: &RelayMetrics) {
    to_node.push((id, ToNode::Control(RelayMessage::KeyframeRequest)));
    metrics.keyframe_requests_upstream.inc();
    s.counters.keyframe_requests.inc();
}

/// A viewer's keyframe request, input and counts, to its stream.
fn deliver_to(
    id: u64,
    s: &mut Source,
    drained: Drained,
    now: Instant,
    to_node: &mut Vec<(u64, ToNode)>,
    metrics: &RelayMetrics,
) {
    s.counters.viewer_nacks.inc_by(drained.nacks);
    s.counters.viewer_plis.inc_by(drained.plis);
    if drained.wants_keyframe && s.keyframes.request(now) {
        send_keyframe_request(id, s, to_node, metrics);
    }
    to_node.extend(drained.to_node.into_iter().map(|m| (id, m)));
}

/// The stream a new viewer should watch: its node's, or the newest.
fn pick_source(sources: &Sources, wants_node: Option<&str>) -> Option<u64> {
    sources
        .iter()
        .rev()
        .find(|(_, s)| s.pulled.is_none() && wants_node.is_none_or(|n| n == s.hello.node))
        .map(|(id, _)| *id)
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
    // Sound: Opus 48 kHz stereo, 10 ms frames, in-band FEC (payload type 111), and RED
    // (RFC 2198) for browsers that offer it: each packet repeats the previous frame.
    config.codec_config().enable_opus(true, true);
    if player {
        // The player's channel may carry a checker's capacity answer (up to 4 MiB) at
        // once; str0m's default of 128 KiB would refuse most of it.
        config = config.set_sctp_max_buffered_amount(PLAYER_SCTP_BUFFER);
    } else {
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

/// How often a viewer's page is told how both streams' RTP timestamps map to the node's
/// capture clock (its A/V sync guard compares what each stream is playing by it).
pub const CLOCK_INTERVAL: Duration = Duration::from_secs(1);

/// `{"type":"clock", "audio": {"ts", "ms"}, "video": {"ts", "ms"}, "lipsync"}`: an RTP
/// timestamp of each stream (the viewer's numbering) and its capture time on the node, ms
/// since the Unix epoch; `lipsync` when the relay runs `--av-sync` (Chromium then syncs the
/// streams itself, and the page's guard stands down).
fn clock_message(audio: (u32, u64), video: (u32, u64), lipsync: bool) -> String {
    let ms = |ntp: u64| {
        pylon_proto::framing::from_ntp(ntp)
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    format!(
        r#"{{"type":"clock","audio":{{"ts":{},"ms":{:.3}}},"video":{{"ts":{},"ms":{:.3}}},"lipsync":{lipsync}}}"#,
        audio.0,
        ms(audio.1),
        video.0,
        ms(video.1)
    )
}

fn accept_offer(
    now: Instant,
    sdp: &str,
    advertise: SocketAddr,
    id: u64,
    player: bool,
    av_sync: bool,
) -> Result<(Viewer, String), String> {
    let offer = SdpOffer::from_sdp_string(sdp).map_err(|e| format!("malformed SDP offer: {e}"))?;
    let mut rtc = rtc_config(player).build(now);
    if player {
        rtc.bwe().set_desired_bitrate(Bitrate::bps(PLAYER_DESIRED_BPS));
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
        audio_mid: None,
        audio_pt: None,
        audio_red: None,
        audio_rewrite: Rewrite::default(),
        connected: false,
        next_timeout: now,
        rewrite: Rewrite::default(),
        relay_us: 0,
        session: None,
        watching: None,
        created: now,
        nacks_seen: 0,
        plis_seen: 0,
        rate: player.then(|| RateController::new(PLAYER_MIN_BPS, PLAYER_MAX_BPS)),
        source: None,
        wants_node: None,
        pull: None,
        dirty: false,
        capacity_bytes: 0,
        frame_arrival: None,
        first_arrival: None,
        video_clock: None,
        clock_due: now,
        picture_hold: MediaTime::new(0, Frequency::HUNDREDTHS),
    };
    let answer = with_rrtr(&answer.to_sdp_string());
    Ok((viewer, if av_sync { shared_msid(&answer) } else { answer }))
}

/// The answer with the audio m-line's stream id (`a=msid:<stream> <track>`) replaced by
/// the video's: the browser then puts both tracks in one synchronisation group.
fn shared_msid(sdp: &str) -> String {
    let stream_of = |kind: &str| {
        let section = sdp.split("\r\nm=").find(|s| s.starts_with(kind))?;
        let line = section.lines().find_map(|l| l.strip_prefix("a=msid:"))?;
        line.split_whitespace().next().map(str::to_string)
    };
    match (stream_of("audio"), stream_of("video")) {
        (Some(audio), Some(video)) if audio != video && !audio.is_empty() => sdp.replace(&audio, &video),
        _ => sdp.to_string(),
    }
}

/// Adds `a=rtcp-fb:<H.264> rrtr` to an answer: the browser then sends RTCP XR receiver
/// reference times, str0m answers with DLRR, and the browser learns its RTT to the relay.
/// Without it a receive-only browser assumes 100 ms and waits that long before asking
/// again for a retransmission that was lost too — a visible freeze.
fn with_rrtr(sdp: &str) -> String {
    let nack = format!("a=rtcp-fb:{H264_PT} nack\r\n");
    sdp.replacen(&nack, &format!("{nack}a=rtcp-fb:{H264_PT} rrtr\r\n"), 1)
}

/// Whether the viewer's video stream has packets waiting in str0m's send queue (as the
/// pacer last saw it).
fn video_queued(v: &mut Viewer) -> bool {
    let Some(mid) = v.mid else { return false };
    v.rtc
        .direct_api()
        .stream_tx_by_mid(mid, None)
        .and_then(|s| s.queue_info().map(|q| q.packet_count() > 0))
        .unwrap_or(false)
}

/// Most immediate timeouts one [`drain`] serves before it yields to the event loop (a
/// keyframe is well under 200 packets).
const MAX_IMMEDIATE_TURNS: usize = 1024;
/// A str0m timeout this close to `now` is served at once (see [`drain`]).
const IMMEDIATE: Duration = Duration::from_micros(1);

/// Polls a viewer until it only waits for time, handing its datagrams to `sink`. Returns
/// what the node must hear: a keyframe request (the viewer just connected, or sent
/// PLI/FIR) and the player's input.
#[must_use]
fn drain(v: &mut Viewer, now: Instant, sink: &mut impl Sink, metrics: &RelayMetrics) -> Drained {
    let mut out = Drained::default();
    let mut immediate_turns = 0;
    let mut clock = now;
    loop {
        let output = match v.rtc.poll_output() {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(viewer = v.id, "viewer session failed: {e}");
                v.rtc.disconnect();
                sink.flush();
                return out;
            }
        };
        match output {
            // With bandwidth estimation on (the player), str0m hands out one packet per turn
            // and then asks for its next turn 1 µs later. Leaving that turn to the event
            // loop's timer (a millisecond's resolution) spread each frame's packets over
            // 5–9 ms, and Chromium's jitter buffer held every frame that long. While video
            // waits in the queue the turn is served here, time fed forward by that
            // microsecond (at most MAX_IMMEDIATE_TURNS µs ahead of `now`); str0m's pacer
            // still decides what may go (its burst allowance is 40 ms at the pacing rate).
            // Padding (sent when the video queue is empty) keeps the timer's pace.
            Output::Timeout(t)
                if t.saturating_duration_since(clock) <= IMMEDIATE
                    && immediate_turns < MAX_IMMEDIATE_TURNS
                    && video_queued(v) =>
            {
                immediate_turns += 1;
                clock = clock.max(t);
                if let Err(e) = v.rtc.handle_input(Input::Timeout(clock)) {
                    tracing::debug!(viewer = v.id, "viewer timeout error: {e}");
                    v.rtc.disconnect();
                }
            }
            Output::Timeout(t) => {
                v.next_timeout = t;
                sink.flush();
                return out;
            }
            Output::Transmit(t) => sink.send(t.destination, &t.contents),
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
                Event::MediaAdded(m) if m.kind == MediaKind::Audio => {
                    v.audio_mid = Some(m.mid);
                    let opus = v.rtc.codec_config().find(|p| p.spec().codec == Codec::Opus);
                    v.audio_pt = opus.map(|p| p.pt());
                    v.audio_red = opus.and_then(|p| p.red());
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
                    INPUT_CHANNEL => {
                        v.input_channel = Some(id);
                        if v.session.is_some() && v.source.is_none() {
                            tell(v, now, NODE_LINKING);
                        }
                    }
                    MOTION_CHANNEL => v.motion_channel = Some(id),
                    _ => tracing::debug!(viewer = v.id, "ignoring data channel {label:?}"),
                },
                Event::ChannelData(data) => {
                    let reliable = Some(data.id) != v.motion_channel;
                    let checked = if data.binary {
                        check_input(v, &data.data, now).map(Some)
                    } else {
                        page_message(v, &data.data, now).map(|()| None)
                    };
                    match checked {
                        Ok(Some(msg)) => {
                            metrics.input_forwarded.inc();
                            out.to_node.push(if reliable {
                                ToNode::Control(RelayMessage::Input(msg))
                            } else {
                                ToNode::InputDatagram(msg)
                            });
                        }
                        Ok(None) => {}
                        Err(reason) => {
                            metrics.input_refused.get_or_create(&DropReason { reason }).inc();
                        }
                    }
                }
                Event::EgressBitrateEstimate(BweKind::Twcc { estimate, .. }) => {
                    if let Some(rate) = v.rate.as_mut() {
                        metrics.player_estimate_bps.set(estimate.as_u64() as i64);
                        if let Some(bps) = rate.on_estimate(now, estimate.as_u64()) {
                            metrics.player_target_bps.set(bps as i64);
                            out.to_node
                                .push(ToNode::Control(RelayMessage::Bitrate(u32::try_from(bps).unwrap_or(u32::MAX))));
                        }
                    }
                }
                Event::MediaEgressStats(stats) => {
                    // Answered by str0m from this viewer's RTX cache, never upstream.
                    let nacks = stats.nacks.saturating_sub(v.nacks_seen);
                    let plis = (stats.plis + stats.firs).saturating_sub(v.plis_seen);
                    metrics.viewer_nacks.inc_by(nacks);
                    out.nacks += nacks;
                    out.plis += plis;
                    v.nacks_seen = v.nacks_seen.max(stats.nacks);
                    v.plis_seen = v.plis_seen.max(stats.plis + stats.firs);
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

/// The most a page may ask its picture be held for lip sync: past this, late sound is
/// better than a late picture.
pub const MAX_PICTURE_HOLD: Duration = Duration::from_millis(150);

/// A text message from a viewer's page, for the relay itself (input is binary):
/// `{"type":"hold","ms":N}` asks that its picture be held N ms (rounded to the playout-delay
/// extension's 10 ms, at most [`MAX_PICTURE_HOLD`]) so the sound it hears is not left behind.
/// Any viewer may send it (it changes only its own stream); it shares the input rate limit;
/// `Err` names why anything else is refused (counted by the caller).
fn page_message(v: &mut Viewer, data: &[u8], now: Instant) -> Result<(), &'static str> {
    if data.len() > MAX_INPUT_MESSAGE {
        return Err("size");
    }
    if !v.limiter.allow(now) {
        return Err("rate_limited");
    }
    v.picture_hold = picture_hold(data).ok_or("malformed")?;
    Ok(())
}

/// The playout delay a `{"type":"hold","ms":N}` message asks for; `None` for anything else.
fn picture_hold(data: &[u8]) -> Option<MediaTime> {
    #[derive(serde::Deserialize)]
    #[serde(tag = "type", rename_all = "lowercase")]
    enum PageMessage {
        Hold { ms: f64 },
    }
    let Ok(PageMessage::Hold { ms }) = serde_json::from_slice(data) else { return None };
    if !ms.is_finite() || ms < 0.0 {
        return None;
    }
    let ms = ms.min(MAX_PICTURE_HOLD.as_millis() as f64);
    Some(MediaTime::new((ms / 10.0).round() as u64, Frequency::HUNDREDTHS))
}

/// The relay's checks on player input: role, size, header, rate; `Err` names the reason
/// it is refused (counted by the caller). The message itself is forwarded unchanged; the
/// node validates its contents.
fn check_input(v: &mut Viewer, data: &[u8], now: Instant) -> Result<Vec<u8>, &'static str> {
    if !v.player {
        return Err("spectator");
    }
    if data.len() > MAX_INPUT_MESSAGE || data.len() < INPUT_HEADER_LEN {
        return Err("size");
    }
    if peek_header(data).is_err() {
        return Err("malformed");
    }
    if !v.limiter.allow(now) {
        return Err("rate_limited");
    }
    Ok(data.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stream id of the answer's `kind` m-section.
    fn msid_stream(sdp: &str, kind: &str) -> Option<String> {
        let section = sdp.split("\r\nm=").find(|s| s.starts_with(kind))?;
        section
            .lines()
            .find_map(|l| l.strip_prefix("a=msid:"))
            .and_then(|l| l.split_whitespace().next())
            .map(String::from)
    }

    #[test]
    fn av_sync_puts_audio_and_video_in_one_stream() {
        let now = Instant::now();
        // A browser-like offer: receive video and audio, one data channel.
        let mut browser = Rtc::builder().build(now);
        let mut change = browser.sdp_api();
        change.add_media(MediaKind::Video, str0m::media::Direction::RecvOnly, None, None, None);
        change.add_media(MediaKind::Audio, str0m::media::Direction::RecvOnly, None, None, None);
        change.add_channel("input".into());
        let (offer, _) = change.apply().unwrap();
        let offer = offer.to_sdp_string();
        let relay: SocketAddr = "127.0.0.1:3478".parse().unwrap();
        let (_, apart) = accept_offer(now, &offer, relay, 1, true, false).unwrap();
        let (_, synced) = accept_offer(now, &offer, relay, 2, true, true).unwrap();
        let (audio, video) = (msid_stream(&apart, "audio").unwrap(), msid_stream(&apart, "video").unwrap());
        assert_ne!(audio, video, "by default each track has its own stream");
        assert_eq!(msid_stream(&synced, "audio"), msid_stream(&synced, "video"), "{synced}");
        assert!(synced.contains("a=rtpmap:111 opus/48000/2"), "Opus is answered: {synced}");
    }

    #[test]
    fn answers_ask_the_browser_for_rtt_reports() {
        let sdp = "m=video 9 UDP/TLS/RTP/SAVPF 108 109\r\na=rtcp-fb:108 nack\r\na=rtcp-fb:108 nack pli\r\n";
        let out = with_rrtr(sdp);
        assert_eq!(out.matches("a=rtcp-fb:108 rrtr\r\n").count(), 1, "{out}");
        assert!(out.contains("a=rtcp-fb:108 nack pli\r\n"));
    }

    #[test]
    fn a_page_may_ask_only_for_a_bounded_picture_hold() {
        let hold = |text: &str| picture_hold(text.as_bytes()).map(|t| t.numer());
        assert_eq!(hold(r#"{"type":"hold","ms":0}"#), Some(0));
        assert_eq!(hold(r#"{"type":"hold","ms":44}"#), Some(4), "10 ms steps");
        assert_eq!(hold(r#"{"type":"hold","ms":1e300}"#), Some(15), "at most MAX_PICTURE_HOLD");
        for bad in [
            r#"{"type":"hold","ms":-5}"#,
            r#"{"type":"hold"}"#,
            r#"{"type":"hold","ms":"10"}"#,
            r#"{"type":"jump","ms":10}"#,
            "hold 10",
            "",
        ] {
            assert_eq!(hold(bad), None, "{bad:?}");
        }
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

    #[test]
    fn keyframe_requests_are_coalesced_per_interval() {
        let t0 = Instant::now();
        let mut k = KeyframePolicy::default();
        assert!(k.request(t0), "the first goes at once");
        assert_eq!(k.next_due(), None);
        // A storm of requests inside the interval: none goes now, one is pending.
        for ms in 1..300 {
            assert!(!k.request(t0 + Duration::from_millis(ms)));
        }
        assert_eq!(k.next_due(), Some(t0 + KEYFRAME_REQUEST_INTERVAL));
        assert!(!k.poll(t0 + Duration::from_millis(299)));
        assert!(k.poll(t0 + KEYFRAME_REQUEST_INTERVAL), "one request when the interval has passed");
        assert!(!k.poll(t0 + Duration::from_secs(2)), "and only one");
        // Over 10 s of a request every millisecond: at most one per interval.
        let mut k = KeyframePolicy::default();
        let sent = (0..10_000u64)
            .filter(|ms| {
                let now = t0 + Duration::from_millis(*ms);
                k.request(now) | k.poll(now)
            })
            .count();
        assert!(sent <= 10_000 / 300 + 1, "{sent} requests");
    }

    #[test]
    fn rewriting_keeps_a_viewer_continuous_across_streams() {
        let mut r = Rewrite::default();
        // First stream: node numbering starts at 5000, timestamps at 90_000.
        assert_eq!(r.map(5000, 90_000, 1500), (1, 1500));
        assert_eq!(r.map(5001, 90_000, 1500), (2, 1500));
        assert_eq!(r.map(5002, 91_500, 1500), (3, 3000));
        // Reordered packet: mapped by the same offset, does not move "last".
        assert_eq!(r.map(5000, 90_000, 1500), (1, 1500));
        // The node reconnects: a new stream numbered from 7, timestamps anywhere.
        r.rebase();
        assert!(!r.is_mapped());
        assert_eq!(r.map(7, 4_000_000_000, 1500), (4, 4500), "next number, one frame later");
        assert_eq!(r.map(8, 4_000_001_500, 1500), (5, 6000));
        assert_eq!(r.timestamp(4_000_003_000), 7500);
        // Timestamps wrap like RTP's.
        assert_eq!(r.map(9, 4_294_967_295, 1500).1, 4500u32.wrapping_add(294_967_295));
    }
}
