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
use crate::store::{
    InputKind, Member, NodeFlag, NodeRecord, Probe, RelayRecord, SessionRecord, Store, StoreError, Title, Usage,
};
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
use pylon_proto::token::{self, Claims, Role};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use utoipa::{IntoParams, OpenApi, ToSchema};

pub use checks::{CheckerRecord, CheckerStatus};
pub use pylon_indexer_client::api::MeteringAudit;
pub use pylon_indexer_client::api::{
    Candidate, CheckAssignment, CheckOutcome, CreateSession, EndSession, ErrorBody, ErrorReason, MoveSession,
    NodeHeartbeat, NodeHeartbeatReply, NodeKeyInfo, NodeScore, PublicKey, RegisterChecker, RegisterNode, RegisterRelay,
    RelayHeartbeat, RelayHeartbeatReply, Replicas, SessionCreated, SessionInfo, SessionRole, Spectate, Verdict,
    valid_id, valid_sha256,
};

mod checks;
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
/// `Retry-After` when no node or relay can take a session now.
pub const NO_CAPACITY_RETRY_SECS: u64 = 5;
/// Running sessions a node's heartbeat may list.
const MAX_RUNNING: usize = 1024;
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
    /// Spectator tokens one client address may request (and, separately, session moves).
    pub spectate_per_address: Rate,
    /// How often each ready node is checked, on average (each node's next check is
    /// spread ±25 % around it).
    pub check_interval_secs: i64,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            approve_new: false,
            sessions_per_address: Rate::new(10.0, 5.0),
            sessions_per_title: Rate::new(1200.0, 200.0),
            spectate_per_address: Rate::new(30.0, 10.0),
            check_interval_secs: 60,
        }
    }
}

/// The rate limiters of [`Policy`].
#[derive(Debug)]
pub struct Limiters {
    sessions_per_address: KeyedLimiter,
    sessions_per_title: KeyedLimiter,
    spectate_per_address: KeyedLimiter,
    moves_per_address: KeyedLimiter,
}

impl Limiters {
    /// Limiters at `policy`'s rates.
    pub fn new(policy: &Policy) -> Self {
        Self {
            sessions_per_address: KeyedLimiter::new(policy.sessions_per_address, LIMITER_KEYS),
            sessions_per_title: KeyedLimiter::new(policy.sessions_per_title, LIMITER_KEYS),
            spectate_per_address: KeyedLimiter::new(policy.spectate_per_address, LIMITER_KEYS),
            moves_per_address: KeyedLimiter::new(policy.spectate_per_address, LIMITER_KEYS),
        }
    }
}

/// The current Unix time in seconds.
pub fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// An API error: its status and [`ErrorBody`] (for 429 and 503 also `Retry-After`).
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: ErrorBody,
}

impl ApiError {
    fn new(status: StatusCode, reason: ErrorReason, msg: impl Into<String>) -> Self {
        Self { status, body: ErrorBody { error: msg.into(), reason, retry_after_secs: None } }
    }
    fn malformed(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorReason::Malformed, msg)
    }
    fn invalid(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorReason::Invalid, msg)
    }
    fn unauthorized(reason: ErrorReason, msg: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, reason, msg)
    }
    fn revoked(what: &str) -> Self {
        Self::new(StatusCode::FORBIDDEN, ErrorReason::Revoked, format!("this {what} is revoked"))
    }
    fn not_found(what: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, ErrorReason::NotFound, format!("{what} not found"))
    }
    fn retry_later(status: StatusCode, reason: ErrorReason, msg: impl Into<String>, secs: u64) -> Self {
        let mut e = Self::new(status, reason, msg);
        e.body.retry_after_secs = Some(secs);
        e
    }
    fn too_many(what: &str, wait: std::time::Duration) -> Self {
        let secs = wait.as_secs().max(1);
        let msg = format!("too many {what}: try again in {secs} s");
        Self::retry_later(StatusCode::TOO_MANY_REQUESTS, ErrorReason::RateLimited, msg, secs)
    }
    fn internal() -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, ErrorReason::Internal, "internal error")
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        tracing::error!("{e}");
        Self::internal()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let retry = self.body.retry_after_secs;
        let mut res = (self.status, Json(self.body)).into_response();
        if let Some(secs) = retry
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
    sessions_moved: Counter,
    sessions_ended: Counter,
    match_seconds: Histogram,
    match_failures: Family<FailureReason, Counter>,
    nodes: Family<NodeStateLabel, Gauge>,
    refused_requests: Counter,
    rate_limited: Counter,
    checks_assigned: Counter,
    check_reports: Family<CheckResultLabel, Counter>,
    registry: Arc<Registry>,
}

/// A check report's result, as a metric label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CheckResultLabel {
    /// `pass` or `fail`.
    pub result: &'static str,
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
            sessions_moved: Counter::default(),
            sessions_ended: Counter::default(),
            match_seconds: Histogram::new(exponential_buckets(0.000_01, 2.0, 20)),
            match_failures: Family::default(),
            nodes: Family::default(),
            refused_requests: Counter::default(),
            rate_limited: Counter::default(),
            checks_assigned: Counter::default(),
            check_reports: Family::default(),
            registry: Arc::new(Registry::default()),
        };
        r.register("sessions_created", "Sessions created", m.sessions_created.clone());
        r.register("sessions_moved", "Sessions moved to another relay", m.sessions_moved.clone());
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
        r.register("checks_assigned", "Checks handed to checkers", m.checks_assigned.clone());
        r.register("check_reports", "Checkers' signed reports accepted, by result", m.check_reports.clone());
        IndexerMetrics { registry: Arc::new(r), ..m }
    }

    fn render(&self) -> String {
        pylon_runtime::metrics::render(&self.registry)
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
    /// Bearer token studios deploy titles with (empty: only the admin may).
    pub studio_token: Arc<String>,
    /// Metrics.
    pub metrics: IndexerMetrics,
    /// The operator's policy.
    pub policy: Policy,
    /// Its rate limiters.
    pub limiters: Arc<Limiters>,
    /// The public base URLs of every replica serving this pool (this one's included), as
    /// the operator named them.
    pub replicas: Arc<Vec<String>>,
    /// Relay attestations already signed (see [`Attestations`]).
    pub attestations: Arc<Attestations>,
}

/// Most relay attestations kept signed; past it the cache starts afresh.
const MAX_ATTESTATIONS: usize = 100_000;

/// The indexer's attestations of relays ([`pylon_indexer_client::api::attest_relay`]),
/// signed once per relay record: ed25519 signatures are deterministic, so the same id,
/// QUIC address, certificate digest and key always get the same one, and the anonymous
/// relay listing costs no signing after the first.
#[derive(Debug, Default)]
pub struct Attestations(std::sync::Mutex<HashMap<[String; 4], String>>);

impl Attestations {
    /// `relay`'s attestation by `key`.
    fn of(&self, key: &SigningKey, relay: &RelayRecord) -> String {
        let what = [relay.id.clone(), relay.quic_addr.clone(), relay.cert_sha256.clone(), relay.public_key.clone()];
        let mut cache = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(signed) = cache.get(&what) {
            return signed.clone();
        }
        let signed = pylon_indexer_client::api::attest_relay(
            key,
            &relay.id,
            &relay.quic_addr,
            &relay.cert_sha256,
            &relay.public_key,
        );
        if cache.len() >= MAX_ATTESTATIONS {
            cache.clear();
        }
        cache.insert(what, signed.clone());
        signed
    }
}

impl AppState {
    /// State over `store` with `policy`'s limits.
    pub fn new(store: Store, signing_key: SigningKey, admin_token: String, policy: Policy) -> Self {
        Self {
            store,
            signing_key: Arc::new(signing_key),
            admin_token: Arc::new(admin_token),
            studio_token: Arc::default(),
            metrics: IndexerMetrics::new(),
            limiters: Arc::new(Limiters::new(&policy)),
            policy,
            replicas: Arc::default(),
            attestations: Arc::default(),
        }
    }
}

impl AppState {
    /// Also accepts `token` from studios for adding, changing and removing titles.
    pub fn with_studio_token(mut self, token: String) -> Self {
        self.studio_token = Arc::new(token);
        self
    }

    /// Names the public base URLs of every replica of this indexer (this one's included):
    /// listed at `/api/v1/replicas` for the catalog page to fail over through, and the
    /// origins whose pages may call this replica's API.
    pub fn with_replicas(mut self, urls: Vec<String>) -> Self {
        self.replicas = Arc::new(urls.into_iter().map(|u| u.trim().trim_end_matches('/').to_string()).collect());
        self
    }

