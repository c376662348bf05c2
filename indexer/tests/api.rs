//! The indexer's API without sockets (`oneshot`), on SQLite in memory — or on the
//! PostgreSQL named by `PYLON_TEST_POSTGRES` when set.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use axum::body::Body;
use axum::http::{Request, StatusCode};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use pylon_indexer::api::{AppState, IndexerMetrics, router, signed_message, unix_now};
use pylon_indexer::store::Store;
use pylon_proto::token::{Role, verify};
use serde_json::{Value, json};
use std::sync::Arc;
use tower::ServiceExt;

const ADMIN: &str = "admin-secret";

/// A fresh database per test: SQLite in memory, or a new PostgreSQL database on the
/// server `PYLON_TEST_POSTGRES` names (`make test` starts one).
async fn state() -> AppState {
    let url = match std::env::var("PYLON_TEST_POSTGRES") {
        Ok(admin_url) if !admin_url.is_empty() => {
            use sqlx::Connection;
            sqlx::any::install_default_drivers();
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let name = format!(
                "pylon_test_{}_{}_{}",
                std::process::id(),
                unix_now(),
                N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            );
            let mut admin = sqlx::AnyConnection::connect(&admin_url).await.expect("PostgreSQL reachable");
            sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut admin).await.unwrap();
            let base = admin_url.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin_url);
            format!("{base}/{name}")
        }
        _ => "sqlite::memory:".into(),
    };
    let store = Store::open(&url).await.unwrap();
    AppState {
        store,
        signing_key: Arc::new(SigningKey::from_bytes(&[42; 32])),
        admin_token: Arc::new(ADMIN.into()),
        metrics: IndexerMetrics::new(),
    }
}

