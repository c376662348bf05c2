//! The REST API under `/api/v1`, its OpenAPI document and `/metrics`.
//!
//! Nodes and relays sign every request, registration included, with their own ed25519
//! key: headers `x-pylon-timestamp` (Unix seconds, within [`MAX_SKEW_SECS`]),
//! `x-pylon-nonce` (larger than any nonce that key signed before: a replay is refused)
//! and `x-pylon-signature` (base64 of the signature over
//! `"{METHOD} {PATH}\n{timestamp}\n{nonce}\n{body}"`). Registration proves possession of
//! the key it registers; only that key's holder can change the record afterwards, and
//! never its revocation, draining, approval or seats. A revoked node or relay is refused on
//! every request. Anonymous calls (sessions, spectating) are rate-limited per client
//! address and per title. Errors are JSON `{"error": "…"}`; a client's mistake is a 4xx,
//! an internal failure a 500 whose detail is only logged.

use crate::limit::{KeyedLimiter, Rate};
use crate::selector::{self, MatchRequest, NodeCandidate, NodeState, RelayCandidate};
use crate::store::{Member, NodeFlag, NodeRecord, RelayRecord, SessionRecord, Store, StoreError, Title, Usage};
use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::{Signature, SigningKey, Verifier, VerifyingKey};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use pylon_proto::token::{Claims, Role};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use utoipa::{OpenApi, ToSchema};

pub use pylon_indexer_client::api::{
    Candidate, CreateSession, EndSession, NodeHeartbeat, NodeKeyInfo, PublicKey, RegisterNode, RegisterRelay,
    RelayHeartbeat, RelayHeartbeatReply, SessionCreated,
};
pub use pylon_indexer_client::signed_message;

/// Largest clock difference accepted on a signed request.
pub const MAX_SKEW_SECS: i64 = 60;
/// A node or relay silent for this long is gone: no new sessions.
pub const HEARTBEAT_TIMEOUT_SECS: i64 = 15;
/// How long a session token is valid for joining.
pub const TOKEN_LIFETIME_SECS: u64 = 120;
/// A matched session whose player the relay has not seen connected within this is ended
/// and its seat freed.
pub const PLAYER_JOIN_GRACE_SECS: i64 = 20;
/// A session whose player (or relay) the relay has not reported for this long is ended.
pub const PLAYER_GONE_SECS: i64 = 15;
/// Keys remembered by each rate limiter at most.
const LIMITER_KEYS: usize = 100_000;

/// What the operator decides about the pool and anonymous callers.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// New nodes and relays wait for the operator's approval before they are used.
    pub approve_new: bool,
    /// Sessions one client address may request.
    pub sessions_per_address: Rate,
    /// Sessions of one title all callers together may request.
    pub sessions_per_title: Rate,
    /// Spectator tokens one client address may request.
    pub spectate_per_address: Rate,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            approve_new: false,
            sessions_per_address: Rate::new(10.0, 5.0),
            sessions_per_title: Rate::new(1200.0, 200.0),
            spectate_per_address: Rate::new(30.0, 10.0),
        }
    }
}

/// The rate limiters of [`Policy`].
#[derive(Debug)]
pub struct Limiters {
    sessions_per_address: KeyedLimiter,
    sessions_per_title: KeyedLimiter,
    spectate_per_address: KeyedLimiter,
}

impl Limiters {
    /// Limiters at `policy`'s rates.
    pub fn new(policy: &Policy) -> Self {
        Self {
            sessions_per_address: KeyedLimiter::new(policy.sessions_per_address, LIMITER_KEYS),
            sessions_per_title: KeyedLimiter::new(policy.sessions_per_title, LIMITER_KEYS),
            spectate_per_address: KeyedLimiter::new(policy.spectate_per_address, LIMITER_KEYS),
        }
    }
}

/// The current Unix time in seconds.
pub fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// An API error: status and a message for the client (and, for 429/503, when to retry).
#[derive(Debug)]
pub struct ApiError(StatusCode, String, Option<u64>);

impl ApiError {
    fn new(status: StatusCode, msg: impl Into<String>) -> Self {
        Self(status, msg.into(), None)
    }
    fn bad(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, msg)
    }
    fn unauthorized(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, msg)
    }
    fn forbidden(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, msg)
    }
    fn not_found(what: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, format!("{what} not found"))
    }
    fn too_many(what: &str, wait: std::time::Duration) -> Self {
        let secs = wait.as_secs().max(1);
        Self(StatusCode::TOO_MANY_REQUESTS, format!("too many {what}: try again in {secs} s"), Some(secs))
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        tracing::error!("{e}");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut res = (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response();
        if let Some(secs) = self.2
            && let Ok(v) = axum::http::HeaderValue::from_str(&secs.to_string())
        {
            res.headers_mut().insert(axum::http::header::RETRY_AFTER, v);
        }
        res
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// Why a match failed, as a metric label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureReason {
    /// The selector's leading rejection reason.
    pub reason: String,
}

/// Node health, as a metric label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeStateLabel {
    /// `ready`, `draining`, `gone`, `revoked`.
    pub state: &'static str,
}

