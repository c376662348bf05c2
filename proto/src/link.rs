//! The render node ↔ edge relay link as two I/O-free state machines, [`NodeSide`] and
//! [`RelaySide`], in the quinn-proto / str0m pattern: the drivers (`server/src/uplink.rs`,
//! `edge-relay/src/ingest.rs`) feed them the control stream's bytes, datagrams and timer
//! expiries, each with an explicit `now`, and carry out what they poll: bytes for the
//! control stream, datagrams, events and the next timeout. Tests drive the same code on a
//! simulated clock.
//!
//! # Handshake and authentication
//! The relay is authenticated by TLS: the node pins the relay's certificate. The node is
//! authenticated inside the link's first message, at no extra round trip: its `Hello`
//! carries its ed25519 public key and a signature over [`HELLO_CONTEXT`], the connection's
//! TLS exporter value ([`EXPORTER_LABEL`], [`EXPORTER_LEN`] bytes — unique to this QUIC
//! connection, so a signature cannot be replayed on another one) and the stream
//! description. The relay checks the signature here, then its driver checks the key
//! against the pool's record of that node id ([`RelaySide::admit`] or
//! [`RelaySide::refuse`]). Until admitted, the relay accepts no media and sends the node
//! nothing — no session token, no input: [`RelaySide::send`] refuses. The node's media
//! starts with the relay's `Welcome`, one round trip after the QUIC handshake.
//!
//! # What each side owns
//! * Node: the hello, the retransmit cache and resends on `Nack`, the relay's bitrate
//!   within the node's bounds, keyframe requests, the player's session — tokens verified
//!   against the indexer's key, this node's id, the relay that sent them, and sessions that
//!   already ended ([`PlayerGate`]) — and input only inside that session.
//! * Relay: the handshake deadline, the node's proof, upstream loss repair
//!   ([`UpstreamRepair`]), frame info, and nothing sent before admission.

use crate::capacity::{self, Challenge, MAX_SESSION_N};
use crate::framing::{
    self, CapacityReply, ControlDecoder, DatagramKind, FrameInfo, FramingError, HelloAuth, NodeHello, NodeMessage,
    RelayMessage, StreamHello, WireMessage,
};
use crate::input::{InputEvent, InputMessage};
use crate::repair::{RepairConfig, RepairStats, RetransmitCache, UpstreamRepair};
use crate::rtp::RtpPacket;
use crate::token::{self, TokenError};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use thiserror::Error;

/// The TLS exporter label both ends derive the connection binding with.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-pylon-link/1";
/// Bytes of exporter output the node signs.
pub const EXPORTER_LEN: usize = 32;
/// Domain separation for the hello signature.
pub const HELLO_CONTEXT: &[u8] = b"pylon-link/1 node hello\0";
/// Domain separation for a relay's pull request (a cascade).
pub const PULL_CONTEXT: &[u8] = b"pylon-link/1 relay pull\0";
/// How long the relay waits for a hello, and the node for the relay's welcome.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long sent RTP packets are kept for resends: past it, their frame is too old to show.
pub const RESEND_WINDOW: Duration = Duration::from_secs(1);
/// Most packets in the node's resend cache.
pub const RESEND_PACKETS: usize = 4096;
/// Audio packets kept for resends (one per 10 ms: two seconds' worth).
pub const RESEND_AUDIO_PACKETS: usize = 200;
/// Bytes queued for the control stream past which relay → node input is dropped (a node
/// that does not read its stream must not grow the relay's memory). Session control is
/// always queued.
pub const MAX_QUEUED_CONTROL: usize = 256 * 1024;
/// Ended sessions the node remembers, so a relay cannot start one again.
const ENDED_MEMORY: usize = 256;

/// Why a link failed.
#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum LinkError {
    /// The control stream could not be parsed.
    #[error("malformed control stream: {0}")]
    Framing(#[from] FramingError),
    /// The first message was not a hello.
    #[error("expected the node's hello first")]
    HelloExpected,
    /// The peer sent a second hello.
    #[error("a second hello on the same link")]
    DuplicateHello,
    /// The hello's signature does not verify over this connection.
    #[error("the node's hello signature does not verify for this connection")]
    BadSignature,
    /// The hello was not (or the welcome was not) received in time.
    #[error("no handshake within {0:?}")]
    HandshakeTimeout(Duration),
    /// The relay sent something other than a welcome first.
    #[error("the relay sent {0} before welcoming the node")]
    NotWelcomed(&'static str),
    /// The peer closed the link with a reason.
    #[error("the peer said goodbye: {0}")]
    Goodbye(String),
    /// This side refused the peer.
    #[error("refused: {0}")]
    Refused(String),
    /// A message was to be sent before the peer was admitted.
    #[error("the link is not established")]
    NotEstablished,
    /// The link is closed.
    #[error("the link is closed")]
    Closed,
}

/// Why a session token was refused at the node.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum GateError {
    /// The token did not verify (forged, expired, malformed, another node's or relay's).
    #[error(transparent)]
    Token(#[from] TokenError),
    /// A spectator token cannot start the player's session.
    #[error("a spectator token cannot start a session")]
    Spectator,
    /// The node is not yet registered, so it has no key to verify with.
    #[error("the node has not registered with the indexer yet")]
    NoKey,
    /// The session already ended here: its token is not taken twice.
    #[error("session {0} already ended")]
    Ended(String),
    /// The session already moved on with a newer token: an older one cannot move it back.
    #[error("session {0} has moved on with a newer token")]
    Superseded(String),
}

/// Who may play on a node: open outside a pool; in one, only the holder of a player token
/// signed by the indexer for this node and the relay that forwarded it, of a session that
/// has not ended here.
///
/// One gate serves all of a node's links (it is a shared handle: clones are the same
/// gate), so a session can move between relays: a token for the running session, issued
/// for another relay no earlier than the one in use, *resumes* it there
/// ([`Admitted::Resumed`]: same session, same running title). A session whose relay link is
/// lost is orphaned, not ended: it waits [`RESUME_GRACE`] for its player to come back
/// through another relay ([`PlayerGate::expire`] ends it after that). Ended sessions are
/// remembered, so a relay cannot start one again.
#[derive(Debug, Clone)]
pub struct PlayerGate(Arc<Mutex<GateState>>);

#[derive(Debug)]
struct GateState {
    node: Option<String>,
    key: Option<VerifyingKey>,
    session: Option<Running>,
    ended: VecDeque<String>,
}

#[derive(Debug, Clone)]
struct Running {
    id: String,
    /// The relay the session's player is on now (its link carries the media).
    relay: String,
    /// When the token in use was issued (Unix seconds): an older one cannot move it back.
    issued_at: u64,
    /// The session is a checker's (its token's role).
    checker: bool,
    /// Its relay link was lost: it ends at this deadline unless resumed.
    orphaned_until: Option<Instant>,
}

/// How long a session whose relay link was lost waits for its player to come back through
/// another relay before it ends.
pub const RESUME_GRACE: Duration = Duration::from_secs(15);

/// What a verified token did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admitted {
    /// A new session started (empty ids outside a pool).
    Started {
        /// Session id (hex).
        session: String,
        /// Its title.
        title: String,
    },
    /// The running session moved to (or came back on) the relay that sent the token.
    Resumed {
        /// Session id (hex).
        session: String,
    },
}

impl PlayerGate {
    /// A gate that admits any input: a node outside a pool.
    pub fn open() -> Self {
        Self(Arc::new(Mutex::new(GateState { node: None, key: None, session: None, ended: VecDeque::new() })))
    }

    /// A gate for node `node` of a pool: input only inside a verified session.
    pub fn pooled(node: &str) -> Self {
        let gate = Self::open();
        gate.state().node = Some(node.to_string());
        gate
    }

    fn state(&self) -> std::sync::MutexGuard<'_, GateState> {
        // A panic while holding the lock cannot leave the state half-updated (every
        // update is a single assignment), so a poisoned lock is still usable.
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sets the indexer's token key.
    pub fn set_key(&self, key: VerifyingKey) {
        self.state().key = Some(key);
    }

