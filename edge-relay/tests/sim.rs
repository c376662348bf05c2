//! The relay's forwarding core on a simulated clock: a render node (the real
//! `link::NodeSide`, with its resend cache), a lossy node→relay path, the relay (the real
//! `link::RelaySide` with its upstream repair, and `forward::Core`), and str0m WebRTC
//! viewers behind lossy last hops — every part sans-IO, every path a seeded
//! `proto::impair` model, time moved by hand. The node↔relay handshake runs as in
//! production. A few simulated seconds run in well under a real second, and the same seed
//! gives the same run.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use pylon_proto::framing::StreamHello;
use pylon_proto::impair::{Impairment, LossModel};
use pylon_proto::link::{MediaDrop, NodeConfig, NodeEvent, NodeSide, PlayerGate, RelayEvent, RelaySide};
use pylon_proto::repair::RepairConfig;
use pylon_proto::rtp::RtpHeader;
use pylon_relay::forward::{Core, Sink};
use pylon_relay::metrics::RelayMetrics;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use str0m::change::SdpAnswer;
use str0m::media::{Direction, MediaKind};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Output, Rtc, RtcConfig};

const FPS: u64 = 60;
const PACKETS_PER_FRAME: u64 = 6;
const PAYLOAD: usize = 1100;
const NODE_CONNECTION: u64 = 1;

fn relay_addr() -> SocketAddr {
    "10.0.0.1:4000".parse().unwrap()
}

/// What travels on the simulated network.
enum Packet {
    /// Node → relay: one QUIC datagram (an RTP packet behind the link's header).
    NodeDatagram(Vec<u8>),
    /// Relay → node: bytes of the reliable control stream.
    ToNode(Vec<u8>),
    /// A UDP datagram between a viewer and the relay.
    Udp { from: SocketAddr, to: SocketAddr, data: Vec<u8> },
}

/// A path's settings: loss model and one-way delay.
#[derive(Clone, Copy)]
struct Path {
    loss: LossModel,
    delay: Duration,
}

impl Path {
    fn clean(delay_ms: u64) -> Self {
        Self { loss: LossModel::None, delay: Duration::from_millis(delay_ms) }
    }
    fn bursty(average: f64, delay_ms: u64) -> Self {
        Self { loss: LossModel::bursty(average, 3.0), delay: Duration::from_millis(delay_ms) }
    }
}

struct Viewer {
    addr: SocketAddr,
    hop: Path,
    seed: u64,
    rtc: Rtc,
    down: Impairment,
    up: Impairment,
    timeout: Instant,
    connected: bool,
    /// Node packet numbers received (carried in the payload), first arrival each.
    received: BTreeMap<u64, Instant>,
    nacks_sent: u64,
    /// Its data channel is open (offered with one).
    channel_open: bool,
    /// Text messages received on its data channel.
    texts: Vec<String>,
    /// Binary messages received on its data channel.
    binary: Vec<Vec<u8>>,
}

/// Datagrams the core hands out, routed onto the viewers' paths afterwards.
#[derive(Default)]
struct Outbox(Vec<(SocketAddr, Vec<u8>)>);

impl Sink for Outbox {
    fn send(&mut self, destination: SocketAddr, data: &[u8]) {
        self.0.push((destination, data.to_vec()));
    }
    fn flush(&mut self) {}
}

struct Sim {
    now: Instant,
    queue: BinaryHeap<Reverse<(Instant, usize)>>,
    packets: BTreeMap<usize, Packet>,
    next_packet: usize,
    core: Core,
    metrics: RelayMetrics,
    viewers: Vec<Viewer>,
    // The node's side of the link.
    node: NodeSide,
    node_up: Impairment,
    node_next_frame: Instant,
    node_sent: u64,
    node_stop: Instant,
    node_control_delay: Duration,
    /// Sequence numbers the node was asked to resend, however they were asked.
    node_nacks: u64,
    keyframe_requests: u64,
    // The relay's side of the link (ingest).
    link: RelaySide,
    /// Node sequence numbers the upstream path lost (an original or a resend).
    upstream_lost: BTreeSet<u64>,
    /// Losses on the upstream path, resends included.
    upstream_loss_events: u64,
    /// Sequence numbers the node was asked for.
    asked: BTreeSet<u64>,
}

