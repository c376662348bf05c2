//! The checker's WebRTC stack (webrtc-rs) against the relay's (str0m): two independent
//! implementations, each testing the other. Through `pylon-impair` on the last hop the
//! checker decodes the demo's H.264 at its size and rate and the demo answers every
//! aimed turn (a stream that ignores the checker's input fails the same check), its input
//! reaches the game over the player's DataChannel and its PLI reaches the relay; through
//! 2 % loss its NACKs reach the relay and the picture goes on.
//!
//! What the two stacks cannot do together: repair by retransmission. str0m resends only
//! on an RTX stream (RFC 4588; a packet is not nackable without an RTX payload type), and
//! webrtc-rs 0.17 reads a negotiated RTX stream only to discard it (it offers none); so
//! the checker recovers from loss by keyframe requests.

mod common;

use common::{metric, relay_metrics, start_platform_advertising};
use pylon_checker::{Advertised, CheckConfig, Event, QoeMeter, Session};
use pylon_proto::impair::LossModel;
use pylon_proto::input::{InputEvent, InputMessage, key_index};
use pylon_relay::impair::{ImpairConfig, start};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checkers_webrtc_stack_plays_through_the_relay() {
    let listen = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let platform = start_platform_advertising(640, 480, 30, listen).await;
    let path = |loss| ImpairConfig {
        loss,
        delay: Duration::from_millis(5),
        jitter: Duration::from_millis(1),
        reorder: 0.0,
        rate_bps: None,
        seed: 7,
    };
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let proxy = start(listen, platform.relay.webrtc_addr, path(LossModel::None), stop_rx).await.unwrap();
    let http = platform.relay.http_addr;
    let advertised = Advertised { width: 640, height: 480, fps: 30 };

    // The check as `pylon-checker --demo` runs it: the honest demo is live at its size and
    // rate and answers every aimed turn, and no sham sees a turn.
    let check = |demo| CheckConfig {
        relay: platform.url(),
        token: None,
        advertised,
        duration: Duration::from_secs(8),
        demo,
        probe: None,
        first_frame_timeout: Duration::from_secs(30),
        // The honest node proves its class (lavapipe: 0) with a product through the relay.
        gpu_class: demo.then_some(0),
    };
    let report = pylon_checker::run(check(true)).await.unwrap();
    eprintln!("check of the honest demo: {}", serde_json::to_string(&report).unwrap());
    assert!(report.passed(), "{report:?}");
    assert_eq!(report.role, "player");
    assert!(report.qoe.bitrate_kbps > 100.0 && report.qoe.rtt_ms.is_some(), "{report:?}");
    let response = report.response.unwrap();
    assert!(response.answers.inputs >= 12 && response.answers.answered == response.answers.inputs, "{response:?}");
    let capacity = report.capacity.unwrap();
    assert!(capacity.verified && capacity.answered_ms.unwrap() <= capacity.deadline_ms, "{capacity:?}");

    // A stream that does not answer the checker: here the checker is only a spectator (a
    // player holds the seat and keeps the ship still), so its input never reaches the
    // game, as with a replayed or frozen stream. The picture is live; the check fails.
    let (holder, mut holder_events) = Session::connect(&platform.url(), None, Duration::from_secs(30)).await.unwrap();
    assert_eq!(holder.role, "player");
    while !matches!(holder_events.recv().await, Some(Event::Frame { .. })) {}
    let still = InputMessage { seq: 1, time_ms: 0, event: InputEvent::MouseMove { x: 600, y: 240, dx: 0, dy: 0 } };
    holder.send_input(&still).await.unwrap();
    let drain = tokio::spawn(async move { while holder_events.recv().await.is_some() {} });
    let report = pylon_checker::run(check(true)).await.unwrap();
    eprintln!("check of a stream that ignores the checker: {}", serde_json::to_string(&report.response).unwrap());
    assert_eq!(report.role, "spectator");
    assert!(report.qoe.passed(), "the picture itself is live: {:?}", report.qoe);
    let response = report.response.as_ref().unwrap();
    assert!(!report.passed() && response.answers.answered == 0, "{response:?}");
    holder.close().await;
    drain.abort();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // A session of its own: input, a keyframe request, and NACKs.
    let (session, mut events) = Session::connect(&platform.url(), None, Duration::from_secs(30)).await.unwrap();
    assert_eq!(session.role, "player", "the seat is free again once the check left");
    let mut meter = QoeMeter::new(advertised);
    let mut frame = async || loop {
        match tokio::time::timeout(Duration::from_secs(20), events.recv()).await {
            Ok(Some(Event::Frame { at, picture })) => return (at, picture),
            Ok(Some(Event::Closed(why))) => panic!("session closed: {why}"),
            Ok(Some(_)) => {}
            _ => panic!("no frame in 20 s"),
        }
    };
    for _ in 0..10 {
        let (at, p) = frame().await;
        meter.on_frame(at, p.width, p.height);
    }
    let up = key_index("ArrowUp").unwrap();
    let press = InputMessage { seq: 1, time_ms: 0, event: InputEvent::KeyDown { key: up, modifiers: 0 } };
    session.send_input(&press).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while platform.server_metrics_value("pylon_server_keys_held") < 1.0 {
        assert!(Instant::now() < deadline, "the checker's key press did not reach the game");
        let _ = frame().await;
    }
    let release = InputMessage { seq: 2, time_ms: 50, event: InputEvent::KeyUp { key: up, modifiers: 0 } };
    session.send_input(&release).await.unwrap();

    let before = metric(&relay_metrics(http).await, "pylon_relay_viewer_keyframe_requests_total");
    session.request_keyframe().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&relay_metrics(http).await, "pylon_relay_viewer_keyframe_requests_total") <= before {
        assert!(Instant::now() < deadline, "the relay did not see the checker's PLI");
        let _ = frame().await;
    }
    session.close().await;

    // The same path with 2 % loss: NACKs reach the relay, keyframe requests keep the
    // picture going.
    stop.send(true).unwrap();
    drop(proxy);
    let (_stop, stop_rx) = tokio::sync::watch::channel(false);
    // The clean proxy lets go of the port as its task ends.
    let deadline = Instant::now() + Duration::from_secs(5);
    let _proxy = loop {
        match start(listen, platform.relay.webrtc_addr, path(LossModel::Random(0.02)), stop_rx.clone()).await {
            Ok(proxy) => break proxy,
            Err(e) if Instant::now() < deadline => {
                eprintln!("the port is not free yet ({e})");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("could not start the lossy proxy: {e}"),
        }
    };
    let nacks_before = metric(&relay_metrics(http).await, "pylon_relay_viewer_nacks_total");
    let (session, mut events) = Session::connect(&platform.url(), None, Duration::from_secs(30)).await.unwrap();
    let (mut frames, mut asked) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(8);
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(5), events.recv()).await {
            Ok(Some(Event::Frame { .. })) => frames += 1,
            Ok(Some(Event::Undecodable)) => asked += 1,
            Ok(Some(_)) => {}
            _ => panic!("the picture stopped through 2 % loss"),
        }
    }
    let nacks = metric(&relay_metrics(http).await, "pylon_relay_viewer_nacks_total") - nacks_before;
    eprintln!(
        "through 2 % loss, 8 s: {frames} frames decoded, {asked} undecodable (PLI each), {nacks} NACKs at the relay"
    );
    assert!(nacks >= 1.0, "the checker's NACKs reach the relay");
    assert!(frames >= 60, "the picture goes on through loss ({frames} frames in 8 s)");
    session.close().await;
    platform.stop().await;
}

