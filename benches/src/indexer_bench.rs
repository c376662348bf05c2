//! `make bench-indexer`: how fast the indexer matches and creates sessions.
//!
//! 1. Matching decisions per second with 10,000 nodes and 1,000 relays in the pool
//!    (each relay has measured 100 nodes; the client measured 5 relays).
//! 2. Session creations per second through the HTTP API (a real socket, 8 clients in
//!    parallel) on SQLite, and on PostgreSQL when `--postgres URL` names a server.
//!
//! The last line is one JSON object with every figure.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use clap::Parser;
use pylon_indexer::api::{AppState, Policy, router, unix_now};
use pylon_indexer::selector::{MatchRequest, NodeCandidate, NodeState, RelayCandidate, farthest_rtts, select};
use pylon_indexer::store::{NodeRecord, RelayRecord, Store, Title};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Indexer throughput.
#[derive(Debug, Parser)]
#[command(about)]
struct Args {
    /// PostgreSQL server for the second API run (`make bench-indexer` starts Debian's).
    #[arg(long)]
    postgres: Option<String>,
    /// Session creations per API run.
    #[arg(long, default_value_t = 400)]
    sessions: usize,
}

fn pool(nodes: usize, relays: usize, per_relay: usize) -> (Vec<NodeCandidate>, Vec<RelayCandidate>) {
    let nodes: Vec<NodeCandidate> = (0..nodes)
        .map(|i| NodeCandidate {
            id: format!("node-{i}"),
            state: if i % 50 == 0 { NodeState::Draining } else { NodeState::Ready },
            capacity: 4,
            sessions: (i % 5) as u32,
            titles: vec!["demo".into()],
            gpu_class: (i % 4) as u8,
            price_per_hour: 0.5 + (i % 9) as f64 * 0.1,
            encode_ms: if i % 3 == 0 { 1.5 } else { 4.0 },
            farthest_rtt_ms: None,
        })
        .collect();
    let relays = (0..relays)
        .map(|r| RelayCandidate {
            id: format!("relay-{r}"),
            healthy: r % 97 != 0,
            capacity: 500,
            viewers: (r % 600) as u32,
            node_rtt_ms: (0..per_relay)
                .map(|k| (format!("node-{}", (r * 10 + k * 7) % nodes.len()), 1.0 + (k % 40) as f64))
                .collect(),
        })
        .collect::<Vec<_>>();
    // What a relay not linked to a node yet is taken to be (as the API computes it).
    let farthest = farthest_rtts(&relays);
    let nodes =
        nodes.into_iter().map(|n| NodeCandidate { farthest_rtt_ms: farthest.get(&n.id).copied(), ..n }).collect();
    (nodes, relays)
}

async fn api_run(url: &str, sessions: usize) -> f64 {
    let store = Store::open(url).await.unwrap();
    store.put_title(&Title::builtin_demo()).await.unwrap();
    let now = unix_now();
    for i in 0..100 {
        store
            .register_node(
                &NodeRecord {
                    id: format!("node-{i}"),
                    provider: format!("provider-{}", i % 7),
                    public_key: String::new(),
                    info: serde_json::json!({}),
                    capacity: 1_000_000,
                    sessions: 0,
                    price_per_hour: 1.0,
                    gpu_class: 2,
                    encode_ms: 4.0,
                    titles: vec!["demo".into()],
                    draining: false,
                    revoked: false,
                    approved: true,
                    seats: 0,
                    verdict: Default::default(),
                    last_heartbeat: now + 3600,
                },
                1,
            )
            .await
            .unwrap();
    }
    for r in 0..10 {
        let rtts = (0..20).map(|k| (format!("node-{}", (r * 10 + k) % 100), 1.0 + k as f64)).collect();
        store
            .register_relay(
                &RelayRecord {
                    id: format!("relay-{r}"),
                    owner: "o".into(),
                    public_key: String::new(),
                    public_url: format!("http://relay-{r}:8080"),
                    quic_addr: String::new(),
                    region: "eu".into(),
                    capacity: 1_000_000,
                    viewers: 0,
                    node_rtt_ms: Default::default(),
                    revoked: false,
                    approved: true,
                    last_heartbeat: now + 3600,
                    cert_sha256: String::new(),
                    draining: false,
                },
                1,
            )
            .await
            .unwrap();
        store.relay_heartbeat(&format!("relay-{r}"), 0, &rtts, now + 3600).await.unwrap();
    }
    // The benchmark measures matching and booking, not the rate limits a real caller meets.
    let unlimited = pylon_indexer::limit::Rate::new(1e12, 1e12);
    let policy = Policy { sessions_per_address: unlimited, sessions_per_title: unlimited, ..Policy::default() };
    let state = AppState::new(store, ed25519_dalek::SigningKey::from_bytes(&[7; 32]), String::new(), policy);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router(state)).await });
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let body = r#"{"title":"demo","client_rtt_ms":{"relay-0":5.0,"relay-3":2.0,"relay-7":9.0}}"#;
    let started = Instant::now();
    let per_client = sessions / 8;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..per_client {
                let req = hyper::Request::post(format!("http://{addr}/api/v1/sessions"))
                    .header("content-type", "application/json")
                    .body(http_body_util::Full::new(bytes::Bytes::from_static(body.as_bytes())))
                    .unwrap();
                let res = client.request(req).await.unwrap();
                assert_eq!(res.status(), 201);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    (per_client * 8) as f64 / started.elapsed().as_secs_f64()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = Args::parse();
    let (nodes, relays) = pool(10_000, 1_000, 100);
    let request = MatchRequest {
        title: "demo".into(),
        min_gpu_class: 1,
        max_price_per_hour: Some(1.2),
        client_rtt_ms: ["relay-1", "relay-250", "relay-500", "relay-750", "relay-999"]
            .iter()
            .enumerate()
            .map(|(i, r)| (r.to_string(), 3.0 + i as f64))
            .collect::<BTreeMap<_, _>>(),
    };
    eprintln!("matching with 10,000 nodes and 1,000 relays…");
    let mut n = 0u64;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        std::hint::black_box(select(&request, &nodes, &relays).unwrap());
        n += 1;
    }
    let decisions = n as f64 / started.elapsed().as_secs_f64();
    eprintln!("  {decisions:.0} decisions/s");

    let dir = std::env::temp_dir().join(format!("pylon-bench-indexer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    eprintln!("session creations through the HTTP API on SQLite…");
    let sqlite = api_run(&format!("sqlite://{}?mode=rwc", dir.join("bench.db").display()), args.sessions).await;
    eprintln!("  {sqlite:.0} sessions/s");
    let _ = std::fs::remove_dir_all(&dir);
    let postgres = match &args.postgres {
        Some(admin) => {
            use sqlx::Connection;
            sqlx::any::install_default_drivers();
            let name = format!("pylon_bench_{}", std::process::id());
            let mut conn = sqlx::AnyConnection::connect(admin).await.unwrap();
            sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut conn).await.unwrap();
            let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(admin);
            eprintln!("session creations through the HTTP API on PostgreSQL…");
            let rate = api_run(&format!("{base}/{name}"), args.sessions).await;
            eprintln!("  {rate:.0} sessions/s");
            let _ = sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)")).execute(&mut conn).await;
            Some(rate)
        }
        None => None,
    };
    println!(
        "{}",
        serde_json::json!({
            "nodes": 10_000, "relays": 1_000, "match_decisions_per_s": decisions,
            "api_sessions_per_s_sqlite": sqlite, "api_sessions_per_s_postgres": postgres,
        })
    );
}