/// Indexer metrics.
#[derive(Debug, Clone)]
pub struct IndexerMetrics {
    sessions_created: Counter,
    sessions_ended: Counter,
    match_seconds: Histogram,
    match_failures: Family<FailureReason, Counter>,
    nodes: Family<NodeStateLabel, Gauge>,
    refused_requests: Counter,
    rate_limited: Counter,
    registry: Arc<Registry>,
}

impl Default for IndexerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl IndexerMetrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("pylon_indexer");
        let m = IndexerMetrics {
            sessions_created: Counter::default(),
            sessions_ended: Counter::default(),
            match_seconds: Histogram::new(exponential_buckets(0.000_01, 2.0, 20)),
            match_failures: Family::default(),
            nodes: Family::default(),
            refused_requests: Counter::default(),
            rate_limited: Counter::default(),
            registry: Arc::new(Registry::default()),
        };
        r.register("sessions_created", "Sessions created", m.sessions_created.clone());
        r.register("sessions_ended", "Sessions ended", m.sessions_ended.clone());
        r.register("match_seconds", "Time to choose a relay and node", m.match_seconds.clone());
        r.register("match_failures", "Matches that found no capacity, by reason", m.match_failures.clone());
        r.register("nodes", "Render nodes by state", m.nodes.clone());
        r.register(
            "refused_requests",
            "Unsigned, forged, stale, replayed or revoked requests",
            m.refused_requests.clone(),
        );
        r.register("rate_limited", "Anonymous requests refused by a rate limit", m.rate_limited.clone());
        IndexerMetrics { registry: Arc::new(r), ..m }
    }

    fn render(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Shared state of the handlers.
#[derive(Debug, Clone)]
pub struct AppState {
    /// Storage.
    pub store: Store,
    /// The key session tokens are signed with.
    pub signing_key: Arc<SigningKey>,
    /// Bearer token for administrative calls (titles, revocation, approval).
    pub admin_token: Arc<String>,
    /// Metrics.
    pub metrics: IndexerMetrics,
    /// The operator's policy.
    pub policy: Policy,
    /// Its rate limiters.
    pub limiters: Arc<Limiters>,
}

impl AppState {
    /// State over `store` with `policy`'s limits.
    pub fn new(store: Store, signing_key: SigningKey, admin_token: String, policy: Policy) -> Self {
        Self {
            store,
            signing_key: Arc::new(signing_key),
            admin_token: Arc::new(admin_token),
            metrics: IndexerMetrics::new(),
            limiters: Arc::new(Limiters::new(&policy)),
            policy,
        }
    }
}

/// The API routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/api/v1/openapi.json", get(|| async { Json(ApiDoc::openapi()) }))
        .route("/api/v1/public-key", get(public_key))
        .route("/api/v1/titles", get(list_titles).post(put_title))
        .route("/api/v1/nodes", get(list_nodes).post(register_node))
        .route("/api/v1/nodes/{id}", get(node_info))
        .route("/api/v1/nodes/{id}/approve", post(approve_node))
        .route("/api/v1/relays/{id}/approve", post(approve_relay))
        .route("/api/v1/nodes/{id}/heartbeat", post(node_heartbeat))
        .route("/api/v1/nodes/{id}/drain", post(drain_node))
        .route("/api/v1/nodes/{id}/revoke", post(revoke_node))
        .route("/api/v1/relays", get(list_relays).post(register_relay))
        .route("/api/v1/relays/{id}/heartbeat", post(relay_heartbeat))
        .route("/api/v1/candidates/{title}", get(candidates))
        .route("/api/v1/sessions", post(create_session))
        .route("/api/v1/sessions/{id}/end", post(end_session))
        .route("/api/v1/sessions/{id}/spectate", post(spectate))
        .route("/api/v1/usage", get(usage))
        .route("/metrics", get(|State(s): State<AppState>| async move { s.metrics.render() }))
        .merge(crate::web::router())
        .with_state(state)
}

/// The OpenAPI document.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Pylon indexer",
        description = "The pool of render nodes and relays, the catalog, matching and session tokens."
    ),
    paths(
        public_key,
        list_titles,
        put_title,
        list_nodes,
        register_node,
        node_info,
        approve_node,
        approve_relay,
        node_heartbeat,
        drain_node,
        revoke_node,
        list_relays,
        register_relay,
        relay_heartbeat,
        candidates,
        create_session,
        end_session,
        spectate,
        usage
    ),
    components(schemas(
        Title,
        NodeRecord,
        RelayRecord,
        Usage,
        RegisterNode,
        NodeHeartbeat,
        RegisterRelay,
        RelayHeartbeat,
        NodeStatus,
        CreateSession,
        SessionCreated,
        Candidate,
        PublicKey,
        RelayHeartbeatReply,
        EndSession,
        NodeKeyInfo
    ))
)]
pub struct ApiDoc;

