//! `make bench-checker`: what one check costs. Runs the local platform (render node, relay)
//! at the demo's size and rate, then the release `pylon-checker --demo` as a child process,
//! check after check, and reports per check:
//!
//! * the checker's CPU seconds (the child's user + system time, from this process's
//!   `cutime`/`cstime` once it is waited for) and wall time;
//! * the bytes it received (its report's media bytes);
//! * the proof of capacity (`--gpu-class`, default the lavapipe node's own 0): challenge to
//!   commitment, the node's GPU time as it reports it, the checker's verification time;
//! * the node's frame-path CPU seconds during the check, beside the same span with no
//!   viewer (a check costs the provider a session's streaming);
//!
//! and from them how many nodes one checker core can audit a minute (60 s ÷ the checker's
//! CPU seconds per check: checks of different nodes run side by side, so CPU, not wall
//! time, is the bound). Prints progress, then as its last line one JSON object. A
//! benchmark, not a test: nothing here asserts a cost.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
#[path = "../../edge-relay/tests/common/mod.rs"]
mod common;

use clap::Parser;
use std::time::{Duration, Instant};

/// The cost of a checker's check, on the checker and on the node.
#[derive(Parser, Debug)]
struct Args {
    /// Checks to run, one after another.
    #[arg(long, default_value_t = 5)]
    checks: u32,
    /// Seconds each check watches the stream (after its first frame).
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Stream size and rate.
    #[arg(long, default_value_t = 1280)]
    width: u32,
    #[arg(long, default_value_t = 720)]
    height: u32,
    #[arg(long, default_value_t = 60)]
    fps: u32,
    /// GPU class each check proves with the proof of capacity (the node's own: 0 on
    /// lavapipe); `none` leaves the capacity check out.
    #[arg(long, default_value = "0")]
    gpu_class: String,
}

fn frame_path_cpu() -> f64 {
    common::thread_cpu().iter().filter(|(name, _)| common::is_frame_path_thread(name)).map(|(_, s)| s).sum()
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let checker = std::env::current_exe().unwrap().with_file_name("pylon-checker");
    assert!(checker.exists(), "{} is missing: build it (`make bench-checker` does)", checker.display());
    let platform = common::start_platform(args.width, args.height, args.fps).await;
    // Let the node warm up, then measure its frame path with nobody watching.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (idle0, t0) = (frame_path_cpu(), Instant::now());
    tokio::time::sleep(Duration::from_secs_f64(args.seconds)).await;
    let idle_per_s = (frame_path_cpu() - idle0) / t0.elapsed().as_secs_f64();
    eprintln!("node frame path with no viewer: {:.3} CPU s per s", idle_per_s);

    let mut runs = Vec::new();
    for i in 0..args.checks {
        let (cpu0, node0, t0) = (common::children_cpu(), frame_path_cpu(), Instant::now());
        let out = tokio::process::Command::new(&checker)
            .args(["--relay", &platform.url(), "--demo", "--fps", &args.fps.to_string()])
            .args(["--size", &format!("{}x{}", args.width, args.height), "--seconds", &args.seconds.to_string()])
            .args(if args.gpu_class == "none" { vec![] } else { vec!["--gpu-class", args.gpu_class.as_str()] })
            .env("RUST_LOG", "warn")
            .output()
            .await
            .unwrap();
        let wall = t0.elapsed().as_secs_f64();
        let (cpu, node) = (common::children_cpu() - cpu0, frame_path_cpu() - node0);
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        let run = serde_json::json!({
            "exit": out.status.code(),
            "checker_cpu_s": cpu,
            "wall_s": wall,
            "bytes": report["qoe"]["bytes"],
            "fps": report["qoe"]["fps"],
            "answered": report["response"]["answered"],
            "inputs": report["response"]["inputs"],
            "p50_ms": report["response"]["p50_ms"],
            "capacity_n": report["capacity"]["n"],
            "capacity_ms": report["capacity"]["answered_ms"],
            "capacity_node_gpu_ms": report["capacity"]["node_gpu_ms"],
            "capacity_verify_ms": report["capacity"]["verify_ms"],
            "node_frame_path_cpu_s": node,
            "node_frame_path_cpu_s_idle_same_span": idle_per_s * wall,
        });
        eprintln!("check {}/{}: {run}", i + 1, args.checks);
        if out.status.code() == Some(2) {
            eprintln!("{}", String::from_utf8_lossy(&out.stderr));
        }
        runs.push(run);
    }
    platform.stop().await;
    let mean = |k: &str| runs.iter().filter_map(|r| r[k].as_f64()).sum::<f64>() / runs.len().max(1) as f64;
    let cpu = mean("checker_cpu_s");
    let summary = serde_json::json!({
        "bench": "checker-cost",
        "stream": format!("{}x{}@{}", args.width, args.height, args.fps),
        "checks": runs.len(),
        "passed": runs.iter().filter(|r| r["exit"] == 0).count(),
        "checker_cpu_s_per_check": cpu,
        "wall_s_per_check": mean("wall_s"),
        "bytes_per_check": mean("bytes"),
        "capacity_ms": mean("capacity_ms"),
        "capacity_verify_ms": mean("capacity_verify_ms"),
        "node_frame_path_cpu_s_per_check": mean("node_frame_path_cpu_s"),
        "node_frame_path_cpu_s_idle_same_span": mean("node_frame_path_cpu_s_idle_same_span"),
        "nodes_per_checker_core_per_minute": if cpu > 0.0 { 60.0 / cpu } else { 0.0 },
        "runs": runs,
    });
    println!("{summary}");
}
