//! Prometheus metrics of the relay.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::Arc;

/// One stream's counters, resolved once so the packet path only increments atomics.
#[derive(Debug, Clone)]
pub struct StreamCounters {
    /// Packets in.
    pub packets_in: Counter,
    /// Bytes in.
    pub bytes_in: Counter,
    /// Packets out (all viewers).
    pub packets_out: Counter,
    /// Keyframe requests upstream.
    pub keyframe_requests: Counter,
    /// NACKs from this stream's viewers (answered from their RTX caches).
    pub viewer_nacks: Counter,
    /// PLI/FIR from this stream's viewers (coalesced before going upstream).
    pub viewer_plis: Counter,
    /// Packets this relay lost from the node and asked again (once for all viewers).
    pub upstream_nacks: Counter,
    /// Of those, packets the node resent in time.
    pub upstream_repaired: Counter,
}

/// Which node stream a per-stream metric is about.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabel {
    /// The node's pool id, or `connection-N` outside a pool.
    pub stream: String,
}

/// Why an ingest packet was dropped.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropReason {
    /// `bad_datagram`, `bad_rtp`, `egress_queue_full`, `no_viewer_stream`.
    pub reason: &'static str,
}

/// All relay metrics.
#[derive(Debug, Clone)]
pub struct RelayMetrics {
    /// Render nodes connected now.
    pub nodes_connected: Gauge,
    /// Relays pulling a stream from this one (cascade).
    pub downstream_relays: Gauge,
    /// Packets copied to relays pulling from this one.
    pub downstream_packets: Counter,
    /// Time from a packet's arrival from the node to its hand-off to QUIC for a relay
    /// pulling the stream (this relay's share of a cascade hop), seconds.
    pub downstream_seconds: Histogram,
    /// Streams this relay pulled from another relay for its spectators.
    pub pulls: Counter,
    /// Pulls that failed or were refused.
    pub pulls_failed: Counter,
    /// Failed QUIC handshakes from nodes.
    pub node_handshake_failures: Counter,
    /// RTP packets received from nodes.
    pub rtp_in_packets: Counter,
    /// RTP packets asked again from nodes (each try counts)
    pub upstream_nacks: Counter,
    /// Upstream losses repaired by a resend
    pub upstream_repaired: Counter,
    /// Upstream losses given up (too old, or out of tries)
    pub upstream_given_up: Counter,
    /// RTP bytes received from nodes.
    pub rtp_in_bytes: Counter,
    /// RTP packets written to viewers.
    pub rtp_out_packets: Counter,
    /// Audio RTP packets written to viewers.
    pub audio_out_packets: Counter,
    /// Ingest packets dropped, by reason.
    pub ingest_dropped: Family<DropReason, Counter>,
    /// Malformed or unexpected control messages.
    pub bad_control_messages: Counter,
    /// Viewers connected now (WebRTC up).
    pub viewers: Gauge,
    /// Time from a packet's arrival from the node to its hand-off to the kernel for a
    /// viewer (the oldest packet of each batch), seconds.
    pub forward_seconds: Histogram,
    /// Arrival of a frame's first packet from the node to its last, seconds.
    pub frame_arrival_spread_seconds: Histogram,
    /// Gap between consecutive audio packets from a node, seconds (10 ms when steady; a
    /// longer one makes browsers' audio jitter buffers grow).
    pub audio_arrival_gap_seconds: Histogram,
    /// Viewers per node stream.
    pub stream_viewers: Family<StreamLabel, Gauge>,
    /// RTP packets received per node stream.
    pub stream_packets_in: Family<StreamLabel, Counter>,
    /// RTP bytes received per node stream.
    pub stream_bytes_in: Family<StreamLabel, Counter>,
    /// RTP packets sent to viewers per node stream.
    pub stream_packets_out: Family<StreamLabel, Counter>,
    /// Keyframe requests sent to each node stream.
    pub stream_keyframe_requests: Family<StreamLabel, Counter>,
    /// NACKs from each stream's viewers.
    pub stream_viewer_nacks: Family<StreamLabel, Counter>,
    /// PLI/FIR from each stream's viewers.
    pub stream_viewer_plis: Family<StreamLabel, Counter>,
    /// Upstream losses asked again, per stream.
    pub stream_upstream_nacks: Family<StreamLabel, Counter>,
    /// Upstream losses repaired, per stream.
    pub stream_upstream_repaired: Family<StreamLabel, Counter>,
    /// The player's bandwidth estimate (TWCC), bit/s.
    pub player_estimate_bps: Gauge,
    /// The bitrate last asked of the node for the player, bit/s.
    pub player_target_bps: Gauge,
    /// Viewer sessions created (offers accepted).
    pub viewer_sessions: Counter,
    /// Offers that could not be accepted.
    pub bad_offers: Counter,
    /// Viewers refused for their session token (missing, forged, expired, wrong relay, ended).
    pub tokens_refused: Counter,
    /// Viewers dropped because ICE did not complete in time.
    pub viewers_timed_out: Counter,
    /// Signalling sockets closed for having no session in time.
    pub signalling_timeouts: Counter,
    /// Node connections refused: bad or unregistered key, revoked, not approved, anonymous.
    pub nodes_refused: Counter,
    /// Keyframe requests (PLI/FIR) from viewers.
    pub viewer_keyframe_requests: Counter,
    /// NACKs from viewers, answered from their RTX caches
    pub viewer_nacks: Counter,
    /// Keyframe requests sent to nodes.
    pub keyframe_requests_upstream: Counter,
    /// Player input messages forwarded to the node.
    pub input_forwarded: Counter,
    /// Input messages refused, by reason (`spectator`, `size`, `malformed`,
    /// `rate_limited`, `no_node`, `node_busy`).
    pub input_refused: Family<DropReason, Counter>,
    /// Bytes of proof-of-capacity answers passed from nodes to their checkers.
    pub capacity_bytes: Counter,
    /// Proof-of-capacity messages dropped (`no_player`, `over_budget`, `channel_full`).
    pub capacity_dropped: Family<DropReason, Counter>,
    /// UDP datagrams to viewers that the socket refused.
    pub udp_send_errors: Counter,
    /// UDP datagrams that no viewer session accepted.
    pub udp_unknown: Counter,
    registry: Arc<Registry>,
}

