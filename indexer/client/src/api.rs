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

/// The replicas serving this indexer: their public base URLs, in the order clients try
/// them (the catalog page fails over through them when the replica that served it is gone).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Replicas {
    /// Base URLs (`https://indexer-1.example`), this replica's among them; empty when the
    /// operator named none (one replica, or one address in front of all).
    pub replicas: Vec<String>,
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

/// The indexer's answer to a node's heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NodeHeartbeatReply {
    /// The relays this node's open sessions were matched to: the node links to each (as the
    /// indexer's signed relay listing describes it), whether or not it was linked before.
    #[serde(default)]
    pub relays: Vec<String>,
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
    /// SHA-256 of its QUIC certificate (DER), 64 lowercase hex digits: render nodes of the
    /// pool trust the relay by it, with no certificate file to copy.
    #[serde(default)]
    #[schema(pattern = "^([0-9a-f]{64})?$")]
    pub cert_sha256: String,
}

/// What a render node reads of a relay in the indexer's listing (`GET /api/v1/relays`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RelayEntry {
    /// Relay id.
    pub id: String,
    /// Its state (`ready`, `gone`, `revoked`, `pending`…).
    pub state: String,
    /// Where nodes reach it over QUIC (`host:port`).
    #[serde(default)]
    pub quic_addr: String,
    /// Its ed25519 public key (base64), which signs its requests and pulls.
    #[serde(default)]
    pub public_key: String,
    /// SHA-256 of its QUIC certificate (hex; empty if it registered none).
    #[serde(default)]
    pub cert_sha256: String,
    /// Its region (as it registered; not part of the attestation: it only orders).
    #[serde(default)]
    pub region: String,
    /// The indexer's signature over the above but the region ([`relay_attestation`]), base64.
    #[serde(default)]
    pub attestation: String,
}

impl RelayEntry {
    /// Whether the indexer whose token key is `indexer` vouches for this entry's QUIC
    /// address, certificate and key (its [`attestation`](Self::attestation) verifies):
    /// what a node dials and pins, or a relay pulls from, comes from the indexer itself,
    /// not from whoever sits between.
    pub fn attested_by(&self, indexer: &ed25519_dalek::VerifyingKey) -> bool {
        use base64::Engine;
        let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(&self.attestation) else { return false };
        let Ok(signature) = ed25519_dalek::Signature::from_slice(&bytes) else { return false };
        let message = relay_attestation(&self.id, &self.quic_addr, &self.cert_sha256, &self.public_key);
        indexer.verify_strict(&message, &signature).is_ok()
    }
}

/// What the indexer signs of each relay it lists (`attestation`): its id, QUIC address,
/// certificate digest and key, each length-prefixed after a domain tag.
pub fn relay_attestation(id: &str, quic_addr: &str, cert_sha256: &str, public_key: &str) -> Vec<u8> {
    let mut message = b"pylon relay attestation v1".to_vec();
    for field in [id, quic_addr, cert_sha256, public_key] {
        message.extend_from_slice(&(field.len() as u32).to_be_bytes());
        message.extend_from_slice(field.as_bytes());
    }
    message
}

/// The indexer's `attestation` of a relay it lists: its signature over
/// [`relay_attestation`], base64.
pub fn attest_relay(
    indexer: &ed25519_dalek::SigningKey,
    id: &str,
    quic_addr: &str,
    cert_sha256: &str,
    public_key: &str,
) -> String {
    use base64::Engine;
    use ed25519_dalek::Signer;
    let signature = indexer.sign(&relay_attestation(id, quic_addr, cert_sha256, public_key));
    base64::engine::general_purpose::STANDARD.encode(signature.to_bytes())
}

/// SHA-256 of a DER certificate as the API carries it (lowercase hex): what a relay
/// registers as `cert_sha256` and render nodes pin.
pub fn cert_sha256(der: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(der))
}

/// Whether `text` is a SHA-256 digest as the API carries it: 64 lowercase hex digits.
pub fn valid_sha256(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
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

/// A request to move a running session to another relay (`POST
/// /api/v1/sessions/{id}/move`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MoveSession {
    /// The token the caller plays (or watches) the session with.
    pub token: String,
    /// RTT the client measured to candidate relays, ms (optional): the session moves to
    /// the nearest, counting the relay's RTT to the node too; a relay not measured counts
    /// as far as the farthest measured.
    #[serde(default)]
    pub client_rtt_ms: BTreeMap<String, f64>,
}

