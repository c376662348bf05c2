//! Prometheus metrics of the render node, served at `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::Arc;

/// Why a frame was dropped at the source.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropReason {
    /// Frames: `late` (the render loop missed its tick), `gpu_behind` (every ring slot
    /// busy), `encoder_behind` (no free input frame), `encode_error`. Input: the decode
    /// error (`malformed`).
    pub reason: &'static str,
}

/// A stage of the frame path.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Stage {
    /// `render` (submit to fence, render and NV12 conversion), `readback`,
    /// `encode_queue` (waiting for the encoder), `encode`, `packetize`, `frame_path` (tick
    /// to last packet handed to the network), `input_wait` (an input's arrival to the start
    /// of the frame that shows it), `input_to_packets` (to that frame's last packet).
    pub stage: &'static str,
}

/// Why a packet never reached the relay.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PacketDrop {
    /// `queue_full` (the network task is behind), `send_error`.
    pub reason: &'static str,
}

/// How a studio title's frame reached the NV12 pass.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CapturePath {
    /// `layer` (imported from the title's Vulkan present layer) or `xshm` (the X screen
    /// grabbed through shared memory).
    pub path: &'static str,
}

/// All metrics of a render node.
#[derive(Debug, Clone)]
pub struct ServerMetrics {
    /// Frames rendered and converted.
    pub frames_rendered: Counter,
    /// Frames encoded.
    pub frames_encoded: Counter,
    /// Keyframes encoded.
    pub keyframes: Counter,
    /// Frames dropped at the source, by reason.
    pub frames_dropped: Family<DropReason, Counter>,
    /// Keyframe requests received from the relay.
    pub keyframe_requests: Counter,
    /// RTP packets resent at the relay's request
    pub rtp_resent: Counter,
    /// Resend requests for packets no longer cached
    pub rtp_resend_missed: Counter,
    /// Player sessions started with a verified token.
    pub sessions_started: Counter,
    /// Session tokens refused (forged, expired, another node's, spectator).
    pub sessions_refused: Counter,
    /// Sessions that moved to another relay (their player came back through it).
    pub sessions_resumed: Counter,
    /// RTP packets handed to QUIC.
    pub rtp_packets_sent: Counter,
    /// RTP bytes handed to QUIC.
    pub rtp_bytes_sent: Counter,
    /// Media datagram bytes sent on relay links, all links together (resends included).
    pub link_bytes_sent: Counter,
    /// Relays the indexer listed whose entry its signature does not vouch for (not dialed).
    pub relays_unattested: Counter,
    /// RTP packets that never left, by reason.
    pub rtp_packets_dropped: Family<PacketDrop, Counter>,
    /// Connections established to the relay.
    pub relay_connects: Counter,
    /// Connections to the relay that ended.
    pub relay_disconnects: Counter,
    /// Whether a relay connection is up (0 or 1).
    pub relay_connected: Gauge,
    /// The encoder's target bitrate, bit/s (follows the player's bandwidth estimate).
    pub target_bitrate_bps: Gauge,
    /// Malformed control messages from the relay.
    pub bad_control_messages: Counter,
    /// Frames started early because input arrived.
    pub early_frames: Counter,
    /// Input messages applied to the game.
    pub input_applied: Counter,
    /// Input messages refused, by reason.
    pub input_rejected: Family<DropReason, Counter>,
    /// Keys the game believes are held.
    pub keys_held: Gauge,
    /// Per-stage time of the frame path, in seconds.
    pub stage_seconds: Family<Stage, Histogram>,
    /// Frame ticks skipped because the title's screen had not changed.
    pub title_unchanged: Counter,
    /// Studio-title sessions started (sandbox up).
    pub title_sessions: Counter,
    /// Studio-title sessions the node ended, by reason (`exited`, `crashed`, `no_picture`,
    /// `not_installed`, `start_failed`).
    pub title_failures: Family<DropReason, Counter>,
    /// Whether a studio title runs now (0 or 1).
    pub title_running: Gauge,
    /// Title frames converted, by capture path.
    pub capture_frames: Family<CapturePath, Counter>,
    /// Messages from a title's present layer refused (malformed, bad descriptors).
    pub capture_refused: Counter,
    /// Audio RTP packets (Opus) handed to the network task.
    pub audio_packets: Counter,
    /// Their bytes.
    pub audio_bytes: Counter,
    /// Audio pipelines that failed to start or stopped (each is retried).
    pub audio_errors: Counter,
    /// Capture underruns: an Opus packet captured more than 10 ms later than the previous
    /// packet's end (the capture gave less than real time: a stalled source or thread).
    pub audio_underruns: Counter,
    /// Proof-of-capacity challenges, by outcome (`answered`, `failed`, `busy`, `no_worker`).
    pub capacity_challenges: Family<DropReason, Counter>,
    registry: Arc<Registry>,
}

