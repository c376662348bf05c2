//! `make bench-relay`: the edge relay under load, side by side with Janus.
//!
//! Records a 720p60 stream from the real frame path (about 6 Mbit/s), then for each relay
//! — Pylon's `pylon-relay` and Debian's Janus (streaming plugin, plain RTP in) — replays
//! it in a loop and connects N synthetic WebRTC viewers (str0m clients, not browsers).
//! Measured per relay process: CPU per viewer (from /proc), memory per viewer (RSS growth
//! ÷ viewers), and added latency seen from outside: feeder send → the kernel's receive
//! timestamp at the viewer's socket, matched by payload, on one clock. Each feeder runs on
//! its own thread. For Pylon that outside figure also holds the node's own QUIC uplink
//! (quinn's encryption and pacing on the feeder side, decryption at the relay), which
//! Janus's plain-RTP feed does not have; Pylon's own ingest → egress delay (node packet
//! handed over by quinn → datagram handed to the kernel for a viewer) comes from the
//! relay's `pylon_relay_forward_seconds` histogram over the same window (bucket upper
//! bounds). The last line is one JSON object.
//!
//! With `--soak-seconds`, Pylon's relay also runs that long with the viewers connected,
//! sampling its RSS, then checks that every viewer is released when they leave.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::{Context, anyhow, bail};
use clap::Parser;
use pylon_proto::framing::{self, DatagramKind, StreamHello};
use pylon_proto::link::{self, NodeConfig, NodeSide, PlayerGate};
use pylon_server::encode::{EncoderChoice, EncoderConfig, PROFILE_LEVEL_ID};
use pylon_server::metrics::ServerMetrics;
use pylon_server::pipeline::{Outgoing, Pipeline, PipelineConfig};
use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use str0m::change::SdpOffer;
use tokio::sync::watch;

#[allow(dead_code)]
mod synthetic;
use synthetic::*;

/// The relay's ingest → egress histogram.
const FORWARD: &str = "pylon_relay_forward_seconds";

/// The relay load harness: Pylon and Janus, the same stream, the same viewers.
#[derive(Debug, Parser)]
#[command(about)]
struct Args {
    /// Synthetic WebRTC viewers per relay.
    #[arg(long, default_value_t = 20)]
    viewers: usize,
    /// Seconds of stream to record (replayed in a loop).
    #[arg(long, default_value_t = 8)]
    record_seconds: u64,
    /// Seconds measured per relay, after the viewers connected and warmed up.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Video bitrate of the recording, kbit/s.
    #[arg(long, default_value_t = 6000)]
    bitrate_kbps: u64,
    /// Skip Janus (Pylon only).
    #[arg(long)]
    no_janus: bool,
    /// Also soak Pylon's relay this long with the viewers connected, then check release.
    #[arg(long, default_value_t = 0)]
    soak_seconds: u64,
}

/// RTP packets with their offsets from the start of the recording.
struct Recording {
    packets: Vec<(Duration, Vec<u8>)>,
    duration: Duration,
}

/// When each payload was handed to the relay, and what viewers measured.
#[derive(Default)]
struct Clock {
    sent: Mutex<HashMap<u64, Instant>>,
    samples_us: Mutex<Vec<u32>>,
    received: std::sync::atomic::AtomicU64,
    measuring: std::sync::atomic::AtomicBool,
}

impl Clock {
    /// What a viewer does with each packet: counts it and, while measuring, times it from
    /// the feeder's send.
    fn timer(self: Arc<Self>) -> impl FnMut(&[u8], Instant) {
        move |payload, arrival| {
            self.received.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if self.measuring.load(std::sync::atomic::Ordering::Relaxed)
                && let Some(sent) = self.sent.lock().unwrap().get(&payload_key(payload))
            {
                let us = arrival.saturating_duration_since(*sent).as_micros() as u32;
                self.samples_us.lock().unwrap().push(us);
            }
        }
    }
}

