//! Process plumbing every Pylon binary shares, in one place rather than copied per binary:
//!
//! * [`http`]: serving an axum router with the limits an open network needs (per-address
//!   and total connection caps, header-read and request timeouts, body limits).
//! * [`metrics`]: the Prometheus exposition every binary serves at `/metrics`.
//! * [`tasks`]: core tasks supervised together — one failing stops the process.
//! * [`shutdown_signal`]: Ctrl-C or SIGTERM.
//! * [`init_tracing`]: logs to stderr, filtered by `RUST_LOG`.

pub mod http;
pub mod metrics;
pub mod tasks;

/// Resolves once `shutdown` turns true (or its sender is gone).
pub async fn stopped(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// Logs to stderr (coloured on a terminal), filtered by `RUST_LOG`, `default` otherwise.
pub fn init_tracing(default: &str) {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default.into()))
        .init();
}
