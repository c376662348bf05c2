//! No single indexer: two `pylon-indexer` replicas serve one pool from one database
//! (PostgreSQL from `PYLON_TEST_POSTGRES`, which `make test` starts; else one SQLite file).
//! One replica is killed with SIGKILL and the pool goes on through the other: the node's
//! and the relay's heartbeats, the catalog page the dead replica served (it fails over to
//! the other through CORS), matching, and a new session that plays in Chromium.
//!
//! Each replica is this test binary run again as a child process (`indexer_replica`, an
//! ignored test that runs [`pylon_indexer::run`]), so killing it is a real process death:
//! its sockets close mid-keep-alive, nothing shuts down gracefully.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Browser, POOL_NODE, POOL_RELAY, Setup};
use pylon_indexer::IndexerConfig;
use pylon_indexer::api::Policy;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The environment variable that makes `indexer_replica` run: its configuration as JSON.
const REPLICA_ENV: &str = "PYLON_TEST_INDEXER_REPLICA";

/// One indexer replica; run only as a child process of the test below (which sets
/// [`REPLICA_ENV`]), until killed.
#[test]
#[ignore = "an indexer replica: killing_an_indexer_replica_… runs it as a child process"]
fn indexer_replica() {
    let spec: serde_json::Value =
        serde_json::from_str(&std::env::var(REPLICA_ENV).expect("run by the test below")).unwrap();
    if std::env::var_os("RUST_LOG").is_some() {
        pylon_runtime::init_tracing("info");
    }
    let text = |k: &str| spec[k].as_str().unwrap().to_string();
    let config = IndexerConfig {
        addr: text("addr").parse().unwrap(),
        data_dir: text("data_dir").into(),
        database_url: Some(text("database_url")),
        admin_token: "e2e-admin".into(),
        studio_token: String::new(),
        policy: Policy::default(),
        connections_per_address: 64,
        demo_title: true,
        replicas: spec["replicas"].as_array().unwrap().iter().map(|u| u.as_str().unwrap().to_string()).collect(),
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    runtime.block_on(pylon_indexer::run(config, shutdown, None)).unwrap();
}

/// A replica running as a child process; killed on drop.
struct Replica {
    child: Child,
    addr: SocketAddr,
}

impl Replica {
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// SIGKILL, and reaped.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// Starts a replica at `addr` and waits until it answers.
async fn start_replica(
    addr: SocketAddr,
    data_dir: &std::path::Path,
    database_url: &str,
    replicas: &[String],
) -> Replica {
    let spec = serde_json::json!({
        "addr": addr.to_string(),
        "data_dir": data_dir.display().to_string(),
        "database_url": database_url,
        "replicas": replicas,
    });
    let child = Command::new(std::env::current_exe().unwrap())
        .args(["indexer_replica", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env(REPLICA_ENV, spec.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut replica = Replica { child, addr };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr)).await {
            break;
        }
        assert!(replica.child.try_wait().unwrap().is_none(), "the indexer replica at {addr} exited on start");
        assert!(Instant::now() < deadline, "the indexer replica at {addr} never listened");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    replica
}

/// `member`'s last heartbeat (Unix seconds) and state as replica `at` lists them
/// (`nodes` or `relays`).
async fn seen(at: SocketAddr, list: &str, member: &str) -> Option<(i64, String)> {
    let reply = common::http_get(at, &format!("/api/v1/{list}?limit=1000")).await;
    let body: serde_json::Value = serde_json::from_str(reply.split("\r\n\r\n").nth(1)?).ok()?;
    let m = body["items"].as_array()?.iter().find(|m| m["id"] == member)?;
    Some((m["last_heartbeat"].as_i64()?, m["state"].as_str()?.to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_an_indexer_replica_leaves_heartbeats_matching_and_new_sessions_to_the_other() {
    let dir = std::env::temp_dir().join(format!("pylon-replicas-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let db = common::fresh_database(&dir, "pylon_replicas").await;
    // One signing key for both: the same indexer-key file (one data directory).
    let (a_addr, b_addr) = (free_addr(), free_addr());
    let urls = [format!("http://{a_addr}"), format!("http://{b_addr}")];
    let mut a = start_replica(a_addr, &dir, &db, &urls).await;
    let b = start_replica(b_addr, &dir, &db, &urls).await;
    let key = |at| async move {
        common::http_get(at, "/api/v1/public-key").await.split("\r\n\r\n").nth(1).map(str::to_string)
    };
    assert_eq!(key(a.addr).await, key(b.addr).await, "the replicas sign with one key");

    let platform = common::start_setup(640, 360, 60, Setup { indexers: urls.to_vec(), ..Setup::default() }).await;
    // Both replicas see what either was told: the node and relay registered through A.
    common::wait_rtt_reported(b.addr, POOL_NODE, Duration::from_secs(30)).await;
    assert_eq!(seen(a.addr, "nodes", POOL_NODE).await.map(|s| s.1).as_deref(), Some("ready"));

    // A player opens the catalog that A serves…
    let browser = Browser::start().await;
    browser.client.goto(&format!("{}/", a.url())).await.unwrap();
    browser.wait_for("return window.pylonCatalog && pylonCatalog.titles.length > 0", Duration::from_secs(10)).await;
    assert_eq!(browser.eval("return pylonCatalog.indexer").await, a.url());

    // …and A dies.
    a.kill();
    let killed = pylon_indexer::api::unix_now();
    let t0 = Instant::now();

    // Heartbeats go on through B: the node and the relay stay ready there.
    for (list, member) in [("nodes", POOL_NODE), ("relays", POOL_RELAY)] {
        loop {
            let now = seen(b.addr, list, member).await;
            if now.as_ref().is_some_and(|(at, state)| *at > killed && state == "ready") {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(15), "{member}'s heartbeats stopped with A: {now:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let heartbeats_ms = t0.elapsed().as_millis();

    // The player presses Play on the page A served: the catalog fails over to B, which
    // matches the player and signs the session, and the game plays through the relay.
    browser.eval("document.querySelector('a.play[data-title=\"demo\"]').click(); return true;").await;
    let played = common::wait_playing(&browser, b.addr, 60).await;
    assert_eq!(played["role"], "player", "{played}");
    // B booked the node's seat for the new session.
    let node = common::http_get(b.addr, "/api/v1/nodes?limit=1000").await;
    assert!(node.contains("\"seats\":1"), "B holds no session on the node: {node}");
    eprintln!(
        "indexer replica killed: heartbeats on the other within {heartbeats_ms} ms; \
         new session played through it ({} frames decoded)",
        played["frames"]
    );

    browser.close().await;
    platform.stop().await;
    drop(b);
    let _ = std::fs::remove_dir_all(&dir);
}