    /// Verifies a player's token forwarded by relay `relay` at `now` (Unix seconds): starts
    /// its session, or resumes it on `relay` if it is the running one.
    pub fn start(&self, token_text: &str, relay: &str, now: u64) -> Result<Admitted, GateError> {
        let mut state = self.state();
        let Some(node) = &state.node else {
            return Ok(Admitted::Started { session: String::new(), title: String::new() });
        };
        let key = state.key.ok_or(GateError::NoKey)?;
        let claims = token::verify(token_text, &key, now)?;
        claims.check_node(node)?;
        claims.check_relay(relay)?;
        if !claims.may_send_input() {
            return Err(GateError::Spectator);
        }
        let id = claims.session_hex();
        if state.ended.contains(&id) {
            return Err(GateError::Ended(id));
        }
        if let Some(running) = state.session.as_mut().filter(|r| r.id == id) {
            if claims.issued_at < running.issued_at {
                return Err(GateError::Superseded(id));
            }
            running.relay = relay.to_string();
            running.issued_at = claims.issued_at;
            running.orphaned_until = None;
            return Ok(Admitted::Resumed { session: id });
        }
        state.session = Some(Running {
            id: id.clone(),
            relay: relay.to_string(),
            issued_at: claims.issued_at,
            checker: claims.role == token::Role::Checker,
            orphaned_until: None,
        });
        Ok(Admitted::Started { session: id, title: claims.title })
    }

    /// The player of `session` left relay `relay` (`None`s: whatever runs, wherever).
    /// A relay the session has moved away from cannot end it. Returns the session that
    /// ended, if one did.
    pub fn end(&self, session: Option<&str>, relay: Option<&str>) -> Option<String> {
        let mut state = self.state();
        let running = state.session.as_ref()?;
        if session.is_some_and(|s| s != running.id) || relay.is_some_and(|r| r != running.relay) {
            return None;
        }
        let ended = state.session.take()?.id;
        if state.ended.len() >= ENDED_MEMORY {
            state.ended.pop_front();
        }
        state.ended.push_back(ended.clone());
        Some(ended)
    }

    /// The link to `relay` is gone: its session (if it runs there) waits until `deadline`
    /// for its player to come back. Returns that session.
    pub fn orphan(&self, relay: &str, deadline: Instant) -> Option<String> {
        let mut state = self.state();
        let running = state.session.as_mut().filter(|r| r.relay == relay && r.orphaned_until.is_none())?;
        running.orphaned_until = Some(deadline);
        Some(running.id.clone())
    }

    /// Ends an orphaned session whose grace ran out by `now`; returns it.
    pub fn expire(&self, now: Instant) -> Option<String> {
        let due = self.state().session.as_ref()?.orphaned_until.is_some_and(|d| now >= d);
        if due { self.end(None, None) } else { None }
    }

    /// Whether player input from relay `relay` is accepted now: outside a pool, always;
    /// in one, only from the running session's relay.
    pub fn accepts_input_from(&self, relay: &str) -> bool {
        let state = self.state();
        state.node.is_none() || state.session.as_ref().is_some_and(|r| r.relay == relay)
    }

    /// The running session, if any (empty outside a pool).
    pub fn running(&self) -> Option<String> {
        self.state().session.as_ref().map(|r| r.id.clone())
    }

    /// The relay the running session's media goes to: `None` when no session runs or its
    /// link is lost.
    pub fn session_relay(&self) -> Option<String> {
        self.state().session.as_ref().filter(|r| r.orphaned_until.is_none()).map(|r| r.relay.clone())
    }

    /// Whether a proof-of-capacity challenge from relay `relay` is answered now: in a pool,
    /// only inside a checker's session on that relay (a player cannot make the node burn
    /// its GPU); outside a pool, whoever plays (there is no one else).
    pub fn accepts_challenge_from(&self, relay: &str) -> bool {
        let state = self.state();
        match state.node {
            None => true,
            Some(_) => state.session.as_ref().is_some_and(|r| r.checker && r.relay == relay),
        }
    }
}

/// What the node's link tells its driver.
#[derive(Debug, Clone, PartialEq)]
pub enum NodeEvent {
    /// The relay admitted the node: media may flow (the next frame should be a keyframe).
    Established {
        /// The relay's id.
        relay: String,
    },
    /// Encode the next frame as a keyframe.
    KeyframeRequested,
    /// Player input inside the admitted session, validated.
    Input(InputMessage),
    /// Input refused (counted by reason: `no_session`, `malformed`, `bad_datagram`,
    /// `not_checker` for a capacity challenge outside a checker's session, `bad_challenge`).
    InputRefused(&'static str),
    /// A checker's proof-of-capacity challenge (input message `seq`): compute it and answer
    /// with [`NodeSide::answer_capacity`] (or [`NodeSide::refuse_capacity`]).
    CapacityChallenge {
        /// The input message's sequence number, which names the answer.
        seq: u32,
        /// The challenge.
        challenge: Challenge,
    },
    /// A player session started.
    SessionStarted {
        /// Session id (hex; empty outside a pool).
        session: String,
        /// The title the player chose (empty outside a pool: the node's own).
        title: String,
    },
    /// The running session moved to this link's relay (its player came back through it):
    /// the same session and title go on, its media now goes here.
    SessionResumed {
        /// Session id (hex).
        session: String,
        /// The relay it is on now.
        relay: String,
    },
    /// A session token was refused.
    SessionRefused(GateError),
    /// The player's session ended.
    SessionEnded(String),
    /// The encoder's target, bit/s, already within the node's bounds.
    Bitrate(u64),
    /// Resends: packets asked for and sent, packets no longer held.
    Resent {
        /// Packets resent.
        sent: u32,
        /// Packets asked for but no longer held.
        missed: u32,
    },
}

/// How the node runs its side of the link.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The stream description sent in the hello.
    pub stream: StreamHello,
    /// The node's key; `None` connects anonymously (accepted only by a relay that allows it).
    pub identity: Option<SigningKey>,
    /// Bounds of the encoder's bitrate, bit/s; `None` ignores the relay's requests.
    pub bitrate_bounds: Option<(u64, u64)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NodeState {
    AwaitingWelcome { deadline: Instant },
    Established,
    Closed,
}

/// The node's side of one link (one QUIC connection to a relay).
#[derive(Debug)]
pub struct NodeSide {
    config: NodeConfig,
    state: NodeState,
    relay: String,
    gate: PlayerGate,
    decoder: ControlDecoder<RelayMessage>,
    transmit: Vec<u8>,
    datagrams: VecDeque<Vec<u8>>,
    events: VecDeque<NodeEvent>,
    sent: RetransmitCache,
    /// Audio packets sent, each with its 8-byte NTP capture time in front.
    sent_audio: RetransmitCache,
    /// `now` and the Unix time (seconds) at the same moment, so tokens' expiries are
    /// checked against the wall clock without reading it here.
    epoch: (Instant, u64),
}

impl NodeSide {
    /// A link whose TLS exporter value is `exporter`; the hello is queued at once.
    /// `unix_now` is the wall clock (Unix seconds) at `now`.
    pub fn new(config: NodeConfig, gate: PlayerGate, exporter: &[u8], now: Instant, unix_now: u64) -> Self {
        let auth = config.identity.as_ref().map(|key| HelloAuth {
            public_key: key.verifying_key().to_bytes(),
            signature: key.sign(&hello_signed_message(exporter, &config.stream)).to_bytes(),
        });
        let mut transmit = Vec::new();
        NodeMessage::Hello(NodeHello { stream: config.stream.clone(), auth }).encode(&mut transmit);
        Self {
            config,
            state: NodeState::AwaitingWelcome { deadline: now + HANDSHAKE_TIMEOUT },
            relay: String::new(),
            gate,
            decoder: ControlDecoder::default(),
            transmit,
            datagrams: VecDeque::new(),
            events: VecDeque::new(),
            sent: RetransmitCache::new(RESEND_WINDOW, RESEND_PACKETS),
            sent_audio: RetransmitCache::new(RESEND_WINDOW, RESEND_AUDIO_PACKETS),
            epoch: (now, unix_now),
        }
    }

    /// Whether the relay admitted the node.
    pub fn is_established(&self) -> bool {
        self.state == NodeState::Established
    }

    /// The player gate (running session), for heartbeats; carried to the next link.
    pub fn gate(&self) -> &PlayerGate {
        &self.gate
    }

    /// The relay's id, once it welcomed the node.
    pub fn relay(&self) -> Option<&str> {
        (!self.relay.is_empty()).then_some(self.relay.as_str())
    }

    /// The connection is gone: a session running through it is orphaned until `deadline`
    /// (its player may come back through another relay). Returns that session.
    pub fn lost(self, deadline: Instant) -> Option<String> {
        if self.relay.is_empty() { None } else { self.gate.orphan(&self.relay, deadline) }
    }

    /// Bytes read from the control stream.
    pub fn handle_control(&mut self, now: Instant, bytes: &[u8]) -> Result<(), LinkError> {
        if self.state == NodeState::Closed {
            return Err(LinkError::Closed);
        }
        self.decoder.extend(bytes);
        loop {
            let msg = match self.decoder.next_message() {
                Ok(Some(msg)) => msg,
                Ok(None) => return Ok(()),
                Err(e) => return Err(self.fail(e.into())),
            };
            self.on_message(now, msg)?;
        }
    }