    /// Signs a session token with the indexer's key (a failure is logged, and a 500).
    fn sign(&self, claims: &Claims) -> ApiResult<String> {
        claims.sign(&self.signing_key).map_err(|e| {
            tracing::error!("signing a token: {e}");
            ApiError::internal()
        })
    }
}

/// The API routes.
pub fn router(state: AppState) -> Router {
    let cors = replica_cors(&state.replicas);
    Router::new()
        .route("/api/v1/openapi.json", get(|| async { Json(ApiDoc::openapi()) }))
        .route("/api/v1/public-key", get(public_key))
        .route("/api/v1/replicas", get(replicas))
        .route("/api/v1/titles", get(list_titles).post(put_title))
        .route("/api/v1/titles/{id}", get(get_title).delete(delete_title))
        .route("/api/v1/nodes", get(list_nodes).post(register_node))
        .route("/api/v1/nodes/{id}", get(node_info))
        .route("/api/v1/nodes/{id}/approve", post(approve_node))
        .route("/api/v1/relays/{id}/approve", post(approve_relay))
        .route("/api/v1/nodes/{id}/heartbeat", post(node_heartbeat))
        .route("/api/v1/nodes/{id}/drain", post(drain_node))
        .route("/api/v1/nodes/{id}/revoke", post(revoke_node))
        .route("/api/v1/relays/{id}/revoke", post(revoke_relay))
        .route("/api/v1/relays", get(list_relays).post(register_relay))
        .route("/api/v1/relays/{id}/heartbeat", post(relay_heartbeat))
        .route("/api/v1/relays/{id}/drain", post(drain_relay))
        .route("/api/v1/candidates/{title}", get(candidates))
        .route("/api/v1/sessions", post(create_session))
        .route("/api/v1/sessions/{id}", get(session_info))
        .route("/api/v1/sessions/{id}/end", post(end_session))
        .route("/api/v1/sessions/{id}/spectate", post(spectate))
        .route("/api/v1/usage", get(usage))
        .route("/api/v1/checkers", post(checks::register_checker))
        .route("/api/v1/checkers/{id}/approve", post(checks::approve_checker))
        .route("/api/v1/checkers/{id}/revoke", post(checks::revoke_checker))
        .route("/api/v1/checkers/{id}/checks", post(checks::next_check))
        .route("/api/v1/checks/{id}/report", post(checks::report_check))
        .route("/metrics", get(metrics))
        .merge(crate::web::router())
        .layer(cors)
        // The player's page on a relay asks for a new relay from that relay's origin: any
        // origin may, since only the session's current token does anything here.
        .merge(
            Router::new().route("/api/v1/sessions/{id}/move", post(move_session)).layer(
                tower_http::cors::CorsLayer::new()
                    .allow_origin(tower_http::cors::Any)
                    .allow_methods([axum::http::Method::POST])
                    .allow_headers([axum::http::header::CONTENT_TYPE])
                    .max_age(std::time::Duration::from_secs(600)),
            ),
        )
        .with_state(state)
}

/// Pages served by one replica may call the API of the others (the catalog fails over to
/// them); no other origin may, and no credentials cross (nothing here uses cookies).
fn replica_cors(replicas: &[String]) -> tower_http::cors::CorsLayer {
    let origins: Vec<axum::http::HeaderValue> = replicas
        .iter()
        .filter_map(|u| url_origin(u))
        .filter_map(|o| axum::http::HeaderValue::from_str(&o).ok())
        .collect();
    tower_http::cors::CorsLayer::new()
        .allow_origin(origins)
        .allow_methods([axum::http::Method::GET, axum::http::Method::POST])
        .allow_headers([axum::http::header::CONTENT_TYPE])
        .max_age(std::time::Duration::from_secs(600))
}

/// `scheme://host[:port]` of a base URL; `None` unless it is http(s).
fn url_origin(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    if scheme != "http" && scheme != "https" {
        return None;
    }
    let host = rest.split(['/', '?', '#']).next()?;
    (!host.is_empty()).then(|| format!("{scheme}://{host}"))
}

/// The OpenAPI document (OpenAPI 3.1), served at `/api/v1/openapi.json`.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Pylon indexer",
        description = "The pool of render nodes and relays, the catalog, matching and session tokens.\n\n\
            **Authentication.** Administrative calls carry the operator's token (`admin`: \
            `Authorization: Bearer <token>`). Render nodes, relays and checkers sign every request \
            with the ed25519 key they registered (`pylon_signature` + `pylon_timestamp` + `pylon_nonce`, all \
            three together): the signature, base64, is over \
            `\"{METHOD} {PATH}\\n{timestamp}\\n{nonce}\\n{body}\"`; the timestamp is Unix seconds \
            within 60 s of the indexer's clock; the nonce must be larger than any nonce that key \
            signed before (a replay is refused). Registration is signed by the key it registers. \
            Players are anonymous here and rate-limited per address; the session token the indexer \
            returns (`SessionCreated.token`) is presented to the relay, not to this API.\n\n\
            **Errors** are `ErrorBody` with a machine-readable `reason`; 429 and 503 carry \
            `Retry-After` (seconds).\n\n\
            **Listings** page: `limit` (1–1000, default 100) and `cursor` (the previous page's \
            `next_cursor`; absent on the last page)."
    ),
    modifiers(&SecuritySchemes),
    paths(
        public_key,
        replicas,
        list_titles,
        put_title,
        get_title,
        delete_title,
        list_nodes,
        register_node,
        node_info,
        approve_node,
        approve_relay,
        node_heartbeat,
        drain_node,
        revoke_node,
        revoke_relay,
        list_relays,
        register_relay,
        relay_heartbeat,
        drain_relay,
        candidates,
        create_session,
        end_session,
        spectate,
        move_session,
        session_info,
        usage,
        checks::register_checker,
        checks::approve_checker,
        checks::revoke_checker,
        checks::next_check,
        checks::report_check
    ),
    components(schemas(
        Title,
        InputKind,
        Probe,
        NodeRecord,
        RelayRecord,
        Usage,
        RegisterNode,
        NodeHeartbeat,
        NodeHeartbeatReply,
        RegisterRelay,
        RelayHeartbeat,
        NodeStatus,
        RelayStatus,
        MemberState,
        TitlePage,
        NodePage,
        RelayPage,
        UsagePage,
        CreateSession,
        SessionRole,
        SessionCreated,
        MoveSession,
        SessionInfo,
        Spectate,
        Candidate,
        PublicKey,
        Replicas,
        RelayHeartbeatReply,
        EndSession,
        NodeKeyInfo,
        ErrorBody,
        ErrorReason,
        RegisterChecker,
        CheckerRecord,
        CheckerStatus,
        CheckAssignment,
        CheckOutcome,
        NodeScore,
        Verdict,
        MeteringAudit
    ))
)]
pub struct ApiDoc;

/// The security schemes the operations name.
struct SecuritySchemes;

impl utoipa::Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "admin",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("The operator's admin token (PYLON_ADMIN_TOKEN or --admin-token-file)."))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "studio",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("The studio token (PYLON_STUDIO_TOKEN or --studio-token-file): deploys titles."))
                    .build(),
            ),
        );
        let header =
            |name: &str, what: &str| SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(name, what)));
        components.add_security_scheme(
            "pylon_signature",
            header(
                "x-pylon-signature",
                "Base64 ed25519 signature, by the caller's registered key, over \
                 \"{METHOD} {PATH}\\n{x-pylon-timestamp}\\n{x-pylon-nonce}\\n{body}\".",
            ),
        );
        components.add_security_scheme(
            "pylon_timestamp",
            header("x-pylon-timestamp", "Unix seconds; refused when more than 60 s from the indexer's clock."),
        );
        components.add_security_scheme(
            "pylon_nonce",
            header("x-pylon-nonce", "A number larger than any nonce this key signed before; a replay is refused."),
        );
    }
}

fn json<T: serde::de::DeserializeOwned>(body: &[u8]) -> ApiResult<T> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| ApiError::malformed(format!("malformed request: {e}")))?;
    if has_nul(&value) {
        // PostgreSQL cannot store it, and no name or id needs it.
        return Err(ApiError::invalid("text may not contain NUL characters"));
    }
    serde_json::from_value(value).map_err(|e| ApiError::malformed(format!("malformed request: {e}")))
}

