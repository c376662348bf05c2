//! `make bench-cascade`: what a relay → relay cascade costs.
//!
//! Runs a pool on loopback from the release binaries, each its own process: an indexer
//! (SQLite, the demo title), three relays (`relay-a`, `relay-b`, `relay-c`) and a render
//! node streaming the demo (lavapipe + the CPU encoder here). A synthetic player (a str0m
//! client, as in `make bench-relay`) takes a session from the indexer with RTTs that make
//! `relay-a` its nearest relay; then spectators near `relay-b` and near `relay-c` ask the
//! indexer where to watch, are sent to their own relay, and that relay pulls the stream
//! from `relay-a`. Measured over one window:
//!
//! * **Extra latency of the cascade hop, seen from outside:** every RTP payload's kernel
//!   receive timestamp (SO_TIMESTAMPNS) at a spectator behind a pulling relay minus the
//!   same payload's at the player on `relay-a`, one clock, p50/p99. This is everything the
//!   second hop adds: the carrying relay's copy, the QUIC link between relays and the
//!   pulling relay's forwarding, less the carrying relay's own forwarding to its player.
//! * **Inside each relay** (their histograms over the window, bucket upper bounds):
//!   `relay-a`'s ingest → egress for its player (one hop, the baseline), its ingest → copy
//!   handed to QUIC for the relays pulling (`downstream_seconds`), and each pulling relay's
//!   ingest → egress for its spectators.
//! * **The node's upstream bytes per media byte** with one relay carrying its session
//!   (before the spectators came) and with three (goal: one copy per relay, not per
//!   viewer; the node sends it once whatever the relays do).
//! * Each relay's CPU over the window.
//!
//! Prints progress, then as its last line one JSON object. A benchmark: nothing here
//! asserts a figure.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::{Context, anyhow, bail};
use clap::Parser;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};
use tokio::sync::watch;

#[allow(dead_code)]
mod synthetic;
use synthetic::*;

/// The cascade's cost: a player on one relay, spectators behind two relays pulling from it.
#[derive(Debug, Parser)]
#[command(about)]
struct Args {
    /// Spectators behind each pulling relay (two pulling relays).
    #[arg(long, default_value_t = 4)]
    spectators: usize,
    /// Seconds measured, after everyone connected and warmed up.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// The node's stream, WIDTHxHEIGHT.
    #[arg(long, default_value = "1280x720")]
    size: String,
    /// The node's frame rate.
    #[arg(long, default_value_t = 60)]
    fps: u32,
}

const NODE: &str = "node-bench";
const RELAYS: [&str; 3] = ["relay-a", "relay-b", "relay-c"];
/// The RTT (ms) a viewer says it measured to a relay that is not its own.
const FAR_MS: f64 = 40.0;

/// A child process, killed when dropped.
struct Proc {
    child: Child,
    name: String,
}

impl Proc {
    fn start(dir: &Path, name: &str, binary: &str, args: &[String]) -> anyhow::Result<Self> {
        let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
        let child = Command::new(sibling_binary(binary)?)
            .args(args)
            .env("RUST_LOG", "info,str0m=warn,quinn=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {binary}"))?;
        Ok(Self { child, name: name.into() })
    }

    fn pid(&self) -> anyhow::Result<u32> {
        self.child.id().ok_or_else(|| anyhow!("{} exited", self.name))
    }
}

