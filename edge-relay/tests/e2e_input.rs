//! Playing from the browser: keyboard, gamepad and touch reach the game through the
//! DataChannels, the relay and QUIC; a blur releases held keys; click-to-photon samples
//! are collected from requestVideoFrameCallback.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use common::{Browser, metric, relay_metrics, start_platform, wait_metric};
use std::time::Duration;

/// Centroid of the ship's orange hull in the playing video, or null.
const SHIP: &str = concat!(
    video_pixels!(),
    r#"
let n = 0, sx = 0, sy = 0;
for (let i = 0; i < d.length; i += 4) {
  if (d[i] > 190 && d[i + 1] > 110 && d[i + 1] < 200 && d[i + 2] < 90) {
    const p = i / 4; n++; sx += p % c.width; sy += Math.floor(p / c.width);
  }
}
return n > 30 ? { x: sx / n, y: sy / n, n } : null;
"#
);

fn key(kind: &str, code: &str) -> String {
    format!("window.dispatchEvent(new KeyboardEvent('{kind}', {{ code: '{code}', bubbles: true }})); return true;")
}

async fn ship(b: &Browser) -> (f64, f64) {
    let v = b.wait_for(SHIP, Duration::from_secs(10)).await;
    (v["x"].as_f64().unwrap(), v["y"].as_f64().unwrap())
}

async fn settled_ship(b: &Browser) -> (f64, f64) {
    let mut last = ship(b).await;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let now = ship(b).await;
        if (now.0 - last.0).hypot(now.1 - last.1) < 1.5 {
            return now;
        }
        last = now;
    }
    last
}

