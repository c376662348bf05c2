//! The relay as a member of the pool: registration and signed heartbeats to the indexer
//! (viewers, RTT to each connected render node), admission of viewers by session token,
//! refusal of tokens of ended sessions, and closing revoked nodes' connections.
//!
//! Outside a pool (no `--indexer`) none of this runs and any browser may watch or play.

use ed25519_dalek::VerifyingKey;
use pylon_indexer_client::api::{RegisterRelay, RelayEntry, RelayHeartbeat};
use pylon_indexer_client::{Client, ClientError, register_until_accepted};
use pylon_proto::token;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, watch};

/// How often the relay tells the indexer it is alive (the indexer gives up after 15 s).
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(3);
/// An ended session is remembered this long: past it, its token has expired anyway.
const ENDED_MEMORY_SECS: u64 = 600;

/// The current Unix time in seconds.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// How to join the pool.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// The indexer's base URL, or each of its replicas' (tried in this order).
    pub indexer: Vec<String>,
    /// The relay's id (default: from its key).
    pub id: Option<String>,
    /// Owner account.
    pub owner: String,
    /// Region name.
    pub region: String,
    /// Where browsers reach the relay (default: its HTTP address).
    pub public_url: Option<String>,
    /// Where nodes reach its QUIC ingest (default: its bound QUIC address).
    pub public_quic: Option<String>,
    /// Viewers it serves at most.
    pub capacity: u32,
}

/// A viewer admitted by token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    /// Session id, hex.
    pub session: String,
    /// Whether the token is a player's.
    pub player: bool,
    /// The node the session runs on.
    pub node: String,
}

/// How long a node's key, as the indexer holds it, is trusted before asking again.
/// Revocations reach the relay sooner, with every heartbeat.
pub const NODE_KEY_TTL: Duration = Duration::from_secs(60);

/// Whether a node may stream to this relay, after checking its proven key against the
/// indexer's record of the id it claims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeCheck {
    /// The key is the registered one; the node is approved and not revoked.
    Admitted,
    /// The hello names no node id.
    NoId,
    /// The indexer knows no node of that id.
    Unknown,
    /// The id is registered with another key: an impostor.
    KeyMismatch,
    /// The indexer revoked the node.
    Revoked,
    /// The operator has not approved the node yet.
    NotApproved,
    /// The indexer could not be asked (the node retries).
    Unreachable(String),
}

impl std::fmt::Display for NodeCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NodeCheck::Admitted => write!(f, "admitted"),
            NodeCheck::NoId => write!(f, "a node in a pool must name its id"),
            NodeCheck::Unknown => write!(f, "no node of this id is registered with the indexer"),
            NodeCheck::KeyMismatch => write!(f, "this node id is registered with another key"),
            NodeCheck::Revoked => write!(f, "this node is revoked"),
            NodeCheck::NotApproved => write!(f, "this node awaits the operator's approval"),
            NodeCheck::Unreachable(e) => write!(f, "cannot check the node with the indexer: {e}"),
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    key: Option<VerifyingKey>,
    ended: HashMap<String, u64>,
    revoked: HashSet<String>,
    node_rtt_ms: HashMap<String, f64>,
    /// The indexer's record of nodes that connected: key (base64), state, when fetched.
    node_keys: HashMap<String, (String, String, std::time::Instant)>,
    /// Sessions whose player is connected here (metering follows this, not the node).
    players: HashSet<String>,
    /// Sessions the indexer ended (e.g. their node is gone), with why, whose viewers here
    /// are still to be closed (taken by the egress task).
    to_close: Vec<(String, String)>,
}

/// The relay's view of the pool, shared by signalling, ingest and egress.
#[derive(Debug, Clone)]
pub struct Pool {
    id: String,
    inner: Arc<Mutex<Inner>>,
    ended_tx: mpsc::UnboundedSender<(String, String)>,
    client: Option<Client>,
}

impl Pool {
    /// A pool view for relay `id`, asking the indexer through `client` about nodes; the
    /// receiver yields sessions to report ended.
    pub fn new(id: &str, client: Option<Client>) -> (Self, mpsc::UnboundedReceiver<(String, String)>) {
        let (ended_tx, ended_rx) = mpsc::unbounded_channel();
        (Self { id: id.to_string(), inner: Arc::default(), ended_tx, client }, ended_rx)
    }

