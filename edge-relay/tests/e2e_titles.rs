//! Studio titles end to end: a real game from Debian (Chromium B.S.U.) deployed as a
//! launch spec, picked in the catalog, run in a session sandbox on the node, captured
//! (XShm) and played in Chromium; titles that crash or never draw end their session with
//! a message to the player and the indexer, leave nothing behind, and the node takes the
//! next session.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use common::{Browser, Title, http_get, start_pool_with_titles};
use std::time::{Duration, Instant};

const BSU: &str = "/usr/games/chromium-bsu";
const SDL_TESTS: &str = "/usr/libexec/installed-tests/SDL2";

fn exec_title(id: &str, command: &str, args: &[&str], (width, height): (i64, i64)) -> Title {
    Title {
        id: id.into(),
        name: id.into(),
        launch: "exec".into(),
        command: command.into(),
        args: args.iter().map(|a| a.to_string()).collect(),
        env: [("SDL_AUDIODRIVER".to_string(), "dummy".to_string())].into(),
        width,
        height,
        fps: 30,
        ..Title::default()
    }
}

/// Opens the catalog, clicks `title`; returns the catalog's error or the play page's state
/// once it decoded `frames` frames.
async fn play(b: &Browser, indexer: std::net::SocketAddr, title: &str) -> serde_json::Value {
    play_until(b, indexer, title, 10).await
}

async fn play_until(b: &Browser, indexer: std::net::SocketAddr, title: &str, frames: u32) -> serde_json::Value {
    common::click_play(b, indexer, title).await;
    b.wait_for(
        &format!(
            "return (window.pylonCatalog && pylonCatalog.error) ? {{ error: pylonCatalog.error }} \
             : (location.pathname.startsWith('/play/') && window.pylon && pylon.stats && pylon.stats.framesDecoded >= {frames} \
                ? {{ session: location.pathname.split('/').pop(), width: pylon.stats.width, height: pylon.stats.height }} : null)"
        ),
        Duration::from_secs(60),
    )
    .await
}

/// The game's 512x384 window, centred in the 1280x720 video, shrunk to 64x48 grey levels.
const THUMB: &str = r#"
const v = document.getElementById('video');
if (!v || v.videoWidth === 0) return null;
const c = document.createElement('canvas'); c.width = 64; c.height = 48;
const g = c.getContext('2d', { willReadFrequently: true });
g.drawImage(v, 384, 168, 512, 384, 0, 0, 64, 48);
const d = g.getImageData(0, 0, 64, 48).data;
const out = [];
for (let i = 0; i < d.length; i += 4) out.push((d[i] + d[i + 1] + d[i + 2]) / 3);
return out;
"#;

async fn thumb(b: &Browser) -> Vec<f64> {
    let v = b.wait_for(THUMB, Duration::from_secs(10)).await;
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

fn diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f64>() / a.len() as f64
}

/// Frames Chromium decoded so far (its inbound-rtp `framesDecoded`, which the page reads
/// once a second).
async fn decoded(b: &Browser) -> f64 {
    b.eval("return pylon.stats.framesDecoded").await.as_f64().unwrap()
}

/// Waits (up to `timeout`) until the machine's CPUs are at most 25 % busy over half a
/// second, from `/proc/stat`; returns the last reading.
async fn quiet_cpu(timeout: Duration) -> f64 {
    let sample = || {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let cpu: Vec<u64> =
            stat.lines().next().unwrap_or_default().split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
        let idle = cpu.get(3).copied().unwrap_or(0) + cpu.get(4).copied().unwrap_or(0);
        (cpu.iter().sum::<u64>(), idle)
    };
    let deadline = Instant::now() + timeout;
    loop {
        let (t0, i0) = sample();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (t1, i1) = sample();
        let busy = 1.0 - (i1 - i0) as f64 / (t1 - t0).max(1) as f64;
        if busy <= 0.25 || Instant::now() > deadline {
            return busy;
        }
    }
}

/// CPU seconds the node's frame-path threads (see [`common::is_frame_path_thread`]) have
/// used, from `/proc/self/task`.
fn frame_path_cpu() -> f64 {
    common::thread_cpu().iter().filter(|(name, _)| common::is_frame_path_thread(name)).map(|(_, s)| s).sum()
}

