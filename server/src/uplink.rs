//! The render node's QUIC connection to its edge relay.
//!
//! RTP packets travel as QUIC datagrams (unreliable, unordered: a late video packet is
//! worth nothing), control messages on one bidirectional stream. If the relay goes away
//! the node keeps rendering, discards packets (counted), and reconnects with exponential
//! backoff; every new connection starts with a keyframe.

use crate::metrics::{PacketDrop, ServerMetrics};
use crate::pipeline::{Outgoing, ReceivedInput};
use crate::pool::SessionGate;
use anyhow::{Context, anyhow};
use pylon_proto::framing::{self, ControlDecoder, ControlMessage, DatagramKind, StreamHello};
use pylon_proto::input::InputMessage;
use pylon_proto::repair::RetransmitCache;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// How long sent RTP packets are kept for resends: past it, their frame is too old to show.
pub const RESEND_WINDOW: Duration = Duration::from_secs(1);

/// Kernel socket buffer size: QUIC datagram bursts (a keyframe is dozens of packets)
/// overflow the default of a few hundred KB.
pub const SOCKET_BUFFER: usize = 8 << 20;

/// How to reach the relay.
#[derive(Debug, Clone)]
pub struct UplinkConfig {
    /// The relay's QUIC ingest address.
    pub relay: SocketAddr,
    /// The relay's certificate (DER), trusted for this connection.
    pub relay_cert: PathBuf,
    /// Server name in the relay's certificate.
    pub server_name: String,
    /// The stream description sent first on every connection.
    pub hello: StreamHello,
    /// Where the relay's bitrate requests go, and their bounds.
    pub bitrate: Option<BitrateControl>,
}

/// The encoder's target bitrate as the relay may set it (from the player's congestion
/// feedback), within the node's bounds.
#[derive(Debug, Clone)]
pub struct BitrateControl {
    /// The pipeline's target, bit/s ([`crate::pipeline::Pipeline::bitrate_target`]).
    pub target: Arc<AtomicU64>,
    /// Lowest target accepted, bit/s.
    pub min: u64,
    /// Highest target accepted, bit/s.
    pub max: u64,
}

/// Creates a UDP socket with large kernel buffers and a quinn endpoint on it.
pub fn endpoint(bind: SocketAddr) -> anyhow::Result<quinn::Endpoint> {
    let socket = big_buffer_socket(bind)?;
    let runtime = quinn::default_runtime().ok_or_else(|| anyhow!("no async runtime for QUIC"))?;
    quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket, runtime).context("creating the QUIC endpoint")
}

/// A bound UDP socket whose receive and send buffers are [`SOCKET_BUFFER`] (as far as the
/// kernel allows; the granted size is logged when smaller).
pub fn big_buffer_socket(bind: SocketAddr) -> anyhow::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket =
        Socket::new(Domain::for_address(bind), Type::DGRAM, Some(Protocol::UDP)).context("creating a UDP socket")?;
    for (what, set, get) in [
        (
            "receive",
            Socket::set_recv_buffer_size as fn(&Socket, usize) -> std::io::Result<()>,
            Socket::recv_buffer_size as fn(&Socket) -> std::io::Result<usize>,
        ),
        ("send", Socket::set_send_buffer_size, Socket::send_buffer_size),
    ] {
        if let Err(e) = set(&socket, SOCKET_BUFFER) {
            tracing::warn!("cannot set the UDP {what} buffer to {SOCKET_BUFFER} bytes: {e}");
        }
        if let Ok(got) = get(&socket)
            && got < SOCKET_BUFFER
        {
            tracing::warn!(
                "UDP {what} buffer is {got} bytes (wanted {SOCKET_BUFFER}); raise net.core.rmem_max/wmem_max to avoid drops"
            );
        }
    }
    socket.set_nonblocking(true)?;
    socket.bind(&bind.into()).with_context(|| format!("binding UDP {bind}"))?;
    Ok(socket.into())
}

/// A QUIC client configuration that trusts the relay certificate at `cert_path`.
pub fn client_config(cert_path: &PathBuf) -> anyhow::Result<quinn::ClientConfig> {
    let der = std::fs::read(cert_path).with_context(|| {
        format!("reading the relay certificate {} (the relay writes it on start)", cert_path.display())
    })?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from(der)).context("the relay certificate is not valid DER")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![framing::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config()));
    Ok(config)
}

/// QUIC transport settings of the node's side of the relay connection.
pub fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    // A relay that vanishes is noticed within 5 s (keep-alives every second).
    t.max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(5_000))));
    t.keep_alive_interval(Some(Duration::from_secs(1)));
    t.datagram_send_buffer_size(SOCKET_BUFFER);
    t.datagram_receive_buffer_size(Some(SOCKET_BUFFER));
    // Start at a size that fits a whole RTP packet; MTU discovery may raise it.
    t.initial_mtu(1400);
    // BBR, not a loss-based controller: a few percent of random loss on the way to the
    // relay must not throttle the stream below the video's bitrate (the relay repairs
    // the loss; the player's own congestion feedback sets the bitrate).
    t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
    t
}

