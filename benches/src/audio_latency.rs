//! `audio-latency`: glass-to-ear of the demo's sound on loopback, as Chromium plays it.
//!
//! The platform (relay, render node) runs in this process; headless Chromium plays the
//! demo with its sound on. Glass-to-ear — from the sound's capture on the node to its
//! playout in the browser (the audio device's own output latency not included) — is the
//! sum of three measured parts, each over the same window:
//! * the node's capture to send (`audio_capture_to_send`: the capture buffer, the
//!   encoder, the audio thread);
//! * the relay's arrival to hand-off to the kernel (`pylon_relay_forward_seconds`, all
//!   packets; loopback adds nothing measurable after it);
//! * Chromium's own per-sample delay from a packet's arrival to its sample's playout
//!   (`inbound-rtp` `jitterBufferDelay / jitterBufferEmittedCount`: from the packet's
//!   arrival in the jitter buffer to the sample leaving it for the audio device; Opus
//!   decoding is a fraction of a millisecond), read every 100 ms, which gives its p50 and
//!   p95 over 100 ms windows.
//!
//! With `--av-sync` (the relay's lip-sync setting) Chromium also reports
//! `estimatedPlayoutTimestamp` — the sender's wall-clock time of the sample playing now,
//! from the RTCP sender reports (whose RTP-to-wall mapping is the node's capture clock) —
//! and `now − that` is a direct reading, printed beside the sum. Chromium computes it only
//! for a track it lip-syncs, so without `--av-sync` there is none.
//!
//! Also the CPU of the node's audio thread. Prints progress, then as its last line one JSON
//! object. A benchmark, not a test: nothing here asserts.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
#[path = "../../edge-relay/tests/common/mod.rs"]
mod common;

use clap::Parser;
use std::time::{Duration, Instant};

/// Glass-to-ear of the demo's sound in headless Chromium.
#[derive(Debug, Parser)]
#[command(about)]
struct Args {
    /// Seconds to measure (after the stream settles).
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Seconds to let the stream settle first.
    #[arg(long, default_value_t = 8)]
    settle: u64,
    /// Run the relay with lip sync on (`pylon-relay --av-sync`): the browser then delays the
    /// sound to match the picture, and reports its playout time directly.
    #[arg(long)]
    av_sync: bool,
}