    fn on_message(&mut self, now: Instant, msg: RelayMessage) -> Result<(), LinkError> {
        if let RelayMessage::Goodbye(reason) = msg {
            return Err(self.fail(LinkError::Goodbye(reason)));
        }
        if !self.is_established() {
            return match msg {
                RelayMessage::Welcome(relay) => {
                    self.state = NodeState::Established;
                    self.relay = relay.clone();
                    self.events.push_back(NodeEvent::Established { relay });
                    self.events.push_back(NodeEvent::KeyframeRequested);
                    Ok(())
                }
                other => Err(self.fail(LinkError::NotWelcomed(relay_message_name(&other)))),
            };
        }
        match msg {
            RelayMessage::Welcome(_) => return Err(self.fail(LinkError::DuplicateHello)),
            RelayMessage::KeyframeRequest => self.events.push_back(NodeEvent::KeyframeRequested),
            RelayMessage::Input(bytes) => self.deliver_input(&bytes),
            RelayMessage::SessionStart(token) => {
                let unix = self.epoch.1 + now.saturating_duration_since(self.epoch.0).as_secs();
                self.start_session(&token, unix);
            }
            RelayMessage::SessionEnd(session) => {
                if let Some(ended) = self.gate.end(Some(&session), Some(&self.relay)) {
                    self.events.push_back(NodeEvent::SessionEnded(ended));
                }
            }
            RelayMessage::AudioNack(seqs) => {
                let (mut sent, mut missed) = (0, 0);
                for seq in seqs {
                    match self.sent_audio.get(seq) {
                        // Cached with its capture time: the datagram is rebuilt as it was.
                        Some(captured) => {
                            let mut d = Vec::with_capacity(framing::DATAGRAM_HEADER_LEN + captured.len());
                            d.push(framing::FRAMING_VERSION);
                            d.push(DatagramKind::AudioRtp as u8);
                            d.extend_from_slice(captured);
                            self.datagrams.push_back(d);
                            sent += 1;
                        }
                        None => missed += 1,
                    }
                }
                self.events.push_back(NodeEvent::Resent { sent, missed });
            }
            RelayMessage::Nack(seqs) => {
                let (mut sent, mut missed) = (0, 0);
                for seq in seqs {
                    match self.sent.get(seq) {
                        Some(rtp) => {
                            let mut d = Vec::with_capacity(framing::DATAGRAM_HEADER_LEN + rtp.len());
                            framing::encode_datagram(DatagramKind::VideoRtp, rtp, &mut d);
                            self.datagrams.push_back(d);
                            sent += 1;
                        }
                        None => missed += 1,
                    }
                }
                self.events.push_back(NodeEvent::Resent { sent, missed });
            }
            RelayMessage::Bitrate(bps) => {
                if let Some((min, max)) = self.config.bitrate_bounds {
                    self.events.push_back(NodeEvent::Bitrate(u64::from(bps).clamp(min, max)));
                }
            }
            RelayMessage::Goodbye(_) => {}
        }
        Ok(())
    }

    /// Verifies a session token at `unix_now`, as a `SessionStart` from the relay does.
    pub fn start_session(&mut self, token: &str, unix_now: u64) {
        match self.gate.start(token, &self.relay, unix_now) {
            Ok(Admitted::Started { session, title }) => {
                self.events.push_back(NodeEvent::SessionStarted { session, title });
                self.events.push_back(NodeEvent::KeyframeRequested);
            }
            Ok(Admitted::Resumed { session }) => {
                self.events.push_back(NodeEvent::SessionResumed { session, relay: self.relay.clone() });
                self.events.push_back(NodeEvent::KeyframeRequested);
            }
            Err(e) => self.events.push_back(NodeEvent::SessionRefused(e)),
        }
    }

    fn deliver_input(&mut self, bytes: &[u8]) {
        if !self.gate.accepts_input_from(&self.relay) {
            self.events.push_back(NodeEvent::InputRefused("no_session"));
            return;
        }
        match InputMessage::decode(bytes) {
            Ok(InputMessage { seq, event: InputEvent::Capacity { seed, n }, .. }) => {
                let event = match Challenge::new(seed, u32::from(n)) {
                    _ if !self.gate.accepts_challenge_from(&self.relay) => NodeEvent::InputRefused("not_checker"),
                    Ok(challenge) if challenge.n <= MAX_SESSION_N => NodeEvent::CapacityChallenge { seq, challenge },
                    _ => NodeEvent::InputRefused("bad_challenge"),
                };
                self.events.push_back(event);
            }
            Ok(m) => self.events.push_back(NodeEvent::Input(m)),
            Err(_) => self.events.push_back(NodeEvent::InputRefused("malformed")),
        }
    }

    /// Answers the challenge of input `seq` with its product: the commitment first, then
    /// the product in order (the relay passes both to the session's player).
    pub fn answer_capacity(&mut self, seq: u32, product: &[u32], gpu_us: u32, wall_us: u32) {
        if !self.is_established() {
            return;
        }
        let bytes = capacity::product_bytes(product);
        NodeMessage::Capacity(CapacityReply::Commit { seq, digest: capacity::digest(&bytes), gpu_us, wall_us })
            .encode(&mut self.transmit);
        for (i, data) in bytes.chunks(capacity::CHUNK_BYTES).enumerate() {
            let offset = u32::try_from(i * capacity::CHUNK_BYTES).unwrap_or(u32::MAX);
            NodeMessage::Capacity(CapacityReply::Chunk { seq, offset, data: data.to_vec() }).encode(&mut self.transmit);
        }
    }

    /// Declines the challenge of input `seq`, saying why.
    pub fn refuse_capacity(&mut self, seq: u32, reason: &str) {
        if self.is_established() {
            NodeMessage::Capacity(CapacityReply::Refused { seq, reason: reason.to_string() })
                .encode(&mut self.transmit);
        }
    }

    /// A datagram from the relay (supersedable input).
    pub fn handle_datagram(&mut self, _now: Instant, datagram: &[u8]) {
        match framing::decode_datagram(datagram) {
            Ok((DatagramKind::Input, input)) if self.is_established() => self.deliver_input(input),
            _ => self.events.push_back(NodeEvent::InputRefused("bad_datagram")),
        }
    }

    /// Timer expiry: the relay must welcome the node in time.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), LinkError> {
        match self.state {
            NodeState::AwaitingWelcome { deadline } if now >= deadline => {
                Err(self.fail(LinkError::HandshakeTimeout(HANDSHAKE_TIMEOUT)))
            }
            _ => Ok(()),
        }
    }

    /// When [`Self::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            NodeState::AwaitingWelcome { deadline } => Some(deadline),
            _ => None,
        }
    }

    /// Frames one RTP packet as a datagram into `out` and remembers it for resends;
    /// `capture` is the frame's capture time on its first packet. Refused before the
    /// relay's welcome (the caller counts the drop).
    pub fn send_rtp(
        &mut self,
        now: Instant,
        rtp: &[u8],
        capture: Option<SystemTime>,
        out: &mut Vec<u8>,
    ) -> Result<(), LinkError> {
        if !self.is_established() {
            return Err(LinkError::NotEstablished);
        }
        if let Some([s0, s1]) = rtp.get(2..4).and_then(|s| <[u8; 2]>::try_from(s).ok()) {
            self.sent.insert(now, u16::from_be_bytes([s0, s1]), rtp);
        }
        out.clear();
        match capture {
            Some(t) => framing::encode_captured_datagram(t, rtp, out),
            None => framing::encode_datagram(DatagramKind::VideoRtp, rtp, out),
        }
        Ok(())
    }

    /// Frames one audio RTP packet captured at `capture` as a datagram into `out` and
    /// remembers it for resends. Refused before the relay's welcome.
    pub fn send_audio(
        &mut self,
        now: Instant,
        rtp: &[u8],
        capture: SystemTime,
        out: &mut Vec<u8>,
    ) -> Result<(), LinkError> {
        if !self.is_established() {
            return Err(LinkError::NotEstablished);
        }
        out.clear();
        framing::encode_audio_datagram(capture, rtp, out);
        if let (Some([s0, s1]), Some(captured)) =
            (rtp.get(2..4).and_then(|s| <[u8; 2]>::try_from(s).ok()), out.get(framing::DATAGRAM_HEADER_LEN..))
        {
            self.sent_audio.insert(now, u16::from_be_bytes([s0, s1]), captured);
        }
        Ok(())
    }

    /// Queues a frame's latency facts.
    pub fn send_frame_info(&mut self, info: FrameInfo) {
        if self.is_established() {
            NodeMessage::FrameInfo(info).encode(&mut self.transmit);
        }
    }

    /// Ends the running session here (the title exited, crashed or never drew), telling
    /// the relay why so it can tell the player. Returns the session ended, if one ran.
    pub fn end_session(&mut self, reason: &str) -> Option<String> {
        let session = self.gate.end(None, Some(&self.relay))?;
        if self.is_established() {
            NodeMessage::SessionOver { session: session.clone(), reason: reason.to_string() }
                .encode(&mut self.transmit);
        }
        Some(session)
    }

    /// Closes the link on purpose, telling the relay why.
    pub fn close(&mut self, reason: &str) {
        if self.state != NodeState::Closed {
            NodeMessage::Goodbye(reason.to_string()).encode(&mut self.transmit);
            self.state = NodeState::Closed;
        }
    }

    fn fail(&mut self, e: LinkError) -> LinkError {
        self.state = NodeState::Closed;
        e
    }

    /// Bytes to write to the control stream, if any.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        (!self.transmit.is_empty()).then(|| std::mem::take(&mut self.transmit))
    }

    /// A datagram to send (resends), if any.
    pub fn poll_datagram(&mut self) -> Option<Vec<u8>> {
        self.datagrams.pop_front()
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<NodeEvent> {
        self.events.pop_front()
    }
}