/// Runs the uplink until `shutdown` becomes true: connect, send, reconnect.
pub async fn run(
    config: UplinkConfig,
    mut packets: mpsc::Receiver<Outgoing>,
    keyframe: Arc<AtomicBool>,
    inputs: std::sync::mpsc::Sender<ReceivedInput>,
    gate: SessionGate,
    metrics: ServerMetrics,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let bind: SocketAddr = if config.relay.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse()?;
    let endpoint = endpoint(bind)?;
    let client = client_config(&config.relay_cert)?;
    let mut backoff = Duration::from_millis(100);
    loop {
        if *shutdown.borrow() {
            break;
        }
        let attempt = endpoint.connect_with(client.clone(), config.relay, &config.server_name)?;
        let conn = tokio::select! {
            c = attempt => c,
            _ = shutdown.changed() => break,
        };
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("cannot reach the relay ({e}); retrying in {backoff:?}");
                if discard_for(&mut packets, backoff, &metrics, &mut shutdown).await {
                    break;
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        metrics.relay_connects.inc();
        metrics.relay_connected.set(1);
        tracing::info!("connected to the relay");
        keyframe.store(true, Ordering::Relaxed);
        let link = Link { keyframe: &keyframe, inputs: &inputs, gate: &gate, metrics: &metrics };
        let result =
            serve_connection(&conn, &config.hello, config.bitrate.as_ref(), &mut packets, &link, &mut shutdown).await;
        // The relay's viewers are gone with the connection: so is the session.
        gate.end(None);
        metrics.relay_connected.set(0);
        metrics.relay_disconnects.inc();
        match result {
            Ok(()) => {
                conn.close(0u32.into(), b"render node shutting down");
                break;
            }
            Err(e) => tracing::warn!("relay connection lost: {e:#}; reconnecting"),
        }
    }
    endpoint.wait_idle().await;
    Ok(())
}

/// Discards packets (counted) for `wait`; returns true if shutdown was asked meanwhile.
async fn discard_for(
    packets: &mut mpsc::Receiver<Outgoing>,
    wait: Duration,
    metrics: &ServerMetrics,
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        tokio::select! {
            p = packets.recv() => {
                if p.is_none() { return true; }
                metrics.rtp_packets_dropped.get_or_create(&PacketDrop { reason: "not_connected" }).inc();
            }
            _ = tokio::time::sleep_until(deadline) => return false,
            _ = shutdown.changed() => return true,
        }
    }
}

/// What the connection hands incoming control to.
struct Link<'a> {
    keyframe: &'a AtomicBool,
    inputs: &'a std::sync::mpsc::Sender<ReceivedInput>,
    gate: &'a SessionGate,
    metrics: &'a ServerMetrics,
}

