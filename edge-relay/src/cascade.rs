//! Relay → relay cascades: a spectator watches through the relay nearest to it; when the
//! session's player is on another relay, this relay pulls the stream from that one, once,
//! however many of its viewers watch it.
//!
//! The pulling relay dials the carrying relay's QUIC ingest (trusting the certificate
//! SHA-256 that relay registered, as the indexer's signed listing says), and its first message is a [`pylon_proto::framing::Pull`]
//! signed with its pool key over the connection's exporter, the session and its id. The
//! carrying relay checks that key against the indexer's record of the pulling relay, and
//! that its own player of the session is here, then sends the stream as a node would: a
//! [`NodeSide`] whose hello carries the node's stream description, signed with the
//! carrying relay's own key, which the pulling relay checks against the indexer's record in
//! turn. From there the link is the node ↔ relay link: the pulling relay asks for lost
//! packets once (answered from the carrying relay's cache, never from the node) and for
//! keyframes (coalesced with the carrying relay's own viewers' requests). The carrying
//! relay's ingest task for the stream sends each packet to the pulling relays itself
//! ([`Downstreams`]): one hop inside the relay, as for its own viewers.

use crate::ingest::{IngestEvent, Mode, Shared};
use crate::metrics::RelayMetrics;
use anyhow::{Context, anyhow};
use pylon_proto::framing::{self, NodeMessage, WireMessage};
use pylon_proto::link::{NodeConfig, NodeEvent, NodeSide, PlayerGate};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, oneshot, watch};

/// A verified request to pull a session's stream from this relay.
#[derive(Debug)]
pub(crate) struct PullRequest {
    /// The pulling relay's id.
    pub relay: String,
    /// The session.
    pub session: String,
    /// Its key (the signature over this connection verified).
    pub key: ed25519_dalek::VerifyingKey,
}

/// Pulls `session`'s stream from the relay its player is on, until that link ends; then
/// tells the egress task (which pulls again while spectators wait).
pub(crate) async fn pull_session(shared: Shared, session: String, shutdown: watch::Receiver<bool>) {
    if let Err(e) = pull(&shared, &session, shutdown).await {
        shared.metrics.pulls_failed.inc();
        tracing::warn!(session, "pulling the session's stream: {e:#}");
    }
    let _ = shared.events.send(IngestEvent::PullEnded { session }).await;
}

async fn pull(shared: &Shared, session: &str, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    let pool = shared.pool.as_ref().ok_or_else(|| anyhow!("only a relay in a pool pulls streams"))?;
    let client = pool.client().ok_or_else(|| anyhow!("only a relay in a pool pulls streams"))?;
    let info = client.session_info(session).await?.ok_or_else(|| anyhow!("no such session"))?;
    anyhow::ensure!(info.running, "the session ended");
    anyhow::ensure!(info.relay != shared.relay_id, "the session's player is on this relay");
    let carrier = pool.cascade_peer(&info.relay).await.map_err(|e| anyhow!("the session's relay: {e}"))?;
    let key = pylon_indexer_client::decode_key(&carrier.public_key).context("the carrying relay's key")?;
    let addr = tokio::net::lookup_host(&carrier.quic_addr)
        .await
        .with_context(|| format!("resolving {}", carrier.quic_addr))?
        .next()
        .ok_or_else(|| anyhow!("{} resolves to no address", carrier.quic_addr))?;
    let mut tls = pylon_indexer_client::pinned::PinnedVerifier::client_config([carrier.cert_sha256.clone()])?;
    tls.alpn_protocols = vec![framing::ALPN.to_vec()];
    let mut config = quinn::ClientConfig::new(Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(tls)?));
    config.transport_config(Arc::new(crate::ingest::transport_config()));
    let conn = tokio::time::timeout(Duration::from_secs(5), shared.endpoint.connect_with(config, addr, "pylon-relay")?)
        .await
        .map_err(|_| anyhow!("{} did not answer", carrier.id))??;
    shared.metrics.pulls.inc();
    tracing::info!(session, from = %carrier.id, "pulling the session's stream for spectators here");
    let node = crate::ingest::NEXT_NODE.fetch_add(1, Ordering::Relaxed);
    let mode = Mode::Pulling { session: session.to_string(), carrier: Box::new(key) };
    let result = crate::ingest::serve_node(node, &conn, shared, mode, shutdown).await;
    conn.close(0u32.into(), b"pull ended");
    result
}

