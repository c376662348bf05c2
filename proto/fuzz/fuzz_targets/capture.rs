#![no_main]
//! Any byte string from a title's layer (or the node) is either a valid capture message
//! that re-encodes identically, or an error.

use libfuzzer_sys::fuzz_target;
use pylon_proto::capture::{LayerMessage, NodeMessage};

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = LayerMessage::decode(data) {
        assert_eq!(msg.encode(), data);
    }
    if let Ok(msg) = NodeMessage::decode(data) {
        assert_eq!(msg.encode(), data);
    }
});
