//! The request and reply bodies of the indexer's REST API under `/api/v1`.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::ToSchema;

/// The indexer's public key, which relays and nodes verify session tokens with.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PublicKey {
    /// Base64 ed25519 public key.
    pub public_key: String,
}

/// A node's registration.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RegisterNode {
    /// Node id (stable across restarts).
    pub id: String,
    /// Provider account.
    pub provider: String,
    /// Base64 ed25519 public key; later requests are signed with its private half.
    pub public_key: String,
    /// GPU model.
    pub gpu_model: String,
    /// GPU memory, MiB.
    pub gpu_memory_mb: u64,
    /// Vulkan device name.
    pub vulkan_device: String,
    /// Encoders that opened when probed (`h264_nvenc`, `libx264`…).
    pub encoders: Vec<String>,
    /// Sessions it can run.
    pub capacity: u32,
    /// Region name.
    pub region: String,
    /// Latitude.
    pub lat: f64,
    /// Longitude.
    pub lon: f64,
    /// Price per GPU-hour.
    pub price_per_hour: f64,
    /// GPU class.
    pub gpu_class: u8,
    /// Titles installed and ready.
    pub titles: Vec<String>,
}

/// A node's heartbeat.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct NodeHeartbeat {
    /// Sessions running.
    pub sessions: u32,
    /// Ids of the sessions running (hex); a session the node no longer runs is ended.
    #[serde(default)]
    pub running: Vec<String>,
    /// Titles installed and ready.
    pub titles: Vec<String>,
}

/// A relay's registration.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RegisterRelay {
    /// Relay id.
    pub id: String,
    /// Owner account.
    pub owner: String,
    /// Base64 ed25519 public key.
    pub public_key: String,
    /// Where browsers reach it.
    pub public_url: String,
    /// Where nodes reach it over QUIC.
    pub quic_addr: String,
    /// Region name.
    pub region: String,
    /// Viewers it can serve.
    pub capacity: u32,
}

/// A relay's heartbeat.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RelayHeartbeat {
    /// Viewers now.
    pub viewers: u32,
    /// RTT measured to each node, ms.
    pub node_rtt_ms: BTreeMap<String, f64>,
    /// Sessions whose player is connected to this relay now (metering follows this).
    #[serde(default)]
    pub players: Vec<String>,
}

/// What anyone may know of a node: its key and state (relays check a connecting node's
/// key against it).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct NodeKeyInfo {
    /// Node id.
    pub id: String,
    /// Base64 ed25519 public key.
    pub public_key: String,
    /// `ready`, `draining`, `gone`, `revoked` or `pending` (awaiting approval).
    pub state: String,
}

/// A relay the client should measure its RTT to.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Candidate {
    /// Relay id.
    pub relay: String,
    /// Its public URL (ping `{url}/healthz`).
    pub url: String,
    /// Region.
    pub region: String,
}

/// A player's session request.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CreateSession {
    /// Title id.
    pub title: String,
    /// RTT the client measured to each candidate relay, ms.
    pub client_rtt_ms: BTreeMap<String, f64>,
    /// Highest price per GPU-hour accepted.
    #[serde(default)]
    pub max_price_per_hour: Option<f64>,
    /// `player` (default) or `spectator`.
    #[serde(default)]
    pub role: Option<String>,
}

/// A created session.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SessionCreated {
    /// Session id.
    pub session: String,
    /// Signed token for the relay and node.
    pub token: String,
    /// Relay id.
    pub relay: String,
    /// Where to play.
    pub relay_url: String,
    /// Node id.
    pub node: String,
    /// Expected path latency, ms.
    pub expected_ms: f64,
    /// Why this pair won.
    pub reason: String,
}

/// The indexer's answer to a relay's heartbeat.
#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
pub struct RelayHeartbeatReply {
    /// Sessions on this relay that ended recently: their tokens must not be used again.
    pub ended_sessions: Vec<String>,
    /// Nodes revoked: the relay closes their connections.
    pub revoked_nodes: Vec<String>,
}

/// Why a session ended.
#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
pub struct EndSession {
    /// For example `player left`, `node drained`.
    #[serde(default)]
    pub reason: String,
}
