//! The platform as a pool, end to end: the catalog page (indexer) measures the RTT to
//! the relay, the indexer matches and signs a session token, the browser plays through
//! the relay, which checks the token, and the node, which checks it again before taking
//! input. A link without a token, or replayed after the session ended, is refused.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use common::{Browser, POOL_NODE, http_get, metric, relay_metrics, start_pool};
use std::time::{Duration, Instant};

fn key(kind: &str, code: &str) -> String {
    format!("window.dispatchEvent(new KeyboardEvent('{kind}', {{ code: '{code}', bubbles: true }})); return true;")
}

/// Opens the catalog, clicks the demo title, and waits until the video plays at the relay.
async fn play_from_catalog(b: &Browser, indexer: std::net::SocketAddr) -> serde_json::Value {
    b.client.goto(&format!("http://{indexer}/")).await.unwrap();
    b.wait_for("return window.pylonCatalog && pylonCatalog.titles.length > 0", Duration::from_secs(10)).await;
    b.eval("document.querySelector('a.play[data-title=demo]').click(); return true;").await;
    b.wait_for(
        "return location.pathname.startsWith('/play/') && window.pylon && pylon.stats && pylon.stats.framesDecoded >= 30 \
         ? { href: location.href, role: pylon.role } : null",
        Duration::from_secs(60),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_matches_and_chromium_plays_through_indexer_relay_and_node() {
    let platform = start_pool(1280, 720, 60).await;
    let indexer = platform.indexer.unwrap();
    let relay_http = platform.relay.http_addr;

    // The relay registers, the node connects to it, and the relay reports its RTT to it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !http_get(indexer, "/api/v1/relays").await.contains(&format!("\"{POOL_NODE}\"")) {
        assert!(Instant::now() < deadline, "the relay never reported its RTT to the node");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let nodes = http_get(indexer, "/api/v1/nodes").await;
    assert!(nodes.contains("\"state\":\"ready\""), "{nodes}");

    // The relay's own page without a token is refused with a clear message.
    let b = Browser::start().await;
    b.client.goto(&platform.url()).await.unwrap();
    let refused =
        b.wait_for("return window.pylon && pylon.state === 'refused' && pylon.error", Duration::from_secs(15)).await;
    assert!(refused.as_str().unwrap().contains("session token"), "{refused}");

    // From the catalog: matched, token checked at the relay and at the node, playing.
    let played = play_from_catalog(&b, indexer).await;
    assert_eq!(played["role"], "player");
    let link = played["href"].as_str().unwrap().to_string();
    assert!(link.starts_with(&format!("http://{relay_http}/play/")) && link.contains("#token="), "{link}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while platform.server_metrics_value("pylon_server_sessions_started") < 1.0 {
        assert!(Instant::now() < deadline, "the node never started the session");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Input reaches the game through the verified session.
    b.eval(&key("keydown", "ArrowLeft")).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while platform.server_metrics_value("pylon_server_keys_held") != 1.0 {
        assert!(Instant::now() < deadline, "the player's key never reached the game");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    b.eval(&key("keyup", "ArrowLeft")).await;

    // The player leaves: the relay ends the session (node, indexer), and the same link is
    // refused afterwards.
    b.client.goto("about:blank").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(&relay_metrics(relay_http).await, "pylon_relay_viewers") > 0.0 {
        assert!(Instant::now() < deadline, "the relay still counts the departed player");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    b.client.goto(&link).await.unwrap();
    let replay =
        b.wait_for("return window.pylon && pylon.state === 'refused' && pylon.error", Duration::from_secs(15)).await;
    assert!(replay.as_str().unwrap().contains("ended"), "{replay}");
    assert!(metric(&relay_metrics(relay_http).await, "pylon_relay_tokens_refused") >= 2.0);

    // The node's one slot is free again: the next player is matched onto it.
    let again = play_from_catalog(&b, indexer).await;
    assert_eq!(again["role"], "player");
    assert_ne!(again["href"], link, "a new session, with a new token");
    let usage = http_get(indexer, "/api/v1/usage").await;
    assert!(usage.contains("\"provider\":\"e2e-provider\"") && usage.contains("\"sessions\":2"), "{usage}");
    b.close().await;
    platform.stop().await;
}
