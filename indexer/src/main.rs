//! `pylon-indexer`: the Pylon control plane.

use anyhow::Context;
use clap::Parser;
use pylon_indexer::api::{AppState, Policy, router};
use pylon_indexer::limit::Rate;
use pylon_indexer::store::{Store, Title};
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
    let admin_token = token(args.admin_token_file.as_deref(), "PYLON_ADMIN_TOKEN")?;
    let studio_token = token(args.studio_token_file.as_deref(), "PYLON_STUDIO_TOKEN")?;
    if admin_token.is_empty() {
        tracing::warn!("no admin token (PYLON_ADMIN_TOKEN or --admin-token-file): administrative calls are refused");
    }
    std::fs::create_dir_all(&args.data_dir).with_context(|| format!("creating {}", args.data_dir.display()))?;
    let url = args
        .database_url
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}?mode=rwc", args.data_dir.join("indexer.db").display()));
    let store = Store::open(&url).await.context("opening the database")?;
    tracing::info!(backend = if url.starts_with("postgres") { "postgresql" } else { "sqlite" }, "database ready");
    if args.demo_title {
        store.put_title(&Title::builtin_demo()).await?;
    }
    let key = pylon_indexer::keys::load_or_create(&args.data_dir, "indexer-key")?;
    let policy = Policy {
        approve_new: args.approve_new,
        sessions_per_address: Rate::new(args.sessions_per_address, (args.sessions_per_address / 2.0).max(1.0)),
        sessions_per_title: Rate::new(args.sessions_per_title, (args.sessions_per_title / 6.0).max(1.0)),
        check_interval_secs: args.check_interval,
        ..Policy::default()
    };
    if policy.approve_new {
        tracing::info!("new nodes and relays wait for approval");
    }
    let state = AppState::new(store, key, admin_token, policy).with_studio_token(studio_token);
    let listener = tokio::net::TcpListener::bind(args.addr).await.with_context(|| format!("binding {}", args.addr))?;
    tracing::info!(addr = %args.addr, "indexer API at /api/v1, OpenAPI at /api/v1/openapi.json, metrics at /metrics");
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let sweeper = tokio::spawn(pylon_indexer::api::run_sweeper(state.clone(), stop.clone()));
    let limits = pylon_runtime::http::HttpLimits {
        per_address: args.connections_per_address,
        max_body: 1 << 20,
        ..Default::default()
    };
    let server = tokio::spawn(pylon_runtime::http::serve(listener, router(state), limits, stop));
    tokio::select! {
        _ = pylon_runtime::shutdown_signal() => tracing::info!("shutting down"),
        r = server => {
            r??;
            anyhow::bail!("the HTTP server stopped on its own");
        }
    }
    let _ = stop_tx.send(true);
    let _ = sweeper.await;
    Ok(())
}
