//! The checker against a studio title: Debian's Chromium B.S.U., deployed with the probe
//! its manifest gives (`deploy/titles/chromium-bsu.json`: Enter to leave the menu, then
//! ArrowLeft and ArrowRight fly the ship). The honest node must pass every check; a node
//! whose title never gets the player's input (the `deaf` fake: the game plays on by itself,
//! a live picture that animates as much as the real one, which is what a replay of it
//! looks like) must fail every one, by the probe.
//!
//! Each check is a session the indexer opens for the title, played by the checker through
//! the relay like a player. `PYLON_TITLE_CHECKS` sets the number of checks of each node
//! (default 2: about 60 s each, the game's start included); `PYLON_FAKES` picks the nodes.

mod common;

use common::{Setup, start_setup};
use pylon_checker::{Advertised, CheckConfig, CheckReport};
use pylon_indexer_client::api::{Probe, Title};
use pylon_server::pipeline::Fake;
use std::time::{Duration, Instant};

const BSU: &str = "/usr/games/chromium-bsu";

/// The deployed manifest, at 30 fps (two cores run the game, the node and the checker).
fn bsu() -> Title {
    let manifest = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/titles/chromium-bsu.json"))
        .expect("the deployed manifest");
    let title: Title = serde_json::from_str(&manifest).expect("the manifest parses");
    assert!(title.validate().is_ok());
    assert!(title.probe.is_some(), "the manifest gives the probe");
    Title { fps: 30, ..title }
}

async fn check(fake: Option<Fake>, n: usize) -> Vec<CheckReport> {
    let title = bsu();
    let probe: Probe = title.probe.clone().expect("the manifest gives the probe");
    let platform =
        start_setup(1280, 720, 30, Setup { pooled: true, titles: vec![title.clone()], fake, ..Setup::default() }).await;
    let indexer = platform.indexer.expect("pooled");
    common::wait_rtt_reported(indexer, common::POOL_NODE, Duration::from_secs(30)).await;
    let mut reports = Vec::new();
    for _ in 0..n {
        // A seat for the title, as a player's page would ask for it.
        let deadline = Instant::now() + Duration::from_secs(30);
        let created = loop {
            let created = common::post_json(
                indexer,
                "/api/v1/sessions",
                &serde_json::json!({ "title": title.id, "client_rtt_ms": { common::POOL_RELAY: 1.0 } }),
            )
            .await;
            if created["token"].is_string() {
                break created;
            }
            // The last check's sandbox is still going away.
            assert!(Instant::now() < deadline, "no session for the title: {created}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        let config = CheckConfig {
            relay: created["relay_url"].as_str().expect("relay_url").to_owned(),
            token: created["token"].as_str().map(str::to_owned),
            advertised: Advertised { width: 1280, height: 720, fps: 30 },
            duration: Duration::from_secs(3),
            demo: false,
            probe: Some(probe.clone()),
            first_frame_timeout: Duration::from_secs(30),
            gpu_class: None,
        };
        let report = pylon_checker::run(config).await.expect("the check could be made");
        reports.push(report);
    }
    platform.stop().await;
    reports
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_studio_title_that_answers_its_probe_passes_and_one_that_never_gets_input_fails() {
    assert!(std::path::Path::new(BSU).exists(), "chromium-bsu is installed (make deps)");
    let n = common::checks_each("PYLON_TITLE_CHECKS", 2);
    let mut summary = Vec::new();
    for (name, fake) in
        [("honest", None), ("deaf", Some(Fake::Deaf))].into_iter().filter(|(name, _)| common::node_wanted(name))
    {
        let started = Instant::now();
        let reports = check(fake, n).await;
        let probes: Vec<serde_json::Value> = reports
            .iter()
            .map(|r| {
                let p = r.probe.as_ref().expect("a probe check ran");
                serde_json::json!({
                    "p": format!("{:.1e}", p.p_value), "pairs": p.pairs,
                    "answered": format!("{}/{}", p.answers.answered, p.answers.inputs),
                    "shams": format!("{}/{}", p.answers.sham_fired, p.answers.shams),
                    "p50_ms": p.answers.p50_ms.map(|v| v.round()), "p95_ms": p.answers.p95_ms.map(|v| v.round()),
                    "fps": (r.qoe.fps * 10.0).round() / 10.0,
                })
            })
            .collect();
        eprintln!(
            "{}",
            serde_json::json!({
                "node": name, "checks": n, "passed": reports.iter().filter(|r| r.passed()).count(),
                "probes": probes,
                "seconds_per_check": (started.elapsed().as_secs_f64() / n as f64).round(),
                "failures": reports.iter().map(CheckReport::failures).collect::<Vec<_>>(),
            })
        );
        summary.push((name, reports));
    }
    for (name, reports) in &summary {
        for r in reports {
            assert_eq!(r.role, "player");
            let p = r.probe.as_ref().unwrap();
            assert!(r.qoe.frames_decoded > 0, "{name}: the picture is live");
            match *name {
                "honest" => {
                    assert!(p.passed(), "honest: the probe passes: {:?}", p.failures);
                    assert!(r.passed(), "honest: no false positive: {:?}", r.failures());
                }
                _ => {
                    assert!(!p.passed(), "{name}: caught by the probe (p = {:.2e})", p.p_value);
                    assert!(!r.passed());
                }
            }
        }
    }
}
