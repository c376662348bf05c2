//! HTTP side of the relay: the web player, WebSocket signalling and `/metrics`.
//!
//! Signalling protocol (JSON text messages on `/ws`):
//! browser → relay `{"type":"offer","sdp":"…","role":"player"|"spectator","token":"…"}`;
//! relay → browser `{"type":"answer","sdp":"…","viewer":N,"role":"…"}` or
//! `{"type":"error","message":"…"}`; when the relay shuts down, `{"type":"bye","reason":"…"}`;
//! when the render node ends the session (its game exited, crashed or never drew),
//! `{"type":"ended","reason":"…"}`. In a pool the token (from the indexer) is required
//! and decides the role. Closing the WebSocket ends the viewer's session.
//!
//! `/play/<session>` serves the player page (the token travels in the URL fragment, which
//! never reaches a server log), `/watch/<session>` the same page as a spectator; `/ping` answers at once, for the client's RTT probes.

use crate::egress::ViewerCommand;
use crate::metrics::RelayMetrics;
use crate::pool::Pool;
use axum::Router;
use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Largest signalling message accepted (an SDP offer is a few KB).
pub const MAX_SIGNAL_MESSAGE: usize = 64 * 1024;
/// Read buffer of a signalling WebSocket.
const SIGNAL_READ_BUFFER: usize = 4 * 1024;
/// A signalling WebSocket that has not had an offer accepted within this is closed: a
/// half-open socket cannot hold a place on the relay.
pub const OFFER_DEADLINE: Duration = Duration::from_secs(10);

/// Shared state of the HTTP handlers.
#[derive(Debug, Clone)]
pub struct AppState {
    /// Commands to the egress task.
    pub viewers: mpsc::Sender<ViewerCommand>,
    /// Relay metrics.
    pub metrics: RelayMetrics,
    /// The pool, when the relay is in one: offers need a session token.
    pub pool: Option<Pool>,
    /// Turns true when the relay shuts down: viewers are told before it closes.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// Turns true when the relay drains: new offers are refused and every viewer is told
    /// to move to another relay.
    pub draining: tokio::sync::watch::Receiver<bool>,
}

/// Serves the relay's HTTP routes with the limits every Pylon HTTP server has (per-IP
/// connection cap, header and request timeouts, body limit).
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    pylon_runtime::http::serve(listener, app, pylon_runtime::http::HttpLimits::default(), shutdown).await?;
    Ok(())
}

/// The web player's files, built into the binary so a relay is one file to deploy.
const INDEX_HTML: &str = include_str!("../../web-client/index.html");
const PLAYER_JS: &str = include_str!("../../web-client/player.js");
const STATS_JS: &str = include_str!("../../web-client/stats.js");
const SYNC_JS: &str = include_str!("../../web-client/sync.js");
const STYLE_CSS: &str = include_str!("../../web-client/style.css");
const INPUT_JS: &str = include_str!("../../web-client/input.js");
const LATENCY_JS: &str = include_str!("../../web-client/latency.js");

/// The relay's routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }))
        .route("/play/{session}", get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }))
        .route("/watch/{session}", get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }))
        .route("/ping", get(ping))
        .route("/player.js", get(|| async { asset("text/javascript; charset=utf-8", PLAYER_JS) }))
        .route("/stats.js", get(|| async { asset("text/javascript; charset=utf-8", STATS_JS) }))
        .route("/sync.js", get(|| async { asset("text/javascript; charset=utf-8", SYNC_JS) }))
        .route("/input.js", get(|| async { asset("text/javascript; charset=utf-8", INPUT_JS) }))
        .route("/latency.js", get(|| async { asset("text/javascript; charset=utf-8", LATENCY_JS) }))
        .route("/style.css", get(|| async { asset("text/css; charset=utf-8", STYLE_CSS) }))
        .route("/ws", get(ws_upgrade))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(state)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}