/// The simulated node's stream description.
fn sim_hello() -> StreamHello {
    StreamHello {
        width: 1280,
        height: 720,
        fps: FPS as u16,
        profile_level_id: 0x42e01f,
        encoder: "sim".into(),
        node: String::new(),
    }
}

impl Sim {
    fn new(seed: u64, upstream: Path, last_hops: &[Path], stream_seconds: u64) -> Self {
        let now = Instant::now();
        let metrics = RelayMetrics::new();
        let hello = sim_hello();
        let exporter = [7u8; pylon_proto::link::EXPORTER_LEN];
        let config = NodeConfig { stream: hello.clone(), identity: None, bitrate_bounds: None };
        let mut sim = Sim {
            now,
            queue: BinaryHeap::new(),
            packets: BTreeMap::new(),
            next_packet: 0,
            core: Core::new(relay_addr(), metrics.clone()),
            metrics,
            viewers: Vec::new(),
            node: NodeSide::new(config, PlayerGate::open(), &exporter, now, 0),
            node_up: Impairment::new(seed, upstream.loss, upstream.delay, Duration::ZERO, 0.0),
            node_next_frame: now + Duration::from_secs(1),
            node_sent: 0,
            node_stop: now + Duration::from_secs(1 + stream_seconds),
            node_control_delay: upstream.delay,
            node_nacks: 0,
            keyframe_requests: 0,
            link: RelaySide::new("sim-relay", &exporter, RepairConfig::default(), now),
            upstream_lost: BTreeSet::new(),
            upstream_loss_events: 0,
            asked: BTreeSet::new(),
        };
        // The handshake, as the drivers carry it: hello, admission, welcome.
        let hello_bytes = sim.node.poll_transmit().unwrap();
        sim.link.handle_control(now, &hello_bytes).unwrap();
        assert!(matches!(sim.link.poll_event(), Some(RelayEvent::Hello { key: None, .. })));
        sim.link.admit(now);
        let welcome = sim.link.poll_transmit().unwrap();
        sim.node.handle_control(now, &welcome).unwrap();
        assert!(sim.node.is_established());
        while sim.node.poll_event().is_some() {}
        sim.link.set_rtt(upstream.delay * 2);
        sim.core.stream_started(now, NODE_CONNECTION, hello);
        for (i, hop) in last_hops.iter().enumerate() {
            sim.add_viewer(seed.wrapping_mul(31).wrapping_add(i as u64 * 7 + 1), *hop, i == 0, false);
        }
        sim
    }

    fn add_viewer(&mut self, seed: u64, hop: Path, player: bool, channel: bool) {
        let addr: SocketAddr = format!("10.0.1.{}:5000", self.viewers.len() + 2).parse().unwrap();
        let mut rtc =
            RtcConfig::new().set_rtp_mode(true).set_stats_interval(Some(Duration::from_millis(500))).build(self.now);
        rtc.add_local_candidate(Candidate::host(addr, "udp").unwrap());
        let mut change = rtc.sdp_api();
        change.add_media(MediaKind::Video, Direction::RecvOnly, None, None, None);
        if channel {
            change.add_channel(pylon_relay::forward::INPUT_CHANNEL.into());
        }
        let (offer, pending) = change.apply().unwrap();
        let (_, answer, got_player) = self.core.offer(self.now, &offer.to_sdp_string(), player, None).unwrap();
        assert_eq!(got_player, player);
        rtc.sdp_api().accept_answer(pending, SdpAnswer::from_sdp_string(&answer).unwrap()).unwrap();
        self.viewers.push(Viewer {
            addr,
            rtc,
            // Clean while connecting: ICE and DTLS are not what this is about.
            down: Impairment::new(seed, LossModel::None, hop.delay, Duration::from_millis(1), 0.0),
            up: Impairment::new(seed ^ 0x5555, LossModel::None, hop.delay, Duration::from_millis(1), 0.0),
            hop,
            seed,
            timeout: self.now,
            connected: false,
            received: BTreeMap::new(),
            nacks_sent: 0,
            channel_open: false,
            texts: Vec::new(),
            binary: Vec::new(),
        });
    }

