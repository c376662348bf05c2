//! QUIC ingest: render nodes connect here and send RTP in datagrams.
//!
//! Each connection must open a control stream whose first message is a `StreamHello`.
//! Datagrams are checked (framing version, RTP header) and handed to the egress task
//! unchanged; anything malformed is counted and dropped. Keyframe requests from viewers
//! come back on the control stream.

use crate::metrics::RelayMetrics;
use crate::pool::Pool;
use crate::tls::Identity;
use anyhow::{Context, anyhow};
use bytes::Bytes;
use pylon_proto::framing::{self, ControlDecoder, ControlMessage, DatagramKind, FrameInfo, StreamHello};
use pylon_proto::repair::{RepairConfig, UpstreamRepair};
use pylon_proto::rtp::RtpPacket;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// Kernel UDP buffer size for ingest: keyframes arrive as bursts of datagrams.
pub const SOCKET_BUFFER: usize = 8 << 20;

/// What the ingest side tells the egress task.
#[derive(Debug)]
pub enum IngestEvent {
    /// A node announced its stream.
    StreamStarted {
        /// Connection id.
        node: u64,
        /// The stream's description.
        hello: StreamHello,
        /// Sends keyframe requests and player input back to the node.
        control: mpsc::Sender<ToNode>,
    },
    /// The node says which input a frame first reflects.
    FrameInfo {
        /// Connection id.
        node: u64,
        /// The facts.
        info: FrameInfo,
    },
    /// One RTP packet (already checked to parse).
    Rtp {
        /// Connection id.
        node: u64,
        /// The whole RTP packet.
        packet: Bytes,
        /// When it arrived.
        arrival: Instant,
        /// The frame's capture time (NTP), on the first packet of each frame.
        capture_ntp: Option<u64>,
    },
    /// The node's connection ended.
    StreamEnded {
        /// Connection id.
        node: u64,
    },
}

/// What the egress side sends a node.
#[derive(Debug, Clone)]
pub enum ToNode {
    /// On the reliable control stream (keyframe requests, key and button input).
    Control(ControlMessage),
    /// As a datagram: supersedable input (mouse motion), unchanged.
    InputDatagram(Vec<u8>),
}

/// Binds the QUIC endpoint with a large UDP buffer and the relay's certificate.
pub fn endpoint(addr: SocketAddr, identity: &Identity) -> anyhow::Result<quinn::Endpoint> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(identity.key.clone().into());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![identity.cert.clone().into()], key)
        .context("loading the relay certificate")?;
    tls.alpn_protocols = vec![framing::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(5_000))))
        .keep_alive_interval(Some(Duration::from_secs(1)))
        .datagram_receive_buffer_size(Some(SOCKET_BUFFER))
        .datagram_send_buffer_size(1 << 20)
        .initial_mtu(1400);
    server.transport_config(Arc::new(transport));
    let socket = crate::egress::big_buffer_socket(addr, SOCKET_BUFFER)?;
    let runtime = quinn::default_runtime().ok_or_else(|| anyhow!("no async runtime for QUIC"))?;
    quinn::Endpoint::new(quinn::EndpointConfig::default(), Some(server), socket, runtime)
        .context("creating the QUIC endpoint")
}

/// Accepts node connections until shutdown.
pub async fn run(
    endpoint: quinn::Endpoint,
    events: mpsc::Sender<IngestEvent>,
    metrics: RelayMetrics,
    pool: Option<Pool>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    static NEXT_NODE: AtomicU64 = AtomicU64::new(1);
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            _ = crate::stopped(&mut shutdown) => break,
        };
        let Some(incoming) = incoming else { break };
        let node = NEXT_NODE.fetch_add(1, Ordering::Relaxed);
        let (events, metrics, shutdown, pool) = (events.clone(), metrics.clone(), shutdown.clone(), pool.clone());
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    metrics.node_handshake_failures.inc();
                    tracing::warn!(node, "node handshake failed: {e}");
                    return;
                }
            };
            metrics.nodes_connected.inc();
            let result = serve_node(node, &conn, &events, &metrics, pool.as_ref(), shutdown).await;
            metrics.nodes_connected.dec();
            let _ = events.send(IngestEvent::StreamEnded { node }).await;
            match result {
                Ok(()) => tracing::info!(node, "render node left"),
                Err(e) => tracing::warn!(node, "render node connection ended: {e:#}"),
            }
        });
    }
    endpoint.close(0u32.into(), b"relay shutting down");
    endpoint.wait_idle().await;
    Ok(())
}

