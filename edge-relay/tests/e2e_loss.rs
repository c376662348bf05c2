//! Playing over a bad last hop: Chromium reaches the relay through `pylon-impair` (the
//! relay announces the proxy's address as its ICE candidate), and the browser's NACKs are
//! answered from the relay's send buffers. Each run prints one JSON line of figures.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use common::{
    Browser, VIDEO_INBOUND, metric, relay_metrics, start_platform_advertising, start_platform_impaired_uplink,
};
use pylon_proto::impair::LossModel;
use pylon_relay::impair::{ImpairConfig, start};
use std::sync::atomic::Ordering;
use std::time::Duration;

/// How long each run plays, once the first frames are decoded.
const PLAY: Duration = Duration::from_secs(20);

async fn play_through(name: &str, config: ImpairConfig) -> serde_json::Value {
    // Reserve the proxy's port so the relay can announce it before the proxy starts.
    let listen = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let platform = start_platform_advertising(1280, 720, 60, listen).await;
    let (_stop, stop_rx) = tokio::sync::watch::channel(false);
    let proxy = start(listen, platform.relay.webrtc_addr, config, stop_rx).await.unwrap();
    let b = Browser::start().await;
    b.client.goto(&platform.url()).await.unwrap();
    b.wait_for("return window.pylon && pylon.stats && pylon.stats.framesDecoded >= 30", Duration::from_secs(60)).await;
    let start_stats = b.eval(VIDEO_INBOUND).await;
    tokio::time::sleep(PLAY).await;
    let end = b.eval(VIDEO_INBOUND).await;
    let n = |k: &str| end[k].as_f64().unwrap_or(0.0) - start_stats[k].as_f64().unwrap_or(0.0);
    let relay = relay_metrics(platform.relay.http_addr).await;
    let freeze_share = n("totalFreezesDuration") / PLAY.as_secs_f64();
    let report = serde_json::json!({
        "run": name,
        "seconds": PLAY.as_secs(),
        "frames_decoded": n("framesDecoded"),
        "fps": n("framesDecoded") / PLAY.as_secs_f64(),
        "freezes": n("freezeCount"),
        "freeze_seconds": n("totalFreezesDuration"),
        "freeze_share_pct": freeze_share * 100.0,
        "nacks_sent_by_browser": n("nackCount"),
        "packets_lost_after_repair": n("packetsLost"),
        "plis": n("pliCount"),
        "retransmissions_received": n("retransmittedPacketsReceived"),
        "frames_dropped": n("framesDropped"),
        "received_kbps": n("bytesReceived") * 8.0 / 1000.0 / PLAY.as_secs_f64(),
        "relay_viewer_nacks": metric(&relay, "pylon_relay_viewer_nacks"),
        "proxy_lost": proxy.stats.lost.load(Ordering::Relaxed),
        "proxy_over_cap": proxy.stats.overflow.load(Ordering::Relaxed),
        "encoder_bitrate_kbps": platform.server_metrics_value("pylon_server_target_bitrate_bps") / 1000.0,
        "player_estimate_kbps": metric(&relay, "pylon_relay_player_estimate_bps") / 1000.0,
    });
    println!("{report}");
    b.close().await;
    platform.stop().await;
    report
}

