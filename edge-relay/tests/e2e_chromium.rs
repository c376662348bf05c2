//! The first playable frame, end to end: Vulkan render → NV12 → H.264 → RTP over QUIC →
//! relay → WebRTC (str0m) → headless Chromium, checked from getStats() and the pixels.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use common::{Browser, Platform, SAMPLE_VIDEO, metric, relay_metrics, start_platform, wait_metric};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_plays_the_demo_title_at_720p() {
    let platform: Platform = start_platform(1280, 720, 60).await;
    let browser = Browser::start().await;
    browser.client.goto(&platform.url()).await.expect("page loads");

    let stats = browser
        .wait_for(
            "const s = window.pylon && pylon.stats; return s && s.framesDecoded >= 60 && s.width === 1280 ? s : null",
            Duration::from_secs(60),
        )
        .await;
    eprintln!("player stats: {stats}");
    assert_eq!(stats["width"], 1280);
    assert_eq!(stats["height"], 720);

    let first = browser.wait_for(SAMPLE_VIDEO, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let second = browser.eval(SAMPLE_VIDEO).await;
    eprintln!("samples: {first} / {second}");
    for s in [&first, &second] {
        assert_eq!(s["width"], 1280);
        let space = s["space"].as_f64().unwrap();
        assert!(space > 0.5, "most of the picture is deep-space navy, got {space}");
        assert!(s["hull"].as_u64().unwrap() > 100, "the orange ship is on screen: {s}");
        assert!(s["rock"].as_u64().unwrap() > 2000, "asteroids are on screen: {s}");
        let mean = s["mean"].as_f64().unwrap();
        assert!(mean > 8.0 && mean < 120.0, "neither black nor a bright test pattern: mean {mean}");
    }
    assert_ne!(first["hash"], second["hash"], "the scene moves");
    // `PYLON_SCREENSHOT=path.png` keeps a picture of the page for a human to look at.
    if let Ok(path) = std::env::var("PYLON_SCREENSHOT") {
        std::fs::write(&path, browser.client.screenshot().await.unwrap()).unwrap();
    }

    // The browser goes away mid-stream: the relay notices, the node keeps rendering.
    let http = platform.relay.http_addr;
    assert_eq!(metric(&relay_metrics(http).await, "pylon_relay_viewers"), 1.0);
    browser.client.goto("about:blank").await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while metric(&relay_metrics(http).await, "pylon_relay_viewers") > 0.0 {
        assert!(std::time::Instant::now() < deadline, "the relay still counts the departed viewer");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let encoded = platform.server_metrics_value("pylon_server_frames_encoded");
    let received = metric(&relay_metrics(http).await, "pylon_relay_rtp_in_packets");
    wait_metric(http, "pylon_relay_rtp_in_packets", received + 30.0).await;
    assert!(platform.server_metrics_value("pylon_server_frames_encoded") > encoded);
    browser.close().await;
    platform.stop().await;
}