/// Where a session runs (`GET /api/v1/sessions/{id}`): public to whoever knows its id (a
/// watch link), so a relay near a spectator finds the relay to pull its stream from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SessionInfo {
    /// Session id.
    pub session: String,
    /// The relay its player is on.
    pub relay: String,
    /// Its render node.
    pub node: String,
    /// Its title.
    pub title: String,
    /// Whether it still runs.
    pub running: bool,
}

/// A spectator's request for a token (`POST /api/v1/sessions/{id}/spectate`, body
/// optional).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Spectate {
    /// RTT the spectator measured to candidate relays, ms: it watches through the nearest
    /// (which pulls the stream from the player's relay when it is another).
    #[serde(default)]
    pub client_rtt_ms: BTreeMap<String, f64>,
}

/// The indexer's answer to a relay's heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RelayHeartbeatReply {
    /// Sessions on this relay that ended recently: their tokens must not be used again,
    /// and viewers still connected to them are closed.
    pub ended_sessions: Vec<String>,
    /// Why those sessions ended, where known (`player left`, `node gone`…), for their
    /// viewers' pages.
    #[serde(default)]
    pub ended_reasons: BTreeMap<String, String>,
    /// Nodes revoked: the relay closes their connections.
    pub revoked_nodes: Vec<String>,
}

/// Why a session ended.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EndSession {
    /// For example `player left`, `node drained`.
    #[serde(default)]
    pub reason: String,
    /// The relay reporting the end (its id), if a relay: one the session has moved away
    /// from is answered 409 instead of 401.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub relay: String,
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
    /// The node, relay or checker is revoked (403).
    Revoked,
    /// The checker waits for the operator's approval (403).
    Pending,
    /// The check was already reported, or its time to report is over (409).
    Closed,
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
    /// The session's render node stopped answering: the game is lost (410).
    NodeGone,
    /// The session moved on with a newer token than the one given (409).
    Superseded,
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

/// What a player may use in a title.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum InputKind {
    /// Keys, by `KeyboardEvent.code`.
    Keyboard,
    /// Pointer, buttons and wheel (relative motion under pointer lock).
    Mouse,
    /// Xbox-style gamepads.
    Gamepad,
    /// Touch, delivered as the pointer.
    Touch,
}

/// How a title is launched: the node's built-in demo.
pub const LAUNCH_BUILTIN_DEMO: &str = "builtin:demo";
/// How a title is launched: `command` runs in a session sandbox (its own X server).
pub const LAUNCH_EXEC: &str = "exec";
/// Environment variables the node sets for every title; a spec may not override them.
pub const RESERVED_ENV: &[&str] =
    &["DISPLAY", "HOME", "XDG_RUNTIME_DIR", "LD_PRELOAD", "LD_LIBRARY_PATH", "PULSE_SERVER", "VK_INSTANCE_LAYERS"];

fn all_inputs() -> Vec<InputKind> {
    vec![InputKind::Keyboard, InputKind::Mouse, InputKind::Gamepad, InputKind::Touch]
}

