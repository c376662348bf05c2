//! The Pylon indexer: the control plane that turns render nodes and relays that come and
//! go into one service.
//!
//! * [`selector`]: matching a player to the relay and render node that minimise expected
//!   click-to-photon, I/O-free and unit-tested on synthetic topologies.
//!
//! Session tokens are minted with `pylon_proto::token` (the format lives in `proto`
//! because relays and nodes verify it too).

pub mod selector;