/// Refuses a pull, telling the other relay why.
async fn refuse(send: &mut quinn::SendStream, conn: &quinn::Connection, why: &str) -> anyhow::Result<()> {
    let mut bytes = Vec::new();
    NodeMessage::Goodbye(why.to_string()).encode(&mut bytes);
    crate::ingest::say_goodbye(send, &bytes).await;
    conn.close(2u32.into(), why.as_bytes());
    Err(anyhow!("refused a pull: {why}"))
}

/// A relay pulling a stream from this one, as the stream's ingest task reaches it: that
/// task frames each packet from the node on the pull's link and hands it to QUIC itself,
/// so a copy waits behind no other task. The pull's own task serves the link's control
/// (resends from the link's cache, keyframe requests, frame info, its timers).
pub(crate) struct Downstream {
    side: Mutex<NodeSide>,
    conn: quinn::Connection,
    /// Wakes the pull's task when the link has control bytes to write.
    wake: Notify,
}

impl Downstream {
    fn side(&self) -> MutexGuard<'_, NodeSide> {
        self.side.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The relays pulling one stream from this relay: shared by the stream's ingest task, which
/// copies every packet to them, and the pulls' tasks, which join and leave.
#[derive(Clone, Default)]
pub struct Downstreams(Arc<Mutex<Vec<Arc<Downstream>>>>);

impl std::fmt::Debug for Downstreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Downstreams({})", self.list().len())
    }
}

impl Downstreams {
    fn list(&self) -> MutexGuard<'_, Vec<Arc<Downstream>>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn join(&self, d: Arc<Downstream>) {
        self.list().push(d);
    }

    fn leave(&self, d: &Arc<Downstream>) {
        self.list().retain(|x| !Arc::ptr_eq(x, d));
    }

    /// Sends one RTP packet from the node (which arrived at `arrival`) to every relay
    /// pulling the stream: one copy per relay, however many viewers each has. A copy QUIC
    /// cannot take is counted and dropped; the pulling relay asks for it again.
    pub(crate) fn copy_rtp(
        &self,
        packet: &[u8],
        capture_ntp: Option<u64>,
        audio: bool,
        arrival: Instant,
        metrics: &RelayMetrics,
    ) {
        let list = self.list();
        if list.is_empty() {
            return;
        }
        let capture = capture_ntp.and_then(framing::from_ntp);
        for d in list.iter() {
            let mut datagram = Vec::with_capacity(packet.len() + 16);
            let framed = match (audio, capture) {
                (true, Some(t)) => d.side().send_audio(Instant::now(), packet, t, &mut datagram),
                // An audio packet without its capture time cannot be placed: not sent.
                (true, None) => continue,
                (false, _) => d.side().send_rtp(Instant::now(), packet, capture, &mut datagram),
            };
            if framed.is_err() || datagram.is_empty() {
                // The pulling relay has not welcomed the stream yet.
                continue;
            }
            if d.conn.send_datagram(bytes::Bytes::from(datagram)).is_err() {
                metrics.dropped("downstream_send");
            } else {
                metrics.downstream_packets.inc();
                metrics.downstream_seconds.observe(arrival.elapsed().as_secs_f64());
            }
        }
    }

    /// Passes a frame's latency facts on to every relay pulling the stream.
    pub(crate) fn copy_frame_info(&self, info: framing::FrameInfo) {
        for d in self.list().iter() {
            d.side().send_frame_info(info);
            d.wake.notify_one();
        }
    }
}