async fn call(state: &AppState, req: Request<Body>) -> (StatusCode, Value) {
    let res = router(state.clone()).oneshot(req).await.unwrap();
    let status = res.status();
    let bytes = axum::body::to_bytes(res.into_body(), 1 << 20).await.unwrap();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

fn post(path: &str, body: &Value) -> Request<Body> {
    Request::post(path).header("content-type", "application/json").body(Body::from(body.to_string())).unwrap()
}

fn signed(path: &str, body: &Value, key: &SigningKey) -> Request<Body> {
    let body = body.to_string();
    let ts = unix_now();
    let sig = key.sign(&signed_message("POST", path, ts, body.as_bytes()));
    Request::post(path)
        .header("x-pylon-timestamp", ts.to_string())
        .header("x-pylon-signature", STANDARD.encode(sig.to_bytes()))
        .body(Body::from(body))
        .unwrap()
}

fn pk(key: &SigningKey) -> String {
    STANDARD.encode(key.verifying_key().as_bytes())
}

async fn add_demo_title(s: &AppState) {
    let title = json!({"id": "demo", "name": "Demo", "description": "d", "launch": "builtin:demo",
                       "min_gpu_class": 0, "width": 1280, "height": 720, "fps": 60});
    let (status, _) = call(s, post("/api/v1/titles", &title)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "adding a title needs the admin token");
    let mut req = post("/api/v1/titles", &title);
    req.headers_mut().insert("authorization", format!("Bearer {ADMIN}").parse().unwrap());
    assert_eq!(call(s, req).await.0, StatusCode::CREATED);
}

async fn add_node(s: &AppState, id: &str, provider: &str, price: f64, key: &SigningKey) {
    let body = json!({"id": id, "provider": provider, "public_key": pk(key), "gpu_model": "NVIDIA H100",
        "gpu_memory_mb": 81920, "vulkan_device": "NVIDIA H100", "encoders": ["libx264"], "capacity": 2,
        "region": "eu", "lat": 48.8, "lon": 2.3, "price_per_hour": price, "gpu_class": 3, "titles": ["demo"]});
    let (status, reply) = call(s, post("/api/v1/nodes", &body)).await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    assert_eq!(reply["public_key"], STANDARD.encode(s.signing_key.verifying_key().as_bytes()));
}

async fn add_relay(s: &AppState, id: &str, key: &SigningKey, rtts: Value) {
    let body = json!({"id": id, "owner": "box-owner", "public_key": pk(key), "public_url": format!("http://{id}.example:8080"),
        "quic_addr": "127.0.0.1:4433", "region": "eu", "capacity": 50});
    assert_eq!(call(s, post("/api/v1/relays", &body)).await.0, StatusCode::OK);
    let hb = json!({"viewers": 0, "node_rtt_ms": rtts});
    let (status, reply) = call(s, signed(&format!("/api/v1/relays/{id}/heartbeat"), &hb, key)).await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    assert!(reply["ended_sessions"].is_array() && reply["revoked_nodes"].is_array(), "{reply}");
}

fn indexer_key(s: &AppState) -> VerifyingKey {
    s.signing_key.verifying_key()
}

#[tokio::test]
async fn match_mint_and_meter_a_session() {
    let s = state().await;
    add_demo_title(&s).await;
    let (na, nb, relay) =
        (SigningKey::from_bytes(&[1; 32]), SigningKey::from_bytes(&[2; 32]), SigningKey::from_bytes(&[3; 32]));
    add_node(&s, "node-a", "alice", 1.0, &na).await;
    add_node(&s, "node-b", "bob", 0.5, &nb).await;
    add_relay(&s, "relay-1", &relay, json!({"node-a": 2.0, "node-b": 9.0})).await;

    let (status, titles) = call(&s, Request::get("/api/v1/titles").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(titles[0]["id"], "demo");

    let req = json!({"title": "demo", "client_rtt_ms": {"relay-1": 4.0}});
    let (status, created) = call(&s, post("/api/v1/sessions", &req)).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["node"], "node-a", "the nearer node wins despite its price");
    assert_eq!(created["relay_url"], "http://relay-1.example:8080");
    assert!(created["reason"].as_str().unwrap().contains("relay-1"));
    let claims = verify(created["token"].as_str().unwrap(), &indexer_key(&s), unix_now() as u64).unwrap();
    assert_eq!((claims.role, claims.node.as_str(), claims.relay.as_str()), (Role::Player, "node-a", "relay-1"));
    claims.check_relay("relay-1").unwrap();
    assert!(claims.check_relay("relay-2").is_err(), "a token for one relay is refused by another");

    // A spectator's token never carries the right to send input.
    let (_, spec) = call(
        &s,
        post("/api/v1/sessions", &json!({"title": "demo", "client_rtt_ms": {"relay-1": 4.0}, "role": "spectator"})),
    )
    .await;
    assert!(!verify(spec["token"].as_str().unwrap(), &indexer_key(&s), unix_now() as u64).unwrap().may_send_input());

    // Anyone with the session id may watch it, never play it.
    let id = created["session"].as_str().unwrap().to_string();
    let (status, watch) = call(&s, post(&format!("/api/v1/sessions/{id}/spectate"), &json!({}))).await;
    assert_eq!(status, StatusCode::CREATED, "{watch}");
    let claims = verify(watch["token"].as_str().unwrap(), &indexer_key(&s), unix_now() as u64).unwrap();
    assert_eq!((claims.role, claims.session_hex(), claims.relay.as_str()), (Role::Spectator, id.clone(), "relay-1"));
    let (status, _) = call(&s, post("/api/v1/sessions/00000000000000000000000000000000/spectate", &json!({}))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Only the session's relay or node (signed) ends it, and it is metered once.
    assert!(s.store.session_running(&id).await.unwrap());
    let path = format!("/api/v1/sessions/{id}/end");
    let why = json!({"reason": "player left"});
    assert_eq!(call(&s, post(&path, &why)).await.0, StatusCode::UNAUTHORIZED, "an unsigned end is refused");
    assert_eq!(call(&s, signed(&path, &why, &nb)).await.0, StatusCode::UNAUTHORIZED, "another node cannot end it");
    assert_eq!(call(&s, signed(&path, &why, &relay)).await.0, StatusCode::NO_CONTENT);
    assert_eq!(call(&s, signed(&path, &why, &relay)).await.0, StatusCode::NOT_FOUND);
    assert!(!s.store.session_running(&id).await.unwrap());
    // The relay learns of the end on its next heartbeat, so a replayed token is refused.
    let hb = json!({"viewers": 0, "node_rtt_ms": {"node-a": 2.0}});
    let (status, reply) = call(&s, signed("/api/v1/relays/relay-1/heartbeat", &hb, &relay)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(reply["ended_sessions"], json!([id]), "{reply}");
    let (status, _) = call(&s, post(&format!("/api/v1/sessions/{id}/spectate"), &json!({}))).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "an ended session cannot be watched");
    let (_, usage) = call(&s, Request::get("/api/v1/usage").body(Body::empty()).unwrap()).await;
    assert_eq!(usage[0]["provider"], "alice");
    assert_eq!(usage[0]["sessions"], 2);
}

#[tokio::test]
async fn a_node_that_leaves_or_drains_gets_no_new_sessions() {
    let s = state().await;
    add_demo_title(&s).await;
    let (na, nb, relay) =
        (SigningKey::from_bytes(&[1; 32]), SigningKey::from_bytes(&[2; 32]), SigningKey::from_bytes(&[3; 32]));
    add_node(&s, "node-a", "alice", 1.0, &na).await;
    add_node(&s, "node-b", "bob", 1.0, &nb).await;
    add_relay(&s, "relay-1", &relay, json!({"node-a": 2.0, "node-b": 9.0})).await;
    let req = json!({"title": "demo", "client_rtt_ms": {"relay-1": 4.0}});
    assert_eq!(call(&s, post("/api/v1/sessions", &req)).await.1["node"], "node-a");

    // node-a stops heartbeating: after the timeout it is gone, the next player goes to node-b.
    s.store.node_heartbeat("node-a", 1, &["demo".into()], unix_now() - 60).await.unwrap();
    assert_eq!(call(&s, post("/api/v1/sessions", &req)).await.1["node"], "node-b");
    let (_, nodes) = call(&s, Request::get("/api/v1/nodes").body(Body::empty()).unwrap()).await;
    assert_eq!(nodes[0]["state"], "gone");

    // It comes back (a signed heartbeat) and resumes; then drains.
    let hb = json!({"sessions": 0, "titles": ["demo"]});
    assert_eq!(call(&s, signed("/api/v1/nodes/node-a/heartbeat", &hb, &na)).await.0, StatusCode::NO_CONTENT);
    assert_eq!(call(&s, post("/api/v1/sessions", &req)).await.1["node"], "node-a");
    assert_eq!(call(&s, signed("/api/v1/nodes/node-a/drain", &json!({}), &na)).await.0, StatusCode::NO_CONTENT);
    assert_eq!(call(&s, post("/api/v1/sessions", &req)).await.1["node"], "node-b");

    // node-b revoked: refused at once, and nothing is left.
    let mut revoke = Request::post("/api/v1/nodes/node-b/revoke").body(Body::empty()).unwrap();
    revoke.headers_mut().insert("authorization", format!("Bearer {ADMIN}").parse().unwrap());
    assert_eq!(call(&s, revoke).await.0, StatusCode::NO_CONTENT);
    assert_eq!(call(&s, signed("/api/v1/nodes/node-b/heartbeat", &hb, &nb)).await.0, StatusCode::FORBIDDEN);
    let (status, err) = call(&s, post("/api/v1/sessions", &req)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(err["error"].as_str().unwrap().starts_with("no capacity in your region"), "{err}");
    let (_, reply) =
        call(&s, signed("/api/v1/relays/relay-1/heartbeat", &json!({"viewers": 0, "node_rtt_ms": {}}), &relay)).await;
    assert_eq!(reply["revoked_nodes"], json!(["node-b"]), "relays learn of revocations to close connections");
    let metrics = router(s.clone()).oneshot(Request::get("/metrics").body(Body::empty()).unwrap()).await.unwrap();
    let text = String::from_utf8(axum::body::to_bytes(metrics.into_body(), 1 << 20).await.unwrap().to_vec()).unwrap();
    assert!(text.contains("pylon_indexer_match_failures_total"), "{text}");
}

#[tokio::test]
async fn forged_unsigned_and_malformed_requests_are_4xx() {
    let s = state().await;
    let key = SigningKey::from_bytes(&[1; 32]);
    add_node(&s, "node-a", "alice", 1.0, &key).await;
    let hb = json!({"sessions": 0, "titles": []});
    // Unsigned, signed by another key, stale.
    assert_eq!(call(&s, post("/api/v1/nodes/node-a/heartbeat", &hb)).await.0, StatusCode::UNAUTHORIZED);
    let forger = SigningKey::from_bytes(&[9; 32]);
    assert_eq!(call(&s, signed("/api/v1/nodes/node-a/heartbeat", &hb, &forger)).await.0, StatusCode::UNAUTHORIZED);
    let mut stale = signed("/api/v1/nodes/node-a/heartbeat", &hb, &key);
    stale.headers_mut().insert("x-pylon-timestamp", (unix_now() - 3600).to_string().parse().unwrap());
    assert_eq!(call(&s, stale).await.0, StatusCode::UNAUTHORIZED);
    // The same id with another key cannot take the node over.
    let body = json!({"id": "node-a", "provider": "mallory", "public_key": pk(&forger), "gpu_model": "x", "gpu_memory_mb": 1,
        "vulkan_device": "x", "encoders": [], "capacity": 1, "region": "eu", "lat": 0.0, "lon": 0.0, "price_per_hour": 0.0,
        "gpu_class": 0, "titles": []});
    assert_eq!(call(&s, post("/api/v1/nodes", &body)).await.0, StatusCode::CONFLICT);
    // Malformed input is a 4xx with a JSON message, never a 5xx.
    for (path, body) in [
        ("/api/v1/nodes", "{not json"),
        ("/api/v1/nodes", r#"{"id": "x"}"#),
        ("/api/v1/relays", r#"{"id": 5}"#),
        ("/api/v1/sessions", r#"{"title": "nope", "client_rtt_ms": {}}"#),
        ("/api/v1/sessions", r#"{"title": "demo", "client_rtt_ms": {}, "role": "god"}"#),
        ("/api/v1/sessions", "[]"),
    ] {
        let req = Request::post(path).body(Body::from(body)).unwrap();
        let (status, reply) = call(&s, req).await;
        assert!(status.is_client_error(), "{path} {body} → {status}");
        assert!(reply["error"].is_string(), "{path} {body} → {reply}");
    }
    let bad_key = json!({"id": "n", "provider": "p", "public_key": "AAAA", "gpu_model": "x", "gpu_memory_mb": 1,
        "vulkan_device": "x", "encoders": [], "capacity": 1, "region": "eu", "lat": 0.0, "lon": 0.0, "price_per_hour": 0.0,
        "gpu_class": 0, "titles": []});
    assert_eq!(call(&s, post("/api/v1/nodes", &bad_key)).await.0, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn openapi_document_lists_the_api() {
    let s = state().await;
    let (status, doc) = call(&s, Request::get("/api/v1/openapi.json").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    for path in
        ["/api/v1/titles", "/api/v1/nodes", "/api/v1/sessions", "/api/v1/usage", "/api/v1/relays/{id}/heartbeat"]
    {
        assert!(doc["paths"][path].is_object(), "{path} missing from the OpenAPI document");
    }
}

#[tokio::test]
async fn sessions_a_node_does_not_run_stop_being_metered() {
    let s = state().await;
    let key = SigningKey::from_bytes(&[1; 32]);
    add_node(&s, "node-a", "alice", 1.0, &key).await;
    let now = unix_now();
    for (id, age) in [("old-running", 600), ("old-gone", 600), ("fresh", 5)] {
        s.store
            .start_session(&pylon_indexer::store::SessionRecord {
                id: id.into(),
                title: "demo".into(),
                node: "node-a".into(),
                provider: "alice".into(),
                relay: "relay-1".into(),
                gpu_class: 3,
                started_at: now - age,
            })
            .await
            .unwrap();
    }
    // The node runs only "old-running": "old-gone" ends; "fresh" may still be joining.
    let hb = json!({"sessions": 1, "titles": ["demo"], "running": ["old-running"]});
    assert_eq!(call(&s, signed("/api/v1/nodes/node-a/heartbeat", &hb, &key)).await.0, StatusCode::NO_CONTENT);
    assert!(s.store.session_running("old-running").await.unwrap());
    assert!(!s.store.session_running("old-gone").await.unwrap());
    assert!(s.store.session_running("fresh").await.unwrap());
}