fn has_nul(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::String(s) => s.contains('\0'),
        serde_json::Value::Array(a) => a.iter().any(has_nul),
        serde_json::Value::Object(o) => o.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

fn decode_key(b64: &str) -> ApiResult<VerifyingKey> {
    let bytes = STANDARD.decode(b64).map_err(|_| ApiError::invalid("public_key is not base64"))?;
    let arr: [u8; 32] = bytes.try_into().map_err(|_| ApiError::invalid("public_key must be 32 bytes"))?;
    VerifyingKey::from_bytes(&arr).map_err(|_| ApiError::invalid("public_key is not an ed25519 key"))
}

/// A listing's query parameters, parsed; a bad one is a 400 [`ErrorBody`] like every
/// other error (not axum's plain-text rejection).
pub struct ListQuery<T>(T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequestParts<S> for ListQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, _: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::try_from_uri(&parts.uri)
            .map(|q| ListQuery(q.0))
            .map_err(|e| ApiError::malformed(format!("bad query: {}", e.body_text())))
    }
}

/// A path's one id. One that does not decode (not UTF-8) names nothing that exists: a 404
/// [`ErrorBody`], as the operation documents, not axum's plain-text 400.
pub struct IdPath(String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for IdPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, Self::Rejection> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(id)| IdPath(id))
            .map_err(|_| ApiError::not_found("resource"))
    }
}

/// Items per page when the caller does not say.
pub const DEFAULT_PAGE: u32 = 100;
/// Most items per page.
pub const MAX_PAGE: u32 = 1000;

/// Paging of a listing.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// Items per page (1–1000, default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
    /// The previous page's `next_cursor`.
    pub cursor: Option<String>,
}

/// The nodes listing's paging and filters.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct NodeQuery {
    /// Items per page (1–1000, default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
    /// The previous page's `next_cursor`.
    pub cursor: Option<String>,
    /// Only nodes in this state.
    pub state: Option<MemberState>,
    /// Only nodes in this region.
    pub region: Option<String>,
    /// Only nodes that have this title installed.
    pub title: Option<String>,
}

/// The relays listing's paging and filters.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RelayQuery {
    /// Items per page (1–1000, default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
    /// The previous page's `next_cursor`.
    pub cursor: Option<String>,
    /// Only relays in this state.
    pub state: Option<MemberState>,
    /// Only relays in this region.
    pub region: Option<String>,
}

/// The page size `limit` asks for, or why it is refused.
fn page_size(limit: Option<u32>) -> ApiResult<usize> {
    match limit.unwrap_or(DEFAULT_PAGE) {
        n @ 1..=MAX_PAGE => Ok(n as usize),
        _ => Err(ApiError::invalid(format!("limit must be 1-{MAX_PAGE}"))),
    }
}

/// A cursor: the sort key of the last item returned, opaque to callers.
fn encode_cursor(key: &[&str]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(key).unwrap_or_default())
}

fn decode_cursor(cursor: Option<&str>, parts: usize) -> ApiResult<Option<Vec<String>>> {
    let Some(cursor) = cursor else { return Ok(None) };
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<Vec<String>>(&bytes).ok())
        .filter(|key| key.len() == parts)
        .map(Some)
        .ok_or_else(|| ApiError::malformed("bad cursor: pass a next_cursor this API returned"))
}

/// Rows read per query while a filtered listing fills a page.
const SCAN_CHUNK: usize = 500;

/// Fills a page of at most `limit` items from rows read in id order after `after`
/// (`fetch(after, n)`), keeping those `keep` accepts; the next cursor is the last kept
/// item's id when more may follow.
async fn scan_page<R, F, Fut>(
    after: Option<String>,
    limit: usize,
    mut fetch: F,
    keep: impl Fn(&R) -> bool,
    id: impl Fn(&R) -> &str,
) -> ApiResult<(Vec<R>, Option<String>)>
where
    F: FnMut(String, usize) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<R>, StoreError>>,
{
    let mut items = Vec::new();
    let mut after = after.unwrap_or_default();
    loop {
        let rows = fetch(after.clone(), SCAN_CHUNK).await?;
        let done = rows.len() < SCAN_CHUNK;
        if let Some(last) = rows.last() {
            after = id(last).to_string();
        }
        for row in rows {
            if keep(&row) {
                if items.len() == limit {
                    let next = items.last().map(|r| encode_cursor(&[id(r)]));
                    return Ok((items, next));
                }
                items.push(row);
            }
        }
        if done {
            return Ok((items, None));
        }
    }
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
fn signed_by(req: SignedRequest<'_>, key: &VerifyingKey) -> Result<i64, (ErrorReason, &'static str)> {
    let SignedRequest { method, path, headers, body } = req;
    let signed = signed_headers(headers).ok_or((
        ErrorReason::Unsigned,
        "a signed request needs x-pylon-timestamp, x-pylon-nonce and x-pylon-signature",
    ))?;
    if !fresh(signed.timestamp) {
        return Err((ErrorReason::Stale, "request timestamp too far from the indexer's clock"));
    }
    key.verify(&signed_message(method.as_str(), path, signed.timestamp, signed.nonce, body), &signed.signature)
        .map_err(|_| (ErrorReason::BadSignature, "bad request signature"))?;
    Ok(signed.nonce)
}

/// Verifies a request signed by `public_key` (its time window and signature; the nonce is
/// checked against the record by the caller). Returns the nonce.
fn verify_signed(state: &AppState, req: SignedRequest<'_>, public_key: &str) -> ApiResult<i64> {
    let key = decode_key(public_key)?;
    signed_by(req, &key).map_err(|(reason, why)| {
        state.metrics.refused_requests.inc();
        ApiError::unauthorized(reason, why)
    })
}

fn replayed(what: &str) -> ApiError {
    ApiError::unauthorized(ErrorReason::Replayed, format!("replayed {what}: its nonce is not newer than the last one"))
}

/// Spends `nonce` for member `id`: a replay (not newer than the last) is refused.
async fn spend_nonce(state: &AppState, member: Member, id: &str, nonce: i64) -> ApiResult<()> {
    if !state.store.bump_nonce(member, id, nonce).await? {
        state.metrics.refused_requests.inc();
        return Err(replayed("request"));
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

/// Whether the request's bearer token is `token` (compared in constant time; an empty
/// `token` matches nothing).
fn bearer_is(headers: &HeaderMap, token: &str) -> bool {
    use subtle::ConstantTimeEq;
    let given = headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(given) if !token.is_empty() => bool::from(given.as_bytes().ct_eq(token.as_bytes())),
        _ => false,
    }
}

/// Title changes: the admin or a studio.
fn check_studio(state: &AppState, headers: &HeaderMap) -> ApiResult<()> {
    if bearer_is(headers, &state.admin_token) || bearer_is(headers, &state.studio_token) {
        return Ok(());
    }
    state.metrics.refused_requests.inc();
    Err(ApiError::unauthorized(ErrorReason::NotAdmin, "deploying titles needs the studio or admin token"))
}

fn check_admin(state: &AppState, headers: &HeaderMap) -> ApiResult<()> {
    let ok = bearer_is(headers, &state.admin_token);
    if !ok {
        state.metrics.refused_requests.inc();
        return Err(ApiError::unauthorized(
            ErrorReason::NotAdmin,
            "administrative call needs the indexer's admin token",
        ));
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

/// The replicas serving this indexer (the catalog page fails over through them).
#[utoipa::path(get, path = "/api/v1/replicas", tag = "catalog",
    responses((status = 200, description = "Every replica's public base URL", body = Replicas)))]
async fn replicas(State(s): State<AppState>) -> Json<Replicas> {
    Json(Replicas { replicas: s.replicas.to_vec() })
}

#[utoipa::path(get, path = "/api/v1/public-key", tag = "pool",
    responses((status = 200, description = "The key session tokens are signed with", body = PublicKey)))]
async fn public_key(State(s): State<AppState>) -> Json<PublicKey> {
    Json(PublicKey { public_key: STANDARD.encode(s.signing_key.verifying_key().as_bytes()) })
}

/// A page of the catalog.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TitlePage {
    /// Titles, by name.
    pub items: Vec<Title>,
    /// Pass as `cursor` for the next page; absent on the last one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// The catalog, by name.
#[utoipa::path(get, path = "/api/v1/titles", tag = "catalog", params(PageQuery),
    responses(
        (status = 200, description = "A page of titles", body = TitlePage),
        (status = 400, description = "Bad limit or cursor", body = ErrorBody),
    ))]
