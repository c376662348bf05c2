//! `audio-latency`: glass-to-ear of the demo's sound on loopback, as Chromium plays it.
//!
//! The platform (relay, render node) runs in this process; headless Chromium plays the
//! demo with its sound on. Every 100 ms the page reads its audio receiver's
//! `estimatedPlayoutTimestamp` — the sender's wall-clock time of the sample being played
//! now, which Chromium derives from the RTCP sender reports, whose RTP-to-wall mapping is
//! the node's capture clock (the relay hands str0m each packet's capture time) — and the
//! bench takes `now − that` as glass-to-ear: from the sound's capture on the node to its
//! playout in the browser (the audio device's own output latency is not included).
//!
//! The share of each part: the node's capture to send (`audio_capture_to_send`: the
//! capture buffer, the encoder, the audio thread), the browser's jitter buffer (its
//! `jitterBufferDelay / jitterBufferEmittedCount`), and the rest (network and relay on
//! loopback, decode, playout). Also the CPU of the node's audio thread. Prints progress,
//! then as its last line one JSON object. A benchmark, not a test: nothing here asserts.

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
}

/// One reading: glass-to-ear and the jitter buffer so far (ms), from the page.
const READ: &str = r#"
return (async () => {
  const stats = await pylon.pc.getStats();
  for (const r of stats.values()) {
    if (r.type === 'inbound-rtp' && r.kind === 'audio' && r.estimatedPlayoutTimestamp) {
      // Unix ms now → NTP ms (the epoch of estimatedPlayoutTimestamp).
      const nowNtp = performance.timeOrigin + performance.now() + 2208988800000;
      return { glass: nowNtp - r.estimatedPlayoutTimestamp,
               jbDelay: r.jitterBufferDelay, jbCount: r.jitterBufferEmittedCount,
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

/// Sum and count of a node histogram (`pylon_server_stage_seconds{stage="…"}`).
fn stage(platform: &common::Platform, name: &str) -> (f64, f64) {
    let text = platform.server_metrics.render();
    let find = |suffix: &str| {
        let needle = format!("pylon_server_stage_seconds_{suffix}{{stage=\"{name}\"}} ");
        text.lines().find_map(|l| l.strip_prefix(&needle)?.trim().parse::<f64>().ok()).unwrap_or(0.0)
    };
    (find("sum"), find("count"))
}

fn audio_thread_cpu() -> f64 {
    common::thread_cpu().iter().filter(|(name, _)| name.starts_with("pylon-audio")).map(|(_, s)| s).sum()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = Args::parse();
    eprintln!("starting the relay and the render node (demo, sound on) and Chromium…");
    let platform = common::start_platform(1280, 720, 60).await;
    let b = common::Browser::start().await;
    b.client.goto(&platform.url()).await.unwrap();
    b.wait_for("return pylon.stats && pylon.stats.framesDecoded > 5", Duration::from_secs(60)).await;
    b.eval("pylon.sound.toggle(); return true;").await;
    eprintln!("letting the stream settle for {} s…", args.settle);
    tokio::time::sleep(Duration::from_secs(args.settle)).await;
    let first = b.eval(READ).await;
    let (sum0, count0) = stage(&platform, "audio_capture_to_send");
    let (cpu0, t0) = (audio_thread_cpu(), Instant::now());
    let mut glass = Vec::new();
    let end = Instant::now() + Duration::from_secs(args.seconds);
    while Instant::now() < end {
        let r = b.eval(READ).await;
        if let Some(g) = r["glass"].as_f64() {
            glass.push(g);
        }
        if glass.len() % 50 == 0 {
            eprintln!("{} readings…", glass.len());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let last = b.eval(READ).await;
    let (sum1, count1) = stage(&platform, "audio_capture_to_send");
    let cpu = (audio_thread_cpu() - cpu0) / t0.elapsed().as_secs_f64();
    let d = |k: &str| last[k].as_f64().unwrap_or(0.0) - first[k].as_f64().unwrap_or(0.0);
    let jitter_buffer = 1000.0 * d("jbDelay") / d("jbCount").max(1.0);
    let node = 1000.0 * (sum1 - sum0) / (count1 - count0).max(1.0);
    let (p50, p95) = (percentile(&mut glass, 0.5), percentile(&mut glass, 0.95));
    let rest = p50 - node - jitter_buffer;
    println!("Pylon glass-to-ear (the demo's sound, capture → Chromium playout, loopback), {} readings", glass.len());
    println!("{:<46} {:>8.1} ms  (p95 {p95:.1})", "glass-to-ear p50", p50);
    println!("{:<46} {:>8.1} ms", "  node: capture to send (buffer, encoder)", node);
    println!("{:<46} {:>8.1} ms", "  browser jitter buffer", jitter_buffer);
    println!("{:<46} {:>8.1} ms", "  rest: network, relay, decode, playout", rest);
    println!("{:<46} {:>8.2} % of a core", "node audio thread CPU", 100.0 * cpu);
    println!("{:<46} {:>8.3} %", "concealed samples", 100.0 * d("concealed") / d("samples").max(1.0));
    println!(
        "{}",
        serde_json::json!({
            "readings": glass.len(), "glass_to_ear_p50_ms": p50, "glass_to_ear_p95_ms": p95,
            "node_capture_to_send_ms": node, "jitter_buffer_ms": jitter_buffer, "rest_ms": rest,
            "audio_thread_cpu_pct": 100.0 * cpu,
        })
    );
    b.close().await;
    platform.stop().await;
}
