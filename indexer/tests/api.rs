//! The indexer's API without sockets (`oneshot`), on SQLite in memory — or on the
//! PostgreSQL named by `PYLON_TEST_POSTGRES` when set.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use axum::body::Body;
use axum::http::{Request, StatusCode};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use pylon_indexer::api::{AppState, Policy, router, signed_message, unix_now};
use pylon_indexer::limit::Rate;
use pylon_indexer::store::Store;
use pylon_proto::token::{Role, verify};
use serde_json::{Value, json};
use tower::ServiceExt;

const ADMIN: &str = "admin-secret";

/// A fresh database per test: SQLite in memory, or a new PostgreSQL database on the
/// server `PYLON_TEST_POSTGRES` names (`make test` starts one).
async fn state() -> AppState {
    // Most tests are not about rate limits: every request comes from one address here.
    let relaxed = Rate::new(1e6, 1e6);
    state_with(Policy { sessions_per_address: relaxed, spectate_per_address: relaxed, ..Policy::default() }).await
}

async fn state_with(policy: Policy) -> AppState {
    let url = database_url("sqlite::memory:".into()).await;
    let store = Store::open(&url).await.unwrap();
    AppState::new(store, SigningKey::from_bytes(&[42; 32]), ADMIN.into(), policy)
}

/// Two replicas of one indexer: two states (each its own pool of connections, limiters
/// and metrics) on one database, with one signing key.
async fn replicas(dir: &std::path::Path) -> (AppState, AppState) {
    let url = database_url(format!("sqlite://{}?mode=rwc", dir.join("indexer.db").display())).await;
    let relaxed = Rate::new(1e6, 1e6);
    let policy = Policy { sessions_per_address: relaxed, spectate_per_address: relaxed, ..Policy::default() };
    let replica = async || {
        let store = Store::open(&url).await.unwrap();
        AppState::new(store, SigningKey::from_bytes(&[42; 32]), ADMIN.into(), policy)
    };
    (replica().await, replica().await)
}