/// One reading from the page: Chromium's cumulative audio receiver counters, and the direct
/// glass-to-ear where it reports one (ms).
const READ: &str = r#"
return (async () => {
  const stats = await pylon.pc.getStats();
  for (const r of stats.values()) {
    if (r.type === 'inbound-rtp' && r.kind === 'audio') {
      // Unix ms now → NTP ms (the epoch of estimatedPlayoutTimestamp).
      const nowNtp = performance.timeOrigin + performance.now() + 2208988800000;
      return { glass: r.estimatedPlayoutTimestamp ? nowNtp - r.estimatedPlayoutTimestamp : null,
               jbDelay: r.jitterBufferDelay, emitted: r.jitterBufferEmittedCount,
               concealed: r.concealedSamples, samples: r.totalSamplesReceived };
    }
  }
  return null;
})();
"#;

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(((v.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(f64::NAN)
}

/// Sum and count of the relay's `pylon_relay_forward_seconds`.
async fn relay_forward(platform: &common::Platform) -> (f64, f64) {
    let text = common::relay_metrics(platform.relay.http_addr).await;
    let find = |name: &str| text.lines().find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok()).unwrap_or(0.0);
    (find("pylon_relay_forward_seconds_sum "), find("pylon_relay_forward_seconds_count "))
}

/// CPU seconds of the node's sound ([`common::is_audio_thread`]).
fn audio_thread_cpu() -> f64 {
    common::thread_cpu().iter().filter(|(name, _)| common::is_audio_thread(name)).map(|(_, s)| s).sum()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = Args::parse();
    eprintln!("starting the relay (--av-sync {}) and the render node (demo, sound on) and Chromium…", args.av_sync);
    let platform = common::start_platform_av_sync(1280, 720, 60, args.av_sync).await;
    let b = common::Browser::start().await;
    b.client.goto(&platform.url()).await.unwrap();
    b.wait_for("return pylon.stats && pylon.stats.framesDecoded > 5", Duration::from_secs(60)).await;
    b.eval("pylon.sound.toggle(); return true;").await;
    eprintln!("letting the stream settle for {} s…", args.settle);
    tokio::time::sleep(Duration::from_secs(args.settle)).await;
    let first = b.eval(READ).await;
    let (sum0, count0) = platform.server_stage("audio_capture_to_send");
    let (relay_sum0, relay_count0) = relay_forward(&platform).await;
    let (cpu0, t0) = (audio_thread_cpu(), Instant::now());
    let mut direct = Vec::new();
    let mut browser = Vec::new();
    let mut previous = first.clone();
    let end = Instant::now() + Duration::from_secs(args.seconds);
    let mut readings = 0;
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let r = b.eval(READ).await;
        if let Some(g) = r["glass"].as_f64() {
            direct.push(g);
        }
        let d = |k: &str| r[k].as_f64().unwrap_or(0.0) - previous[k].as_f64().unwrap_or(0.0);
        if d("emitted") > 0.0 {
            browser.push(1000.0 * d("jbDelay") / d("emitted"));
        }
        previous = r;
        readings += 1;
        if readings % 50 == 0 {
            eprintln!("{readings} readings…");
        }
    }
    let last = previous;
    let (sum1, count1) = platform.server_stage("audio_capture_to_send");
    let (relay_sum1, relay_count1) = relay_forward(&platform).await;
    let cpu = (audio_thread_cpu() - cpu0) / t0.elapsed().as_secs_f64();
    let d = |k: &str| last[k].as_f64().unwrap_or(0.0) - first[k].as_f64().unwrap_or(0.0);
    let jitter_buffer = 1000.0 * d("jbDelay") / d("emitted").max(1.0);
    let node = 1000.0 * (sum1 - sum0) / (count1 - count0).max(1.0);
    let relay = 1000.0 * (relay_sum1 - relay_sum0) / (relay_count1 - relay_count0).max(1.0);
    let (b50, b95) = (percentile(&mut browser, 0.5), percentile(&mut browser, 0.95));
    let (d50, d95) = (percentile(&mut direct, 0.5), percentile(&mut direct, 0.95));
    let glass = node + relay + jitter_buffer;
    println!(
        "Pylon glass-to-ear (the demo's sound, capture → Chromium playout, loopback, --av-sync {}), {} s",
        args.av_sync, args.seconds
    );
    println!(
        "{:<46} {:>8.1} ms  (p50 {:.1}, p95 {:.1} over 100 ms windows)",
        "glass-to-ear, mean",
        glass,
        node + relay + b50,
        node + relay + b95
    );
    println!("{:<46} {:>8.1} ms", "  node: capture to send (buffer, encoder)", node);
    println!("{:<46} {:>8.1} ms", "  relay: arrival to the kernel", relay);
    println!("{:<46} {:>8.1} ms", "  browser: arrival to playout (jitter buffer)", jitter_buffer);
    if !direct.is_empty() {
        println!(
            "{:<46} {:>8.1} ms  (p95 {d95:.1}, {} readings)",
            "direct (estimatedPlayoutTimestamp) p50",
            d50,
            direct.len()
        );
    }
    println!("{:<46} {:>8.2} % of a core", "node audio thread CPU", 100.0 * cpu);
    println!("{:<46} {:>8.3} %", "concealed samples", 100.0 * d("concealed") / d("samples").max(1.0));
    println!(
        "{}",
        serde_json::json!({
            "av_sync": args.av_sync, "glass_to_ear_mean_ms": glass,
            "glass_to_ear_p50_ms": node + relay + b50, "glass_to_ear_p95_ms": node + relay + b95,
            "node_capture_to_send_ms": node, "relay_forward_ms": relay, "jitter_buffer_ms": jitter_buffer,
            "direct_p50_ms": if direct.is_empty() { None } else { Some(d50) },
            "audio_thread_cpu_pct": 100.0 * cpu,
        })
    );
    b.close().await;
    platform.stop().await;
}