impl Default for RelayMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Bucket bounds (seconds) of the relay's per-hop delays: fine around the 1 ms a hop may
/// take at p99, doubling beyond.
pub const HOP_BUCKETS: [f64; 20] = [
    0.000_025, 0.000_05, 0.000_1, 0.000_2, 0.000_3, 0.000_4, 0.000_5, 0.000_6, 0.000_8, 0.001, 0.001_25, 0.001_6,
    0.002, 0.003_2, 0.006_4, 0.012_8, 0.025_6, 0.051_2, 0.102_4, 0.204_8,
];

impl RelayMetrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("pylon_relay");
        let m = RelayMetrics {
            nodes_connected: Gauge::default(),
            downstream_relays: Gauge::default(),
            downstream_packets: Counter::default(),
            downstream_seconds: Histogram::new(HOP_BUCKETS.iter().copied()),
            pulls: Counter::default(),
            pulls_failed: Counter::default(),
            node_handshake_failures: Counter::default(),
            rtp_in_packets: Counter::default(),
            upstream_nacks: Counter::default(),
            upstream_repaired: Counter::default(),
            upstream_given_up: Counter::default(),
            rtp_in_bytes: Counter::default(),
            rtp_out_packets: Counter::default(),
            audio_out_packets: Counter::default(),
            ingest_dropped: Family::default(),
            bad_control_messages: Counter::default(),
            viewers: Gauge::default(),
            forward_seconds: Histogram::new(HOP_BUCKETS.iter().copied()),
            frame_arrival_spread_seconds: Histogram::new(exponential_buckets(0.000_025, 2.0, 14)),
            audio_arrival_gap_seconds: Histogram::new(exponential_buckets(0.002_5, 2.0, 9)),
            stream_viewers: Family::default(),
            stream_packets_in: Family::default(),
            stream_bytes_in: Family::default(),
            stream_packets_out: Family::default(),
            stream_keyframe_requests: Family::default(),
            stream_viewer_nacks: Family::default(),
            stream_viewer_plis: Family::default(),
            stream_upstream_nacks: Family::default(),
            stream_upstream_repaired: Family::default(),
            player_estimate_bps: Gauge::default(),
            player_target_bps: Gauge::default(),
            viewer_sessions: Counter::default(),
            bad_offers: Counter::default(),
            tokens_refused: Counter::default(),
            nodes_refused: Counter::default(),
            viewers_timed_out: Counter::default(),
            signalling_timeouts: Counter::default(),
            viewer_keyframe_requests: Counter::default(),
            viewer_nacks: Counter::default(),
            keyframe_requests_upstream: Counter::default(),
            input_forwarded: Counter::default(),
            capacity_bytes: Counter::default(),
            capacity_dropped: Family::default(),
            input_refused: Family::default(),
            udp_send_errors: Counter::default(),
            udp_unknown: Counter::default(),
            registry: Arc::new(Registry::default()),
        };
        r.register("nodes_connected", "Render nodes connected", m.nodes_connected.clone());
        r.register("downstream_relays", "Relays pulling a stream from this one", m.downstream_relays.clone());
        r.register(
            "downstream_packets",
            "Packets copied to relays pulling from this one",
            m.downstream_packets.clone(),
        );
        r.register(
            "downstream_seconds",
            "Node packet arrival to hand-off to QUIC for a relay pulling the stream",
            m.downstream_seconds.clone(),
        );
        r.register("pulls", "Streams pulled from another relay for spectators here", m.pulls.clone());
        r.register("pulls_failed", "Pulls from another relay that failed or were refused", m.pulls_failed.clone());
        r.register("node_handshake_failures", "Failed QUIC handshakes", m.node_handshake_failures.clone());
        r.register("rtp_in_packets", "RTP packets received from nodes", m.rtp_in_packets.clone());
        r.register(
            "upstream_nacks",
            "RTP packets asked again from nodes after an upstream loss",
            m.upstream_nacks.clone(),
        );
        r.register("upstream_repaired", "Upstream losses repaired by the node resending", m.upstream_repaired.clone());
        r.register("upstream_given_up", "Upstream losses given up", m.upstream_given_up.clone());
        r.register("rtp_in_bytes", "RTP bytes received from nodes", m.rtp_in_bytes.clone());
        r.register("rtp_out_packets", "RTP packets written to viewers", m.rtp_out_packets.clone());
        r.register("audio_out_packets", "Audio RTP packets written to viewers", m.audio_out_packets.clone());
        r.register("ingest_dropped", "Ingest packets dropped", m.ingest_dropped.clone());
        r.register("bad_control_messages", "Malformed control messages", m.bad_control_messages.clone());
        r.register("viewers", "Viewers connected", m.viewers.clone());
        r.register(
            "forward_seconds",
            "Node packet arrival to hand-off to the kernel for a viewer",
            m.forward_seconds.clone(),
        );
        r.register(
            "frame_arrival_spread_seconds",
            "Arrival of a frame's first packet from the node to its last",
            m.frame_arrival_spread_seconds.clone(),
        );
        r.register(
            "audio_arrival_gap_seconds",
            "Gap between consecutive audio packets from a node",
            m.audio_arrival_gap_seconds.clone(),
        );
        r.register("stream_viewers", "Viewers per node stream", m.stream_viewers.clone());
        r.register("stream_packets_in", "RTP packets received per node stream", m.stream_packets_in.clone());
        r.register("stream_bytes_in", "RTP bytes received per node stream", m.stream_bytes_in.clone());
        r.register("stream_packets_out", "RTP packets sent to viewers per node stream", m.stream_packets_out.clone());
        r.register(
            "stream_keyframe_requests",
            "Keyframe requests sent per node stream",
            m.stream_keyframe_requests.clone(),
        );
        r.register(
            "stream_viewer_nacks",
            "NACKs from each stream's viewers, answered from their RTX caches",
            m.stream_viewer_nacks.clone(),
        );
        r.register("stream_viewer_plis", "PLI/FIR from each stream's viewers", m.stream_viewer_plis.clone());
        r.register(
            "stream_upstream_nacks",
            "Packets lost between node and relay and asked again, per stream",
            m.stream_upstream_nacks.clone(),
        );
        r.register(
            "stream_upstream_repaired",
            "Upstream losses the node resent in time, per stream",
            m.stream_upstream_repaired.clone(),
        );
        r.register("player_estimate_bps", "The player's bandwidth estimate (TWCC)", m.player_estimate_bps.clone());
        r.register("player_target_bps", "Bitrate last asked of the node for the player", m.player_target_bps.clone());
        r.register("viewer_sessions", "Viewer sessions created", m.viewer_sessions.clone());
        r.register("bad_offers", "SDP offers refused", m.bad_offers.clone());
        r.register("tokens_refused", "Viewers refused for their session token", m.tokens_refused.clone());
        r.register(
            "signalling_timeouts",
            "Signalling sockets closed for having no session in time",
            m.signalling_timeouts.clone(),
        );
        r.register(
            "viewers_timed_out",
            "Viewers dropped because ICE did not complete in time",
            m.viewers_timed_out.clone(),
        );
        r.register(
            "nodes_refused",
            "Node connections refused (unproven, unregistered, mismatched, revoked or unapproved key)",
            m.nodes_refused.clone(),
        );
        r.register("viewer_keyframe_requests", "PLI/FIR from viewers", m.viewer_keyframe_requests.clone());
        r.register(
            "viewer_nacks",
            "NACKs received from viewers, answered from their RTX caches",
            m.viewer_nacks.clone(),
        );
        r.register(
            "keyframe_requests_upstream",
            "Keyframe requests sent to nodes",
            m.keyframe_requests_upstream.clone(),
        );
        r.register("input_forwarded", "Player input forwarded to the node", m.input_forwarded.clone());
        r.register(
            "capacity_bytes",
            "Bytes of proof-of-capacity answers passed from nodes to their checkers",
            m.capacity_bytes.clone(),
        );
        r.register(
            "capacity_dropped",
            "Proof-of-capacity messages dropped (no_player, over_budget, channel_full)",
            m.capacity_dropped.clone(),
        );
        r.register("input_refused", "Input messages refused", m.input_refused.clone());
        r.register("udp_send_errors", "UDP sends to viewers that failed", m.udp_send_errors.clone());
        r.register("udp_unknown", "UDP datagrams no viewer accepted", m.udp_unknown.clone());
        RelayMetrics { registry: Arc::new(r), ..m }
    }

    /// The counters of stream `stream`.
    pub fn stream_counters(&self, stream: &str) -> StreamCounters {
        let label = StreamLabel { stream: stream.to_string() };
        StreamCounters {
            packets_in: self.stream_packets_in.get_or_create(&label).clone(),
            bytes_in: self.stream_bytes_in.get_or_create(&label).clone(),
            packets_out: self.stream_packets_out.get_or_create(&label).clone(),
            keyframe_requests: self.stream_keyframe_requests.get_or_create(&label).clone(),
            viewer_nacks: self.stream_viewer_nacks.get_or_create(&label).clone(),
            viewer_plis: self.stream_viewer_plis.get_or_create(&label).clone(),
            upstream_nacks: self.stream_upstream_nacks.get_or_create(&label).clone(),
            upstream_repaired: self.stream_upstream_repaired.get_or_create(&label).clone(),
        }
    }

    /// Removes every per-stream series of `stream` (its node left): labels of streams
    /// that are gone must not pile up in `/metrics`.
    pub fn forget_stream(&self, stream: &str) {
        let label = StreamLabel { stream: stream.to_string() };
        for family in [
            &self.stream_packets_in,
            &self.stream_bytes_in,
            &self.stream_packets_out,
            &self.stream_keyframe_requests,
            &self.stream_viewer_nacks,
            &self.stream_viewer_plis,
            &self.stream_upstream_nacks,
            &self.stream_upstream_repaired,
        ] {
            family.remove(&label);
        }
        self.stream_viewers.remove(&label);
    }

    /// Counts a dropped ingest packet.
    pub fn dropped(&self, reason: &'static str) {
        self.ingest_dropped.get_or_create(&DropReason { reason }).inc();
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        pylon_runtime::metrics::render(&self.registry)
    }
}