fn json<T: for<'de> Deserialize<'de>>(body: &[u8]) -> ApiResult<T> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("malformed request: {e}")))
}

fn decode_key(b64: &str) -> ApiResult<VerifyingKey> {
    let bytes = STANDARD.decode(b64).map_err(|_| ApiError::bad("public_key is not base64"))?;
    let arr: [u8; 32] = bytes.try_into().map_err(|_| ApiError::bad("public_key must be 32 bytes"))?;
    VerifyingKey::from_bytes(&arr).map_err(|_| ApiError::bad("public_key is not an ed25519 key"))
}

/// A signed request's headers.
struct Signed {
    timestamp: i64,
    nonce: i64,
    signature: Signature,
}

fn signed_headers(headers: &HeaderMap) -> Option<Signed> {
    let number = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<i64>().ok());
    let signature = headers
        .get("x-pylon-signature")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| STANDARD.decode(v).ok())
        .and_then(|v| Signature::from_slice(&v).ok())?;
    Some(Signed { timestamp: number("x-pylon-timestamp")?, nonce: number("x-pylon-nonce")?, signature })
}

/// Whether `ts` is within [`MAX_SKEW_SECS`] of the indexer's clock (no overflow on a
/// hostile value).
fn fresh(ts: i64) -> bool {
    unix_now().checked_sub(ts).is_some_and(|d| d.unsigned_abs() <= MAX_SKEW_SECS as u64)
}

/// The parts of a request its signature covers.
#[derive(Clone, Copy)]
struct SignedRequest<'a> {
    method: &'a Method,
    path: &'a str,
    headers: &'a HeaderMap,
    body: &'a [u8],
}

/// Whether `req` is signed by `key` within the time window: its nonce, or why not.
fn signed_by(req: SignedRequest<'_>, key: &VerifyingKey) -> Result<i64, &'static str> {
    let SignedRequest { method, path, headers, body } = req;
    let signed = signed_headers(headers)
        .ok_or("a signed request needs x-pylon-timestamp, x-pylon-nonce and x-pylon-signature")?;
    if !fresh(signed.timestamp) {
        return Err("request timestamp too far from the indexer's clock");
    }
    key.verify(&signed_message(method.as_str(), path, signed.timestamp, signed.nonce, body), &signed.signature)
        .map_err(|_| "bad request signature")?;
    Ok(signed.nonce)
}

/// Verifies a request signed by `public_key` (its time window and signature; the nonce is
/// checked against the record by the caller). Returns the nonce.
fn verify_signed(state: &AppState, req: SignedRequest<'_>, public_key: &str) -> ApiResult<i64> {
    let key = decode_key(public_key)?;
    signed_by(req, &key).map_err(|why| {
        state.metrics.refused_requests.inc();
        ApiError::unauthorized(why)
    })
}

/// Spends `nonce` for member `id`: a replay (not newer than the last) is refused.
async fn spend_nonce(state: &AppState, member: Member, id: &str, nonce: i64) -> ApiResult<()> {
    if !state.store.bump_nonce(member, id, nonce).await? {
        state.metrics.refused_requests.inc();
        return Err(ApiError::unauthorized("replayed request: its nonce is not newer than the last one"));
    }
    Ok(())
}

/// Verifies a request signed by the holder of member `id`'s key and spends its nonce.
async fn check_signature(
    state: &AppState,
    member: Member,
    id: &str,
    req: SignedRequest<'_>,
    public_key: &str,
) -> ApiResult<()> {
    let nonce = verify_signed(state, req, public_key)?;
    spend_nonce(state, member, id, nonce).await
}

fn check_admin(state: &AppState, headers: &HeaderMap) -> ApiResult<()> {
    use subtle::ConstantTimeEq;
    let given = headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    let ok = match given {
        Some(given) if !state.admin_token.is_empty() => {
            bool::from(given.as_bytes().ct_eq(state.admin_token.as_bytes()))
        }
        _ => false,
    };
    if !ok {
        state.metrics.refused_requests.inc();
        return Err(ApiError::unauthorized("administrative call needs the indexer's admin token"));
    }
    Ok(())
}

/// The caller's address, as the server saw the connection (axum's `ConnectInfo`); the
/// rate limits key on it. Without one (a server that does not record it) every caller
/// shares the key `unknown`.
#[derive(Debug, Clone)]
pub struct ClientAddr(String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for ClientAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, _: &S) -> Result<Self, Self::Rejection> {
        let addr = parts.extensions.get::<ConnectInfo<std::net::SocketAddr>>();
        Ok(ClientAddr(addr.map_or_else(|| "unknown".to_string(), |ConnectInfo(a)| a.ip().to_string())))
    }
}