fn relay_message_name(m: &RelayMessage) -> &'static str {
    match m {
        RelayMessage::Welcome(_) => "Welcome",
        RelayMessage::KeyframeRequest => "KeyframeRequest",
        RelayMessage::Goodbye(_) => "Goodbye",
        RelayMessage::Input(_) => "Input",
        RelayMessage::SessionStart(_) => "SessionStart",
        RelayMessage::SessionEnd(_) => "SessionEnd",
        RelayMessage::Nack(_) => "Nack",
        RelayMessage::AudioNack(_) => "AudioNack",
        RelayMessage::Bitrate(_) => "Bitrate",
    }
}

/// What a pulling relay signs: the context, this connection's exporter value, its id and
/// the session (each length-prefixed).
pub fn pull_signed_message(exporter: &[u8], relay: &str, session: &str) -> Vec<u8> {
    let mut m = PULL_CONTEXT.to_vec();
    m.extend_from_slice(exporter);
    for field in [relay, session] {
        m.extend_from_slice(&(field.len() as u32).to_be_bytes());
        m.extend_from_slice(field.as_bytes());
    }
    m
}

/// The control bytes a relay sends first on a link it dials to pull `session`'s stream.
pub fn pull_request(exporter: &[u8], relay: &str, session: &str, key: &SigningKey) -> Vec<u8> {
    let auth = HelloAuth {
        public_key: key.verifying_key().to_bytes(),
        signature: key.sign(&pull_signed_message(exporter, relay, session)).to_bytes(),
    };
    let mut out = Vec::new();
    NodeMessage::Pull(framing::Pull { relay: relay.to_string(), session: session.to_string(), auth }).encode(&mut out);
    out
}

/// What the node signs in its hello.
pub fn hello_signed_message(exporter: &[u8], stream: &StreamHello) -> Vec<u8> {
    let mut m = HELLO_CONTEXT.to_vec();
    m.extend_from_slice(exporter);
    m.extend_from_slice(&NodeHello::signed_body(stream));
    m
}

/// What the relay's link tells its driver.
#[derive(Debug, Clone, PartialEq)]
pub enum RelayEvent {
    /// A hello whose signature (if any) verified over this connection: the driver checks
    /// the key against the pool and calls [`RelaySide::admit`] or [`RelaySide::refuse`].
    Hello {
        /// The stream's description (with the node id it claims).
        stream: StreamHello,
        /// The node's key, proven by the signature; `None` for an anonymous node.
        key: Option<Box<VerifyingKey>>,
    },
    /// The node's latency facts about a frame.
    FrameInfo(FrameInfo),
    /// The node ended a session (its title exited, crashed or never drew).
    SessionOver {
        /// Session id.
        session: String,
        /// Why, for the player.
        reason: String,
    },
    /// The node's answer to a capacity challenge, for the session's player.
    Capacity(CapacityReply),
    /// Not a node: another relay, whose signature over this connection verified, asks for
    /// a session's stream (a cascade). The driver checks the key against the pool's record
    /// of that relay and, if this relay carries the session, sends the stream on this
    /// connection as a node would ([`NodeSide`], its hello signed with this relay's key);
    /// this side is done.
    Pull {
        /// The pulling relay's id.
        relay: String,
        /// The session it wants.
        session: String,
        /// Its key, proven by the signature.
        key: Box<VerifyingKey>,
    },
}

/// A media datagram accepted by the relay: the RTP packet is `datagram[rtp_offset..]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Media {
    /// Where the RTP packet starts in the datagram.
    pub rtp_offset: usize,
    /// The frame's capture time (NTP), on the first packet of each frame.
    pub capture_ntp: Option<u64>,
    /// Whether it filled a gap the relay had asked for.
    pub repaired: bool,
    /// An audio packet (Opus), not video.
    pub audio: bool,
}

/// Why the relay dropped a datagram (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaDrop {
    /// Before the node was admitted.
    NotEstablished,
    /// Already received.
    Duplicate,
    /// Not an RTP packet.
    BadRtp,
    /// Not a media datagram.
    BadDatagram,
}

impl MediaDrop {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            MediaDrop::NotEstablished => "not_established",
            MediaDrop::Duplicate => "duplicate",
            MediaDrop::BadRtp => "bad_rtp",
            MediaDrop::BadDatagram => "bad_datagram",
        }
    }
}

