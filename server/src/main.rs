//! `pylon-server`: the Pylon render node.

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use pylon_indexer_client::api::RegisterNode;
use pylon_indexer_client::api::Title;
use pylon_server::encode::{EncoderChoice, EncoderConfig, PROFILE_LEVEL_ID, VideoEncoder};
use pylon_server::metrics::ServerMetrics;
use pylon_server::pipeline::{Pipeline, PipelineConfig};
use pylon_server::pool::{self, SessionGate};
use pylon_server::titles::{TitleCatalog, TitleRunnerConfig, TitleRunnerLinks};
use pylon_server::uplink::{self, BitrateControl, RelayTrust, SessionLink, UplinkConfig};
use pylon_title::sandbox::SandboxConfig;
use std::net::SocketAddr;
use std::path::PathBuf;
use tokio::sync::{mpsc, watch};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Pacing {
    /// Frames on the clock, plus an early frame when input arrives.
    Input,
    /// Frames on the clock only.
    Strict,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum EncoderArg {
    /// Probe h264_nvenc, fall back to libx264.
    Auto,
    /// NVIDIA NVENC only (fails without an NVENC-capable GPU and driver).
    Nvenc,
    /// libx264 on the CPU only.
    X264,
}

/// Pylon render node: renders the demo title with Vulkan, encodes H.264 and streams it
/// over QUIC to an edge relay, which serves it to browsers over WebRTC.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Args {
    /// QUIC ingest address of the edge relay, outside a pool. In a pool (--indexer) the
    /// node links to every ready relay the indexer lists, at the address each registered.
    #[arg(long, env = "PYLON_RELAY", default_value = "127.0.0.1:4433")]
    relay: SocketAddr,
    /// The relay's certificate (DER), trusted alone. The relay writes it to `<its data
    /// dir>/relay-cert.der`. In a pool (--indexer) it is not needed: the node trusts any
    /// relay of the pool by the certificate SHA-256 the relay registered with the indexer.
    /// Outside a pool the default is .pylon/relay/relay-cert.der.
    #[arg(long, env = "PYLON_RELAY_CERT")]
    relay_cert: Option<PathBuf>,
    /// Name the relay's certificate is issued to.
    #[arg(long, env = "PYLON_RELAY_NAME", default_value = "pylon-relay")]
    relay_name: String,
    /// Picture size, WIDTHxHEIGHT (width a multiple of 4, height a multiple of 2).
    #[arg(long, env = "PYLON_SIZE", default_value = "1280x720", value_parser = parse_size)]
    size: (u32, u32),
    /// Frames per second.
    #[arg(long, env = "PYLON_FPS", default_value_t = 60, value_parser = clap::value_parser!(u32).range(1..=240))]
    fps: u32,
    /// Use the Vulkan device whose name contains this text (case-insensitive) instead of
    /// the probed best one (discrete GPU, then integrated, then the CPU renderer).
    #[arg(long, env = "PYLON_GPU")]
    gpu: Option<String>,
    /// List the Vulkan devices and exit.
    #[arg(long)]
    list_gpus: bool,
    /// Which H.264 encoder to use.
    #[arg(long, env = "PYLON_ENCODER", value_enum, default_value = "auto")]
    encoder: EncoderArg,
    /// Starting and highest video bitrate in kbit/s; the relay lowers it to what the
    /// player's network carries (congestion feedback) and raises it back when it can.
    #[arg(long, env = "PYLON_BITRATE_KBPS", default_value_t = 6000)]
    bitrate_kbps: u64,
    /// Lowest video bitrate in kbit/s the relay may ask for.
    #[arg(long, env = "PYLON_MIN_BITRATE_KBPS", default_value_t = 800)]
    min_bitrate_kbps: u64,
    /// Force a keyframe at least every this many seconds (0: only when a viewer asks).
    #[arg(long, env = "PYLON_KEYFRAME_SECONDS", default_value_t = 10)]
    keyframe_seconds: u32,
    /// Frames that may be on the GPU at once (the readback ring size).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=8))]
    ring_slots: u32,
    /// Largest RTP packet in bytes, header included (must fit a QUIC datagram and the
    /// viewers' path MTU after the relay adds its headers).
    #[arg(long, default_value_t = 1200, value_parser = clap::value_parser!(u32).range(200..=1300))]
    max_rtp_packet: u32,
    /// Frame pacing: `input` starts a frame as soon as player input arrives (at least half
    /// a frame interval after the previous one), `strict` renders only on the frame clock.
    #[arg(long, env = "PYLON_PACING", value_enum, default_value = "input")]
    pacing: Pacing,
    /// Address of the Prometheus `/metrics` endpoint.
    #[arg(long, env = "PYLON_METRICS_ADDR", default_value = "127.0.0.1:9100")]
    metrics_addr: SocketAddr,
    /// Join the pool of the indexer at this URL (e.g. http://127.0.0.1:8090): register,
    /// heartbeat, and admit players only with a session token it signed. Several replicas
    /// of one indexer: their URLs comma-separated (or the flag repeated), tried in order,
    /// failing over to the next when one cannot be reached. Without it the node streams to
    /// its relay alone and any player there may play.
    #[arg(long, env = "PYLON_INDEXER", value_delimiter = ',', num_args = 1..)]
    indexer: Vec<String>,
    /// Directory for the node's identity key (created on first start).
    #[arg(long, env = "PYLON_DATA_DIR", default_value = ".pylon/node")]
    data_dir: PathBuf,
    /// The node's id in the pool (default: `node-` and the start of its public key).
    #[arg(long, env = "PYLON_NODE_ID")]
    node_id: Option<String>,
    /// Provider account the node's sessions are metered to.
    #[arg(long, env = "PYLON_PROVIDER", default_value = "local")]
    provider: String,
    /// Region name shown to the indexer.
    #[arg(long, env = "PYLON_REGION", default_value = "local")]
    region: String,
    /// Most relays of the pool the node keeps links to: those its sessions were matched to
    /// first, then those in its --region, then the rest as the indexer lists them.
    #[arg(long, env = "PYLON_MAX_RELAY_LINKS", default_value_t = pylon_server::uplink::MAX_LINKS,
        value_parser = clap::value_parser!(usize))]
    max_relay_links: usize,
    /// Latitude,longitude of the node, e.g. 48.85,2.35.
    #[arg(long, env = "PYLON_COORDS", default_value = "0,0", value_parser = parse_coords)]
    coords: (f64, f64),
    /// Price per GPU-hour asked.
    #[arg(long, env = "PYLON_PRICE_PER_HOUR", default_value_t = 0.0)]
    price_per_hour: f64,
    /// GPU class advertised (0: CPU renderer, 1: integrated, 2: discrete; titles state the
    /// least they need). Default: from the Vulkan device.
    #[arg(long, env = "PYLON_GPU_CLASS")]
    gpu_class: Option<u8>,
    /// On SIGTERM in a pool, how long to wait for the running session to end after
    /// draining (a second signal stops at once).
    #[arg(long, env = "PYLON_DRAIN_SECONDS", default_value_t = 600)]
    drain_seconds: u64,
    /// A studio title's launch spec (a JSON file in the indexer's Title format), for a
    /// node outside a pool or a title not yet in the catalog; repeatable. In a pool the
    /// node also reads the catalog's specs and offers those whose program it has.
    #[arg(long = "title-spec", env = "PYLON_TITLE_SPECS", value_delimiter = ',')]
    title_specs: Vec<PathBuf>,
    /// Outside a pool, the title every player session runs (default: the built-in demo).
    #[arg(long, env = "PYLON_DEFAULT_TITLE")]
    default_title: Option<String>,
    /// Where session sandboxes (their home, runtime directory, X authority, logs) live;
    /// default: `pylon-sessions` in the temporary directory (titles run as an unprivileged
    /// user under root, so it must be reachable by that user).
    #[arg(long, env = "PYLON_SESSIONS_DIR")]
    sessions_dir: Option<PathBuf>,
    /// A studio title that shows no picture within this many seconds ends its session.
    #[arg(long, env = "PYLON_TITLE_START_SECONDS", default_value_t = 30)]
    title_start_seconds: u64,
    /// Stream no sound: no audio pipeline, and titles get no PulseAudio server.
    #[arg(long, env = "PYLON_NO_AUDIO")]
    no_audio: bool,
}