    /// Adds the player (10 ms away) with its input channel, and runs until the channel is
    /// open at both ends.
    fn add_player_with_channel(&mut self, seed: u64) {
        self.add_viewer(seed, Path::clean(10), true, true);
        let i = self.viewers.len() - 1;
        let start = self.now;
        while !(self.viewers[i].connected && self.viewers[i].channel_open) {
            let t = self.now + Duration::from_millis(10);
            self.run_until(t);
            assert!(self.now < start + Duration::from_secs(5), "the player's channel did not open");
        }
        // The relay learns of the channel when the browser's first message on it arrives or
        // the open is acknowledged; give it a moment.
        let t = self.now + Duration::from_millis(200);
        self.run_until(t);
    }

    fn schedule(&mut self, at: Instant, packet: Packet) {
        let id = self.next_packet;
        self.next_packet += 1;
        self.packets.insert(id, packet);
        self.queue.push(Reverse((at, id)));
    }

    /// The relay's datagrams onto each viewer's downlink.
    fn route(&mut self, outbox: Outbox) {
        for (to, data) in outbox.0 {
            let Some(i) = self.viewers.iter().position(|v| v.addr == to) else { continue };
            if let Some(at) = self.viewers[i].down.on_packet(self.now) {
                self.schedule(at, Packet::Udp { from: relay_addr(), to, data });
            }
        }
        let to_node: Vec<_> = self.core.poll_to_node().collect();
        for (node, msg) in to_node {
            assert_eq!(node, NODE_CONNECTION);
            self.link.send(msg).unwrap();
        }
        self.relay_transmit();
    }

    /// What the relay's link queued for the node goes onto the control stream.
    fn relay_transmit(&mut self) {
        if let Some(bytes) = self.link.poll_transmit() {
            self.schedule(self.now + self.node_control_delay, Packet::ToNode(bytes));
        }
    }

    /// A datagram leaves the node (an original or a resend).
    fn node_send(&mut self, datagram: Vec<u8>) {
        match self.node_up.on_packet(self.now) {
            Some(at) => self.schedule(at, Packet::NodeDatagram(datagram)),
            None => {
                // The datagram's two-byte link header, then the RTP header.
                let seq = u16::from_be_bytes([datagram[4], datagram[5]]);
                self.upstream_lost.insert(u64::from(seq));
                self.upstream_loss_events += 1;
            }
        }
    }

    fn node_frame(&mut self) {
        let frame = self.node_sent / PACKETS_PER_FRAME;
        for i in 0..PACKETS_PER_FRAME {
            let n = self.node_sent;
            let mut packet = Vec::with_capacity(12 + PAYLOAD);
            RtpHeader {
                marker: i == PACKETS_PER_FRAME - 1,
                payload_type: 96,
                sequence: n as u16,
                timestamp: (frame * 90_000 / FPS) as u32,
                ssrc: 0x1234,
            }
            .write(&mut packet);
            packet.extend_from_slice(&n.to_be_bytes());
            packet.resize(12 + PAYLOAD, 0xab);
            let mut datagram = Vec::new();
            self.node.send_rtp(self.now, &packet, None, &mut datagram).unwrap();
            self.node_send(datagram);
            self.node_sent += 1;
        }
        self.node_next_frame += Duration::from_micros(1_000_000 / FPS);
    }

    fn next_event(&self) -> Instant {
        let mut t = self.core.next_timeout(self.now);
        if let Some(Reverse((at, _))) = self.queue.peek() {
            t = t.min(*at);
        }
        for v in &self.viewers {
            t = t.min(v.timeout);
        }
        if self.node_next_frame < self.node_stop {
            t = t.min(self.node_next_frame);
        }
        if let Some(r) = self.link.poll_timeout() {
            t = t.min(r);
        }
        t.max(self.now)
    }