async fn record(args: &Args) -> anyhow::Result<Recording> {
    let (width, height, fps) = (1280, 720, 60);
    let (tx, mut rx) = tokio::sync::mpsc::channel(65_536);
    let config = PipelineConfig {
        width,
        height,
        fps,
        gpu: None,
        slots: 3,
        encoder: EncoderConfig {
            width,
            height,
            fps,
            bitrate: args.bitrate_kbps * 1000,
            keyframe_interval: fps * 2,
            choice: EncoderChoice::Auto,
        },
        max_rtp_packet: 1200,
        seed: 7,
        early_frames: false,
        audio: false,
        fake: None,
    };
    let pipeline = tokio::task::spawn_blocking(move || Pipeline::start(config, ServerMetrics::new(), tx)).await??;
    eprintln!("recording {} s of 720p60 from the frame path ({})…", args.record_seconds, pipeline.info().encoder);
    let start = Instant::now();
    let mut packets = Vec::new();
    let mut bytes = 0usize;
    while start.elapsed() < Duration::from_secs(args.record_seconds) {
        if let Ok(Some(Outgoing::Rtp(rtp, _))) = tokio::time::timeout(Duration::from_millis(100), rx.recv()).await {
            bytes += rtp.len();
            packets.push((start.elapsed(), rtp.to_vec()));
        }
    }
    drop(pipeline);
    let duration = start.elapsed();
    eprintln!("recorded {} packets, {:.1} Mbit/s", packets.len(), bytes as f64 * 8.0 / duration.as_secs_f64() / 1e6);
    Ok(Recording { packets, duration })
}

/// Replays the recording in a loop through `send`, sequence numbers and timestamps kept
/// continuous across loops, noting each payload's send time.
async fn replay(
    rec: Arc<Recording>,
    clock: Arc<Clock>,
    mut stop: watch::Receiver<bool>,
    mut send: impl FnMut(&[u8]) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let first_seq = rec.packets.first().map(|(_, p)| u16::from_be_bytes([p[2], p[3]])).unwrap_or(0);
    let ticks = (rec.duration.as_secs_f64() * 90_000.0) as u32;
    let start = tokio::time::Instant::now();
    for round in 0u32.. {
        for (i, (offset, packet)) in rec.packets.iter().enumerate() {
            let at = start + rec.duration * round + *offset;
            tokio::select! {
                _ = tokio::time::sleep_until(at) => {}
                _ = stop.changed() => return Ok(()),
            }
            let mut p = packet.clone();
            let n = rec.packets.len() as u32 * round + i as u32;
            let seq = first_seq.wrapping_add(n as u16);
            p[2..4].copy_from_slice(&seq.to_be_bytes());
            let ts = u32::from_be_bytes([p[4], p[5], p[6], p[7]]).wrapping_add(ticks.wrapping_mul(round));
            p[4..8].copy_from_slice(&ts.to_be_bytes());
            let header = 12 + 4 * usize::from(p[0] & 0x0f);
            clock.sent.lock().unwrap().insert(payload_key(&p[header..]), Instant::now());
            send(&p)?;
        }
    }
    Ok(())
}

/// Janus's HTTP API, enough to watch a streaming mountpoint.
struct Janus {
    http: reqwest::Client,
    base: String,
}

impl Janus {
    async fn post(&self, path: &str, body: serde_json::Value) -> anyhow::Result<serde_json::Value> {
        let v: serde_json::Value =
            self.http.post(format!("{}{path}", self.base)).json(&body).send().await?.json().await?;
        if v["janus"] == "error" {
            bail!("janus: {}", v["error"]);
        }
        Ok(v)
    }

    /// Waits for the session's next event that carries a JSEP offer.
    async fn offer(&self, session: u64) -> anyhow::Result<String> {
        for _ in 0..20 {
            let v: serde_json::Value =
                self.http.get(format!("{}/{session}?maxev=1", self.base)).send().await?.json().await?;
            let jsep = if v.is_array() { v[0]["jsep"].clone() } else { v["jsep"].clone() };
            if let Some(sdp) = jsep["sdp"].as_str() {
                return Ok(sdp.to_string());
            }
        }
        bail!("janus sent no offer")
    }
}

