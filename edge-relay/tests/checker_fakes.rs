//! Dishonest nodes against the checker: a node that streams one picture over and over
//! (static), one that plays a recording of the demo left alone (replay), and one that
//! renders at half the rate it advertises (slow) each stream a live H.264 picture through
//! the real frame path, relay and WebRTC; the checker must fail every check of each, by
//! the rule that catches it, and pass every check of the honest demo.
//!
//! `PYLON_FAKE_CHECKS` sets the number of checks of each node (default 3, which keeps
//! `make test` within its time: a check of the honest demo or of the slow fake, which both
//! answer every turn, takes about 22 s; one of a fake that does not answer, about 9 s).
//! `PYLON_FAKES` (comma-separated names) runs only those nodes; default: all.
//!
//! The liar is a node that claims a GPU class far above what it computes: here the real
//! node on lavapipe (class 0) claimed as class 2 (discrete), as its registration would
//! tell the indexer and the indexer the checker (`CheckAssignment::gpu_class`). Every
//! check also proves the claimed class with the capacity challenge; the honest node
//! claims its true class. The ghost (sessions nobody plays) is caught by the metering
//! audit (`indexer/tests/api.rs`).

mod common;

use common::{Setup, start_setup};
use pylon_checker::{Advertised, CheckConfig, CheckReport};
use pylon_server::pipeline::Fake;
use std::time::Duration;

/// `n` checks, one after another, of a node streaming the demo (faked as `fake` says) at
/// 640x480, 30 fps, that claims GPU class `class`. The liar's checks watch briefly and skip
/// the aimed turns: the capacity challenge is what judges it.
async fn check(fake: Option<Fake>, class: u8, n: usize) -> Vec<CheckReport> {
    let liar = class > 0;
    let platform = start_setup(640, 480, 30, Setup { fake, ..Setup::default() }).await;
    let mut reports = Vec::new();
    for _ in 0..n {
        let config = CheckConfig {
            relay: platform.url(),
            token: None,
            advertised: Advertised { width: 640, height: 480, fps: 30 },
            duration: Duration::from_secs(3),
            demo: !liar,
            probe: None,
            first_frame_timeout: Duration::from_secs(30),
            gpu_class: Some(class),
        };
        let report = pylon_checker::run(config).await.expect("the check could be made");
        assert_eq!(report.role, "player", "each check plays the node (the seat is free between checks)");
        reports.push(report);
        // The relay frees the seat once the check's session is gone.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    platform.stop().await;
    reports
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fake_fails_every_check_and_the_honest_demo_passes_every_one() {
    let n = common::checks_each("PYLON_FAKE_CHECKS", 3);
    let mut summary = Vec::new();
    for (name, fake, class) in [
        ("honest", None, 0),
        ("static", Some(Fake::Static), 0),
        ("replay", Some(Fake::Replay), 0),
        ("slow", Some(Fake::Slow), 0),
        ("liar", None, 2),
    ]
    .into_iter()
    .filter(|(name, ..)| common::node_wanted(name))
    {
        let started = std::time::Instant::now();
        let reports = check(fake, class, n).await;
        let passed = reports.iter().filter(|r| r.passed()).count();
        let fps: Vec<f64> = reports.iter().map(|r| (r.qoe.fps * 10.0).round() / 10.0).collect();
        let answered: Vec<String> = reports
            .iter()
            .map(|r| r.response.as_ref().map_or("-".into(), |x| format!("{}/{}", x.answers.answered, x.answers.inputs)))
            .collect();
        let capacity: Vec<String> = reports
            .iter()
            .map(|r| {
                r.capacity.as_ref().map_or("-".into(), |c| {
                    format!("n={} {:.0}/{:.0} ms", c.n, c.answered_ms.unwrap_or(f64::NAN), c.deadline_ms)
                })
            })
            .collect();
        let frozen: Vec<String> = reports
            .iter()
            .map(|r| format!("{:.0} ms/{:.1} s ({})", r.qoe.frozen_ms, r.qoe.seconds, r.qoe.freezes))
            .collect();
        let line = serde_json::json!({
            "node": name, "checks": n, "passed": passed, "fps": fps, "answered": answered, "capacity": capacity,
            "frozen": frozen,
            "seconds_per_check": (started.elapsed().as_secs_f64() / n as f64 * 10.0).round() / 10.0,
            "failures": reports.iter().map(CheckReport::failures).collect::<Vec<_>>(),
        });
        eprintln!("{line}");
        summary.push((name, passed, reports));
    }
    for (name, passed, reports) in &summary {
        match *name {
            "honest" => assert_eq!(*passed, n, "no false positive on the honest demo"),
            _ => assert_eq!(*passed, 0, "{name}: every check fails"),
        }
        for r in reports {
            match *name {
                // A picture at the full rate, but nothing answers the checker's aim.
                "static" | "replay" => {
                    assert!(r.qoe.frames_decoded > 0, "{name}: the picture is live");
                    assert!(!r.response.as_ref().unwrap().passed(), "{name}: caught by the responsiveness check");
                }
                "slow" => assert!(
                    r.qoe.failures.iter().any(|f| f.contains("fps")),
                    "slow: caught by the frame-rate rule: {:?}",
                    r.qoe.failures
                ),
                // Live and honest in everything but its class.
                "liar" => {
                    assert!(r.qoe.passed(), "liar: the picture is fine: {:?}", r.qoe.failures);
                    let c = r.capacity.as_ref().unwrap();
                    assert!(!c.passed(), "liar: caught by the proof of capacity");
                }
                "honest" => assert!(r.capacity.as_ref().unwrap().verified, "the honest product verifies"),
                _ => {}
            }
        }
    }
}
