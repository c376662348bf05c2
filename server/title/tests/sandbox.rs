//! Real titles in a real sandbox: Debian's Xvfb, SDL2's test programs (libsdl2-tests) and
//! shell scripts that crash, hang or ignore SIGTERM. Every test counts what is left after
//! the session: no process of the title's group, no X server, no display socket, no files.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use pylon_proto::input::{InputEvent, KEY_CODES};
use pylon_title::sandbox::{LaunchSpec, Sandbox, SandboxConfig, SandboxError, TitleExit};
use pylon_title::x11::X11Session;
use std::path::Path;
use std::time::{Duration, Instant};

const SDL_TESTS: &str = "/usr/libexec/installed-tests/SDL2";

fn config(dir: &Path) -> SandboxConfig {
    let mut c = SandboxConfig::new(dir.to_path_buf());
    c.stop_grace = Duration::from_millis(500);
    c
}

fn spec(command: &str, args: &[&str]) -> LaunchSpec {
    LaunchSpec {
        command: command.into(),
        args: args.iter().map(|s| s.to_string()).collect(),
        workdir: None,
        env: [("SDL_AUDIODRIVER".to_string(), "dummy".to_string())].into(),
        width: 640,
        height: 480,
        gamepads: 0,
    }
}

fn key(code: &str) -> u16 {
    KEY_CODES.iter().position(|c| *c == code).unwrap() as u16
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z ")
}

/// Stops the sandbox and checks that nothing of it is left.
fn stop_and_count_leftovers(sandbox: Sandbox) -> pylon_title::sandbox::StopReport {
    let (title, xvfb, display, dir) =
        (sandbox.title_pid(), sandbox.xvfb_pid(), sandbox.display(), sandbox.dir().to_path_buf());
    let report = sandbox.stop();
    let number = display.trim_start_matches(':');
    let left: Vec<String> = [
        (alive(title), format!("title process {title}")),
        (alive(xvfb), format!("Xvfb {xvfb}")),
        (Path::new(&format!("/tmp/.X11-unix/X{number}")).exists(), format!("display socket {display}")),
        (Path::new(&format!("/tmp/.X{number}-lock")).exists(), format!("display lock {display}")),
        (dir.exists(), format!("session directory {}", dir.display())),
        // (Its socket directory is named by display number, which a session started in
        // parallel may already reuse: the process check is the session's own.)
        (sound_server_of(&dir), format!("pulseaudio of {}", dir.display())),
    ]
    .into_iter()
    .filter_map(|(left, what)| left.then_some(what))
    .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    report
}

