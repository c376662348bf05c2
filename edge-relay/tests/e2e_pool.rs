//! The platform as a pool, end to end: the catalog page (indexer) measures the RTT to
//! the relay, the indexer matches and signs a session token, the browser plays through
//! the relay, which checks the token, and the node, which checks it again before taking
//! input. A link without a token, or replayed after the session ended, is refused.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use common::{
    Browser, POOL_NODE, SAMPLE_VIDEO, http_get, metric, play_from_catalog, quic_client, relay_metrics, start_pool,
};
use pylon_proto::framing::{self, StreamHello};
use pylon_proto::link::{self, NodeConfig, NodeSide, PlayerGate};
use std::time::{Duration, Instant};

fn key(kind: &str, code: &str) -> String {
    format!("window.dispatchEvent(new KeyboardEvent('{kind}', {{ code: '{code}', bubbles: true }})); return true;")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_matches_and_chromium_plays_through_indexer_relay_and_node() {
    let platform = start_pool(1280, 720, 60).await;
    let indexer = platform.indexer.unwrap();
    let relay_http = platform.relay.http_addr;

    // The relay registers, the node connects to it, and the relay reports its RTT to it.
    common::wait_rtt_reported(indexer, POOL_NODE, Duration::from_secs(30)).await;
    let nodes = http_get(indexer, "/api/v1/nodes").await;
    assert!(nodes.contains("\"state\":\"ready\""), "{nodes}");
    // Ready with no session, the node rests: it renders and encodes nothing.
    let resting = node_rests(&platform).await;
    assert!(resting, "a ready node without a session kept rendering");
    let rendered_idle = platform.server_metrics_value("pylon_server_frames_rendered");

    // Another node streams through the same relay (a second session): the player below
    // must get its own node's stream, not this one.
    let other = tokio::spawn(other_node(platform.relay.cert_path.clone(), platform.relay.quic_addr, indexer));

    // The relay's own page without a token is refused with a clear message.
    let b = Browser::start().await;
    b.client.goto(&platform.url()).await.unwrap();
    let refused =
        b.wait_for("return window.pylon && pylon.state === 'refused' && pylon.error", Duration::from_secs(15)).await;
    assert!(refused.as_str().unwrap().contains("session token"), "{refused}");

    // From the catalog: matched, token checked at the relay and at the node, playing.
    let played = play_from_catalog(&b, indexer).await;
    assert_eq!(played["role"], "player");
    let page = played["href"].as_str().unwrap().to_string();
    assert!(page.starts_with(&format!("http://{relay_http}/play/")), "{page}");
    // The link the catalog sent the player to, token and all (to replay it below).
    let link = format!("{page}#token={}", played["token"].as_str().unwrap());
    let deadline = Instant::now() + Duration::from_secs(10);
    while platform.server_metrics_value("pylon_server_sessions_started") < 1.0 {
        assert!(Instant::now() < deadline, "the node never started the session");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The session woke it: from the session's start to its first frame's packets sent.
    assert!(platform.server_metrics_value("pylon_server_frames_rendered") > rendered_idle);
    let (wake_sum, wakes) = platform.server_stage("wake");
    let wake_ms = 1000.0 * wake_sum / wakes;
    eprintln!("{{\"node_wake_ms\":{wake_ms:.1}}}");
    // The goal is under 100 ms (54 ms measured here, in a debug build beside Chromium); the
    // bound leaves room for a loaded machine while still catching a node that renders only
    // on a later tick or waits for a timer.
    assert!(wakes >= 1.0 && wake_ms < 200.0, "the node starts within 200 ms of the session: {wake_ms} ms");
    // Each viewer watches its own session's stream.
    let relay = relay_metrics(relay_http).await;
    assert_eq!(metric(&relay, &format!("pylon_relay_stream_viewers{{stream=\"{POOL_NODE}\"}}")), 1.0, "{relay}");
    assert_eq!(metric(&relay, "pylon_relay_stream_viewers{stream=\"node-other\"}"), 0.0, "{relay}");
    assert_eq!(metric(&relay, "pylon_relay_nodes_connected"), 2.0, "{relay}");
    let out = |stream: &str| metric(&relay, &format!("pylon_relay_stream_packets_out_total{{stream=\"{stream}\"}}"));
    let inn = |stream: &str| metric(&relay, &format!("pylon_relay_stream_packets_in_total{{stream=\"{stream}\"}}"));
    assert!(out(POOL_NODE) > 0.0 && inn("node-other") > 0.0, "{relay}");
    assert_eq!(out("node-other"), 0.0, "nobody watches the other node's stream: {relay}");
    let sample = b.eval(SAMPLE_VIDEO).await;
    assert!(sample["hull"].as_u64().unwrap_or(0) > 100, "the player sees its own game: {sample}");

    // Input reaches the game through the verified session.
    b.eval(&key("keydown", "ArrowLeft")).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while platform.server_metrics_value("pylon_server_keys_held") != 1.0 {
        assert!(Instant::now() < deadline, "the player's key never reached the game");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    b.eval(&key("keyup", "ArrowLeft")).await;

    // A spectator joins through the player's watch link: it decodes the same game, and its
    // keys never reach it.
    let share = b.eval("return document.getElementById('share').href").await;
    let session = page.split("/play/").nth(1).unwrap().to_string();
    assert_eq!(share.as_str().unwrap(), format!("http://{indexer}/watch/{session}"));
    let player_window = b.client.window().await.unwrap();
    b.client.new_window(true).await.unwrap();
    let spectator_window = b.client.windows().await.unwrap().into_iter().find(|w| *w != player_window).unwrap();
    b.client.switch_to_window(spectator_window.clone()).await.unwrap();
    b.client.goto(share.as_str().unwrap()).await.unwrap();
    b.wait_for(
        "return location.pathname.startsWith('/watch/') && window.pylon && pylon.role === 'spectator'          && pylon.stats && pylon.stats.framesDecoded > 10",
        Duration::from_secs(60),
    )
    .await;
    b.eval(&key("keydown", "ArrowRight")).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(platform.server_metrics_value("pylon_server_keys_held"), 0.0, "a spectator's key reached the game");
    b.client.close_window().await.unwrap();
    b.client.switch_to_window(player_window).await.unwrap();

    // The player leaves: the relay ends the session (node, indexer), and the same link is
    // refused afterwards.
    b.client.goto("about:blank").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(&relay_metrics(relay_http).await, "pylon_relay_viewers") > 0.0 {
        assert!(Instant::now() < deadline, "the relay still counts the departed player");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The session over, the node rests again.
    assert!(node_rests(&platform).await, "the node kept rendering after the session ended");
    b.client.goto(&link).await.unwrap();
    let replay =
        b.wait_for("return window.pylon && pylon.state === 'refused' && pylon.error", Duration::from_secs(15)).await;
    assert!(replay.as_str().unwrap().contains("ended"), "{replay}");
    assert!(metric(&relay_metrics(relay_http).await, "pylon_relay_tokens_refused") >= 2.0);

    // The node's one slot is free again: the next player is matched onto it.
    let again = play_from_catalog(&b, indexer).await;
    assert_eq!(again["role"], "player");
    assert_ne!(again["token"], played["token"], "a new session, with a new token");
    let usage = http_get(indexer, "/api/v1/usage").await;
    assert!(usage.contains("\"provider\":\"e2e-provider\"") && usage.contains("\"sessions\":2"), "{usage}");
    other.abort();
    b.close().await;
    platform.stop().await;
}

/// A render node that dies mid-game: the indexer marks it gone within one heartbeat
/// timeout and ends its session (no longer metered), the relay closes the player's
/// connection with the reason, and the page says so and offers a new game.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_dies_mid_game_is_marked_gone_and_its_player_is_told_and_offered_a_new_game() {
    let mut platform = start_pool(640, 360, 30).await;
    let indexer = platform.indexer.unwrap();
    let b = Browser::start().await;
    play_from_catalog(&b, indexer).await;

    platform.kill_node().await;
    let killed = Instant::now();
    // The relay notices the node's link is gone (at the latest its 5 s idle timeout) and
    // the page says it is waiting for the game server.
    let lost = b
        .wait_for(
            "return window.pylon && pylon.nodeLost ? document.getElementById('status').textContent : null",
            Duration::from_secs(8),
        )
        .await;
    assert!(lost.as_str().unwrap().contains("not answering"), "{lost}");
    let lost_s = killed.elapsed().as_secs_f64();
    // Gone in the indexer within one heartbeat timeout (15 s, and the 5 s sweep).
    let timeout = Duration::from_secs(pylon_indexer::api::HEARTBEAT_TIMEOUT_SECS as u64);
    let state = || async {
        let page = http_get(indexer, "/api/v1/nodes").await;
        let body: serde_json::Value = serde_json::from_str(page.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        body["items"][0]["state"].as_str().unwrap().to_string()
    };
    while state().await != "gone" {
        assert!(killed.elapsed() < timeout + Duration::from_secs(5), "the dead node is still {}", state().await);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let gone_s = killed.elapsed().as_secs_f64();
    // The page is told why, and offered a new game from the catalog.
    let ended = b
        .wait_for(
            "return window.pylon && pylon.state === 'ended' \
             ? { reason: pylon.endedReason, status: document.getElementById('status').textContent, \
                 again: document.getElementById('again') && document.getElementById('again').href } : null",
            Duration::from_secs(15),
        )
        .await;
    let told_s = killed.elapsed().as_secs_f64();
    assert_eq!(ended["reason"], "node gone", "{ended}");
    assert!(ended["status"].as_str().unwrap().contains("stopped answering"), "{ended}");
    assert_eq!(ended["again"], format!("http://{indexer}/"), "{ended}");
    // Not metered past the node's death: the session ended, its seat is free.
    let nodes = http_get(indexer, "/api/v1/nodes").await;
    assert!(nodes.contains("\"seats\":0"), "{nodes}");
    eprintln!(
        "node killed: the page waits for it after {lost_s:.1} s, gone in the indexer after {gone_s:.1} s, \
         the session ended on the page after {told_s:.1} s"
    );
    b.close().await;
    platform.stop().await;
}

/// Whether the node stops rendering within 10 s: no frame rendered or encoded for 1.5 s.
async fn node_rests(platform: &common::Platform) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    let counts = || {
        (
            platform.server_metrics_value("pylon_server_frames_rendered"),
            platform.server_metrics_value("pylon_server_frames_encoded"),
        )
    };
    while Instant::now() < deadline {
        let before = counts();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        if counts() == before {
            return true;
        }
    }
    false
}

/// A second render node, "node-other", registered with the indexer under its own key,
/// which signs its hello; it streams RTP (valid headers, meaningless payload) until aborted.
async fn other_node(cert: std::path::PathBuf, relay: std::net::SocketAddr, indexer: std::net::SocketAddr) {
    let key = ed25519_dalek::SigningKey::from_bytes(&[77; 32]);
    let client = pylon_indexer_client::Client::new(&format!("http://{indexer}"), key.clone()).unwrap();
    client
        .register_node(&pylon_indexer_client::api::RegisterNode {
            id: "node-other".into(),
            provider: "other".into(),
            public_key: client.public_key(),
            gpu_model: "none".into(),
            gpu_memory_mb: 0,
            vulkan_device: "none".into(),
            encoders: vec![],
            capacity: 1,
            region: "local".into(),
            lat: 0.0,
            lon: 0.0,
            price_per_hour: 99.0,
            gpu_class: 0,
            titles: vec![],
        })
        .await
        .unwrap();
    let (endpoint, config) = quic_client(&cert);
    let conn = endpoint.connect_with(config, relay, "pylon-relay").unwrap().await.unwrap();
    let mut exporter = [0u8; link::EXPORTER_LEN];
    conn.export_keying_material(&mut exporter, link::EXPORTER_LABEL, b"").unwrap();
    let stream = StreamHello {
        width: 1280,
        height: 720,
        fps: 60,
        profile_level_id: 0x42e01f,
        encoder: "none".into(),
        node: "node-other".into(),
    };
    let config = NodeConfig { stream, identity: Some(key), bitrate_bounds: None };
    let mut node = NodeSide::new(config, PlayerGate::pooled("node-other"), &exporter, std::time::Instant::now(), 0);
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&node.poll_transmit().unwrap()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    while !node.is_established() {
        let n = recv.read(&mut buf).await.unwrap().unwrap();
        node.handle_control(std::time::Instant::now(), &buf[..n]).unwrap();
    }
    tokio::spawn(async move { while let Ok(Some(_)) = recv.read_chunk(65536, true).await {} });
    let mut seq: u16 = 0;
    loop {
        let mut rtp = vec![0x80, 108];
        rtp.extend_from_slice(&seq.to_be_bytes());
        rtp.extend_from_slice(&(u32::from(seq) * 1500).to_be_bytes());
        rtp.extend_from_slice(&0x1234_5678u32.to_be_bytes());
        rtp.extend_from_slice(&[0x41, 0x9a, 0x55, 0x55, 0x55, 0x55]);
        let mut datagram = Vec::new();
        framing::encode_datagram(framing::DatagramKind::VideoRtp, &rtp, &mut datagram);
        let _ = conn.send_datagram(datagram.into());
        seq = seq.wrapping_add(1);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
