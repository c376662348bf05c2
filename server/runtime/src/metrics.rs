//! Prometheus exposition, the same for every binary: the text format of a registry, the
//! content type it is served with, and a guarded `/metrics` server for binaries that
//! serve nothing else.

use axum::response::IntoResponse;
use prometheus_client::registry::Registry;

/// The content type of the text exposition (OpenMetrics 1.0).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// `registry` in the text exposition format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

/// An HTTP answer carrying `text` (an exposition) as metrics.
pub fn response(text: String) -> axum::response::Response {
    ([(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response()
}

/// A router answering `GET /metrics` with what `render` returns at each request.
pub fn router(render: impl Fn() -> String + Clone + Send + Sync + 'static) -> axum::Router {
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let render = render.clone();
            async move { response(render()) }
        }),
    )
}

/// Serves `/metrics` alone on `listener`, within the default limits of
/// [`crate::http::HttpLimits`], until `shutdown` turns true.
pub async fn serve(
    listener: tokio::net::TcpListener,
    render: impl Fn() -> String + Clone + Send + Sync + 'static,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "metrics at /metrics");
    }
    crate::http::serve(listener, router(render), Default::default(), shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use tower::ServiceExt;

    #[tokio::test]
    async fn a_registry_is_served_at_metrics_in_the_openmetrics_format() {
        let mut registry = Registry::with_prefix("pylon_test");
        let c = Counter::<u64>::default();
        registry.register("things", "Things counted", c.clone());
        c.inc_by(3);
        let text = render(&registry);
        assert!(text.contains("pylon_test_things_total 3"), "{text}");
        let app = router(move || text.clone());
        let req = axum::http::Request::get("/metrics").body(axum::body::Body::empty()).unwrap_or_default();
        let res = app.oneshot(req).await.expect("answered");
        assert_eq!(res.headers()[axum::http::header::CONTENT_TYPE], CONTENT_TYPE);
        let body = axum::body::to_bytes(res.into_body(), 1 << 16).await.unwrap_or_default();
        assert!(String::from_utf8_lossy(&body).contains("# EOF"), "the exposition ends as OpenMetrics requires");
    }
}