/// A fresh database on the PostgreSQL server `PYLON_TEST_POSTGRES` names, else `sqlite`.
async fn database_url(sqlite: String) -> String {
    match std::env::var("PYLON_TEST_POSTGRES") {
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
        _ => sqlite,
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

/// Strictly increasing nonces, as a real client's.
static NONCES: pylon_indexer_client::NonceCounter = pylon_indexer_client::NonceCounter::new();

fn signed(path: &str, body: &Value, key: &SigningKey) -> Request<Body> {
    signed_with(path, body, key, NONCES.next())
}

fn signed_with(path: &str, body: &Value, key: &SigningKey, nonce: i64) -> Request<Body> {
    let body = body.to_string();
    let ts = unix_now();
    let sig = key.sign(&signed_message("POST", path, ts, nonce, body.as_bytes()));
    Request::post(path)
        .header("content-type", "application/json")
        .header("x-pylon-timestamp", ts.to_string())
        .header("x-pylon-nonce", nonce.to_string())
        .header("x-pylon-signature", STANDARD.encode(sig.to_bytes()))
        .body(Body::from(body))
        .unwrap()
}

fn admin(mut req: Request<Body>) -> Request<Body> {
    req.headers_mut().insert("authorization", format!("Bearer {ADMIN}").parse().unwrap());
    req
}

fn get(path: &str) -> Request<Body> {
    Request::get(path).body(Body::empty()).unwrap()
}

fn node_body(id: &str, provider: &str, price: f64, key: &SigningKey) -> Value {
    json!({"id": id, "provider": provider, "public_key": pk(key), "gpu_model": "NVIDIA H100",
        "gpu_memory_mb": 81920, "vulkan_device": "NVIDIA H100", "encoders": ["libx264"], "capacity": 2,
        "region": "eu", "lat": 48.8, "lon": 2.3, "price_per_hour": price, "gpu_class": 3, "titles": ["demo"]})
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
    let body = node_body(id, provider, price, key);
    let (status, reply) = call(s, signed("/api/v1/nodes", &body, key)).await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    assert_eq!(reply["public_key"], STANDARD.encode(s.signing_key.verifying_key().as_bytes()));
}

async fn add_relay(s: &AppState, id: &str, key: &SigningKey, rtts: Value) {
    let body = json!({"id": id, "owner": "box-owner", "public_key": pk(key), "public_url": format!("http://{id}.example:8080"),
        "quic_addr": "127.0.0.1:4433", "region": "eu", "capacity": 50});
    assert_eq!(call(s, signed("/api/v1/relays", &body, key)).await.0, StatusCode::OK);
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
    assert_eq!(titles["items"][0]["id"], "demo");

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
    assert_eq!(usage["items"][0]["provider"], "alice");
    assert_eq!(usage["items"][0]["sessions"], 2);
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
    s.store.node_heartbeat("node-a", 1, &[], &["demo".into()], unix_now() - 60).await.unwrap();
    assert_eq!(call(&s, post("/api/v1/sessions", &req)).await.1["node"], "node-b");
    let (_, nodes) = call(&s, Request::get("/api/v1/nodes").body(Body::empty()).unwrap()).await;
    assert_eq!(nodes["items"][0]["state"], "gone");

    // It comes back (a signed heartbeat) and resumes; then drains.
    let hb = json!({"sessions": 0, "titles": ["demo"]});
    assert_eq!(call(&s, signed("/api/v1/nodes/node-a/heartbeat", &hb, &na)).await.0, StatusCode::OK);
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
    assert_eq!(call(&s, signed("/api/v1/nodes", &body, &forger)).await.0, StatusCode::CONFLICT);
    assert_eq!(call(&s, post("/api/v1/nodes", &body)).await.0, StatusCode::UNAUTHORIZED, "unsigned registration");
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
            .start_session(
                &pylon_indexer::store::SessionRecord {
                    id: id.into(),
                    title: "demo".into(),
                    node: "node-a".into(),
                    provider: "alice".into(),
                    relay: "relay-1".into(),
                    gpu_class: 3,
                    started_at: now - age,
                    check: false,
                },
                10,
            )
            .await
            .unwrap();
    }
    // The node runs only "old-running": "old-gone" ends; "fresh" may still be joining.
    let hb = json!({"sessions": 1, "titles": ["demo"], "running": ["old-running"]});
    assert_eq!(call(&s, signed("/api/v1/nodes/node-a/heartbeat", &hb, &key)).await.0, StatusCode::OK);
    assert!(s.store.session_running("old-running").await.unwrap());
    assert!(!s.store.session_running("old-gone").await.unwrap());
    assert!(s.store.session_running("fresh").await.unwrap());
}

#[tokio::test]
async fn registration_proves_the_key_and_only_its_holder_changes_the_record() {
    let s = state().await;
    let key = SigningKey::from_bytes(&[1; 32]);
    let forger = SigningKey::from_bytes(&[9; 32]);
    let body = node_body("node-a", "alice", 1.0, &key);
    // Unsigned, or signed by someone else than the key it registers: refused.
    assert_eq!(call(&s, post("/api/v1/nodes", &body)).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(call(&s, signed("/api/v1/nodes", &body, &forger)).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(call(&s, get("/api/v1/nodes/node-a")).await.0, StatusCode::NOT_FOUND, "nothing was stored");
    add_node(&s, "node-a", "alice", 1.0, &key).await;
    // The public key is public: re-registering with it, but without its signature, is
    // refused and changes nothing (provider, price: usage stays credited to alice).
    let mut takeover = node_body("node-a", "mallory", 0.0, &key);
    assert_eq!(call(&s, post("/api/v1/nodes", &takeover)).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(call(&s, signed("/api/v1/nodes", &takeover, &forger)).await.0, StatusCode::UNAUTHORIZED);
    takeover["public_key"] = json!(pk(&forger));
    assert_eq!(call(&s, signed("/api/v1/nodes", &takeover, &forger)).await.0, StatusCode::CONFLICT);
    let (_, nodes) = call(&s, get("/api/v1/nodes")).await;
    assert_eq!(
        (nodes["items"][0]["provider"].as_str(), nodes["items"][0]["price_per_hour"].as_f64()),
        (Some("alice"), Some(1.0))
    );
    // Anyone may look up a node's key (relays do, to check a connecting node).
    let (status, info) = call(&s, get("/api/v1/nodes/node-a")).await;
    assert_eq!(
        (status, info["public_key"].as_str(), info["state"].as_str()),
        (StatusCode::OK, Some(pk(&key).as_str()), Some("ready"))
    );

    // Draining and revocation survive re-registration by the holder itself.
    assert_eq!(call(&s, signed("/api/v1/nodes/node-a/drain", &json!({}), &key)).await.0, StatusCode::NO_CONTENT);
    add_node(&s, "node-a", "alice", 1.0, &key).await;
    assert_eq!(
        call(&s, get("/api/v1/nodes")).await.1["items"][0]["state"],
        "draining",
        "re-registering reset draining"
    );
    assert_eq!(
        call(&s, admin(Request::post("/api/v1/nodes/node-a/revoke").body(Body::empty()).unwrap())).await.0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        call(&s, signed("/api/v1/nodes", &node_body("node-a", "alice", 1.0, &key), &key)).await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(call(&s, get("/api/v1/nodes/node-a")).await.1["state"], "revoked");
    // Relays likewise.
    let relay = SigningKey::from_bytes(&[3; 32]);
    add_relay(&s, "relay-1", &relay, json!({})).await;
    let hijack = json!({"id": "relay-1", "owner": "mallory", "public_key": pk(&relay), "public_url": "http://evil.example",
        "quic_addr": "127.0.0.1:1", "region": "eu", "capacity": 50});
    assert_eq!(call(&s, post("/api/v1/relays", &hijack)).await.0, StatusCode::UNAUTHORIZED);
    let (_, relays) = call(&s, get("/api/v1/relays")).await;
    assert_eq!(
        relays["items"][0]["public_url"], "http://relay-1.example:8080",
        "players are never sent to the hijacker"
    );
}

#[tokio::test]
async fn a_replayed_signed_request_is_refused() {
    let s = state().await;
    let key = SigningKey::from_bytes(&[1; 32]);
    add_node(&s, "node-a", "alice", 1.0, &key).await;
    let hb = json!({"sessions": 0, "titles": ["demo"]});
    let nonce = NONCES.next();
    let first = signed_with("/api/v1/nodes/node-a/heartbeat", &hb, &key, nonce);
    let replay = signed_with("/api/v1/nodes/node-a/heartbeat", &hb, &key, nonce);
    assert_eq!(call(&s, first).await.0, StatusCode::OK);
    let (status, err) = call(&s, replay).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(err["error"].as_str().unwrap().contains("replayed"), "{err}");
    // An older nonce is refused too; a newer one passes.
    let older = signed_with("/api/v1/nodes/node-a/heartbeat", &hb, &key, nonce - 1);
    assert_eq!(call(&s, older).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(call(&s, signed("/api/v1/nodes/node-a/heartbeat", &hb, &key)).await.0, StatusCode::OK);
    // A replayed registration and a hostile timestamp (no overflow) are refused.
    let body = node_body("node-a", "alice", 1.0, &key);
    assert_eq!(call(&s, signed_with("/api/v1/nodes", &body, &key, nonce)).await.0, StatusCode::UNAUTHORIZED);
    let mut hostile = signed("/api/v1/nodes/node-a/heartbeat", &hb, &key);
    hostile.headers_mut().insert("x-pylon-timestamp", i64::MIN.to_string().parse().unwrap());
    assert_eq!(call(&s, hostile).await.0, StatusCode::UNAUTHORIZED);
}

fn from(addr: &str, req: Request<Body>) -> Request<Body> {
    let mut req = req;
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    req.extensions_mut().insert(axum::extract::ConnectInfo(addr));
    req
}

#[tokio::test]
async fn anonymous_session_requests_from_one_address_hold_at_most_the_limit() {
    let s = state_with(Policy::default()).await;
    add_demo_title(&s).await;
    let (node, relay) = (SigningKey::from_bytes(&[1; 32]), SigningKey::from_bytes(&[3; 32]));
    let mut body = node_body("node-a", "alice", 1.0, &node);
    body["capacity"] = json!(1000);
    assert_eq!(call(&s, signed("/api/v1/nodes", &body, &node)).await.0, StatusCode::OK);
    add_relay(&s, "relay-1", &relay, json!({"node-a": 2.0})).await;
    let req = json!({"title": "demo", "client_rtt_ms": {"relay-1": 4.0}});
    let (mut created, mut limited) = (0, 0);
    for _ in 0..200 {
        let res = router(s.clone()).oneshot(from("198.51.100.7:40000", post("/api/v1/sessions", &req))).await.unwrap();
        match res.status() {
            StatusCode::CREATED => created += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                assert!(res.headers().contains_key("retry-after"));
                limited += 1;
            }
            other => panic!("unexpected {other}"),
        }
    }
    let burst = Policy::default().sessions_per_address.burst as usize;
    assert_eq!((created, limited), (burst, 200 - burst));
    let seats = s.store.node("node-a").await.unwrap().unwrap().seats;
    assert_eq!(seats, burst as i64, "the flood holds no more seats than the limit");
    // Another address is not punished for it.
    let res = router(s.clone()).oneshot(from("203.0.113.9:1", post("/api/v1/sessions", &req))).await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    // Spectator links are rate-limited the same way.
    let (_, one) = call(&s, from("203.0.113.9:1", post("/api/v1/sessions", &req))).await;
    let path = format!("/api/v1/sessions/{}/spectate", one["session"].as_str().unwrap_or("x"));
    let spectators = {
        let mut n = 0;
        for _ in 0..100 {
            if call(&s, from("192.0.2.1:1", post(&path, &json!({})))).await.0 == StatusCode::CREATED {
                n += 1;
            }
        }
        n
    };
    assert_eq!(spectators, Policy::default().spectate_per_address.burst as usize);
}

#[tokio::test]
async fn a_seat_is_freed_when_the_relay_never_sees_the_player_or_stops_seeing_it() {
    let s = state().await;
    add_demo_title(&s).await;
    let (node, relay) = (SigningKey::from_bytes(&[1; 32]), SigningKey::from_bytes(&[3; 32]));
    add_node(&s, "node-a", "alice", 1.0, &node).await;
    add_relay(&s, "relay-1", &relay, json!({"node-a": 2.0})).await;
    let req = json!({"title": "demo", "client_rtt_ms": {"relay-1": 4.0}});
    let ghost = call(&s, post("/api/v1/sessions", &req)).await.1["session"].as_str().unwrap().to_string();
    let played = call(&s, post("/api/v1/sessions", &req)).await.1["session"].as_str().unwrap().to_string();
    assert_eq!(s.store.node("node-a").await.unwrap().unwrap().seats, 2);
    assert_eq!(call(&s, post("/api/v1/sessions", &req)).await.0, StatusCode::SERVICE_UNAVAILABLE, "full");
    // The relay reports only one player connected; the node may claim both (it is not asked).
    let hb = json!({"viewers": 1, "node_rtt_ms": {"node-a": 2.0}, "players": [played]});
    assert_eq!(call(&s, signed("/api/v1/relays/relay-1/heartbeat", &hb, &relay)).await.0, StatusCode::OK);
    let claim = json!({"sessions": 2, "titles": ["demo"], "running": [ghost, played]});
    assert_eq!(call(&s, signed("/api/v1/nodes/node-a/heartbeat", &claim, &node)).await.0, StatusCode::OK);
    let now = unix_now();
    let grace = pylon_indexer::api::PLAYER_JOIN_GRACE_SECS;
    let gone = pylon_indexer::api::PLAYER_GONE_SECS;
    assert_eq!(s.store.sweep_unplayed(now + 1, grace, gone).await.unwrap(), 0, "within the grace");
    // The relay and the node keep heartbeating; the ghost's player never shows up.
    s.store.relay_heartbeat("relay-1", 1, &Default::default(), now + grace + 1).await.unwrap();
    s.store.node_heartbeat("node-a", 2, &[], &["demo".into()], now + grace + 1).await.unwrap();
    s.store.players_seen("relay-1", std::slice::from_ref(&played), now + grace + 1).await.unwrap();
    assert_eq!(s.store.sweep_unplayed(now + grace + 1, grace, gone).await.unwrap(), 1);
    assert!(!s.store.session_running(&ghost).await.unwrap(), "the unplayed session stops being metered");
    assert!(s.store.session_running(&played).await.unwrap());
    assert_eq!(s.store.node("node-a").await.unwrap().unwrap().seats, 1, "its seat is free again");
    // The player leaves without the relay's end report arriving: swept once unseen.
    s.store.relay_heartbeat("relay-1", 0, &Default::default(), now + grace + gone + 2).await.unwrap();
    s.store.node_heartbeat("node-a", 1, &[], &["demo".into()], now + grace + gone + 2).await.unwrap();
    assert_eq!(s.store.sweep_unplayed(now + grace + gone + 2, grace, gone).await.unwrap(), 1);
    assert_eq!(s.store.node("node-a").await.unwrap().unwrap().seats, 0);
}

#[tokio::test]
async fn a_node_that_stops_heartbeating_ends_its_sessions_and_the_relay_hears_why() {
    let s = state().await;
    add_demo_title(&s).await;
    let (node, relay) = (SigningKey::from_bytes(&[1; 32]), SigningKey::from_bytes(&[3; 32]));
    add_node(&s, "node-a", "alice", 1.0, &node).await;
    add_relay(&s, "relay-1", &relay, json!({"node-a": 2.0})).await;
    let req = json!({"title": "demo", "client_rtt_ms": {"relay-1": 4.0}});
    let session = call(&s, post("/api/v1/sessions", &req)).await.1["session"].as_str().unwrap().to_string();
    let now = unix_now();
    let (grace, gone) = (pylon_indexer::api::PLAYER_JOIN_GRACE_SECS, pylon_indexer::api::PLAYER_GONE_SECS);
    // The player plays; the relay keeps reporting it. The node fell silent a while ago.
    s.store
        .node_heartbeat("node-a", 1, std::slice::from_ref(&session), &["demo".into()], now - gone - 1)
        .await
        .unwrap();
    s.store.relay_heartbeat("relay-1", 1, &Default::default(), now).await.unwrap();
    s.store.players_seen("relay-1", std::slice::from_ref(&session), now).await.unwrap();
    assert_eq!(s.store.sweep_unplayed(now - 1, grace, gone).await.unwrap(), 0, "silent for not quite long enough");
    assert_eq!(s.store.sweep_unplayed(now, grace, gone).await.unwrap(), 1, "one heartbeat timeout: gone");
    assert!(!s.store.session_running(&session).await.unwrap(), "no longer metered");
    assert_eq!(s.store.node("node-a").await.unwrap().unwrap().seats, 0);
    // The relay's next heartbeat names the session and why: its viewers are told.
    let hb = json!({"viewers": 1, "node_rtt_ms": {}, "players": [session]});
    let (status, reply) = call(&s, signed("/api/v1/relays/relay-1/heartbeat", &hb, &relay)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(reply["ended_sessions"], json!([session]));
    assert_eq!(reply["ended_reasons"][&session], pylon_indexer::store::NODE_GONE);
    // Nobody is matched to it any more.
    assert_eq!(call(&s, get("/api/v1/nodes/node-a")).await.1["state"], "gone");
}

#[tokio::test]
async fn with_approve_new_the_operator_admits_members_before_they_are_used() {
    let s = state_with(Policy { approve_new: true, ..Policy::default() }).await;
    add_demo_title(&s).await;
    let (node, relay) = (SigningKey::from_bytes(&[1; 32]), SigningKey::from_bytes(&[3; 32]));
    add_node(&s, "node-a", "alice", 1.0, &node).await;
    add_relay(&s, "relay-1", &relay, json!({"node-a": 2.0})).await;
    assert_eq!(call(&s, get("/api/v1/nodes/node-a")).await.1["state"], "pending");
    let req = json!({"title": "demo", "client_rtt_ms": {"relay-1": 4.0}});
    assert_eq!(call(&s, post("/api/v1/sessions", &req)).await.0, StatusCode::SERVICE_UNAVAILABLE);
    assert!(call(&s, get("/api/v1/candidates/demo")).await.1.as_array().unwrap().is_empty());
    let approve = |path: &str| Request::post(path).body(Body::empty()).unwrap();
    assert_eq!(call(&s, approve("/api/v1/nodes/node-a/approve")).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(call(&s, admin(approve("/api/v1/nodes/node-a/approve"))).await.0, StatusCode::NO_CONTENT);
    assert_eq!(call(&s, admin(approve("/api/v1/relays/relay-1/approve"))).await.0, StatusCode::NO_CONTENT);
    // Approval survives the member re-registering.
    add_node(&s, "node-a", "alice", 1.0, &node).await;
    let (status, created) = call(&s, post("/api/v1/sessions", &req)).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
}

#[tokio::test]
async fn the_admin_token_is_compared_whole() {
    let s = state().await;
    for token in ["", "admin", "admin-secre", "admin-secretX", "ADMIN-SECRET"] {
        let mut req = Request::post("/api/v1/nodes/x/revoke").body(Body::empty()).unwrap();
        req.headers_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
        assert_eq!(call(&s, req).await.0, StatusCode::UNAUTHORIZED, "{token:?}");
    }
}

#[tokio::test]
async fn errors_carry_a_reason_code_and_busy_answers_retry_after() {
    let s = state().await;
    add_demo_title(&s).await;
    let key = SigningKey::from_bytes(&[1; 32]);
    add_node(&s, "node-a", "alice", 1.0, &key).await;
    let hb = json!({"sessions": 0, "titles": ["demo"]});
    let reason = |reply: &Value| reply["reason"].as_str().unwrap_or_default().to_string();
    let (status, reply) = call(&s, post("/api/v1/nodes/node-a/heartbeat", &hb)).await;
    assert_eq!((status, reason(&reply).as_str()), (StatusCode::UNAUTHORIZED, "unsigned"));
    let forger = SigningKey::from_bytes(&[9; 32]);
    let (status, reply) = call(&s, signed("/api/v1/nodes/node-a/heartbeat", &hb, &forger)).await;
    assert_eq!((status, reason(&reply).as_str()), (StatusCode::UNAUTHORIZED, "bad_signature"));
    let mut stale = signed("/api/v1/nodes/node-a/heartbeat", &hb, &key);
    stale.headers_mut().insert("x-pylon-timestamp", (unix_now() - 3600).to_string().parse().unwrap());
    assert_eq!(reason(&call(&s, stale).await.1), "stale");
    let first = signed("/api/v1/nodes/node-a/heartbeat", &hb, &key);
    let mut copy = Request::post("/api/v1/nodes/node-a/heartbeat").body(Body::from(hb.to_string())).unwrap();
    *copy.headers_mut() = first.headers().clone();
    assert_eq!(call(&s, first).await.0, StatusCode::OK);
    assert_eq!(reason(&call(&s, copy).await.1), "replayed");
    let body = node_body("node-a", "mallory", 0.0, &forger);
    assert_eq!(reason(&call(&s, signed("/api/v1/nodes", &body, &forger)).await.1), "key_conflict");
    assert_eq!(reason(&call(&s, post("/api/v1/nodes/node-a/revoke", &json!({}))).await.1), "not_admin");
    assert_eq!(reason(&call(&s, get("/api/v1/nodes/nobody")).await.1), "not_found");
    assert_eq!(reason(&call(&s, get("/api/v1/nodes/%FF")).await.1), "not_found", "an id that is not UTF-8");
    assert_eq!(reason(&call(&s, post("/api/v1/nodes", &json!({"id": 5}))).await.1), "malformed");
    let nul = json!({"title": "de\u{0}mo", "client_rtt_ms": {}});
    assert_eq!(reason(&call(&s, post("/api/v1/sessions", &nul)).await.1), "invalid");

    // No relay knows the node: no capacity, with when to come back.
    let req = json!({"title": "demo", "client_rtt_ms": {"relay-1": 4.0}});
    let res = router(s.clone()).oneshot(post("/api/v1/sessions", &req)).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    let retry = res.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    let bytes = axum::body::to_bytes(res.into_body(), 1 << 20).await.unwrap();
    let reply: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(reason(&reply), "no_capacity");
    assert_eq!(retry, Some(5));
    assert_eq!(reply["retry_after_secs"], 5);

    // Rate limits say the same.
    let strict = state_with(Policy::default()).await;
    add_demo_title(&strict).await;
    let mut last = (StatusCode::OK, Value::Null);
    for _ in 0..20 {
        last = call(&strict, from("198.51.100.7:1", post("/api/v1/sessions", &req))).await;
    }
    assert_eq!((last.0, reason(&last.1).as_str()), (StatusCode::TOO_MANY_REQUESTS, "rate_limited"));
    assert!(last.1["retry_after_secs"].as_u64().unwrap() >= 1);
}

#[tokio::test]
async fn listings_page_with_a_cursor_and_filter_by_state_region_and_title() {
    let s = state().await;
    add_demo_title(&s).await;
    // 1,200 nodes: more than the largest page.
    let now = unix_now();
    for i in 0..1200 {
        let record = pylon_indexer::store::NodeRecord {
            id: format!("node-{i:05}"),
            provider: format!("p{}", i % 7),
            public_key: pk(&SigningKey::from_bytes(&[(i % 250) as u8 + 1; 32])),
            info: json!({"region": if i % 3 == 0 { "eu" } else { "us" }}),
            capacity: 1,
            sessions: 0,
            price_per_hour: 1.0,
            gpu_class: 1,
            encode_ms: 4.0,
            titles: if i % 10 == 0 { vec!["demo".into(), "bsu".into()] } else { vec!["demo".into()] },
            draining: false,
            revoked: false,
            approved: true,
            seats: 0,
            verdict: Default::default(),
            last_heartbeat: if i % 4 == 0 { now - 3600 } else { now },
        };
        assert!(s.store.register_node(&record, 1).await.unwrap());
    }
    let (status, first) = call(&s, get("/api/v1/nodes")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(first["items"].as_array().unwrap().len(), 100, "100 per page by default");
    let (_, biggest) = call(&s, get("/api/v1/nodes?limit=1000")).await;
    assert_eq!(biggest["items"].as_array().unwrap().len(), 1000);
    assert!(biggest["next_cursor"].is_string(), "1,200 nodes are never one response");

    // Walking the cursor visits every node once, in order; filters combine.
    let walk = |query: &'static str| {
        let s = s.clone();
        async move {
            let mut ids = Vec::new();
            let mut cursor: Option<String> = None;
            loop {
                let path = match &cursor {
                    Some(c) => format!("/api/v1/nodes?{query}&cursor={c}"),
                    None => format!("/api/v1/nodes?{query}"),
                };
                let (status, page) = call(&s, get(&path)).await;
                assert_eq!(status, StatusCode::OK, "{path}: {page}");
                ids.extend(page["items"].as_array().unwrap().iter().map(|n| n["id"].as_str().unwrap().to_string()));
                match page["next_cursor"].as_str() {
                    Some(c) => cursor = Some(c.to_string()),
                    None => return ids,
                }
            }
        }
    };
    let all = walk("limit=333").await;
    assert_eq!(all.len(), 1200);
    assert!(all.windows(2).all(|w| w[0] < w[1]), "in id order, no repeats");
    let eu = walk("limit=50&region=eu").await;
    assert_eq!(eu.len(), 400);
    let bsu_ready = walk("limit=7&title=bsu&state=ready").await;
    // i % 10 == 0 has bsu; of those, i % 4 == 0 (i % 20 == 0) are gone.
    assert_eq!(bsu_ready.len(), 60);
    assert_eq!(walk("state=gone").await.len(), 300);

    for bad in [
        "/api/v1/nodes?limit=0",
        "/api/v1/nodes?limit=1001",
        "/api/v1/nodes?cursor=%%%",
        "/api/v1/nodes?state=asleep",
        "/api/v1/titles?cursor=eyJ4Ijoi",
    ] {
        let (status, reply) = call(&s, get(bad)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
        assert!(["malformed", "invalid"].contains(&reply["reason"].as_str().unwrap()), "{bad}: {reply}");
    }

    // Usage pages by provider, relays by id.
    let (_, usage) = call(&s, get("/api/v1/usage?limit=3")).await;
    assert!(usage["items"].as_array().unwrap().is_empty(), "no sessions yet");
    let relay = SigningKey::from_bytes(&[3; 32]);
    add_relay(&s, "relay-1", &relay, json!({})).await;
    let (_, relays) = call(&s, get("/api/v1/relays?region=eu&state=ready")).await;
    assert_eq!(relays["items"][0]["id"], "relay-1");
    let (_, none) = call(&s, get("/api/v1/relays?region=mars")).await;
    assert!(none["items"].as_array().unwrap().is_empty());
}

#[tokio::test]
async fn studios_add_read_page_and_remove_titles() {
    let s = state().await;
    for i in 0..5 {
        let title = json!({"id": format!("t{i}"), "name": format!("Game {}", 4 - i), "description": "", "launch": "builtin:demo",
                           "min_gpu_class": 0, "width": 1280, "height": 720, "fps": 60});
        assert_eq!(call(&s, admin(post("/api/v1/titles", &title))).await.0, StatusCode::CREATED);
    }
    let bad = json!({"id": "no spaces", "name": "x", "description": "", "launch": "builtin:demo",
                     "min_gpu_class": 0, "width": 1280, "height": 720, "fps": 60});
    assert_eq!(call(&s, admin(post("/api/v1/titles", &bad))).await.1["reason"], "invalid");
    // A studio title with its probe: stored and served as given; a probe with a key the
    // player's input cannot carry, or the same key twice, is refused.
    let probed = |keys: Value| {
        json!({"id": "bsu", "name": "Zz B.S.U.", "description": "", "launch": "exec", "command": "/usr/games/chromium-bsu",
               "min_gpu_class": 0, "width": 1280, "height": 720, "fps": 60,
               "probe": {"setup": ["Enter"], "keys": keys, "hold_ms": 250}})
    };
    for keys in [json!(["ArrowLeft", "NoSuchKey"]), json!(["ArrowLeft", "ArrowLeft"])] {
        assert_eq!(call(&s, admin(post("/api/v1/titles", &probed(keys)))).await.1["reason"], "invalid");
    }
    let (status, _) = call(&s, admin(post("/api/v1/titles", &probed(json!(["ArrowLeft", "ArrowRight"]))))).await;
    assert_eq!(status, StatusCode::CREATED);
    let (_, stored) = call(&s, get("/api/v1/titles/bsu")).await;
    assert_eq!(stored["probe"], json!({"setup": ["Enter"], "keys": ["ArrowLeft", "ArrowRight"], "hold_ms": 250}));
    assert_eq!(
        call(&s, admin(Request::delete("/api/v1/titles/bsu").body(Body::empty()).unwrap())).await.0,
        StatusCode::NO_CONTENT
    );
    let (_, page) = call(&s, get("/api/v1/titles?limit=2")).await;
    let names: Vec<_> = page["items"].as_array().unwrap().iter().map(|t| t["name"].clone()).collect();
    assert_eq!(names, ["Game 0", "Game 1"], "by name");
    let cursor = page["next_cursor"].as_str().unwrap().to_string();
    let (_, rest) = call(&s, get(&format!("/api/v1/titles?limit=10&cursor={cursor}"))).await;
    assert_eq!(rest["items"].as_array().unwrap().len(), 3);
    assert!(rest.get("next_cursor").is_none());
    assert_eq!(call(&s, get("/api/v1/titles/t2")).await.1["name"], "Game 2");
    let delete = |id: &str| Request::delete(format!("/api/v1/titles/{id}")).body(Body::empty()).unwrap();
    assert_eq!(call(&s, delete("t2")).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(call(&s, admin(delete("t2"))).await.0, StatusCode::NO_CONTENT);
    assert_eq!(call(&s, get("/api/v1/titles/t2")).await.0, StatusCode::NOT_FOUND);
    assert_eq!(call(&s, admin(delete("t2"))).await.0, StatusCode::NOT_FOUND);
    assert_eq!(
        call(&s, get("/api/v1/candidates/t2")).await.0,
        StatusCode::NOT_FOUND,
        "no candidates for a removed title"
    );
}

fn checker_body(id: &str, key: &SigningKey) -> Value {
    json!({"id": id, "owner": "pool-operator", "public_key": pk(key)})
}

/// Registers checker `id` and has the operator approve it.
async fn add_checker(s: &AppState, id: &str, key: &SigningKey) {
    let (status, reply) = call(s, signed("/api/v1/checkers", &checker_body(id, key), key)).await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    assert_eq!(reply["state"], "pending", "a new checker waits for the operator: {reply}");
    let approve = Request::post(format!("/api/v1/checkers/{id}/approve")).body(Body::empty()).unwrap();
    assert_eq!(call(s, admin(approve)).await.0, StatusCode::NO_CONTENT);
}

async fn next_check(s: &AppState, id: &str, key: &SigningKey) -> (StatusCode, Value) {
    call(s, signed(&format!("/api/v1/checkers/{id}/checks"), &Value::Null, key)).await
}

fn outcome(passed: bool) -> Value {
    json!({"passed": passed, "failures": if passed { json!([]) } else { json!(["fps 29.9 < 57 (advertised 60)"]) },
           "fps": if passed { 59.9 } else { 29.9 }, "frames": 600, "wrong_size": 0, "freezes": 0,
           "bitrate_kbps": 4000.0, "rtt_ms": 0.5, "click_to_photon_p50_ms": 55.0})
}

async fn report(s: &AppState, check: &Value, key: &SigningKey, passed: bool) -> (StatusCode, Value) {
    let id = check["check"].as_str().unwrap();
    call(s, signed(&format!("/api/v1/checks/{id}/report"), &outcome(passed), key)).await
}

async fn node_status(s: &AppState, id: &str) -> Value {
    let (_, page) = call(s, get("/api/v1/nodes")).await;
    page["items"].as_array().unwrap().iter().find(|n| n["id"] == id).cloned().unwrap()
}

#[tokio::test]
async fn checkers_prove_their_key_and_wait_for_the_operators_approval() {
    let s = state().await;
    let (key, other) = (SigningKey::from_bytes(&[21; 32]), SigningKey::from_bytes(&[22; 32]));
    // A registration signed by another key than the one it registers.
    let (status, reply) = call(&s, signed("/api/v1/checkers", &checker_body("checker-1", &key), &other)).await;
    assert_eq!((status, reply["reason"].as_str()), (StatusCode::UNAUTHORIZED, Some("bad_signature")));
    let (status, reply) = call(&s, signed("/api/v1/checkers", &checker_body("checker-1", &key), &key)).await;
    assert_eq!((status, reply["state"].as_str()), (StatusCode::OK, Some("pending")), "{reply}");
    // Unapproved: no checks.
    let (status, reply) = next_check(&s, "checker-1", &key).await;
    assert_eq!((status, reply["reason"].as_str()), (StatusCode::FORBIDDEN, Some("pending")));
    // Someone else cannot take the id over, nor ask in its name.
    let (status, _) = call(&s, signed("/api/v1/checkers", &checker_body("checker-1", &other), &other)).await;
    assert_eq!(status, StatusCode::CONFLICT);
    let approve = || Request::post("/api/v1/checkers/checker-1/approve").body(Body::empty()).unwrap();
    assert_eq!(call(&s, approve()).await.0, StatusCode::UNAUTHORIZED, "approval needs the admin token");
    assert_eq!(call(&s, admin(approve())).await.0, StatusCode::NO_CONTENT);
    let (status, reply) = next_check(&s, "checker-1", &other).await;
    assert_eq!((status, reply["reason"].as_str()), (StatusCode::UNAUTHORIZED, Some("bad_signature")));
    // Approved, with nothing to check.
    assert_eq!(next_check(&s, "checker-1", &key).await.0, StatusCode::NO_CONTENT);
    // A replayed request is refused.
    let replay = signed_with("/api/v1/checkers/checker-1/checks", &Value::Null, &key, 5);
    assert_eq!(call(&s, replay).await.0, StatusCode::UNAUTHORIZED);
    // Revoked: refused.
    let revoke = Request::post("/api/v1/checkers/checker-1/revoke").body(Body::empty()).unwrap();
    assert_eq!(call(&s, admin(revoke)).await.0, StatusCode::NO_CONTENT);
    let (status, reply) = next_check(&s, "checker-1", &key).await;
    assert_eq!((status, reply["reason"].as_str()), (StatusCode::FORBIDDEN, Some("revoked")));
}

#[tokio::test]
async fn a_check_takes_a_free_seat_with_its_own_token_and_only_its_checker_reports_it() {
    let s = state().await;
    add_demo_title(&s).await;
    let (node, relay) = (SigningKey::from_bytes(&[1; 32]), SigningKey::from_bytes(&[3; 32]));
    let (checker, intruder) = (SigningKey::from_bytes(&[21; 32]), SigningKey::from_bytes(&[22; 32]));
    add_node(&s, "node-a", "alice", 1.0, &node).await; // two seats
    add_relay(&s, "relay-1", &relay, json!({"node-a": 2.0})).await;
    add_checker(&s, "checker-1", &checker).await;
    add_checker(&s, "checker-2", &intruder).await;
    assert_eq!(node_status(&s, "node-a").await["score"]["verdict"], "unchecked");

    // Both seats taken by players: the check waits (it never disturbs play).
    let play = json!({"title": "demo", "client_rtt_ms": {"relay-1": 4.0}});
    let (_, p1) = call(&s, post("/api/v1/sessions", &play)).await;
    let (_, p2) = call(&s, post("/api/v1/sessions", &play)).await;
    assert_eq!(next_check(&s, "checker-1", &checker).await.0, StatusCode::NO_CONTENT, "a full node is not checked");
    let end = json!({"reason": "player left"});
    let path = format!("/api/v1/sessions/{}/end", p2["session"].as_str().unwrap());
    assert_eq!(call(&s, signed(&path, &end, &relay)).await.0, StatusCode::NO_CONTENT);

    // One seat free: the check takes it, in a session of its own.
    let (status, check) = next_check(&s, "checker-1", &checker).await;
    assert_eq!(status, StatusCode::CREATED, "{check}");
    assert_eq!(
        (check["node"].as_str(), check["title"].as_str(), check["demo"].as_bool()),
        (Some("node-a"), Some("demo"), Some(true))
    );
    assert_eq!(
        (check["width"].as_u64(), check["height"].as_u64(), check["fps"].as_u64()),
        (Some(1280), Some(720), Some(60))
    );
    let session = check["session"].as_str().unwrap();
    assert_ne!(Some(session), p1["session"].as_str(), "never the player's session");
    assert_eq!(check["play_url"], format!("http://relay-1.example:8080/play/{session}"));
    let claims = verify(check["token"].as_str().unwrap(), &indexer_key(&s), unix_now() as u64).unwrap();
    assert_eq!(claims.role, Role::Checker);
    assert_eq!(
        (claims.session_hex().as_str(), claims.node.as_str(), claims.relay.as_str()),
        (session, "node-a", "relay-1")
    );
    // The node is now full, and the check holds it: nothing more to hand out.
    assert_eq!(next_check(&s, "checker-2", &intruder).await.0, StatusCode::NO_CONTENT);
    let (status, _) = call(&s, post("/api/v1/sessions", &play)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "the check holds a seat like a player");

    // Another (approved) checker's signature, or none, does not count.
    let (status, reply) = report(&s, &check, &intruder, false).await;
    assert_eq!((status, reply["reason"].as_str()), (StatusCode::UNAUTHORIZED, Some("bad_signature")));
    let path = format!("/api/v1/checks/{}/report", check["check"].as_str().unwrap());
    assert_eq!(call(&s, post(&path, &outcome(true))).await.0, StatusCode::UNAUTHORIZED);
    // Nonsense figures are refused.
    let mut bad = outcome(true);
    bad["fps"] = json!(-1.0);
    assert_eq!(call(&s, signed(&path, &bad, &checker)).await.0, StatusCode::BAD_REQUEST);
    let mut bad = outcome(true);
    bad["failures"] = json!(["froze"]);
    assert_eq!(call(&s, signed(&path, &bad, &checker)).await.0, StatusCode::BAD_REQUEST, "a pass with failures");

    let (status, score) = report(&s, &check, &checker, true).await;
    assert_eq!(status, StatusCode::OK, "{score}");
    assert_eq!(
        (score["verdict"].as_str(), score["checks"].as_u64(), score["passed"].as_u64()),
        (Some("passing"), Some(1), Some(1))
    );
    assert_eq!(score["fps"], 59.9);
    // Once only.
    let (status, reply) = report(&s, &check, &checker, false).await;
    assert_eq!((status, reply["reason"].as_str()), (StatusCode::CONFLICT, Some("closed")));

    // The check's session ended and freed its seat; it is not billed as play.
    let (status, created) = call(&s, post("/api/v1/sessions", &play)).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let listed = node_status(&s, "node-a").await;
    assert_eq!((listed["state"].as_str(), listed["score"]["pass_rate"].as_f64()), (Some("ready"), Some(1.0)));
    let (_, usage) = call(&s, get("/api/v1/usage")).await;
    assert_eq!(usage["items"][0]["sessions"], 3, "three players, the check not counted: {usage}");
    // Not due again for about an interval.
    let path = format!("/api/v1/sessions/{}/end", created["session"].as_str().unwrap());
    assert_eq!(call(&s, signed(&path, &end, &relay)).await.0, StatusCode::NO_CONTENT);
    assert_eq!(next_check(&s, "checker-1", &checker).await.0, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn failed_checks_make_a_node_suspect_then_failed_and_with_several_checkers_the_majority_decides() {
    let s = state().await;
    add_demo_title(&s).await;
    let relay = SigningKey::from_bytes(&[3; 32]);
    let keys: Vec<SigningKey> = (0..3).map(|i| SigningKey::from_bytes(&[30 + i; 32])).collect();
    add_checker(&s, "checker-0", &keys[0]).await;
    let (honest, faker) = (SigningKey::from_bytes(&[1; 32]), SigningKey::from_bytes(&[2; 32]));
    add_node(&s, "node-h", "alice", 1.0, &honest).await;
    add_node(&s, "node-f", "mallory", 0.1, &faker).await;
    add_relay(&s, "relay-1", &relay, json!({"node-h": 2.0, "node-f": 2.0})).await;
    let play = json!({"title": "demo", "client_rtt_ms": {"relay-1": 4.0}});

    // One checker alone: the faker fails, becomes suspect (no new players) and is checked
    // again at once; failing again, it is out of the pool.
    let mut checks = Vec::new();
    for _ in 0..2 {
        let (status, c) = next_check(&s, "checker-0", &keys[0]).await;
        assert_eq!(status, StatusCode::CREATED, "{c}");
        checks.push(c);
    }
    let (on_f, on_h) = if checks[0]["node"] == "node-f" { (&checks[0], &checks[1]) } else { (&checks[1], &checks[0]) };
    assert_eq!(report(&s, on_h, &keys[0], true).await.0, StatusCode::OK);
    let (_, score) = report(&s, on_f, &keys[0], false).await;
    assert_eq!(score["verdict"], "suspect");
    assert_eq!(node_status(&s, "node-f").await["state"], "suspect");
    for _ in 0..5 {
        let (status, created) = call(&s, post("/api/v1/sessions", &play)).await;
        assert_eq!(
            (status, created["node"].as_str()),
            (StatusCode::CREATED, Some("node-h")),
            "a suspect node gets no players"
        );
        let path = format!("/api/v1/sessions/{}/end", created["session"].as_str().unwrap());
        call(&s, signed(&path, &json!({"reason": "left"}), &relay)).await;
    }
    let (status, again) = next_check(&s, "checker-0", &keys[0]).await;
    assert_eq!((status, again["node"].as_str()), (StatusCode::CREATED, Some("node-f")), "re-checked at once");
    let (_, score) = report(&s, &again, &keys[0], false).await;
    assert_eq!(score["verdict"], "failed");
    assert_eq!(node_status(&s, "node-f").await["state"], "failed");
    let res = router(s.clone()).oneshot(get("/metrics")).await.unwrap();
    let text = String::from_utf8(axum::body::to_bytes(res.into_body(), 1 << 20).await.unwrap().to_vec()).unwrap();
    assert!(text.contains("pylon_indexer_nodes{state=\"failed\"} 1"), "{text}");
    assert!(text.contains("pylon_indexer_check_reports_total{result=\"fail\"} 2"), "{text}");
    // Two more checkers join.
    for (i, k) in keys.iter().enumerate().skip(1) {
        add_checker(&s, &format!("checker-{i}"), k).await;
    }
    assert_eq!(next_check(&s, "checker-1", &keys[1]).await.0, StatusCode::NO_CONTENT, "a failed node is not checked");
    // The operator re-admits it: checked anew.
    let approve = Request::post("/api/v1/nodes/node-f/approve").body(Body::empty()).unwrap();
    assert_eq!(call(&s, admin(approve)).await.0, StatusCode::NO_CONTENT);
    assert_eq!(node_status(&s, "node-f").await["state"], "ready");

    // Three checkers (2N+1, N = 1): one that fails an honest node alone is outvoted.
    let (_, c) = next_check(&s, "checker-0", &keys[0]).await;
    assert_eq!(c["node"], "node-f");
    let (_, score) = report(&s, &c, &keys[0], false).await; // a lying (or unlucky) checker
    assert_eq!(score["verdict"], "suspect", "one checker's word, until others check");
    // It cannot confirm its own suspicion while other checkers are active.
    assert_eq!(
        next_check(&s, "checker-0", &keys[0]).await.0,
        StatusCode::NO_CONTENT,
        "the suspicion is confirmed by another checker"
    );
    let (_, c) = next_check(&s, "checker-1", &keys[1]).await;
    assert_eq!(c["node"], "node-f", "a suspect node goes to the next checker at once");
    let (_, score) = report(&s, &c, &keys[1], true).await;
    assert_eq!(score["verdict"], "suspect", "one against one decides nothing");
    let (_, c) = next_check(&s, "checker-2", &keys[2]).await;
    assert_eq!(c["node"], "node-f");
    let (_, score) = report(&s, &c, &keys[2], true).await;
    assert_eq!(score["verdict"], "passing", "two of three");
    assert_eq!(node_status(&s, "node-f").await["state"], "ready");
}

#[tokio::test]
async fn a_ghost_nodes_phantom_sessions_fail_every_metering_audit_and_an_honest_node_passes_every_one() {
    use pylon_indexer_client::api::CheckAssignment;
    let s = state().await;
    add_demo_title(&s).await;
    let relay = SigningKey::from_bytes(&[3; 32]);
    let checker = SigningKey::from_bytes(&[21; 32]);
    add_checker(&s, "checker-1", &checker).await;
    let (honest, ghost) = (SigningKey::from_bytes(&[1; 32]), SigningKey::from_bytes(&[2; 32]));
    add_node(&s, "node-h", "alice", 1.0, &honest).await;
    add_node(&s, "node-g", "mallory", 5.0, &ghost).await;
    add_relay(&s, "relay-1", &relay, json!({"node-h": 2.0, "node-g": 3.0})).await;
    // A real player on the honest node (the cheaper one), which says so.
    let play = json!({"title": "demo", "client_rtt_ms": {"relay-1": 4.0}});
    let (_, created) = call(&s, post("/api/v1/sessions", &play)).await;
    assert_eq!(created["node"], "node-h");
    let played = created["session"].as_str().unwrap().to_string();
    let hb = json!({"sessions": 1, "running": [played], "titles": ["demo"]});
    assert_eq!(call(&s, signed("/api/v1/nodes/node-h/heartbeat", &hb, &honest)).await.0, StatusCode::OK);
    // The ghost claims two sessions that never existed and one that ended a minute ago.
    let now = unix_now();
    let old = pylon_indexer::store::SessionRecord {
        id: "77".repeat(16),
        title: "demo".into(),
        node: "node-g".into(),
        provider: "mallory".into(),
        relay: "relay-1".into(),
        gpu_class: 3,
        started_at: now - 600,
        check: false,
    };
    assert!(s.store.start_session(&old, 2).await.unwrap());
    assert!(s.store.end_session(&old.id, now - 60, "player left").await.unwrap());
    let hb = json!({"sessions": 3, "running": ["ab".repeat(16), "cd".repeat(16), "77".repeat(16)], "titles": ["demo"]});
    assert_eq!(call(&s, signed("/api/v1/nodes/node-g/heartbeat", &hb, &ghost)).await.0, StatusCode::OK);
    // A heartbeat listing absurdly many sessions is refused.
    let flood: Vec<String> = (0..2000).map(|i| format!("{i:032x}")).collect();
    let hb = json!({"sessions": 2000, "running": flood, "titles": ["demo"]});
    assert_eq!(call(&s, signed("/api/v1/nodes/node-g/heartbeat", &hb, &ghost)).await.0, StatusCode::BAD_REQUEST);

    // 20 checks of each (the operator re-admits the ghost after each verdict, so that
    // every check is a fresh one): the ghost fails all, the honest node none.
    let (mut caught, mut false_alarms) = (0, 0);
    for _ in 0..20 {
        // Both are due: each is handed out once (the first is held while checked).
        let mut checks = Vec::new();
        for _ in 0..2 {
            let (status, c) = next_check(&s, "checker-1", &checker).await;
            assert_eq!(status, StatusCode::CREATED, "{c}");
            checks.push(c);
        }
        for c in checks {
            let a: CheckAssignment = serde_json::from_value(c.clone()).unwrap();
            let failure = a.audit.failure();
            match a.node.as_str() {
                "node-g" => {
                    assert_eq!(a.audit.claimed, 3);
                    let mut phantom = a.audit.phantom.clone();
                    phantom.sort();
                    assert_eq!(phantom, vec!["77".repeat(16), "ab".repeat(16), "cd".repeat(16)]);
                    caught += usize::from(failure.is_some());
                }
                _ => false_alarms += usize::from(failure.is_some()),
            }
            let (status, _) = report(&s, &c, &checker, failure.is_none()).await;
            assert_eq!(status, StatusCode::OK);
            let approve = Request::post(format!("/api/v1/nodes/{}/approve", a.node)).body(Body::empty()).unwrap();
            assert_eq!(call(&s, admin(approve)).await.0, StatusCode::NO_CONTENT);
        }
    }
    assert_eq!((caught, false_alarms), (20, 0));
}

#[tokio::test]
async fn two_replicas_on_one_database_hand_out_one_check_per_turn_and_share_everything_else() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = replicas(dir.path()).await;
    add_demo_title(&a).await;
    let (node, relay) = (SigningKey::from_bytes(&[1; 32]), SigningKey::from_bytes(&[3; 32]));
    let (c1, c2) = (SigningKey::from_bytes(&[21; 32]), SigningKey::from_bytes(&[22; 32]));
    // Registered through A, approved through B: one pool.
    add_node(&a, "node-a", "alice", 1.0, &node).await; // two seats
    add_relay(&b, "relay-1", &relay, json!({"node-a": 2.0})).await;
    add_checker(&a, "checker-1", &c1).await;
    add_checker(&b, "checker-2", &c2).await;
    // A nonce spent through one replica is spent for both.
    let replay = signed_with("/api/v1/checkers/checker-1/checks", &Value::Null, &c1, NONCES.next());
    let again = Request::post("/api/v1/checkers/checker-1/checks")
        .header("content-type", "application/json")
        .header("x-pylon-timestamp", replay.headers()["x-pylon-timestamp"].clone())
        .header("x-pylon-nonce", replay.headers()["x-pylon-nonce"].clone())
        .header("x-pylon-signature", replay.headers()["x-pylon-signature"].clone())
        .body(Body::from(Value::Null.to_string()))
        .unwrap();
    let (first, check) = call(&a, replay).await;
    assert_eq!(first, StatusCode::CREATED, "{check}");
    assert_eq!(call(&b, again).await.0, StatusCode::UNAUTHORIZED, "replayed through the other replica");
    assert_eq!(node_status(&b, "node-a").await["seats"], 1, "B sees the seat A's check took");
    // Reported through B (which ends its session: both seats free again, seen by A), and
    // the operator's approval makes the node due at once.
    assert_eq!(report(&b, &check, &c1, true).await.0, StatusCode::OK);
    let approve = Request::post("/api/v1/nodes/node-a/approve").body(Body::empty()).unwrap();
    assert_eq!(call(&b, admin(approve)).await.0, StatusCode::NO_CONTENT);
    assert_eq!(node_status(&a, "node-a").await["seats"], 0);

    // Two checkers ask two replicas at the same moment for the node's next turn: the
    // database hands it to one of them only (the other gets nothing to do), though two
    // seats are free.
    let (r1, r2) = tokio::join!(next_check(&a, "checker-1", &c1), next_check(&b, "checker-2", &c2));
    let created = [&r1, &r2].iter().filter(|r| r.0 == StatusCode::CREATED).count();
    assert_eq!(created, 1, "one check per turn, not one per replica: {r1:?} {r2:?}");
    assert_eq!(node_status(&a, "node-a").await["seats"], 1, "one seat taken by the one check");

    // A session matched through B ends through A.
    let play = json!({"title": "demo", "client_rtt_ms": {"relay-1": 4.0}});
    let (status, p) = call(&b, post("/api/v1/sessions", &play)).await;
    assert_eq!(status, StatusCode::CREATED, "{p}");
    let path = format!("/api/v1/sessions/{}/end", p["session"].as_str().unwrap());
    assert_eq!(call(&a, signed(&path, &json!({"reason": "player left"}), &relay)).await.0, StatusCode::NO_CONTENT);
    assert_eq!(node_status(&b, "node-a").await["seats"], 1);
}

#[tokio::test]
async fn replicas_are_listed_and_only_their_pages_may_call_the_api_across_origins() {
    let s =
        state().await.with_replicas(vec!["https://indexer-1.example/".into(), "https://indexer-2.example:8443".into()]);
    let (status, body) = call(&s, get("/api/v1/replicas")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({"replicas": ["https://indexer-1.example", "https://indexer-2.example:8443"]}));
    let from = |origin: &str| Request::get("/api/v1/titles").header("origin", origin).body(Body::empty()).unwrap();
    for (origin, allowed) in [
        ("https://indexer-2.example:8443", true),
        ("https://indexer-1.example", true),
        ("https://indexer-2.example", false),
        ("https://evil.example", false),
    ] {
        let res = router(s.clone()).oneshot(from(origin)).await.unwrap();
        let allow = res.headers().get("access-control-allow-origin").map(|v| v.to_str().unwrap().to_string());
        assert_eq!(allow.as_deref() == Some(origin), allowed, "{origin}: {allow:?}");
        assert!(allow.is_none() || allowed, "{origin}");
    }
    // A preflight for the session request from the other replica's page.
    let preflight = Request::builder()
        .method("OPTIONS")
        .uri("/api/v1/sessions")
        .header("origin", "https://indexer-2.example:8443")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "content-type")
        .body(Body::empty())
        .unwrap();
    let res = router(s.clone()).oneshot(preflight).await.unwrap();
    assert!(res.status().is_success(), "{}", res.status());
    assert_eq!(res.headers()["access-control-allow-origin"], "https://indexer-2.example:8443");
    // One replica named by nobody: no cross-origin calls at all.
    let alone = state().await;
    let res = router(alone).oneshot(from("https://indexer-1.example")).await.unwrap();
    assert!(res.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn a_relay_registers_the_sha256_of_its_certificate_for_nodes_to_pin() {
    let s = state().await;
    let key = SigningKey::from_bytes(&[3; 32]);
    let body = |cert: &str| {
        json!({"id": "relay-1", "owner": "box-owner", "public_key": pk(&key), "public_url": "http://relay-1.example:8080",
            "quic_addr": "127.0.0.1:4433", "region": "eu", "capacity": 50, "cert_sha256": cert})
    };
    for bad in ["AB".repeat(32), "ab".repeat(31), "zz".repeat(32)] {
        let (status, reply) = call(&s, signed("/api/v1/relays", &body(&bad), &key)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {reply}");
    }
    let (status, _) = call(&s, signed("/api/v1/relays", &body(&"ab".repeat(32)), &key)).await;
    assert_eq!(status, StatusCode::OK);
    let (_, page) = call(&s, get("/api/v1/relays")).await;
    assert_eq!(page["items"][0]["cert_sha256"], "ab".repeat(32), "{page}");
    // The listing is signed: a node dials and pins only what the indexer vouches for.
    let listed: pylon_indexer_client::api::RelayEntry = serde_json::from_value(page["items"][0].clone()).unwrap();
    assert!(listed.attested_by(&indexer_key(&s)), "{page}");
    for tampered in [
        pylon_indexer_client::api::RelayEntry { quic_addr: "10.0.0.66:4433".into(), ..listed.clone() },
        pylon_indexer_client::api::RelayEntry { cert_sha256: "ef".repeat(32), ..listed.clone() },
        pylon_indexer_client::api::RelayEntry { public_key: pk(&SigningKey::from_bytes(&[9; 32])), ..listed.clone() },
    ] {
        assert!(!tampered.attested_by(&indexer_key(&s)), "{tampered:?}");
    }
    assert!(!listed.attested_by(&SigningKey::from_bytes(&[9; 32]).verifying_key()));
    // A new certificate (the relay's data directory was replaced) is registered again.
    let (status, _) = call(&s, signed("/api/v1/relays", &body(&"cd".repeat(32)), &key)).await;
    assert_eq!(status, StatusCode::OK);
    let (_, page) = call(&s, get("/api/v1/relays")).await;
    assert_eq!(page["items"][0]["cert_sha256"], "cd".repeat(32), "{page}");
    // The attestation follows the record (signed once per record and kept, never stale).
    let relisted: pylon_indexer_client::api::RelayEntry = serde_json::from_value(page["items"][0].clone()).unwrap();
    assert!(relisted.attested_by(&indexer_key(&s)), "{page}");
    assert_ne!(relisted.attestation, listed.attestation);
    let (_, again) = call(&s, get("/api/v1/relays")).await;
    assert_eq!(again["items"][0]["attestation"], page["items"][0]["attestation"]);
}

#[tokio::test]
async fn a_player_whose_relay_dies_moves_its_session_with_its_token_and_only_the_newest_token_moves_it() {
    let s = state().await;
    add_demo_title(&s).await;
    let (node, r1, r2, r3) = (
        SigningKey::from_bytes(&[1; 32]),
        SigningKey::from_bytes(&[3; 32]),
        SigningKey::from_bytes(&[4; 32]),
        SigningKey::from_bytes(&[5; 32]),
    );
    add_node(&s, "node-a", "alice", 1.0, &node).await;
    add_relay(&s, "relay-1", &r1, json!({"node-a": 2.0})).await;
    add_relay(&s, "relay-2", &r2, json!({"node-a": 3.0})).await;
    add_relay(&s, "relay-3", &r3, json!({})).await;
    let req = json!({"title": "demo", "client_rtt_ms": {"relay-1": 1.0, "relay-2": 30.0, "relay-3": 0.5}});
    let (_, created) = call(&s, post("/api/v1/sessions", &req)).await;
    assert_eq!(created["relay"], "relay-1", "{created}");
    let id = created["session"].as_str().unwrap().to_string();
    let first = created["token"].as_str().unwrap().to_string();
    let path = format!("/api/v1/sessions/{id}/move");

    // Not this session's token, or no token at all: refused.
    let (_, other) = call(&s, post("/api/v1/sessions", &req)).await;
    let (status, body) = call(&s, post(&path, &json!({"token": other["token"]}))).await;
    assert_eq!((status, body["reason"].as_str()), (StatusCode::UNAUTHORIZED, Some("bad_signature")));
    assert_eq!(call(&s, post(&path, &json!({"token": "x"}))).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(call(&s, post(&path, &json!({}))).await.0, StatusCode::BAD_REQUEST);

    // relay-1 died. The nearest other relay that carries the node: relay-2 (relay-3 is
    // nearer the player but has no link to node-a).
    let (status, moved) = call(&s, post(&path, &json!({"token": first, "client_rtt_ms": {"relay-2": 4.0}}))).await;
    assert_eq!(status, StatusCode::CREATED, "{moved}");
    assert_eq!((moved["session"].as_str(), moved["relay"].as_str()), (Some(id.as_str()), Some("relay-2")));
    assert_eq!(moved["relay_url"], "http://relay-2.example:8080");
    let claims = verify(moved["token"].as_str().unwrap(), &indexer_key(&s), unix_now() as u64).unwrap();
    assert_eq!((claims.session_hex(), claims.role, claims.relay.as_str()), (id.clone(), Role::Player, "relay-2"));
    assert_eq!(s.store.session(&id).await.unwrap().unwrap().0, "relay-2", "the record moved");

    // The old token cannot move it again (a copy of it cannot steal the session).
    let (status, body) = call(&s, post(&path, &json!({"token": first}))).await;
    assert_eq!((status, body["reason"].as_str()), (StatusCode::CONFLICT, Some("superseded")));
    // The old relay can no longer end it; the new one can.
    let end = format!("/api/v1/sessions/{id}/end");
    assert_eq!(call(&s, signed(&end, &json!({}), &r1)).await.0, StatusCode::UNAUTHORIZED);
    // Named, it is told the session moved (so it stops retrying), and nothing ends.
    let (status, body) = call(&s, signed(&end, &json!({"relay": "relay-1"}), &r1)).await;
    assert_eq!((status, body["reason"].as_str()), (StatusCode::CONFLICT, Some("superseded")), "{body}");
    let (status, _) = call(&s, signed(&end, &json!({"relay": "relay-3"}), &r1)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "naming another relay proves nothing");
    assert!(s.store.session_running(&id).await.unwrap());
    // A spectator of the session follows it to its relay now.
    let (_, watch) = call(&s, post(&format!("/api/v1/sessions/{id}/spectate"), &json!({}))).await;
    assert_eq!(watch["relay"], "relay-2");
    let spectator = created_token_for(&s, &id, "relay-1", Role::Spectator);
    let (status, followed) = call(&s, post(&path, &json!({"token": spectator}))).await;
    assert_eq!(status, StatusCode::CREATED, "{followed}");
    let claims = verify(followed["token"].as_str().unwrap(), &indexer_key(&s), unix_now() as u64).unwrap();
    assert_eq!((claims.role, claims.relay.as_str()), (Role::Spectator, "relay-2"));

    // relay-2 dies too and relay-1 is back: the newest token moves it there.
    let (status, back) = call(&s, post(&path, &json!({"token": moved["token"]}))).await;
    assert_eq!((status, back["relay"].as_str()), (StatusCode::CREATED, Some("relay-1")), "{back}");
    // Nowhere left to go: retry later.
    s.store.relay_heartbeat("relay-2", 0, &Default::default(), unix_now() - 3600).await.unwrap();
    let (status, body) = call(&s, post(&path, &json!({"token": back["token"]}))).await;
    assert_eq!((status, body["reason"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("no_capacity")), "{body}");
    // The node is gone: the game is lost, and the page is told so.
    s.store.node_heartbeat("node-a", 1, std::slice::from_ref(&id), &["demo".into()], unix_now() - 3600).await.unwrap();
    let (status, body) = call(&s, post(&path, &json!({"token": back["token"]}))).await;
    assert_eq!((status, body["reason"].as_str()), (StatusCode::GONE, Some("node_gone")), "{body}");
    // An ended session (of a node that lives) cannot be moved.
    s.store.node_heartbeat("node-a", 1, std::slice::from_ref(&id), &["demo".into()], unix_now()).await.unwrap();
    assert_eq!(call(&s, admin(post(&end, &json!({})))).await.0, StatusCode::NO_CONTENT);
    assert_eq!(call(&s, post(&path, &json!({"token": back["token"]}))).await.0, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_moved_session_goes_to_the_relay_nearest_the_player_by_the_rtts_its_page_measured() {
    let s = state().await;
    add_demo_title(&s).await;
    let keys: Vec<SigningKey> = (3..6).map(|i| SigningKey::from_bytes(&[i; 32])).collect();
    add_node(&s, "node-a", "alice", 1.0, &SigningKey::from_bytes(&[1; 32])).await;
    add_relay(&s, "relay-1", &keys[0], json!({"node-a": 2.0})).await;
    add_relay(&s, "relay-2", &keys[1], json!({"node-a": 3.0})).await;
    add_relay(&s, "relay-3", &keys[2], json!({"node-a": 2.5})).await;
    let rtts = json!({"relay-1": 1.0, "relay-2": 5.0, "relay-3": 60.0});
    let (_, created) = call(&s, post("/api/v1/sessions", &json!({"title": "demo", "client_rtt_ms": rtts}))).await;
    assert_eq!(created["relay"], "relay-1", "{created}");
    let path = format!("/api/v1/sessions/{}/move", created["session"].as_str().unwrap());
    // relay-1 died: relay-2 is nearer this player than relay-3, though farther from the node.
    let (status, moved) = call(&s, post(&path, &json!({"token": created["token"], "client_rtt_ms": rtts}))).await;
    assert_eq!((status, moved["relay"].as_str()), (StatusCode::CREATED, Some("relay-2")), "{moved}");
    // Without RTTs only the relays' RTT to the node decides; a relay the page did not
    // measure counts as far as the farthest it did.
    let only_two = json!({"relay-2": 1.0, "relay-1": 10.0});
    let (status, back) = call(&s, post(&path, &json!({"token": moved["token"], "client_rtt_ms": only_two}))).await;
    assert_eq!((status, back["relay"].as_str()), (StatusCode::CREATED, Some("relay-1")), "{back}");
    let (status, next) = call(&s, post(&path, &json!({"token": back["token"]}))).await;
    assert_eq!((status, next["relay"].as_str()), (StatusCode::CREATED, Some("relay-3")), "{next}");
}

#[tokio::test]
async fn a_player_clearly_nearer_a_relay_the_node_is_not_linked_to_is_matched_there_and_the_node_told_to_link() {
    let s = state().await;
    add_demo_title(&s).await;
    let node = SigningKey::from_bytes(&[1; 32]);
    add_node(&s, "node-a", "alice", 1.0, &node).await;
    add_relay(&s, "relay-1", &SigningKey::from_bytes(&[3; 32]), json!({"node-a": 4.0})).await;
    add_relay(&s, "relay-2", &SigningKey::from_bytes(&[4; 32]), json!({"node-a": 20.0})).await;
    // relay-3 has not measured node-a: the node is not linked to it.
    add_relay(&s, "relay-3", &SigningKey::from_bytes(&[5; 32]), json!({})).await;
    let hb = json!({"sessions": 0, "titles": ["demo"]});
    let (status, reply) = call(&s, signed("/api/v1/nodes/node-a/heartbeat", &hb, &node)).await;
    assert_eq!((status, reply["relays"].clone()), (StatusCode::OK, json!([])), "{reply}");
    // The player is 2 ms from relay-3, 50 from relay-1: relay-3 wins by the node's farthest
    // measured RTT (20 ms): 2 + 20 against 50 + 4.
    let req = json!({"title": "demo", "client_rtt_ms": {"relay-1": 50.0, "relay-2": 60.0, "relay-3": 2.0}});
    let (status, created) = call(&s, post("/api/v1/sessions", &req)).await;
    assert_eq!((status, created["relay"].as_str()), (StatusCode::CREATED, Some("relay-3")), "{created}");
    assert!(created["reason"].as_str().unwrap().contains("not linked yet"), "{created}");
    // The node's next heartbeat names the relay to link to.
    let (_, reply) = call(&s, signed("/api/v1/nodes/node-a/heartbeat", &hb, &node)).await;
    assert_eq!(reply["relays"], json!(["relay-3"]), "{reply}");
    // A player about as near a linked relay goes there.
    let req = json!({"title": "demo", "client_rtt_ms": {"relay-1": 10.0, "relay-3": 2.0}});
    let (_, created) = call(&s, post("/api/v1/sessions", &req)).await;
    assert_eq!(created["relay"], "relay-1", "{created}");
    let (_, reply) = call(&s, signed("/api/v1/nodes/node-a/heartbeat", &hb, &node)).await;
    assert_eq!(reply["relays"], json!(["relay-1", "relay-3"]), "{reply}");
}

/// A token the indexer would have signed for session `id` on `relay` (as a spectator's page
/// holds one from before the player moved).
fn created_token_for(s: &AppState, id: &str, relay: &str, role: Role) -> String {
    let session: [u8; 16] =
        (0..16).map(|i| u8::from_str_radix(&id[2 * i..2 * i + 2], 16).unwrap()).collect::<Vec<_>>().try_into().unwrap();
    let now = unix_now() as u64;
    pylon_proto::token::Claims {
        session,
        role,
        issued_at: now,
        expires_at: now + 60,
        title: "demo".into(),
        node: "node-a".into(),
        relay: relay.into(),
    }
    .sign(&s.signing_key)
    .unwrap()
}

#[tokio::test]
async fn a_draining_relay_gets_no_new_viewers_nor_moved_sessions_until_it_registers_again() {
    let s = state().await;
    add_demo_title(&s).await;
    let (node, r1, r2) =
        (SigningKey::from_bytes(&[1; 32]), SigningKey::from_bytes(&[3; 32]), SigningKey::from_bytes(&[4; 32]));
    add_node(&s, "node-a", "alice", 1.0, &node).await;
    add_relay(&s, "relay-1", &r1, json!({"node-a": 2.0})).await;
    add_relay(&s, "relay-2", &r2, json!({"node-a": 3.0})).await;
    let req = json!({"title": "demo", "client_rtt_ms": {"relay-1": 30.0, "relay-2": 1.0}});
    let (_, created) = call(&s, post("/api/v1/sessions", &req)).await;
    assert_eq!(created["relay"], "relay-2", "{created}");
    // Only relay-2 itself may say it drains.
    let path = "/api/v1/relays/relay-2/drain";
    assert_eq!(call(&s, post(path, &json!({}))).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(call(&s, signed(path, &json!({}), &r1)).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(call(&s, signed(path, &json!({}), &r2)).await.0, StatusCode::NO_CONTENT);
    assert_eq!(call(&s, get("/api/v1/relays?state=draining")).await.1["items"][0]["id"], "relay-2");
    // New players go elsewhere, the candidates leave it out, and its player moves away.
    let (_, second) = call(&s, post("/api/v1/sessions", &req)).await;
    assert_eq!(second["relay"], "relay-1", "{second}");
    let candidates = call(&s, get("/api/v1/candidates/demo")).await.1;
    assert!(candidates.as_array().unwrap().iter().all(|c| c["relay"] != "relay-2"), "{candidates}");
    let id = created["session"].as_str().unwrap();
    let (status, moved) =
        call(&s, post(&format!("/api/v1/sessions/{id}/move"), &json!({"token": created["token"]}))).await;
    assert_eq!((status, moved["relay"].as_str()), (StatusCode::CREATED, Some("relay-1")), "{moved}");
    // A session cannot be moved onto it either.
    let (status, _) = call(&s, post(&format!("/api/v1/sessions/{id}/move"), &json!({"token": moved["token"]}))).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    // Restarted, it registers again and serves.
    add_relay(&s, "relay-2", &r2, json!({"node-a": 3.0})).await;
    assert_eq!(call(&s, get("/api/v1/relays?state=ready")).await.1["items"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn a_node_takes_an_older_indexers_empty_heartbeat_answer_as_no_relay_to_link() {
    // An indexer from before heartbeats were answered with a body (a rolling upgrade).
    let old = axum::Router::new()
        .route("/api/v1/nodes/{id}/heartbeat", axum::routing::post(|| async { StatusCode::NO_CONTENT }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, old).await });
    let node = pylon_indexer_client::Client::new(&format!("http://{addr}"), SigningKey::from_bytes(&[1; 32])).unwrap();
    let hb = pylon_indexer_client::api::NodeHeartbeat { sessions: 0, running: vec![], titles: vec!["demo".into()] };
    let reply = node.node_heartbeat("node-a", &hb).await.unwrap();
    assert!(reply.relays.is_empty(), "{reply:?}");
}