    fn run_until(&mut self, end: Instant) {
        while self.now < end {
            self.now = self.next_event().min(end);
            let now = self.now;
            // Network deliveries due now.
            while let Some(Reverse((at, id))) = self.queue.peek().copied() {
                if at > now {
                    break;
                }
                self.queue.pop();
                let packet = self.packets.remove(&id).unwrap();
                self.deliver(packet);
            }
            if self.node_next_frame <= now && now < self.node_stop {
                self.node_frame();
            }
            // The relay's link asks the node for what it lost, once for all viewers.
            if self.link.poll_timeout().is_some_and(|t| t <= now) {
                self.link.handle_timeout(now).unwrap();
                self.relay_transmit();
            }
            let mut out = Outbox::default();
            self.core.handle_timeout(now, &mut out);
            self.route(out);
            for i in 0..self.viewers.len() {
                if self.viewers[i].timeout <= now {
                    self.viewers[i].rtc.handle_input(Input::Timeout(now)).unwrap();
                }
                self.poll_viewer(i);
            }
        }
    }

    fn deliver(&mut self, packet: Packet) {
        let now = self.now;
        match packet {
            Packet::NodeDatagram(datagram) => match self.link.handle_datagram(now, &datagram) {
                Ok(media) => {
                    self.core.rtp(NODE_CONNECTION, &datagram[media.rtp_offset..], now, None, None);
                    let mut out = Outbox::default();
                    self.core.flush(now, &mut out);
                    self.route(out);
                }
                Err(MediaDrop::Duplicate) => {}
                Err(other) => panic!("the relay dropped a node datagram: {other:?}"),
            },
            Packet::ToNode(bytes) => {
                self.node.handle_control(now, &bytes).unwrap();
                while let Some(event) = self.node.poll_event() {
                    match event {
                        NodeEvent::KeyframeRequested => self.keyframe_requests += 1,
                        NodeEvent::Resent { sent, missed } => {
                            assert_eq!(missed, 0, "asked for a packet the node no longer holds");
                            self.node_nacks += u64::from(sent);
                        }
                        _ => {}
                    }
                }
                while let Some(resend) = self.node.poll_datagram() {
                    self.asked.insert(u64::from(u16::from_be_bytes([resend[4], resend[5]])));
                    self.node_send(resend);
                }
            }
            Packet::Udp { from, to, data } if to == relay_addr() => {
                let mut out = Outbox::default();
                self.core.receive(now, from, &data, &mut out);
                self.route(out);
            }
            Packet::Udp { from, to, data } => {
                let Some(i) = self.viewers.iter().position(|v| v.addr == to) else { return };
                let receive = Receive::new(Protocol::Udp, from, to, &data).unwrap();
                self.viewers[i].rtc.handle_input(Input::Receive(now, receive)).unwrap();
                self.poll_viewer(i);
            }
        }
    }

    fn poll_viewer(&mut self, i: usize) {
        loop {
            let v = &mut self.viewers[i];
            match v.rtc.poll_output().unwrap() {
                Output::Timeout(t) => {
                    v.timeout = t;
                    return;
                }
                Output::Transmit(t) => {
                    let (from, to, data) = (t.source, t.destination, t.contents.to_vec());
                    if let Some(at) = v.up.on_packet(self.now) {
                        self.schedule(at, Packet::Udp { from, to, data });
                    }
                }
                Output::Event(Event::Connected) => v.connected = true,
                Output::Event(Event::RtpPacket(p)) => {
                    if let Some(n) = p.payload.get(..8) {
                        let n = u64::from_be_bytes(n.try_into().unwrap());
                        v.received.entry(n).or_insert(self.now);
                    }
                }
                Output::Event(Event::MediaIngressStats(s)) => v.nacks_sent = v.nacks_sent.max(s.nacks),
                Output::Event(Event::ChannelOpen(..)) => v.channel_open = true,
                Output::Event(Event::ChannelData(d)) if d.binary => v.binary.push(d.data),
                Output::Event(Event::ChannelData(d)) => v.texts.push(String::from_utf8_lossy(&d.data).into_owned()),
                Output::Event(_) => {}
            }
        }
    }