    /// Checks a node's proven `key` against the indexer's record of `node` (cached for
    /// [`NODE_KEY_TTL`]) and the revocations heard with heartbeats.
    pub async fn check_node(&self, node: &str, key: &VerifyingKey) -> NodeCheck {
        if node.is_empty() {
            return NodeCheck::NoId;
        }
        if self.is_revoked(node) {
            return NodeCheck::Revoked;
        }
        let cached = self
            .lock()
            .node_keys
            .get(node)
            .filter(|(_, _, at)| at.elapsed() < NODE_KEY_TTL)
            .map(|(k, st, _)| (k.clone(), st.clone()));
        let (registered, state) = match cached {
            Some(c) => c,
            None => {
                let Some(client) = &self.client else { return NodeCheck::Unknown };
                match client.node(node).await {
                    Ok(Some(record)) => {
                        // A node awaiting approval is asked about again next time, so it is
                        // admitted as soon as the operator approves it.
                        if record.state != "pending" {
                            self.lock().node_keys.insert(
                                node.to_string(),
                                (record.public_key.clone(), record.state.clone(), std::time::Instant::now()),
                            );
                        }
                        (record.public_key, record.state)
                    }
                    Ok(None) => return NodeCheck::Unknown,
                    Err(e) => return NodeCheck::Unreachable(e.to_string()),
                }
            }
        };
        if pylon_indexer_client::decode_key(&registered).ok().as_ref() != Some(key) {
            return NodeCheck::KeyMismatch;
        }
        match state.as_str() {
            "revoked" => NodeCheck::Revoked,
            "pending" => NodeCheck::NotApproved,
            _ => NodeCheck::Admitted,
        }
    }

    /// The sessions whose player is connected here now.
    pub fn set_players(&self, sessions: Vec<String>) {
        self.lock().players = sessions.into_iter().collect();
    }