/// Whether a PulseAudio server of the session in `dir` still runs.
fn sound_server_of(dir: &Path) -> bool {
    let needle = dir.to_string_lossy().to_string();
    std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd);
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        cmd.contains("pulseaudio") && cmd.contains(&needle) && !stat.contains(") Z ")
    })
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn keys_sent_through_xtest_reach_an_sdl_title_and_its_frames_are_grabbed() {
    let dir = tempfile::tempdir().unwrap();
    let mut sandbox =
        Sandbox::start(&config(dir.path()), "keys", &spec(&format!("{SDL_TESTS}/checkkeys"), &[])).unwrap();
    let number: u32 = sandbox.display().trim_start_matches(':').parse().unwrap();
    let mut x = X11Session::connect(number, sandbox.cookie(), (1280, 960)).unwrap();
    assert_eq!(x.size(), (640, 480));
    wait_for("the title's first frame", Duration::from_secs(20), || x.damaged().unwrap());
    let grab = x.grab().unwrap();
    assert_eq!((grab.width, grab.height, grab.stride), (640, 480, 2560));
    assert!(grab.pixels.len() >= 640 * 480 * 4);
    // SDL takes a moment after mapping its window before it reads keys (a player's first
    // key comes far later than this).
    std::thread::sleep(Duration::from_secs(1));
    // Pointer into the window (video coordinates are scaled: 1280x960 → 640x480), then keys.
    x.apply(&InputEvent::MouseMove { x: 200, y: 200, dx: 0, dy: 0 }).unwrap();
    for code in ["KeyP", "Digit7", "Space"] {
        x.apply(&InputEvent::KeyDown { key: key(code), modifiers: 0 }).unwrap();
        x.apply(&InputEvent::KeyUp { key: key(code), modifiers: 0 }).unwrap();
    }
    // A key still held when the player leaves is released.
    x.apply(&InputEvent::KeyDown { key: key("ShiftLeft"), modifiers: 0 }).unwrap();
    assert_eq!(x.held(), 1);
    x.release_all().unwrap();
    assert_eq!(x.held(), 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    let wanted = ["= P", "= 7", "= Space", "Key released:  scancode 225 = Left Shift"];
    loop {
        let log = sandbox.log_tail(64 * 1024);
        if wanted.iter().all(|k| log.contains(k)) {
            break;
        }
        assert!(Instant::now() < deadline, "checkkeys did not log {wanted:?}: {log}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(sandbox.exited().is_none(), "the title still runs");
    drop(x);
    let report = stop_and_count_leftovers(sandbox);
    assert!(report.terminated && !report.killed, "{report:?}");
}

#[test]
fn a_missing_program_is_a_clear_error_and_starts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let err = Sandbox::start(&config(dir.path()), "missing", &spec("pylon-no-such-game", &[])).unwrap_err();
    assert!(matches!(err, SandboxError::NotFound(_)), "{err}");
    assert!(err.to_string().contains("pylon-no-such-game"), "{err}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "no session directory");
}

#[test]
fn a_crash_is_seen_with_its_signal_and_cleaned_up() {
    let dir = tempfile::tempdir().unwrap();
    let mut sandbox =
        Sandbox::start(&config(dir.path()), "crash", &spec("sh", &["-c", "echo starting; sleep 0.3; kill -SEGV $$"]))
            .unwrap();
    wait_for("the crash", Duration::from_secs(10), || sandbox.exited().is_some());
    assert_eq!(sandbox.exited(), Some(TitleExit::Exited("was killed by signal 11".into())));
    assert!(sandbox.log_tail(100).contains("starting"));
    stop_and_count_leftovers(sandbox);
}

#[test]
fn a_title_that_ignores_sigterm_and_its_children_are_killed() {
    let dir = tempfile::tempdir().unwrap();
    let script = "trap '' TERM; (trap '' TERM; sleep 1000) & sleep 1000";
    let sandbox = Sandbox::start(&config(dir.path()), "stubborn", &spec("sh", &["-c", script])).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let report = stop_and_count_leftovers(sandbox);
    assert!(report.terminated && report.killed, "{report:?}");
    assert!(started.elapsed() < Duration::from_secs(5), "stopped within the grace period and a little");
}

#[test]
fn a_title_that_never_draws_shows_no_damage() {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = Sandbox::start(&config(dir.path()), "idle", &spec("sleep", &["1000"])).unwrap();
    let number: u32 = sandbox.display().trim_start_matches(':').parse().unwrap();
    let mut x = X11Session::connect(number, sandbox.cookie(), (640, 480)).unwrap();
    std::thread::sleep(Duration::from_millis(800));
    assert!(!x.damaged().unwrap(), "nothing was drawn");
    drop(x);
    stop_and_count_leftovers(sandbox);
}

#[test]
fn another_sessions_display_refuses_a_client_without_its_cookie() {
    let dir = tempfile::tempdir().unwrap();
    let a = Sandbox::start(&config(dir.path()), "a", &spec("sleep", &["1000"])).unwrap();
    let b = Sandbox::start(&config(dir.path()), "b", &spec("sleep", &["1000"])).unwrap();
    assert_ne!(a.display(), b.display(), "one display number per session");
    let number: u32 = a.display().trim_start_matches(':').parse().unwrap();
    assert!(X11Session::connect(number, b.cookie(), (640, 480)).is_err(), "b's cookie does not open a's screen");
    assert!(X11Session::connect(number, a.cookie(), (640, 480)).is_ok());
    stop_and_count_leftovers(a);
    stop_and_count_leftovers(b);
}

#[test]
fn relative_motion_under_pointer_lock_moves_what_an_sdl_relative_mode_title_draws() {
    let dir = tempfile::tempdir().unwrap();
    let mut sandbox =
        Sandbox::start(&config(dir.path()), "relative", &spec(&format!("{SDL_TESTS}/testrelative"), &[])).unwrap();
    let number: u32 = sandbox.display().trim_start_matches(':').parse().unwrap();
    let mut x = X11Session::connect(number, sandbox.cookie(), (640, 480)).unwrap();
    wait_for("the title's first frame", Duration::from_secs(20), || x.damaged().unwrap());
    std::thread::sleep(Duration::from_secs(1));
    let digest = |x: &mut X11Session| {
        let _ = x.damaged();
        let g = x.grab().unwrap();
        g.pixels[..g.stride * g.height as usize]
            .iter()
            .enumerate()
            .fold(0u64, |h, (i, b)| h.wrapping_mul(1_099_511_628_211).wrapping_add(u64::from(*b) ^ i as u64))
    };
    let before = digest(&mut x);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(digest(&mut x), before, "testrelative's picture holds still without input");
    for _ in 0..10 {
        x.apply(&InputEvent::MouseMove { x: 0, y: 0, dx: 15, dy: 10 }).unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut moved = false;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !moved && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        moved = digest(&mut x) != before;
    }
    assert!(moved, "relative motion reached the title (its square moved)");
    assert!(sandbox.exited().is_none());
    drop(x);
    stop_and_count_leftovers(sandbox);
}

#[test]
fn a_vulkan_title_is_captured_through_xshm_with_distinct_frames() {
    // SDL2's testvulkan clears its swapchain to a new colour every frame (Mesa lavapipe
    // here); the layer-less path must still see the frames it presents.
    let dir = tempfile::tempdir().unwrap();
    let mut s = spec(&format!("{SDL_TESTS}/testvulkan"), &[]);
    s.env.insert(pylon_title::sandbox::CAPTURE_ENV.into(), "xshm".into());
    let mut sandbox = Sandbox::start(&config(dir.path()), "vulkan", &s).unwrap();
    assert!(sandbox.take_capture().is_none(), "no capture socket with the layer off");
    let number: u32 = sandbox.display().trim_start_matches(':').parse().unwrap();
    let mut x = X11Session::connect(number, sandbox.cookie(), (640, 480)).unwrap();
    wait_for("the title's first frame", Duration::from_secs(20), || x.damaged().unwrap());
    let mut distinct = std::collections::HashSet::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(2) {
        if x.damaged().unwrap() {
            let g = x.grab().unwrap();
            // The centre pixel's colour identifies the frame.
            let at = g.stride * (g.height as usize / 2) + g.width as usize * 2;
            distinct.insert(g.pixels[at..at + 3].to_vec());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    eprintln!("{} distinct frames of testvulkan in 2 s", distinct.len());
    assert!(distinct.len() > 20, "more than 20 distinct frames in 2 s: {}", distinct.len());
    assert!(sandbox.exited().is_none(), "{}", sandbox.log_tail(500));
    drop(x);
    stop_and_count_leftovers(sandbox);
}

#[test]
fn a_vulkan_title_hands_its_frames_to_the_node_through_the_present_layer() {
    use pylon_proto::capture::NodeMessage;
    use pylon_title::capture::CaptureEvent;
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    assert!(config.vk_layer.is_some(), "libpylon_vklayer.so is built next to the tests");
    let mut sandbox = Sandbox::start(&config, "layer", &spec(&format!("{SDL_TESTS}/testvulkan"), &[])).unwrap();
    let mut capture = sandbox.take_capture().expect("a capture socket for the layer");
    let (mut ring, mut frames, mut seqs) = (None, 0, Vec::new());
    let deadline = Instant::now() + Duration::from_secs(20);
    while frames < 60 {
        assert!(Instant::now() < deadline, "{} ring, {frames} frames; {}", ring.is_some(), sandbox.log_tail(500));
        let mut events = Vec::new();
        capture.poll(&mut events);
        for e in events {
            match e {
                CaptureEvent::Ring { ring: r, fds } => {
                    assert_eq!((r.width, r.height, fds.len()), (640, 480, 3), "{r:?}");
                    ring = Some(r);
                }
                CaptureEvent::Frame { generation, image, seq, .. } => {
                    assert_eq!(Some(generation), ring.as_ref().map(|r| r.generation));
                    frames += 1;
                    seqs.push(seq);
                    // Give the image straight back: the layer keeps copying.
                    capture.send(NodeMessage::Release { generation, image });
                }
                CaptureEvent::Malformed(why) => panic!("the layer sent a bad message: {why}"),
                CaptureEvent::Connected | CaptureEvent::Closed => {}
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "frames in present order");
    assert!(sandbox.exited().is_none(), "{}", sandbox.log_tail(500));
    assert!(sandbox.log_tail(2000).contains("capturing a 640x480 swapchain"), "{}", sandbox.log_tail(2000));
    drop(capture);
    stop_and_count_leftovers(sandbox);
}

/// A sandbox with one virtual pad running `command`; the pad, once the title opened it.
fn with_pad(dir: &Path, name: &str, command: &str, args: &[&str]) -> (Sandbox, pylon_title::pad::PadServer) {
    let mut s = spec(command, args);
    s.gamepads = 1;
    let mut sandbox = Sandbox::start(&config(dir), name, &s).unwrap();
    let mut pad = sandbox.take_pads().remove(0);
    wait_for("the title to open the pad", Duration::from_secs(20), || {
        pad.accept();
        pad.opened() > 0
    });
    (sandbox, pad)
}

#[test]
fn a_gamepad_button_and_axis_reach_evtest_through_the_shim() {
    let dir = tempfile::tempdir().unwrap();
    let (sandbox, mut pad) = with_pad(dir.path(), "evtest", "evtest", &["/dev/input/pylon-pad0"]);
    let mut buttons = vec![0u8; 17];
    buttons[0] = 255;
    assert!(pad.apply(true, &buttons, &[-20000, 0, 0, 0]) >= 2);
    let wanted = ["Input device name: \"Microsoft X-Box 360 pad 0\"", "(BTN_SOUTH), value 1", "(ABS_X), value -20000"];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = sandbox.log_tail(16 * 1024);
        if wanted.iter().all(|w| log.contains(w)) {
            break;
        }
        assert!(Instant::now() < deadline, "evtest did not show {wanted:?}: {log}");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(pad);
    stop_and_count_leftovers(sandbox);
}

#[test]
fn an_sdl_game_controller_sees_the_virtual_xbox_pad() {
    let dir = tempfile::tempdir().unwrap();
    let (mut sandbox, mut pad) = with_pad(dir.path(), "controller", &format!("{SDL_TESTS}/testgamecontroller"), &[]);
    std::thread::sleep(Duration::from_secs(1));
    let mut buttons = vec![0u8; 17];
    buttons[0] = 255;
    pad.apply(true, &buttons, &[0, 0, 0, 0]);
    std::thread::sleep(Duration::from_millis(300));
    pad.apply(true, &[0; 17], &[0, 0, 0, 0]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = sandbox.log_tail(16 * 1024);
        let wanted = [
            "X360 Controller, /dev/input/pylon-pad0",
            "Game controller device 0 added",
            "button a pressed",
            "button a released",
        ];
        if wanted.iter().all(|w| log.contains(w)) {
            break;
        }
        assert!(sandbox.exited().is_none(), "testgamecontroller exited: {log}");
        assert!(Instant::now() < deadline, "testgamecontroller did not add the pad: {log}");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(pad);
    stop_and_count_leftovers(sandbox);
}

#[test]
fn a_sandbox_dropped_without_stop_still_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = Sandbox::start(&config(dir.path()), "dropped", &spec("sleep", &["1000"])).unwrap();
    let (title, xvfb, session_dir) = (sandbox.title_pid(), sandbox.xvfb_pid(), sandbox.dir().to_path_buf());
    // As when a test panics or a caller returns early.
    drop(sandbox);
    assert!(!alive(title) && !alive(xvfb) && !session_dir.exists(), "a dropped sandbox is stopped");
}