/// The checker as a pool member: it registers its own key, waits for the operator, is
/// handed the node (a session on its free seat, a `checker` token the relay and node take
/// as the session's player), checks it through the relay like `pylon-checker --indexer`
/// does, and its signed report scores the node in the indexer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_checker_is_approved_checks_the_node_on_a_free_seat_and_scores_it() {
    use pylon_checker::pool::{PoolConfig, run_pool};
    // The catalog says what the node streams (the demo, here at 640x480, 30 fps).
    let demo = common::Title { width: 640, height: 480, fps: 30, ..common::Title::builtin_demo() };
    let platform = common::start_pool_with_titles(640, 480, 30, vec![demo]).await;
    let indexer = platform.indexer.unwrap();
    common::wait_rtt_reported(indexer, common::POOL_NODE, Duration::from_secs(30)).await;
    let config = PoolConfig {
        indexer: vec![format!("http://{indexer}")],
        id: "checker-e2e".into(),
        owner: "e2e".into(),
        data_dir: platform.data_dir().join("checker"),
        checks: Some(1),
        poll: Duration::from_millis(200),
        watch: Duration::from_secs(6),
        first_frame_timeout: Duration::from_secs(30),
    };
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    let mut reports = Vec::new();
    let metrics = pylon_checker::metrics::CheckerMetrics::new();
    let counted = metrics.clone();
    let checker = tokio::spawn(async move {
        let done = run_pool(config, metrics, shutdown, |r| reports.push(r.clone())).await.unwrap();
        (done, reports)
    });
    // Registered, it waits for the operator.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let status = common::admin_post(indexer, "/api/v1/checkers/checker-e2e/approve").await;
        if status == 204 {
            break;
        }
        assert!(Instant::now() < deadline, "the checker never registered ({status})");
    }
    let (done, reports) = tokio::time::timeout(Duration::from_secs(90), checker).await.unwrap().unwrap();
    assert_eq!(done, 1);
    assert!(counted.render().contains("pylon_checker_checks_total{result=\"pass\"} 1"), "{}", counted.render());
    let r = &reports[0];
    eprintln!("pool check: {}", serde_json::to_string(r).unwrap());
    assert_eq!((r.assignment.node.as_str(), r.assignment.demo), (common::POOL_NODE, true));
    assert!(r.outcome.passed, "{:?}", r.outcome);
    assert!(r.outcome.answered.is_some_and(|a| a >= 12) && r.outcome.answered == r.outcome.inputs, "{:?}", r.outcome);
    let nodes = common::http_get(indexer, "/api/v1/nodes").await;
    let body: serde_json::Value = serde_json::from_str(nodes.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    let score = &body["items"][0]["score"];
    assert_eq!((score["verdict"].as_str(), score["checks"].as_u64()), (Some("passing"), Some(1)), "{body}");
    // The check's session ended with the report: the seat is free for players again.
    assert_eq!(body["items"][0]["seats"], 0, "{body}");
    platform.stop().await;
}