fn at(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

async fn post(url: String, body: serde_json::Value) -> anyhow::Result<serde_json::Value> {
    let response = reqwest::Client::new().post(&url).json(&body).send().await?;
    let status = response.status();
    let v: serde_json::Value = response.json().await.unwrap_or_default();
    if !status.is_success() {
        bail!("{url}: {status} {v}");
    }
    Ok(v)
}

/// RTTs of a viewer next to `near`, far from the other relays.
fn rtts_near(near: &str) -> serde_json::Value {
    let map: serde_json::Map<String, serde_json::Value> =
        RELAYS.iter().map(|r| (r.to_string(), (if *r == near { 1.0 } else { FAR_MS }).into())).collect();
    serde_json::json!({ "client_rtt_ms": map })
}

/// Where packets arrived, while measuring.
#[derive(Default)]
struct Arrivals {
    measuring: AtomicBool,
    /// At the player: each payload's first arrival.
    player: Mutex<HashMap<u64, Instant>>,
    /// At the spectators: (pulling relay, payload, arrival).
    spectators: Mutex<Vec<(usize, u64, Instant)>>,
    /// Packets received by anyone (to see that everyone receives).
    received: AtomicU64,
}

/// The node's link bytes and media bytes so far (its upstream per media byte over a window
/// is the ratio of their growth).
async fn upstream(node_metrics: SocketAddr) -> (f64, f64) {
    let link = metric(node_metrics, "pylon_server_link_bytes_sent_total").await;
    let media = metric(node_metrics, "pylon_server_rtp_bytes_sent_total").await
        + metric(node_metrics, "pylon_server_audio_bytes_total").await;
    (link, media)
}

fn per_media_byte((l0, m0): (f64, f64), (l1, m1): (f64, f64)) -> f64 {
    (l1 - l0) / (m1 - m0).max(1.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = std::env::temp_dir().join(format!("pylon-cascade-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = bench(&args, &dir).await;
    match &result {
        Ok(()) => {
            let _ = std::fs::remove_dir_all(&dir);
        }
        Err(_) => eprintln!("logs kept in {}", dir.display()),
    }
    result
}

async fn bench(args: &Args, dir: &Path) -> anyhow::Result<()> {
    // The indexer.
    let indexer = at(free_port());
    let ix_args: Vec<String> = vec![
        "--addr".into(),
        indexer.to_string(),
        "--data-dir".into(),
        dir.join("indexer").display().to_string(),
        "--demo-title".into(),
        // Every viewer here comes from one address.
        "--sessions-per-address".into(),
        "1000".into(),
    ];
    let _ix = Proc::start(dir, "indexer", "pylon-indexer", &ix_args)?;
    wait_listening(indexer, "pylon-indexer").await?;
    let indexer_url = format!("http://{indexer}");

    // Three relays.
    let mut relays = Vec::new();
    for id in RELAYS {
        let (http, quic) = (at(free_port()), at(free_port()));
        let relay_args: Vec<String> = [
            "--http-addr",
            &http.to_string(),
            "--webrtc-addr",
            "127.0.0.1:0",
            "--quic-addr",
            &quic.to_string(),
            "--relay-id",
            id,
            "--capacity",
            "50",
            "--indexer",
            &indexer_url,
            "--data-dir",
            &dir.join(id).display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let proc = Proc::start(dir, id, "pylon-relay", &relay_args)?;
        relays.push((proc, http));
    }

    // The render node.
    let node_metrics = at(free_port());
    let node_args: Vec<String> = [
        "--indexer",
        &indexer_url,
        "--node-id",
        NODE,
        "--data-dir",
        &dir.join("node").display().to_string(),
        "--metrics-addr",
        &node_metrics.to_string(),
        "--size",
        &args.size,
        "--fps",
        &args.fps.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let _node = Proc::start(dir, "node", "pylon-server", &node_args)?;
    eprintln!("waiting for the node to link to the three relays…");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut linked = 0;
        for (_, http) in &relays {
            if metric(*http, "pylon_relay_nodes_connected").await >= 1.0 {
                linked += 1;
            }
        }
        let listed: serde_json::Value =
            reqwest::get(format!("{indexer_url}/api/v1/relays")).await?.json().await.unwrap_or_default();
        let measured = listed["items"]
            .as_array()
            .map_or(0, |items| items.iter().filter(|r| !r["node_rtt_ms"][NODE].is_null()).count());
        if linked == RELAYS.len() && measured == RELAYS.len() {
            break;
        }
        if Instant::now() > deadline {
            bail!("the node linked to {linked} relays ({measured} measured) in 60 s");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // The player, next to relay-a.
    let arrivals = Arc::new(Arrivals::default());
    let (stop_tx, stop) = watch::channel(false);
    let mut tasks = Vec::new();
    let mut body = rtts_near(RELAYS[0]);
    body["title"] = "demo".into();
    let created = post(format!("{indexer_url}/api/v1/sessions"), body).await?;
    if created["relay"] != RELAYS[0] {
        bail!("the player was matched to {} (expected {})", created["relay"], RELAYS[0]);
    }
    let session = created["session"].as_str().ok_or_else(|| anyhow!("no session: {created}"))?.to_string();
    {
        let a = arrivals.clone();
        let on_rtp = move |payload: &[u8], arrival: Instant| {
            a.received.fetch_add(1, Ordering::Relaxed);
            if a.measuring.load(Ordering::Relaxed) {
                a.player.lock().unwrap().entry(payload_key(payload)).or_insert(arrival);
            }
        };
        let token = created["token"].as_str().map(str::to_string);
        tasks.push(tokio::spawn(pylon_viewer(relays[0].1, token, on_rtp, stop.clone())));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while arrivals.received.load(Ordering::Relaxed) < 300 {
        if Instant::now() > deadline || tasks[0].is_finished() {
            bail!("the player received no stream");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("the player plays session {session} through {}", RELAYS[0]);
    // The node's upstream with one relay carrying the session.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let u0 = upstream(node_metrics).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let one_relay = per_media_byte(u0, upstream(node_metrics).await);

    // Spectators near relay-b and relay-c.
    for (i, relay) in RELAYS.iter().enumerate().skip(1) {
        for _ in 0..args.spectators {
            let watch = post(format!("{indexer_url}/api/v1/sessions/{session}/spectate"), rtts_near(relay)).await?;
            if watch["relay"] != *relay {
                bail!("a spectator near {relay} was sent to {}", watch["relay"]);
            }
            let a = arrivals.clone();
            let on_rtp = move |payload: &[u8], arrival: Instant| {
                a.received.fetch_add(1, Ordering::Relaxed);
                if a.measuring.load(Ordering::Relaxed) {
                    a.spectators.lock().unwrap().push((i, payload_key(payload), arrival));
                }
            };
            let token = watch["token"].as_str().map(str::to_string);
            tasks.push(tokio::spawn(pylon_viewer(relays[i].1, token, on_rtp, stop.clone())));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    eprintln!("{} spectators behind {} and {}; warming up…", 2 * args.spectators, RELAYS[1], RELAYS[2]);
    tokio::time::sleep(Duration::from_secs(4)).await;
    if tasks.iter().any(|t| t.is_finished()) {
        bail!("a viewer's session ended while warming up");
    }
    for (i, (_, http)) in relays.iter().enumerate().skip(1) {
        if metric(*http, "pylon_relay_pulls_total").await < 1.0 {
            bail!("{} did not pull the stream", RELAYS[i]);
        }
    }

    // The window.
    const FORWARD: &str = "pylon_relay_forward_seconds";
    const COPY: &str = "pylon_relay_downstream_seconds";
    let mut before = Vec::new();
    for (_, http) in &relays {
        before.push((buckets(*http, FORWARD).await, buckets(*http, COPY).await));
    }
    let pids: Vec<u32> = relays.iter().map(|(p, _)| p.pid()).collect::<anyhow::Result<_>>()?;
    let cpu0: Vec<f64> = pids.iter().map(|p| cpu_seconds(*p)).collect::<anyhow::Result<_>>()?;
    let (u1, t0) = (upstream(node_metrics).await, Instant::now());
    arrivals.measuring.store(true, Ordering::Relaxed);
    eprintln!("measuring {} s…", args.seconds);
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    arrivals.measuring.store(false, Ordering::Relaxed);
    let elapsed = t0.elapsed().as_secs_f64();
    let three_relays = per_media_byte(u1, upstream(node_metrics).await);
    let cpu: Vec<f64> =
        pids.iter().zip(&cpu0).map(|(p, c0)| Ok((cpu_seconds(*p)? - c0) / elapsed)).collect::<anyhow::Result<_>>()?;
    let mut inside = Vec::new();
    for ((_, http), (f0, c0)) in relays.iter().zip(&before) {
        let forward = bucket_delta(f0, &buckets(*http, FORWARD).await);
        let copy = bucket_delta(c0, &buckets(*http, COPY).await);
        inside.push((forward, copy));
    }
    let pulls_by_carrier = metric(relays[0].1, "pylon_relay_downstream_relays").await;
    let pulls: Vec<f64> = {
        let mut v = Vec::new();
        for (_, http) in relays.iter().skip(1) {
            v.push(metric(*http, "pylon_relay_pulls_total").await);
        }
        v
    };
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }

    // The extra hop, payload by payload.
    let player = std::mem::take(&mut *arrivals.player.lock().unwrap());
    let spectators = std::mem::take(&mut *arrivals.spectators.lock().unwrap());
    let mut extra_us: Vec<i64> = spectators
        .iter()
        .filter_map(|(_, key, at)| {
            let direct = player.get(key)?;
            Some(if at >= direct {
                at.duration_since(*direct).as_micros() as i64
            } else {
                -(direct.duration_since(*at).as_micros() as i64)
            })
        })
        .collect();
    if extra_us.is_empty() {
        bail!("no packet reached a spectator through the cascade ({} at the player)", player.len());
    }
    extra_us.sort_unstable();
    let q = |p: f64| {
        extra_us.get(((extra_us.len().saturating_sub(1)) as f64 * p).round() as usize).map(|us| *us as f64 / 1000.0)
    };
    let quantiles = |b: &[(f64, f64)]| serde_json::json!({"p50_ms": bucket_quantile(b, 0.5), "p99_ms": bucket_quantile(b, 0.99), "samples": b.last().map_or(0.0, |(_, n)| *n)});
    let out = serde_json::json!({
        "size": args.size,
        "fps": args.fps,
        "spectators_per_pulling_relay": args.spectators,
        "seconds": args.seconds,
        "matched_packets": extra_us.len(),
        "player_packets": player.len(),
        "cascade_extra_p50_ms": q(0.5),
        "cascade_extra_p99_ms": q(0.99),
        "carrier_one_hop": quantiles(&inside[0].0),
        "carrier_copy_to_pulling_relays": quantiles(&inside[0].1),
        "pulling_relay_b_hop": quantiles(&inside[1].0),
        "pulling_relay_c_hop": quantiles(&inside[2].0),
        "relays_pulling_from_carrier": pulls_by_carrier,
        "pulls": pulls,
        "node_upstream_per_media_byte_1_relay": one_relay,
        "node_upstream_per_media_byte_3_relays": three_relays,
        "relay_cpu_cores": cpu,
    });
    eprintln!("{}", serde_json::to_string_pretty(&out)?);
    println!("{out}");
    Ok(())
}
