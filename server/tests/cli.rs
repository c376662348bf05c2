//! The `pylon-server` binary: every flag is explained, bad values get clear messages, the
//! Vulkan devices can be listed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../indexer/tests/manifest/mod.rs"]
mod manifest;

use std::process::Command;

fn server(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pylon-server")).args(args).output().expect("runs");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn help_explains_every_flag() {
    let (ok, text) = server(&["--help"]);
    assert!(ok, "{text}");
    for flag in [
        "--relay",
        "--relay-cert",
        "--size",
        "--fps",
        "--gpu",
        "--list-gpus",
        "--encoder",
        "--bitrate-kbps",
        "--keyframe-seconds",
        "--ring-slots",
        "--max-rtp-packet",
        "--pacing",
        "--metrics-addr",
    ] {
        assert!(text.contains(flag), "--help does not mention {flag}:\n{text}");
    }
}

#[test]
fn bad_values_are_refused_clearly() {
    let (ok, text) = server(&["--size", "1279x720"]);
    assert!(!ok);
    assert!(text.contains("multiple of 4"), "{text}");
    let (ok, text) = server(&["--fps", "0"]);
    assert!(!ok);
    assert!(text.contains("--fps"), "{text}");
    let (ok, text) = server(&["--relay-cert", "/nonexistent/cert.der", "--metrics-addr", "127.0.0.1:0"]);
    assert!(!ok, "a missing relay certificate stops the node: {text}");
    assert!(text.contains("relay certificate"), "{text}");
}

#[test]
fn lists_the_vulkan_devices() {
    let (ok, text) = server(&["--list-gpus"]);
    assert!(ok, "{text}");
    assert!(text.contains("Vulkan"), "{text}");
}

#[test]
fn the_kubernetes_manifest_passes_only_flags_the_render_node_has() {
    manifest::assert_flags_exist(
        &manifest::read(env!("CARGO_MANIFEST_DIR"), "render-node.yaml"),
        env!("CARGO_BIN_EXE_pylon-server"),
    );
}
