//! The catalog page players start from: `/` lists the titles, `/play/<title>` matches
//! and sends the browser to its relay, `/watch/<session>` sends a spectator to a running
//! session's relay. Plain ES modules from `web-client/`, built into
//! the binary.

use axum::Router;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

const CATALOG_HTML: &str = include_str!("../../web-client/catalog.html");
const CATALOG_JS: &str = include_str!("../../web-client/catalog.js");
const STYLE_CSS: &str = include_str!("../../web-client/style.css");

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}

/// The catalog's routes.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(|| async { asset("text/html; charset=utf-8", CATALOG_HTML) }))
        .route("/play/{title}", get(|| async { asset("text/html; charset=utf-8", CATALOG_HTML) }))
        .route("/watch/{session}", get(|| async { asset("text/html; charset=utf-8", CATALOG_HTML) }))
        .route("/catalog.js", get(|| async { asset("text/javascript; charset=utf-8", CATALOG_JS) }))
        .route("/style.css", get(|| async { asset("text/css; charset=utf-8", STYLE_CSS) }))
}
