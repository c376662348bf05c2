//! Shared harness of the end-to-end tests: the relay and a render node in-process, and
//! headless Chromium driven through chromedriver.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub use pylon_indexer_client::api::Title;
use pylon_relay::{RelayConfig, RelayHandle};
use pylon_server::encode::{EncoderChoice, EncoderConfig, PROFILE_LEVEL_ID};
use pylon_server::metrics::ServerMetrics;
use pylon_server::pipeline::{Pipeline, PipelineConfig};
use pylon_server::pool::SessionGate;
use pylon_server::uplink::{self, UplinkConfig};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};

/// A relay and a render node, running in this process.
pub struct Platform {
    /// Held while the platform runs: tests in one binary run one platform at a time, so
    /// two render nodes and two Chromiums never share the machine's two cores.
    _exclusive: tokio::sync::OwnedMutexGuard<()>,
    pub relay: RelayHandle,
    pub server_metrics: ServerMetrics,
    pipeline: Option<Pipeline>,
    titles: Option<tokio::task::JoinHandle<()>>,
    shutdown: watch::Sender<bool>,
    relay_shutdown: watch::Sender<bool>,
    data_dir: PathBuf,
    /// The indexer's HTTP address, when the platform runs as a pool.
    pub indexer: Option<std::net::SocketAddr>,
    /// The impairment proxy between node and relay, when the platform has one.
    pub uplink_proxy: Option<pylon_relay::impair::ImpairHandle>,
    /// The render node's link and pool membership, aborted by [`Platform::kill_node`].
    node_tasks: Vec<tokio::task::AbortHandle>,
}

impl Platform {
    /// Where this platform keeps its files (session sandboxes under `sessions/`).
    pub fn data_dir(&self) -> &std::path::Path {
        &self.data_dir
    }

    pub fn url(&self) -> String {
        format!("http://{}/", self.relay.http_addr)
    }

