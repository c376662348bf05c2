#![no_main]
//! Framing, RTP and H.264 parsers never panic on any input.

use libfuzzer_sys::fuzz_target;
use pylon_proto::framing::{self, NodeMessage, RelayMessage, WireMessage};
use pylon_proto::{h264, rtp};

fuzz_target!(|data: &[u8]| {
    let _ = framing::decode_datagram(data);
    let _ = framing::decode_media_datagram(data);
    // Whatever decodes re-encodes to the same message.
    if let Ok(Some((m, _))) = NodeMessage::decode(data) {
        let mut wire = Vec::new();
        m.encode(&mut wire);
        assert_eq!(NodeMessage::decode(&wire).ok().flatten().map(|(m, _)| m), Some(m));
    }
    if let Ok(Some((m, _))) = RelayMessage::decode(data) {
        let mut wire = Vec::new();
        m.encode(&mut wire);
        assert_eq!(RelayMessage::decode(&wire).ok().flatten().map(|(m, _)| m), Some(m));
    }
    if let Ok(p) = rtp::RtpPacket::parse(data) {
        let mut d = h264::H264Depacketizer::default();
        let _ = d.push(p.payload);
    }
    let mut packetizer = h264::H264Packetizer::new(200, 96, 1, 0);
    packetizer.packetize(data, 0, |_| {});
});
