//! `pylon-indexer`: the Pylon control plane.

use anyhow::Context;
use clap::Parser;
use pylon_indexer::IndexerConfig;
use pylon_indexer::api::Policy;
use pylon_indexer::limit::Rate;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Pylon indexer: registers render nodes and relays, lists titles, matches players to the
/// best node and nearest relay, and signs their session tokens.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Args {
    /// HTTP address of the API.
    #[arg(long, env = "PYLON_INDEXER_ADDR", default_value = "127.0.0.1:8090")]
    addr: SocketAddr,
    /// Directory for the signing key and the SQLite database.
    #[arg(long, env = "PYLON_DATA_DIR", default_value = ".pylon/indexer")]
    data_dir: PathBuf,
    /// Database URL; PostgreSQL when it names one (postgres://…). Default: SQLite in the
    /// data directory.
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
    /// File holding the bearer token for administrative calls (titles, revocation,
    /// approval); or set PYLON_ADMIN_TOKEN in the environment. Never on the command line,
    /// where every user of the machine can read it. Without either those calls are refused.
    #[arg(long, env = "PYLON_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
    /// File holding the bearer token studios deploy titles with (POST/DELETE
    /// /api/v1/titles); or set PYLON_STUDIO_TOKEN. Without either only the admin may.
    #[arg(long, env = "PYLON_STUDIO_TOKEN_FILE")]
    studio_token_file: Option<PathBuf>,
    /// New render nodes and relays wait for the operator's approval
    /// (POST /api/v1/nodes/{id}/approve, /relays/{id}/approve) before they are used. By
    /// default the pool is open.
    #[arg(long, env = "PYLON_APPROVE_NEW")]
    approve_new: bool,
    /// Session requests one client address may make per minute (a burst of half as many
    /// at once).
    #[arg(long, env = "PYLON_SESSIONS_PER_ADDRESS", default_value_t = 10.0)]
    sessions_per_address: f64,
    /// Session requests per minute for one title, all callers together.
    #[arg(long, env = "PYLON_SESSIONS_PER_TITLE", default_value_t = 1200.0)]
    sessions_per_title: f64,
    /// Connections one client address may hold open to the API.
    #[arg(long, env = "PYLON_CONNECTIONS_PER_ADDRESS", default_value_t = 64)]
    connections_per_address: usize,
    /// Seconds between checks of each ready node by the pool's checkers, on average (each
    /// node's next check is spread ±25 % around it; a suspect node is checked again at
    /// once). Checks run on free seats only.
    #[arg(long, env = "PYLON_CHECK_INTERVAL", default_value_t = 60, value_parser = clap::value_parser!(i64).range(1..=86_400))]
    check_interval: i64,
    /// Register the built-in demo title ("Pylon Asteroids", id `demo`) on start.
    #[arg(long)]
    demo_title: bool,
    /// Several replicas serve this pool (one database, one signing key: the same
    /// indexer-key file in each --data-dir): the public base URL of every replica, this
    /// one's included, comma-separated or the flag repeated. The catalog page fails over
    /// through them, and pages from these origins may call this API.
    #[arg(long, env = "PYLON_REPLICA_URLS", value_delimiter = ',', num_args = 1..)]
    replica_url: Vec<String>,
}

/// A token: from the file named, or from environment variable `var`.
fn token(file: Option<&std::path::Path>, var: &str) -> anyhow::Result<String> {
    match file {
        Some(path) => Ok(std::fs::read_to_string(path)
            .with_context(|| format!("reading the token file {}", path.display()))?
            .trim()
            .to_string()),
        None => Ok(std::env::var(var).unwrap_or_default()),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    pylon_runtime::init_tracing("info,sqlx=warn");
    let args = Args::parse();
    let config = IndexerConfig {
        addr: args.addr,
        data_dir: args.data_dir,
        database_url: args.database_url,
        admin_token: token(args.admin_token_file.as_deref(), "PYLON_ADMIN_TOKEN")?,
        studio_token: token(args.studio_token_file.as_deref(), "PYLON_STUDIO_TOKEN")?,
        policy: Policy {
            approve_new: args.approve_new,
            sessions_per_address: Rate::new(args.sessions_per_address, (args.sessions_per_address / 2.0).max(1.0)),
            sessions_per_title: Rate::new(args.sessions_per_title, (args.sessions_per_title / 6.0).max(1.0)),
            check_interval_secs: args.check_interval,
            ..Policy::default()
        },
        connections_per_address: args.connections_per_address,
        demo_title: args.demo_title,
        replicas: args.replica_url,
    };
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        pylon_runtime::shutdown_signal().await;
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
    });
    pylon_indexer::run(config, stop, None).await
}
