#![no_main]
//! The link's state machines, on both ends, never panic whatever a peer sends: the input
//! is cut into control-stream chunks, datagrams and timer steps, fed to a relay side
//! (before and after admission) and to a node side (before and after the welcome).

use libfuzzer_sys::fuzz_target;
use pylon_proto::link::{NodeConfig, NodeSide, PlayerGate, RelaySide, ToNode};
use pylon_proto::framing::{RelayMessage, StreamHello};
use pylon_proto::repair::RepairConfig;
use std::time::{Duration, Instant};

fn stream() -> StreamHello {
    StreamHello { width: 64, height: 64, fps: 30, profile_level_id: 0x42e01f, encoder: "f".into(), node: "n".into() }
}

fuzz_target!(|data: &[u8]| {
    let t0 = Instant::now();
    let exporter = [3u8; 32];
    let mut relay = RelaySide::new("r", &exporter, RepairConfig::default(), t0);
    let mut admitted = RelaySide::new("r", &exporter, RepairConfig::default(), t0);
    let config = NodeConfig { stream: stream(), identity: None, bitrate_bounds: Some((1, 10)) };
    let mut node = NodeSide::new(config.clone(), PlayerGate::pooled("n"), &exporter, t0, 1_000);
    // A properly admitted pair, then hostile bytes on both.
    let hello = node.poll_transmit().unwrap_or_default();
    let _ = admitted.handle_control(t0, &hello);
    while admitted.poll_event().is_some() {}
    admitted.admit(t0);
    let mut welcomed = NodeSide::new(config, PlayerGate::pooled("n"), &exporter, t0, 1_000);
    let _ = welcomed.handle_control(t0, &admitted.poll_transmit().unwrap_or_default());
    let mut now = t0;
    for chunk in data.chunks(97) {
        let (op, bytes) = chunk.split_first().map_or((0, &[][..]), |(o, b)| (*o, b));
        now += Duration::from_millis(u64::from(op & 0x0f));
        match op >> 6 {
            0 => {
                let _ = relay.handle_control(now, bytes);
                let _ = admitted.handle_control(now, bytes);
                let _ = node.handle_control(now, bytes);
                let _ = welcomed.handle_control(now, bytes);
            }
            1 => {
                let _ = relay.handle_datagram(now, bytes);
                let _ = admitted.handle_datagram(now, bytes);
                node.handle_datagram(now, bytes);
                welcomed.handle_datagram(now, bytes);
            }
            2 => {
                let _ = admitted.handle_timeout(now);
                let _ = relay.handle_timeout(now);
                let _ = node.handle_timeout(now);
                let _ = welcomed.handle_timeout(now);
            }
            _ => {
                let _ = admitted.send(ToNode::Control(RelayMessage::Input(bytes.to_vec())));
                let _ = admitted.send(ToNode::InputDatagram(bytes.to_vec()));
                let mut out = Vec::new();
                let _ = welcomed.send_rtp(now, bytes, None, &mut out);
            }
        }
        while relay.poll_event().is_some() || admitted.poll_event().is_some() {}
        while node.poll_event().is_some() || welcomed.poll_event().is_some() {}
        let _ = (admitted.poll_transmit(), welcomed.poll_transmit(), admitted.poll_datagram(), welcomed.poll_datagram());
    }
});