#[utoipa::path(get, path = "/api/v1/public-key", responses((status = 200, body = PublicKey)))]
async fn public_key(State(s): State<AppState>) -> Json<PublicKey> {
    Json(PublicKey { public_key: STANDARD.encode(s.signing_key.verifying_key().as_bytes()) })
}

#[utoipa::path(get, path = "/api/v1/titles", responses((status = 200, body = [Title])))]
async fn list_titles(State(s): State<AppState>) -> ApiResult<Json<Vec<Title>>> {
    Ok(Json(s.store.titles().await?))
}

#[utoipa::path(post, path = "/api/v1/titles", request_body = Title, responses((status = 201), (status = 401)))]
async fn put_title(State(s): State<AppState>, headers: HeaderMap, body: Bytes) -> ApiResult<StatusCode> {
    check_admin(&s, &headers)?;
    let t: Title = json(&body)?;
    if t.id.is_empty() || t.id.len() > 64 || t.width <= 0 || t.height <= 0 || t.fps <= 0 {
        return Err(ApiError::bad("a title needs an id of 1-64 bytes and a positive size and frame rate"));
    }
    s.store.put_title(&t).await?;
    Ok(StatusCode::CREATED)
}

/// A node's health as listed.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct NodeStatus {
    /// The stored record.
    #[serde(flatten)]
    pub node: NodeRecord,
    /// `ready`, `draining`, `gone` or `revoked`.
    pub state: String,
}

/// Whether a relay may be offered to players: approved, not revoked, heard from recently.
fn relay_healthy(r: &RelayRecord, now: i64) -> bool {
    !r.revoked && r.approved && now.saturating_sub(r.last_heartbeat) <= HEARTBEAT_TIMEOUT_SECS
}

fn node_state(n: &NodeRecord, now: i64) -> &'static str {
    if n.revoked {
        "revoked"
    } else if !n.approved {
        "pending"
    } else if now.saturating_sub(n.last_heartbeat) > HEARTBEAT_TIMEOUT_SECS {
        "gone"
    } else if n.draining {
        "draining"
    } else {
        "ready"
    }
}

#[utoipa::path(post, path = "/api/v1/nodes", request_body = RegisterNode,
    responses((status = 200, body = PublicKey), (status = 400), (status = 401), (status = 403), (status = 409)))]
async fn register_node(State(s): State<AppState>, headers: HeaderMap, body: Bytes) -> ApiResult<Json<PublicKey>> {
    let r: RegisterNode = json(&body)?;
    decode_key(&r.public_key)?;
    if r.id.is_empty() || r.id.len() > 64 || r.capacity == 0 || !r.price_per_hour.is_finite() || r.price_per_hour < 0.0
    {
        return Err(ApiError::bad("a node needs an id of 1-64 bytes, a capacity and a non-negative price"));
    }
    // Proof of possession: the registration is signed by the key it registers.
    let req = SignedRequest { method: &Method::POST, path: "/api/v1/nodes", headers: &headers, body: &body };
    let nonce = verify_signed(&s, req, &r.public_key)?;
    if let Some(old) = s.store.node(&r.id).await? {
        if old.public_key != r.public_key {
            s.metrics.refused_requests.inc();
            return Err(ApiError::new(StatusCode::CONFLICT, "this node id is registered with another key"));
        }
        if old.revoked {
            s.metrics.refused_requests.inc();
            return Err(ApiError::forbidden("this node is revoked"));
        }
    }
    // NVENC halves encode time; a GPU without it (H100, A100) encodes on the CPU.
    let encode_ms = if r.encoders.iter().any(|e| e.contains("nvenc")) { 1.5 } else { 4.0 };
    let record = NodeRecord {
        id: r.id.clone(),
        provider: r.provider.clone(),
        public_key: r.public_key.clone(),
        info: serde_json::json!({
            "gpu_model": r.gpu_model, "gpu_memory_mb": r.gpu_memory_mb, "vulkan_device": r.vulkan_device,
            "encoders": r.encoders, "region": r.region, "lat": r.lat, "lon": r.lon,
        }),
        capacity: i64::from(r.capacity),
        sessions: 0,
        price_per_hour: r.price_per_hour,
        gpu_class: i64::from(r.gpu_class),
        encode_ms,
        titles: r.titles,
        draining: false,
        revoked: false,
        approved: !s.policy.approve_new,
        seats: 0,
        last_heartbeat: unix_now(),
    };
    if !s.store.register_node(&record, nonce).await? {
        s.metrics.refused_requests.inc();
        return Err(ApiError::unauthorized("replayed registration: its nonce is not newer than the last one"));
    }
    tracing::info!(node = %r.id, provider = %r.provider, "node registered");
    Ok(public_key(State(s)).await)
}