async fn list_titles(State(s): State<AppState>, ListQuery(q): ListQuery<PageQuery>) -> ApiResult<Json<TitlePage>> {
    let limit = page_size(q.limit)?;
    let after = decode_cursor(q.cursor.as_deref(), 2)?;
    let after = after.as_ref().map(|k| (k[0].as_str(), k[1].as_str()));
    let mut items = s.store.titles_page(after, limit + 1).await?;
    let next_cursor = if items.len() > limit {
        items.truncate(limit);
        items.last().map(|t| encode_cursor(&[&t.name, &t.id]))
    } else {
        None
    };
    Ok(Json(TitlePage { items, next_cursor }))
}

/// Adds a title or replaces the one with its id (a studio deploying a title).
#[utoipa::path(post, path = "/api/v1/titles", tag = "catalog", request_body = Title, security(("studio" = []), ("admin" = [])),
    responses(
        (status = 201, description = "Stored"),
        (status = 400, description = "Malformed or invalid title", body = ErrorBody),
        (status = 401, description = "No or wrong studio or admin token", body = ErrorBody),
    ))]
async fn put_title(State(s): State<AppState>, headers: HeaderMap, body: Bytes) -> ApiResult<StatusCode> {
    check_studio(&s, &headers)?;
    let t: Title = json(&body)?;
    if let Err(why) = t.validate() {
        return Err(ApiError::invalid(why));
    }
    s.store.put_title(&t).await?;
    tracing::info!(title = %t.id, "title stored");
    Ok(StatusCode::CREATED)
}

/// One title.
#[utoipa::path(get, path = "/api/v1/titles/{id}", tag = "catalog",
    params(("id" = String, Path, description = "Title id")),
    responses(
        (status = 200, description = "The title", body = Title),
        (status = 404, description = "No such title", body = ErrorBody),
    ))]
async fn get_title(State(s): State<AppState>, IdPath(id): IdPath) -> ApiResult<Json<Title>> {
    Ok(Json(title_named(&s, &id).await?))
}

async fn title_named(s: &AppState, id: &str) -> ApiResult<Title> {
    if !valid_id(id) {
        return Err(ApiError::not_found("title"));
    }
    s.store.title(id).await?.ok_or_else(|| ApiError::not_found("title"))
}

/// Removes a title from the catalog: no new sessions of it (running ones go on).
#[utoipa::path(delete, path = "/api/v1/titles/{id}", tag = "catalog", security(("studio" = []), ("admin" = [])),
    params(("id" = String, Path, description = "Title id")),
    responses(
        (status = 204, description = "Removed"),
        (status = 401, description = "No or wrong studio or admin token", body = ErrorBody),
        (status = 404, description = "No such title", body = ErrorBody),
    ))]
async fn delete_title(State(s): State<AppState>, IdPath(id): IdPath, headers: HeaderMap) -> ApiResult<StatusCode> {
    check_studio(&s, &headers)?;
    if !valid_id(&id) || !s.store.delete_title(&id).await? {
        return Err(ApiError::not_found("title"));
    }
    tracing::info!(title = %id, "title removed");
    Ok(StatusCode::NO_CONTENT)
}

/// The state of a node or relay, as listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MemberState {
    /// Takes new sessions.
    Ready,
    /// A node finishing its sessions, or a relay whose viewers are moving away: no new ones.
    Draining,
    /// Not heard from for 15 s.
    Gone,
    /// Refused everywhere by the operator.
    Revoked,
    /// Waiting for the operator's approval.
    Pending,
    /// A node whose last decided check failed: no new players; checked again at once.
    Suspect,
    /// A node that failed its checks again while suspect: excluded until the operator
    /// approves it again.
    Failed,
}

impl MemberState {
    fn as_str(self) -> &'static str {
        match self {
            Self::Ready => "ready",
            Self::Draining => "draining",
            Self::Gone => "gone",
            Self::Revoked => "revoked",
            Self::Pending => "pending",
            Self::Suspect => "suspect",
            Self::Failed => "failed",
        }
    }
}

/// A node's health as listed.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct NodeStatus {
    /// The stored record.
    #[serde(flatten)]
    pub node: NodeRecord,
    /// Its state now.
    pub state: MemberState,
    /// What checkers found.
    pub score: NodeScore,
}

/// A page of nodes.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct NodePage {
    /// Nodes, by id.
    pub items: Vec<NodeStatus>,
    /// Pass as `cursor` for the next page; absent on the last one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// A relay's health as listed.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RelayStatus {
    /// The stored record.
    #[serde(flatten)]
    pub relay: RelayRecord,
    /// Its state now (never `draining`).
    pub state: MemberState,
    /// The indexer's ed25519 signature (base64) over the relay's id, QUIC address,
    /// certificate digest and key (`pylon_indexer_client::api::relay_attestation`): nodes
    /// and relays dial and pin only what verifies with the indexer's token key.
    pub attestation: String,
}

/// A page of relays.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RelayPage {
    /// Relays, by id.
    pub items: Vec<RelayStatus>,
    /// Pass as `cursor` for the next page; absent on the last one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// A relay's state.
fn relay_state(r: &RelayRecord, now: i64) -> MemberState {
    if r.revoked {
        MemberState::Revoked
    } else if !r.approved {
        MemberState::Pending
    } else if now.saturating_sub(r.last_heartbeat) > HEARTBEAT_TIMEOUT_SECS {
        MemberState::Gone
    } else if r.draining {
        MemberState::Draining
    } else {
        MemberState::Ready
    }
}

/// Whether a relay may be offered to players: approved, not revoked, heard from recently.
fn relay_healthy(r: &RelayRecord, now: i64) -> bool {
    relay_state(r, now) == MemberState::Ready
}

fn node_state(n: &NodeRecord, now: i64) -> MemberState {
    if n.revoked {
        MemberState::Revoked
    } else if !n.approved {
        MemberState::Pending
    } else if now.saturating_sub(n.last_heartbeat) > HEARTBEAT_TIMEOUT_SECS {
        MemberState::Gone
    } else if n.verdict == Verdict::Failed {
        MemberState::Failed
    } else if n.draining {
        MemberState::Draining
    } else if n.verdict == Verdict::Suspect {
        MemberState::Suspect
    } else {
        MemberState::Ready
    }
}

/// Registers a render node, or updates its record (only its key's holder can).
#[utoipa::path(post, path = "/api/v1/nodes", tag = "pool", request_body = RegisterNode,
    security(("pylon_signature" = [], "pylon_timestamp" = [], "pylon_nonce" = [])),
    responses(
        (status = 200, description = "Registered; the key session tokens are signed with", body = PublicKey),
        (status = 400, description = "Malformed or invalid registration", body = ErrorBody),
        (status = 401, description = "Not signed by the key it registers, stale or replayed", body = ErrorBody),
        (status = 403, description = "This node is revoked", body = ErrorBody),
        (status = 409, description = "The id is registered with another key", body = ErrorBody),
    ))]
async fn register_node(State(s): State<AppState>, headers: HeaderMap, body: Bytes) -> ApiResult<Json<PublicKey>> {
    let r: RegisterNode = json(&body)?;
    decode_key(&r.public_key)?;
    if !valid_id(&r.id) || r.capacity == 0 || !r.price_per_hour.is_finite() || r.price_per_hour < 0.0 {
        return Err(ApiError::invalid(
            "a node needs an id of 1-64 letters, digits or ._:-, a capacity and a non-negative price",
        ));
    }
    if let Some(t) = r.titles.iter().find(|t| !valid_id(t)) {
        return Err(ApiError::invalid(format!("bad title id {t:?}")));
    }
    // Proof of possession: the registration is signed by the key it registers.
    let req = SignedRequest { method: &Method::POST, path: "/api/v1/nodes", headers: &headers, body: &body };
    let nonce = verify_signed(&s, req, &r.public_key)?;
    if let Some(old) = s.store.node(&r.id).await? {
        may_register_again(&s, "node", &old.public_key, old.revoked, &r.public_key)?;
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
        verdict: Verdict::Unchecked,
        last_heartbeat: unix_now(),
    };
    if !s.store.register_node(&record, nonce).await? {
        s.metrics.refused_requests.inc();
        return Err(replayed("registration"));
    }
    tracing::info!(node = %r.id, provider = %r.provider, "node registered");
    Ok(public_key(State(s)).await)
}

/// Whether a `what` already registered with `old_key` (and revoked or not) may register
/// again with `key`: only with the same key (409 otherwise), and never once revoked (403).
fn may_register_again(s: &AppState, what: &str, old_key: &str, revoked: bool, key: &str) -> ApiResult<()> {
    if old_key != key {
        s.metrics.refused_requests.inc();
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            ErrorReason::KeyConflict,
            format!("this {what} id is registered with another key"),
        ));
    }
    if revoked {
        s.metrics.refused_requests.inc();
        return Err(ApiError::revoked(what));
    }
    Ok(())
}