    fn players(&self) -> Vec<String> {
        let mut v: Vec<String> = self.lock().players.iter().cloned().collect();
        v.sort();
        v
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// This relay's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The indexer client, in a pool.
    pub fn client(&self) -> Option<&Client> {
        self.client.as_ref()
    }

    /// Whether `key` is the registered key of relay `relay`, one of the pool's (ready or
    /// draining), which may then pull a stream from this one. Asks the indexer each time
    /// (a pull is rare: once per session and relay).
    pub async fn check_relay(&self, relay: &str, key: &VerifyingKey) -> Result<(), String> {
        let r = self.cascade_peer(relay).await?;
        if pylon_indexer_client::decode_key(&r.public_key).ok().as_ref() != Some(key) {
            return Err(format!("not the key {relay} registered"));
        }
        Ok(())
    }

    /// The indexer's entry for relay `relay`, one a cascade may involve: of the pool, ready
    /// or draining, and vouched for by the indexer's signature (its address, certificate
    /// and key come from the indexer, not from whoever sits between). Asks the indexer.
    pub async fn cascade_peer(&self, relay: &str) -> Result<RelayEntry, String> {
        let client = self.client.as_ref().ok_or("not in a pool")?;
        let relays = client.relays().await.map_err(|e| format!("cannot ask the indexer: {e}"))?;
        let Some(r) = relays.into_iter().find(|r| r.id == relay) else {
            return Err(format!("{relay} is not a relay of the pool"));
        };
        if !matches!(r.state.as_str(), "ready" | "draining") {
            return Err(format!("{relay} is {}", r.state));
        }
        if !self.indexer_key().is_some_and(|k| r.attested_by(&k)) {
            return Err(format!("the indexer's listing of {relay} does not carry its valid signature"));
        }
        Ok(r)
    }

    /// Tells the indexer this relay is draining: it sends it no new viewers.
    pub async fn drain(&self) -> Result<(), pylon_indexer_client::ClientError> {
        match &self.client {
            Some(client) => client.drain_relay(&self.id).await,
            None => Ok(()),
        }
    }

    /// Sets the indexer's token key.
    pub fn set_key(&self, key: VerifyingKey) {
        self.lock().key = Some(key);
    }

    /// The indexer's token key, once registered: it also signs the relays it lists.
    pub fn indexer_key(&self) -> Option<VerifyingKey> {
        self.lock().key
    }

    /// Checks a viewer's token at `now`: signed by the indexer, unexpired, for this relay,
    /// of a session that has not ended.
    pub fn admit(&self, token_text: &str, now: u64) -> Result<Admission, String> {
        let inner = self.lock();
        let key = inner.key.ok_or("this relay has not registered with the indexer yet; try again shortly")?;
        let claims = token::verify(token_text, &key, now).map_err(|e| format!("session token refused: {e}"))?;
        claims.check_relay(&self.id).map_err(|e| format!("session token refused: {e}"))?;
        let session = claims.session_hex();
        if inner.ended.contains_key(&session) {
            return Err("session token refused: this session has ended".into());
        }
        Ok(Admission { session, player: claims.may_send_input(), node: claims.node })
    }

    /// The player of `session` left: its token is refused from now on, and the indexer
    /// is told (metering) with `reason`.
    pub fn session_ended(&self, session: &str, reason: &str) {
        let first = {
            let mut inner = self.lock();
            inner.players.remove(session);
            inner.ended.insert(session.to_string(), unix_now()).is_none()
        };
        if first {
            let _ = self.ended_tx.send((session.to_string(), reason.to_string()));
        }
    }

    /// Records the RTT to a connected node.
    pub fn set_node_rtt(&self, node: &str, rtt: Duration) {
        if !node.is_empty() {
            self.lock().node_rtt_ms.insert(node.to_string(), rtt.as_secs_f64() * 1000.0);
        }
    }

    /// A node's connection ended.
    pub fn node_gone(&self, node: &str) {
        self.lock().node_rtt_ms.remove(node);
    }

    /// Whether the indexer revoked this node.
    pub fn is_revoked(&self, node: &str) -> bool {
        self.lock().revoked.contains(node)
    }

    /// Sessions the indexer ended since the last call, with why: their viewers are closed.
    pub fn take_closed_by_indexer(&self) -> Vec<(String, String)> {
        std::mem::take(&mut self.lock().to_close)
    }

    fn apply(&self, ended: Vec<String>, reasons: &BTreeMap<String, String>, revoked: Vec<String>, now: u64) {
        let mut inner = self.lock();
        for node in &revoked {
            inner.node_keys.remove(node);
        }
        for s in ended {
            if inner.ended.contains_key(&s) {
                continue;
            }
            inner.ended.insert(s.clone(), now);
            // Ended by the indexer, not here: whoever still watches it is told why.
            if inner.to_close.len() < MAX_UNREPORTED {
                let reason = reasons.get(&s).cloned().unwrap_or_else(|| "the session ended".into());
                inner.to_close.push((s, reason));
            }
        }
        inner.ended.retain(|_, at| now.saturating_sub(*at) < ENDED_MEMORY_SECS);
        inner.revoked = revoked.into_iter().collect();
    }

    fn node_rtts(&self) -> BTreeMap<String, f64> {
        self.lock().node_rtt_ms.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }
}

/// Registers the relay, heartbeats, and reports ended sessions until `shutdown`. Returns
/// `Err` when the indexer refuses the relay for good.
pub async fn run(
    client: Client,
    registration: RegisterRelay,
    pool: Pool,
    viewers: impl Fn() -> u32,
    mut ended: mpsc::UnboundedReceiver<(String, String)>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ClientError> {
    let Some(key) = register_until_accepted(|| client.register_relay(&registration), &mut shutdown).await? else {
        return Ok(());
    };
    pool.set_key(key);
    tracing::info!(relay = %registration.id, indexer = %client.base(), "registered with the indexer");
    let mut tick = tokio::time::interval(HEARTBEAT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Session ends the indexer has not acknowledged yet: retried with every heartbeat
    // (metering stops only when the indexer knows).
    let mut unreported: Vec<(String, String)> = Vec::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let hb = RelayHeartbeat { viewers: viewers(), node_rtt_ms: pool.node_rtts(), players: pool.players() };
                match client.relay_heartbeat(&registration.id, &hb).await {
                    Ok(reply) => {
                        pool.apply(reply.ended_sessions, &reply.ended_reasons, reply.revoked_nodes, unix_now())
                    }
                    Err(e) if e.is_refusal() => return Err(e),
                    Err(e) => tracing::warn!("heartbeat failed: {e}"),
                }
                let mut still = Vec::new();
                for (session, reason) in unreported.drain(..) {
                    if !report_end(&client, &registration.id, &session, &reason).await {
                        still.push((session, reason));
                    }
                }
                unreported = still;
            }
            Some((session, reason)) = ended.recv() => {
                if !report_end(&client, &registration.id, &session, &reason).await && unreported.len() < MAX_UNREPORTED {
                    unreported.push((session, reason));
                }
            }
            _ = crate::stopped(&mut shutdown) => return Ok(()),
        }
    }
}

/// Session ends kept for retrying at most (each is a few dozen bytes).
const MAX_UNREPORTED: usize = 10_000;