fn parse_coords(s: &str) -> Result<(f64, f64), String> {
    let (lat, lon) = s.split_once(',').ok_or("expected LAT,LON, e.g. 48.85,2.35")?;
    let lat: f64 = lat.trim().parse().map_err(|_| format!("bad latitude {lat:?}"))?;
    let lon: f64 = lon.trim().parse().map_err(|_| format!("bad longitude {lon:?}"))?;
    if !(-90.0..=90.0).contains(&lat) || !(-180.0..=180.0).contains(&lon) {
        return Err(format!("{lat},{lon} is not a place on Earth"));
    }
    Ok((lat, lon))
}

fn parse_size(s: &str) -> Result<(u32, u32), String> {
    let (w, h) = s.split_once(['x', 'X']).ok_or("expected WIDTHxHEIGHT, e.g. 1280x720")?;
    let w: u32 = w.trim().parse().map_err(|_| format!("bad width {w:?}"))?;
    let h: u32 = h.trim().parse().map_err(|_| format!("bad height {h:?}"))?;
    if w == 0 || h == 0 || !w.is_multiple_of(4) || !h.is_multiple_of(2) || w > 7680 || h > 4320 {
        return Err(format!("{w}x{h}: width must be a multiple of 4, height a multiple of 2, at most 7680x4320"));
    }
    Ok((w, h))
}