/// Node `id`, checked: the request is signed by its key, not replayed, and the node is
/// not revoked.
async fn signed_node(
    s: &AppState,
    id: &str,
    method: Method,
    path: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> ApiResult<NodeRecord> {
    if !valid_id(id) {
        return Err(ApiError::not_found("node"));
    }
    let node = s.store.node(id).await?.ok_or_else(|| ApiError::not_found("node"))?;
    let req = SignedRequest { method: &method, path, headers, body };
    check_signature(s, Member::Node, id, req, &node.public_key).await?;
    if node.revoked {
        s.metrics.refused_requests.inc();
        return Err(ApiError::revoked("node"));
    }
    Ok(node)
}

/// A node's heartbeat: its sessions and titles now.
#[utoipa::path(post, path = "/api/v1/nodes/{id}/heartbeat", tag = "pool", request_body = NodeHeartbeat,
    params(("id" = String, Path, description = "Node id")),
    security(("pylon_signature" = [], "pylon_timestamp" = [], "pylon_nonce" = [])),
    responses(
        (status = 200, description = "Recorded; the relays the node's open sessions are on", body = NodeHeartbeatReply),
        (status = 400, description = "Malformed heartbeat", body = ErrorBody),
        (status = 401, description = "Not signed by the node's key, stale or replayed", body = ErrorBody),
        (status = 403, description = "This node is revoked", body = ErrorBody),
        (status = 404, description = "No such node", body = ErrorBody),
    ))]
async fn node_heartbeat(
    State(s): State<AppState>,
    IdPath(id): IdPath,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Json<NodeHeartbeatReply>> {
    let path = format!("/api/v1/nodes/{id}/heartbeat");
    signed_node(&s, &id, Method::POST, &path, &headers, &body).await?;
    let hb: NodeHeartbeat = json(&body)?;
    if hb.running.len() > MAX_RUNNING || hb.running.iter().any(|r| r.len() > 64) {
        return Err(ApiError::invalid(format!("at most {MAX_RUNNING} running session ids of at most 64 characters")));
    }
    let now = unix_now();
    s.store.node_heartbeat(&id, i64::from(hb.sessions), &hb.running, &hb.titles, now).await?;
    // A session the node does not run once its token could no longer be used to join
    // never started or was not reported ended: stop metering it.
    let (swept, relays) = s.store.sweep_node_sessions(&id, &hb.running, now - TOKEN_LIFETIME_SECS as i64, now).await?;
    if swept > 0 {
        s.metrics.sessions_ended.inc_by(swept);
        tracing::info!(node = %id, swept, "ended sessions the node does not run");
    }
    // A session may have been matched to a relay the node is not linked to: it links there.
    Ok(Json(NodeHeartbeatReply { relays }))
}

/// A node asks for no new sessions (it is about to leave).
#[utoipa::path(post, path = "/api/v1/nodes/{id}/drain", tag = "pool",
    params(("id" = String, Path, description = "Node id")),
    security(("pylon_signature" = [], "pylon_timestamp" = [], "pylon_nonce" = [])),
    responses(
        (status = 204, description = "Draining"),
        (status = 401, description = "Not signed by the node's key, stale or replayed", body = ErrorBody),
        (status = 403, description = "This node is revoked", body = ErrorBody),
        (status = 404, description = "No such node", body = ErrorBody),
    ))]
async fn drain_node(
    State(s): State<AppState>,
    IdPath(id): IdPath,
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
#[utoipa::path(get, path = "/api/v1/nodes/{id}", tag = "pool",
    params(("id" = String, Path, description = "Node id")),
    responses(
        (status = 200, description = "Its key and state", body = NodeKeyInfo),
        (status = 404, description = "No such node", body = ErrorBody),
    ))]
async fn node_info(State(s): State<AppState>, IdPath(id): IdPath) -> ApiResult<Json<NodeKeyInfo>> {
    if !valid_id(&id) {
        return Err(ApiError::not_found("node"));
    }
    let n = s.store.node(&id).await?.ok_or_else(|| ApiError::not_found("node"))?;
    let state = node_state(&n, unix_now()).as_str().to_string();
    Ok(Json(NodeKeyInfo { id: n.id, public_key: n.public_key, state }))
}

/// Admin calls on a member `id`: approve or revoke.
async fn admin_member(
    s: &AppState,
    headers: &HeaderMap,
    member: Member,
    id: &str,
    action: AdminAction,
) -> ApiResult<StatusCode> {
    check_admin(s, headers)?;
    let what = match member {
        Member::Node => "node",
        Member::Relay => "relay",
        Member::Checker => "checker",
    };
    let done = valid_id(id)
        && match action {
            AdminAction::Approve => s.store.approve(member, id).await?,
            AdminAction::Revoke => s.store.revoke(member, id).await?,
        };
    if !done {
        return Err(ApiError::not_found(what));
    }
    match action {
        AdminAction::Approve => tracing::info!(id, "{what} approved"),
        AdminAction::Revoke => tracing::warn!(id, "{what} revoked"),
    }
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Clone, Copy)]
enum AdminAction {
    Approve,
    Revoke,
}

/// The operator approves a node registered while new ones need approval.
#[utoipa::path(post, path = "/api/v1/nodes/{id}/approve", tag = "pool", security(("admin" = [])),
    params(("id" = String, Path, description = "Node id")),
    responses(
        (status = 204, description = "Approved"),
        (status = 401, description = "No or wrong admin token", body = ErrorBody),
        (status = 404, description = "No such node", body = ErrorBody),
    ))]
async fn approve_node(State(s): State<AppState>, IdPath(id): IdPath, headers: HeaderMap) -> ApiResult<StatusCode> {
    admin_member(&s, &headers, Member::Node, &id, AdminAction::Approve).await
}

/// The operator approves a relay registered while new ones need approval.
#[utoipa::path(post, path = "/api/v1/relays/{id}/approve", tag = "pool", security(("admin" = [])),
    params(("id" = String, Path, description = "Relay id")),
    responses(
        (status = 204, description = "Approved"),
        (status = 401, description = "No or wrong admin token", body = ErrorBody),
        (status = 404, description = "No such relay", body = ErrorBody),
    ))]
async fn approve_relay(State(s): State<AppState>, IdPath(id): IdPath, headers: HeaderMap) -> ApiResult<StatusCode> {
    admin_member(&s, &headers, Member::Relay, &id, AdminAction::Approve).await
}

/// The operator revokes a node: refused on every request, its relay connections closed.
#[utoipa::path(post, path = "/api/v1/nodes/{id}/revoke", tag = "pool", security(("admin" = [])),
    params(("id" = String, Path, description = "Node id")),
    responses(
        (status = 204, description = "Revoked"),
        (status = 401, description = "No or wrong admin token", body = ErrorBody),
        (status = 404, description = "No such node", body = ErrorBody),
    ))]
async fn revoke_node(State(s): State<AppState>, IdPath(id): IdPath, headers: HeaderMap) -> ApiResult<StatusCode> {
    admin_member(&s, &headers, Member::Node, &id, AdminAction::Revoke).await
}

/// The render nodes, by id, with their state; filtered by state, region and title.
#[utoipa::path(get, path = "/api/v1/nodes", tag = "pool", params(NodeQuery),
    responses(
        (status = 200, description = "A page of nodes", body = NodePage),
        (status = 400, description = "Bad limit, cursor or filter", body = ErrorBody),
    ))]
async fn list_nodes(State(s): State<AppState>, ListQuery(q): ListQuery<NodeQuery>) -> ApiResult<Json<NodePage>> {
    let limit = page_size(q.limit)?;
    let after = decode_cursor(q.cursor.as_deref(), 1)?.map(|mut k| k.remove(0));
    let now = unix_now();
    let keep = |n: &NodeRecord| {
        q.state.is_none_or(|st| node_state(n, now) == st)
            && q.region.as_deref().is_none_or(|r| n.info.get("region").and_then(|v| v.as_str()) == Some(r))
            && q.title.as_deref().is_none_or(|t| n.titles.iter().any(|x| x == t))
    };
    let store = &s.store;
    let (nodes, next_cursor) =
        scan_page(after, limit, |after, n| async move { store.nodes_after(&after, n).await }, keep, |n| &n.id).await?;
    let ids: Vec<String> = nodes.iter().map(|n| n.id.clone()).collect();
    let mut scores = s.store.scores(&ids).await?;
    let items = nodes
        .into_iter()
        .map(|n| {
            let mut score = scores.remove(&n.id).unwrap_or_default();
            score.verdict = n.verdict;
            NodeStatus { state: node_state(&n, now), score, node: n }
        })
        .collect();
    Ok(Json(NodePage { items, next_cursor }))
}