/// Tells the indexer a session ended; `true` once it is acknowledged (or the indexer says
/// the session is unknown or already ended, which needs no retry).
async fn report_end(client: &Client, relay: &str, session: &str, reason: &str) -> bool {
    match client.end_session_at_relay(session, reason, relay).await {
        Ok(()) => {
            tracing::info!(session, reason, "session ended");
            true
        }
        Err(ClientError::Refused { status: 404, .. }) => true,
        // The session moved to another relay (its player left this one for it): that
        // relay reports its end.
        Err(ClientError::Refused { status: 409, .. }) => {
            tracing::info!(session, "the session moved to another relay");
            true
        }
        Err(e) => {
            tracing::warn!(session, "could not report the session's end (will retry): {e}");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;
    use pylon_proto::token::{Claims, Role};

    fn token(key: &SigningKey, session: u8, relay: &str, role: Role, expires_at: u64) -> String {
        Claims {
            session: [session; 16],
            role,
            issued_at: 1_000,
            expires_at,
            title: "demo".into(),
            node: "node-a".into(),
            relay: relay.into(),
        }
        .sign(key)
        .unwrap()
    }

    #[test]
    fn tokens_are_checked_and_ended_sessions_refused() {
        let indexer = SigningKey::from_bytes(&[1; 32]);
        let (pool, mut ended) = Pool::new("relay-1", None);
        assert!(pool.admit(&token(&indexer, 1, "relay-1", Role::Player, 2_000), 1_500).is_err(), "no key yet");
        pool.set_key(indexer.verifying_key());
        let forger = SigningKey::from_bytes(&[2; 32]);
        for (text, why) in [
            (token(&forger, 1, "relay-1", Role::Player, 2_000), "forged"),
            (token(&indexer, 1, "relay-1", Role::Player, 1_400), "expired"),
            (token(&indexer, 1, "relay-2", Role::Player, 2_000), "another relay's"),
            ("x.y".into(), "malformed"),
        ] {
            assert!(pool.admit(&text, 1_500).is_err(), "{why} token admitted");
        }
        let player = pool.admit(&token(&indexer, 1, "relay-1", Role::Player, 2_000), 1_500).unwrap();
        assert!(player.player);
        assert_eq!(player.node, "node-a");
        let spectator = pool.admit(&token(&indexer, 1, "relay-1", Role::Spectator, 2_000), 1_500).unwrap();
        assert!(!spectator.player, "a spectator token never plays");

        // The player leaves: reported once, and the token cannot be replayed.
        pool.session_ended(&player.session, "player left");
        pool.session_ended(&player.session, "player left");
        assert_eq!(ended.try_recv().unwrap(), (player.session.clone(), "player left".into()));
        assert!(ended.try_recv().is_err());
        let replay = pool.admit(&token(&indexer, 1, "relay-1", Role::Player, 2_000), 1_500);
        assert!(replay.unwrap_err().contains("ended"));

        // Sessions ended elsewhere arrive with the heartbeat; revocations too.
        let other = Claims { session: [2; 16], ..verify_claims(&indexer) }.session_hex();
        let reasons = BTreeMap::from([(other.clone(), "node gone".to_string())]);
        pool.apply(vec![other.clone(), player.session.clone()], &reasons, vec!["node-x".into()], unix_now());
        assert!(pool.admit(&token(&indexer, 2, "relay-1", Role::Player, 2_000), 1_500).is_err());
        assert!(pool.is_revoked("node-x") && !pool.is_revoked("node-a"));
        // Its viewers here are closed, told why, once; the one that ended here needs nothing.
        assert_eq!(pool.take_closed_by_indexer(), vec![(other.clone(), "node gone".to_string())]);
        pool.apply(vec![other], &reasons, Vec::new(), unix_now());
        assert!(pool.take_closed_by_indexer().is_empty());
    }

    fn verify_claims(key: &SigningKey) -> Claims {
        token::verify(&token(key, 9, "relay-1", Role::Player, 2_000), &key.verifying_key(), 1_500).unwrap()
    }

    #[test]
    fn node_rtts_follow_connections() {
        let (pool, _ended) = Pool::new("relay-1", None);
        pool.set_node_rtt("node-a", Duration::from_micros(1500));
        pool.set_node_rtt("", Duration::from_millis(1));
        assert_eq!(pool.node_rtts(), BTreeMap::from([("node-a".to_string(), 1.5)]));
        pool.node_gone("node-a");
        assert!(pool.node_rtts().is_empty());
    }
}