/// Drops a node's RTT from the pool view when its connection ends, however it ends.
struct ForgetRtt<'a>(Option<&'a Pool>, &'a str);

impl Drop for ForgetRtt<'_> {
    fn drop(&mut self) {
        if let Some(pool) = self.0 {
            pool.node_gone(self.1);
        }
    }
}

async fn serve_node(
    node: u64,
    conn: &quinn::Connection,
    events: &mpsc::Sender<IngestEvent>,
    metrics: &RelayMetrics,
    pool: Option<&Pool>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let (mut send, mut recv) = tokio::time::timeout(Duration::from_secs(5), conn.accept_bi())
        .await
        .map_err(|_| anyhow!("no control stream within 5 s"))?
        .context("accepting the control stream")?;
    let mut decoder = ControlDecoder::default();
    let mut buf = vec![0u8; 4096];
    // The first message must describe the stream.
    let hello = loop {
        let n = tokio::time::timeout(Duration::from_secs(5), recv.read(&mut buf))
            .await
            .map_err(|_| anyhow!("no stream description within 5 s"))??
            .ok_or_else(|| anyhow!("control stream closed before the stream description"))?;
        decoder.extend(buf.get(..n).unwrap_or_default());
        match decoder.next_message() {
            Ok(Some(ControlMessage::StreamHello(h))) => break h,
            Ok(Some(other)) => {
                metrics.bad_control_messages.inc();
                return Err(anyhow!("expected a stream description, got {other:?}"));
            }
            Ok(None) => continue,
            Err(e) => {
                metrics.bad_control_messages.inc();
                return Err(anyhow!("malformed control stream: {e}"));
            }
        }
    };
    tracing::info!(
        node,
        id = %hello.node,
        "render node streaming {}x{} at {} fps with {}",
        hello.width,
        hello.height,
        hello.fps,
        hello.encoder
    );
    let node_id = hello.node.clone();
    let _forget_rtt = ForgetRtt(pool, &node_id);
    if let Some(pool) = pool {
        if pool.is_revoked(&node_id) {
            conn.close(2u32.into(), b"this node is revoked");
            return Err(anyhow!("refused revoked node {node_id}"));
        }
        pool.set_node_rtt(&node_id, conn.rtt());
    }
    // RTT to the node for the indexer's matching; revocations close the connection.
    let mut pool_tick = tokio::time::interval(Duration::from_secs(1));
    // Losses between node and relay are asked for once, for every viewer.
    let mut repair = UpstreamRepair::new(RepairConfig::default());
    repair.set_rtt(conn.rtt());
    let far = || tokio::time::Instant::now() + Duration::from_secs(3600);
    let (control_tx, mut control_rx) = mpsc::channel::<ToNode>(256);
    let stream = metrics.stream_counters(&crate::forward::stream_label(node, &hello));
    events
        .send(IngestEvent::StreamStarted { node, hello, control: control_tx })
        .await
        .map_err(|_| anyhow!("egress task gone"))?;
    let mut out = Vec::new();
    loop {
        tokio::select! {
            d = conn.read_datagram() => {
                let d = d.context("reading datagrams")?;
                let arrival = Instant::now();
                match framing::decode_media_datagram(&d) {
                    Ok((DatagramKind::VideoRtp | DatagramKind::VideoRtpCaptured, capture_ntp, rtp)) if let Ok(parsed) = RtpPacket::parse(rtp) => {
                        let before = repair.stats().repaired;
                        if !repair.on_packet(parsed.header.sequence, arrival) {
                            metrics.dropped("duplicate");
                            continue;
                        }
                        if repair.stats().repaired > before {
                            metrics.upstream_repaired.inc();
                            stream.upstream_repaired.inc();
                        }
                        metrics.rtp_in_packets.inc();
                        metrics.rtp_in_bytes.inc_by(rtp.len() as u64);
                        let packet = d.slice(d.len() - rtp.len()..);
                        if events.try_send(IngestEvent::Rtp { node, packet, arrival, capture_ntp }).is_err() {
                            metrics.dropped("egress_queue_full");
                        }
                    }
                    Ok((DatagramKind::VideoRtp | DatagramKind::VideoRtpCaptured, _, _)) => metrics.dropped("bad_rtp"),
                    Ok(_) => metrics.dropped("bad_datagram"),
                    Err(_) => metrics.dropped("bad_datagram"),
                }
            }
            msg = control_rx.recv() => {
                match msg {
                    None => continue,
                    Some(ToNode::Control(msg)) => {
                        out.clear();
                        msg.encode(&mut out);
                        send.write_all(&out).await.context("writing to the control stream")?;
                    }
                    Some(ToNode::InputDatagram(input)) => {
                        out.clear();
                        framing::encode_datagram(DatagramKind::Input, &input, &mut out);
                        let _ = conn.send_datagram(bytes::Bytes::copy_from_slice(&out));
                    }
                }
            }
            read = recv.read(&mut buf) => {
                match read.context("reading the control stream")? {
                    None => return Ok(()),
                    Some(n) => {
                        decoder.extend(buf.get(..n).unwrap_or_default());
                        loop {
                            match decoder.next_message() {
                                Ok(Some(ControlMessage::Goodbye(reason))) => {
                                    tracing::info!(node, "render node says goodbye: {reason}");
                                    return Ok(());
                                }
                                Ok(Some(ControlMessage::FrameInfo(info))) => {
                                    let _ = events.try_send(IngestEvent::FrameInfo { node, info });
                                }
                                Ok(Some(other)) => {
                                    metrics.bad_control_messages.inc();
                                    tracing::warn!(node, "unexpected control message {other:?}");
                                }
                                Ok(None) => break,
                                Err(e) => {
                                    metrics.bad_control_messages.inc();
                                    conn.close(1u32.into(), b"malformed control stream");
                                    return Err(anyhow!("malformed control stream: {e}"));
                                }
                            }
                        }
                    }
                }
            }
            _ = tokio::time::sleep_until(repair.next_timeout().map_or_else(far, tokio::time::Instant::from_std)) => {
                let given_up = repair.stats().given_up;
                let seqs = repair.poll_requests(Instant::now(), framing::MAX_NACK_SEQS);
                metrics.upstream_given_up.inc_by(repair.stats().given_up - given_up);
                if !seqs.is_empty() {
                    metrics.upstream_nacks.inc_by(seqs.len() as u64);
                    stream.upstream_nacks.inc_by(seqs.len() as u64);
                    out.clear();
                    ControlMessage::Nack(seqs).encode(&mut out);
                    send.write_all(&out).await.context("writing to the control stream")?;
                }
            }
            _ = pool_tick.tick() => {
                repair.set_rtt(conn.rtt());
                let Some(pool) = pool else { continue };
                if pool.is_revoked(&node_id) {
                    out.clear();
                    ControlMessage::Goodbye("this node is revoked".into()).encode(&mut out);
                    let _ = send.write_all(&out).await;
                    conn.close(2u32.into(), b"this node is revoked");
                    return Err(anyhow!("node {node_id} revoked by the indexer: connection closed"));
                }
                pool.set_node_rtt(&node_id, conn.rtt());
            }
            _ = crate::stopped(&mut shutdown) => {
                out.clear();
                ControlMessage::Goodbye("relay shutting down".into()).encode(&mut out);
                let _ = send.write_all(&out).await;
                let _ = send.finish();
                conn.close(0u32.into(), b"relay shutting down");
                return Ok(());
            }
        }
    }
}