async fn signed_node(
    s: &AppState,
    id: &str,
    method: Method,
    path: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> ApiResult<NodeRecord> {
    let node = s.store.node(id).await?.ok_or_else(|| ApiError::not_found("node"))?;
    let req = SignedRequest { method: &method, path, headers, body };
    check_signature(s, Member::Node, id, req, &node.public_key).await?;
    if node.revoked {
        s.metrics.refused_requests.inc();
        return Err(ApiError::forbidden("this node is revoked"));
    }
    Ok(node)
}

#[utoipa::path(post, path = "/api/v1/nodes/{id}/heartbeat", request_body = NodeHeartbeat, responses((status = 204), (status = 401), (status = 403)))]
async fn node_heartbeat(
    State(s): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<StatusCode> {
    let path = format!("/api/v1/nodes/{id}/heartbeat");
    signed_node(&s, &id, Method::POST, &path, &headers, &body).await?;
    let hb: NodeHeartbeat = json(&body)?;
    let now = unix_now();
    s.store.node_heartbeat(&id, i64::from(hb.sessions), &hb.titles, now).await?;
    // A session the node does not run once its token could no longer be used to join
    // never started or was not reported ended: stop metering it.
    let swept = s.store.end_sessions_not_running(&id, &hb.running, now - TOKEN_LIFETIME_SECS as i64, now).await?;
    if swept > 0 {
        s.metrics.sessions_ended.inc_by(swept);
        tracing::info!(node = %id, swept, "ended sessions the node does not run");
    }
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/api/v1/nodes/{id}/drain", responses((status = 204), (status = 401)))]
async fn drain_node(
    State(s): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<StatusCode> {
    let path = format!("/api/v1/nodes/{id}/drain");
    signed_node(&s, &id, Method::POST, &path, &headers, &body).await?;
    s.store.set_node_flag(&id, NodeFlag::Draining, true).await?;
    tracing::info!(node = %id, "node draining: no new sessions");
    Ok(StatusCode::NO_CONTENT)
}

/// A node's key and state, for relays checking a connecting node.
#[utoipa::path(get, path = "/api/v1/nodes/{id}", responses((status = 200, body = NodeKeyInfo), (status = 404)))]
async fn node_info(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<NodeKeyInfo>> {
    let n = s.store.node(&id).await?.ok_or_else(|| ApiError::not_found("node"))?;
    let state = node_state(&n, unix_now()).to_string();
    Ok(Json(NodeKeyInfo { id: n.id, public_key: n.public_key, state }))
}

/// The operator approves a node registered while new ones need approval.
#[utoipa::path(post, path = "/api/v1/nodes/{id}/approve", responses((status = 204), (status = 401), (status = 404)))]
async fn approve_node(State(s): State<AppState>, Path(id): Path<String>, headers: HeaderMap) -> ApiResult<StatusCode> {
    check_admin(&s, &headers)?;
    if !s.store.approve(Member::Node, &id).await? {
        return Err(ApiError::not_found("node"));
    }
    tracing::info!(node = %id, "node approved");
    Ok(StatusCode::NO_CONTENT)
}

/// The operator approves a relay registered while new ones need approval.
#[utoipa::path(post, path = "/api/v1/relays/{id}/approve", responses((status = 204), (status = 401), (status = 404)))]
async fn approve_relay(State(s): State<AppState>, Path(id): Path<String>, headers: HeaderMap) -> ApiResult<StatusCode> {
    check_admin(&s, &headers)?;
    if !s.store.approve(Member::Relay, &id).await? {
        return Err(ApiError::not_found("relay"));
    }
    tracing::info!(relay = %id, "relay approved");
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/api/v1/nodes/{id}/revoke", responses((status = 204), (status = 401), (status = 404)))]
async fn revoke_node(State(s): State<AppState>, Path(id): Path<String>, headers: HeaderMap) -> ApiResult<StatusCode> {
    check_admin(&s, &headers)?;
    s.store.node(&id).await?.ok_or_else(|| ApiError::not_found("node"))?;
    s.store.set_node_flag(&id, NodeFlag::Revoked, true).await?;
    tracing::warn!(node = %id, "node revoked");
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/v1/nodes", responses((status = 200, body = [NodeStatus])))]
async fn list_nodes(State(s): State<AppState>) -> ApiResult<Json<Vec<NodeStatus>>> {
    let now = unix_now();
    let nodes = s.store.nodes().await?;
    for state in ["ready", "draining", "gone", "revoked", "pending"] {
        let n = nodes.iter().filter(|n| node_state(n, now) == state).count();
        s.metrics.nodes.get_or_create(&NodeStateLabel { state }).set(n as i64);
    }
    Ok(Json(nodes.into_iter().map(|n| NodeStatus { state: node_state(&n, now).into(), node: n }).collect()))
}

#[utoipa::path(post, path = "/api/v1/relays", request_body = RegisterRelay,
    responses((status = 200, body = PublicKey), (status = 400), (status = 401), (status = 403), (status = 409)))]
async fn register_relay(State(s): State<AppState>, headers: HeaderMap, body: Bytes) -> ApiResult<Json<PublicKey>> {
    let r: RegisterRelay = json(&body)?;
    decode_key(&r.public_key)?;
    if r.id.is_empty() || r.id.len() > 64 || r.capacity == 0 || !r.public_url.starts_with("http") {
        return Err(ApiError::bad("a relay needs an id of 1-64 bytes, a capacity and an http(s) public_url"));
    }
    let req = SignedRequest { method: &Method::POST, path: "/api/v1/relays", headers: &headers, body: &body };
    let nonce = verify_signed(&s, req, &r.public_key)?;
    if let Some(old) = s.store.relay(&r.id).await? {
        if old.public_key != r.public_key {
            s.metrics.refused_requests.inc();
            return Err(ApiError::new(StatusCode::CONFLICT, "this relay id is registered with another key"));
        }
        if old.revoked {
            s.metrics.refused_requests.inc();
            return Err(ApiError::forbidden("this relay is revoked"));
        }
    }
    let record = RelayRecord {
        id: r.id.clone(),
        owner: r.owner,
        public_key: r.public_key,
        public_url: r.public_url,
        quic_addr: r.quic_addr,
        region: r.region,
        capacity: i64::from(r.capacity),
        viewers: 0,
        node_rtt_ms: BTreeMap::new(),
        revoked: false,
        approved: !s.policy.approve_new,
        last_heartbeat: unix_now(),
    };
    if !s.store.register_relay(&record, nonce).await? {
        s.metrics.refused_requests.inc();
        return Err(ApiError::unauthorized("replayed registration: its nonce is not newer than the last one"));
    }
    tracing::info!(relay = %r.id, "relay registered");
    Ok(public_key(State(s)).await)
}

#[utoipa::path(post, path = "/api/v1/relays/{id}/heartbeat", request_body = RelayHeartbeat, responses((status = 200, body = RelayHeartbeatReply), (status = 401), (status = 403)))]
async fn relay_heartbeat(
    State(s): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Json<RelayHeartbeatReply>> {
    let relay = s.store.relay(&id).await?.ok_or_else(|| ApiError::not_found("relay"))?;
    let path = format!("/api/v1/relays/{id}/heartbeat");
    let req = SignedRequest { method: &Method::POST, path: &path, headers: &headers, body: &body };
    check_signature(&s, Member::Relay, &id, req, &relay.public_key).await?;
    if relay.revoked {
        return Err(ApiError::forbidden("this relay is revoked"));
    }
    let hb: RelayHeartbeat = json(&body)?;
    if hb.node_rtt_ms.values().any(|v| !v.is_finite() || *v < 0.0) {
        return Err(ApiError::bad("RTTs must be finite and non-negative"));
    }
    if hb.players.len() > 100_000 {
        return Err(ApiError::bad("too many players"));
    }
    let now = unix_now();
    s.store.relay_heartbeat(&id, i64::from(hb.viewers), &hb.node_rtt_ms, now).await?;
    s.store.players_seen(&id, &hb.players, now).await?;
    // Tokens live TOKEN_LIFETIME_SECS: a session ended longer ago than that (plus the
    // clock skew allowed) cannot be joined again anyway.
    let since = now - TOKEN_LIFETIME_SECS as i64 - MAX_SKEW_SECS;
    Ok(Json(RelayHeartbeatReply {
        ended_sessions: s.store.ended_sessions_on_relay(&id, since).await?,
        revoked_nodes: s.store.nodes().await?.into_iter().filter(|n| n.revoked).map(|n| n.id).collect(),
    }))
}

/// Ends, every few seconds, the sessions nobody plays (see [`Store::sweep_unplayed`])
/// until `shutdown`.
pub async fn run_sweeper(state: AppState, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        match state.store.sweep_unplayed(unix_now(), PLAYER_JOIN_GRACE_SECS, PLAYER_GONE_SECS).await {
            Ok(0) => {}
            Ok(n) => {
                state.metrics.sessions_ended.inc_by(n);
                tracing::info!(ended = n, "ended sessions nobody plays");
            }
            Err(e) => tracing::warn!("sweeping sessions failed: {e}"),
        }
    }
}

#[utoipa::path(get, path = "/api/v1/relays", responses((status = 200, body = [RelayRecord])))]
async fn list_relays(State(s): State<AppState>) -> ApiResult<Json<Vec<RelayRecord>>> {
    Ok(Json(s.store.relays().await?))
}

#[utoipa::path(get, path = "/api/v1/candidates/{title}", responses((status = 200, body = [Candidate])))]
async fn candidates(State(s): State<AppState>, Path(_title): Path<String>) -> ApiResult<Json<Vec<Candidate>>> {
    let now = unix_now();
    let relays = s.store.relays().await?;
    Ok(Json(
        relays
            .into_iter()
            .filter(|r| relay_healthy(r, now) && r.viewers < r.capacity)
            .map(|r| Candidate { relay: r.id, url: r.public_url, region: r.region })
            .collect(),
    ))
}

#[utoipa::path(post, path = "/api/v1/sessions", request_body = CreateSession,
    responses((status = 201, body = SessionCreated), (status = 400), (status = 404), (status = 503, description = "no capacity")))]
async fn create_session(
    State(s): State<AppState>,
    ClientAddr(addr): ClientAddr,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<SessionCreated>)> {
    let req: CreateSession = json(&body)?;
    let started_at = Instant::now();
    // A session holds a seat: anonymous callers pay for it in rate, per address and per title.
    if let Err(wait) = s.limiters.sessions_per_address.check(&addr, started_at) {
        s.metrics.rate_limited.inc();
        return Err(ApiError::too_many("session requests from this address", wait));
    }
    if let Err(wait) = s.limiters.sessions_per_title.check(&req.title, started_at) {
        s.metrics.rate_limited.inc();
        return Err(ApiError::too_many("session requests for this title", wait));
    }
    let role = match req.role.as_deref() {
        None | Some("player") => Role::Player,
        Some("spectator") => Role::Spectator,
        Some(other) => return Err(ApiError::bad(format!("unknown role {other:?}"))),
    };
    let title =
        s.store.titles().await?.into_iter().find(|t| t.id == req.title).ok_or_else(|| ApiError::not_found("title"))?;
    let now = unix_now();
    let nodes = s.store.nodes().await?;
    let relays = s.store.relays().await?;
    let started = Instant::now();
    let candidates: Vec<NodeCandidate> = nodes
        .iter()
        .map(|n| NodeCandidate {
            id: n.id.clone(),
            state: match node_state(n, now) {
                "ready" => NodeState::Ready,
                "draining" => NodeState::Draining,
                _ => NodeState::Gone,
            },
            capacity: n.capacity.max(0) as u32,
            // Seats are the indexer's own count (matched and not ended); the node's
            // report can only add to it.
            sessions: n.seats.max(n.sessions).max(0) as u32,
            titles: n.titles.clone(),
            gpu_class: n.gpu_class.clamp(0, 255) as u8,
            price_per_hour: n.price_per_hour,
            encode_ms: n.encode_ms,
        })
        .collect();
    let relay_candidates: Vec<RelayCandidate> = relays
        .iter()
        .map(|r| RelayCandidate {
            id: r.id.clone(),
            healthy: relay_healthy(r, now),
            capacity: r.capacity.max(0) as u32,
            viewers: r.viewers.max(0) as u32,
            node_rtt_ms: r.node_rtt_ms.clone(),
        })
        .collect();
    let request = MatchRequest {
        title: title.id.clone(),
        min_gpu_class: title.min_gpu_class.clamp(0, 255) as u8,
        max_price_per_hour: req.max_price_per_hour,
        client_rtt_ms: req.client_rtt_ms,
    };
    let chosen = selector::select(&request, &candidates, &relay_candidates);
    s.metrics.match_seconds.observe(started.elapsed().as_secs_f64());
    let m = match chosen {
        Ok(m) => m,
        Err(e) => {
            let reason = e.rejected.iter().max_by_key(|(_, n)| **n).map(|(r, _)| r.to_string()).unwrap_or_default();
            s.metrics.match_failures.get_or_create(&FailureReason { reason }).inc();
            tracing::info!(title = %title.id, "no match: {}", e.summary);
            return Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string(), Some(5)));
        }
    };
    let mut session = [0u8; 16];
    getrandom::fill(&mut session).map_err(|e| {
        tracing::error!("no randomness: {e}");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
    })?;
    let claims = Claims {
        session,
        role,
        issued_at: now as u64,
        expires_at: now as u64 + TOKEN_LIFETIME_SECS,
        title: title.id.clone(),
        node: m.node.clone(),
        relay: m.relay.clone(),
    };
    let token = claims.sign(&s.signing_key).map_err(|e| ApiError::bad(e.to_string()))?;
    let node = nodes.iter().find(|n| n.id == m.node);
    let relay_url = relays.iter().find(|r| r.id == m.relay).map(|r| r.public_url.clone()).unwrap_or_default();
    let booked = s
        .store
        .start_session(
            &SessionRecord {
                id: claims.session_hex(),
                title: title.id.clone(),
                node: m.node.clone(),
                provider: node.map(|n| n.provider.clone()).unwrap_or_default(),
                relay: m.relay.clone(),
                gpu_class: node.map(|n| n.gpu_class).unwrap_or_default(),
                started_at: now,
            },
            node.map_or(0, |n| n.capacity),
        )
        .await?;
    if !booked {
        // Another player took the last seat between the match and the booking.
        s.metrics.match_failures.get_or_create(&FailureReason { reason: "seat taken".into() }).inc();
        return Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, "the matched node just filled up".into(), Some(1)));
    }
    s.metrics.sessions_created.inc();
    tracing::info!(session = %claims.session_hex(), node = %m.node, relay = %m.relay, "matched: {}", m.reason);
    Ok((
        StatusCode::CREATED,
        Json(SessionCreated {
            session: claims.session_hex(),
            token,
            relay: m.relay,
            relay_url,
            node: m.node,
            expected_ms: m.expected_ms,
            reason: m.reason,
        }),
    ))
}