/// Registers an edge relay, or updates its record (only its key's holder can).
#[utoipa::path(post, path = "/api/v1/relays", tag = "pool", request_body = RegisterRelay,
    security(("pylon_signature" = [], "pylon_timestamp" = [], "pylon_nonce" = [])),
    responses(
        (status = 200, description = "Registered; the key session tokens are signed with", body = PublicKey),
        (status = 400, description = "Malformed or invalid registration", body = ErrorBody),
        (status = 401, description = "Not signed by the key it registers, stale or replayed", body = ErrorBody),
        (status = 403, description = "This relay is revoked", body = ErrorBody),
        (status = 409, description = "The id is registered with another key", body = ErrorBody),
    ))]
async fn register_relay(State(s): State<AppState>, headers: HeaderMap, body: Bytes) -> ApiResult<Json<PublicKey>> {
    let r: RegisterRelay = json(&body)?;
    decode_key(&r.public_key)?;
    if !valid_id(&r.id) || r.capacity == 0 || !r.public_url.starts_with("http") {
        return Err(ApiError::invalid(
            "a relay needs an id of 1-64 letters, digits or ._:-, a capacity and an http(s) public_url",
        ));
    }
    if !r.cert_sha256.is_empty() && !valid_sha256(&r.cert_sha256) {
        return Err(ApiError::invalid(
            "cert_sha256 must be 64 lowercase hex digits (the SHA-256 of the DER certificate)",
        ));
    }
    let req = SignedRequest { method: &Method::POST, path: "/api/v1/relays", headers: &headers, body: &body };
    let nonce = verify_signed(&s, req, &r.public_key)?;
    if let Some(old) = s.store.relay(&r.id).await? {
        may_register_again(&s, "relay", &old.public_key, old.revoked, &r.public_key)?;
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
        cert_sha256: r.cert_sha256,
        draining: false,
    };
    if !s.store.register_relay(&record, nonce).await? {
        s.metrics.refused_requests.inc();
        return Err(replayed("registration"));
    }
    tracing::info!(relay = %r.id, "relay registered");
    Ok(public_key(State(s)).await)
}

/// A relay's heartbeat: viewers, RTTs to nodes, connected players; the answer names
/// ended sessions and revoked nodes.
#[utoipa::path(post, path = "/api/v1/relays/{id}/heartbeat", tag = "pool", request_body = RelayHeartbeat,
    params(("id" = String, Path, description = "Relay id")),
    security(("pylon_signature" = [], "pylon_timestamp" = [], "pylon_nonce" = [])),
    responses(
        (status = 200, description = "Recorded", body = RelayHeartbeatReply),
        (status = 400, description = "Malformed heartbeat", body = ErrorBody),
        (status = 401, description = "Not signed by the relay's key, stale or replayed", body = ErrorBody),
        (status = 403, description = "This relay is revoked", body = ErrorBody),
        (status = 404, description = "No such relay", body = ErrorBody),
    ))]
async fn relay_heartbeat(
    State(s): State<AppState>,
    IdPath(id): IdPath,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Json<RelayHeartbeatReply>> {
    let relay = signed_relay(&s, &id, &format!("/api/v1/relays/{id}/heartbeat"), &headers, &body).await?;
    if relay.revoked {
        return Err(ApiError::revoked("relay"));
    }
    let hb: RelayHeartbeat = json(&body)?;
    if hb.node_rtt_ms.values().any(|v| !v.is_finite() || *v < 0.0) {
        return Err(ApiError::invalid("RTTs must be finite and non-negative"));
    }
    if hb.players.len() > 100_000 {
        return Err(ApiError::invalid("too many players"));
    }
    let now = unix_now();
    s.store.relay_heartbeat(&id, i64::from(hb.viewers), &hb.node_rtt_ms, now).await?;
    s.store.players_seen(&id, &hb.players, now).await?;
    // Tokens live TOKEN_LIFETIME_SECS: a session ended longer ago than that (plus the
    // clock skew allowed) cannot be joined again anyway.
    let since = now - TOKEN_LIFETIME_SECS as i64 - MAX_SKEW_SECS;
    let ended = s.store.ended_sessions_on_relay(&id, since).await?;
    Ok(Json(RelayHeartbeatReply {
        ended_sessions: ended.iter().map(|(s, _)| s.clone()).collect(),
        ended_reasons: ended.into_iter().filter(|(_, r)| !r.is_empty()).collect(),
        revoked_nodes: s.store.revoked_nodes().await?,
    }))
}

/// The relay `id` whose key signed this POST to `path` (with a fresh nonce).
async fn signed_relay(s: &AppState, id: &str, path: &str, headers: &HeaderMap, body: &[u8]) -> ApiResult<RelayRecord> {
    if !valid_id(id) {
        return Err(ApiError::not_found("relay"));
    }
    let relay = s.store.relay(id).await?.ok_or_else(|| ApiError::not_found("relay"))?;
    let req = SignedRequest { method: &Method::POST, path, headers, body };
    check_signature(s, Member::Relay, id, req, &relay.public_key).await?;
    Ok(relay)
}

/// A relay drains (it is stopping): no new viewers are sent to it, and no session is moved
/// there, until it registers again. Its viewers move on through `/sessions/{id}/move`.
#[utoipa::path(post, path = "/api/v1/relays/{id}/drain", tag = "pool",
    params(("id" = String, Path, description = "Relay id")),
    security(("pylon_signature" = [], "pylon_timestamp" = [], "pylon_nonce" = [])),
    responses(
        (status = 204, description = "Draining"),
        (status = 401, description = "Not signed by the relay's key, stale or replayed", body = ErrorBody),
        (status = 404, description = "No such relay", body = ErrorBody),
    ))]
async fn drain_relay(
    State(s): State<AppState>,
    IdPath(id): IdPath,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<StatusCode> {
    signed_relay(&s, &id, &format!("/api/v1/relays/{id}/drain"), &headers, &body).await?;
    s.store.set_relay_draining(&id).await?;
    tracing::info!(relay = %id, "relay draining: no new viewers");
    Ok(StatusCode::NO_CONTENT)
}

/// Prometheus metrics; the node gauge is counted at scrape time.
async fn metrics(State(s): State<AppState>) -> Response {
    let now = unix_now();
    match s.store.nodes().await {
        Ok(nodes) => {
            for state in [
                MemberState::Ready,
                MemberState::Draining,
                MemberState::Gone,
                MemberState::Revoked,
                MemberState::Pending,
                MemberState::Suspect,
                MemberState::Failed,
            ] {
                let n = nodes.iter().filter(|n| node_state(n, now) == state).count();
                s.metrics.nodes.get_or_create(&NodeStateLabel { state: state.as_str() }).set(n as i64);
            }
        }
        Err(e) => tracing::warn!("counting nodes for /metrics: {e}"),
    }
    pylon_runtime::metrics::response(s.metrics.render())
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

/// The operator revokes a relay: refused on every request, no longer offered to players.
#[utoipa::path(post, path = "/api/v1/relays/{id}/revoke", tag = "pool", security(("admin" = [])),
    params(("id" = String, Path, description = "Relay id")),
    responses(
        (status = 204, description = "Revoked"),
        (status = 401, description = "No or wrong admin token", body = ErrorBody),
        (status = 404, description = "No such relay", body = ErrorBody),
    ))]
async fn revoke_relay(State(s): State<AppState>, IdPath(id): IdPath, headers: HeaderMap) -> ApiResult<StatusCode> {
    admin_member(&s, &headers, Member::Relay, &id, AdminAction::Revoke).await
}

/// The edge relays, by id, with their state; filtered by state and region.
#[utoipa::path(get, path = "/api/v1/relays", tag = "pool", params(RelayQuery),
    responses(
        (status = 200, description = "A page of relays", body = RelayPage),
        (status = 400, description = "Bad limit, cursor or filter", body = ErrorBody),
    ))]