/// With `PYLON_SCREENSHOTS=DIR`, saves the playing video as `DIR/title-NAME.png`.
async fn screenshot(b: &Browser, name: &str) {
    use base64::Engine as _;
    let Some(dir) = std::env::var_os("PYLON_SCREENSHOTS") else { return };
    let png = b
        .eval(
            "const v = document.getElementById('video'); const c = document.createElement('canvas'); \
             c.width = v.videoWidth; c.height = v.videoHeight; c.getContext('2d').drawImage(v, 0, 0); \
             return c.toDataURL('image/png');",
        )
        .await;
    let data = png.as_str().unwrap_or_default().trim_start_matches("data:image/png;base64,");
    let bytes = base64::engine::general_purpose::STANDARD.decode(data).unwrap_or_default();
    let _ = std::fs::write(std::path::Path::new(&dir).join(format!("title-{name}.png")), bytes);
}

fn key(kind: &str, code: &str) -> String {
    format!("window.dispatchEvent(new KeyboardEvent('{kind}', {{ code: '{code}', bubbles: true }})); return true;")
}

/// Processes of this test's sandboxes still alive: Xvfb servers and the titles' programs.
fn sandbox_processes(dir_hint: &str) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        let env = std::fs::read(entry.path().join("environ")).unwrap_or_default();
        let env = String::from_utf8_lossy(&env);
        if (cmd.starts_with("Xvfb") || cmd.contains("/Xvfb")) && cmd.contains(dir_hint) || env.contains(dir_hint) {
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            if !stat.contains(") Z ") {
                out.push(cmd);
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_debian_game_deployed_as_a_title_plays_in_chromium_and_takes_keys() {
    // The game draws a 512x384 window (its smallest: two CPU cores run the game, the
    // node and Chromium here), which SDL centres on the session's 1280x720 screen.
    let bsu = exec_title("bsu", BSU, &["-w", "-na", "-v", "0"], (1280, 720));
    // A frame-rate figure on two cores means little while the previous test binary's
    // browsers are still going away: start on a quiet machine.
    let busy = quiet_cpu(Duration::from_secs(20)).await;
    eprintln!("the machine was {:.0} % busy when the game started", busy * 100.0);
    let platform = start_pool_with_titles(1280, 720, 60, vec![bsu]).await;
    let indexer = platform.indexer.unwrap();
    let b = Browser::start().await;
    let started = play(&b, indexer, "bsu").await;
    assert!(started["error"].is_null(), "{started}");
    assert_eq!((started["width"].as_u64(), started["height"].as_u64()), (Some(1280), Some(720)), "{started}");
    assert_eq!(platform.server_metrics_value("pylon_server_title_running"), 1.0);

    // Frame rate as Chromium decodes it, over 8 s.
    let (f0, t0, cpu0) = (decoded(&b).await, Instant::now(), frame_path_cpu());
    tokio::time::sleep(Duration::from_secs(8)).await;
    let secs = t0.elapsed().as_secs_f64();
    let fps = (decoded(&b).await - f0) / secs;
    let cpu = (frame_path_cpu() - cpu0) / secs;
    eprintln!(
        "Chromium B.S.U. in Chromium at 1280x720: {fps:.1} frames/s decoded; the node's frame path \
         (capture, convert, encode) used {:.0} % of a core",
        cpu * 100.0
    );
    for line in platform.server_metrics.render().lines().filter(|l| {
        [
            "frames_encoded",
            "frames_dropped",
            "title_unchanged",
            "frames_rendered",
            "stage_seconds_sum",
            "stage_seconds_count",
        ]
        .iter()
        .any(|m| l.contains(m))
            && !l.starts_with('#')
    }) {
        eprintln!("  {line}");
    }
    assert!(fps >= 25.0, "the game reaches 25 fps in the browser: {fps:.1}");

    // The menu's top third is its bright logo (animated lightning); Enter starts a game,
    // whose top third is the dark playfield. Judged on that, not on motion, since both
    // screens animate.
    let logo = |t: &[f64]| t[..20 * 64].iter().sum::<f64>() / (20.0 * 64.0);
    let menu = thumb(&b).await;
    let menu_logo = logo(&menu);
    screenshot(&b, "menu").await;
    let applied = platform.server_metrics_value("pylon_server_input_applied");
    b.eval(&key("keydown", "Enter")).await;
    b.eval(&key("keyup", "Enter")).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut after = menu.clone();
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(300)).await;
        after = thumb(&b).await;
        if logo(&after) < 0.6 * menu_logo {
            break;
        }
    }
    eprintln!(
        "after Enter: the logo area's mean grey level went from {menu_logo:.1} to {:.1}; the picture changed by {:.1}",
        logo(&after),
        diff(&menu, &after)
    );
    screenshot(&b, "after-enter").await;
    assert!(platform.server_metrics_value("pylon_server_input_applied") >= applied + 2.0, "the key reached the node");
    assert!(logo(&after) < 0.6 * menu_logo, "the game left its menu after Enter: {menu_logo:.1} → {:.1}", logo(&after));
    b.close().await;
    // The player left: the sandbox goes.
    let deadline = Instant::now() + Duration::from_secs(15);
    while platform.server_metrics_value("pylon_server_title_running") != 0.0 {
        assert!(Instant::now() < deadline, "the title was stopped when the player left");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    platform.stop().await;
}

/// Counts, over 2 s of `requestVideoFrameCallback`, the distinct colours of the video's
/// centre pixel; returns `{distinct, frames, width, height}`.
const DISTINCT_FRAMES: &str = r#"
if (window.__distinct === undefined) {
  window.__distinct = null;
  const v = document.getElementById('video');
  const c = document.createElement('canvas'); c.width = 1; c.height = 1;
  const g = c.getContext('2d', { willReadFrequently: true });
  const seen = new Set(); let frames = 0; let t0 = null;
  const step = (now) => {
    if (t0 === null) t0 = now;
    g.drawImage(v, v.videoWidth / 2, v.videoHeight / 2, 1, 1, 0, 0, 1, 1);
    const d = g.getImageData(0, 0, 1, 1).data;
    seen.add(d[0] + ',' + d[1] + ',' + d[2]); frames++;
    if (now - t0 < 2000) v.requestVideoFrameCallback(step);
    else window.__distinct = { distinct: seen.size, frames, width: v.videoWidth, height: v.videoHeight };
  };
  v.requestVideoFrameCallback(step);
}
return window.__distinct;
"#;

/// The node's `pylon_server_capture_frames_total{path="…"}`.
fn capture_frames(platform: &common::Platform, path: &str) -> f64 {
    let needle = format!("pylon_server_capture_frames_total{{path=\"{path}\"}} ");
    platform
        .server_metrics
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(&needle).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vulkan_title_streams_through_its_present_layer_and_without_it_through_xshm() {
    // SDL2's testvulkan clears its 640x480 swapchain to a new colour every frame.
    let layer = exec_title("vulkan", &format!("{SDL_TESTS}/testvulkan"), &[], (640, 480));
    let mut xshm = exec_title("vulkan-xshm", &format!("{SDL_TESTS}/testvulkan"), &[], (640, 480));
    xshm.env.insert("PYLON_CAPTURE".into(), "xshm".into());
    let platform = start_pool_with_titles(640, 480, 30, vec![layer, xshm]).await;
    let indexer = platform.indexer.unwrap();
    for (title, path, other) in [("vulkan", "layer", "xshm"), ("vulkan-xshm", "xshm", "layer")] {
        let b = Browser::start().await;
        let before = (capture_frames(&platform, path), capture_frames(&platform, other));
        let started = play(&b, indexer, title).await;
        assert!(started["error"].is_null(), "{started}");
        // Past the first frames (a title may draw through X before its swapchain exists).
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mid = capture_frames(&platform, other);
        let seen = b.wait_for(DISTINCT_FRAMES, Duration::from_secs(20)).await;
        let after = (capture_frames(&platform, path), capture_frames(&platform, other));
        eprintln!(
            "{title}: {seen} in Chromium; frames converted through {path}: {}, through {other}: {}",
            after.0 - before.0,
            after.1 - before.1
        );
        assert_eq!((seen["width"].as_u64(), seen["height"].as_u64()), (Some(640), Some(480)), "{seen}");
        assert!(seen["distinct"].as_u64().unwrap() > 20, "more than 20 distinct frames in 2 s: {seen}");
        assert!(after.0 - before.0 >= 40.0, "frames took the {path} path");
        assert_eq!(after.1, mid, "once playing, no frame took the {other} path");
        b.close().await;
        let deadline = Instant::now() + Duration::from_secs(15);
        while platform.server_metrics_value("pylon_server_title_running") != 0.0 {
            assert!(Instant::now() < deadline, "the title was stopped when the player left");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    platform.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn titles_that_crash_or_never_draw_end_their_session_and_the_node_takes_the_next() {
    let crashes =
        exec_title("crashes", "sh", &["-c", &format!("{SDL_TESTS}/testrelative & sleep 6; kill -SEGV $$")], (640, 480));
    let blank = exec_title("blank", "sleep", &["1000"], (640, 480));
    let missing = exec_title("missing", "/usr/games/pylon-no-such-game", &[], (640, 480));
    let platform = start_pool_with_titles(1280, 720, 30, vec![crashes, blank, missing]).await;
    let indexer = platform.indexer.unwrap();
    let hint = "pylon-e2e-";

    // A title whose program the node lacks is never matched there: the player is told.
    let b = Browser::start().await;
    let refused = play(&b, indexer, "missing").await;
    eprintln!("missing program: {refused}");
    assert!(refused["error"].as_str().is_some_and(|e| e.contains("title")), "{refused}");

    // A crash mid-session: the player sees why, the indexer ends the session.
    let playing = play(&b, indexer, "crashes").await;
    let session = playing["session"].as_str().expect("the title played").to_string();
    let ended = b.wait_for("return pylon.state === 'ended' ? pylon.error : null", Duration::from_secs(30)).await;
    eprintln!("the player was told: {ended}");
    assert!(ended.as_str().unwrap().contains("signal 11"), "{ended}");
    let spectate = common::http_post(indexer, &format!("/api/v1/sessions/{session}/spectate")).await;
    assert!(spectate.contains("not_found"), "the indexer ended the session: {spectate}");

    // A title that never draws: ended at the deadline (10 s here).
    let started = Instant::now();
    let playing = play_until(&b, indexer, "blank", 0).await;
    assert!(playing["error"].is_null(), "{playing}");
    let ended = b.wait_for("return pylon.state === 'ended' ? pylon.error : null", Duration::from_secs(30)).await;
    eprintln!("the player was told: {ended} after {:?}", started.elapsed());
    assert!(ended.as_str().unwrap().contains("no picture"), "{ended}");
    // While a title loads the node shows nothing else (it rested before the session).
    let decoded = b.eval("return pylon.stats.framesDecoded").await;
    assert_eq!(decoded, 0, "the player of a title that never drew saw a picture");
    let failures = platform.server_metrics_value("pylon_server_title_failures");
    assert_eq!(failures, 2.0, "a crash and a blank title were counted");

    // Nothing is left of either session, and the node takes the next player.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sandbox_processes(hint).is_empty() {
        assert!(Instant::now() < deadline, "left behind: {:?}", sandbox_processes(hint));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let next = play(&b, indexer, "demo").await;
    assert!(next["error"].is_null(), "the node took the next session: {next}");
    let nodes = http_get(indexer, "/api/v1/nodes").await;
    assert!(nodes.contains("\"state\":\"ready\""), "{nodes}");
    b.close().await;
    platform.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_browsers_gamepad_reaches_an_sdl_title_as_an_xbox_pad() {
    let pad = Title {
        input_kinds: vec![
            pylon_indexer_client::api::InputKind::Gamepad,
            pylon_indexer_client::api::InputKind::Keyboard,
        ],
        ..exec_title("pad", &format!("{SDL_TESTS}/testgamecontroller"), &[], (640, 480))
    };
    let platform = start_pool_with_titles(1280, 720, 30, vec![pad]).await;
    let indexer = platform.indexer.unwrap();
    let b = Browser::start().await;
    let playing = play(&b, indexer, "pad").await;
    let session = playing["session"].as_str().expect("the title played").to_string();
    b.wait_for("return pylon.pc.sctp && pylon.pc.sctp.state === 'connected'", Duration::from_secs(10)).await;
    let log = platform.data_dir().join("sessions").join(&session).join("title.log");
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    // A synthetic standard-mapping pad in the page: A held, left stick pushed left.
    b.eval(
        "const pad = { connected: true, mapping: 'standard', \
         buttons: Array.from({ length: 17 }, (_, i) => ({ value: i === 0 ? 1 : 0, pressed: i === 0 })), \
         axes: [-0.8, 0, 0, 0] }; navigator.getGamepads = () => [pad, null, null, null]; return true;",
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let reached = |log: &str| {
        log.contains("Game controller device 0 added")
            && log.contains("button a pressed")
            && log.contains("axis leftx changed to -26")
    };
    while !reached(&read()) {
        assert!(Instant::now() < deadline, "the pad's A and stick never reached the title: {}", read());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    b.eval("navigator.getGamepads = () => [null, null, null, null]; return true;").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !read().contains("button a released") {
        assert!(Instant::now() < deadline, "unplugging the pad released A: {}", read());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "testgamecontroller saw: {}",
        read().lines().filter(|l| l.contains("Controller")).collect::<Vec<_>>().join(" | ")
    );
    b.close().await;
    platform.stop().await;
}
