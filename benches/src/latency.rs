//! `make latency`: click-to-photon as a player sees it, through the pool as `make demo`
//! runs it (catalog → matched session → relay → node).
//!
//! Headless Chromium gets real input through the DevTools protocol
//! (`Input.dispatchMouseEvent`, which enters Chromium's input pipeline as a device's
//! event would): the mouse jumps from one side of the ship to the other, so the demo's
//! ship turns round. The page times each trial from the timestamp of the trusted move
//! event (`pointerrawupdate` or `mousemove`, whichever comes first) to the display time
//! of the first decoded frame whose ship pixels changed (read back from the `<video>` in
//! `requestVideoFrameCallback`; `expectedDisplayTime`, never before the refresh running
//! the callback), against the frame shown when the trial was armed. Sham trials,
//! interleaved, arm the same detector without any input: how many of them fire says how
//! often the detector sees a change that no input caused.
//!
//! Beside it: the node's own announcement (the first frame reflecting each input, as the
//! player page's overlay measures it), Chromium's jitter-buffer and decode time per frame,
//! and the CPU, in % of a core: the node's frame path, the node's sound, the relay (on
//! threads of its own), the rest of this process (indexer, the node's link and membership,
//! this driver) and Chromium. Prints progress, then as its last line one JSON object. A benchmark,
//! not a test: nothing here asserts a time.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
#[path = "../../edge-relay/tests/common/mod.rs"]
mod common;

use clap::Parser;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Player-side click-to-photon of the local platform, in headless Chromium.
#[derive(Debug, Parser)]
#[command(about)]
struct Args {
    /// Trials to run; every third is a sham (no input).
    #[arg(long, default_value_t = 90)]
    trials: u32,
    /// Time between trials, ms (a trial that saw no change by then is a miss).
    #[arg(long, default_value_t = 400)]
    interval_ms: u64,
    /// Frame rate.
    #[arg(long, default_value_t = 60)]
    fps: u32,
}

/// Installed in the play page: locates the ship, arms trials, and compares the ship's
/// pixels frame by frame in `requestVideoFrameCallback`.
const DETECTOR: &str = r#"
const video = document.querySelector('video');
const W = video.videoWidth, H = video.videoHeight;
const CROP = 128, THRESHOLD = 40;
const full = new OffscreenCanvas(W, H);
const fctx = full.getContext('2d', { willReadFrequently: true });
const crop = new OffscreenCanvas(CROP, CROP);
const cctx = crop.getContext('2d', { willReadFrequently: true });
const orange = (d, i) => d[i] > 190 && d[i + 1] > 110 && d[i + 1] < 200 && d[i + 2] < 90;
const L = window.pylonLatency = { ship: null, prev: null, pending: null, results: [], frames: 0, busyMs: 0 };
L.locate = () => {
  fctx.drawImage(video, 0, 0, W, H);
  const d = fctx.getImageData(0, 0, W, H).data;
  let n = 0, sx = 0, sy = 0;
  for (let i = 0; i < d.length; i += 4) {
    if (orange(d, i)) { const p = i / 4; n++; sx += p % W; sy += Math.floor(p / W); }
  }
  if (n < 30) return null;
  L.ship = { x: sx / n, y: sy / n, n };
  L.prev = null;
  return L.ship;
};
// Page coordinates of a point 200 video pixels left (-1) or right (+1) of the ship.
L.target = (side) => {
  const r = video.getBoundingClientRect();
  const s = Math.min(r.width / W, r.height / H);
  const ox = r.left + (r.width - W * s) / 2, oy = r.top + (r.height - H * s) / 2;
  const vx = Math.min(W - 10, Math.max(10, L.ship.x + side * 200));
  return { x: ox + vx * s, y: oy + L.ship.y * s };
};
// The ship's pixels in the frame the video shows now, as a mask.
L.mask = () => {
  const x0 = Math.round(L.ship.x - CROP / 2), y0 = Math.round(L.ship.y - CROP / 2);
  cctx.clearRect(0, 0, CROP, CROP);
  cctx.drawImage(video, x0, y0, CROP, CROP, 0, 0, CROP, CROP);
  const d = cctx.getImageData(0, 0, CROP, CROP).data;
  const mask = new Uint8Array(CROP * CROP);
  for (let i = 0; i < mask.length; i++) mask[i] = orange(d, 4 * i) ? 1 : 0;
  return mask;
};
// The baseline is the frame shown when the trial is armed, before its input is sent: a
// response can come in the very next frame.
L.arm = (kind) => {
  L.prev = L.mask();
  L.pending = { kind, t0: kind === 'sham' ? performance.now() : null, seq: null };
  return true;
};
L.expire = () => {
  if (L.pending) L.results.push({ kind: L.pending.kind, ms: null, seq: L.pending.seq });
  L.pending = null;
  return true;
};
// Whichever of the move's events comes first (the page sends on `pointerrawupdate` where
// the browser has it, dispatched before the animation frame's `mousemove`); both carry the
// time the move happened.
const armed = (e) => {
  const p = L.pending;
  if (p && p.kind === 'input' && p.t0 === null && e.isTrusted) {
    p.t0 = e.timeStamp;
    // The page's own input handler numbers the message after this listener.
    setTimeout(() => { p.seq = pylon.latency.encoder.seq; }, 0);
  }
};
addEventListener('mousemove', armed, true);
if ('onpointerrawupdate' in window) addEventListener('pointerrawupdate', armed, true);
// Reading pixels back costs the page several ms a frame on a 2-core machine, so only the
// frames of an armed trial are read.
const onFrame = (now, md) => {
  const t = performance.now();
  if (L.ship && L.pending) {
    const mask = L.mask();
    if (L.prev) {
      let diff = 0;
      for (let i = 0; i < mask.length; i++) diff += mask[i] ^ L.prev[i];
      const p = L.pending;
      if (p && p.t0 !== null && diff >= THRESHOLD) {
        // The player's own rule (latency.js): never before the refresh running this callback.
        const shown = pylon.displayTime(now, md);
        L.results.push({ kind: p.kind, ms: shown - p.t0, seq: p.seq, diff,
                         receive_ms: md.receiveTime !== undefined ? md.receiveTime - p.t0 : null });
        L.pending = null;
      }
    }
    L.prev = mask;
  }
  L.frames++;
  L.busyMs += performance.now() - t;
  video.requestVideoFrameCallback(onFrame);
};
video.requestVideoFrameCallback(onFrame);
return true;
"#;

fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    sorted.get(((sorted.len() as f64 - 1.0) * p).round() as usize).copied()
}

fn round1(v: Option<f64>) -> serde_json::Value {
    v.map_or(serde_json::Value::Null, |v| serde_json::json!((v * 10.0).round() / 10.0))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = Args::parse();
    eprintln!("starting the pool (indexer, relay, render node) and Chromium…");
    // The relay on threads of its own, as its own process would be, so its CPU is counted apart.
    let setup = common::Setup { pooled: true, relay_threads: true, ..common::Setup::default() };
    let platform = common::start_setup(1280, 720, args.fps, setup).await;
    let indexer = platform.indexer.expect("a pool has an indexer");
    let b = common::Browser::start().await;
    common::play_from_catalog(&b, indexer).await;
    b.wait_for("return pylon.pc.sctp && pylon.pc.sctp.state === 'connected'", Duration::from_secs(10)).await;
    b.eval(DETECTOR).await;

    // The first move takes the ship off its autopilot; it then holds still, facing the mouse.
    let ship = b.wait_for("return pylonLatency.locate()", Duration::from_secs(10)).await;
    let start = b.eval("return pylonLatency.target(-1)").await;
    b.cdp("Input.dispatchMouseEvent", serde_json::json!({ "type": "mouseMoved", "x": start["x"], "y": start["y"] }))
        .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    eprintln!("ship at {ship}; {} trials, one every {} ms…", args.trials, args.interval_ms);

    let inbound0 = b.eval(common::VIDEO_INBOUND).await;
    let (cpu0, browser0) = (common::thread_cpu(), common::browser_cpu());
    let began = Instant::now();
    let mut side = 1;
    for i in 0..args.trials {
        if b.eval("return pylonLatency.locate()").await.is_null() {
            eprintln!("trial {i}: the ship is not on screen; skipped");
            tokio::time::sleep(Duration::from_millis(args.interval_ms)).await;
            continue;
        }
        if i % 3 == 2 {
            b.eval("return pylonLatency.arm('sham')").await;
        } else {
            let to = b.eval(&format!("return pylonLatency.target({side})")).await;
            b.eval("return pylonLatency.arm('input')").await;
            b.cdp("Input.dispatchMouseEvent", serde_json::json!({ "type": "mouseMoved", "x": to["x"], "y": to["y"] }))
                .await;
            side = -side;
        }
        tokio::time::sleep(Duration::from_millis(args.interval_ms)).await;
        b.eval("return pylonLatency.expire()").await;
        if (i + 1) % 15 == 0 {
            eprintln!("{} of {} trials", i + 1, args.trials);
        }
    }
    let wall = began.elapsed().as_secs_f64();
    let (cpu1, browser1) = (common::thread_cpu(), common::browser_cpu());
    let inbound1 = b.eval(common::VIDEO_INBOUND).await;
    let results = b.eval("return pylonLatency.results").await;
    let announced = b.eval("return Object.fromEntries(pylon.latency.announced)").await;
    let detector = b
        .eval("return { frames: pylonLatency.frames, busyMs: pylonLatency.busyMs, state: pylon.state, error: pylon.error, stats: pylon.stats }")
        .await;

    let results = results.as_array().cloned().unwrap_or_default();
    let of = |kind: &str| results.iter().filter(|r| r["kind"] == kind).collect::<Vec<_>>();
    let inputs = of("input");
    let shams = of("sham");
    let mut measured: Vec<f64> = inputs.iter().filter_map(|r| r["ms"].as_f64()).collect();
    measured.sort_by(f64::total_cmp);
    let mut received: Vec<f64> = inputs.iter().filter_map(|r| r["receive_ms"].as_f64()).collect();
    received.sort_by(f64::total_cmp);
    let mut announced_ms: Vec<f64> = inputs
        .iter()
        .filter(|r| r["ms"].is_number())
        .filter_map(|r| r["seq"].as_u64())
        .filter_map(|seq| announced[seq.to_string()].as_f64())
        .collect();
    announced_ms.sort_by(f64::total_cmp);
    let sham_fired = shams.iter().filter(|r| r["ms"].is_number()).count();
    let misses = inputs.iter().filter(|r| r["ms"].is_null()).count();
    let delta = |k: &str| inbound1[k].as_f64().unwrap_or(0.0) - inbound0[k].as_f64().unwrap_or(0.0);
    let per = |num: &str, den: &str| {
        let d = delta(den);
        (d > 0.0).then(|| 1000.0 * delta(num) / d)
    };
    let used = |pred: &dyn Fn(&str) -> bool| {
        let sum = |m: &BTreeMap<String, f64>| m.iter().filter(|(k, _)| pred(k)).map(|(_, v)| v).sum::<f64>();
        100.0 * (sum(&cpu1) - sum(&cpu0)) / wall
    };
    let node_frame_path = used(&common::is_frame_path_thread);
    let node_audio = used(&common::is_audio_thread);
    let relay = used(&|name| name == common::RELAY_THREAD);
    let process = used(&|_| true);
    let browser = 100.0 * (browser1 - browser0) / wall;
    eprintln!(
        "pixel-measured (ms, sorted): {:?}",
        measured.iter().map(|x| (x * 10.0).round() / 10.0).collect::<Vec<_>>()
    );
    eprintln!("node-announced for the same inputs (ms, sorted): {announced_ms:?}");
    eprintln!("detector: {detector}");
    // The session woke the resting node: its start to the first frame's packets.
    let wake_ms = platform.server_stage_mean_ms("wake");
    // Where the node's share goes, means over the run (ms): an input's wait for its frame to
    // start, then each stage of a frame.
    let node_stages: serde_json::Map<String, serde_json::Value> =
        ["input_wait", "render", "readback", "encode_queue", "encode", "packetize", "input_to_packets"]
            .iter()
            .map(|stage| ((*stage).to_string(), round1(platform.server_stage_mean_ms(stage))))
            .collect();
    b.close().await;
    platform.stop().await;
    if measured.is_empty() {
        eprintln!(
            "no trial saw the ship change: the page presented {} frames in all (a stalled video, or a \
             ship off screen); the figures below are not a measurement",
            detector["frames"]
        );
    }
    println!(
        "{}",
        serde_json::json!({
            "p50_ms": round1(percentile(&measured, 0.5)),
            "p95_ms": round1(percentile(&measured, 0.95)),
            "samples": measured.len(),
            "misses": misses,
            "sham_trials": shams.len(),
            "sham_fired": sham_fired,
            "to_frame_received_p50_ms": round1(percentile(&received, 0.5)),
            "announced_p50_ms": round1(percentile(&announced_ms, 0.5)),
            "announced_p95_ms": round1(percentile(&announced_ms, 0.95)),
            "jitter_buffer_ms_per_frame": round1(per("jitterBufferDelay", "jitterBufferEmittedCount")),
            "decode_ms_per_frame": round1(per("totalDecodeTime", "framesDecoded")),
            "node_frame_path_cpu_pct_of_core": round1(Some(node_frame_path)),
            "node_audio_cpu_pct_of_core": round1(Some(node_audio)),
            "relay_cpu_pct_of_core": round1(Some(relay)),
            "platform_process_cpu_pct_of_core": round1(Some(process)),
            "platform_rest_cpu_pct_of_core": round1(Some(process - node_frame_path - node_audio - relay)),
            "chromium_cpu_pct_of_core": round1(Some(browser)),
            "node_wake_ms": round1(wake_ms),
            "node_stages_mean_ms": node_stages,
        })
    );
}