    /// Runs until every viewer is connected, turns on the last hops' loss, streams, then
    /// lets repairs finish.
    fn run(&mut self) {
        let start = self.now;
        let stream = self.node_stop - self.node_next_frame;
        self.node_next_frame = start + Duration::from_secs(3600);
        while !self.viewers.iter().all(|v| v.connected) {
            let t = self.now + Duration::from_millis(10);
            self.run_until(t);
            assert!(self.now < start + Duration::from_secs(5), "viewers did not connect");
        }
        for v in &mut self.viewers {
            let jitter = Duration::from_millis(1);
            v.down = Impairment::new(v.seed, v.hop.loss, v.hop.delay, jitter, 0.0);
            v.up = Impairment::new(v.seed ^ 0x5555, v.hop.loss, v.hop.delay, jitter, 0.0);
        }
        self.node_next_frame = self.now + Duration::from_millis(200);
        self.node_stop = self.node_next_frame + stream;
        let end = self.node_stop + Duration::from_secs(2);
        self.run_until(end);
    }

    /// Node packets a viewer never got. The first and last frames are left out: a loss
    /// is seen from the packets around it, and a viewer has none before the stream's first
    /// packet or after its last (in a live stream the next frame is never more than a
    /// frame interval away, and a viewer starts at a keyframe it asks for).
    fn missing(&self, v: &Viewer) -> Vec<u64> {
        let tail = self.node_sent.saturating_sub(PACKETS_PER_FRAME);
        (PACKETS_PER_FRAME..tail).filter(|n| !v.received.contains_key(n)).collect()
    }

    fn viewer_nacks(&self) -> u64 {
        self.viewers.iter().map(|v| v.nacks_sent).sum()
    }
}

#[test]
fn every_packet_reaches_every_viewer_through_bursty_last_hops() {
    for (loss, seed) in [(0.01, 1), (0.05, 2), (0.10, 3)] {
        let hops = [Path::bursty(loss, 10), Path::bursty(loss, 20), Path::clean(5)];
        let mut sim = Sim::new(seed, Path::clean(15), &hops, 4);
        sim.run();
        assert!(sim.node_sent >= 4 * FPS * PACKETS_PER_FRAME);
        for (i, v) in sim.viewers.iter().enumerate() {
            let missing = sim.missing(v);
            assert!(missing.is_empty(), "{loss} loss: viewer {i} missed {} packets: {missing:?}", missing.len());
        }
        // Lossy hops were repaired by NACK + RTX from the relay's cache, not the node.
        assert!(sim.viewers[0].nacks_sent > 0 && sim.viewers[1].nacks_sent > 0, "{loss}: no NACKs?");
        assert_eq!(sim.viewers[2].nacks_sent, 0, "the clean hop needed no repair");
        assert_eq!(sim.node_nacks, 0, "{loss} loss: last-hop losses reached the node");
        eprintln!(
            "{:.0}% bursty last-hop loss: {} packets to each of 3 viewers, all delivered; {} viewer NACKs, 0 upstream",
            loss * 100.0,
            sim.node_sent,
            sim.viewer_nacks()
        );
    }
}

#[test]
fn upstream_losses_are_repaired_once_for_every_viewer() {
    for (loss, seed) in [(0.01, 11), (0.05, 12), (0.10, 13)] {
        let hops = [Path::clean(5), Path::clean(10), Path::clean(10), Path::clean(20)];
        let mut sim = Sim::new(seed, Path::bursty(loss, 15), &hops, 4);
        sim.run();
        let lost = sim.upstream_loss_events;
        assert!(lost > 0, "{loss}: the path lost nothing?");
        assert!(sim.asked.is_subset(&sim.upstream_lost), "asked for packets that were not lost");
        for (i, v) in sim.viewers.iter().enumerate() {
            let missing = sim.missing(v);
            assert!(missing.is_empty(), "{loss} upstream loss: viewer {i} missed {missing:?}");
        }
        // One request per lost packet (a retry only when the resend was lost too), however
        // many viewers there are, and only for packets that were lost.
        let stats = sim.link.repair_stats();
        assert_eq!(stats.given_up, 0);
        assert!(sim.node_nacks <= lost, "{} requests for {lost} losses", sim.node_nacks);
        eprintln!(
            "{:.0}% bursty upstream loss: {lost} losses on the path (resends included), {} asked again, {} repaired, 4 viewers complete",
            loss * 100.0,
            sim.node_nacks,
            stats.repaired
        );
    }
}