/// A title in the catalog: what players see, and the launch spec a node runs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct Title {
    /// Stable id (`demo`).
    #[schema(pattern = "^[A-Za-z0-9._:-]{1,64}$")]
    pub id: String,
    /// Display name.
    #[schema(min_length = 1, max_length = 128)]
    pub name: String,
    /// One paragraph for the catalog.
    #[schema(max_length = 4096)]
    pub description: String,
    /// `builtin:demo` (the node's own demo) or `exec` (`command` runs in a sandbox per
    /// session: its own X server, home and runtime directory, process group).
    #[schema(pattern = "^(builtin:demo|exec)$")]
    pub launch: String,
    /// For `exec`: the program, an absolute path or a name looked up on the node's `PATH`.
    /// A node offers the title only when it finds it.
    #[serde(default)]
    #[schema(max_length = 4096)]
    pub command: String,
    /// Its arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Working directory (default: the session's home).
    #[serde(default)]
    #[schema(max_length = 4096)]
    pub workdir: String,
    /// Extra environment (names `[A-Za-z_][A-Za-z0-9_]*`; the sandbox's own, such as
    /// `DISPLAY` and `HOME`, cannot be overridden).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// It needs a GPU (Vulkan or OpenGL beyond a CPU renderer).
    #[serde(default)]
    pub needs_gpu: bool,
    /// The input it reads.
    #[serde(default = "all_inputs")]
    pub input_kinds: Vec<InputKind>,
    /// Minimum GPU class.
    #[schema(minimum = 0, maximum = 255)]
    pub min_gpu_class: i64,
    /// Width it runs at.
    #[schema(minimum = 16, maximum = 7680)]
    pub width: i64,
    /// Height it runs at.
    #[schema(minimum = 16, maximum = 4320)]
    pub height: i64,
    /// Frame rate it runs at.
    #[schema(minimum = 1, maximum = 240)]
    pub fps: i64,
    /// How a checker proves that the title answers input (see [`Probe`]); without one, its
    /// checks judge the stream's liveness and the node's capacity only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<Probe>,
}

/// The studio's answer to "what visibly moves when a player presses what": two keys that
/// move something on screen in opposite directions (a ship, a cursor, the camera), held for
/// `hold_ms` each. A checker presses them in pairs of random order at random times, with
/// sham intervals between, and the title passes when the picture moves one way for one
/// key and the other way for the other far more consistently than chance allows
/// (`pylon_checker::probe`). A recording, a frozen picture or a game that never gets the
/// input cannot tell which key was pressed, however much it animates.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct Probe {
    /// Keys pressed once, in order, before the trials (`KeyboardEvent.code`; e.g. `Enter`
    /// to leave a title's menu for play). At most 8.
    #[serde(default)]
    #[schema(max_items = 8)]
    pub setup: Vec<String>,
    /// The two opposite keys (`KeyboardEvent.code`), e.g. `["ArrowLeft", "ArrowRight"]`.
    #[schema(min_items = 2, max_items = 2)]
    pub keys: [String; 2],
    /// How long each press is held, ms (50-2000).
    #[schema(minimum = 50, maximum = 2000)]
    pub hold_ms: u32,
}

impl Probe {
    /// Why this probe cannot be used, if it cannot.
    pub fn validate(&self) -> Result<(), &'static str> {
        let known = |k: &String| pylon_proto::input::key_index(k).is_some();
        if self.setup.len() > 8 || !self.setup.iter().all(known) || !self.keys.iter().all(known) {
            return Err(
                "a probe's keys are at most 8 setup keys and two keys, each a KeyboardEvent.code the player's input carries",
            );
        }
        if self.keys[0] == self.keys[1] {
            return Err("a probe's two keys differ");
        }
        if !(50..=2000).contains(&self.hold_ms) {
            return Err("a probe holds each key 50-2000 ms");
        }
        Ok(())
    }
}

impl Default for Title {
    fn default() -> Self {
        Self {
            id: String::new(),
            name: String::new(),
            description: String::new(),
            launch: LAUNCH_BUILTIN_DEMO.into(),
            command: String::new(),
            args: Vec::new(),
            workdir: String::new(),
            env: BTreeMap::new(),
            needs_gpu: false,
            input_kinds: all_inputs(),
            min_gpu_class: 0,
            width: 1280,
            height: 720,
            fps: 60,
            probe: None,
        }
    }
}

impl Title {
    /// The node's built-in demo, `demo`: Pylon Asteroids at 1280x720, 60 fps.
    pub fn builtin_demo() -> Self {
        Self {
            id: "demo".into(),
            name: "Pylon Asteroids".into(),
            description: "Fly a ship through a drifting asteroid field and shoot for points.".into(),
            ..Self::default()
        }
    }