/// Connects a viewer to Janus's streaming mountpoint 1.
async fn janus_viewer(base: String, clock: Arc<Clock>, stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    let janus = Janus { http: reqwest::Client::new(), base };
    let tx = || serde_json::json!(format!("{:x}", rand_u64()));
    let session = janus.post("", serde_json::json!({"janus": "create", "transaction": tx()})).await?["data"]["id"]
        .as_u64()
        .ok_or_else(|| anyhow!("no janus session"))?;
    let handle = janus
        .post(
            &format!("/{session}"),
            serde_json::json!({"janus": "attach", "plugin": "janus.plugin.streaming", "transaction": tx()}),
        )
        .await?["data"]["id"]
        .as_u64()
        .ok_or_else(|| anyhow!("no janus handle"))?;
    janus
        .post(
            &format!("/{session}/{handle}"),
            serde_json::json!({"janus": "message", "transaction": tx(), "body": {"request": "watch", "id": 1}}),
        )
        .await?;
    let offer = janus.offer(session).await?;
    // libnice leaves out loopback: answer from the local address Janus offers (IPv4).
    let ip = offer
        .lines()
        .filter(|l| l.starts_with("a=candidate:") && l.contains(" udp ") && l.contains("typ host"))
        .filter_map(|l| l.split_whitespace().nth(4)?.parse::<std::net::IpAddr>().ok())
        .find(|ip| ip.is_ipv4())
        .ok_or_else(|| anyhow!("janus offered no IPv4 host candidate"))?;
    let mut v = Viewer::on(ip).await?;
    let answer = v.rtc.sdp_api().accept_offer(SdpOffer::from_sdp_string(&offer)?)?;
    janus
        .post(
            &format!("/{session}/{handle}"),
            serde_json::json!({"janus": "message", "transaction": tx(), "body": {"request": "start"},
                "jsep": {"type": "answer", "sdp": answer.to_sdp_string()}}),
        )
        .await?;
    // Janus drops sessions nobody polls: keep polling while the viewer runs.
    let mut keep_stop = stop.clone();
    let keepalive = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = janus.http.get(format!("{}/{session}?maxev=1", janus.base)).send() => {}
                _ = keep_stop.changed() => break,
            }
        }
        let _ = janus.post(&format!("/{session}"), serde_json::json!({"janus": "destroy", "transaction": "bye"})).await;
    });
    let result = v.run(clock.timer(), stop).await;
    let _ = keepalive.await;
    result
}

fn rand_u64() -> u64 {
    let mut h = DefaultHasher::new();
    Instant::now().hash(&mut h);
    std::thread::current().id().hash(&mut h);
    h.finish()
}

/// What one relay did under the load.
#[derive(Debug)]
struct Measured {
    cpu_per_viewer: f64,
    rss_per_viewer_kib: f64,
    p50_ms: f64,
    p99_ms: f64,
    packets_per_second: f64,
    /// The relay's own p50/p99 forwarding delay (upper bucket bounds), ms, where it reports one.
    internal: Option<(f64, f64)>,
}

/// Runs a feeder on a thread of its own with a current-thread runtime: both relays get
/// their packets as soon as they are due, whatever the synthetic viewers are doing.
fn feeder_thread(
    feed: impl std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
) -> std::thread::JoinHandle<anyhow::Result<()>> {
    std::thread::spawn(move || tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(feed))
}