/// A spectator's token for a running session: whoever has the session's id (the player
/// shares `/watch/<session>`) may watch; a spectator token never carries input.
#[utoipa::path(post, path = "/api/v1/sessions/{id}/spectate", responses((status = 201, body = SessionCreated), (status = 404)))]
async fn spectate(
    State(s): State<AppState>,
    Path(id): Path<String>,
    ClientAddr(addr): ClientAddr,
) -> ApiResult<(StatusCode, Json<SessionCreated>)> {
    if let Err(wait) = s.limiters.spectate_per_address.check(&addr, Instant::now()) {
        s.metrics.rate_limited.inc();
        return Err(ApiError::too_many("spectator requests from this address", wait));
    }
    let (relay, node, ended) = s.store.session(&id).await?.ok_or_else(|| ApiError::not_found("session"))?;
    let session: [u8; 16] = (id.len() == 32)
        .then(|| (0..16).map(|i| u8::from_str_radix(id.get(2 * i..2 * i + 2)?, 16).ok()).collect::<Option<Vec<u8>>>())
        .flatten()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| ApiError::not_found("session"))?;
    if ended {
        return Err(ApiError::not_found("running session"));
    }
    let title = s.store.session_title(&id).await?.unwrap_or_default();
    let now = unix_now();
    let claims = Claims {
        session,
        role: Role::Spectator,
        issued_at: now as u64,
        expires_at: now as u64 + TOKEN_LIFETIME_SECS,
        title,
        node: node.clone(),
        relay: relay.clone(),
    };
    let token = claims.sign(&s.signing_key).map_err(|e| ApiError::bad(e.to_string()))?;
    let relay_url = s.store.relay(&relay).await?.map(|r| r.public_url).unwrap_or_default();
    Ok((
        StatusCode::CREATED,
        Json(SessionCreated {
            session: id,
            token,
            relay,
            relay_url,
            node,
            expected_ms: 0.0,
            reason: "spectator of a running session".into(),
        }),
    ))
}

