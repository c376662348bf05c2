//! The relay against hostile peers: impostor and unregistered render nodes, revoked nodes,
//! a QUIC peer that opens streams and floods sequence-number jumps, and signalling sockets
//! that never start a session. Each attack is refused or bounded; the relay stays up.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use common::{metric, quic_client, relay_metrics, start_indexer};
use ed25519_dalek::SigningKey;
use futures_util::StreamExt;
use pylon_proto::framing::{self, RelayMessage, StreamHello};
use pylon_proto::link::{self, LinkError, NodeConfig, NodeSide, PlayerGate};
use pylon_relay::{RelayConfig, RelayHandle};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, watch};

fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn temp_dir(what: &str) -> std::path::PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::env::temp_dir().join(format!("pylon-trust-{what}-{}-{n}", std::process::id()))
}

async fn start_relay(data_dir: &std::path::Path, indexer: Option<SocketAddr>) -> (RelayHandle, watch::Sender<bool>) {
    let (stop, stop_rx) = watch::channel(false);
    let (started_tx, started_rx) = oneshot::channel();
    let config = RelayConfig {
        http_addr: localhost(),
        webrtc_addr: localhost(),
        advertise_addr: None,
        quic_addr: localhost(),
        data_dir: data_dir.to_path_buf(),
        pool: indexer.map(|addr| pylon_relay::pool::PoolConfig {
            indexer: vec![format!("http://{addr}")],
            id: Some("relay-trust".into()),
            owner: "test".into(),
            region: "local".into(),
            public_url: None,
            public_quic: None,
            capacity: 10,
        }),
        allow_anonymous_nodes: false,
        av_sync: false,
    };
    tokio::spawn(pylon_relay::run(config, stop_rx, Some(started_tx)));
    (started_rx.await.unwrap(), stop)
}

fn stream(node: &str) -> StreamHello {
    StreamHello {
        width: 320,
        height: 240,
        fps: 30,
        profile_level_id: 0x42e01f,
        encoder: "test".into(),
        node: node.into(),
    }
}

/// A node's link to the relay, as far as it got.
struct Attempt {
    conn: quinn::Connection,
    node: NodeSide,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    /// Every message the relay sent, in order.
    received: Vec<RelayMessage>,
    outcome: Result<(), LinkError>,
    /// From the QUIC connection being up to the relay's answer (welcome or refusal).
    handshake: Duration,
}

/// Connects to the relay as node `id` (signing with `key`, if any) and runs the
/// handshake until the relay welcomes or refuses it.
async fn connect(relay: &RelayHandle, id: &str, key: Option<SigningKey>) -> Attempt {
    let (endpoint, config) = quic_client(&relay.cert_path);
    let conn = endpoint.connect_with(config, relay.quic_addr, "pylon-relay").unwrap().await.unwrap();
    let mut exporter = [0u8; link::EXPORTER_LEN];
    conn.export_keying_material(&mut exporter, link::EXPORTER_LABEL, b"").unwrap();
    let config = NodeConfig { stream: stream(id), identity: key, bitrate_bounds: None };
    let started = Instant::now();
    let mut node = NodeSide::new(config, PlayerGate::pooled(id), &exporter, started, 0);
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&node.poll_transmit().unwrap()).await.unwrap();
    let mut received = Vec::new();
    let mut decoder = framing::ControlDecoder::<RelayMessage>::default();
    let mut buf = vec![0u8; 4096];
    let outcome = loop {
        if node.is_established() {
            break Ok(());
        }
        let n = match tokio::time::timeout(Duration::from_secs(10), recv.read(&mut buf)).await {
            Ok(Ok(Some(n))) => n,
            _ => break Err(LinkError::Closed),
        };
        // Keep a copy of what the relay said, to show nothing but the refusal arrived.
        decoder.extend(&buf[..n]);
        while let Ok(Some(m)) = decoder.next_message() {
            received.push(m);
        }
        if let Err(e) = node.handle_control(Instant::now(), &buf[..n]) {
            break Err(e);
        }
    };
    Attempt { conn, node, send, recv, received, outcome, handshake: started.elapsed() }
}