/// Connects the viewers, warms up, measures the relay process `pid` for `seconds`.
async fn measure<F, Fut>(
    args: &Args,
    pid: u32,
    clock: Arc<Clock>,
    connect: F,
) -> anyhow::Result<(Measured, watch::Sender<bool>, Vec<tokio::task::JoinHandle<anyhow::Result<()>>>)>
where
    F: Fn(Arc<Clock>, watch::Receiver<bool>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_before = rss_kib(pid)?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    for _ in 0..args.viewers {
        tasks.push(tokio::spawn(connect(clock.clone(), stop_rx.clone())));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Warm-up: every viewer connected and receiving.
    tokio::time::sleep(Duration::from_secs(4)).await;
    if let Some(failed) = tasks.iter().find(|t| t.is_finished()) {
        let _ = failed;
        bail!("a viewer failed to connect");
    }
    let received_before = clock.received.load(std::sync::atomic::Ordering::Relaxed);
    clock.samples_us.lock().unwrap().clear();
    clock.measuring.store(true, std::sync::atomic::Ordering::Relaxed);
    let cpu_before = cpu_seconds(pid)?;
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    let cpu = cpu_seconds(pid)? - cpu_before;
    let elapsed = t0.elapsed().as_secs_f64();
    clock.measuring.store(false, std::sync::atomic::Ordering::Relaxed);
    let received = clock.received.load(std::sync::atomic::Ordering::Relaxed) - received_before;
    let rss_after = rss_kib(pid)?;
    let mut samples = clock.samples_us.lock().unwrap().clone();
    samples.sort_unstable();
    let n = args.viewers.max(1) as f64;
    Ok((
        Measured {
            cpu_per_viewer: cpu / elapsed / n,
            rss_per_viewer_kib: (rss_after - rss_before) / n,
            p50_ms: percentile(&samples, 0.5),
            p99_ms: percentile(&samples, 0.99),
            packets_per_second: received as f64 / elapsed,
            internal: None,
        },
        stop_tx,
        tasks,
    ))
}

async fn bench_pylon(args: &Args, rec: Arc<Recording>, dir: &Path) -> anyhow::Result<Measured> {
    let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let quic: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let mut relay = tokio::process::Command::new(sibling_binary("pylon-relay")?)
        .args(["--http-addr", &http.to_string(), "--webrtc-addr", "127.0.0.1:0", "--quic-addr", &quic.to_string()])
        .arg("--data-dir")
        .arg(dir.join("relay"))
        .env("RUST_LOG", "warn")
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting pylon-relay")?;
    let pid = relay.id().ok_or_else(|| anyhow!("relay exited"))?;
    let cert = dir.join("relay/relay-cert.der");
    for _ in 0..100 {
        if cert.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The feeder: a render node replaying the recording over QUIC, on its own thread and
    // runtime (with its QUIC endpoint), so its sends do not wait behind the viewers' work.
    let clock = Arc::new(Clock::default());
    let (feed_stop, feed_rx) = watch::channel(false);
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<anyhow::Result<()>>();
    let feed = {
        let clock = clock.clone();
        feeder_thread(async move {
            let setup = async {
                let endpoint = pylon_server::uplink::endpoint("127.0.0.1:0".parse()?)?;
                let conn =
                    endpoint.connect_with(pylon_server::uplink::client_config(&cert)?, quic, "pylon-relay")?.await?;
                // The node's side of the link: an anonymous hello (the relay runs alone, on
                // loopback), then media once the relay welcomes it.
                let mut exporter = [0u8; link::EXPORTER_LEN];
                conn.export_keying_material(&mut exporter, link::EXPORTER_LABEL, b"")
                    .map_err(|_| anyhow!("no TLS exporter"))?;
                let stream = StreamHello {
                    width: 1280,
                    height: 720,
                    fps: 60,
                    profile_level_id: PROFILE_LEVEL_ID,
                    encoder: "recording".into(),
                    node: String::new(),
                };
                let config = NodeConfig { stream, identity: None, bitrate_bounds: None };
                let mut node = NodeSide::new(config, PlayerGate::open(), &exporter, std::time::Instant::now(), 0);
                let (mut send, mut recv) = conn.open_bi().await?;
                send.write_all(&node.poll_transmit().unwrap_or_default()).await?;
                let mut buf = vec![0u8; 4096];
                while !node.is_established() {
                    let n = recv.read(&mut buf).await?.ok_or_else(|| anyhow!("the relay closed the link"))?;
                    node.handle_control(std::time::Instant::now(), &buf[..n])?;
                }
                tokio::spawn(async move { while let Ok(Some(_)) = recv.read_chunk(65536, true).await {} });
                anyhow::Ok((endpoint, conn, send))
            };
            let (_endpoint, conn, _send) = match setup.await {
                Ok(c) => {
                    let _ = ready_tx.send(Ok(()));
                    c
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return Ok(());
                }
            };
            let sender = conn.clone();
            let result = replay(rec, clock, feed_rx, move |rtp| {
                let mut d = Vec::with_capacity(rtp.len() + 1);
                framing::encode_datagram(DatagramKind::VideoRtp, rtp, &mut d);
                let _ = sender.send_datagram(d.into());
                Ok(())
            })
            .await;
            conn.close(0u32.into(), b"bench done");
            result
        })
    };
    ready_rx.await.map_err(|_| anyhow!("feeder thread ended"))??;
    eprintln!("pylon-relay: {} viewers…", args.viewers);
    // The relay's own forwarding delay, from its histogram over the measured window.
    let window_start = {
        let clock = clock.clone();
        tokio::spawn(async move {
            while !clock.measuring.load(std::sync::atomic::Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            buckets(http, FORWARD).await
        })
    };
    let (mut m, stop, tasks) =
        measure(args, pid, clock.clone(), move |clock, stop| pylon_viewer(http, None, clock.timer(), stop)).await?;
    let (before, after) = (window_start.await?, buckets(http, FORWARD).await);
    let delta = bucket_delta(&before, &after);
    m.internal = Some((bucket_quantile(&delta, 0.5), bucket_quantile(&delta, 0.99)));
    eprintln!("pylon-relay: {m:?}");
    if args.soak_seconds > 0 {
        eprintln!("soaking {} s…", args.soak_seconds);
        let base = rss_kib(pid)?;
        let mut max_growth: f64 = 0.0;
        let end = Instant::now() + Duration::from_secs(args.soak_seconds);
        while Instant::now() < end {
            tokio::time::sleep(Duration::from_secs(10)).await;
            max_growth = max_growth.max(rss_kib(pid)? - base);
        }
        eprintln!("soak: RSS {base} KiB after warm-up, at most {max_growth:+.0} KiB more over {} s", args.soak_seconds);
    }
    let _ = stop.send(true);
    for t in tasks {
        let _ = t.await;
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while metric(http, "pylon_relay_viewers").await > 0.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "after the viewers left: {} viewers, RSS {} KiB",
        metric(http, "pylon_relay_viewers").await,
        rss_kib(pid)?
    );
    let _ = feed_stop.send(true);
    let _ = tokio::task::spawn_blocking(move || feed.join()).await;
    let _ = relay.kill().await;
    Ok(m)
}

fn janus_config(dir: &Path, http_port: u16, rtp_port: u16) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let lib = "/usr/lib/x86_64-linux-gnu/janus";
    std::fs::write(
        dir.join("janus.jcfg"),
        format!(
            r#"general: {{
	configs_folder = "{d}"
	plugins_folder = "{lib}/plugins"
	transports_folder = "{lib}/transports"
	events_folder = "{lib}/events"
	loggers_folder = "{lib}/loggers"
	debug_level = 2
	session_timeout = 120
}}
media: {{
	rtp_port_range = "30000-40000"
}}
nat: {{
	ice_enforce_list = "lo"
}}
plugins: {{
	disable = "libjanus_audiobridge.so,libjanus_duktape.so,libjanus_echotest.so,libjanus_lua.so,libjanus_nosip.so,libjanus_recordplay.so,libjanus_sip.so,libjanus_textroom.so,libjanus_videocall.so,libjanus_videoroom.so,libjanus_voicemail.so"
}}
transports: {{
	disable = "libjanus_websockets.so,libjanus_mqtt.so,libjanus_nanomsg.so,libjanus_pfunix.so,libjanus_rabbitmq.so"
}}
loggers: {{
	disable = "libjanus_jsonlog.so"
}}
"#,
            d = dir.display()
        ),
    )?;
    std::fs::write(
        dir.join("janus.transport.http.jcfg"),
        format!(
            "general: {{\n\tjson = \"compact\"\n\tbase_path = \"/janus\"\n\thttp = true\n\tport = {http_port}\n\tip = \"127.0.0.1\"\n\thttps = false\n}}\nadmin: {{\n\tadmin_http = false\n}}\n"
        ),
    )?;
    std::fs::write(
        dir.join("janus.plugin.streaming.jcfg"),
        format!(
            "general: {{\n}}\npylon: {{\n\ttype = \"rtp\"\n\tid = 1\n\tdescription = \"Pylon bench\"\n\tmedia = (\n\t\t{{\n\t\t\ttype = \"video\"\n\t\t\tmid = \"v\"\n\t\t\tport = {rtp_port}\n\t\t\tpt = 108\n\t\t\tcodec = \"h264\"\n\t\t\tfmtp = \"profile-level-id=42e01f;packetization-mode=1\"\n\t\t}}\n\t)\n}}\n"
        ),
    )?;
    Ok(())
}

