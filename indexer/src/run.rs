//! The indexer as a process: its database, key, HTTP API and sweeper, until shutdown.

use crate::api::{AppState, Policy, router};
use crate::store::{Store, Title};
use anyhow::Context;
use std::net::SocketAddr;
use std::path::PathBuf;
use tokio::sync::{oneshot, watch};

/// What [`run`] needs.
#[derive(Debug, Clone)]
pub struct IndexerConfig {
    /// HTTP address of the API.
    pub addr: SocketAddr,
    /// Directory for the signing key (and the SQLite database when no URL is given).
    /// Replicas of one pool share the key: the same file in each one's directory.
    pub data_dir: PathBuf,
    /// Database URL (`postgres://…` or `sqlite://…`); default SQLite in `data_dir`.
    pub database_url: Option<String>,
    /// Bearer token for administrative calls (empty: they are refused).
    pub admin_token: String,
    /// Bearer token studios deploy titles with (empty: only the admin may).
    pub studio_token: String,
    /// The operator's policy.
    pub policy: Policy,
    /// Connections one client address may hold open to the API.
    pub connections_per_address: usize,
    /// Register the built-in demo title on start.
    pub demo_title: bool,
    /// The public base URLs of every replica of this indexer (this one's included).
    pub replicas: Vec<String>,
}

/// Runs the indexer until `shutdown` turns true; `started` gets the bound address.
pub async fn run(
    config: IndexerConfig,
    shutdown: watch::Receiver<bool>,
    started: Option<oneshot::Sender<SocketAddr>>,
) -> anyhow::Result<()> {
    if config.admin_token.is_empty() {
        tracing::warn!("no admin token (PYLON_ADMIN_TOKEN or --admin-token-file): administrative calls are refused");
    }
    std::fs::create_dir_all(&config.data_dir).with_context(|| format!("creating {}", config.data_dir.display()))?;
    let url = config
        .database_url
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}?mode=rwc", config.data_dir.join("indexer.db").display()));
    let store = Store::open(&url).await.context("opening the database")?;
    tracing::info!(backend = if url.starts_with("postgres") { "postgresql" } else { "sqlite" }, "database ready");
    if config.demo_title {
        store.put_title(&Title::builtin_demo()).await?;
    }
    let key = crate::keys::load_or_create(&config.data_dir, "indexer-key")?;
    if config.policy.approve_new {
        tracing::info!("new nodes and relays wait for approval");
    }
    if !config.replicas.is_empty() {
        tracing::info!(replicas = ?config.replicas, "one of several replicas of this indexer");
    }
    let state = AppState::new(store, key, config.admin_token, config.policy)
        .with_studio_token(config.studio_token)
        .with_replicas(config.replicas);
    let listener =
        tokio::net::TcpListener::bind(config.addr).await.with_context(|| format!("binding {}", config.addr))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "indexer API at /api/v1, OpenAPI at /api/v1/openapi.json, metrics at /metrics");
    if let Some(tx) = started {
        let _ = tx.send(addr);
    }
    let sweeper = tokio::spawn(crate::api::run_sweeper(state.clone(), shutdown.clone()));
    let limits = pylon_runtime::http::HttpLimits {
        per_address: config.connections_per_address,
        max_body: 1 << 20,
        ..Default::default()
    };
    let served = pylon_runtime::http::serve(listener, router(state), limits, shutdown.clone()).await;
    let _ = sweeper.await;
    served.context("the HTTP server failed")?;
    anyhow::ensure!(*shutdown.borrow(), "the HTTP server stopped on its own");
    Ok(())
}
