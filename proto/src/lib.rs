//! Pylon's wire formats, with no I/O.
//!
//! * [`rtp`]: RTP fixed-header parsing and writing (RFC 3550).
//! * [`h264`]: H.264 Annex B splitting and RTP packetization, mode 1 (RFC 6184).
//! * [`input`]: the player input format (keyboard, mouse, gamepad, touch).
//! * [`token`]: ed25519-signed session tokens, verified offline.
//! * [`framing`]: how RTP travels in QUIC datagrams from render node to relay, and the
//!   length-prefixed control messages on the QUIC control stream.
//! * [`link`]: the node ↔ relay link as two sans-IO state machines (handshake with the
//!   node's proof of identity, sessions, keyframes, repair, bitrate).
//! * [`repair`]: the node's retransmit cache and the relay's upstream gap detector,
//!   sans-IO, driven by an explicit `now`.
//! * [`capture`]: the messages between a title's Vulkan present layer and the node
//!   (exported image rings, frames, releases).
//! * [`capacity`]: the proof-of-capacity challenge (matrices from a seed) and its
//!   Freivalds verification.
//! * [`impair`]: a seeded lossy-path model (random and Gilbert–Elliott loss, delay,
//!   jitter, reordering) for simulated-clock tests and the impairment proxy.
//!
//! Everything here takes bytes and returns values or errors: a malformed input is an
//! error, never a panic (see the length-sweep tests in each module).
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing))]

pub mod capacity;
pub mod capture;
pub mod framing;
pub mod h264;
pub mod impair;
pub mod input;
pub mod link;
pub mod repair;
pub mod rtp;
pub mod token;

/// The RTP clock rate of video, in Hz (RFC 6184 §8.2.1).
pub const VIDEO_CLOCK_RATE: u32 = 90_000;
