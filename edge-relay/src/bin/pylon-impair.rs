//! `pylon-impair`: a UDP impairment proxy for testing a link without `netem`.

use clap::Parser;
use pylon_proto::impair::LossModel;
use pylon_relay::impair::{ImpairConfig, start};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::watch;

/// Pylon impairment proxy: forwards UDP from --listen to --target and back, losing,
/// delaying, jittering, reordering and rate-limiting datagrams, reproducibly (--seed).
///
/// To test how your players would fare behind a bad link, start the relay with
/// `--advertise-addr` set to this proxy's --listen address and --target set to the
/// relay's --webrtc-addr: every browser then reaches the relay through the proxy.
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Args {
    /// Address clients send to.
    #[arg(long)]
    listen: SocketAddr,
    /// Address datagrams are forwarded to (e.g. the relay's --webrtc-addr).
    #[arg(long)]
    target: SocketAddr,
    /// Random loss, percent (each datagram independently).
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Bursty loss instead (Gilbert–Elliott), average percent; see --burst.
    #[arg(long, conflicts_with = "loss")]
    bursty_loss: Option<f64>,
    /// Mean burst length of --bursty-loss, datagrams.
    #[arg(long, default_value_t = 3.0)]
    burst: f64,
    /// One-way delay added, ms.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Extra delay, uniform in 0..JITTER ms (order kept).
    #[arg(long, default_value_t = 0)]
    jitter_ms: u64,
    /// Percent of datagrams overtaken by later ones.
    #[arg(long, default_value_t = 0.0)]
    reorder: f64,
    /// Bandwidth cap per direction, kbit/s (0: none). Excess queues up to 100 ms, then drops.
    #[arg(long, default_value_t = 0)]
    rate_kbps: u64,
    /// Seed of the random streams: the same seed, the same losses.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_writer(std::io::stderr).init();
    let args = Args::parse();
    let loss = match args.bursty_loss {
        Some(avg) => LossModel::bursty(avg / 100.0, args.burst),
        None if args.loss > 0.0 => LossModel::Random(args.loss / 100.0),
        None => LossModel::None,
    };
    let config = ImpairConfig {
        loss,
        delay: Duration::from_millis(args.delay_ms),
        jitter: Duration::from_millis(args.jitter_ms),
        reorder: args.reorder / 100.0,
        rate_bps: (args.rate_kbps > 0).then_some(args.rate_kbps * 1000),
        seed: args.seed,
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let proxy = start(args.listen, args.target, config.clone(), stop_rx).await?;
    tracing::info!(listen = %proxy.listen, target = %args.target, ?config, "impairing");
    let mut report = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = report.tick() => {
                let s = &proxy.stats;
                tracing::info!(
                    received = s.received.load(Ordering::Relaxed),
                    lost = s.lost.load(Ordering::Relaxed),
                    over_cap = s.overflow.load(Ordering::Relaxed),
                    delivered = s.delivered.load(Ordering::Relaxed),
                    "datagrams"
                );
            }
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    let _ = stop_tx.send(true);
    Ok(())
}