#[test]
fn a_nack_storm_from_one_viewer_does_not_amplify_upstream() {
    // The same upstream path (same seed), once with quiet viewers and once with one viewer
    // on a terrible last hop that NACKs all the time.
    let upstream = Path::bursty(0.03, 15);
    let mut quiet = Sim::new(21, upstream, &[Path::clean(5), Path::clean(10)], 4);
    quiet.run();
    let mut storm = Sim::new(21, upstream, &[Path::clean(5), Path::bursty(0.30, 10)], 4);
    storm.run();
    let storm_nacks = storm.viewers[1].nacks_sent;
    assert!(storm_nacks >= 100 && storm_nacks > storm.node_nacks, "not a storm: {storm_nacks} NACKs");
    assert_eq!(
        storm.node_nacks, quiet.node_nacks,
        "upstream requests must depend on upstream losses only, not on viewers' NACKs"
    );
    assert_eq!(storm.upstream_lost, quiet.upstream_lost);
    // The player on a clean hop is untouched by the storm.
    assert!(storm.missing(&storm.viewers[0]).is_empty());
    // Keyframe requests stay coalesced: at most one per interval over the run.
    let run = Duration::from_secs(4 + 2 + 1);
    let bound = run.as_millis() / pylon_relay::forward::KEYFRAME_REQUEST_INTERVAL.as_millis() + 1;
    assert!(u128::from(storm.keyframe_requests) <= bound, "{} keyframe requests", storm.keyframe_requests);
    // Per-stream counters saw the storm.
    let text = storm.metrics.render();
    assert!(text.contains("pylon_relay_stream_viewer_nacks_total{stream=\"connection-1\"}"), "{text}");
    eprintln!(
        "NACK storm: {storm_nacks} NACKs from one viewer at 30% loss; upstream requests {} (quiet run: {})",
        storm.node_nacks, quiet.node_nacks
    );
}

/// A str0m offer for one receive-only video m-line, as a browser's.
fn offer_sdp(now: Instant) -> String {
    let mut rtc = RtcConfig::new().set_rtp_mode(true).build(now);
    rtc.add_local_candidate(Candidate::host("10.0.9.9:5000".parse().unwrap(), "udp").unwrap());
    let mut change = rtc.sdp_api();
    change.add_media(MediaKind::Video, Direction::RecvOnly, None, None, None);
    change.apply().unwrap().0.to_sdp_string()
}

