//! A frame's packets leave the relay together: the player's session paces with its
//! bandwidth estimate on, yet Chromium's jitter buffer holds the player's frames no longer
//! than a spectator's (whose session has no estimate and no pacer). Measured from the
//! browser's own `getStats()` on both pages, side by side on the same stream.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use common::{Browser, VIDEO_INBOUND, metric, relay_metrics, start_platform};
use std::time::Duration;

/// Mean of a Prometheus histogram, in milliseconds.
fn mean_ms(text: &str, name: &str) -> f64 {
    let count = metric(text, &format!("{name}_count"));
    if count == 0.0 { 0.0 } else { 1000.0 * metric(text, &format!("{name}_sum")) / count }
}

/// Milliseconds per frame in the jitter buffer between two samples.
fn per_frame_ms(a: &serde_json::Value, b: &serde_json::Value) -> f64 {
    let delay = b["jitterBufferDelay"].as_f64().unwrap() - a["jitterBufferDelay"].as_f64().unwrap();
    let emitted = b["jitterBufferEmittedCount"].as_f64().unwrap() - a["jitterBufferEmittedCount"].as_f64().unwrap();
    assert!(emitted > 100.0, "frames kept arriving: {a} → {b}");
    1000.0 * delay / emitted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_leaves_the_relay_in_one_burst_for_the_player_too() {
    let platform = start_platform(1280, 720, 60).await;
    let b = Browser::start().await;
    b.client.goto(&platform.url()).await.unwrap();
    b.wait_for(
        "return window.pylon && pylon.role === 'player' && pylon.stats && pylon.stats.framesDecoded > 30",
        Duration::from_secs(60),
    )
    .await;
    // The spectator in a browser of its own: a second window of the same browser would
    // leave one of the two pages in the background, where Chromium renders lazily.
    let spectator = Browser::start().await;
    spectator.watch(&platform, 30, Duration::from_secs(60)).await;
    // Let the player's estimate settle past its start (str0m's first probes).
    tokio::time::sleep(Duration::from_secs(3)).await;

    let p0 = b.eval(VIDEO_INBOUND).await;
    let s0 = spectator.eval(VIDEO_INBOUND).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let p1 = b.eval(VIDEO_INBOUND).await;
    let s1 = spectator.eval(VIDEO_INBOUND).await;
    let relay = relay_metrics(platform.relay.http_addr).await;
    let report = serde_json::json!({
        "player_jitter_buffer_ms_per_frame": per_frame_ms(&p0, &p1),
        "spectator_jitter_buffer_ms_per_frame": per_frame_ms(&s0, &s1),
        "player_estimate_kbps": metric(&relay, "pylon_relay_player_estimate_bps") / 1000.0,
        "encoder_target_kbps": platform.server_metrics_value("pylon_server_target_bitrate_bps") / 1000.0,
        // Per hop: how spread a frame arrived from the node, and how long the relay held
        // a batch before the kernel had it.
        "relay_arrival_spread_ms_mean": mean_ms(&relay, "pylon_relay_frame_arrival_spread_seconds"),
        "relay_forward_ms_mean": mean_ms(&relay, "pylon_relay_forward_seconds"),
    });
    println!("{report}");
    assert_eq!(p1["role"], "player");
    assert_eq!(s1["role"], "spectator");
    // The goal is ≤ 1 ms; on two cores shared with two Chromiums and the node, the
    // spectator's own figure (no pacer at all) moves between 0.5 and 2 ms, so the player is
    // held to the spectator's figure plus a millisecond, and never above 3 ms. Before the
    // fix: 5–9.5 ms for the player against 0.5–1.7 for the spectator.
    let player_ms = report["player_jitter_buffer_ms_per_frame"].as_f64().unwrap();
    let spectator_ms = report["spectator_jitter_buffer_ms_per_frame"].as_f64().unwrap();
    assert!(player_ms <= spectator_ms + 1.0 && player_ms <= 3.0, "the player's frames arrive in one burst: {report}");
    spectator.close().await;
    b.close().await;
    platform.stop().await;
}
