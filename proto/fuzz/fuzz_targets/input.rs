#![no_main]
//! Any byte string is either a valid input message that re-encodes identically, or an error.

use libfuzzer_sys::fuzz_target;
use pylon_proto::input::{InputMessage, peek_header};

fuzz_target!(|data: &[u8]| {
    let _ = peek_header(data);
    if let Ok(msg) = InputMessage::decode(data) {
        let mut out = Vec::new();
        msg.encode(&mut out);
        assert_eq!(InputMessage::decode(&out).ok(), Some(msg));
    }
});
