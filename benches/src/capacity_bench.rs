//! `capacity-bench`: the proof of capacity's cost on each side.
//!
//! For each matrix size: the node's GPU computing `C = A·B mod 2³²` for a fresh challenge
//! (`pylon_gpu::CapacityEngine`, the device the node would render on; the shader's own time
//! from timestamps, and the wall time with upload and read-back), the checker deriving the
//! matrices from the seed and verifying `C` with Freivalds' algorithm
//! (`pylon_proto::capacity::verify`, `VERIFY_ROUNDS` rounds), and, as the baseline in the
//! same run, the plain `n³` product on one CPU core. The ratio the issue asks for is the
//! node's compute time (wall: upload, shader, read-back) over the checker's whole cost
//! (deriving the matrices, then verifying). Prints a table, then as its
//! last line one JSON object. A benchmark, not a test: nothing here asserts.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use clap::Parser;
use pylon_proto::capacity::{Challenge, VERIFY_ROUNDS, multiply, verify};
use std::time::{Duration, Instant};

/// The proof of capacity's cost on the node's GPU and on the checker.
#[derive(Debug, Parser)]
#[command(about)]
struct Args {
    /// Matrix sizes to measure (multiples of 16).
    #[arg(long, value_delimiter = ',', default_values_t = [256, 512, 1024])]
    sizes: Vec<u32>,
    /// Runs per size (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Largest size the one-core CPU baseline is run for (it grows as n³).
    #[arg(long, default_value_t = 1024)]
    cpu_up_to: u32,
    /// Vulkan device, as `pylon-server --gpu` takes it (default: the one the node would choose).
    #[arg(long)]
    gpu: Option<String>,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let engine = pylon_gpu::CapacityEngine::new(args.gpu.as_deref())?;
    eprintln!("GPU: {} ({:?})", engine.device_info().name, engine.device_info().kind);
    println!(
        "{:>6} {:>12} {:>12} {:>12} {:>12} {:>12} {:>10} {:>10}",
        "n", "gpu ms", "node wall", "derive ms", "verify ms", "1-core ms", "ratio", "gpu Gop/s"
    );
    let mut rows = Vec::new();
    for &n in &args.sizes {
        let (mut gpu, mut wall, mut derive, mut check, mut cpu) = (vec![], vec![], vec![], vec![], vec![]);
        for run in 0..args.runs.max(1) {
            let mut seed = [0u8; 32];
            seed[..8].copy_from_slice(&(u64::from(n) << 16 | run as u64).to_le_bytes());
            let challenge = Challenge::new(seed, n)?;
            let t = Instant::now();
            let (a, b) = challenge.matrices();
            derive.push(t.elapsed());
            let done = engine.multiply(&a, &b, n)?;
            gpu.push(done.gpu_time);
            wall.push(done.wall_time);
            let mut rng = rand::rng();
            let t = Instant::now();
            let ok = verify(&challenge, &a, &b, &done.product, &mut rng)?;
            check.push(t.elapsed());
            anyhow::ensure!(ok, "the GPU's product for n={n} did not verify");
            if n <= args.cpu_up_to && run == 0 {
                let t = Instant::now();
                let c = multiply(&a, &b, n as usize);
                cpu.push(t.elapsed());
                anyhow::ensure!(c == done.product, "CPU and GPU products differ for n={n}");
            }
        }
        let (gpu, wall, derive, check) = (median(gpu), median(wall), median(derive), median(check));
        let cpu = cpu.first().copied();
        // The checker's whole cost: deriving A and B from the seed, then verifying.
        let ratio = wall.as_secs_f64() / (derive + check).as_secs_f64().max(1e-9);
        let gops = (u64::from(n).pow(3) as f64) / gpu.as_secs_f64().max(1e-9) / 1e9;
        println!(
            "{n:>6} {:>12.2} {:>12.2} {:>12.2} {:>12.2} {:>12} {:>10.1} {:>10.2}",
            ms(gpu),
            ms(wall),
            ms(derive),
            ms(check),
            cpu.map_or("-".into(), |c| format!("{:.1}", ms(c))),
            ratio,
            gops
        );
        rows.push(serde_json::json!({
            "n": n, "gpu_ms": ms(gpu), "node_wall_ms": ms(wall), "derive_ms": ms(derive), "verify_ms": ms(check),
            "cpu_one_core_ms": cpu.map(ms), "ratio_node_over_verify": ratio, "gpu_gops": gops,
        }));
    }
    println!(
        "{}",
        serde_json::json!({ "device": engine.device_info().name, "verify_rounds": VERIFY_ROUNDS, "sizes": rows })
    );
    Ok(())
}
