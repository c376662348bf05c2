//! The pool checker's Prometheus metrics, served at `/metrics` (`--metrics-addr`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, linear_buckets};
use prometheus_client::registry::Registry;
use std::sync::Arc;

/// A check's result, as a label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    /// `pass` or `fail` (reported), or `unreported` (the indexer did not take it).
    pub result: &'static str,
}

/// What the checker counts.
#[derive(Debug, Clone)]
pub struct CheckerMetrics {
    /// Checks made, by result.
    pub checks: Family<Outcome, Counter>,
    /// Wall time of one check (connection to report), seconds.
    pub check_seconds: Histogram,
    /// Requests for a check that found no node due.
    pub idle_polls: Counter,
    registry: Arc<Registry>,
}

impl Default for CheckerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl CheckerMetrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("pylon_checker");
        let m = Self {
            checks: Family::default(),
            check_seconds: Histogram::new(linear_buckets(5.0, 5.0, 12)),
            idle_polls: Counter::default(),
            registry: Arc::new(Registry::default()),
        };
        r.register("checks", "Checks made, by result", m.checks.clone());
        r.register("check_seconds", "Wall time of one check, connection to report", m.check_seconds.clone());
        r.register("idle_polls", "Requests for a check that found no node due", m.idle_polls.clone());
        Self { registry: Arc::new(r), ..m }
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        pylon_runtime::metrics::render(&self.registry)
    }
}

/// Serves `/metrics` on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: CheckerMetrics,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    pylon_runtime::metrics::serve(listener, move || metrics.render(), shutdown).await
}
