//! The Pylon indexer: the control plane that turns render nodes and relays that come and
//! go into one service.
//!
//! * [`selector`]: matching a player to the relay and render node that minimise expected
//!   click-to-photon, I/O-free and unit-tested on synthetic topologies.
//! * [`store`]: SQLite (default) or PostgreSQL through sqlx, one set of migrations.
//! * [`api`]: the REST API under `/api/v1` (axum), its OpenAPI document, `/metrics`.
//! * [`limit`]: per-address and per-title rate limits, sans-IO.
//! * [`web`]: the catalog page players start from (`/`, `/play/<title>`).
//! * [`keys`]: the indexer's token-signing key, created once in the data directory (the
//!   same code as nodes' and relays' identities, from `pylon-indexer-client`).
//!
//! Session tokens are minted with `pylon_proto::token` (the format lives in `proto`
//! because relays and nodes verify it too).
//!
//! **Invariant:** the indexer never touches media.

pub mod api;
mod run;
pub use pylon_indexer_client::keys;
pub use run::{IndexerConfig, run};
pub mod limit;
pub mod selector;
pub mod store;
pub mod web;
