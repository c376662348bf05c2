//! How render nodes, relays and checkers join the Pylon pool.
//!
//! * [`keys`]: an ed25519 key generated on first start and kept (mode 0600) in the data
//!   directory; the indexer uses the same code for its token-signing key.
//! * [`api`]: the request and reply bodies of the indexer's REST API (the indexer serves
//!   exactly these types, so the two cannot drift apart).
//! * [`Client`]: registration, signed heartbeats, drain, session end, and checkers'
//!   assignments and reports over HTTP.
//!
//! Every request of a node, relay or checker is signed, registration included (which proves
//! possession of the key it registers): headers `x-pylon-timestamp` (Unix seconds),
//! `x-pylon-nonce` (a number larger than any this key signed before: the indexer refuses
//! a replayed request) and `x-pylon-signature` (base64 ed25519 signature over
//! [`signed_message`]).

pub mod api;
pub mod keys;
pub mod pinned;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What a node or relay signs for a request:
/// `"{METHOD} {PATH}\n{timestamp}\n{nonce}\n{body}"`.
pub fn signed_message(method: &str, path: &str, timestamp: i64, nonce: i64, body: &[u8]) -> Vec<u8> {
    let mut m = format!("{method} {path}\n{timestamp}\n{nonce}\n").into_bytes();
    m.extend_from_slice(body);
    m
}

/// Strictly increasing request nonces: microseconds since the Unix epoch, or one more than
/// the last if the clock has not moved (or went back), so a restarted node or relay keeps
/// counting up.
#[derive(Debug, Default)]
pub struct NonceCounter(std::sync::atomic::AtomicI64);

impl NonceCounter {
    /// A counter that starts from the clock.
    pub const fn new() -> Self {
        Self(std::sync::atomic::AtomicI64::new(0))
    }

    /// The next nonce.
    pub fn next(&self) -> i64 {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0);
        let mut last = self.0.load(std::sync::atomic::Ordering::Relaxed);
        loop {
            let next = now.max(last + 1);
            match self.0.compare_exchange_weak(
                last,
                next,
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
            ) {
                Ok(_) => return next,
                Err(actual) => last = actual,
            }
        }
    }
}

/// Base64 of a public key, as the API carries it.
pub fn encode_key(key: &VerifyingKey) -> String {
    STANDARD.encode(key.as_bytes())
}

/// A public key from its base64 form.
pub fn decode_key(text: &str) -> Result<VerifyingKey, ClientError> {
    let bytes: [u8; 32] = STANDARD
        .decode(text.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| ClientError::BadKey("not 32 bytes of base64".into()))?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| ClientError::BadKey(e.to_string()))
}

fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// Talking to the indexer failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The indexer could not be reached or did not answer in time.
    #[error("indexer unreachable: {0}")]
    Unreachable(String),
    /// The indexer answered with an error.
    #[error("indexer refused {path}: {status} {message}")]
    Refused {
        /// The API path.
        path: String,
        /// HTTP status.
        status: u16,
        /// The indexer's message.
        message: String,
        /// Its machine-readable reason, when the body carried one.
        reason: Option<api::ErrorReason>,
    },
    /// The answer was not what the API promises.
    #[error("indexer answered {path} with a malformed body: {reason}")]
    Malformed {
        /// The API path.
        path: String,
        /// Why.
        reason: String,
    },
    /// A key in the wrong form.
    #[error("bad public key: {0}")]
    BadKey(String),
}

impl ClientError {
    /// Whether the indexer refused this caller for good (revoked, unknown, or another key
    /// owns the id), as opposed to a passing failure worth retrying.
    pub fn is_refusal(&self) -> bool {
        matches!(self, Self::Refused { status: 401 | 403 | 409, .. })
    }
}

