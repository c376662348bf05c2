//! Hostile and unlucky input: garbage on every socket, malformed signalling, a relay
//! restarted under a running render node. Each gets a counted drop or a clear error; the
//! relay keeps serving and the node reconnects.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use common::{metric, quic_client, relay_metrics, start_platform, wait_metric};
use futures_util::{SinkExt, StreamExt};
use pylon_proto::framing::{NodeHello, NodeMessage, StreamHello, WireMessage};
use pylon_relay::RelayConfig;
use std::time::Duration;
use tokio::sync::{oneshot, watch};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_every_socket_is_counted_and_the_stream_goes_on() {
    let platform = start_platform(320, 240, 30).await;
    let http = platform.relay.http_addr;
    wait_metric(http, "pylon_relay_rtp_in_packets", 50.0).await;

    // Raw UDP junk at the QUIC and WebRTC ports.
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for len in [0usize, 1, 13, 200, 1400] {
        let junk: Vec<u8> = (0..len).map(|i| (i * 31 + 7) as u8).collect();
        udp.send_to(&junk, platform.relay.quic_addr).await.unwrap();
        udp.send_to(&junk, platform.relay.webrtc_addr).await.unwrap();
    }
    wait_metric(http, "pylon_relay_udp_unknown", 1.0).await;

    // A QUIC peer with a valid handshake but a garbage control stream.
    let (endpoint, config) = quic_client(&platform.relay.cert_path);
    let conn = endpoint.connect_with(config.clone(), platform.relay.quic_addr, "pylon-relay").unwrap().await.unwrap();
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(&[0xff, 0xff, 0xff, 1, 2, 3]).await.unwrap();
    wait_metric(http, "pylon_relay_bad_control_messages", 1.0).await;
    let closed = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
    assert!(closed.is_ok(), "the relay closes a connection with a malformed control stream");

    // A peer that says hello properly, then sends junk datagrams.
    let before = metric(&relay_metrics(http).await, "pylon_relay_ingest_dropped");
    let conn = endpoint.connect_with(config, platform.relay.quic_addr, "pylon-relay").unwrap().await.unwrap();
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    let mut hello = Vec::new();
    NodeMessage::Hello(NodeHello {
        stream: StreamHello {
            width: 64,
            height: 64,
            fps: 30,
            profile_level_id: 0x42e01f,
            encoder: "junk".into(),
            node: String::new(),
        },
        auth: None,
    })
    .encode(&mut hello);
    send.write_all(&hello).await.unwrap();
    for d in [&b""[..], &[1], &[9, 1, 0x80], &[1, 1, 0x40, 0, 0], &[1, 7, 1, 2, 3]] {
        let _ = conn.send_datagram(bytes::Bytes::copy_from_slice(d));
    }
    wait_metric(http, "pylon_relay_ingest_dropped", before + 3.0).await;
    conn.close(0u32.into(), b"bye");

    // Malformed signalling gets an error message, not a dropped connection or a panic.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{http}/ws")).await.unwrap();
    for bad in ["not json", r#"{"type":"offer"}"#, r#"{"type":"offer","sdp":"v=0 garbage"}"#, r#"{"type":"nope"}"#] {
        ws.send(Message::Text(bad.into())).await.unwrap();
        let reply = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap().unwrap().unwrap();
        let reply: serde_json::Value = serde_json::from_str(reply.to_text().unwrap()).unwrap();
        assert_eq!(reply["type"], "error", "{bad} → {reply}");
        assert!(!reply["message"].as_str().unwrap().is_empty());
    }
    // An oversized message closes the socket.
    let _ = ws.send(Message::Text("x".repeat(200_000).into())).await;
    let end = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap();
    assert!(!matches!(end, Some(Ok(Message::Text(_)))), "oversized message is refused");

    // The real stream never stopped.
    let now = metric(&relay_metrics(http).await, "pylon_relay_rtp_in_packets");
    wait_metric(http, "pylon_relay_rtp_in_packets", now + 50.0).await;
    platform.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_relay_gets_the_render_node_back() {
    let platform = start_platform(320, 240, 30).await;
    wait_metric(platform.relay.http_addr, "pylon_relay_rtp_in_packets", 20.0).await;
    let relay = platform.relay.clone();
    // Stop the relay only (the render node keeps running).
    // A browser's signalling connection is told before the relay goes away.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", relay.http_addr)).await.unwrap();
    platform.stop_relay().await;
    let bye = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap().unwrap().unwrap();
    let bye: serde_json::Value = serde_json::from_str(bye.to_text().unwrap()).unwrap();
    assert_eq!(bye["type"], "bye", "{bye}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(platform.server_metrics_value("pylon_server_relay_connected"), 0.0);

    let (_shutdown, shutdown_rx) = watch::channel(false);
    let (started_tx, started_rx) = oneshot::channel();
    let config = RelayConfig {
        http_addr: "127.0.0.1:0".parse().unwrap(),
        webrtc_addr: "127.0.0.1:0".parse().unwrap(),
        advertise_addr: None,
        quic_addr: relay.quic_addr,
        data_dir: relay.cert_path.parent().unwrap().to_path_buf(),
        pool: None,
        allow_anonymous_nodes: false,
        av_sync: false,
    };
    tokio::spawn(pylon_relay::run(config, shutdown_rx, Some(started_tx)));
    let restarted = started_rx.await.unwrap();
    wait_metric(restarted.http_addr, "pylon_relay_rtp_in_packets", 20.0).await;
    assert!(platform.server_metrics_value("pylon_server_relay_connects") >= 2.0);
    platform.stop().await;
}