impl Default for ServerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ServerMetrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("pylon_server");
        let m = ServerMetrics {
            frames_rendered: Counter::default(),
            frames_encoded: Counter::default(),
            keyframes: Counter::default(),
            frames_dropped: Family::default(),
            keyframe_requests: Counter::default(),
            rtp_resent: Counter::default(),
            rtp_resend_missed: Counter::default(),
            sessions_started: Counter::default(),
            sessions_refused: Counter::default(),
            sessions_resumed: Counter::default(),
            rtp_packets_sent: Counter::default(),
            rtp_bytes_sent: Counter::default(),
            link_bytes_sent: Counter::default(),
            relays_unattested: Counter::default(),
            rtp_packets_dropped: Family::default(),
            relay_connects: Counter::default(),
            relay_disconnects: Counter::default(),
            relay_connected: Gauge::default(),
            target_bitrate_bps: Gauge::default(),
            bad_control_messages: Counter::default(),
            early_frames: Counter::default(),
            input_applied: Counter::default(),
            input_rejected: Family::default(),
            keys_held: Gauge::default(),
            stage_seconds: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.000_25, 1.6, 16))),
            title_unchanged: Counter::default(),
            title_sessions: Counter::default(),
            title_failures: Family::default(),
            title_running: Gauge::default(),
            capture_frames: Family::default(),
            capture_refused: Counter::default(),
            audio_packets: Counter::default(),
            audio_bytes: Counter::default(),
            audio_errors: Counter::default(),
            audio_underruns: Counter::default(),
            capacity_challenges: Family::default(),
            registry: Arc::new(Registry::default()),
        };
        r.register("frames_rendered", "Frames rendered and converted to NV12", m.frames_rendered.clone());
        r.register("frames_encoded", "Frames encoded", m.frames_encoded.clone());
        r.register("keyframes", "Keyframes encoded", m.keyframes.clone());
        r.register("frames_dropped", "Frames dropped at the source", m.frames_dropped.clone());
        r.register("keyframe_requests", "Keyframe requests from the relay", m.keyframe_requests.clone());
        r.register("rtp_resent", "RTP packets resent at the relay's request", m.rtp_resent.clone());
        r.register("rtp_resend_missed", "Resend requests for packets no longer cached", m.rtp_resend_missed.clone());
        r.register("sessions_started", "Player sessions started with a verified token", m.sessions_started.clone());
        r.register("sessions_refused", "Session tokens refused", m.sessions_refused.clone());
        r.register(
            "sessions_resumed",
            "Sessions that moved to another relay, their game going on",
            m.sessions_resumed.clone(),
        );
        r.register("rtp_packets_sent", "RTP packets sent to the relay", m.rtp_packets_sent.clone());
        r.register("rtp_bytes_sent", "RTP bytes sent to the relay", m.rtp_bytes_sent.clone());
        r.register(
            "link_bytes_sent",
            "Media datagram bytes sent on relay links, all together (the node's upstream)",
            m.link_bytes_sent.clone(),
        );
        r.register(
            "relays_unattested",
            "Relay entries from the indexer whose signature did not verify (not dialed, not pinned)",
            m.relays_unattested.clone(),
        );
        r.register("rtp_packets_dropped", "RTP packets dropped before the network", m.rtp_packets_dropped.clone());
        r.register("relay_connects", "QUIC connections established to the relay", m.relay_connects.clone());
        r.register("relay_disconnects", "QUIC connections to the relay that ended", m.relay_disconnects.clone());
        r.register(
            "relay_connected",
            "Relay links up (one per relay of the pool; one outside a pool)",
            m.relay_connected.clone(),
        );
        r.register("target_bitrate_bps", "Encoder target bitrate", m.target_bitrate_bps.clone());
        r.register("bad_control_messages", "Malformed control messages received", m.bad_control_messages.clone());
        r.register("early_frames", "Frames started early by input", m.early_frames.clone());
        r.register("input_applied", "Input messages applied", m.input_applied.clone());
        r.register("input_rejected", "Input messages refused", m.input_rejected.clone());
        r.register("keys_held", "Keys held in the game", m.keys_held.clone());
        r.register("stage_seconds", "Time per frame-path stage", m.stage_seconds.clone());
        r.register(
            "title_unchanged",
            "Frame ticks skipped: the title's screen had not changed",
            m.title_unchanged.clone(),
        );
        r.register("title_sessions", "Studio-title sessions started", m.title_sessions.clone());
        r.register("title_failures", "Studio-title sessions the node ended, by reason", m.title_failures.clone());
        r.register("title_running", "Whether a studio title runs now", m.title_running.clone());
        r.register("capture_frames", "Studio-title frames converted, by capture path", m.capture_frames.clone());
        r.register("audio_packets", "Audio RTP packets (Opus) sent to the relay", m.audio_packets.clone());
        r.register("audio_bytes", "Audio RTP bytes sent to the relay", m.audio_bytes.clone());
        r.register(
            "audio_underruns",
            "Audio capture underruns (a packet captured over 10 ms after the previous one ended)",
            m.audio_underruns.clone(),
        );
        r.register(
            "capacity_challenges",
            "Proof-of-capacity challenges from checkers, by outcome",
            m.capacity_challenges.clone(),
        );
        r.register(
            "audio_errors",
            "Audio pipelines that failed to start or stopped (each is retried)",
            m.audio_errors.clone(),
        );
        r.register(
            "capture_refused",
            "Messages from a title's present layer refused (malformed, bad descriptors)",
            m.capture_refused.clone(),
        );
        ServerMetrics { registry: Arc::new(r), ..m }
    }

    /// Counts a dropped frame.
    pub fn drop_frame(&self, reason: &'static str) {
        self.frames_dropped.get_or_create(&DropReason { reason }).inc();
    }

    /// Records a stage duration.
    pub fn observe(&self, stage: &'static str, d: std::time::Duration) {
        self.stage_seconds.get_or_create(&Stage { stage }).observe(d.as_secs_f64());
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        pylon_runtime::metrics::render(&self.registry)
    }
}

/// Serves `/metrics` on `addr` until the process ends.
pub async fn serve(addr: std::net::SocketAddr, metrics: ServerMetrics) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    // Held for as long as the server runs: it never turns true.
    let (forever, shutdown) = tokio::sync::watch::channel(false);
    let served = pylon_runtime::metrics::serve(listener, move || metrics.render(), shutdown).await;
    drop(forever);
    served
}
