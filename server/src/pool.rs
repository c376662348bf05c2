//! The render node as a member of the pool: registration and signed heartbeats to the
//! indexer, draining, and the gate that admits a player only with a session token the
//! node verifies itself.
//!
//! Outside a pool (no `--indexer`) the gate is open: whoever the relay names player may
//! play, as in development.

use ed25519_dalek::VerifyingKey;
use pylon_indexer_client::api::{NodeHeartbeat, RegisterNode};
use pylon_indexer_client::{Client, ClientError, register_until_accepted};
use pylon_proto::token::{self, Role, TokenError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

/// How often a node tells the indexer it is alive (the indexer gives up after 15 s).
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(3);

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Why a session was refused at the node.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GateError {
    /// The token did not verify (forged, expired, malformed, another node's).
    #[error(transparent)]
    Token(#[from] TokenError),
    /// A spectator token cannot start the player's session.
    #[error("a spectator token cannot start a session")]
    Spectator,
    /// The node is not yet registered, so it has no key to verify with.
    #[error("the node has not registered with the indexer yet")]
    NoKey,
}

#[derive(Debug, Default)]
struct GateState {
    /// The indexer's token key, once registered.
    key: Option<VerifyingKey>,
    /// The running session (hex id).
    session: Option<String>,
}

/// Who may play on this node.
#[derive(Debug, Clone)]
pub struct SessionGate {
    node: Option<String>,
    state: Arc<Mutex<GateState>>,
}

impl SessionGate {
    /// A gate that admits any input: a node outside a pool.
    pub fn open() -> Self {
        Self { node: None, state: Arc::default() }
    }

    /// A gate for node `node` of a pool: input only inside a verified session.
    pub fn pooled(node: &str) -> Self {
        Self { node: Some(node.to_string()), state: Arc::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The node's id in the pool, if in one.
    pub fn node(&self) -> Option<&str> {
        self.node.as_deref()
    }

    /// Sets the indexer's token key (from registration).
    pub fn set_key(&self, key: VerifyingKey) {
        self.lock().key = Some(key);
    }

    /// A player joined at the relay with `token`: verified against the indexer's key, this
    /// node's id, its expiry at `now` (Unix seconds) and its role. Returns the session id.
    pub fn start(&self, token_text: &str, now: u64) -> Result<String, GateError> {
        let Some(node) = &self.node else {
            return Ok(String::new());
        };
        let mut state = self.lock();
        let key = state.key.ok_or(GateError::NoKey)?;
        let claims = token::verify(token_text, &key, now)?;
        claims.check_node(node)?;
        if claims.role != Role::Player {
            return Err(GateError::Spectator);
        }
        let id = claims.session_hex();
        state.session = Some(id.clone());
        Ok(id)
    }

    /// The player of `session` left (or the relay connection ended: `None`).
    pub fn end(&self, session: Option<&str>) {
        let mut state = self.lock();
        if session.is_none() || state.session.as_deref() == session {
            state.session = None;
        }
    }

    /// Whether player input is accepted now.
    pub fn accepts_input(&self) -> bool {
        self.node.is_none() || self.lock().session.is_some()
    }

    /// The sessions running (for heartbeats).
    pub fn running(&self) -> Vec<String> {
        self.lock().session.iter().cloned().collect()
    }
}

/// Registers the node, then heartbeats until `shutdown`. Returns `Err` when the indexer
/// refuses the node for good (revoked, or its id taken by another key): the node must
/// stop. Passing failures are retried with backoff and logged.
pub async fn run_membership(
    client: Client,
    registration: RegisterNode,
    gate: SessionGate,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ClientError> {
    let Some(key) = register_until_accepted(|| client.register_node(&registration), &mut shutdown).await? else {
        return Ok(());
    };
    gate.set_key(key);
    tracing::info!(node = %registration.id, indexer = %client.base(), "registered with the indexer");
    let mut tick = tokio::time::interval(HEARTBEAT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return Ok(()),
        }
        let running = gate.running();
        let hb = NodeHeartbeat { sessions: running.len() as u32, running, titles: registration.titles.clone() };
        match client.node_heartbeat(&registration.id, &hb).await {
            Ok(()) => {}
            Err(e) if e.is_refusal() => return Err(e),
            Err(e) => tracing::warn!("heartbeat failed: {e}"),
        }
    }
}

/// Drains the node: no new sessions; then waits (up to `timeout`) for the running session
/// to end. Returns whether it ended in time.
pub async fn drain(client: &Client, node: &str, gate: &SessionGate, timeout: Duration) -> bool {
    match client.drain_node(node).await {
        Ok(()) => tracing::info!("draining: the indexer sends no new players; waiting for the running session"),
        Err(e) => tracing::warn!("could not tell the indexer we are draining: {e}"),
    }
    let deadline = tokio::time::Instant::now() + timeout;
    while !gate.running().is_empty() {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    true
}

/// The current Unix time, for [`SessionGate::start`].
pub fn now() -> u64 {
    unix_now()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;
    use pylon_proto::token::Claims;

    fn token(key: &SigningKey, node: &str, role: Role, expires_at: u64) -> String {
        Claims {
            session: [7; 16],
            role,
            issued_at: 1_000,
            expires_at,
            title: "demo".into(),
            node: node.into(),
            relay: "relay-1".into(),
        }
        .sign(key)
        .unwrap()
    }

    #[test]
    fn only_a_verified_player_token_for_this_node_opens_the_gate() {
        let indexer = SigningKey::from_bytes(&[1; 32]);
        let gate = SessionGate::pooled("node-a");
        assert!(!gate.accepts_input());
        assert!(matches!(gate.start(&token(&indexer, "node-a", Role::Player, 2_000), 1_500), Err(GateError::NoKey)));
        gate.set_key(indexer.verifying_key());
        let forger = SigningKey::from_bytes(&[2; 32]);
        for (text, why) in [
            (token(&forger, "node-a", Role::Player, 2_000), "forged"),
            (token(&indexer, "node-a", Role::Player, 1_400), "expired"),
            (token(&indexer, "node-b", Role::Player, 2_000), "another node's"),
            (token(&indexer, "node-a", Role::Spectator, 2_000), "spectator"),
            ("garbage".into(), "malformed"),
        ] {
            assert!(gate.start(&text, 1_500).is_err(), "{why} token accepted");
            assert!(!gate.accepts_input(), "{why} token opened the gate");
        }
        let id = gate.start(&token(&indexer, "node-a", Role::Player, 2_000), 1_500).unwrap();
        assert!(gate.accepts_input());
        assert_eq!(gate.running(), vec![id.clone()]);
        gate.end(Some("another"));
        assert!(gate.accepts_input(), "ending another session leaves this one");
        gate.end(Some(&id));
        assert!(!gate.accepts_input());
        assert!(gate.running().is_empty());
    }

    #[test]
    fn outside_a_pool_the_gate_is_open() {
        let gate = SessionGate::open();
        assert!(gate.accepts_input());
        assert!(gate.running().is_empty());
    }
}