async fn register(indexer: SocketAddr, id: &str, key: &SigningKey) {
    let client = pylon_indexer_client::Client::new(&format!("http://{indexer}"), key.clone()).unwrap();
    client
        .register_node(&pylon_indexer_client::api::RegisterNode {
            id: id.into(),
            provider: "p".into(),
            public_key: client.public_key(),
            gpu_model: "x".into(),
            gpu_memory_mb: 0,
            vulkan_device: "x".into(),
            encoders: vec![],
            capacity: 1,
            region: "local".into(),
            lat: 0.0,
            lon: 0.0,
            price_per_hour: 0.0,
            gpu_class: 0,
            titles: vec!["demo".into()],
        })
        .await
        .unwrap();
}

fn refused_because(a: &Attempt, why: &str) {
    match &a.outcome {
        Err(LinkError::Goodbye(reason)) => assert!(reason.contains(why), "refused for {reason:?}, not {why:?}"),
        other => panic!("expected a refusal ({why}), got {other:?}"),
    }
    // The relay said nothing before its refusal: no welcome, no session token, no input.
    assert_eq!(a.received.len(), 1, "{:?}", a.received);
    assert!(matches!(a.received[0], RelayMessage::Goodbye(_)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impostor_unregistered_and_revoked_nodes_are_refused_before_anything_reaches_them() {
    let dir = temp_dir("pool");
    let indexer = start_indexer(&dir.join("indexer")).await;
    let (relay, stop) = start_relay(&dir.join("relay"), Some(indexer)).await;
    let real = SigningKey::from_bytes(&[1; 32]);
    register(indexer, "node-a", &real).await;

    // Someone who knows node-a's id (it is public) but not its key.
    let impostor = connect(&relay, "node-a", Some(SigningKey::from_bytes(&[66; 32]))).await;
    refused_because(&impostor, "registered with another key");
    let anonymous = connect(&relay, "node-a", None).await;
    refused_because(&anonymous, "sign its hello");
    let unknown = connect(&relay, "node-z", Some(SigningKey::from_bytes(&[5; 32]))).await;
    refused_because(&unknown, "no node of this id");
    for a in [&impostor, &anonymous, &unknown] {
        let closed = tokio::time::timeout(Duration::from_secs(5), a.conn.closed()).await;
        assert!(closed.is_ok(), "a refused node's connection is closed");
    }
    let text = relay_metrics(relay.http_addr).await;
    assert_eq!(metric(&text, "pylon_relay_nodes_refused_total"), 3.0, "{text}");

    // The real node, with its key, is welcomed — and the relay reports its RTT to the
    // indexer under its id, so players are routed to it (and never to an impostor).
    let mut a = connect(&relay, "node-a", Some(real.clone())).await;
    assert_eq!(a.outcome, Ok(()));
    // The handshake is one round trip on the link (hello → welcome); the first time a node
    // id is seen the relay also asks the indexer for its key (cached afterwards).
    let cached = connect(&relay, "node-a", Some(real.clone())).await;
    assert_eq!(cached.outcome, Ok(()));
    eprintln!(
        "handshake: first {:?} (with the indexer lookup), cached {:?}; link RTT {:?}",
        a.handshake,
        cached.handshake,
        cached.conn.rtt()
    );
    cached.conn.close(0u32.into(), b"done");
    // The welcome comes first (a keyframe request for the new stream may share its read).
    assert!(matches!(a.received.first(), Some(RelayMessage::Welcome(r)) if r == "relay-trust"), "{:?}", a.received);
    common::wait_rtt_reported(indexer, "node-a", Duration::from_secs(15)).await;

    // Revoked by the operator: the relay closes the link within a heartbeat.
    let http = common::admin_post(indexer, "/api/v1/nodes/node-a/revoke").await;
    assert_eq!(http, 204);
    let mut buf = vec![0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(15);
    let reason = loop {
        assert!(Instant::now() < deadline, "the revoked node's link stayed open");
        match tokio::time::timeout(Duration::from_secs(1), a.recv.read(&mut buf)).await {
            Ok(Ok(Some(n))) => {
                if let Err(LinkError::Goodbye(reason)) = a.node.handle_control(Instant::now(), &buf[..n]) {
                    break reason;
                }
            }
            Ok(_) => break "closed".into(),
            Err(_) => {}
        }
    };
    assert!(reason.contains("revoked") || reason == "closed", "{reason}");
    // Its per-stream series leave /metrics with it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while relay_metrics(relay.http_addr).await.contains("stream=\"node-a\"") {
        assert!(Instant::now() < deadline, "the revoked node's stream labels stayed in /metrics");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // And it cannot come back.
    let again = connect(&relay, "node-a", Some(real)).await;
    refused_because(&again, "revoked");
    let _ = a.send.finish();
    let _ = stop.send(true);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The relay process, killed if the test fails before stopping it.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A pooled node needs no certificate file: it trusts the relays of its pool by the
/// certificate SHA-256 each registered, and nothing else — a relay outside the pool (or
/// anyone else at the address the node was given) fails the TLS handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_node_trusts_only_relays_by_the_certificate_they_registered() {
    let dir = temp_dir("pinned");
    let indexer = start_indexer(&dir.join("indexer")).await;
    let (member, _stop_member) = start_relay(&dir.join("member"), Some(indexer)).await;
    let (outsider, _stop_outsider) = start_relay(&dir.join("outsider"), None).await;
    let client =
        pylon_indexer_client::Client::new(&format!("http://{indexer}"), SigningKey::from_bytes(&[5; 32])).unwrap();
    // The relay registered the SHA-256 of the certificate it serves.
    let deadline = Instant::now() + Duration::from_secs(10);
    let registered = loop {
        let relays = client.relays().await.unwrap();
        if let Some(r) = relays.into_iter().find(|r| r.id == "relay-trust") {
            break r;
        }
        assert!(Instant::now() < deadline, "the relay never registered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        registered.cert_sha256,
        pylon_indexer_client::api::cert_sha256(&std::fs::read(&member.cert_path).unwrap())
    );
    let pinned = std::collections::HashMap::from([(registered.cert_sha256.clone(), vec![registered.id.clone()])]);
    let config = pylon_server::uplink::pinned_client_config(pinned).unwrap();
    let endpoint = quinn::Endpoint::client(localhost()).unwrap();
    // Whatever name the certificate carries, the pool's relay is trusted…
    let conn = endpoint.connect_with(config.clone(), member.quic_addr, "any-name").unwrap().await;
    assert!(conn.is_ok(), "the pool's relay was not trusted: {:?}", conn.err());
    // …and the outsider is not, though it is a real relay with its own certificate.
    let conn = endpoint.connect_with(config, outsider.quic_addr, "pylon-relay").unwrap().await;
    let err = conn.expect_err("a relay outside the pool was trusted");
    assert!(err.to_string().to_lowercase().contains("certificate"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap().split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_quic_peer_costs_the_relay_a_bounded_amount() {
    // The relay as its own process, so its memory and CPU are its own.
    let dir = temp_dir("flood");
    let mut child = KillOnDrop(
        std::process::Command::new(env!("CARGO_BIN_EXE_pylon-relay"))
            .args([
                "--http-addr",
                "127.0.0.1:0",
                "--webrtc-addr",
                "127.0.0.1:0",
                "--quic-addr",
                "127.0.0.1:0",
                "--data-dir",
            ])
            .arg(&dir)
            .env("RUST_LOG", "info")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let pid = child.0.id();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(child.0.stderr.take().unwrap()));
    let line = lines.find(|l| l.as_ref().is_ok_and(|l| l.contains("relay listening"))).unwrap().unwrap();
    std::thread::spawn(move || for _ in lines {});
    let field = |name: &str| -> SocketAddr {
        line.split(&format!("{name}=")).nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap()
    };
    let (http, quic) = (field("http"), field("quic"));
    let relay = RelayHandle {
        http_addr: http,
        webrtc_addr: http,
        quic_addr: quic,
        cert_path: dir.join("relay-cert.der"),
        pool_id: None,
        drain: pylon_relay::Drain::detached(),
    };
    let rss_before = rss_kib(pid);
    let cpu_before = cpu_seconds(pid);

    // 200 streams: only the one control stream opens; no unidirectional stream at all.
    let (endpoint, config) = quic_client(&relay.cert_path);
    let conn = endpoint.connect_with(config, quic, "pylon-relay").unwrap().await.unwrap();
    assert!(tokio::time::timeout(Duration::from_millis(200), conn.open_uni()).await.is_err(), "no uni streams");
    let mut opened = 0;
    let mut streams = Vec::new();
    for _ in 0..200 {
        match tokio::time::timeout(Duration::from_millis(20), conn.open_bi()).await {
            Ok(Ok(stream)) => {
                opened += 1;
                streams.push(stream);
            }
            _ => break,
        }
    }
    assert_eq!(opened, 1, "the relay allows one bidirectional stream per node");
    drop(streams);

    // A node that says hello properly, then jumps its sequence numbers by 512 on every
    // datagram, as fast as it can, for three seconds.
    let a = connect(&relay, "", None).await;
    assert_eq!(a.outcome, Ok(()));
    let started = Instant::now();
    let mut seq: u16 = 0;
    let mut sent = 0u64;
    let mut datagram = Vec::new();
    let payload = vec![0x55u8; 1100];
    while started.elapsed() < Duration::from_secs(3) {
        for _ in 0..64 {
            let mut rtp = vec![0x80, 108];
            rtp.extend_from_slice(&seq.to_be_bytes());
            rtp.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 2]);
            rtp.extend_from_slice(&payload);
            datagram.clear();
            framing::encode_datagram(framing::DatagramKind::VideoRtp, &rtp, &mut datagram);
            let _ = a.conn.send_datagram(bytes::Bytes::copy_from_slice(&datagram));
            seq = seq.wrapping_add(512);
            sent += 1;
        }
        tokio::task::yield_now().await;
    }
    // The relay keeps serving while it happens.
    let health = tokio::time::timeout(Duration::from_secs(2), common::http_get(http, "/healthz")).await;
    assert!(health.is_ok_and(|h| h.contains("ok")), "the relay stopped answering during the flood");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after = rss_kib(pid);
    let cpu = cpu_seconds(pid) - cpu_before;
    let text = relay_metrics(http).await;
    let given_up = metric(&text, "pylon_relay_upstream_given_up_total");
    eprintln!(
        "flood: {sent} datagrams offered ({} MB) with 512-packet jumps in 3 s; relay RSS {rss_before} → {rss_after} KiB, \
         CPU {cpu:.2} s, upstream losses given up {given_up}",
        sent * 1114 / 1_000_000
    );
    // Bounded: the datagram buffer (8 MiB), the node's queue to egress and the repair map;
    // quinn's defaults with 100 streams would let one peer buffer ~250 MB.
    assert!(rss_after.saturating_sub(rss_before) < 64 * 1024, "RSS grew {rss_before} → {rss_after} KiB");
    assert!(given_up > 0.0, "the jumps were not bounded: {text}");
    // SIGTERM: a clean exit.
    let _ = std::process::Command::new("kill").arg(pid.to_string()).status();
    let status = child.0.wait().unwrap();
    assert!(status.success(), "{status}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signalling_socket_that_never_starts_a_session_is_closed_on_time() {
    let dir = temp_dir("ws");
    let (relay, stop) = start_relay(&dir, None).await;
    let started = Instant::now();
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", relay.http_addr)).await.unwrap();
    // Silence: the relay says why and closes after its deadline.
    let mut closed = false;
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_secs(20), ws.next()).await {
        match msg {
            Ok(tokio_tungstenite::tungstenite::Message::Close(_)) | Err(_) => {
                closed = true;
                break;
            }
            Ok(_) => {}
        }
    }
    let took = started.elapsed();
    assert!(closed, "the half-open socket was never closed");
    assert!(
        took >= pylon_relay::http::OFFER_DEADLINE && took < pylon_relay::http::OFFER_DEADLINE + Duration::from_secs(5)
    );
    let text = relay_metrics(relay.http_addr).await;
    assert_eq!(metric(&text, "pylon_relay_signalling_timeouts_total"), 1.0, "{text}");
    let _ = stop.send(true);
    let _ = std::fs::remove_dir_all(&dir);
}
