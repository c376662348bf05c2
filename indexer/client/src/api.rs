//! The request and reply bodies of the indexer's REST API under `/api/v1`.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::ToSchema;

/// What an id (node, relay, title, provider-chosen) may look like: 1–64 ASCII letters,
/// digits, `.`, `_`, `:` or `-`.
pub const ID_PATTERN: &str = "^[A-Za-z0-9._:-]{1,64}$";

/// Whether `id` matches [`ID_PATTERN`].
pub fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
}

/// The indexer's public key, which relays and nodes verify session tokens with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PublicKey {
    /// Base64 ed25519 public key.
    pub public_key: String,
}

/// A node's registration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RegisterNode {
    /// Node id (stable across restarts).
    #[schema(pattern = "^[A-Za-z0-9._:-]{1,64}$")]
    pub id: String,
    /// Provider account.
    pub provider: String,
    /// Base64 ed25519 public key; later requests are signed with its private half.
    #[schema(pattern = "^[A-Za-z0-9+/]{43}=$")]
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
    #[schema(minimum = 1)]
    pub capacity: u32,
    /// Region name.
    pub region: String,
    /// Latitude.
    pub lat: f64,
    /// Longitude.
    pub lon: f64,
    /// Price per GPU-hour.
    #[schema(minimum = 0)]
    pub price_per_hour: f64,
    /// GPU class.
    pub gpu_class: u8,
    /// Titles installed and ready.
    pub titles: Vec<String>,
}

/// A node's heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RegisterRelay {
    /// Relay id.
    #[schema(pattern = "^[A-Za-z0-9._:-]{1,64}$")]
    pub id: String,
    /// Owner account.
    pub owner: String,
    /// Base64 ed25519 public key.
    #[schema(pattern = "^[A-Za-z0-9+/]{43}=$")]
    pub public_key: String,
    /// Where browsers reach it.
    #[schema(pattern = "^https?://")]
    pub public_url: String,
    /// Where nodes reach it over QUIC.
    pub quic_addr: String,
    /// Region name.
    pub region: String,
    /// Viewers it can serve.
    #[schema(minimum = 1)]
    pub capacity: u32,
}

/// A relay's heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NodeKeyInfo {
    /// Node id.
    pub id: String,
    /// Base64 ed25519 public key.
    pub public_key: String,
    /// `ready`, `draining`, `gone`, `revoked` or `pending` (awaiting approval).
    pub state: String,
}

/// A relay the client should measure its RTT to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Candidate {
    /// Relay id.
    pub relay: String,
    /// Its public URL (ping `{url}/healthz`).
    pub url: String,
    /// Region.
    pub region: String,
}

/// Who a session token is for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SessionRole {
    /// Plays: input is carried to the game.
    #[default]
    Player,
    /// Watches: never carries input.
    Spectator,
}

/// A player's session request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
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
    pub role: Option<SessionRole>,
}

/// A created session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
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
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RelayHeartbeatReply {
    /// Sessions on this relay that ended recently: their tokens must not be used again.
    pub ended_sessions: Vec<String>,
    /// Nodes revoked: the relay closes their connections.
    pub revoked_nodes: Vec<String>,
}

/// Why a session ended.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EndSession {
    /// For example `player left`, `node drained`.
    #[serde(default)]
    pub reason: String,
}

/// Why the indexer refused a request: a stable, machine-readable code beside the
/// human-readable message of [`ErrorBody`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorReason {
    /// The body or a query parameter does not parse (400).
    Malformed,
    /// It parses but a value is out of range or inconsistent (400).
    Invalid,
    /// A signed request lacks `x-pylon-timestamp`, `x-pylon-nonce` or `x-pylon-signature` (401).
    Unsigned,
    /// The signature does not verify with the registered key (401).
    BadSignature,
    /// The request's timestamp is too far from the indexer's clock (401).
    Stale,
    /// The request's nonce is not newer than the last one this key signed (401).
    Replayed,
    /// An administrative call without the admin token (401).
    NotAdmin,
    /// The caller is neither a party allowed to make this call nor an admin (401).
    NotAllowed,
    /// The node or relay is revoked (403).
    Revoked,
    /// The id is registered with another key (409).
    KeyConflict,
    /// No such title, node, relay or (running) session (404).
    NotFound,
    /// Too many requests from this address or for this title; see `Retry-After` (429).
    RateLimited,
    /// No ready node with the title and a free seat, or no healthy relay; see `Retry-After` (503).
    NoCapacity,
    /// The matched node filled up before the seat was booked; retry at once (503).
    SeatTaken,
    /// The indexer failed; the detail is in its log (500).
    Internal,
}

/// Every error answer's body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong, for people.
    pub error: String,
    /// What went wrong, for programs.
    pub reason: ErrorReason,
    /// For 429 and 503: seconds to wait before retrying (also in `Retry-After`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_secs: Option<u64>,
}
