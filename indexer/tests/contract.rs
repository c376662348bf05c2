//! The API contract: the OpenAPI document validates as OpenAPI 3.1, and a property-based
//! tester (schemathesis, from PyPI) finds no server error, no undocumented status or
//! content type and no response that breaks its schema, on every operation of an indexer
//! served as the binary serves it, with a node, a relay, a title and a session in it.
//!
//! The Python tools come from `deploy/python-tools.sh` (`make test` runs it); this test
//! finds them through `PYLON_PYTHON_TOOLS` (a virtualenv's `bin/`), by default
//! `/var/tmp/pylon-venv/bin`, and fails saying so when they are missing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use pylon_indexer::api::{AppState, Policy, router};
use pylon_indexer::store::{Store, Title};
use pylon_indexer_client::api::{NodeHeartbeat, RegisterNode, RegisterRelay, RelayHeartbeat};
use std::path::PathBuf;
use std::time::Duration;

const ADMIN: &str = "contract-admin";

fn tools() -> PathBuf {
    let dir = PathBuf::from(std::env::var("PYLON_PYTHON_TOOLS").unwrap_or_else(|_| "/var/tmp/pylon-venv/bin".into()));
    assert!(
        dir.join("schemathesis").exists() && dir.join("openapi-spec-validator").exists(),
        "schemathesis and openapi-spec-validator not found in {}: run `bash deploy/python-tools.sh` (make test does)",
        dir.display()
    );
    dir
}

/// An indexer on a real socket with one of everything in it; its address and the
/// session's id.
async fn seeded_indexer(dir: &std::path::Path) -> (std::net::SocketAddr, String) {
    let store = Store::open(&format!("sqlite://{}?mode=rwc", dir.join("indexer.db").display())).await.unwrap();
    store.put_title(&Title::builtin_demo()).await.unwrap();
    let key = pylon_indexer::keys::load_or_create(dir, "indexer-key").unwrap();
    let state = AppState::new(store, key, ADMIN.into(), Policy::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    std::mem::forget(stop_tx);
    tokio::spawn(pylon_indexer::api::run_sweeper(state.clone(), stop.clone()));
    tokio::spawn(pylon_runtime::http::serve(listener, router(state), Default::default(), stop));

    // A node and a relay join with real signatures, and a player is matched.
    let base = format!("http://{addr}");
    let node = pylon_indexer_client::Client::new(&base, ed25519_dalek::SigningKey::from_bytes(&[7; 32])).unwrap();
    node.register_node(&RegisterNode {
        id: "node-a".into(),
        provider: "alice".into(),
        public_key: node.public_key(),
        gpu_model: "lavapipe".into(),
        gpu_memory_mb: 1024,
        vulkan_device: "llvmpipe".into(),
        encoders: vec!["libx264".into()],
        capacity: 4,
        region: "local".into(),
        lat: 0.0,
        lon: 0.0,
        price_per_hour: 0.5,
        gpu_class: 1,
        titles: vec!["demo".into()],
    })
    .await
    .unwrap();
    node.node_heartbeat("node-a", &NodeHeartbeat { sessions: 0, running: vec![], titles: vec!["demo".into()] })
        .await
        .unwrap();
    let relay = pylon_indexer_client::Client::new(&base, ed25519_dalek::SigningKey::from_bytes(&[9; 32])).unwrap();
    relay
        .register_relay(&RegisterRelay {
            id: "relay-a".into(),
            owner: "bob".into(),
            public_key: relay.public_key(),
            public_url: "http://127.0.0.1:9".into(),
            quic_addr: "127.0.0.1:9".into(),
            region: "local".into(),
            capacity: 100,
            cert_sha256: "0f".repeat(32),
        })
        .await
        .unwrap();
    relay
        .relay_heartbeat(
            "relay-a",
            &RelayHeartbeat { viewers: 0, node_rtt_ms: [("node-a".to_string(), 1.0)].into(), players: vec![] },
        )
        .await
        .unwrap();
    let created: serde_json::Value = reqwest::Client::new()
        .post(format!("{base}/api/v1/sessions"))
        .json(&serde_json::json!({ "title": "demo", "client_rtt_ms": { "relay-a": 5.0 } }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let session = created["session"].as_str().expect("a session was matched").to_string();
    (addr, session)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_is_valid_and_every_operation_keeps_it() {
    let tools = tools();
    let dir = tempfile::tempdir().unwrap();
    let (addr, session) = seeded_indexer(dir.path()).await;

    // The document validates as OpenAPI 3.1.
    let spec: serde_json::Value =
        reqwest::get(format!("http://{addr}/api/v1/openapi.json")).await.unwrap().json().await.unwrap();
    assert!(spec["openapi"].as_str().unwrap().starts_with("3.1"), "OpenAPI 3.1: {}", spec["openapi"]);
    let spec_file = dir.path().join("openapi.json");
    std::fs::write(&spec_file, serde_json::to_vec_pretty(&spec).unwrap()).unwrap();
    let out =
        tokio::process::Command::new(tools.join("openapi-spec-validator")).arg(&spec_file).output().await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "openapi-spec-validator: {text}");

    // Path parameters name what is in the registry, so the fuzzer reaches past the 404s.
    let config = dir.path().join("schemathesis.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[[operations]]
include-path-regex = "^/api/v1/nodes/"
parameters = {{ "path.id" = "node-a" }}

[[operations]]
include-path-regex = "^/api/v1/relays/"
parameters = {{ "path.id" = "relay-a" }}

[[operations]]
include-path-regex = "^/api/v1/sessions/"
parameters = {{ "path.id" = "{session}" }}

# "No capacity" is a documented 503 with a reason and Retry-After, not a crash: the
# server-error check accepts it here, and only here.
[[operations]]
include-path = "/api/v1/sessions"
include-method = "POST"
checks.not_a_server_error.expected-statuses = ["2xx", "3xx", "4xx", "503"]

[[operations]]
include-path-regex = "^/api/v1/(titles/|candidates/)"
parameters = {{ "path.id" = "demo", "path.title" = "demo" }}
"#
        ),
    )
    .unwrap();
    let run = tokio::process::Command::new(tools.join("schemathesis"))
        .current_dir(dir.path())
        .args(["--no-color", "--config-file", config.to_str().unwrap(), "run"])
        .arg(format!("http://{addr}/api/v1/openapi.json"))
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,\
             response_headers_conformance",
            "--header",
            &format!("Authorization: Bearer {ADMIN}"),
            "--max-examples",
            "60",
            "--seed",
            "20261202",
            // One worker: with two, hypothesis parses lambda sources on two threads at once
            // and CPython 3.11's AST recursion check trips ("AST constructor recursion depth
            // mismatch"), a runtime error in the tester, not in the API.
            "--workers",
            "1",
        ])
        .env("SCHEMATHESIS_HOOKS", "")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(600), run).await.expect("schemathesis finished").unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    eprintln!("{text}");
    assert!(out.status.success(), "schemathesis found contract violations (output above)");
    let operations: usize = spec["paths"].as_object().unwrap().values().map(|p| p.as_object().unwrap().len()).sum();
    assert!(operations >= 22, "the document lists every operation: {operations}");
    assert!(text.contains(&format!("Tested: {operations}")), "schemathesis tested all {operations} operations");
}