async fn list_relays(State(s): State<AppState>, ListQuery(q): ListQuery<RelayQuery>) -> ApiResult<Json<RelayPage>> {
    let limit = page_size(q.limit)?;
    let after = decode_cursor(q.cursor.as_deref(), 1)?.map(|mut k| k.remove(0));
    let now = unix_now();
    let keep = |r: &RelayRecord| {
        q.state.is_none_or(|st| relay_state(r, now) == st) && q.region.as_deref().is_none_or(|g| r.region == g)
    };
    let store = &s.store;
    let (relays, next_cursor) =
        scan_page(after, limit, |after, n| async move { store.relays_after(&after, n).await }, keep, |r| &r.id).await?;
    let items = relays
        .into_iter()
        .map(|r| {
            let attestation = s.attestations.of(&s.signing_key, &r);
            RelayStatus { state: relay_state(&r, now), relay: r, attestation }
        })
        .collect();
    Ok(Json(RelayPage { items, next_cursor }))
}

/// The relays a player of `title` should measure its RTT to: healthy, with room.
#[utoipa::path(get, path = "/api/v1/candidates/{title}", tag = "sessions",
    params(("title" = String, Path, description = "Title id")),
    responses(
        (status = 200, description = "Candidate relays", body = [Candidate]),
        (status = 404, description = "No such title", body = ErrorBody),
    ))]
async fn candidates(State(s): State<AppState>, IdPath(title): IdPath) -> ApiResult<Json<Vec<Candidate>>> {
    title_named(&s, &title).await?;
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

/// Matches a player (or spectator) of a title to a render node and relay and signs its
/// session token. Anonymous; rate-limited per address and per title.
#[utoipa::path(post, path = "/api/v1/sessions", tag = "sessions", request_body = CreateSession,
    responses(
        (status = 201, description = "Matched; play at `relay_url` with `token`", body = SessionCreated),
        (status = 400, description = "Malformed or invalid request", body = ErrorBody),
        (status = 404, description = "No such title", body = ErrorBody),
        (status = 429, description = "Too many requests from this address or for this title (`rate_limited`)",
            body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 503, description = "No capacity for this title now (`no_capacity`, `seat_taken`)",
            body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait"))),
    ))]
async fn create_session(
    State(s): State<AppState>,
    ClientAddr(addr): ClientAddr,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<SessionCreated>)> {
    let req: CreateSession = json(&body)?;
    if req.client_rtt_ms.values().any(|v| !v.is_finite() || *v < 0.0) {
        return Err(ApiError::invalid("RTTs must be finite and non-negative"));
    }
    let started_at = Instant::now();
    // A session holds a seat: anonymous callers pay for it in rate, per address and per title.
    if let Err(wait) = s.limiters.sessions_per_address.check(&addr, started_at) {
        s.metrics.rate_limited.inc();
        return Err(ApiError::too_many("session requests from this address", wait));
    }
    let title = title_named(&s, &req.title).await?;
    if let Err(wait) = s.limiters.sessions_per_title.check(&title.id, started_at) {
        s.metrics.rate_limited.inc();
        return Err(ApiError::too_many("session requests for this title", wait));
    }
    let role = match req.role.unwrap_or_default() {
        SessionRole::Player => Role::Player,
        SessionRole::Spectator => Role::Spectator,
    };
    let now = unix_now();
    let nodes = s.store.nodes().await?;
    let relays = s.store.relays().await?;
    let started = Instant::now();
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
    let farthest = selector::farthest_rtts(&relay_candidates);
    let candidates: Vec<NodeCandidate> = nodes
        .iter()
        .map(|n| NodeCandidate {
            id: n.id.clone(),
            state: match node_state(n, now) {
                MemberState::Ready => NodeState::Ready,
                MemberState::Draining => NodeState::Draining,
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
            farthest_rtt_ms: farthest.get(&n.id).copied(),
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
            return Err(ApiError::retry_later(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorReason::NoCapacity,
                e.to_string(),
                NO_CAPACITY_RETRY_SECS,
            ));
        }
    };
    let mut session = [0u8; 16];
    getrandom::fill(&mut session).map_err(|e| {
        tracing::error!("no randomness: {e}");
        ApiError::internal()
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
    let token = s.sign(&claims)?;
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
                check: false,
            },
            node.map_or(0, |n| n.capacity),
        )
        .await?;
    if !booked {
        // Another player took the last seat between the match and the booking.
        s.metrics.match_failures.get_or_create(&FailureReason { reason: "seat taken".into() }).inc();
        return Err(ApiError::retry_later(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorReason::SeatTaken,
            "the matched node just filled up",
            1,
        ));
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
/// shares `/watch/<session>`) may watch; a spectator token never carries input. With the
/// spectator's RTTs to candidate relays, the token is for the nearest healthy one with
/// room — which pulls the stream from the player's relay when it is another (a cascade);
/// without, for the player's relay.
#[utoipa::path(post, path = "/api/v1/sessions/{id}/spectate", tag = "sessions",
    request_body(content = Spectate, description = "Optional: the spectator's RTTs"),
    params(("id" = String, Path, description = "Session id (32 hex digits)")),
    responses(
        (status = 201, description = "A spectator token", body = SessionCreated),
        (status = 400, description = "Malformed body, or RTTs that are not finite and non-negative", body = ErrorBody),
        (status = 404, description = "No such running session", body = ErrorBody),
        (status = 429, description = "Too many requests from this address (`rate_limited`)",
            body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait"))),
    ))]
async fn spectate(
    State(s): State<AppState>,
    IdPath(id): IdPath,
    ClientAddr(addr): ClientAddr,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<SessionCreated>)> {
    if let Err(wait) = s.limiters.spectate_per_address.check(&addr, Instant::now()) {
        s.metrics.rate_limited.inc();
        return Err(ApiError::too_many("spectator requests from this address", wait));
    }
    let session: [u8; 16] = (id.len() == 32)
        .then(|| (0..16).map(|i| u8::from_str_radix(id.get(2 * i..2 * i + 2)?, 16).ok()).collect::<Option<Vec<u8>>>())
        .flatten()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| ApiError::not_found("session"))?;
    let req: Spectate = if body.is_empty() { Spectate::default() } else { json(&body)? };
    if req.client_rtt_ms.values().any(|v| !v.is_finite() || *v < 0.0) {
        return Err(ApiError::invalid("RTTs must be finite and non-negative"));
    }
    let (players_relay, node, ended) = s.store.session(&id).await?.ok_or_else(|| ApiError::not_found("session"))?;
    if ended {
        return Err(ApiError::not_found("running session"));
    }
    let title = s.store.session_title(&id).await?.unwrap_or_default();
    let now = unix_now();
    // The nearest healthy relay with room the spectator measured, else the player's.
    let relays = if req.client_rtt_ms.is_empty() { Vec::new() } else { s.store.relays().await? };
    let relay = relays
        .iter()
        .filter(|r| relay_healthy(r, now) && r.viewers < r.capacity)
        .filter_map(|r| Some((r, *req.client_rtt_ms.get(&r.id)?)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map_or(players_relay.clone(), |(r, _)| r.id.clone());
    let claims = Claims {
        session,
        role: Role::Spectator,
        issued_at: now as u64,
        expires_at: now as u64 + TOKEN_LIFETIME_SECS,
        title,
        node: node.clone(),
        relay: relay.clone(),
    };
    let token = s.sign(&claims)?;
    let relay_url = s.store.relay(&relay).await?.map(|r| r.public_url).unwrap_or_default();
    let reason = if relay == players_relay {
        "spectator of a running session, on its player's relay".into()
    } else {
        format!("spectator of a running session, nearest relay (pulling from {players_relay})")
    };
    Ok((
        StatusCode::CREATED,
        Json(SessionCreated { session: id, token, relay, relay_url, node, expected_ms: 0.0, reason }),
    ))
}

/// Moves a running session to another relay: its player's relay died or stopped
/// delivering. The caller proves it holds the session with the token it plays with — the
/// newest one, for the relay the session is on (an older token cannot move it again); its
/// expiry does not matter, the session's does. The indexer picks the healthy relay with
/// room that carries the node and is nearest the player (its measured RTTs, if given, plus
/// the relay's RTT to the node), records the move and signs a token for the same session
/// there; the node resumes the same game when the player arrives. A spectator's token is
/// answered with a token for the relay the session is on now (once its player moved).
#[utoipa::path(post, path = "/api/v1/sessions/{id}/move", tag = "sessions", request_body = MoveSession,
    params(("id" = String, Path, description = "Session id (32 hex digits)")),
    responses(
        (status = 201, description = "Moved; play at `relay_url` with `token`", body = SessionCreated),
        (status = 400, description = "Malformed body", body = ErrorBody),
        (status = 401, description = "The token is not this session's (`bad_signature`)", body = ErrorBody),
        (status = 404, description = "No such running session", body = ErrorBody),
        (status = 409, description = "The session already moved on with a newer token (`superseded`)", body = ErrorBody),
        (status = 410, description = "The session's node is gone (`node_gone`): the game is lost", body = ErrorBody),
        (status = 429, description = "Too many requests from this address (`rate_limited`)",
            body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 503, description = "No other relay can carry it now (`no_capacity`)",
            body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait"))),
    ))]
async fn move_session(
    State(s): State<AppState>,
    IdPath(id): IdPath,
    ClientAddr(addr): ClientAddr,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<SessionCreated>)> {
    if let Err(wait) = s.limiters.moves_per_address.check(&addr, Instant::now()) {
        s.metrics.rate_limited.inc();
        return Err(ApiError::too_many("session moves from this address", wait));
    }
    let req: MoveSession = json(&body)?;
    if req.client_rtt_ms.values().any(|v| !v.is_finite() || *v < 0.0) {
        return Err(ApiError::invalid("RTTs must be finite and non-negative"));
    }
    let claims = token::verify_signature(&req.token, &s.signing_key.verifying_key())
        .ok()
        .filter(|c| c.session_hex() == id)
        .ok_or_else(|| ApiError::unauthorized(ErrorReason::BadSignature, "not a token of this session"))?;
    let (relay, node, ended) = s.store.session(&id).await?.ok_or_else(|| ApiError::not_found("session"))?;
    // A dead node ends its sessions as it is found gone: the page hears why either way.
    let now = unix_now();
    let node_record = s.store.node(&node).await?;
    if node_record.as_ref().is_none_or(|n| !matches!(node_state(n, now), MemberState::Ready | MemberState::Draining)) {
        return Err(ApiError::new(StatusCode::GONE, ErrorReason::NodeGone, "the session's render node is gone"));
    }
    if ended {
        return Err(ApiError::not_found("running session"));
    }
    let title = s.store.session_title(&id).await?.unwrap_or_default();
    let sign = |role: Role, relay: &str| {
        let claims = Claims {
            session: claims.session,
            role,
            issued_at: now as u64,
            expires_at: now as u64 + TOKEN_LIFETIME_SECS,
            title: title.clone(),
            node: node.clone(),
            relay: relay.to_string(),
        };
        s.sign(&claims)
    };
    let answer = |token: String, relay: &str, url: String, reason: String| {
        (
            StatusCode::CREATED,
            Json(SessionCreated {
                session: id.clone(),
                token,
                relay: relay.to_string(),
                relay_url: url,
                node: node.clone(),
                expected_ms: 0.0,
                reason,
            }),
        )
    };
    if claims.role == Role::Spectator {
        if claims.relay == relay {
            return Err(ApiError::retry_later(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorReason::NoCapacity,
                "the session's player has not moved yet",
                1,
            ));
        }
        let url = s.store.relay(&relay).await?.map(|r| r.public_url).unwrap_or_default();
        return Ok(answer(sign(Role::Spectator, &relay)?, &relay, url, "the session's relay now".into()));
    }
    if claims.relay != relay {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            ErrorReason::Superseded,
            "the session already moved on with a newer token",
        ));
    }
    let relays = s.store.relays().await?;
    // The nearest by the caller's RTTs plus the relay's to the node; a relay the caller did
    // not measure counts as far as the farthest it did.
    let unmeasured = req.client_rtt_ms.values().copied().fold(0.0, f64::max);
    let best = relays
        .iter()
        .filter(|r| r.id != relay && relay_healthy(r, now) && r.viewers < r.capacity)
        .filter_map(|r| {
            let to_node = *r.node_rtt_ms.get(&node)?;
            Some((r, to_node + req.client_rtt_ms.get(&r.id).copied().unwrap_or(unmeasured)))
        })
        .min_by(|a, b| a.1.total_cmp(&b.1));
    let Some((to, expected)) = best else {
        s.metrics.match_failures.get_or_create(&FailureReason { reason: "no relay to move to".into() }).inc();
        return Err(ApiError::retry_later(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorReason::NoCapacity,
            "no other healthy relay carries the session's node now",
            1,
        ));
    };
    if !s.store.move_session(&id, &relay, &to.id).await? {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            ErrorReason::Superseded,
            "the session already moved on with a newer token",
        ));
    }
    s.metrics.sessions_moved.inc();
    tracing::info!(session = %id, from = %relay, to = %to.id, "moved the session to another relay");
    let token = sign(Role::Player, &to.id)?;
    let mut created = answer(token, &to.id, to.public_url.clone(), format!("moved from {relay}"));
    created.1.expected_ms = expected;
    Ok(created)
}