/// Answers RTT probes from pages of other origins (the catalog is served by the indexer).
async fn ping() -> Response {
    (
        [
            (header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"),
            (header::CACHE_CONTROL, "no-store"),
            (header::HeaderName::from_static("timing-allow-origin"), "*"),
        ],
        "pong",
    )
        .into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    pylon_runtime::metrics::response(state.metrics.render())
}

async fn ws_upgrade(ws: WebSocketUpgrade, State(state): State<AppState>) -> Response {
    // Signalling is a few small JSON messages per viewer: a 4 KiB read buffer instead of
    // tungstenite's 128 KiB default keeps it from being the largest part of a viewer's
    // memory (messages larger than the buffer are still read, up to the size limit).
    ws.max_message_size(MAX_SIGNAL_MESSAGE)
        .max_frame_size(MAX_SIGNAL_MESSAGE)
        .read_buffer_size(SIGNAL_READ_BUFFER)
        .on_upgrade(move |socket| signal(socket, state))
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum ClientMessage {
    Offer {
        sdp: String,
        /// `player` (default: granted if nobody holds it) or `spectator`.
        #[serde(default)]
        role: Option<String>,
        /// The session token from the indexer (required in a pool).
        #[serde(default)]
        token: Option<String>,
    },
}

#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum ServerMessage {
    Answer {
        sdp: String,
        viewer: u64,
        role: &'static str,
    },
    Error {
        message: String,
    },
    Bye {
        reason: String,
    },
    /// The node ended the session (its game exited, crashed or never drew).
    Ended {
        reason: String,
    },
}

/// What a draining relay tells its viewers (and new offers): the page moves on.
const DRAINING: &str = "this relay is draining: moving to another relay";

/// Resolves once `draining` turns true (never, if nobody can drain the relay).
async fn drained(draining: &mut tokio::sync::watch::Receiver<bool>) {
    if draining.wait_for(|d| *d).await.is_err() {
        std::future::pending::<()>().await;
    }
}

async fn send(socket: &mut WebSocket, msg: &ServerMessage) -> bool {
    match serde_json::to_string(msg) {
        Ok(text) => socket.send(Message::Text(text.into())).await.is_ok(),
        Err(_) => false,
    }
}

async fn signal(mut socket: WebSocket, state: AppState) {
    let mut viewer: Option<u64> = None;
    let mut shutdown = state.shutdown.clone();
    let mut draining = state.draining.clone();
    let offer_deadline = tokio::time::Instant::now() + OFFER_DEADLINE;
    // Resolves when the relay drops the viewer (ICE never completed, or it left).
    let mut closed: Option<oneshot::Receiver<String>> = None;
    loop {
        let viewer_gone = async {
            match closed.as_mut() {
                Some(rx) => rx.await.ok(),
                None => std::future::pending().await,
            }
        };
        let msg = tokio::select! {
            m = socket.recv() => m,
            _ = tokio::time::sleep_until(offer_deadline), if viewer.is_none() => {
                let _ = send(&mut socket, &ServerMessage::Error { message: format!("no session within {OFFER_DEADLINE:?}: closing") }).await;
                let _ = socket.send(Message::Close(None)).await;
                state.metrics.signalling_timeouts.inc();
                break;
            }
            why = viewer_gone => {
                let bye = match why {
                    Some(reason) => ServerMessage::Ended { reason },
                    None => ServerMessage::Bye { reason: "the session closed (ICE did not complete, or it ended)".into() },
                };
                let _ = send(&mut socket, &bye).await;
                let _ = socket.send(Message::Close(None)).await;
                viewer = None;
                break;
            }
            _ = drained(&mut draining) => {
                let bye = ServerMessage::Bye { reason: DRAINING.into() };
                let _ = send(&mut socket, &bye).await;
                let _ = socket.send(Message::Close(None)).await;
                break;
            }
            _ = crate::stopped(&mut shutdown) => {
                let bye = ServerMessage::Bye { reason: "the relay is shutting down".into() };
                let _ = send(&mut socket, &bye).await;
                let _ = socket.send(Message::Close(None)).await;
                break;
            }
        };
        let Some(msg) = msg else { break };
        let text = match msg {
            Ok(Message::Text(t)) => t,
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => continue,
        };
        let parsed: Result<ClientMessage, _> = serde_json::from_str(&text);
        let reply = match parsed {
            Err(e) => ServerMessage::Error { message: format!("malformed signalling message: {e}") },
            Ok(ClientMessage::Offer { .. }) if viewer.is_some() => {
                ServerMessage::Error { message: "this connection already has a session".into() }
            }
            Ok(ClientMessage::Offer { .. }) if *state.draining.borrow() => {
                ServerMessage::Error { message: DRAINING.into() }
            }
            Ok(ClientMessage::Offer { sdp, role, token }) => {
                let admitted = match (&state.pool, token) {
                    (None, _) => Ok(None),
                    (Some(_), None) => {
                        Err("this relay admits viewers with a session token: start from the catalog".into())
                    }
                    (Some(pool), Some(token)) => pool.admit(&token, crate::pool::unix_now()).map(|a| Some((a, token))),
                };
                let admitted = match admitted {
                    Ok(a) => a,
                    Err(message) => {
                        state.metrics.tokens_refused.inc();
                        tracing::info!("viewer refused: {message}");
                        if !send(&mut socket, &ServerMessage::Error { message }).await {
                            break;
                        }
                        continue;
                    }
                };
                let (tx, rx) = oneshot::channel();
                let (closed_tx, closed_rx) = oneshot::channel();
                let wants_player = match &admitted {
                    Some((a, _)) => a.player,
                    None => role.as_deref() != Some("spectator"),
                };
                let offer = ViewerCommand::Offer { sdp, wants_player, admitted, reply: tx, closed: closed_tx };
                if state.viewers.send(offer).await.is_err() {
                    break;
                }
                closed = Some(closed_rx);
                match tokio::time::timeout(Duration::from_secs(5), rx).await {
                    Ok(Ok(Ok((id, sdp, player)))) => {
                        viewer = Some(id);
                        let role = if player { "player" } else { "spectator" };
                        tracing::info!(viewer = id, role, "viewer offer accepted");
                        ServerMessage::Answer { sdp, viewer: id, role }
                    }
                    Ok(Ok(Err(message))) => {
                        closed = None;
                        ServerMessage::Error { message }
                    }
                    _ => {
                        closed = None;
                        ServerMessage::Error { message: "the relay is not answering".into() }
                    }
                }
            }
        };
        if !send(&mut socket, &reply).await {
            break;
        }
    }
    if let Some(id) = viewer {
        let _ = state.viewers.send(ViewerCommand::Leave { id }).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use tokio::sync::watch;
    use tower::ServiceExt;

    fn app() -> Router {
        let (tx, _rx) = mpsc::channel(1);
        router(AppState {
            viewers: tx,
            metrics: RelayMetrics::new(),
            pool: None,
            shutdown: watch::channel(false).1,
            draining: watch::channel(false).1,
        })
    }

    #[tokio::test]
    async fn serves_the_player_and_metrics() {
        let res = app().oneshot(Request::get("/").body(Body::empty()).unwrap()).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let res = app().oneshot(Request::get("/player.js").body(Body::empty()).unwrap()).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let res = app().oneshot(Request::get("/metrics").body(Body::empty()).unwrap()).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let body = axum::body::to_bytes(res.into_body(), 1 << 20).await.unwrap();
        assert!(String::from_utf8_lossy(&body).contains("pylon_relay_viewers"));
        let res = app().oneshot(Request::get("/nope").body(Body::empty()).unwrap()).await.unwrap();
        assert_eq!(res.status(), StatusCode::NOT_FOUND);
    }
}