/// A message the relay sends to a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToNode {
    /// On the reliable control stream.
    Control(RelayMessage),
    /// As a datagram: supersedable input (mouse motion), unchanged.
    InputDatagram(Vec<u8>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RelayState {
    AwaitingHello { deadline: Instant },
    AwaitingAdmission { deadline: Instant },
    Established,
    Closed,
}

/// The relay's side of one link.
#[derive(Debug)]
pub struct RelaySide {
    relay_id: String,
    exporter: Vec<u8>,
    state: RelayState,
    decoder: ControlDecoder<NodeMessage>,
    transmit: Vec<u8>,
    datagrams: VecDeque<Vec<u8>>,
    events: VecDeque<RelayEvent>,
    repair: UpstreamRepair,
    audio_repair: UpstreamRepair,
    dropped_control: u64,
}

impl RelaySide {
    /// A link for relay `relay_id` on a connection whose TLS exporter value is `exporter`.
    pub fn new(relay_id: &str, exporter: &[u8], repair: RepairConfig, now: Instant) -> Self {
        Self {
            relay_id: relay_id.to_string(),
            exporter: exporter.to_vec(),
            state: RelayState::AwaitingHello { deadline: now + HANDSHAKE_TIMEOUT },
            decoder: ControlDecoder::default(),
            transmit: Vec::new(),
            datagrams: VecDeque::new(),
            events: VecDeque::new(),
            repair: UpstreamRepair::new(repair),
            audio_repair: UpstreamRepair::new(repair),
            dropped_control: 0,
        }
    }

    /// Whether the node was admitted.
    pub fn is_established(&self) -> bool {
        self.state == RelayState::Established
    }

    /// Bytes read from the control stream. An error closes the link (the driver closes
    /// the connection).
    pub fn handle_control(&mut self, _now: Instant, bytes: &[u8]) -> Result<(), LinkError> {
        if self.state == RelayState::Closed {
            return Err(LinkError::Closed);
        }
        self.decoder.extend(bytes);
        loop {
            let msg = match self.decoder.next_message() {
                Ok(Some(msg)) => msg,
                Ok(None) => return Ok(()),
                Err(e) => return Err(self.fail(e.into())),
            };
            match (self.state, msg) {
                (_, NodeMessage::Goodbye(reason)) => return Err(self.fail(LinkError::Goodbye(reason))),
                (RelayState::AwaitingHello { deadline }, NodeMessage::Hello(hello)) => {
                    let key = match &hello.auth {
                        None => None,
                        Some(auth) => {
                            let key = VerifyingKey::from_bytes(&auth.public_key)
                                .map_err(|_| self.fail(LinkError::BadSignature))?;
                            let signature = Signature::from_bytes(&auth.signature);
                            key.verify(&hello_signed_message(&self.exporter, &hello.stream), &signature)
                                .map_err(|_| self.fail(LinkError::BadSignature))?;
                            Some(Box::new(key))
                        }
                    };
                    self.state = RelayState::AwaitingAdmission { deadline };
                    self.events.push_back(RelayEvent::Hello { stream: hello.stream, key });
                }
                (RelayState::AwaitingHello { .. }, NodeMessage::Pull(pull)) => {
                    let key = VerifyingKey::from_bytes(&pull.auth.public_key)
                        .map_err(|_| self.fail(LinkError::BadSignature))?;
                    let signature = Signature::from_bytes(&pull.auth.signature);
                    key.verify(&pull_signed_message(&self.exporter, &pull.relay, &pull.session), &signature)
                        .map_err(|_| self.fail(LinkError::BadSignature))?;
                    // The driver takes the connection over; nothing more is read here.
                    self.state = RelayState::Closed;
                    self.events.push_back(RelayEvent::Pull {
                        relay: pull.relay,
                        session: pull.session,
                        key: Box::new(key),
                    });
                    return Ok(());
                }
                (RelayState::AwaitingHello { .. }, _) => return Err(self.fail(LinkError::HelloExpected)),
                (_, NodeMessage::Pull(_)) => return Err(self.fail(LinkError::DuplicateHello)),
                (_, NodeMessage::Hello(_)) => return Err(self.fail(LinkError::DuplicateHello)),
                (RelayState::Established, NodeMessage::FrameInfo(info)) => {
                    self.events.push_back(RelayEvent::FrameInfo(info));
                }
                (RelayState::Established, NodeMessage::SessionOver { session, reason }) => {
                    self.events.push_back(RelayEvent::SessionOver { session, reason });
                }
                (RelayState::Established, NodeMessage::Capacity(reply)) => {
                    self.events.push_back(RelayEvent::Capacity(reply));
                }
                // Frame info, a session's end or an answer before admission is worth
                // nothing to anyone.
                (_, NodeMessage::FrameInfo(_) | NodeMessage::SessionOver { .. } | NodeMessage::Capacity(_)) => {}
            }
        }
    }

    /// Admits the node whose hello was reported: media is accepted and messages flow.
    pub fn admit(&mut self, _now: Instant) {
        if let RelayState::AwaitingAdmission { .. } = self.state {
            self.state = RelayState::Established;
            RelayMessage::Welcome(self.relay_id.clone()).encode(&mut self.transmit);
        }
    }

    /// Refuses the node (unknown, mismatched or revoked key), telling it why; the driver
    /// closes the connection once the goodbye is written.
    pub fn refuse(&mut self, reason: &str) -> LinkError {
        self.close(reason);
        LinkError::Refused(reason.to_string())
    }

    /// Closes the link on purpose (shutdown, revocation), telling the node why.
    pub fn close(&mut self, reason: &str) {
        if self.state != RelayState::Closed {
            RelayMessage::Goodbye(reason.to_string()).encode(&mut self.transmit);
            self.state = RelayState::Closed;
        }
    }

    fn fail(&mut self, e: LinkError) -> LinkError {
        self.state = RelayState::Closed;
        e
    }

    /// A datagram from the node: media is accepted only once admitted, checked as RTP,
    /// and passed through upstream loss repair.
    pub fn handle_datagram(&mut self, now: Instant, datagram: &[u8]) -> Result<Media, MediaDrop> {
        if !self.is_established() {
            return Err(MediaDrop::NotEstablished);
        }
        let (kind, capture_ntp, rtp) = framing::decode_media_datagram(datagram).map_err(|_| MediaDrop::BadDatagram)?;
        let parsed = RtpPacket::parse(rtp).map_err(|_| MediaDrop::BadRtp)?;
        match kind {
            DatagramKind::VideoRtp | DatagramKind::VideoRtpCaptured => {}
            DatagramKind::AudioRtp => {
                let before = self.audio_repair.stats().repaired;
                if !self.audio_repair.on_packet(parsed.header.sequence, now) {
                    return Err(MediaDrop::Duplicate);
                }
                return Ok(Media {
                    rtp_offset: datagram.len() - rtp.len(),
                    capture_ntp,
                    repaired: self.audio_repair.stats().repaired > before,
                    audio: true,
                });
            }
            DatagramKind::Input => return Err(MediaDrop::BadDatagram),
        }
        let before = self.repair.stats().repaired;
        if !self.repair.on_packet(parsed.header.sequence, now) {
            return Err(MediaDrop::Duplicate);
        }
        Ok(Media {
            rtp_offset: datagram.len() - rtp.len(),
            capture_ntp,
            repaired: self.repair.stats().repaired > before,
            audio: false,
        })
    }

    /// Queues a message for the node. Refused before admission: no token or input ever
    /// reaches a node that has not proven who it is. Input is dropped (returns `false`)
    /// while the control stream is backed up; session control is always queued.
    pub fn send(&mut self, msg: ToNode) -> Result<bool, LinkError> {
        if !self.is_established() {
            return Err(LinkError::NotEstablished);
        }
        match msg {
            ToNode::Control(RelayMessage::Input(_)) if self.transmit.len() >= MAX_QUEUED_CONTROL => {
                self.dropped_control += 1;
                Ok(false)
            }
            ToNode::Control(m) => {
                m.encode(&mut self.transmit);
                Ok(true)
            }
            ToNode::InputDatagram(input) => {
                let mut d = Vec::with_capacity(framing::DATAGRAM_HEADER_LEN + input.len());
                framing::encode_datagram(DatagramKind::Input, &input, &mut d);
                self.datagrams.push_back(d);
                Ok(true)
            }
        }
    }

    /// The node↔relay round-trip time, which spaces repair retries.
    pub fn set_rtt(&mut self, rtt: Duration) {
        self.repair.set_rtt(rtt);
        self.audio_repair.set_rtt(rtt);
    }

    /// Upstream repair counters.
    pub fn repair_stats(&self) -> RepairStats {
        self.repair.stats()
    }

    /// Timer expiry: the handshake deadline, and lost packets to ask for again.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), LinkError> {
        match self.state {
            RelayState::AwaitingHello { deadline } | RelayState::AwaitingAdmission { deadline } if now >= deadline => {
                return Err(self.fail(LinkError::HandshakeTimeout(HANDSHAKE_TIMEOUT)));
            }
            RelayState::Established => {
                let seqs = self.repair.poll_requests(now, framing::MAX_NACK_SEQS);
                if !seqs.is_empty() {
                    RelayMessage::Nack(seqs).encode(&mut self.transmit);
                }
                let seqs = self.audio_repair.poll_requests(now, framing::MAX_NACK_SEQS);
                if !seqs.is_empty() {
                    RelayMessage::AudioNack(seqs).encode(&mut self.transmit);
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// When [`Self::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            RelayState::AwaitingHello { deadline } | RelayState::AwaitingAdmission { deadline } => Some(deadline),
            RelayState::Established => match (self.repair.next_timeout(), self.audio_repair.next_timeout()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
            RelayState::Closed => None,
        }
    }

    /// Bytes to write to the control stream, if any.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        (!self.transmit.is_empty()).then(|| std::mem::take(&mut self.transmit))
    }

    /// A datagram to send (input), if any.
    pub fn poll_datagram(&mut self) -> Option<Vec<u8>> {
        self.datagrams.pop_front()
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<RelayEvent> {
        self.events.pop_front()
    }

    /// Input messages dropped because the control stream was backed up.
    pub fn dropped_control(&self) -> u64 {
        self.dropped_control
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::{Claims, Role};

    fn stream(node: &str) -> StreamHello {
        StreamHello {
            width: 1280,
            height: 720,
            fps: 60,
            profile_level_id: 0x42e01f,
            encoder: "libx264".into(),
            node: node.into(),
        }
    }

    fn rtp(seq: u16) -> Vec<u8> {
        let mut p = vec![0x80, 108];
        p.extend_from_slice(&seq.to_be_bytes());
        p.extend_from_slice(&(u32::from(seq) * 1500).to_be_bytes());
        p.extend_from_slice(&0x1234_5678u32.to_be_bytes());
        p.extend_from_slice(&[0x41, 0x9a]);
        p
    }

    /// Carries every queued control byte and datagram from one side to the other.
    fn pump(
        node: &mut NodeSide,
        relay: &mut RelaySide,
        now: Instant,
    ) -> (Result<(), LinkError>, Result<(), LinkError>) {
        let mut n = Ok(());
        let mut r = Ok(());
        for _ in 0..4 {
            if let Some(bytes) = node.poll_transmit() {
                r = r.and(relay.handle_control(now, &bytes));
            }
            if let Some(bytes) = relay.poll_transmit() {
                n = n.and(node.handle_control(now, &bytes));
            }
            while let Some(d) = relay.poll_datagram() {
                node.handle_datagram(now, &d);
            }
        }
        (n, r)
    }

    fn config(node: &str, key: Option<SigningKey>) -> NodeConfig {
        NodeConfig { stream: stream(node), identity: key, bitrate_bounds: Some((500_000, 6_000_000)) }
    }

    fn hello_key(relay: &mut RelaySide) -> Option<VerifyingKey> {
        match relay.poll_event() {
            Some(RelayEvent::Hello { key, .. }) => key.map(|k| *k),
            other => panic!("expected a hello, got {other:?}"),
        }
    }

    fn drain(node: &mut NodeSide) -> Vec<NodeEvent> {
        std::iter::from_fn(|| node.poll_event()).collect()
    }

    #[test]
    fn a_signed_hello_is_verified_and_media_flows_after_one_round_trip() {
        let t0 = Instant::now();
        let exporter = [5u8; EXPORTER_LEN];
        let key = SigningKey::from_bytes(&[3; 32]);
        let mut node =
            NodeSide::new(config("node-a", Some(key.clone())), PlayerGate::pooled("node-a"), &exporter, t0, 1_500);
        let mut relay = RelaySide::new("relay-1", &exporter, RepairConfig::default(), t0);
        let mut out = Vec::new();
        assert_eq!(node.send_rtp(t0, &rtp(1), None, &mut out), Err(LinkError::NotEstablished));
        let (n, r) = pump(&mut node, &mut relay, t0);
        assert_eq!((n, r), (Ok(()), Ok(())));
        assert_eq!(hello_key(&mut relay), Some(key.verifying_key()));
        assert!(!relay.is_established(), "the driver decides");
        assert_eq!(relay.send(ToNode::Control(RelayMessage::SessionStart("t".into()))), Err(LinkError::NotEstablished));
        relay.admit(t0);
        let _ = pump(&mut node, &mut relay, t0);
        assert_eq!(
            drain(&mut node),
            vec![NodeEvent::Established { relay: "relay-1".into() }, NodeEvent::KeyframeRequested]
        );
        node.send_rtp(t0, &rtp(1), None, &mut out).unwrap();
        let media = relay.handle_datagram(t0, &out).unwrap();
        assert_eq!(&out[media.rtp_offset..], &rtp(1)[..]);
    }

    #[test]
    fn a_hello_signed_for_another_connection_is_refused() {
        let t0 = Instant::now();
        let key = SigningKey::from_bytes(&[3; 32]);
        // An impostor replays a hello it saw on another connection (other exporter value).
        let mut node = NodeSide::new(config("node-a", Some(key)), PlayerGate::open(), &[1; EXPORTER_LEN], t0, 1_500);
        let mut relay = RelaySide::new("relay-1", &[2; EXPORTER_LEN], RepairConfig::default(), t0);
        let (_, r) = pump(&mut node, &mut relay, t0);
        assert_eq!(r, Err(LinkError::BadSignature));
        assert!(relay.poll_event().is_none());
        assert_eq!(relay.send(ToNode::Control(RelayMessage::Input(vec![1]))), Err(LinkError::NotEstablished));
        assert_eq!(relay.handle_datagram(t0, &[1, 1, 0x80, 0, 0, 1]), Err(MediaDrop::NotEstablished));
    }

    #[test]
    fn a_tampered_stream_description_breaks_the_signature() {
        let t0 = Instant::now();
        let exporter = [9u8; EXPORTER_LEN];
        let key = SigningKey::from_bytes(&[3; 32]);
        let auth = HelloAuth {
            public_key: key.verifying_key().to_bytes(),
            signature: key.sign(&hello_signed_message(&exporter, &stream("node-a"))).to_bytes(),
        };
        let mut wire = Vec::new();
        NodeMessage::Hello(NodeHello { stream: stream("node-b"), auth: Some(auth) }).encode(&mut wire);
        let mut relay = RelaySide::new("relay-1", &exporter, RepairConfig::default(), t0);
        assert_eq!(relay.handle_control(t0, &wire), Err(LinkError::BadSignature));
    }

    #[test]
    fn the_first_message_must_be_a_hello_within_the_deadline() {
        let t0 = Instant::now();
        let mut relay = RelaySide::new("relay-1", &[0; 32], RepairConfig::default(), t0);
        let mut wire = Vec::new();
        NodeMessage::FrameInfo(FrameInfo { rtp_timestamp: 0, input_seq: 0, render_us: 0, encode_us: 0, node_us: 0 })
            .encode(&mut wire);
        assert_eq!(relay.handle_control(t0, &wire), Err(LinkError::HelloExpected));

        let mut silent = RelaySide::new("relay-1", &[0; 32], RepairConfig::default(), t0);
        assert_eq!(silent.poll_timeout(), Some(t0 + HANDSHAKE_TIMEOUT));
        assert!(silent.handle_timeout(t0 + Duration::from_secs(1)).is_ok());
        assert_eq!(silent.handle_timeout(t0 + HANDSHAKE_TIMEOUT), Err(LinkError::HandshakeTimeout(HANDSHAKE_TIMEOUT)));

        // A hello that is never admitted times out too.
        let mut node = NodeSide::new(config("", None), PlayerGate::open(), &[0; 32], t0, 1_500);
        let mut pending = RelaySide::new("relay-1", &[0; 32], RepairConfig::default(), t0);
        let _ = pump(&mut node, &mut pending, t0);
        assert_eq!(hello_key(&mut pending), None, "anonymous");
        assert!(pending.handle_timeout(t0 + HANDSHAKE_TIMEOUT).is_err());
        assert!(node.handle_timeout(t0 + HANDSHAKE_TIMEOUT).is_err(), "the node gives up too");
    }

    #[test]
    fn a_refused_node_is_told_why_and_gets_nothing_else() {
        let t0 = Instant::now();
        let mut node = NodeSide::new(config("node-a", None), PlayerGate::open(), &[0; 32], t0, 1_500);
        let mut relay = RelaySide::new("relay-1", &[0; 32], RepairConfig::default(), t0);
        let _ = pump(&mut node, &mut relay, t0);
        let _ = hello_key(&mut relay);
        assert_eq!(relay.refuse("unknown node"), LinkError::Refused("unknown node".into()));
        assert_eq!(relay.send(ToNode::Control(RelayMessage::KeyframeRequest)), Err(LinkError::NotEstablished));
        let (n, _) = pump(&mut node, &mut relay, t0);
        assert_eq!(n, Err(LinkError::Goodbye("unknown node".into())));
        assert!(!node.is_established());
    }

    #[test]
    fn the_node_refuses_anything_but_a_welcome_first() {
        let t0 = Instant::now();
        let mut node = NodeSide::new(config("node-a", None), PlayerGate::open(), &[0; 32], t0, 1_500);
        let mut wire = Vec::new();
        RelayMessage::SessionStart("token".into()).encode(&mut wire);
        assert_eq!(node.handle_control(t0, &wire), Err(LinkError::NotWelcomed("SessionStart")));
    }

    fn established(gate: PlayerGate) -> (NodeSide, RelaySide, Instant) {
        let t0 = Instant::now();
        let mut node = NodeSide::new(config("node-a", None), gate, &[0; 32], t0, 1_500);
        let mut relay = RelaySide::new("relay-1", &[0; 32], RepairConfig::default(), t0);
        let _ = pump(&mut node, &mut relay, t0);
        let _ = hello_key(&mut relay);
        relay.admit(t0);
        let _ = pump(&mut node, &mut relay, t0);
        let _ = drain(&mut node);
        (node, relay, t0)
    }

    fn token(key: &SigningKey, session: u8, node: &str, relay: &str, role: Role) -> String {
        Claims {
            session: [session; 16],
            role,
            issued_at: 1_000,
            expires_at: 2_000,
            title: "demo".into(),
            node: node.into(),
            relay: relay.into(),
        }
        .sign(key)
        .unwrap()
    }

    #[test]
    fn the_node_takes_input_only_inside_a_session_it_verified_for_itself_and_this_relay() {
        let indexer = SigningKey::from_bytes(&[1; 32]);
        let gate = PlayerGate::pooled("node-a");
        gate.set_key(indexer.verifying_key());
        let (mut node, mut relay, t0) = established(gate);
        let mut key_input = Vec::new();
        InputMessage { seq: 1, time_ms: 0, event: crate::input::InputEvent::KeyDown { key: 1, modifiers: 0 } }
            .encode(&mut key_input);
        relay.send(ToNode::Control(RelayMessage::Input(key_input.clone()))).unwrap();
        let _ = pump(&mut node, &mut relay, t0);
        assert_eq!(drain(&mut node), vec![NodeEvent::InputRefused("no_session")]);

        for (text, why) in [
            (token(&SigningKey::from_bytes(&[2; 32]), 1, "node-a", "relay-1", Role::Player), "forged"),
            (token(&indexer, 1, "node-b", "relay-1", Role::Player), "another node's"),
            (token(&indexer, 1, "node-a", "relay-2", Role::Player), "another relay's"),
            (token(&indexer, 1, "node-a", "relay-1", Role::Spectator), "spectator"),
        ] {
            node.start_session(&text, 1_500);
            assert!(matches!(drain(&mut node)[..], [NodeEvent::SessionRefused(_)]), "{why} token accepted");
            assert!(!node.gate().accepts_input_from("relay-1"));
        }
        node.start_session(&token(&indexer, 1, "node-a", "relay-1", Role::Player), 1_500);
        let session = "01".repeat(16);
        assert_eq!(
            drain(&mut node),
            vec![
                NodeEvent::SessionStarted { session: session.clone(), title: "demo".into() },
                NodeEvent::KeyframeRequested
            ]
        );
        relay.send(ToNode::InputDatagram(key_input.clone())).unwrap();
        let _ = pump(&mut node, &mut relay, t0);
        relay.send(ToNode::Control(RelayMessage::SessionEnd(session.clone()))).unwrap();
        let _ = pump(&mut node, &mut relay, t0);
        let events = drain(&mut node);
        assert!(matches!(events[0], NodeEvent::Input(_)), "{events:?}");
        assert_eq!(events[1], NodeEvent::SessionEnded(session.clone()));
        // The relay cannot start the ended session again with the same token.
        node.start_session(&token(&indexer, 1, "node-a", "relay-1", Role::Player), 1_500);
        assert_eq!(drain(&mut node), vec![NodeEvent::SessionRefused(GateError::Ended(session.clone()))]);
        // Nor after a reconnect: the gate carries over.
        let gate = node.gate().clone();
        assert_eq!(node.lost(t0), None);
        let mut again = NodeSide::new(config("node-a", None), gate, &[0; 32], t0, 1_500);
        again.relay = "relay-1".into();
        again.state = NodeState::Established;
        again.start_session(&token(&indexer, 1, "node-a", "relay-1", Role::Player), 1_500);
        assert_eq!(drain(&mut again), vec![NodeEvent::SessionRefused(GateError::Ended(session))]);
    }

    fn token_at(key: &SigningKey, session: u8, relay: &str, issued_at: u64) -> String {
        Claims {
            session: [session; 16],
            role: Role::Player,
            issued_at,
            expires_at: 2_000,
            title: "demo".into(),
            node: "node-a".into(),
            relay: relay.into(),
        }
        .sign(key)
        .unwrap()
    }

    /// A node linked to two relays, both established, sharing one gate.
    fn two_links(gate: &PlayerGate) -> (NodeSide, NodeSide, Instant) {
        let t0 = Instant::now();
        let mut links = ["relay-1", "relay-2"].map(|relay| {
            let mut node = NodeSide::new(config("node-a", None), gate.clone(), &[0; 32], t0, 1_500);
            node.relay = relay.into();
            node.state = NodeState::Established;
            node
        });
        for l in &mut links {
            let _ = drain(l);
        }
        let [a, b] = links;
        (a, b, t0)
    }

    #[test]
    fn a_session_moves_to_another_relay_with_a_newer_token_and_the_old_relay_loses_it() {
        let indexer = SigningKey::from_bytes(&[1; 32]);
        let gate = PlayerGate::pooled("node-a");
        gate.set_key(indexer.verifying_key());
        let (mut a, mut b, t0) = two_links(&gate);
        let session = "07".repeat(16);
        a.start_session(&token_at(&indexer, 7, "relay-1", 1_000), 1_500);
        assert!(matches!(drain(&mut a)[..], [NodeEvent::SessionStarted { .. }, NodeEvent::KeyframeRequested]));
        assert_eq!(gate.session_relay().as_deref(), Some("relay-1"));
        // Only the session's relay may send its input.
        let mut key_input = Vec::new();
        InputMessage { seq: 1, time_ms: 0, event: crate::input::InputEvent::KeyDown { key: 1, modifiers: 0 } }
            .encode(&mut key_input);
        b.handle_control(t0, &encoded(RelayMessage::Input(key_input.clone()))).unwrap();
        assert_eq!(drain(&mut b), vec![NodeEvent::InputRefused("no_session")]);

        // relay-1 dies: the session waits, it does not end.
        let deadline = t0 + RESUME_GRACE;
        assert_eq!(a.lost(deadline), Some(session.clone()));
        assert_eq!(gate.running().as_deref(), Some(session.as_str()));
        assert_eq!(gate.session_relay(), None, "no media to a lost link");
        assert_eq!(gate.expire(t0 + Duration::from_secs(1)), None);
        // The player comes back through relay-2 with the token the indexer moved.
        b.start_session(&token_at(&indexer, 7, "relay-2", 1_010), 1_500);
        assert_eq!(
            drain(&mut b),
            vec![
                NodeEvent::SessionResumed { session: session.clone(), relay: "relay-2".into() },
                NodeEvent::KeyframeRequested
            ]
        );
        assert_eq!(gate.session_relay().as_deref(), Some("relay-2"));
        assert_eq!(gate.expire(deadline), None, "a resumed session does not expire");
        b.handle_control(t0, &encoded(RelayMessage::Input(key_input))).unwrap();
        assert!(matches!(drain(&mut b)[..], [NodeEvent::Input(_)]));

        // relay-1 comes back: the older token cannot pull the session back, nor can
        // relay-1 end it.
        let (mut a, _, _) = two_links(&gate);
        a.start_session(&token_at(&indexer, 7, "relay-1", 1_000), 1_500);
        assert_eq!(drain(&mut a), vec![NodeEvent::SessionRefused(GateError::Superseded(session.clone()))]);
        a.handle_control(t0, &encoded(RelayMessage::SessionEnd(session.clone()))).unwrap();
        assert_eq!(drain(&mut a), vec![]);
        assert_eq!(gate.running().as_deref(), Some(session.as_str()));

        // relay-2 dies too and nobody comes back: the session ends at the deadline, once.
        assert_eq!(b.lost(deadline), Some(session.clone()));
        assert_eq!(gate.expire(deadline), Some(session.clone()));
        assert_eq!(gate.expire(deadline), None);
        a.start_session(&token_at(&indexer, 7, "relay-1", 1_020), 1_500);
        assert_eq!(drain(&mut a), vec![NodeEvent::SessionRefused(GateError::Ended(session))]);
    }

    fn encoded(msg: RelayMessage) -> Vec<u8> {
        let mut out = Vec::new();
        msg.encode(&mut out);
        out
    }

    #[test]
    fn only_a_checkers_session_gets_a_capacity_challenge_answered_and_the_answer_reaches_the_relay() {
        let indexer = SigningKey::from_bytes(&[1; 32]);
        let gate = PlayerGate::pooled("node-a");
        gate.set_key(indexer.verifying_key());
        let (mut node, mut relay, t0) = established(gate);
        let challenge = |seq: u32, n: u16| {
            let mut wire = Vec::new();
            InputMessage { seq, time_ms: 0, event: InputEvent::Capacity { seed: [4; 32], n } }.encode(&mut wire);
            ToNode::Control(RelayMessage::Input(wire))
        };
        // No session, then a player's session: the node's GPU is not a player's to spend.
        relay.send(challenge(1, 32)).unwrap();
        let _ = pump(&mut node, &mut relay, t0);
        assert_eq!(drain(&mut node), vec![NodeEvent::InputRefused("no_session")]);
        node.start_session(&token(&indexer, 1, "node-a", "relay-1", Role::Player), 1_500);
        let _ = drain(&mut node);
        relay.send(challenge(2, 32)).unwrap();
        let _ = pump(&mut node, &mut relay, t0);
        assert_eq!(drain(&mut node), vec![NodeEvent::InputRefused("not_checker")]);
        node.end_session("next");
        let _ = pump(&mut node, &mut relay, t0);
        while relay.poll_event().is_some() {}
        // A checker's session: answered; a size the format refuses, or above what a
        // session answers, is not.
        node.start_session(&token(&indexer, 2, "node-a", "relay-1", Role::Checker), 1_500);
        let _ = drain(&mut node);
        for (seq, n) in [(3, 20), (4, 2048), (5, 32)] {
            relay.send(challenge(seq, n)).unwrap();
        }
        let _ = pump(&mut node, &mut relay, t0);
        let want = Challenge::new([4; 32], 32).unwrap();
        assert_eq!(
            drain(&mut node),
            vec![
                NodeEvent::InputRefused("bad_challenge"),
                NodeEvent::InputRefused("bad_challenge"),
                NodeEvent::CapacityChallenge { seq: 5, challenge: want }
            ]
        );
        let (a, b) = want.matrices();
        let product = capacity::multiply(&a, &b, 32);
        node.answer_capacity(5, &product, 10, 20);
        node.refuse_capacity(6, "busy");
        let _ = pump(&mut node, &mut relay, t0);
        let events: Vec<RelayEvent> = std::iter::from_fn(|| relay.poll_event()).collect();
        let Some(RelayEvent::Capacity(CapacityReply::Commit { seq: 5, digest, gpu_us: 10, wall_us: 20 })) =
            events.first().cloned()
        else {
            panic!("the commitment comes first: {:?}", events.first());
        };
        let mut assembly = capacity::Assembly::new(&want, digest);
        let mut chunks = 0;
        for e in &events[1..events.len() - 1] {
            let RelayEvent::Capacity(CapacityReply::Chunk { seq: 5, offset, data }) = e else { panic!("{e:?}") };
            assembly.push(*offset, data).unwrap();
            chunks += 1;
        }
        assert_eq!(chunks, (32 * 32 * 4usize).div_ceil(capacity::CHUNK_BYTES));
        assert_eq!(assembly.finish().unwrap(), product);
        assert_eq!(
            events.last(),
            Some(&RelayEvent::Capacity(CapacityReply::Refused { seq: 6, reason: "busy".into() }))
        );
    }

    #[test]
    fn a_relay_pulls_a_session_with_a_signed_request_and_gets_the_stream_as_from_a_node() {
        let t0 = Instant::now();
        let (puller, carrier) = (SigningKey::from_bytes(&[7; 32]), SigningKey::from_bytes(&[8; 32]));
        let exporter = [5u8; 32];
        let session = "07".repeat(16);
        // relay-c dials relay-a and asks for the session.
        let request = pull_request(&exporter, "relay-c", &session, &puller);
        let mut at_a = RelaySide::new("relay-a", &exporter, RepairConfig::default(), t0);
        at_a.handle_control(t0, &request).unwrap();
        match at_a.poll_event() {
            Some(RelayEvent::Pull { relay, session: s, key }) => {
                assert_eq!((relay.as_str(), s.as_str(), *key), ("relay-c", session.as_str(), puller.verifying_key()));
            }
            other => panic!("expected a pull, got {other:?}"),
        }
        assert!(at_a.poll_transmit().is_none(), "nothing is sent for a pull before the driver decides");
        // The request is bound to its connection, and to its session.
        let mut elsewhere = RelaySide::new("relay-a", &[6; 32], RepairConfig::default(), t0);
        assert_eq!(elsewhere.handle_control(t0, &request), Err(LinkError::BadSignature));
        let mut tampered = request.clone();
        let at = tampered.windows(4).position(|w| w == b"0707").unwrap();
        tampered[at] = b'1';
        let mut fresh = RelaySide::new("relay-a", &exporter, RepairConfig::default(), t0);
        assert_eq!(fresh.handle_control(t0, &tampered), Err(LinkError::BadSignature));

        // relay-a sends the node's stream as a node would, its hello signed with its relay
        // key; relay-c verifies that key and admits it like a node's.
        let stream = stream("node-a");
        let carrying = NodeConfig { stream: stream.clone(), identity: Some(carrier.clone()), bitrate_bounds: None };
        let mut sender = NodeSide::new(carrying, PlayerGate::open(), &exporter, t0, 0);
        let mut at_c = RelaySide::new("relay-c", &exporter, RepairConfig::default(), t0);
        let _ = pump(&mut sender, &mut at_c, t0);
        assert_eq!(hello_key(&mut at_c), Some(carrier.verifying_key()));
        at_c.admit(t0);
        let _ = pump(&mut sender, &mut at_c, t0);
        assert!(sender.is_established());
        let _ = drain(&mut sender);
        // A packet lost between the relays is asked for once and resent by relay-a from
        // its own cache: the node never hears of it.
        let mut out = Vec::new();
        for seq in [20u16, 21, 22] {
            sender.send_rtp(t0, &rtp(seq), None, &mut out).unwrap();
            if seq != 21 {
                at_c.handle_datagram(t0, &out).unwrap();
            }
        }
        at_c.handle_timeout(t0 + Duration::from_millis(5)).unwrap();
        let nack = at_c.poll_transmit().unwrap();
        sender.handle_control(t0, &nack).unwrap();
        assert_eq!(drain(&mut sender), vec![NodeEvent::Resent { sent: 1, missed: 0 }]);
        let resent = sender.poll_datagram().unwrap();
        assert!(at_c.handle_datagram(t0, &resent).unwrap().repaired);
    }

    #[test]
    fn nacks_are_answered_from_the_cache_and_bitrate_is_clamped() {
        let (mut node, mut relay, t0) = established(PlayerGate::open());
        let mut out = Vec::new();
        for seq in [10u16, 11, 13] {
            node.send_rtp(t0, &rtp(seq), None, &mut out).unwrap();
            if seq != 11 {
                relay.handle_datagram(t0, &out).unwrap();
            }
        }
        // 11 was lost on the way, 12 was never sent at all (the cache restarted at 13).
        relay.handle_timeout(t0 + Duration::from_millis(5)).unwrap();
        let nack = relay.poll_transmit().unwrap();
        node.handle_control(t0, &nack).unwrap();
        assert_eq!(drain(&mut node), vec![NodeEvent::Resent { sent: 0, missed: 2 }]);
        relay.send(ToNode::Control(RelayMessage::Bitrate(100))).unwrap();
        relay.send(ToNode::Control(RelayMessage::Bitrate(u32::MAX))).unwrap();
        let _ = pump(&mut node, &mut relay, t0);
        assert_eq!(drain(&mut node), vec![NodeEvent::Bitrate(500_000), NodeEvent::Bitrate(6_000_000)]);
    }

    #[test]
    fn audio_travels_with_its_capture_time_and_a_lost_audio_packet_is_resent() {
        let (mut node, mut relay, t0) = established(PlayerGate::open());
        let captured = std::time::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let mut out = Vec::new();
        let mut lost = Vec::new();
        for seq in [40u16, 41, 42] {
            node.send_audio(t0, &rtp(seq), captured, &mut out).unwrap();
            if seq == 41 {
                lost = out.clone();
                continue;
            }
            let media = relay.handle_datagram(t0, &out).unwrap();
            assert!(media.audio);
            assert_eq!(media.capture_ntp, Some(framing::to_ntp(captured)));
            assert_eq!(&out[media.rtp_offset..], &rtp(seq)[..]);
        }
        // Video numbering is apart from audio's: video 40 is no duplicate.
        node.send_rtp(t0, &rtp(40), None, &mut out).unwrap();
        assert!(!relay.handle_datagram(t0, &out).unwrap().audio);
        relay.handle_timeout(t0 + Duration::from_millis(5)).unwrap();
        let nack = relay.poll_transmit().unwrap();
        node.handle_control(t0, &nack).unwrap();
        assert_eq!(drain(&mut node), vec![NodeEvent::Resent { sent: 1, missed: 0 }]);
        let resent = node.poll_datagram().expect("the lost audio packet again");
        assert_eq!(resent, lost, "resent as first sent, capture time included");
        let media = relay.handle_datagram(t0, &resent).unwrap();
        assert!(media.audio && media.repaired);
        assert_eq!(relay.handle_datagram(t0, &resent), Err(MediaDrop::Duplicate));
        // Malformed audio datagrams are dropped with a reason, never a panic.
        assert_eq!(relay.handle_datagram(t0, &[1, 4, 0, 0]), Err(MediaDrop::BadDatagram));
        assert_eq!(relay.handle_datagram(t0, &[1, 4, 0, 0, 0, 0, 0, 0, 0, 0, 9]), Err(MediaDrop::BadRtp));
    }

    #[test]
    fn a_node_that_does_not_read_cannot_grow_the_relays_queue_with_input() {
        let (_node, mut relay, _) = established(PlayerGate::open());
        let input = vec![0u8; 64];
        let mut refused = 0;
        for _ in 0..20_000 {
            if !relay.send(ToNode::Control(RelayMessage::Input(input.clone()))).unwrap() {
                refused += 1;
            }
        }
        assert!(refused > 0 && relay.dropped_control() == refused);
        assert!(relay.transmit.len() < MAX_QUEUED_CONTROL + 128);
        assert!(relay.send(ToNode::Control(RelayMessage::SessionEnd("ab".into()))).unwrap(), "control still goes");
    }

    #[test]
    fn hostile_bytes_never_panic_either_side() {
        let t0 = Instant::now();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for len in 0..600usize {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            let mut relay = RelaySide::new("r", &[0; 32], RepairConfig::default(), t0);
            let _ = relay.handle_control(t0, &bytes);
            let _ = relay.handle_datagram(t0, &bytes);
            let (mut node, mut relay, _) = established(PlayerGate::pooled("n"));
            let _ = relay.handle_datagram(t0, &bytes);
            let _ = relay.handle_control(t0, &bytes);
            let _ = node.handle_control(t0, &bytes);
            node.handle_datagram(t0, &bytes);
        }
    }
}