/// Sends media and handles control until the connection fails (`Err`) or shutdown (`Ok`).
async fn serve_connection(
    conn: &quinn::Connection,
    hello: &StreamHello,
    bitrate: Option<&BitrateControl>,
    packets: &mut mpsc::Receiver<Outgoing>,
    link: &Link<'_>,
    shutdown: &mut watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let Link { keyframe, inputs, gate, metrics } = *link;
    // Player input, checked again here (the relay checked size, role and rate), and only
    // inside a session this node verified when it is in a pool.
    let deliver = |bytes: &[u8]| {
        if !gate.accepts_input() {
            metrics.input_rejected.get_or_create(&crate::metrics::DropReason { reason: "no_session" }).inc();
            return;
        }
        let arrived = std::time::Instant::now();
        match InputMessage::decode(bytes) {
            Ok(message) => {
                let _ = inputs.send(ReceivedInput { message, arrived });
            }
            Err(e) => {
                tracing::debug!("refused input: {e}");
                metrics.input_rejected.get_or_create(&crate::metrics::DropReason { reason: "malformed" }).inc();
            }
        }
    };
    let (mut send, mut recv) = conn.open_bi().await.context("opening the control stream")?;
    let mut buf = Vec::new();
    ControlMessage::StreamHello(hello.clone()).encode(&mut buf);
    send.write_all(&buf).await.context("sending the stream description")?;
    let mut decoder = ControlDecoder::default();
    let mut read_buf = vec![0u8; 4096];
    let mut datagram = Vec::with_capacity(1500);
    // What was sent in the last second, for the relay's resend requests.
    let mut sent = RetransmitCache::new(RESEND_WINDOW, 4096);
    loop {
        tokio::select! {
            packet = packets.recv() => {
                let rtp = match packet {
                    None => return Ok(()),
                    Some(Outgoing::Rtp(rtp, capture)) => (rtp, capture),
                    Some(Outgoing::FrameInfo(info)) => {
                        buf.clear();
                        ControlMessage::FrameInfo(info).encode(&mut buf);
                        send.write_all(&buf).await.context("writing frame info")?;
                        continue;
                    }
                };
                let (rtp, capture) = rtp;
                if let Some([s0, s1]) = rtp.get(2..4).and_then(|s| <[u8; 2]>::try_from(s).ok()) {
                    sent.insert(std::time::Instant::now(), u16::from_be_bytes([s0, s1]), &rtp);
                }
                datagram.clear();
                match capture {
                    Some(t) => framing::encode_captured_datagram(t, &rtp, &mut datagram),
                    None => framing::encode_datagram(DatagramKind::VideoRtp, &rtp, &mut datagram),
                }
                if let Err(e) = conn.send_datagram(bytes::Bytes::copy_from_slice(&datagram)) {
                    metrics.rtp_packets_dropped.get_or_create(&PacketDrop { reason: "send_error" }).inc();
                    match e {
                        quinn::SendDatagramError::TooLarge => tracing::warn!("RTP packet of {} bytes too large for a datagram", rtp.len()),
                        e => return Err(e.into()),
                    }
                }
            }
            read = recv.read(&mut read_buf) => {
                match read.context("reading the control stream")? {
                    None => return Err(anyhow!("the relay closed the control stream")),
                    Some(n) => {
                        decoder.extend(read_buf.get(..n).unwrap_or_default());
                        loop {
                            match decoder.next_message() {
                                Ok(Some(ControlMessage::KeyframeRequest)) => {
                                    metrics.keyframe_requests.inc();
                                    keyframe.store(true, Ordering::Relaxed);
                                }
                                Ok(Some(ControlMessage::Goodbye(reason))) => {
                                    return Err(anyhow!("the relay said goodbye: {reason}"));
                                }
                                Ok(Some(ControlMessage::Input(bytes))) => deliver(&bytes),
                                Ok(Some(ControlMessage::SessionStart(token))) => {
                                    match gate.start(&token, crate::pool::now()) {
                                        Ok(session) => {
                                            metrics.sessions_started.inc();
                                            tracing::info!(session, "player session started");
                                            keyframe.store(true, Ordering::Relaxed);
                                        }
                                        Err(e) => {
                                            metrics.sessions_refused.inc();
                                            tracing::warn!("refused a session token from the relay: {e}");
                                        }
                                    }
                                }
                                Ok(Some(ControlMessage::Bitrate(bps))) => {
                                    if let Some(b) = bitrate {
                                        let target = u64::from(bps).clamp(b.min, b.max);
                                        tracing::debug!(requested = bps, target, "bitrate from the relay");
                                        b.target.store(target, Ordering::Relaxed);
                                    }
                                }
                                Ok(Some(ControlMessage::Nack(seqs))) => {
                                    // Lost between here and the relay: resend once, for every viewer.
                                    for seq in seqs {
                                        let Some(rtp) = sent.get(seq) else {
                                            metrics.rtp_resend_missed.inc();
                                            continue;
                                        };
                                        datagram.clear();
                                        framing::encode_datagram(DatagramKind::VideoRtp, rtp, &mut datagram);
                                        if conn.send_datagram(bytes::Bytes::copy_from_slice(&datagram)).is_ok() {
                                            metrics.rtp_resent.inc();
                                        }
                                    }
                                }
                                Ok(Some(ControlMessage::SessionEnd(session))) => {
                                    tracing::info!(session, "player session ended");
                                    gate.end(Some(&session));
                                }
                                Ok(Some(other)) => {
                                    metrics.bad_control_messages.inc();
                                    tracing::warn!("unexpected control message from the relay: {other:?}");
                                }
                                Ok(None) => break,
                                Err(e) => {
                                    metrics.bad_control_messages.inc();
                                    return Err(anyhow!("malformed control stream from the relay: {e}"));
                                }
                            }
                        }
                    }
                }
            }
            d = conn.read_datagram() => {
                let d = d.context("reading datagrams")?;
                match framing::decode_datagram(&d) {
                    Ok((DatagramKind::Input, input)) => deliver(input),
                    _ => {
                        metrics.input_rejected.get_or_create(&crate::metrics::DropReason { reason: "bad_datagram" }).inc();
                    }
                }
            }
            _ = shutdown.changed() => {
                buf.clear();
                ControlMessage::Goodbye("render node shutting down".into()).encode(&mut buf);
                let _ = send.write_all(&buf).await;
                let _ = send.finish();
                return Ok(());
            }
        }
    }
}