/// Calls `register` until the indexer accepts (returning what it answered: a node's or
/// relay's token key), backing off from 250 ms to 5 s between passing failures.
/// `Ok(None)`: `shutdown` turned true first; `Err`: the indexer refused for good (see
/// [`ClientError::is_refusal`]).
pub async fn register_until_accepted<T, F, Fut>(
    mut register: F,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<Option<T>, ClientError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    let mut backoff = Duration::from_millis(250);
    loop {
        match register().await {
            Ok(answer) => return Ok(Some(answer)),
            Err(e) if e.is_refusal() => return Err(e),
            Err(e) => {
                tracing::warn!("cannot register with the indexer ({e}); retrying in {backoff:?}");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.wait_for(|s| *s) => return Ok(None),
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// A node's, relay's or checker's connection to the indexer: one replica or several
/// (replicas of one pool share its database and signing key, so any of them answers for
/// all).
///
/// Requests go to the replica that answered last. One that cannot be reached (connection
/// refused or not made within [`CONNECT_TIMEOUT`]) or whose proxy says it is down (502,
/// 503, 504) is passed over for the next, in the order given, within the same call: the
/// request never reached a replica, so sending it again cannot do it twice. A request that
/// reached a replica and got no answer in time fails (it may have been carried out); the
/// next call starts at the next replica.
#[derive(Debug, Clone)]
pub struct Client {
    bases: std::sync::Arc<[String]>,
    current: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    key: std::sync::Arc<SigningKey>,
    http: reqwest::Client,
    nonces: std::sync::Arc<NonceCounter>,
}

/// How long a replica has to accept a connection before the client tries the next.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a replica has to answer a request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

impl Client {
    /// A client for the indexer at `base` (e.g. `http://127.0.0.1:8090`), signing with `key`.
    pub fn new(base: &str, key: SigningKey) -> Result<Self, ClientError> {
        Self::with_replicas(&[base.to_string()], key)
    }

    /// A client for an indexer served by the replicas at `bases` (tried in this order),
    /// signing with `key`.
    pub fn with_replicas(bases: &[String], key: SigningKey) -> Result<Self, ClientError> {
        let bases: Vec<String> =
            bases.iter().map(|b| b.trim().trim_end_matches('/').to_string()).filter(|b| !b.is_empty()).collect();
        if bases.is_empty() {
            return Err(ClientError::Unreachable("no indexer URL given".into()));
        }
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .map_err(|e| ClientError::Unreachable(e.to_string()))?;
        Ok(Self {
            bases: bases.into(),
            current: std::sync::Arc::default(),
            key: std::sync::Arc::new(key),
            http,
            nonces: std::sync::Arc::default(),
        })
    }

    /// The base URL of the replica requests go to now.
    pub fn base(&self) -> &str {
        &self.bases[self.current.load(std::sync::atomic::Ordering::Relaxed) % self.bases.len()]
    }

    /// This caller's public key, base64.
    pub fn public_key(&self) -> String {
        encode_key(&self.key.verifying_key())
    }

    /// Registers a render node (signed with the key it registers); returns the
    /// indexer's token key.
    pub async fn register_node(&self, node: &api::RegisterNode) -> Result<VerifyingKey, ClientError> {
        let reply: api::PublicKey = self.call("POST", "/api/v1/nodes", Some(node), true).await?;
        decode_key(&reply.public_key)
    }

    /// Registers a relay (signed with the key it registers); returns the indexer's token
    /// key.
    pub async fn register_relay(&self, relay: &api::RegisterRelay) -> Result<VerifyingKey, ClientError> {
        let reply: api::PublicKey = self.call("POST", "/api/v1/relays", Some(relay), true).await?;
        decode_key(&reply.public_key)
    }

    /// The indexer's public record of node `id` (its key and state); `None` if unknown.
    pub async fn node(&self, id: &str) -> Result<Option<api::NodeKeyInfo>, ClientError> {
        match self.call::<(), _>("GET", &format!("/api/v1/nodes/{id}"), None, false).await {
            Ok(info) => Ok(Some(info)),
            Err(ClientError::Refused { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every title in the catalog (following the listing's pages).
    pub async fn titles(&self) -> Result<Vec<api::Title>, ClientError> {
        self.every("/api/v1/titles").await
    }

    /// Every relay of the pool: id, state and registered certificate (following the
    /// listing's pages).
    pub async fn relays(&self) -> Result<Vec<api::RelayEntry>, ClientError> {
        self.every("/api/v1/relays").await
    }

    /// Every item of the listing at `path`, following its pages (`next_cursor`), up to
    /// 100,000 items.
    async fn every<T: DeserializeOwned>(&self, path: &str) -> Result<Vec<T>, ClientError> {
        #[derive(serde::Deserialize)]
        struct Page<T> {
            items: Vec<T>,
            #[serde(default)]
            next_cursor: Option<String>,
        }
        let mut items = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let page_path = match &cursor {
                Some(c) => format!("{path}?limit=1000&cursor={c}"),
                None => format!("{path}?limit=1000"),
            };
            let page: Page<T> = self.call::<(), _>("GET", &page_path, None, false).await?;
            items.extend(page.items);
            match page.next_cursor {
                Some(c) if items.len() < 100_000 => cursor = Some(c),
                _ => return Ok(items),
            }
        }
    }

    /// One title's launch spec; `None` if the catalog has no such title.
    pub async fn title(&self, id: &str) -> Result<Option<api::Title>, ClientError> {
        if !api::valid_id(id) {
            return Ok(None);
        }
        match self.call::<(), _>("GET", &format!("/api/v1/titles/{id}"), None, false).await {
            Ok(t) => Ok(Some(t)),
            Err(ClientError::Refused { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A node's signed heartbeat.
    pub async fn node_heartbeat(
        &self,
        id: &str,
        hb: &api::NodeHeartbeat,
    ) -> Result<api::NodeHeartbeatReply, ClientError> {
        let path = format!("/api/v1/nodes/{id}/heartbeat");
        let resp = self.send("POST", &path, Some(hb), true).await?;
        // An indexer from before the answer had a body says 204: no relay to link.
        if resp.status() == reqwest::StatusCode::NO_CONTENT {
            return Ok(api::NodeHeartbeatReply::default());
        }
        resp.json().await.map_err(|e| ClientError::Malformed { path, reason: e.to_string() })
    }

    /// A node asks for no new sessions.
    pub async fn drain_node(&self, id: &str) -> Result<(), ClientError> {
        self.call_empty::<()>("POST", &format!("/api/v1/nodes/{id}/drain"), None).await
    }

    /// Where session `id` runs (its player's relay and node), `None` if there is no such
    /// session.
    pub async fn session_info(&self, id: &str) -> Result<Option<api::SessionInfo>, ClientError> {
        match self.call::<(), _>("GET", &format!("/api/v1/sessions/{id}"), None, false).await {
            Ok(info) => Ok(Some(info)),
            Err(ClientError::Refused { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Tells the indexer this relay is draining (stopping): no new viewers.
    pub async fn drain_relay(&self, id: &str) -> Result<(), ClientError> {
        self.call_empty::<()>("POST", &format!("/api/v1/relays/{id}/drain"), None).await
    }

    /// A relay's signed heartbeat; the reply names sessions that ended and nodes revoked.
    pub async fn relay_heartbeat(
        &self,
        id: &str,
        hb: &api::RelayHeartbeat,
    ) -> Result<api::RelayHeartbeatReply, ClientError> {
        self.call("POST", &format!("/api/v1/relays/{id}/heartbeat"), Some(hb), true).await
    }

    /// Reports that a session ended (signed by its relay or node).
    pub async fn end_session(&self, session: &str, reason: &str) -> Result<(), ClientError> {
        let body = api::EndSession { reason: reason.to_string(), relay: String::new() };
        self.call_empty("POST", &format!("/api/v1/sessions/{session}/end"), Some(&body)).await
    }

    /// Relay `relay` reports that a session's player left it; 409 if the session moved to
    /// another relay meanwhile.
    pub async fn end_session_at_relay(&self, session: &str, reason: &str, relay: &str) -> Result<(), ClientError> {
        let body = api::EndSession { reason: reason.to_string(), relay: relay.to_string() };
        self.call_empty("POST", &format!("/api/v1/sessions/{session}/end"), Some(&body)).await
    }

    /// Registers a checker (signed with the key it registers). A new checker is pending
    /// until the operator approves it.
    pub async fn register_checker(&self, checker: &api::RegisterChecker) -> Result<(), ClientError> {
        self.call_empty("POST", "/api/v1/checkers", Some(checker)).await
    }

    /// Asks the indexer for a check for checker `id`; `None` while no node is due.
    pub async fn next_check(&self, id: &str) -> Result<Option<api::CheckAssignment>, ClientError> {
        let path = format!("/api/v1/checkers/{id}/checks");
        let resp = self.send::<()>("POST", &path, None, true).await?;
        if resp.status() == reqwest::StatusCode::NO_CONTENT {
            return Ok(None);
        }
        resp.json().await.map(Some).map_err(|e| ClientError::Malformed { path, reason: e.to_string() })
    }

    /// Reports a check's outcome, signed by the checker it was assigned to.
    pub async fn report_check(&self, check: &str, outcome: &api::CheckOutcome) -> Result<(), ClientError> {
        self.call_empty("POST", &format!("/api/v1/checks/{check}/report"), Some(outcome)).await
    }

    async fn send<B: Serialize>(
        &self,
        method: &str,
        path: &str,
        body: Option<&B>,
        signed: bool,
    ) -> Result<reqwest::Response, ClientError> {
        let bytes = match body {
            Some(b) => serde_json::to_vec(b)
                .map_err(|e| ClientError::Malformed { path: path.into(), reason: e.to_string() })?,
            None => Vec::new(),
        };
        let method_value = reqwest::Method::from_bytes(method.as_bytes())
            .map_err(|e| ClientError::Malformed { path: path.into(), reason: e.to_string() })?;
        use std::sync::atomic::Ordering::Relaxed;
        let first = self.current.load(Relaxed);
        let mut attempt = 0;
        let resp = loop {
            let at = (first + attempt) % self.bases.len();
            let base = &self.bases[at];
            let mut req = self.http.request(method_value.clone(), format!("{base}{path}"));
            if body.is_some() {
                req = req.header("content-type", "application/json");
            }
            if signed {
                // Signed afresh for each replica: a nonce is spent once, wherever.
                let ts = unix_now();
                let nonce = self.nonces.next();
                let sig = self.key.sign(&signed_message(method, path, ts, nonce, &bytes));
                req = req
                    .header("x-pylon-timestamp", ts.to_string())
                    .header("x-pylon-nonce", nonce.to_string())
                    .header("x-pylon-signature", STANDARD.encode(sig.to_bytes()));
            }
            attempt += 1;
            let more = attempt < self.bases.len();
            match req.body(bytes.clone()).send().await {
                Ok(resp) if more && matches!(resp.status().as_u16(), 502..=504) => {
                    tracing::warn!(indexer = %base, status = resp.status().as_u16(), "indexer replica unavailable; trying the next");
                }
                Ok(resp) => {
                    if at != first % self.bases.len() {
                        tracing::info!(indexer = %base, "now using this indexer replica");
                    }
                    self.current.store(at, Relaxed);
                    break resp;
                }
                Err(e) if more && e.is_connect() => {
                    tracing::warn!(indexer = %base, "indexer replica unreachable ({e}); trying the next");
                }
                Err(e) => {
                    // It may have reached the replica: not sent again, but the next call
                    // starts at the next replica.
                    self.current.store((at + 1) % self.bases.len(), Relaxed);
                    return Err(ClientError::Unreachable(format!("{base}: {e}")));
                }
            }
        };
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let body = resp.json::<api::ErrorBody>().await.ok();
        let reason = body.as_ref().map(|b| b.reason);
        let message = body.map(|b| b.error).unwrap_or_default();
        Err(ClientError::Refused { path: path.into(), status, message, reason })
    }

    async fn call<B: Serialize, R: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&B>,
        signed: bool,
    ) -> Result<R, ClientError> {
        let resp = self.send(method, path, body, signed).await?;
        resp.json().await.map_err(|e| ClientError::Malformed { path: path.into(), reason: e.to_string() })
    }

    async fn call_empty<B: Serialize>(&self, method: &str, path: &str, body: Option<&B>) -> Result<(), ClientError> {
        self.send(method, path, body, true).await.map(|_| ())
    }
}
