use anyhow::Context;
use clap::Parser;
use pylon_checker::pool::{PoolConfig, run_pool};
use pylon_checker::{Advertised, CheckConfig};
use std::path::PathBuf;
use std::time::Duration;

/// Plays a render node through its relay like a player would (WebRTC on webrtc-rs, H.264
/// decoded with FFmpeg) and checks that the stream is live at the size and frame rate the
/// node advertises and, for the built-in demo, that it answers input as the demo must.
///
/// Two modes. With `--relay`, one check of that session: prints the report as JSON and
/// exits 0 when the check passed, 1 when it failed, 2 when it could not be made. With
/// `--indexer`, a pool's checker: registers its own key (the operator approves it with
/// `POST /api/v1/checkers/<id>/approve`), makes the checks the indexer assigns and reports
/// each outcome, signed; runs until SIGTERM (or `--checks` are done).
#[derive(Parser, Debug)]
#[command(version, group(clap::ArgGroup::new("mode").required(true).args(["relay", "indexer"])))]
struct Args {
    /// One check: the relay's page URL for the session, `http://relay:8080/` alone, or
    /// `http://relay/play/<session>` in a pool.
    #[arg(long, env = "PYLON_CHECK_RELAY")]
    relay: Option<String>,
    /// One check: the session token (pools), as in the `#token=` part of a play link.
    #[arg(long, env = "PYLON_CHECK_TOKEN")]
    token: Option<String>,
    /// One check: the picture size the node advertises, `WIDTHxHEIGHT`.
    #[arg(long, default_value = "1280x720", value_parser = parse_size)]
    size: (u32, u32),
    /// One check: the frame rate the node advertises.
    #[arg(long, default_value_t = 60)]
    fps: u32,
    /// One check: the node runs the built-in demo: also check that aimed turns are
    /// answered (random mouse aims and shams, judged from the decoded picture;
    /// click-to-photon p50/p95).
    #[arg(long)]
    demo: bool,
    /// One check of a studio title: its probe as the catalog gives it (JSON, e.g.
    /// '{"setup":["Enter"],"keys":["ArrowLeft","ArrowRight"],"hold_ms":250}'): also check
    /// that the picture tells the two keys apart (pairs of presses in random order, shams
    /// between; a sign-flip test of the pairs' agreement). Ignored with --demo.
    #[arg(long, value_parser = parse_probe)]
    probe: Option<pylon_indexer_client::api::Probe>,
    /// One check: the GPU class the node claims (0: CPU renderer, 1: integrated, 2:
    /// discrete): after watching, prove it with a matrix product sized and timed for that
    /// class (verified with Freivalds' algorithm). Without it, no capacity check.
    #[arg(long)]
    gpu_class: Option<u8>,
    /// Pool: the indexer's URL (`http://indexer:8090`); several replicas' comma-separated
    /// (or the flag repeated), tried in order, failing over when one cannot be reached.
    #[arg(long, env = "PYLON_INDEXER", value_delimiter = ',', num_args = 1..)]
    indexer: Vec<String>,
    /// Pool: this checker's id (1-64 letters, digits or ._:-).
    #[arg(long, env = "PYLON_CHECKER_ID", default_value = "checker-1")]
    id: String,
    /// Pool: who runs this checker.
    #[arg(long, env = "PYLON_CHECKER_OWNER", default_value = "operator")]
    owner: String,
    /// Pool: where the checker keeps its key (`checker-key`, made on first start).
    #[arg(long, env = "PYLON_CHECKER_DATA", default_value = "/var/lib/pylon-checker")]
    data_dir: PathBuf,
    /// Pool: stop after this many reported checks (default: run until stopped).
    #[arg(long)]
    checks: Option<u32>,
    /// Pool: address of the Prometheus `/metrics` endpoint (checks by result, their time).
    #[arg(long, env = "PYLON_CHECKER_METRICS", default_value = "127.0.0.1:9600")]
    metrics_addr: std::net::SocketAddr,
    /// Pool: seconds to wait before asking again when no node is due.
    #[arg(long, default_value_t = 5.0)]
    poll_seconds: f64,
    /// Seconds to watch after the first decoded frame.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Seconds the connection and first frame may take.
    #[arg(long, default_value_t = 20.0)]
    connect_timeout: f64,
}

fn parse_size(s: &str) -> Result<(u32, u32), String> {
    let (w, h) = s.split_once('x').ok_or_else(|| format!("{s:?}: expected WIDTHxHEIGHT"))?;
    Ok((w.parse().map_err(|e| format!("width: {e}"))?, h.parse().map_err(|e| format!("height: {e}"))?))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    pylon_runtime::init_tracing("info,webrtc=warn,webrtc_ice=warn,webrtc_dtls=warn,webrtc_sctp=warn");
    let args = Args::parse();
    if !args.indexer.is_empty() {
        let indexer = args.indexer;
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            pylon_runtime::shutdown_signal().await;
            let _ = stop.send(true);
        });
        let config = PoolConfig {
            indexer,
            id: args.id,
            owner: args.owner,
            data_dir: args.data_dir,
            checks: args.checks,
            poll: Duration::from_secs_f64(args.poll_seconds),
            watch: Duration::from_secs_f64(args.seconds),
            first_frame_timeout: Duration::from_secs_f64(args.connect_timeout),
        };
        let metrics = pylon_checker::metrics::CheckerMetrics::new();
        let listener = tokio::net::TcpListener::bind(args.metrics_addr)
            .await
            .with_context(|| format!("binding the metrics endpoint {}", args.metrics_addr))?;
        let served = tokio::spawn(pylon_checker::metrics::serve(listener, metrics.clone(), shutdown.clone()));
        let done = run_pool(config, metrics, shutdown, |r| {
            if let Ok(line) = serde_json::to_string(r) {
                println!("{line}");
            }
        })
        .await?;
        tracing::info!(checks = done, "stopped");
        served.abort();
        return Ok(());
    }
    let config = CheckConfig {
        relay: args.relay.unwrap_or_default(),
        token: args.token,
        advertised: Advertised { width: args.size.0, height: args.size.1, fps: args.fps },
        duration: Duration::from_secs_f64(args.seconds),
        demo: args.demo,
        probe: args.probe,
        first_frame_timeout: Duration::from_secs_f64(args.connect_timeout),
        gpu_class: args.gpu_class,
    };
    match pylon_checker::run(config).await {
        Ok(report) => {
            println!("{}", serde_json::to_string_pretty(&report)?);
            std::process::exit(if report.passed() { 0 } else { 1 });
        }
        Err(e) => {
            eprintln!("pylon-checker: {e}");
            std::process::exit(2);
        }
    }
}

fn parse_probe(s: &str) -> anyhow::Result<pylon_indexer_client::api::Probe> {
    let probe: pylon_indexer_client::api::Probe = serde_json::from_str(s)?;
    probe.validate().map_err(anyhow::Error::msg)?;
    Ok(probe)
}
