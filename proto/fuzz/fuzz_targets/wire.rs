#![no_main]
//! Framing, RTP and H.264 parsers never panic on any input.

use libfuzzer_sys::fuzz_target;
use pylon_proto::{framing, h264, rtp};

fuzz_target!(|data: &[u8]| {
    let _ = framing::decode_datagram(data);
    let _ = framing::ControlMessage::decode(data);
    if let Ok(p) = rtp::RtpPacket::parse(data) {
        let mut d = h264::H264Depacketizer::default();
        let _ = d.push(p.payload);
    }
    let mut packetizer = h264::H264Packetizer::new(200, 96, 1, 0);
    packetizer.packetize(data, 0, |_| {});
});