/// Waits (up to 10 s) until the game's held-key count is `n`.
async fn wait_keys_held(platform: &common::Platform, n: f64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while platform.server_metrics_value("pylon_server_keys_held") != n {
        assert!(std::time::Instant::now() < deadline, "the game never had {n} keys held");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The ship's position once it is at least `min` pixels from `from` (up to 10 s, so a
/// loaded machine only slows the test down), or its settled position after that.
async fn ship_moved_from(b: &Browser, from: (f64, f64), min: f64) -> (f64, f64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = settled_ship(b).await;
        if dist(now, from) > min || std::time::Instant::now() > deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Frames decoded by the browser and rendered and encoded by the node, for failure messages.
async fn progress(b: &Browser, platform: &common::Platform) -> String {
    let decoded = b.eval("return pylon.stats.framesDecoded").await;
    let rendered = platform.server_metrics_value("pylon_server_frames_rendered");
    let encoded = platform.server_metrics_value("pylon_server_frames_encoded");
    let dropped: Vec<String> = platform
        .server_metrics
        .render()
        .lines()
        .filter(|l| l.starts_with("pylon_server_frames_dropped"))
        .map(str::to_string)
        .collect();
    format!("decoded {decoded}, rendered {rendered}, encoded {encoded}, {dropped:?}")
}

fn dist(a: (f64, f64), b: (f64, f64)) -> f64 {
    (a.0 - b.0).hypot(a.1 - b.1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyboard_gamepad_and_touch_reach_the_game() {
    let platform = start_platform(1280, 720, 60).await;
    let b = Browser::start().await;
    b.client.goto(&platform.url()).await.unwrap();
    b.wait_for(
        "return window.pylon && pylon.role === 'player' && pylon.stats && pylon.stats.framesDecoded > 20",
        Duration::from_secs(60),
    )
    .await;
    b.wait_for("return pylon.pc.sctp && pylon.pc.sctp.state === 'connected'", Duration::from_secs(10)).await;

    // Any input turns the autopilot off; the ship then holds still.
    b.eval(&key("keydown", "KeyX")).await;
    b.eval(&key("keyup", "KeyX")).await;
    let wait_applied = |n: f64| {
        let platform = &platform;
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while platform.server_metrics_value("pylon_server_input_applied") < n {
                assert!(std::time::Instant::now() < deadline, "input did not reach the game");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    wait_applied(2.0).await;
    let before = settled_ship(&b).await;

    // Keyboard: thrust forward for half a second once the game has the key.
    b.eval(&key("keydown", "ArrowUp")).await;
    wait_keys_held(&platform, 1.0).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    b.eval(&key("keyup", "ArrowUp")).await;
    wait_keys_held(&platform, 0.0).await;
    let before_progress = progress(&b, &platform).await;
    let after = ship_moved_from(&b, before, 40.0).await;
    assert!(
        dist(before, after) > 40.0,
        "thrust moves the ship: {before:?} → {after:?} (frames then: {before_progress}; now: {})",
        progress(&b, &platform).await
    );

    // A key held when the window loses focus is released.
    b.eval(&key("keydown", "ArrowLeft")).await;
    wait_keys_held(&platform, 1.0).await;
    b.eval("window.dispatchEvent(new Event('blur')); return true;").await;
    wait_keys_held(&platform, 0.0).await;

    // Gamepad: a synthetic pad with the left stick pushed down flies the ship down.
    let start = settled_ship(&b).await;
    b.eval(
        "const pad = { connected: true, buttons: Array.from({ length: 17 }, () => ({ value: 0, pressed: false })), \
         axes: [0, 1, 0, 0] }; navigator.getGamepads = () => [pad, null, null, null]; return true;",
    )
    .await;
    // Held until the ship is seen lower than it started: gamepads are polled per animation
    // frame, which a loaded machine may delay. Sampled often, and released as soon as it
    // has moved, because a held stick keeps the ship flying and the screen wraps.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    let moved_down = loop {
        let now = ship(&b).await;
        seen.push(now);
        let down = now.1 - start.1;
        if (30.0..400.0).contains(&down) {
            break true;
        }
        if std::time::Instant::now() > deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    };
    b.eval("navigator.getGamepads = () => [null, null, null, null]; return true;").await;
    assert!(moved_down, "the stick flies the ship down: from {start:?}, seen {seen:?}");

    // Touch: a finger far from the ship draws it closer.
    let start = settled_ship(&b).await;
    let target = if start.0 > 640.0 { (200.0, 360.0) } else { (1080.0, 360.0) };
    let touch = |kind: &str| {
        format!(
            "const v = document.getElementById('video'); const r = v.getBoundingClientRect(); \
             const t = new Touch({{ identifier: 1, target: v, clientX: r.left + {x} * r.width / 1280, clientY: r.top + {y} * r.height / 720 }}); \
             v.dispatchEvent(new TouchEvent('{kind}', {{ touches: '{kind}' === 'touchend' ? [] : [t], changedTouches: [t], bubbles: true, cancelable: true }})); return true;",
            x = target.0,
            y = target.1
        )
    };
    // Held until the ship is seen near the finger, sampled often: the ship accelerates
    // towards the finger and may orbit it, so where it ends after the release (momentum,
    // screen wrap) says nothing; how close it came while the finger was down does.
    b.eval(&touch("touchstart")).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut closest = start;
    let mut seen = Vec::new();
    while std::time::Instant::now() < deadline {
        let now = ship(&b).await;
        seen.push(now);
        if dist(now, target) < dist(closest, target) {
            closest = now;
        }
        if dist(closest, target) < 150.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    b.eval(&touch("touchend")).await;
    assert!(
        dist(closest, target) < dist(start, target) - 40.0 && dist(closest, target) < 150.0,
        "touch steers towards the finger {target:?}: from {start:?}, seen {seen:?}"
    );

    // Mouse: a real move (DevTools input, through the browser's own input pipeline) reaches
    // the game, sent from `pointerrawupdate`: already on its way when the animation frame's
    // `mousemove` is dispatched (the capture listener below runs before the page's own).
    let raw = b
        .eval(
            "window.seqBefore = pylon.latency.encoder.seq; window.seqAtMousemove = null; \
             addEventListener('mousemove', () => { if (window.seqAtMousemove === null) window.seqAtMousemove = pylon.latency.encoder.seq; }, true); \
             return 'onpointerrawupdate' in window",
        )
        .await;
    assert_eq!(raw, serde_json::json!(true), "Chromium on localhost has pointerrawupdate");
    let applied = platform.server_metrics_value("pylon_server_input_applied");
    let at = b
        .eval("const r = document.getElementById('video').getBoundingClientRect(); return { x: r.left + r.width / 4, y: r.top + r.height / 2 }")
        .await;
    b.cdp("Input.dispatchMouseEvent", serde_json::json!({ "type": "mouseMoved", "x": at["x"], "y": at["y"] })).await;
    wait_applied(applied + 1.0).await;
    let seq = b
        .wait_for(
            "return window.seqAtMousemove === null ? null : [window.seqBefore, window.seqAtMousemove]",
            Duration::from_secs(5),
        )
        .await;
    assert!(seq[1].as_f64() > seq[0].as_f64(), "the move was sent before the animation frame's mousemove: {seq}");

    // Click-to-photon samples were measured for the presses.
    let latency =
        b.wait_for("const s = pylon.latency.summary(); return s.count >= 2 ? s : null", Duration::from_secs(10)).await;
    eprintln!("click-to-photon: {latency}");
    assert!(latency["p50"].as_f64().unwrap() > 0.0);
    // The overlay's split of the last press: every part measured, and they add up.
    let p = &latency["lastPress"];
    let part = |k: &str| p[k].as_f64().unwrap_or_else(|| panic!("the last press has no {k}: {p}"));
    assert!(part("node") > 0.0 && part("render") > 0.0 && part("encode") > 0.0, "{p}");
    assert!(part("decode") >= 0.0 && part("display") >= 0.0 && part("jitterBuffer") >= 0.0, "{p}");
    let sum = part("network") + part("node") + part("relay") + part("jitterBuffer") + part("decode") + part("display");
    assert!((sum - part("total")).abs() < 0.01, "the parts add up to the press's time: {p}");
    b.close().await;
    platform.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_and_spectators_are_refused_and_counted() {
    let platform = start_platform(640, 360, 30).await;
    let http = platform.relay.http_addr;
    let b = Browser::start().await;
    b.client.goto(&platform.url()).await.unwrap();
    b.wait_for(
        "return window.pylon && pylon.role === 'player' && pylon.stats && pylon.stats.framesDecoded > 10",
        Duration::from_secs(60),
    )
    .await;
    b.wait_for("return pylon.channels && pylon.channels.input.readyState === 'open'", Duration::from_secs(10)).await;

    // Hostile messages straight onto the input channel.
    let hostile = r#"
const ch = pylon.channels.input;
const hdr = (type, extra) => { const b = new Uint8Array(10 + extra); b[0] = 1; b[1] = type; b[5] = 1; return b; };
const send = (b) => ch.send(b.buffer);
send(new Uint8Array([1, 1, 0]));                       // truncated
send(new Uint8Array(5000));                            // oversized
const v2 = hdr(1, 3); v2[0] = 9; send(v2);              // unknown version
send(hdr(42, 0));                                      // unknown type
const key = hdr(1, 3); key[10] = 0xff; key[11] = 0xff; send(key);   // key out of range
const wheel = hdr(5, 8); const dv = new DataView(wheel.buffer);
dv.setFloat32(10, NaN); dv.setFloat32(14, 1e30); send(wheel);        // NaN and 1e30
const pad = hdr(6, 6); pad[10] = 0; pad[11] = 1; pad[12] = 0; pad[13] = 1; pad[14] = 0x80; pad[15] = 0; send(pad); // axis -32768
const touch = hdr(7, 2); touch[10] = 0; touch[11] = 255; send(touch); // 255 (of 10,000) touch points
ch.send('{"type":"hold","ms":"forever"}');             // a text message for the relay, malformed
return true;
"#;
    b.eval(hostile).await;
    let refused = |reason: &str| format!("pylon_relay_input_refused_total{{reason=\"{reason}\"}}");
    wait_metric(http, &refused("size"), 2.0).await;
    wait_metric(http, &refused("malformed"), 3.0).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while platform.server_metrics_value("pylon_server_input_rejected") < 4.0 {
        assert!(std::time::Instant::now() < deadline, "the node did not refuse out-of-range input");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A flood is rate-limited at the relay and the video keeps playing.
    let decoded = b.eval("return pylon.stats.framesDecoded").await.as_f64().unwrap();
    b.eval(
        "const ch = pylon.channels.input; const m = new Uint8Array([1, 4, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0]); \
         for (let i = 0; i < 5000; i++) ch.send(m.buffer); return true;",
    )
    .await;
    wait_metric(http, &refused("rate_limited"), 100.0).await;
    b.wait_for(&format!("return pylon.stats.framesDecoded > {} + 30", decoded), Duration::from_secs(20)).await;

    // A second viewer is a spectator: its input is refused and counted.
    b.client.new_window(true).await.unwrap();
    let handles = b.client.windows().await.unwrap();
    b.client.switch_to_window(handles.last().unwrap().clone()).await.unwrap();
    b.client.goto(&platform.url()).await.unwrap();
    b.wait_for(
        "return window.pylon && pylon.role === 'spectator' && pylon.stats && pylon.stats.framesDecoded > 10",
        Duration::from_secs(60),
    )
    .await;
    b.wait_for("return pylon.channels && pylon.channels.input.readyState === 'open'", Duration::from_secs(10)).await;
    b.eval(
        "const ch = pylon.channels.input; const m = new Uint8Array([1, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 22, 0]); \
         for (let i = 0; i < 3; i++) ch.send(m.buffer); return true;",
    )
    .await;
    wait_metric(http, &refused("spectator"), 3.0).await;

    // A second spectator, from the /watch/ link: it decodes too, and its key presses do
    // not reach the game.
    b.client.new_window(true).await.unwrap();
    let handles = b.client.windows().await.unwrap();
    b.client.switch_to_window(handles.last().unwrap().clone()).await.unwrap();
    b.watch(&platform, 10, Duration::from_secs(60)).await;
    b.wait_for("return pylon.channels && pylon.channels.input.readyState === 'open'", Duration::from_secs(10)).await;
    // (The page does not even capture a spectator's input; the relay would refuse it.)
    b.eval("window.dispatchEvent(new KeyboardEvent('keydown', { code: 'ArrowUp', bubbles: true })); return true;")
        .await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(platform.server_metrics_value("pylon_server_keys_held"), 0.0, "a spectator's key reached the game");
    b.eval("window.dispatchEvent(new KeyboardEvent('keyup', { code: 'ArrowUp', bubbles: true })); return true;").await;
    assert_eq!(metric(&relay_metrics(http).await, "pylon_relay_viewers"), 3.0, "player and two spectators");
    b.close().await;
    platform.stop().await;
}