fn main() -> anyhow::Result<()> {
    pylon_runtime::init_tracing("info,quinn=warn");
    let args = Args::parse();
    if args.list_gpus {
        for d in pylon_gpu::list_devices()? {
            println!("{} ({}, Vulkan {})", d.name, d.kind.describe(), d.api_version);
        }
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let (width, height) = args.size;
    // Fail now, not after the GPU and encoder are up, if the relay cannot be trusted.
    let relay_cert = match (&args.relay_cert, args.indexer.is_empty()) {
        (Some(path), _) => Some(path.clone()),
        (None, true) => Some(PathBuf::from(".pylon/relay/relay-cert.der")),
        (None, false) => None,
    };
    if let Some(path) = &relay_cert {
        std::fs::metadata(path).with_context(|| {
            format!(
                "cannot read the relay certificate {} (the relay writes relay-cert.der into its --data-dir on start)",
                path.display()
            )
        })?;
    }
    // The pool identity, before the GPU: a node that cannot join should say so at once.
    let pool = match args.indexer.is_empty() {
        false => {
            let key = pylon_indexer_client::keys::load_or_create(&args.data_dir, "node-key")
                .context("loading the node's identity key")?;
            let id = args.node_id.clone().unwrap_or_else(|| {
                let pk = pylon_indexer_client::encode_key(&key.verifying_key());
                format!(
                    "node-{}",
                    pk.chars().filter(char::is_ascii_alphanumeric).take(10).collect::<String>().to_lowercase()
                )
            });
            let client = pylon_indexer_client::Client::with_replicas(&args.indexer, key.clone())
                .context("creating the indexer client")?;
            Some((client, id, key))
        }
        true => None,
    };
    let gate = match &pool {
        Some((_, id, _)) => SessionGate::pooled(id),
        None => SessionGate::open(),
    };
    // The titles this node knows: the built-in demo, spec files, the pool's catalog.
    let mut catalog = TitleCatalog::new([Title::builtin_demo()]);
    for path in &args.title_specs {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading title spec {}", path.display()))?;
        let title: Title =
            serde_json::from_str(&text).with_context(|| format!("title spec {} is not a Title", path.display()))?;
        if let Err(why) = title.validate() {
            bail!("title spec {}: {why}", path.display());
        }
        catalog.insert(title);
    }
    if let Some((client, _, _)) = &pool {
        match client.titles().await {
            Ok(titles) => titles.into_iter().for_each(|t| catalog.insert(t)),
            Err(e) => tracing::warn!("cannot read the catalog's titles yet ({e}); offering the local ones"),
        }
    }
    let metrics = ServerMetrics::new();
    let metrics_task = tokio::spawn(pylon_server::metrics::serve(args.metrics_addr, metrics.clone()));
    let (packet_tx, packet_rx) = mpsc::channel(4096);
    let encoder_config = EncoderConfig {
        width,
        height,
        fps: args.fps,
        bitrate: args.bitrate_kbps * 1000,
        keyframe_interval: args.keyframe_seconds * args.fps,
        choice: match args.encoder {
            EncoderArg::Auto => EncoderChoice::Auto,
            EncoderArg::Nvenc => EncoderChoice::Nvenc,
            EncoderArg::X264 => EncoderChoice::X264,
        },
    };
    let config = PipelineConfig {
        width,
        height,
        fps: args.fps,
        gpu: args.gpu.clone(),
        slots: args.ring_slots as usize,
        encoder: encoder_config.clone(),
        max_rtp_packet: args.max_rtp_packet as usize,
        seed: 0x5eed,
        early_frames: args.pacing == Pacing::Input,
        audio: !args.no_audio,
        fake: None,
    };
    let pipeline = tokio::task::spawn_blocking({
        let metrics = metrics.clone();
        move || Pipeline::start(config, metrics, packet_tx)
    })
    .await?
    .context("starting the frame path")?;
    let info = pipeline.info().clone();
    tracing::info!(gpu = %info.gpu_name, "Vulkan device: {}", info.gpu_reason);
    tracing::info!(encoder = info.encoder, "encoder probe: {}", info.encoder_probe.join("; "));
    tracing::info!("rendering the demo title at {width}x{height}, {} fps, {} kbit/s", args.fps, args.bitrate_kbps);

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let hello = pylon_proto::framing::StreamHello {
        width: u16::try_from(width)?,
        height: u16::try_from(height)?,
        fps: u16::try_from(args.fps)?,
        profile_level_id: PROFILE_LEVEL_ID,
        encoder: info.encoder.to_string(),
        node: gate.node().unwrap_or_default().to_string(),
    };
    let mut membership = match &pool {
        Some((client, id, _)) => {
            let encoders = EncoderConfig { width, height, fps: args.fps, ..encoder_config.clone() };
            let registration = RegisterNode {
                id: id.clone(),
                provider: args.provider.clone(),
                public_key: client.public_key(),
                gpu_model: info.gpu_name.clone(),
                gpu_memory_mb: info.gpu_memory_mb,
                vulkan_device: info.gpu_name.clone(),
                encoders: tokio::task::spawn_blocking(move || VideoEncoder::available(&encoders)).await?,
                capacity: 1,
                region: args.region.clone(),
                lat: args.coords.0,
                lon: args.coords.1,
                price_per_hour: args.price_per_hour,
                gpu_class: args.gpu_class.unwrap_or(info.gpu_class),
                titles: catalog.installed(args.gpu_class.unwrap_or(info.gpu_class)),
            };
            tracing::info!(node = %id, encoders = ?registration.encoders, "joining the pool");
            tokio::spawn(pool::run_membership(client.clone(), registration, gate.clone(), shutdown_rx.clone()))
        }
        None => tokio::spawn(std::future::pending()),
    };
    let uplink_config = UplinkConfig {
        relay: args.relay,
        trust: match (relay_cert, &pool) {
            (Some(path), _) => RelayTrust::File(path),
            (None, Some((client, _, _))) => RelayTrust::Pool {
                indexer: client.clone(),
                region: args.region.clone(),
                max_links: args.max_relay_links,
            },
            (None, None) => anyhow::bail!("outside a pool the node needs --relay-cert"),
        },
        server_name: args.relay_name,
        hello,
        bitrate: Some(BitrateControl {
            target: pipeline.bitrate_target(),
            min: args.min_bitrate_kbps.min(args.bitrate_kbps) * 1000,
            max: args.bitrate_kbps * 1000,
        }),
        identity: pool.as_ref().map(|(_, _, key)| key.clone()),
        gpu: args.gpu.clone(),
    };
    let (signal_tx, signal_rx) = mpsc::unbounded_channel();
    let (command_tx, command_rx) = mpsc::unbounded_channel();
    let titles = tokio::spawn(pylon_server::titles::run(
        TitleRunnerConfig {
            sandbox: {
                let mut sandbox = SandboxConfig::new(
                    args.sessions_dir.clone().unwrap_or_else(|| std::env::temp_dir().join("pylon-sessions")),
                );
                if args.no_audio {
                    sandbox.pulseaudio = None;
                }
                sandbox
            },
            first_frame_deadline: std::time::Duration::from_secs(args.title_start_seconds),
            video: (width, height),
            default_title: args.default_title.clone(),
            rest_between_sessions: gate.node().is_some(),
        },
        catalog,
        TitleRunnerLinks {
            signals: signal_rx,
            commands: command_tx,
            source: pipeline.source_sender(),
            indexer: pool.as_ref().map(|(client, _, _)| client.clone()),
        },
        metrics.clone(),
        shutdown_rx.clone(),
    ));
    let mut uplink = tokio::spawn(uplink::run(
        uplink_config,
        packet_rx,
        pipeline.keyframe_flag(),
        pipeline.input_sender(),
        gate.clone(),
        metrics,
        Some(SessionLink { signals: signal_tx, commands: command_rx }),
        shutdown_rx,
    ));
    tokio::select! {
        _ = pylon_runtime::shutdown_signal() => {
            if let Some((client, id, _)) = &pool {
                // Drain: no new players; the running one may finish (a second signal stops now).
                tokio::select! {
                    finished = pool::drain(client, id, &gate, std::time::Duration::from_secs(args.drain_seconds)) => {
                        if !finished {
                            tracing::warn!("the session did not end within --drain-seconds; stopping anyway");
                        }
                    }
                    _ = pylon_runtime::shutdown_signal() => tracing::warn!("second signal: stopping without waiting"),
                }
            }
            tracing::info!("shutting down");
        }
        r = &mut membership => {
            r?.context("the indexer refused this node")?;
        }
        r = metrics_task => {
            r?.context("the metrics endpoint failed")?;
        }
        r = &mut uplink => {
            // The uplink only returns on its own when it cannot work at all.
            return r?.context("the relay connection failed");
        }
    }
    let _ = shutdown_tx.send(true);
    // The running title's sandbox is removed before the process ends.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), titles).await;
    drop(pipeline);
    match tokio::time::timeout(std::time::Duration::from_secs(3), uplink).await {
        Ok(r) => r??,
        Err(_) => bail!("the relay connection did not close in time"),
    }
    Ok(())
}
