//! The render node as a member of the pool: registration and signed heartbeats to the
//! indexer, draining, and the state it shares with the relay link (the indexer's token
//! key, the running session). The link itself verifies each player's token
//! (`pylon_proto::link::PlayerGate`).
//!
//! Outside a pool (no `--indexer`) any player the relay names may play, as in development.

use ed25519_dalek::VerifyingKey;
use pylon_indexer_client::api::{NodeHeartbeat, RegisterNode};
use pylon_indexer_client::{Client, ClientError, register_until_accepted};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

/// How often a node tells the indexer it is alive (the indexer gives up after 15 s).
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(3);

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[derive(Debug, Default)]
struct GateState {
    /// The indexer's token key, once registered.
    key: Option<VerifyingKey>,
    /// The running session (hex id).
    session: Option<String>,
    /// The relays the indexer matched this node's open sessions to (from its heartbeat
    /// answer): the node links to them, whatever else it links to.
    wanted: Vec<String>,
}

/// What the node's membership and its relay link share: the indexer's token key (set at
/// registration, used by the link's [`pylon_proto::link::PlayerGate`] to verify tokens)
/// and the session running (reported in heartbeats, waited for when draining).
#[derive(Debug, Clone)]
pub struct SessionGate {
    node: Option<String>,
    state: Arc<Mutex<GateState>>,
    /// Wakes the relay links' refresh when the wanted relays change.
    wanted_changed: Arc<tokio::sync::Notify>,
}

impl SessionGate {
    /// A node outside a pool: any player the relay names may play.
    pub fn open() -> Self {
        Self { node: None, state: Arc::default(), wanted_changed: Arc::default() }
    }

    /// Node `node` of a pool: input only inside a session whose token it verified.
    pub fn pooled(node: &str) -> Self {
        Self { node: Some(node.to_string()), state: Arc::default(), wanted_changed: Arc::default() }
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

    /// The indexer's token key, once registered.
    pub fn key(&self) -> Option<VerifyingKey> {
        self.lock().key
    }

    /// The link started (`Some`) or ended (`None`) the player's session.
    pub fn set_running(&self, session: Option<String>) {
        self.lock().session = session;
    }

    /// The indexer matched this node's open sessions to `relays`.
    pub fn set_wanted_relays(&self, mut relays: Vec<String>) {
        relays.sort();
        let changed = {
            let mut state = self.lock();
            let changed = state.wanted != relays;
            state.wanted = relays;
            changed
        };
        if changed {
            self.wanted_changed.notify_one();
        }
    }

    /// The relays the node's open sessions were matched to.
    pub fn wanted_relays(&self) -> Vec<String> {
        self.lock().wanted.clone()
    }

    /// Resolves when [`Self::wanted_relays`] changes.
    pub async fn wanted_relays_changed(&self) {
        self.wanted_changed.notified().await;
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
            Ok(reply) => gate.set_wanted_relays(reply.relays),
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

/// The current Unix time in seconds (the wall clock the link checks token expiry against).
pub fn now() -> u64 {
    unix_now()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;

    #[test]
    fn the_gate_shares_the_key_and_the_running_session() {
        let gate = SessionGate::pooled("node-a");
        let link_side = gate.clone();
        assert!(gate.key().is_none() && gate.running().is_empty());
        gate.set_key(SigningKey::from_bytes(&[1; 32]).verifying_key());
        assert!(link_side.key().is_some(), "the link sees the key the membership set");
        link_side.set_running(Some("ab".into()));
        assert_eq!(gate.running(), vec!["ab".to_string()]);
        link_side.set_running(None);
        assert!(gate.running().is_empty());
        assert_eq!(SessionGate::open().node(), None);
    }
}
