use clap::Parser;
use pylon_checker::{Advertised, CheckConfig};
use std::time::Duration;

/// Plays a render node through its relay like a player would (WebRTC on webrtc-rs, H.264
/// decoded with FFmpeg) and checks that the stream is live at the size and frame rate the
/// node advertises and, for the built-in demo, that it answers input as the demo must.
/// Prints the report as JSON; exits 0 when the check passed, 1 when it failed, 2 when it
/// could not be made.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// The relay's page URL for the session: `http://relay:8080/` alone, or
    /// `http://relay/play/<session>` in a pool.
    #[arg(long, env = "PYLON_CHECK_RELAY")]
    relay: String,
    /// Session token (pools), as in the `#token=` part of a play link.
    #[arg(long, env = "PYLON_CHECK_TOKEN")]
    token: Option<String>,
    /// The picture size the node advertises, `WIDTHxHEIGHT`.
    #[arg(long, default_value = "1280x720", value_parser = parse_size)]
    size: (u32, u32),
    /// The frame rate the node advertises.
    #[arg(long, default_value_t = 60)]
    fps: u32,
    /// Seconds to watch after the first decoded frame.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// The node runs the built-in demo: also check that aimed turns are answered (random
    /// mouse aims and shams, judged from the decoded picture; click-to-photon p50/p95).
    #[arg(long)]
    demo: bool,
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
    let config = CheckConfig {
        relay: args.relay,
        token: args.token,
        advertised: Advertised { width: args.size.0, height: args.size.1, fps: args.fps },
        duration: Duration::from_secs_f64(args.seconds),
        demo: args.demo,
        first_frame_timeout: Duration::from_secs_f64(args.connect_timeout),
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