/// Ends a session: called, signed, by the session's relay (the player left) or node, or
/// with the admin token.
#[utoipa::path(post, path = "/api/v1/sessions/{id}/end", request_body = EndSession,
    responses((status = 204), (status = 401), (status = 404)))]
async fn end_session(
    State(s): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<StatusCode> {
    let (relay, node, ended) = s.store.session(&id).await?.ok_or_else(|| ApiError::not_found("session"))?;
    if headers.contains_key("authorization") {
        check_admin(&s, &headers)?;
    } else {
        let path = format!("/api/v1/sessions/{id}/end");
        let relay_key = s.store.relay(&relay).await?.map(|r| r.public_key);
        let node_key = s.store.node(&node).await?.map(|n| n.public_key);
        let req = SignedRequest { method: &Method::POST, path: &path, headers: &headers, body: &body };
        let signer = [(Member::Relay, relay.as_str(), relay_key), (Member::Node, node.as_str(), node_key)]
            .into_iter()
            .find_map(|(member, id, key)| {
                let nonce = signed_by(req, &decode_key(&key?).ok()?).ok()?;
                Some((member, id.to_string(), nonce))
            });
        let Some((member, signer_id, nonce)) = signer else {
            s.metrics.refused_requests.inc();
            return Err(ApiError::unauthorized("only the session's relay or node (signed) or an admin may end it"));
        };
        spend_nonce(&s, member, &signer_id, nonce).await?;
    }
    let req: EndSession = if body.is_empty() { EndSession::default() } else { json(&body)? };
    let reason = if req.reason.is_empty() { "ended".to_string() } else { req.reason.chars().take(128).collect() };
    if ended || !s.store.end_session(&id, unix_now(), &reason).await? {
        return Err(ApiError::not_found("running session"));
    }
    s.metrics.sessions_ended.inc();
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/v1/usage", responses((status = 200, body = [Usage])))]
async fn usage(State(s): State<AppState>) -> ApiResult<Json<Vec<Usage>>> {
    Ok(Json(s.store.usage(unix_now()).await?))
}