    /// Why this title cannot be stored, if it cannot.
    pub fn validate(&self) -> Result<(), &'static str> {
        if !valid_id(&self.id) {
            return Err("a title id is 1-64 letters, digits or ._:-");
        }
        if self.name.is_empty() || self.name.chars().count() > 128 {
            return Err("a title needs a name of 1-128 characters");
        }
        let long = |s: &str| s.chars().count() > 4096;
        if long(&self.description) || long(&self.command) || long(&self.workdir) {
            return Err("description, command and workdir are at most 4096 characters");
        }
        match self.launch.as_str() {
            LAUNCH_BUILTIN_DEMO => {}
            LAUNCH_EXEC if self.command.trim().is_empty() => return Err("an exec title needs a command"),
            LAUNCH_EXEC => {}
            _ => return Err("launch is builtin:demo or exec"),
        }
        if self.args.len() > 64 || self.args.iter().any(|a| long(a)) {
            return Err("at most 64 arguments of at most 4096 characters");
        }
        if self.env.len() > 64 || self.env.values().any(|v| long(v)) {
            return Err("at most 64 environment variables of at most 4096 characters");
        }
        let name_ok = |k: &str| {
            k.bytes().next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
                && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                && k.len() <= 128
        };
        if !self.env.keys().all(|k| name_ok(k)) {
            return Err("environment names are [A-Za-z_][A-Za-z0-9_]*");
        }
        if self.env.keys().any(|k| RESERVED_ENV.contains(&k.as_str())) {
            return Err("the sandbox sets DISPLAY, HOME, XDG_RUNTIME_DIR, LD_PRELOAD, PULSE_SERVER itself");
        }
        if self.input_kinds.len() > 4 {
            return Err("input_kinds lists each kind at most once");
        }
        if !(0..=255).contains(&self.min_gpu_class) {
            return Err("min_gpu_class is 0-255");
        }
        if !(16..=7680).contains(&self.width) || !(16..=4320).contains(&self.height) || !(1..=240).contains(&self.fps) {
            return Err("a title runs at 16x16 to 7680x4320 and 1-240 frames per second");
        }
        if self.launch == LAUNCH_BUILTIN_DEMO && self.probe.is_some() {
            return Err("the built-in demo is checked by its exact answer to aim, not by a probe");
        }
        self.probe.as_ref().map_or(Ok(()), Probe::validate)
    }
}

/// A checker's registration (signed by the key it registers). Checkers audit nodes for
/// the operator, so a new one is admitted only once the operator approves it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RegisterChecker {
    /// Checker id.
    #[schema(pattern = "^[A-Za-z0-9._:-]{1,64}$")]
    pub id: String,
    /// Who runs it.
    pub owner: String,
    /// Base64 ed25519 public key.
    #[schema(pattern = "^[A-Za-z0-9+/]{43}=$")]
    pub public_key: String,
}

/// A check the indexer hands an approved checker: a session opened for it on the node's
/// free capacity, with a `checker` token (the relay admits it as the session's player).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CheckAssignment {
    /// Check id (32 hex digits); the report names it.
    pub check: String,
    /// The node under check.
    pub node: String,
    /// The title the session runs.
    pub title: String,
    /// The session opened for the check.
    pub session: String,
    /// Its token (role `checker`).
    pub token: String,
    /// Where to play it: the relay's page for the session.
    pub play_url: String,
    /// The picture the node must deliver: the title's size and frame rate.
    pub width: u32,
    /// Height, pixels.
    pub height: u32,
    /// Frames per second.
    pub fps: u32,
    /// The title is the built-in demo, whose answer to aimed turns is exact.
    pub demo: bool,
    /// A studio title's probe (the keys that visibly move something), when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<Probe>,
    /// The GPU class the node registered with: the proof of capacity holds it to that.
    #[serde(default)]
    pub gpu_class: u8,
    /// The report is refused after this time (Unix seconds).
    pub report_by: i64,
    /// The node's claims against the relays' records, as the indexer holds them now.
    #[serde(default)]
    pub audit: MeteringAudit,
}

/// The metering audit: the sessions a node says it runs (its last heartbeat) against the
/// sessions the indexer knows on it and the relays report played. A node paid for play
/// that reports sessions nobody plays (a ghost) fails.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MeteringAudit {
    /// Sessions the node's last heartbeat said it runs.
    pub claimed: u32,
    /// Of those, the ones that never existed on this node or had ended well before the
    /// node claimed them.
    #[serde(default)]
    pub phantom: Vec<String>,
}

