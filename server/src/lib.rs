//! The Pylon render node: renders a title with Vulkan, converts to NV12 on the GPU,
//! encodes H.264 with FFmpeg, and streams RTP over QUIC datagrams to an edge relay.
//!
//! * [`scene`]: the built-in demo title (I/O-free, driven by an explicit time).
//! * [`encode`]: the FFmpeg encoder, probing NVENC before libx264.
//! * [`pipeline`]: the frame path threads: paced render → readback → encode → packetize.
//! * [`uplink`]: the QUIC connection to the relay, reconnecting with backoff.
//! * [`pool`]: registration and heartbeats to the indexer, draining, and the session
//!   gate that admits a player only with a token the node verifies itself.
//! * [`titles`]: studio titles — which the node can run, and a sandbox per session
//!   (`pylon-title`) whose screen the frame path captures and whose input it injects.
//! * [`metrics`]: Prometheus metrics and the `/metrics` endpoint.
//! * [`capacity`]: answers to checkers' proof-of-capacity challenges, on the node's GPU.

pub mod audio;
pub mod capacity;
pub mod capture;
pub mod encode;
pub mod metrics;
pub mod pipeline;
pub mod pool;
pub mod scene;
pub mod titles;
pub mod uplink;
