//! `make latency`: click-to-photon through the whole path — headless Chromium presses
//! keys, the render node applies them, and the page measures from each key event to the
//! requestVideoFrameCallback of the first frame that reflects it.
//!
//! Prints progress, then as its last line one JSON object
//! `{"p50_ms":..,"p95_ms":..,"samples":..}`. A benchmark, not a test: nothing here
//! asserts a time.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
#[path = "../../edge-relay/tests/common/mod.rs"]
mod common;

use clap::Parser;
use std::time::Duration;

/// Click-to-photon of the local platform in headless Chromium.
#[derive(Debug, Parser)]
#[command(about)]
struct Args {
    /// Key presses to measure.
    #[arg(long, default_value_t = 80)]
    presses: u32,
    /// Pause between presses, ms (a press every few frames, like a player).
    #[arg(long, default_value_t = 150)]
    interval_ms: u64,
    /// Frame rate.
    #[arg(long, default_value_t = 60)]
    fps: u32,
    /// Render strictly on the frame clock (the node's `--pacing strict`), to compare
    /// with frames started by input.
    #[arg(long)]
    strict_pacing: bool,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = Args::parse();
    let platform = common::start_platform_with(1280, 720, args.fps, !args.strict_pacing).await;
    let b = common::Browser::start().await;
    b.client.goto(&platform.url()).await.unwrap();
    b.wait_for(
        "return window.pylon && pylon.role === 'player' && pylon.stats && pylon.stats.framesDecoded > 60",
        Duration::from_secs(60),
    )
    .await;
    b.wait_for("return pylon.pc.sctp && pylon.pc.sctp.state === 'connected'", Duration::from_secs(10)).await;
    eprintln!("playing; pressing keys {} times…", args.presses);
    let codes = ["ArrowLeft", "ArrowRight", "Space", "KeyA", "KeyD"];
    for i in 0..args.presses {
        let code = codes[i as usize % codes.len()];
        // Real key events from the browser's input pipeline (WebDriver actions).
        let press = format!(
            "window.dispatchEvent(new KeyboardEvent('keydown', {{ code: '{code}' }})); \
             setTimeout(() => window.dispatchEvent(new KeyboardEvent('keyup', {{ code: '{code}' }})), 40); return true;"
        );
        b.eval(&press).await;
        tokio::time::sleep(Duration::from_millis(args.interval_ms)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let samples = b.eval("return pylon.latency.samples").await;
    let mut v: Vec<f64> = samples.as_array().unwrap().iter().filter_map(|x| x.as_f64()).collect();
    v.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| v.get(((v.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(f64::NAN);
    eprintln!("samples (ms, sorted): {:?}", v.iter().map(|x| (x * 10.0).round() / 10.0).collect::<Vec<_>>());
    let stats = b.eval("return pylon.stats").await;
    eprintln!("player stats: {stats}");
    eprintln!(
        "node: {}",
        platform
            .server_metrics
            .render()
            .lines()
            .filter(|l| l.contains("input_to_packets") && (l.contains("_sum") || l.contains("_count")))
            .collect::<Vec<_>>()
            .join(" ")
    );
    b.close().await;
    platform.stop().await;
    println!("{}", serde_json::json!({ "p50_ms": pct(0.5), "p95_ms": pct(0.95), "samples": v.len() }));
}