/// Lost media packets came back as retransmissions from the relay, the game kept its frame
/// rate, no loss needed a keyframe, and freezes stayed rare. (Measured: none at all in
/// 20 s at 5 % random loss; the bound leaves room for one short freeze on a loaded
/// machine, the goal being under 0.5 % of the time.)
fn assert_repaired(r: &serde_json::Value, max_freeze_pct: f64) {
    let lost = r["packets_lost_after_repair"].as_f64().unwrap();
    let resent = r["retransmissions_received"].as_f64().unwrap();
    assert!(resent >= 0.8 * lost, "the relay resent what was lost: {r}");
    assert!(r["fps"].as_f64().unwrap() > 40.0, "the game keeps playing: {r}");
    assert_eq!(r["plis"].as_f64().unwrap(), 0.0, "no loss needed a keyframe: {r}");
    assert!(r["freeze_share_pct"].as_f64().unwrap() < max_freeze_pct, "freezes stay rare: {r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_percent_random_loss_is_repaired_at_the_edge() {
    let config = ImpairConfig {
        loss: LossModel::Random(0.05),
        delay: Duration::from_millis(5),
        jitter: Duration::from_millis(2),
        reorder: 0.0,
        rate_bps: None,
        seed: 5,
    };
    let r = play_through("5% random loss", config).await;
    assert!(r["proxy_lost"].as_u64().unwrap() > 100, "the proxy did lose packets: {r}");
    assert!(r["nacks_sent_by_browser"].as_f64().unwrap() > 50.0, "the browser asked for them: {r}");
    assert_repaired(&r, 2.5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_percent_bursty_loss_with_40_ms_delay() {
    let config = ImpairConfig {
        loss: LossModel::bursty(0.02, 3.0),
        delay: Duration::from_millis(40),
        jitter: Duration::from_millis(2),
        reorder: 0.0,
        rate_bps: None,
        seed: 2,
    };
    let r = play_through("2% bursty loss, 40 ms", config).await;
    assert!(r["proxy_lost"].as_u64().unwrap() > 30, "the proxy did lose packets: {r}");
    // An 80 ms round trip: a packet whose resend is lost in the same burst waits two,
    // past Chromium's 150 ms freeze threshold. Freezes are counted, bounded loosely.
    assert_repaired(&r, 10.0);
}

/// The same path without impairment: the baseline the loss runs compare with (this
/// machine's own hiccups — two cores shared by the render node, the relay and Chromium —
/// show here too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baseline_without_impairment() {
    let config = ImpairConfig {
        loss: LossModel::None,
        delay: Duration::from_millis(5),
        jitter: Duration::from_millis(2),
        reorder: 0.0,
        rate_bps: None,
        seed: 1,
    };
    let r = play_through("baseline", config).await;
    assert!(r["fps"].as_f64().unwrap() > 40.0, "{r}");
}

/// A 4 Mbit/s bottleneck under a node that starts at 6. The demo's picture needs about
/// 3 Mbit/s here, so this cap does not bind: str0m's estimate of an application-limited
/// path rises past the cap (4.6–4.8 Mbit/s measured), and the target follows it to about the
/// cap. What the player must see: the target came down from the start, what arrived fits
/// the cap, and the game keeps playing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_four_megabit_cap_brings_the_encoder_down() {
    let config = ImpairConfig {
        loss: LossModel::None,
        delay: Duration::from_millis(10),
        jitter: Duration::ZERO,
        reorder: 0.0,
        rate_bps: Some(4_000_000),
        seed: 4,
    };
    let r = play_through("4 Mbit/s cap", config).await;
    let kbps = r["encoder_bitrate_kbps"].as_f64().unwrap();
    assert!(kbps > 0.0 && kbps <= 4400.0, "the encoder came down from 6 Mbit/s to about the cap: {r}");
    assert!(r["received_kbps"].as_f64().unwrap() <= 4000.0, "what arrived fits the cap: {r}");
    assert!(r["fps"].as_f64().unwrap() > 30.0, "the game keeps playing: {r}");
}

/// Loss between the render node and the relay (QUIC datagrams through the proxy): the relay
/// asks the node once per gap, the node resends from its cache, and the browser never
/// notices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_loss_is_repaired_once_for_every_viewer() {
    let config = ImpairConfig {
        loss: LossModel::Random(0.03),
        delay: Duration::from_millis(5),
        jitter: Duration::ZERO,
        reorder: 0.0,
        rate_bps: None,
        seed: 3,
    };
    let platform = start_platform_impaired_uplink(1280, 720, 60, config).await;
    let b = Browser::start().await;
    b.client.goto(&platform.url()).await.unwrap();
    b.wait_for("return window.pylon && pylon.stats && pylon.stats.framesDecoded >= 30", Duration::from_secs(60)).await;
    let start_stats = b.eval(VIDEO_INBOUND).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let end = b.eval(VIDEO_INBOUND).await;
    let n = |k: &str| end[k].as_f64().unwrap_or(0.0) - start_stats[k].as_f64().unwrap_or(0.0);
    let relay = relay_metrics(platform.relay.http_addr).await;
    let report = serde_json::json!({
        "run": "3% upstream loss",
        "proxy_lost": platform.uplink_proxy.as_ref().unwrap().stats.lost.load(Ordering::Relaxed),
        "relay_upstream_nacks": metric(&relay, "pylon_relay_upstream_nacks"),
        "relay_upstream_repaired": metric(&relay, "pylon_relay_upstream_repaired"),
        "relay_upstream_given_up": metric(&relay, "pylon_relay_upstream_given_up"),
        "node_resent": platform.server_metrics_value("pylon_server_rtp_resent"),
        "fps": n("framesDecoded") / 10.0,
        "freezes": n("freezeCount"),
        "browser_nacks": n("nackCount"),
        "plis": n("pliCount"),
    });
    println!("{report}");
    assert!(report["proxy_lost"].as_u64().unwrap() > 50, "the proxy did lose datagrams: {report}");
    assert!(report["relay_upstream_repaired"].as_f64().unwrap() > 20.0, "the relay got them back: {report}");
    assert!(report["node_resent"].as_f64().unwrap() >= report["relay_upstream_repaired"].as_f64().unwrap());
    assert!(report["fps"].as_f64().unwrap() > 40.0, "the game keeps playing: {report}");
    assert_eq!(report["plis"].as_f64().unwrap(), 0.0, "no keyframe was needed: {report}");
    b.close().await;
    platform.stop().await;
}
