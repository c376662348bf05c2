//! `pylon-indexer`: the Pylon control plane.

use anyhow::Context;
use clap::Parser;
use pylon_indexer::api::{AppState, IndexerMetrics, router};
use pylon_indexer::store::{Store, Title};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

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
    /// Bearer token for administrative calls (adding titles, revoking nodes). Without it
    /// those calls are refused.
    #[arg(long, env = "PYLON_ADMIN_TOKEN", default_value = "")]
    admin_token: String,
    /// Register the built-in demo title ("Pylon Asteroids", id `demo`) on start.
    #[arg(long)]
    demo_title: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,sqlx=warn".into()),
        )
        .init();
    let args = Args::parse();
    std::fs::create_dir_all(&args.data_dir).with_context(|| format!("creating {}", args.data_dir.display()))?;
    let url = args
        .database_url
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}?mode=rwc", args.data_dir.join("indexer.db").display()));
    let store = Store::open(&url).await.context("opening the database")?;
    tracing::info!(backend = if url.starts_with("postgres") { "postgresql" } else { "sqlite" }, "database ready");
    if args.demo_title {
        store
            .put_title(&Title {
                id: "demo".into(),
                name: "Pylon Asteroids".into(),
                description: "Fly a ship through a drifting asteroid field and shoot for points.".into(),
                launch: "builtin:demo".into(),
                min_gpu_class: 0,
                width: 1280,
                height: 720,
                fps: 60,
            })
            .await?;
    }
    let key = pylon_indexer::keys::load_or_create(&args.data_dir, "indexer-key")?;
    let state = AppState {
        store,
        signing_key: Arc::new(key),
        admin_token: Arc::new(args.admin_token),
        metrics: IndexerMetrics::new(),
    };
    let listener = tokio::net::TcpListener::bind(args.addr).await.with_context(|| format!("binding {}", args.addr))?;
    tracing::info!(addr = %args.addr, "indexer API at /api/v1, OpenAPI at /api/v1/openapi.json, metrics at /metrics");
    axum::serve(listener, router(state)).with_graceful_shutdown(shutdown_signal()).await?;
    Ok(())
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        return;
    }
    let _ = tokio::signal::ctrl_c().await;
}