/// Where a running (or ended) session is: its player's relay, its node and title. Public
/// to whoever knows the id (a watch link carries it); relays near its spectators use it to
/// find the relay to pull the stream from.
#[utoipa::path(get, path = "/api/v1/sessions/{id}", tag = "sessions",
    params(("id" = String, Path, description = "Session id (32 hex digits)")),
    responses(
        (status = 200, description = "The session", body = SessionInfo),
        (status = 404, description = "No such session", body = ErrorBody),
    ))]
async fn session_info(State(s): State<AppState>, IdPath(id): IdPath) -> ApiResult<Json<SessionInfo>> {
    if !valid_id(&id) {
        return Err(ApiError::not_found("session"));
    }
    let (relay, node, ended) = s.store.session(&id).await?.ok_or_else(|| ApiError::not_found("session"))?;
    let title = s.store.session_title(&id).await?.unwrap_or_default();
    Ok(Json(SessionInfo { session: id, relay, node, title, running: !ended }))
}

/// Ends a session: called, signed, by the session's relay (the player left) or node, or
/// with the admin token.
#[utoipa::path(post, path = "/api/v1/sessions/{id}/end", tag = "sessions", request_body(content = EndSession, description = "Optional: why"),
    params(("id" = String, Path, description = "Session id (32 hex digits)")),
    security(("pylon_signature" = [], "pylon_timestamp" = [], "pylon_nonce" = []), ("admin" = [])),
    responses(
        (status = 204, description = "Ended"),
        (status = 400, description = "Malformed body", body = ErrorBody),
        (status = 401, description = "Neither the session's relay or node (signed) nor an admin", body = ErrorBody),
        (status = 404, description = "No such running session", body = ErrorBody),
        (status = 409, description = "Signed by the relay named in the body, which the session moved away from (`superseded`)", body = ErrorBody),
    ))]
async fn end_session(
    State(s): State<AppState>,
    IdPath(id): IdPath,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<StatusCode> {
    if !valid_id(&id) {
        return Err(ApiError::not_found("session"));
    }
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
            // A relay the session moved away from (its player left it for another) is
            // told so, signed or not told at all.
            let end: EndSession = if body.is_empty() { EndSession::default() } else { json(&body)? };
            if !end.relay.is_empty() && end.relay != relay && valid_id(&end.relay) {
                let key = s.store.relay(&end.relay).await?.map(|r| r.public_key);
                if let Some(nonce) = key.and_then(|k| signed_by(req, &decode_key(&k).ok()?).ok()) {
                    spend_nonce(&s, Member::Relay, &end.relay, nonce).await?;
                    return Err(ApiError::new(
                        StatusCode::CONFLICT,
                        ErrorReason::Superseded,
                        format!("the session moved to relay {relay}"),
                    ));
                }
            }
            s.metrics.refused_requests.inc();
            return Err(ApiError::unauthorized(
                ErrorReason::NotAllowed,
                "only the session's relay or node (signed) or an admin may end it",
            ));
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

/// A page of usage.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct UsagePage {
    /// Usage per provider, by provider.
    pub items: Vec<Usage>,
    /// Pass as `cursor` for the next page; absent on the last one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// Seconds played per provider (running sessions count up to now), for payouts.
#[utoipa::path(get, path = "/api/v1/usage", tag = "sessions", params(PageQuery),
    responses(
        (status = 200, description = "A page of usage", body = UsagePage),
        (status = 400, description = "Bad limit or cursor", body = ErrorBody),
    ))]
async fn usage(State(s): State<AppState>, ListQuery(q): ListQuery<PageQuery>) -> ApiResult<Json<UsagePage>> {
    let limit = page_size(q.limit)?;
    let after = decode_cursor(q.cursor.as_deref(), 1)?.map(|mut k| k.remove(0));
    let mut items = s.store.usage_page(unix_now(), after.as_deref(), limit + 1).await?;
    let next_cursor = if items.len() > limit {
        items.truncate(limit);
        items.last().map(|u| encode_cursor(&[&u.provider]))
    } else {
        None
    };
    Ok(Json(UsagePage { items, next_cursor }))
}