/// Sends another relay the stream of the session it pulls, as a node would, until either
/// side ends it: the stream's ingest task sends the media (see [`Downstreams`]); this task
/// serves the link's control.
pub(crate) async fn serve_downstream(
    conn: &quinn::Connection,
    (mut send, mut recv): (quinn::SendStream, quinn::RecvStream),
    exporter: &[u8],
    shared: &Shared,
    request: PullRequest,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let (Some(pool), Some(key)) = (&shared.pool, &shared.key) else {
        return refuse(&mut send, conn, "this relay is not in a pool").await;
    };
    if let Err(why) = pool.check_relay(&request.relay, &request.key).await {
        return refuse(&mut send, conn, &why).await;
    }
    let (tx, rx) = oneshot::channel();
    shared
        .events
        .send(IngestEvent::Pull { session: request.session.clone(), reply: tx })
        .await
        .map_err(|_| anyhow!("egress task gone"))?;
    let mut pulled = match rx.await {
        Ok(Ok(p)) => p,
        Ok(Err(why)) => return refuse(&mut send, conn, &why).await,
        Err(_) => return Err(anyhow!("egress task gone")),
    };
    tracing::info!(relay = request.relay, session = request.session, "a relay pulls a stream from this one");
    let config = NodeConfig { stream: pulled.hello, identity: Some(key.clone()), bitrate_bounds: None };
    let side = NodeSide::new(config, PlayerGate::open(), exporter, Instant::now(), crate::pool::unix_now());
    let d = Arc::new(Downstream { side: Mutex::new(side), conn: conn.clone(), wake: Notify::new() });
    pulled.downstreams.join(d.clone());
    let result =
        serve_control(&d, conn, (&mut send, &mut recv), shared, pulled.source, &mut pulled.ended, &mut shutdown).await;
    pulled.downstreams.leave(&d);
    let _ = send.finish();
    tracing::info!(relay = request.relay, session = request.session, "a pull ended");
    result
}

/// The control side of a pull served here, until either side ends it.
async fn serve_control(
    d: &Downstream,
    conn: &quinn::Connection,
    (send, recv): (&mut quinn::SendStream, &mut quinn::RecvStream),
    shared: &Shared,
    source: u64,
    ended: &mut oneshot::Receiver<()>,
    shutdown: &mut watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let metrics = &shared.metrics;
    let mut buf = vec![0u8; 4096];
    let far = || tokio::time::Instant::now() + Duration::from_secs(3600);
    // The first pass writes the hello.
    let mut step: anyhow::Result<bool> = Ok(true);
    loop {
        let (events, datagrams, transmit) = {
            let mut side = d.side();
            let events: Vec<NodeEvent> = std::iter::from_fn(|| side.poll_event()).collect();
            let datagrams: Vec<Vec<u8>> = std::iter::from_fn(|| side.poll_datagram()).collect();
            (events, datagrams, side.poll_transmit())
        };
        for event in events {
            match event {
                NodeEvent::KeyframeRequested => {
                    let _ = shared.events.send(IngestEvent::Keyframe { node: source }).await;
                }
                NodeEvent::Resent { sent, .. } => {
                    metrics.downstream_packets.inc_by(u64::from(sent));
                }
                // A pulling relay's viewers never play: nothing else it sends counts.
                _ => {}
            }
        }
        for datagram in datagrams {
            let _ = conn.send_datagram(bytes::Bytes::from(datagram));
        }
        if let Some(bytes) = transmit {
            send.write_all(&bytes).await.context("writing the control stream")?;
        }
        match step {
            Ok(true) => {}
            Ok(false) => return Ok(()),
            Err(e) => return Err(e),
        }
        let timeout = d.side().poll_timeout().map_or_else(far, tokio::time::Instant::from_std);
        step = tokio::select! {
            _ = &mut *ended => {
                d.side().close("the stream ended here");
                Ok(false)
            }
            // Frame info queued by the stream's ingest task.
            _ = d.wake.notified() => Ok(true),
            read = recv.read(&mut buf) => match read.context("reading the control stream")? {
                None => Ok(false),
                Some(n) => d.side().handle_control(Instant::now(), buf.get(..n).unwrap_or_default()).map(|()| true).map_err(|e| anyhow!("{e}")),
            },
            // The pulling relay sends no datagrams (its viewers watch; none plays here).
            r = conn.read_datagram() => r.map(|_| true).context("reading datagrams"),
            _ = tokio::time::sleep_until(timeout) => d.side().handle_timeout(Instant::now()).map(|()| true).map_err(|e| anyhow!("{e}")),
            _ = crate::stopped(shutdown) => {
                d.side().close("relay shutting down");
                Ok(false)
            }
        };
    }
}