async fn bench_janus(args: &Args, rec: Arc<Recording>, dir: &Path) -> anyhow::Result<Measured> {
    let (http_port, rtp_port) = (free_port(), 5004 + (free_port() % 1000) * 2);
    let conf = dir.join("janus");
    janus_config(&conf, http_port, rtp_port)?;
    let mut janus = tokio::process::Command::new("janus")
        .args(["-F"])
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting janus (apt-get install janus)")?;
    let pid = janus.id().ok_or_else(|| anyhow!("janus exited"))?;
    let base = format!("http://127.0.0.1:{http_port}/janus");
    for _ in 0..100 {
        if reqwest::Client::new().get(format!("{base}/info")).send().await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let feeder = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let target: SocketAddr = format!("127.0.0.1:{rtp_port}").parse()?;
    let clock = Arc::new(Clock::default());
    let (feed_stop, feed_rx) = watch::channel(false);
    let feed = feeder_thread(replay(rec, clock.clone(), feed_rx, move |rtp| {
        let _ = feeder.send_to(rtp, target);
        Ok(())
    }));
    eprintln!("janus: {} viewers…", args.viewers);
    let (m, stop, tasks) =
        measure(args, pid, clock, move |clock, stop| janus_viewer(base.clone(), clock, stop)).await?;
    eprintln!("janus: {m:?}");
    let _ = stop.send(true);
    for t in tasks {
        let _ = t.await;
    }
    let _ = feed_stop.send(true);
    let _ = tokio::task::spawn_blocking(move || feed.join()).await;
    let _ = janus.kill().await;
    Ok(m)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = std::env::temp_dir().join(format!("pylon-relay-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let rec = Arc::new(record(&args).await?);
    let pylon = bench_pylon(&args, rec.clone(), &dir).await?;
    let janus = if args.no_janus { None } else { Some(bench_janus(&args, rec, &dir).await?) };
    let _ = std::fs::remove_dir_all(&dir);
    let mut out = serde_json::json!({
        "viewers": args.viewers,
        "seconds": args.seconds,
        "pylon_cpu_per_viewer": pylon.cpu_per_viewer,
        "pylon_rss_per_viewer_kib": pylon.rss_per_viewer_kib,
        "pylon_added_latency_p50_ms": pylon.p50_ms,
        "pylon_added_latency_p99_ms": pylon.p99_ms,
        "pylon_packets_per_second_to_viewers": pylon.packets_per_second,
        "pylon_ingest_to_egress_p50_ms": pylon.internal.map(|i| i.0),
        "pylon_ingest_to_egress_p99_ms": pylon.internal.map(|i| i.1),
        "pylon_forwarded_packets_per_core_second": pylon.packets_per_second / (pylon.cpu_per_viewer * args.viewers as f64),
    });
    if let Some(j) = janus {
        out["janus_cpu_per_viewer"] = j.cpu_per_viewer.into();
        out["janus_rss_per_viewer_kib"] = j.rss_per_viewer_kib.into();
        out["janus_added_latency_p50_ms"] = j.p50_ms.into();
        out["janus_added_latency_p99_ms"] = j.p99_ms.into();
        out["janus_packets_per_second_to_viewers"] = j.packets_per_second.into();
        out["cpu_per_viewer_ratio_vs_janus"] = (pylon.cpu_per_viewer / j.cpu_per_viewer).into();
    }
    println!("{out}");
    Ok(())
}
