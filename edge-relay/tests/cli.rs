//! The `pylon-relay` binary: starts on the given addresses, serves the player and
//! `/metrics`, and shuts down cleanly on SIGTERM.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../indexer/tests/manifest/mod.rs"]
mod manifest;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn starts_serves_and_stops_on_sigterm() {
    let dir = std::env::temp_dir().join(format!("pylon-relay-cli-{}", std::process::id()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_pylon-relay"))
        .args([
            "--http-addr",
            "127.0.0.1:0",
            "--webrtc-addr",
            "127.0.0.1:0",
            "--quic-addr",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(&dir)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .expect("relay starts");
    // The log line names the bound HTTP address.
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let deadline = Instant::now() + Duration::from_secs(20);
    let http = loop {
        assert!(Instant::now() < deadline, "no 'relay listening' line");
        let line = lines.next().expect("relay log").unwrap();
        if let Some(rest) = line.split("http=").nth(1) {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let get = |path: &str| {
        let mut s = std::net::TcpStream::connect(&http).unwrap();
        write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    assert!(get("/healthz").contains("200 OK"));
    assert!(get("/").contains("<video"));
    assert!(get("/metrics").contains("pylon_relay_viewers"));
    assert!(dir.join("relay-cert.der").exists(), "the certificate nodes need is written");
    // SIGTERM: a graceful exit.
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the relay did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_impairment_proxy_explains_itself_and_forwards() {
    let help = Command::new(env!("CARGO_BIN_EXE_pylon-impair")).arg("--help").output().unwrap();
    let text = String::from_utf8_lossy(&help.stdout);
    for flag in [
        "--listen",
        "--target",
        "--loss",
        "--bursty-loss",
        "--burst",
        "--delay-ms",
        "--jitter-ms",
        "--reorder",
        "--rate-kbps",
        "--seed",
    ] {
        assert!(text.contains(flag), "--help does not explain {flag}:\n{text}");
    }
    // A real run: a UDP echo behind the proxy answers through it.
    let echo = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let target = echo.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while let Ok((n, from)) = echo.recv_from(&mut buf) {
            let _ = echo.send_to(&buf[..n], from);
        }
    });
    let listen = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_pylon-impair"))
        .args(["--listen", &listen.to_string(), "--target", &target.to_string(), "--delay-ms", "5"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    client.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut buf = [0u8; 64];
    let deadline = Instant::now() + Duration::from_secs(10);
    let n = loop {
        assert!(Instant::now() < deadline, "no echo through the proxy");
        client.send_to(b"ping", listen).unwrap();
        if let Ok((n, _)) = client.recv_from(&mut buf) {
            break n;
        }
    };
    assert_eq!(&buf[..n], b"ping");
    child.kill().unwrap();
    let _ = child.wait();
}

#[test]
fn the_kubernetes_manifest_passes_only_flags_the_relay_has() {
    manifest::assert_flags_exist(
        &manifest::read(env!("CARGO_MANIFEST_DIR"), "relay.yaml"),
        env!("CARGO_BIN_EXE_pylon-relay"),
    );
}