    /// Stops the relay only; the render node keeps running and retrying.
    pub async fn stop_relay(&self) {
        let _ = self.relay_shutdown.send(true);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    /// The render node dies: its link and heartbeats stop mid-stream without a goodbye,
    /// and it renders nothing more. The relay and indexer carry on.
    pub async fn kill_node(&mut self) {
        for task in self.node_tasks.drain(..) {
            task.abort();
        }
        self.pipeline.take();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    /// Sum of a render-node metric's samples.
    pub fn server_metrics_value(&self, name: &str) -> f64 {
        self.server_metrics
            .render()
            .lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Sum (seconds) and count of the node's `stage_seconds` histogram for `stage`.
    pub fn server_stage(&self, stage: &str) -> (f64, f64) {
        let v = |k: &str| self.server_metrics_value(&format!("pylon_server_stage_seconds_{k}{{stage=\"{stage}\"}} "));
        (v("sum"), v("count"))
    }

    /// The mean of the node's `stage_seconds` for `stage`, ms, if it was ever observed.
    pub fn server_stage_mean_ms(&self, stage: &str) -> Option<f64> {
        let (sum, count) = self.server_stage(stage);
        (count > 0.0).then(|| 1000.0 * sum / count)
    }

    pub async fn stop(mut self) {
        let _ = self.relay_shutdown.send(true);
        let _ = self.shutdown.send(true);
        // A running title's sandbox is removed before the files go.
        if let Some(t) = self.titles.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
        self.pipeline.take();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

fn localhost() -> std::net::SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// Starts a relay on free loopback ports and a render node streaming to it at `width`×`height`.
pub async fn start_platform(width: u32, height: u32, fps: u32) -> Platform {
    start_platform_with(width, height, fps, true).await
}

/// Like [`start_platform`], choosing whether input starts frames early.
pub async fn start_platform_with(width: u32, height: u32, fps: u32, early_frames: bool) -> Platform {
    start_setup(width, height, fps, Setup { early_frames, ..Setup::default() }).await
}

/// Like [`start_platform`], with the relay announcing `advertise` as its ICE candidate (an
/// impairment proxy in front of it).
pub async fn start_platform_advertising(
    width: u32,
    height: u32,
    fps: u32,
    advertise: std::net::SocketAddr,
) -> Platform {
    start_setup(width, height, fps, Setup { advertise_addr: Some(advertise), ..Setup::default() }).await
}

/// The node id and relay id of a pooled platform.
pub const POOL_NODE: &str = "node-e2e";
pub const POOL_RELAY: &str = "relay-e2e";

/// The whole platform as a pool: an indexer (SQLite, the demo title), a relay and a render
/// node that register and heartbeat with it, and admit players by session token.
pub async fn start_pool(width: u32, height: u32, fps: u32) -> Platform {
    start_setup(width, height, fps, Setup { pooled: true, ..Setup::default() }).await
}

/// Like [`start_pool`], with studio titles deployed to the indexer and known to the node.
pub async fn start_pool_with_titles(width: u32, height: u32, fps: u32, titles: Vec<Title>) -> Platform {
    start_setup(width, height, fps, Setup { pooled: true, titles, ..Setup::default() }).await
}

/// Like [`start_platform`], with the node reaching the relay through an impairment proxy
/// (its QUIC datagrams lost, delayed… as `impair` says).
pub async fn start_platform_impaired_uplink(
    width: u32,
    height: u32,
    fps: u32,
    impair: pylon_relay::impair::ImpairConfig,
) -> Platform {
    start_setup(width, height, fps, Setup { uplink_impair: Some(impair), ..Setup::default() }).await
}

/// Starts an indexer on a free loopback port; returns its address.
pub async fn start_indexer(data_dir: &std::path::Path) -> std::net::SocketAddr {
    start_indexer_with(data_dir, Vec::new()).await
}

/// Like [`start_indexer`], with `titles` in the catalog beside the demo.
pub async fn start_indexer_with(data_dir: &std::path::Path, titles: Vec<Title>) -> std::net::SocketAddr {
    use pylon_indexer::api::{AppState, Policy, router};
    use pylon_indexer::store::Store;
    std::fs::create_dir_all(data_dir).unwrap();
    let url = format!("sqlite://{}?mode=rwc", data_dir.join("indexer.db").display());
    let store = Store::open(&url).await.unwrap();
    store.put_title(&Title::builtin_demo()).await.unwrap();
    for t in &titles {
        store.put_title(t).await.unwrap();
    }
    let key = pylon_indexer::keys::load_or_create(data_dir, "indexer-key").unwrap();
    let state = AppState::new(store, key, "e2e-admin".into(), Policy::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Served as the indexer binary serves it (connection limits, client addresses), with
    // its sweeper; both run until the test process ends.
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    std::mem::forget(stop_tx);
    tokio::spawn(pylon_indexer::api::run_sweeper(state.clone(), stop.clone()));
    tokio::spawn(pylon_runtime::http::serve(listener, router(state), Default::default(), stop));
    addr
}

/// Like [`start_platform`], with the relay's `--av-sync` setting (one stream id for the
/// player's audio and video, so that Chromium lip-syncs them).
pub async fn start_platform_av_sync(width: u32, height: u32, fps: u32, av_sync: bool) -> Platform {
    start_setup(width, height, fps, Setup { av_sync, ..Setup::default() }).await
}

/// How a test platform is set up, beyond its picture.
pub struct Setup {
    /// Input starts frames early (the node's default).
    pub early_frames: bool,
    /// An indexer, and the relay and node registered with it.
    pub pooled: bool,
    /// The relay announces this as its ICE candidate (an impairment proxy in front of it).
    pub advertise_addr: Option<std::net::SocketAddr>,
    /// The node reaches the relay through an impairment proxy.
    pub uplink_impair: Option<pylon_relay::impair::ImpairConfig>,
    /// Studio titles in the catalog and on the node.
    pub titles: Vec<Title>,
    /// The relay's `--av-sync`.
    pub av_sync: bool,
    /// The node fakes the demo (the checker's tests).
    pub fake: Option<pylon_server::pipeline::Fake>,
    /// The pool's indexer replicas, already running (`http://addr`): the relay and the node
    /// get all of them; no in-process indexer is started.
    pub indexers: Vec<String>,
    /// The node's `--max-relay-links` (default [`uplink::MAX_LINKS`]).
    pub max_relay_links: Option<usize>,
    /// The relay runs on a runtime of its own, two worker threads named
    /// [`RELAY_THREAD`] as its own process would have, instead of the test's: its CPU can
    /// then be counted apart (`make latency`).
    pub relay_threads: bool,
}

/// The name of the relay's threads when it runs on its own runtime ([`Setup::relay_threads`]).
pub const RELAY_THREAD: &str = "pylon-relay";

impl Default for Setup {
    fn default() -> Self {
        Self {
            early_frames: true,
            pooled: false,
            advertise_addr: None,
            uplink_impair: None,
            titles: Vec::new(),
            av_sync: false,
            fake: None,
            indexers: Vec::new(),
            max_relay_links: None,
            relay_threads: false,
        }
    }
}

/// Starts a relay (and an indexer, when pooled) and a render node as `setup` says.
pub async fn start_setup(width: u32, height: u32, fps: u32, setup: Setup) -> Platform {
    let Setup {
        early_frames,
        pooled,
        advertise_addr,
        uplink_impair,
        titles,
        av_sync,
        fake,
        indexers,
        max_relay_links,
        relay_threads,
    } = setup;
    static EXCLUSIVE: std::sync::OnceLock<std::sync::Arc<tokio::sync::Mutex<()>>> = std::sync::OnceLock::new();
    let exclusive = EXCLUSIVE.get_or_init(Default::default).clone().lock_owned().await;
    let _ = tracing_subscriber_init();
    let data_dir = std::env::temp_dir().join(format!("pylon-e2e-{}-{}", std::process::id(), rand_suffix()));
    let (shutdown, shutdown_rx) = watch::channel(false);
    let (relay_shutdown, relay_shutdown_rx) = watch::channel(false);
    let (started_tx, started_rx) = oneshot::channel();
    let indexers = match (pooled, indexers.is_empty()) {
        (_, false) => indexers,
        (true, true) => vec![format!("http://{}", start_indexer_with(&data_dir.join("indexer"), titles.clone()).await)],
        (false, true) => Vec::new(),
    };
    let pooled = !indexers.is_empty();
    let indexer: Option<std::net::SocketAddr> =
        indexers.first().map(|u| u.trim_start_matches("http://").parse().expect("http://address"));
    let config = RelayConfig {
        http_addr: localhost(),
        webrtc_addr: localhost(),
        advertise_addr,
        quic_addr: localhost(),
        data_dir: data_dir.clone(),
        allow_anonymous_nodes: false,
        av_sync,
        pool: pooled.then(|| pylon_relay::pool::PoolConfig {
            indexer: indexers.clone(),
            id: Some(POOL_RELAY.into()),
            owner: "e2e".into(),
            region: "local".into(),
            public_url: None,
            public_quic: None,
            capacity: 10,
        }),
    };
    if relay_threads {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(RELAY_THREAD)
            .enable_all()
            .build()
            .expect("the relay's runtime");
        std::thread::Builder::new()
            .name(RELAY_THREAD.into())
            .spawn(move || runtime.block_on(pylon_relay::run(config, relay_shutdown_rx, Some(started_tx))))
            .expect("the relay's thread");
    } else {
        tokio::spawn(pylon_relay::run(config, relay_shutdown_rx, Some(started_tx)));
    }
    let relay = started_rx.await.expect("relay started");
    let uplink_proxy = match uplink_impair {
        Some(config) => Some(
            pylon_relay::impair::start(localhost(), relay.quic_addr, config, relay_shutdown.subscribe())
                .await
                .expect("impairment proxy starts"),
        ),
        None => None,
    };

    let metrics = ServerMetrics::new();
    let (packet_tx, packet_rx) = mpsc::channel(4096);
    let pipeline_config = PipelineConfig {
        width,
        height,
        fps,
        gpu: None,
        slots: 3,
        encoder: EncoderConfig {
            width,
            height,
            fps,
            bitrate: 6_000_000,
            keyframe_interval: fps * 10,
            choice: EncoderChoice::Auto,
        },
        max_rtp_packet: 1200,
        seed: 0x5eed,
        early_frames,
        audio: true,
        fake,
    };
    let m = metrics.clone();
    let pipeline = tokio::task::spawn_blocking(move || Pipeline::start(pipeline_config, m, packet_tx))
        .await
        .unwrap()
        .expect("frame path starts (Vulkan + encoder)");
    let hello = pylon_proto::framing::StreamHello {
        width: width as u16,
        height: height as u16,
        fps: fps as u16,
        profile_level_id: PROFILE_LEVEL_ID,
        encoder: pipeline.info().encoder.into(),
        node: if pooled { POOL_NODE.into() } else { String::new() },
    };
    let gate = if pooled { SessionGate::pooled(POOL_NODE) } else { SessionGate::open() };
    let mut identity = None;
    let mut indexer_client = None;
    let mut node_tasks = Vec::new();
    let catalog = pylon_server::titles::TitleCatalog::new(std::iter::once(Title::builtin_demo()).chain(titles));
    if pooled {
        let key = pylon_indexer_client::keys::load_or_create(&data_dir.join("node"), "node-key").unwrap();
        identity = Some(key.clone());
        let client = pylon_indexer_client::Client::with_replicas(&indexers, key).unwrap();
        let registration = pylon_indexer_client::api::RegisterNode {
            id: POOL_NODE.into(),
            provider: "e2e-provider".into(),
            public_key: client.public_key(),
            gpu_model: pipeline.info().gpu_name.clone(),
            gpu_memory_mb: pipeline.info().gpu_memory_mb,
            vulkan_device: pipeline.info().gpu_name.clone(),
            encoders: vec![pipeline.info().encoder.into()],
            capacity: 1,
            region: "local".into(),
            lat: 0.0,
            lon: 0.0,
            price_per_hour: 0.1,
            gpu_class: pipeline.info().gpu_class,
            titles: catalog.installed(pipeline.info().gpu_class),
        };
        node_tasks.push(
            tokio::spawn(pylon_server::pool::run_membership(
                client.clone(),
                registration,
                gate.clone(),
                shutdown_rx.clone(),
            ))
            .abort_handle(),
        );
        indexer_client = Some(client);
    }
    let uplink_config = UplinkConfig {
        relay: uplink_proxy.as_ref().map_or(relay.quic_addr, |p| p.listen),
        // In a pool the node trusts the relay by the certificate it registered, as a
        // provider's node does; alone, by the relay's certificate file.
        trust: match &indexer_client {
            Some(client) => uplink::RelayTrust::Pool {
                indexer: client.clone(),
                region: "local".into(),
                max_links: max_relay_links.unwrap_or(uplink::MAX_LINKS),
            },
            None => uplink::RelayTrust::File(relay.cert_path.clone()),
        },
        server_name: "pylon-relay".into(),
        hello,
        bitrate: Some(uplink::BitrateControl { target: pipeline.bitrate_target(), min: 500_000, max: 6_000_000 }),
        identity,
        gpu: None,
    };
    let (signal_tx, signal_rx) = mpsc::unbounded_channel();
    let (command_tx, command_rx) = mpsc::unbounded_channel();
    let titles_task = tokio::spawn(pylon_server::titles::run(
        pylon_server::titles::TitleRunnerConfig {
            sandbox: pylon_title::sandbox::SandboxConfig::new(data_dir.join("sessions")),
            first_frame_deadline: Duration::from_secs(10),
            video: (width, height),
            default_title: None,
            rest_between_sessions: indexer_client.is_some(),
        },
        catalog,
        pylon_server::titles::TitleRunnerLinks {
            signals: signal_rx,
            commands: command_tx,
            source: pipeline.source_sender(),
            indexer: indexer_client,
        },
        metrics.clone(),
        shutdown_rx.clone(),
    ));
    let uplink = tokio::spawn(uplink::run(
        uplink_config,
        packet_rx,
        pipeline.keyframe_flag(),
        pipeline.input_sender(),
        gate,
        metrics.clone(),
        Some(uplink::SessionLink { signals: signal_tx, commands: command_rx }),
        shutdown_rx,
    ));
    node_tasks.push(uplink.abort_handle());
    Platform {
        _exclusive: exclusive,
        relay,
        server_metrics: metrics,
        pipeline: Some(pipeline),
        titles: Some(titles_task),
        shutdown,
        relay_shutdown,
        data_dir,
        indexer,
        uplink_proxy,
        node_tasks,
    }
}

/// Logs of the platform's parts, shown with `RUST_LOG` (e.g. `RUST_LOG=info`).
fn tracing_subscriber_init() -> Option<()> {
    std::env::var_os("RUST_LOG")?;
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init()
        .ok()
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    h.finish()
}

/// chromedriver's `POST /session/{id}/goog/cdp/execute`.
#[derive(Debug)]
struct Cdp {
    cmd: String,
    params: serde_json::Value,
}

impl fantoccini::wd::WebDriverCompatibleCommand for Cdp {
    fn endpoint(&self, base_url: &url::Url, session_id: Option<&str>) -> Result<url::Url, url::ParseError> {
        base_url.join(&format!("session/{}/goog/cdp/execute", session_id.unwrap_or_default()))
    }

    fn method_and_body(&self, _url: &url::Url) -> (http::Method, Option<String>) {
        (http::Method::POST, Some(serde_json::json!({ "cmd": self.cmd, "params": self.params }).to_string()))
    }
}

/// Headless Chromium under chromedriver, killed on drop.
pub struct Browser {
    pub client: fantoccini::Client,
    driver: tokio::process::Child,
    profile: PathBuf,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Flags headless Chromium needs on a machine with only loopback and no GPU.
pub const CHROMIUM_FLAGS: &[&str] = &[
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--mute-audio",
    "--autoplay-policy=no-user-gesture-required",
    "--allow-loopback-in-peer-connection",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
    "--window-size=1400,900",
];

impl Browser {
    pub async fn start() -> Browser {
        Self::start_in(None).await
    }

    /// Starts it inside a network namespace: `(namespace, its address, the address the
    /// test drives it from)`. Chromedriver (and the Chromium it starts) run there, and
    /// listen on the namespace's address for the test's commands.
    pub async fn start_in(netns: Option<(&str, std::net::IpAddr, std::net::IpAddr)>) -> Browser {
        let chromedriver =
            which("chromedriver").expect("chromedriver not found: apt-get install chromium chromium-driver");
        let chromium = which("chromium").expect("chromium not found: apt-get install chromium chromium-driver");
        let port = free_port();
        let mut command = match netns {
            Some((ns, _, from)) => {
                let mut c = tokio::process::Command::new("ip");
                c.args(["netns", "exec", ns]).arg(chromedriver).arg(format!("--allowed-ips={from}"));
                c
            }
            None => tokio::process::Command::new(chromedriver),
        };
        let driver = command
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver starts");
        let profile = std::env::temp_dir().join(format!("pylon-chromium-{}-{port}", std::process::id()));
        let mut args: Vec<String> = CHROMIUM_FLAGS.iter().map(|s| s.to_string()).collect();
        args.push(format!("--user-data-dir={}", profile.display()));
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({ "binary": chromium.to_string_lossy(), "args": args }),
        );
        let url = match netns {
            Some((_, at, _)) => format!("http://{at}:{port}"),
            None => format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let client = loop {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match fantoccini::ClientBuilder::new(connector).capabilities(caps.clone()).connect(&url).await {
                Ok(c) => break c,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("cannot start Chromium through chromedriver: {e}"),
            }
        };
        Browser { client, driver, profile }
    }

    /// Evaluates `script` (a function body that may `return`) and returns its JSON value.
    pub async fn eval(&self, script: &str) -> serde_json::Value {
        self.client.execute(script, vec![]).await.expect("script runs")
    }

    /// Runs a Chrome DevTools Protocol command through chromedriver (`goog/cdp/execute`),
    /// e.g. `Input.dispatchMouseEvent`: input that enters Chromium's own input pipeline, as
    /// a real device's would, rather than an event made inside the page.
    pub async fn cdp(&self, cmd: &str, params: serde_json::Value) -> serde_json::Value {
        self.client
            .issue_cmd(Cdp { cmd: cmd.to_string(), params })
            .await
            .unwrap_or_else(|e| panic!("CDP {cmd} failed: {e}"))
    }

    /// Opens `platform`'s spectator link (`/watch/demo`) in the current window and waits
    /// until the page, as a spectator, has decoded more than `frames` frames.
    pub async fn watch(&self, platform: &Platform, frames: u32, within: Duration) {
        self.client.goto(&format!("{}watch/demo", platform.url())).await.unwrap();
        self.wait_for(
            &format!(
                "return window.pylon && pylon.role === 'spectator' && pylon.stats && pylon.stats.framesDecoded > {frames}"
            ),
            within,
        )
        .await;
    }

    /// Polls `script` until it returns a truthy value or `timeout` passes.
    pub async fn wait_for(&self, script: &str, timeout: Duration) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.eval(script).await;
            let truthy = match &v {
                serde_json::Value::Null | serde_json::Value::Bool(false) => false,
                serde_json::Value::Number(n) => n.as_f64() != Some(0.0),
                _ => true,
            };
            if truthy {
                return v;
            }
            if Instant::now() > deadline {
                let state = self
                    .eval(
                        "return JSON.stringify({page: location.href, player: window.pylon && {state: pylon.state, \
                         error: pylon.error, stats: pylon.stats}, text: document.body && document.body.innerText.slice(0, 300)})",
                    )
                    .await;
                panic!("timed out waiting for `{script}`; page and player state: {state}");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    pub async fn close(mut self) {
        let _ = self.client.clone().close().await;
        let _ = self.driver.kill().await;
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// Chromium outlives chromedriver when a test fails before `close`: kill every process
/// that uses this browser's profile (`pkill`, from Debian's procps).
impl Drop for Browser {
    fn drop(&mut self) {
        let _ = std::process::Command::new("pkill")
            .arg("-KILL")
            .arg("-f")
            .arg(self.profile.as_os_str())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| PathBuf::from(d).join(name)).find(|p| p.is_file())
}

/// Draws the playing video into a canvas: `c` is the canvas, `d` its RGBA pixels. Returns
/// null from the script while no frame has arrived.
#[macro_export]
macro_rules! video_pixels {
    () => {
        r#"
const v = document.getElementById('video');
if (!v || v.videoWidth === 0) return null;
const c = document.createElement('canvas');
c.width = v.videoWidth; c.height = v.videoHeight;
const g = c.getContext('2d', { willReadFrequently: true });
g.drawImage(v, 0, 0);
const d = g.getImageData(0, 0, c.width, c.height).data;
"#
    };
}

/// Samples the playing video into a canvas and classifies its pixels.
pub const SAMPLE_VIDEO: &str = concat!(
    video_pixels!(),
    r#"
let space = 0, hull = 0, rock = 0, sum = 0, hash = 0;
for (let i = 0; i < d.length; i += 4) {
  const r = d[i], gr = d[i + 1], b = d[i + 2];
  sum += r + gr + b;
  if (r < 40 && gr < 45 && b >= 12 && b < 60 && b > r + 6) space++;
  else if (r > 190 && gr > 110 && gr < 200 && b < 90) hull++;
  else if (r > 60 && r < 200 && Math.abs(r - gr) < 40 && Math.abs(gr - b) < 40) rock++;
  if ((i / 4) % 997 === 0) hash = (hash * 31 + r + 3 * gr + 7 * b) >>> 0;
}
const n = d.length / 4;
return { width: c.width, height: c.height, space: space / n, hull, rock, mean: sum / (3 * n), hash };
"#
);

pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub async fn relay_metrics(http: std::net::SocketAddr) -> String {
    http_get(http, "/metrics").await
}

/// The whole HTTP/1.0 response (status line, headers, body) to `GET path`.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// An anonymous POST with an empty body; the whole answer (head and body).
pub async fn http_post(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("POST {path} HTTP/1.0\r\nHost: x\r\ncontent-length: 0\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// A POST with the test indexer's admin token and an empty body; returns the status.
pub async fn admin_post(indexer: std::net::SocketAddr, path: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(indexer).await.unwrap();
    let req = format!(
        "POST {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer e2e-admin\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

pub async fn wait_metric(http: std::net::SocketAddr, name: &str, at_least: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = metric(&relay_metrics(http).await, name);
        if v >= at_least {
            return v;
        }
        assert!(Instant::now() < deadline, "{name} stayed at {v}, wanted {at_least}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A QUIC client trusting the relay's certificate, as a render node (or an impostor) uses.
pub fn quic_client(cert: &std::path::Path) -> (quinn::Endpoint, quinn::ClientConfig) {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from(std::fs::read(cert).unwrap())).unwrap();
    let mut tls =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    tls.alpn_protocols = vec![pylon_proto::framing::ALPN.to_vec()];
    let config =
        quinn::ClientConfig::new(std::sync::Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap()));
    (quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap(), config)
}

/// Waits (up to `within`) until a relay reported its RTT to `node` to the indexer: the
/// catalog matches no player to the node before.
pub async fn wait_rtt_reported(indexer: std::net::SocketAddr, node: &str, within: Duration) {
    let deadline = Instant::now() + within;
    while !http_get(indexer, "/api/v1/relays").await.contains(&format!("\"{node}\"")) {
        assert!(Instant::now() < deadline, "the relay never reported its RTT to {node}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Opens the catalog once the pool's node can be matched, and clicks `title`'s play link.
pub async fn click_play(b: &Browser, indexer: std::net::SocketAddr, title: &str) {
    // The relay reports its RTT to the node a moment after both start.
    wait_rtt_reported(indexer, POOL_NODE, Duration::from_secs(30)).await;
    b.client.goto(&format!("http://{indexer}/")).await.unwrap();
    b.wait_for("return window.pylonCatalog && pylonCatalog.titles.length > 0", Duration::from_secs(10)).await;
    // The catalog lists the pool's nodes with what the checkers found (nothing yet here).
    let row = format!(
        "const r = document.querySelector('#pool tr[data-node=\"{POOL_NODE}\"]'); \
         return r && !document.getElementById('pool').hidden ? r.dataset.verdict : null"
    );
    assert_eq!(b.wait_for(&row, Duration::from_secs(10)).await, "unchecked");
    b.eval(&format!("document.querySelector('a.play[data-title=\"{title}\"]').click(); return true;")).await;
}

/// Opens the catalog, clicks the demo title, and waits until the video plays at the relay.
pub async fn play_from_catalog(b: &Browser, indexer: std::net::SocketAddr) -> serde_json::Value {
    click_play(b, indexer, "demo").await;
    wait_playing(b, indexer, 30).await
}

/// After a click on a title in the catalog: waits until the play page has decoded `frames`
/// frames (the catalog's error fails the test, with `indexer`'s nodes), and checks the token
/// left the address bar. Returns the page's address, role, token and frames decoded.
pub async fn wait_playing(b: &Browser, indexer: std::net::SocketAddr, frames: u32) -> serde_json::Value {
    // Either the catalog says why it could not start, or the play page comes up.
    let first = b
        .wait_for(
            "return (window.pylonCatalog && pylonCatalog.error) ? { error: pylonCatalog.error } \
             : (window.pylon ? { ok: true } : null)",
            Duration::from_secs(30),
        )
        .await;
    if !first["error"].is_null() {
        let nodes = http_get(indexer, "/api/v1/nodes").await;
        panic!("the catalog could not start a game: {first}; nodes: {nodes}");
    }
    let played = b
        .wait_for(
            &format!(
                "return location.pathname.startsWith('/play/') && window.pylon && pylon.stats && pylon.stats.framesDecoded >= {frames} \
                 ? {{ href: location.href, role: pylon.role, token: history.state && history.state.token, \
                      frames: pylon.stats.framesDecoded }} : null"
            ),
            Duration::from_secs(60),
        )
        .await;
    // The token left the address bar (it lives in the history entry's state).
    assert!(!played["href"].as_str().unwrap().contains("token"), "{played}");
    assert!(played["token"].as_str().is_some_and(|t| !t.is_empty()), "{played}");
    played
}

/// The clock-tick fields of a `/proc/.../stat` line after its state, summed over `fields`
/// (indices after the state: 11 and 12 are utime and stime, 13 and 14 cutime and cstime),
/// in seconds; `comm` (which may hold spaces) with it.
fn stat_seconds(stat: &str, fields: &[usize]) -> Option<(String, f64)> {
    // "pid (comm) state ..." — the fields follow the last ')'.
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    let name = stat.get(open + 1..close).unwrap_or_default().to_string();
    let after: Vec<&str> = stat.get(close + 2..).unwrap_or_default().split_whitespace().collect();
    let ticks: f64 = fields.iter().map(|&i| after.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0)).sum();
    Some((name, ticks / 100.0))
}

/// CPU seconds per thread name of this process, from `/proc/self/task/*/stat`.
pub fn thread_cpu() -> std::collections::BTreeMap<String, f64> {
    let mut out = std::collections::BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return out };
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else { continue };
        let Some((name, seconds)) = stat_seconds(&stat, &[11, 12]) else { continue };
        *out.entry(name).or_insert(0.0) += seconds;
    }
    out
}

/// CPU seconds of this process, all its threads, those that have ended included
/// (`utime` + `stime`).
pub fn process_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    stat_seconds(&stat, &[11, 12]).map_or(0.0, |(_, s)| s)
}

/// Whether the checker tests should run the node named `name` (`honest` or a fake):
/// `PYLON_FAKES` (comma-separated names) runs only those; default, all.
pub fn node_wanted(name: &str) -> bool {
    std::env::var("PYLON_FAKES").map_or(true, |v| v.split(',').any(|n| n.trim() == name))
}

/// How many checks of each node the checker tests run: the environment variable `var`,
/// else `default`.
pub fn checks_each(var: &str, default: usize) -> usize {
    std::env::var(var).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// CPU seconds of the Chromium processes running now, of every user (`utime` + `stime`
/// of each process whose name starts `chrom`, chromedriver aside).
pub fn browser_cpu() -> f64 {
    let Ok(procs) = std::fs::read_dir("/proc") else { return 0.0 };
    procs
        .flatten()
        .filter(|p| p.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()))
        .filter_map(|p| std::fs::read_to_string(p.path().join("stat")).ok())
        .filter_map(|stat| stat_seconds(&stat, &[11, 12]))
        .filter(|(name, _)| name.starts_with("chrom") && name != "chromedriver")
        .map(|(_, seconds)| seconds)
        .sum()
}

/// CPU seconds of this process's waited-for children (`cutime` + `cstime`).
pub fn children_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    stat_seconds(&stat, &[13, 14]).map_or(0.0, |(_, s)| s)
}

/// Whether a thread of this process is the render node's frame path: `pylon-render`
/// (render or capture and conversion, and lavapipe's queue thread, which it starts),
/// `llvmpipe-N` (lavapipe's rasterizer threads: the GPU, on this machine),
/// `pylon-encode` and `pylon-x264` (the encoder's own worker threads).
pub fn is_frame_path_thread(name: &str) -> bool {
    matches!(name, "pylon-render" | "pylon-encode" | "pylon-x264") || name.starts_with("llvmpipe-")
}

/// Whether a thread of this process is the render node's sound: its audio thread and the
/// GStreamer threads that thread starts (the demo's `appsrc` named `src` streams on
/// `src:src`, which also runs the encoder and hands the packets over).
pub fn is_audio_thread(name: &str) -> bool {
    name.starts_with("pylon-audio") || name.starts_with("src:src")
}

/// Chromium's `inbound-rtp` statistics of the page's video (cumulative counters:
/// `framesDecoded`, `jitterBufferDelay`, `bytesReceived`, …) with the page's `role`, or null.
pub const VIDEO_INBOUND: &str = r#"
return (async () => {
  const stats = await pylon.pc.getStats();
  for (const s of stats.values()) {
    if (s.type === 'inbound-rtp' && s.kind === 'video') return Object.assign({ role: pylon.role }, s);
  }
  return null;
})()
"#;

/// Now, Unix seconds.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// Now, Unix milliseconds (the page's `Date.now()` clock).
pub fn unix_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

/// A POST with a JSON body; the answer's JSON body.
pub async fn post_json(addr: std::net::SocketAddr, path: &str, body: &serde_json::Value) -> serde_json::Value {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = body.to_string();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.0\r\nHost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    serde_json::from_str(out.split("\r\n\r\n").nth(1).unwrap_or_default()).unwrap_or_default()
}

/// A TCP proxy listening on `at` (any port) to `target` that holds every chunk `delay`
/// each way: a far relay without netem (or, with no delay, a plain forwarder).
pub async fn delaying_proxy(
    at: std::net::IpAddr,
    target: std::net::SocketAddr,
    delay: Duration,
) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind(std::net::SocketAddr::new(at, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(target).await else { return };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::join!(delayed_copy(cr, sw, delay), delayed_copy(sr, cw, delay));
            });
        }
    });
    addr
}

async fn delayed_copy(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 {
            break;
        }
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// A fresh database named `prefix_<pid>_<now>` on the PostgreSQL server
/// `PYLON_TEST_POSTGRES` names (its URL), or a SQLite file in `dir` without one.
pub async fn fresh_database(dir: &std::path::Path, prefix: &str) -> String {
    match std::env::var("PYLON_TEST_POSTGRES") {
        Ok(admin_url) if !admin_url.is_empty() => {
            use sqlx::Connection;
            sqlx::any::install_default_drivers();
            let name = format!("{prefix}_{}_{}", std::process::id(), unix_now());
            let mut admin = sqlx::AnyConnection::connect(&admin_url).await.expect("PostgreSQL reachable");
            sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut admin).await.unwrap();
            let base = admin_url.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin_url);
            format!("{base}/{name}")
        }
        _ => format!("sqlite://{}?mode=rwc", dir.join("indexer.db").display()),
    }
}