#[test]
fn a_capacity_answer_reaches_the_player_whole_and_a_node_cannot_flood_it() {
    use pylon_proto::capacity::{CHUNK_BYTES, digest, product_bytes};
    use pylon_proto::framing::CapacityReply;
    let mut sim = Sim::new(11, Path::clean(5), &[], 1);
    sim.add_player_with_channel(12);
    // A 512x512 product (class 2's challenge): 1 MiB, far over str0m's default buffer.
    let answer = |seq: u32, words: usize| {
        let bytes = product_bytes(&(0..words as u32).map(|w| w.wrapping_mul(2_654_435_761)).collect::<Vec<_>>());
        let mut replies = vec![CapacityReply::Commit { seq, digest: digest(&bytes), gpu_us: 1, wall_us: 2 }];
        replies.extend(bytes.chunks(CHUNK_BYTES).enumerate().map(|(i, c)| CapacityReply::Chunk {
            seq,
            offset: (i * CHUNK_BYTES) as u32,
            data: c.to_vec(),
        }));
        (bytes, replies)
    };
    let send = |sim: &mut Sim, replies: Vec<CapacityReply>| {
        let mut out = Outbox::default();
        for r in replies {
            sim.core.capacity(sim.now, NODE_CONNECTION, r, &mut out);
        }
        sim.route(out);
        let t = sim.now + Duration::from_secs(2);
        sim.run_until(t);
    };
    let (bytes, replies) = answer(1, 512 * 512);
    send(&mut sim, replies);
    let v = &sim.viewers[0];
    assert!(v.texts.iter().any(|t| t.contains(r#""type":"capacity","seq":1"#)), "{:?}", v.texts);
    let chunk = |m: &Vec<u8>| pylon_proto::capacity::parse_chunk_message(m).unwrap().2.to_vec();
    let got: Vec<u8> = v.binary.iter().flat_map(chunk).collect();
    assert_eq!(got.len(), bytes.len(), "the whole product arrived");
    assert_eq!(digest(&got), digest(&bytes), "in order");
    // A node that keeps sending: the relay passes at most CAPACITY_BUDGET to the viewer.
    for seq in 2..8 {
        let (_, replies) = answer(seq, 1024 * 1024);
        send(&mut sim, replies);
    }
    let passed: usize = sim.viewers[0].binary.iter().map(|m| chunk(m).len()).sum();
    assert!(passed <= pylon_relay::forward::CAPACITY_BUDGET, "{passed} bytes passed");
    let m = sim.metrics.render();
    assert!(m.contains(r#"pylon_relay_capacity_dropped_total{reason="over_budget"}"#), "{m}");
    assert!(!m.contains(r#"reason="channel_full""#), "nothing refused for want of buffer: {m}");
}

#[test]
fn the_page_hears_when_its_node_goes_away_and_when_it_comes_back() {
    let mut sim = Sim::new(13, Path::clean(5), &[], 3);
    sim.add_player_with_channel(14);
    let told = |sim: &Sim, what: &str| sim.viewers[0].texts.iter().filter(|t| t.contains(what)).count();
    assert_eq!(told(&sim, r#""type":"node""#), 0, "nothing to say while the node streams");
    // The node's link drops: the page hears it at once (not at the viewer's next timer).
    let now = sim.now;
    sim.core.stream_ended(now, NODE_CONNECTION);
    let t = sim.now + Duration::from_millis(50);
    sim.run_until(t);
    assert_eq!(told(&sim, r#"{"type":"node","state":"lost"}"#), 1, "{:?}", sim.viewers[0].texts);
    // It reconnects: the viewer moves to its new stream and the page hears it is back.
    let hello = sim_hello();
    let now = sim.now;
    sim.core.stream_started(now, NODE_CONNECTION, hello);
    let t = sim.now + Duration::from_millis(50);
    sim.run_until(t);
    assert_eq!(told(&sim, r#"{"type":"node","state":"back"}"#), 1, "{:?}", sim.viewers[0].texts);
    assert_eq!(told(&sim, r#""type":"node""#), 2, "told once each");
}

#[test]
fn a_viewer_whose_ice_never_completes_is_dropped_after_the_deadline() {
    let t0 = Instant::now();
    let metrics = RelayMetrics::new();
    let mut core = Core::new(relay_addr(), metrics.clone());
    let (id, _, _) = core.offer(t0, &offer_sdp(t0), false, None).unwrap();
    let mut out = Outbox::default();
    core.handle_timeout(t0 + Duration::from_secs(10), &mut out);
    assert!(core.poll_closed_viewers().is_empty(), "dropped before the deadline");
    let deadline = t0 + pylon_relay::forward::ICE_DEADLINE;
    let mut now = t0 + Duration::from_secs(10);
    while now <= deadline + Duration::from_secs(1) {
        core.handle_timeout(now, &mut out);
        now += Duration::from_millis(100);
    }
    assert_eq!(core.poll_closed_viewers(), vec![(id, None)]);
    assert!(metrics.render().contains("pylon_relay_viewers_timed_out_total 1"));
}

#[test]
fn one_session_holds_a_bounded_number_of_viewers() {
    let t0 = Instant::now();
    let mut core = Core::new(relay_addr(), RelayMetrics::new());
    let admission = |session: &str| {
        Some((
            pylon_relay::pool::Admission { session: session.into(), player: false, node: "node-a".into() },
            "token".to_string(),
        ))
    };
    let cap = pylon_relay::forward::MAX_VIEWERS_PER_SESSION;
    for i in 0..cap {
        assert!(core.offer(t0, &offer_sdp(t0), false, admission("s1")).is_ok(), "viewer {i}");
    }
    let refused = core.offer(t0, &offer_sdp(t0), false, admission("s1")).unwrap_err();
    assert!(refused.contains("already has"), "{refused}");
    assert!(core.offer(t0, &offer_sdp(t0), false, admission("s2")).is_ok(), "another session is not affected");
}