impl MeteringAudit {
    /// Why the audit fails, if it does.
    pub fn failure(&self) -> Option<String> {
        (!self.phantom.is_empty()).then(|| {
            format!(
                "metering: the node reports {} of its {} running sessions that no player plays ({})",
                self.phantom.len(),
                self.claimed,
                self.phantom.iter().take(3).cloned().collect::<Vec<_>>().join(", ")
            )
        })
    }
}

/// What a checker measured in one check, and its verdict.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CheckOutcome {
    /// Every check rule held.
    pub passed: bool,
    /// The rules that failed, for people.
    #[serde(default)]
    pub failures: Vec<String>,
    /// Frames decoded per second.
    pub fps: f64,
    /// Frames decoded.
    pub frames: u64,
    /// Frames at another size than the advertised one.
    pub wrong_size: u64,
    /// Gaps of more than a few frame times.
    pub freezes: u64,
    /// Media bitrate, kbit/s.
    pub bitrate_kbps: f64,
    /// Round trip to the relay, ms.
    #[serde(default)]
    pub rtt_ms: Option<f64>,
    /// Responsiveness: aimed turns answered, of those sent (the demo).
    #[serde(default)]
    pub answered: Option<u32>,
    /// Aimed turns sent.
    #[serde(default)]
    pub inputs: Option<u32>,
    /// Sham intervals (no input) in which the picture "answered" anyway.
    #[serde(default)]
    pub sham_fired: Option<u32>,
    /// Sham intervals.
    #[serde(default)]
    pub shams: Option<u32>,
    /// Click-to-photon, median, ms.
    #[serde(default)]
    pub click_to_photon_p50_ms: Option<f64>,
    /// Click-to-photon, 95th percentile, ms.
    #[serde(default)]
    pub click_to_photon_p95_ms: Option<f64>,
    /// Proof of capacity: the challenge's matrix size.
    #[serde(default)]
    pub capacity_n: Option<u32>,
    /// Proof of capacity: challenge to commitment, ms.
    #[serde(default)]
    pub capacity_ms: Option<f64>,
    /// Proof of capacity: what the node's class allowed, ms.
    #[serde(default)]
    pub capacity_deadline_ms: Option<f64>,
    /// Proof of capacity: multiply-adds per second shown, ÷ 10⁹ (a lower bound).
    #[serde(default)]
    pub capacity_gops: Option<f64>,
}

/// The indexer's view of a node's honesty, from checkers' signed reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// No check decided yet.
    #[default]
    Unchecked,
    /// The last decided check passed.
    Passing,
    /// The last decided check failed: no new players, checked again at once.
    Suspect,
    /// Failed again while suspect: excluded until the operator approves it again.
    Failed,
}

/// A node's score: its recent checks.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NodeScore {
    /// What the checks decided.
    pub verdict: Verdict,
    /// Reports counted (the most recent, at most 20).
    pub checks: u32,
    /// Of those, passed.
    pub passed: u32,
    /// `passed / checks`.
    #[serde(default)]
    pub pass_rate: Option<f64>,
    /// Frame rate measured, median of those checks.
    #[serde(default)]
    pub fps: Option<f64>,
    /// Click-to-photon median measured, median of those checks, ms.
    #[serde(default)]
    pub click_to_photon_p50_ms: Option<f64>,
    /// Proof-of-capacity throughput shown, median of those checks, Gop/s.
    #[serde(default)]
    pub capacity_gops: Option<f64>,
    /// Last report, Unix seconds.
    #[serde(default)]
    pub last_checked: Option<i64>,
}

impl Verdict {
    /// Its name, as stored and served.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unchecked => "unchecked",
            Self::Passing => "passing",
            Self::Suspect => "suspect",
            Self::Failed => "failed",
        }
    }

    /// From its name; anything else is `unchecked`.
    pub fn parse(s: &str) -> Self {
        match s {
            "passing" => Self::Passing,
            "suspect" => Self::Suspect,
            "failed" => Self::Failed,
            _ => Self::Unchecked,
        }
    }
}
