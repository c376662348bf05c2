//! The crate's own API types and the OpenAPI document agree: a value of every type the
//! document lists validates against its schema (JSON Schema 2020-12, as OpenAPI 3.1
//! uses), and survives JSON → type → JSON unchanged. A schema added without a sample
//! here fails the test.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use pylon_indexer::api::*;
use pylon_indexer::store::{InputKind, NodeRecord, Probe, RelayRecord, Title, Usage};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use utoipa::OpenApi;

struct Checker {
    spec: Value,
    checked: std::collections::BTreeSet<String>,
}

impl Checker {
    fn validator(&self, name: &str) -> jsonschema::Validator {
        let root = json!({
            "$ref": format!("#/components/schemas/{name}"),
            "components": self.spec["components"].clone(),
        });
        jsonschema::options().with_draft(jsonschema::Draft::Draft202012).build(&root).unwrap()
    }

    /// `value` validates as schema `name` and round-trips through its type unchanged.
    fn check<T: Serialize + DeserializeOwned>(&mut self, name: &str, value: T) {
        assert!(self.spec["components"]["schemas"].get(name).is_some(), "the document lists schema {name}");
        let json = serde_json::to_value(&value).unwrap();
        let errors: Vec<String> = self.validator(name).iter_errors(&json).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{name} {json} breaks its schema: {errors:?}");
        let back: T = serde_json::from_value(json.clone()).unwrap_or_else(|e| panic!("{name} {json}: {e}"));
        assert_eq!(serde_json::to_value(&back).unwrap(), json, "{name} round-trips");
        self.checked.insert(name.to_string());
    }

    fn rejects(&self, name: &str, json: Value) {
        assert!(!self.validator(name).is_valid(&json), "schema {name} rejects {json}");
    }
}

fn title() -> Title {
    Title {
        id: "demo".into(),
        name: "Pylon Asteroids".into(),
        description: "Fly.".into(),
        launch: "builtin:demo".into(),
        min_gpu_class: 0,
        width: 1280,
        height: 720,
        fps: 60,
        ..Default::default()
    }
}

fn node() -> NodeRecord {
    NodeRecord {
        id: "node-a".into(),
        provider: "alice".into(),
        public_key: "A".repeat(43) + "=",
        info: json!({ "gpu_model": "H100", "region": "eu" }),
        capacity: 4,
        sessions: 1,
        price_per_hour: 0.5,
        gpu_class: 3,
        encode_ms: 4.0,
        titles: vec!["demo".into()],
        draining: false,
        revoked: false,
        approved: true,
        seats: 1,
        verdict: Verdict::Passing,
        last_heartbeat: 1_800_000_000,
    }
}

fn outcome() -> CheckOutcome {
    CheckOutcome {
        passed: true,
        failures: vec![],
        fps: 59.8,
        frames: 598,
        wrong_size: 0,
        freezes: 0,
        bitrate_kbps: 5_400.0,
        rtt_ms: Some(0.4),
        answered: Some(12),
        inputs: Some(12),
        sham_fired: Some(0),
        shams: Some(6),
        click_to_photon_p50_ms: Some(58.0),
        click_to_photon_p95_ms: Some(71.0),
        capacity_n: Some(512),
        capacity_ms: Some(9.5),
        capacity_deadline_ms: Some(63.4),
        capacity_gops: Some(14.1),
    }
}

fn score() -> NodeScore {
    NodeScore {
        verdict: Verdict::Passing,
        checks: 20,
        passed: 20,
        pass_rate: Some(1.0),
        fps: Some(59.9),
        click_to_photon_p50_ms: Some(57.0),
        capacity_gops: Some(14.0),
        last_checked: Some(1_800_000_000),
    }
}

fn relay() -> RelayRecord {
    RelayRecord {
        id: "relay-a".into(),
        owner: "bob".into(),
        public_key: "B".repeat(43) + "=",
        public_url: "https://relay.example".into(),
        quic_addr: "203.0.113.1:4433".into(),
        region: "eu".into(),
        capacity: 100,
        viewers: 3,
        node_rtt_ms: BTreeMap::from([("node-a".to_string(), 4.5)]),
        revoked: false,
        approved: true,
        last_heartbeat: 1_800_000_000,
        cert_sha256: "ab".repeat(32),
        draining: false,
    }
}

fn usage() -> Usage {
    Usage { provider: "alice".into(), sessions: 2, seconds: 3600 }
}

#[test]
fn every_schema_in_the_document_round_trips_through_the_crate_types() {
    let spec = serde_json::to_value(ApiDoc::openapi()).unwrap();
    let mut c = Checker { spec, checked: Default::default() };
    c.check("Title", title());
    c.check(
        "Title",
        Title {
            id: "chromium-bsu".into(),
            name: "Chromium B.S.U.".into(),
            launch: "exec".into(),
            command: "/usr/games/chromium-bsu".into(),
            args: vec!["--nosound".into()],
            workdir: "/tmp".into(),
            env: BTreeMap::from([("SDL_AUDIODRIVER".to_string(), "dummy".to_string())]),
            needs_gpu: false,
            input_kinds: vec![InputKind::Keyboard, InputKind::Mouse],
            probe: Some(Probe {
                setup: vec!["Enter".into()],
                keys: ["ArrowLeft".into(), "ArrowRight".into()],
                hold_ms: 250,
            }),
            ..title()
        },
    );
    c.check("InputKind", InputKind::Gamepad);
    c.check("Probe", Probe { setup: vec![], keys: ["KeyA".into(), "KeyD".into()], hold_ms: 2000 });
    c.check("NodeRecord", node());
    c.check("RelayRecord", relay());
    c.check("Usage", usage());
    c.check(
        "RegisterNode",
        RegisterNode {
            id: "node-a".into(),
            provider: "alice".into(),
            public_key: "A".repeat(43) + "=",
            gpu_model: "H100".into(),
            gpu_memory_mb: 81_559,
            vulkan_device: "NVIDIA H100".into(),
            encoders: vec!["libx264".into()],
            capacity: 4,
            region: "eu".into(),
            lat: 52.5,
            lon: 13.4,
            price_per_hour: 1.25,
            gpu_class: 3,
            titles: vec!["demo".into()],
        },
    );
    c.check(
        "NodeHeartbeat",
        NodeHeartbeat { sessions: 1, running: vec!["00".repeat(16)], titles: vec!["demo".into()] },
    );
    c.check("NodeHeartbeatReply", NodeHeartbeatReply { relays: vec!["relay-a".into()] });
    c.check("NodeHeartbeatReply", NodeHeartbeatReply::default());
    c.check(
        "RegisterRelay",
        RegisterRelay {
            id: "relay-a".into(),
            owner: "bob".into(),
            public_key: "B".repeat(43) + "=",
            public_url: "https://relay.example".into(),
            quic_addr: "203.0.113.1:4433".into(),
            region: "eu".into(),
            capacity: 100,
            cert_sha256: "cd".repeat(32),
        },
    );
    c.check(
        "RelayHeartbeat",
        RelayHeartbeat {
            viewers: 3,
            node_rtt_ms: BTreeMap::from([("node-a".to_string(), 4.5)]),
            players: vec!["11".repeat(16)],
        },
    );
    c.check("MemberState", MemberState::Draining);
    c.check("NodeStatus", NodeStatus { node: node(), state: MemberState::Ready, score: score() });
    c.check(
        "RelayStatus",
        RelayStatus { relay: relay(), state: MemberState::Gone, attestation: "c2lnbmF0dXJl".into() },
    );
    c.check("TitlePage", TitlePage { items: vec![title()], next_cursor: Some("abc".into()) });
    c.check("TitlePage", TitlePage { items: vec![], next_cursor: None });
    c.check(
        "NodePage",
        NodePage {
            items: vec![NodeStatus { node: node(), state: MemberState::Pending, score: NodeScore::default() }],
            next_cursor: None,
        },
    );
    c.check(
        "RelayPage",
        RelayPage {
            items: vec![RelayStatus {
                relay: relay(),
                state: MemberState::Revoked,
                attestation: "c2lnbmF0dXJl".into(),
            }],
            next_cursor: Some("x".into()),
        },
    );
    c.check("UsagePage", UsagePage { items: vec![usage()], next_cursor: None });
    c.check(
        "CreateSession",
        CreateSession {
            title: "demo".into(),
            client_rtt_ms: BTreeMap::from([("relay-a".to_string(), 12.0)]),
            max_price_per_hour: Some(2.0),
            role: Some(SessionRole::Spectator),
        },
    );
    c.check(
        "CreateSession",
        CreateSession { title: "demo".into(), client_rtt_ms: BTreeMap::new(), max_price_per_hour: None, role: None },
    );
    c.check("SessionRole", SessionRole::Player);
    c.check(
        "SessionCreated",
        SessionCreated {
            session: "22".repeat(16),
            token: "token".into(),
            relay: "relay-a".into(),
            relay_url: "https://relay.example".into(),
            node: "node-a".into(),
            expected_ms: 18.5,
            reason: "nearest".into(),
        },
    );
    c.check(
        "Candidate",
        Candidate { relay: "relay-a".into(), url: "https://relay.example".into(), region: "eu".into() },
    );
    c.check("PublicKey", PublicKey { public_key: "C".repeat(43) + "=" });
    c.check("Replicas", Replicas { replicas: vec!["https://indexer-1.example".into(), "http://10.0.0.2:8090".into()] });
    c.check("Replicas", Replicas { replicas: Vec::new() });
    c.check(
        "RelayHeartbeatReply",
        RelayHeartbeatReply {
            ended_sessions: vec!["33".repeat(16)],
            ended_reasons: BTreeMap::from([("33".repeat(16), "node gone".into())]),
            revoked_nodes: vec!["node-b".into()],
        },
    );
    c.check("EndSession", EndSession { reason: "player left".into(), relay: String::new() });
    c.check("EndSession", EndSession { reason: "player left".into(), relay: "relay-1".into() });
    c.check(
        "NodeKeyInfo",
        NodeKeyInfo { id: "node-a".into(), public_key: "A".repeat(43) + "=", state: "ready".into() },
    );
    c.check(
        "ErrorBody",
        ErrorBody { error: "no capacity".into(), reason: ErrorReason::NoCapacity, retry_after_secs: Some(5) },
    );
    c.check("ErrorBody", ErrorBody { error: "no".into(), reason: ErrorReason::NotAdmin, retry_after_secs: None });
    c.check("ErrorReason", ErrorReason::SeatTaken);
    c.check("ErrorReason", ErrorReason::Closed);
    c.check("ErrorReason", ErrorReason::NodeGone);
    c.check(
        "MoveSession",
        MoveSession { token: "t".into(), client_rtt_ms: [("relay-2".to_string(), 12.5)].into_iter().collect() },
    );
    c.check(
        "RegisterChecker",
        RegisterChecker { id: "checker-1".into(), owner: "ops".into(), public_key: "D".repeat(43) + "=" },
    );
    let checker = CheckerRecord {
        id: "checker-1".into(),
        owner: "ops".into(),
        public_key: "D".repeat(43) + "=",
        approved: false,
        revoked: false,
        last_seen: 1_800_000_000,
    };
    c.check("CheckerRecord", checker.clone());
    c.check("CheckerStatus", CheckerStatus { checker, state: MemberState::Pending });
    c.check(
        "CheckAssignment",
        CheckAssignment {
            check: "44".repeat(16),
            node: "node-a".into(),
            title: "demo".into(),
            session: "55".repeat(16),
            token: "token".into(),
            play_url: "https://relay.example/play/55".into(),
            width: 1280,
            height: 720,
            fps: 60,
            demo: true,
            probe: None,
            gpu_class: 2,
            report_by: 1_800_000_300,
            audit: MeteringAudit { claimed: 3, phantom: vec!["66".repeat(16)] },
        },
    );
    c.check("CheckOutcome", outcome());
    c.check(
        "CheckOutcome",
        CheckOutcome { passed: false, failures: vec!["fps 29.8 < 57".into()], ..CheckOutcome::default() },
    );
    c.check("NodeScore", score());
    c.check("NodeScore", NodeScore::default());
    c.check("Verdict", Verdict::Suspect);
    c.check("MeteringAudit", MeteringAudit::default());
    c.check(
        "SessionInfo",
        SessionInfo {
            session: "66".repeat(16),
            relay: "relay-a".into(),
            node: "node-a".into(),
            title: "demo".into(),
            running: true,
        },
    );
    c.check("Spectate", Spectate { client_rtt_ms: [("relay-a".to_string(), 3.5)].into_iter().collect() });
    c.check("Spectate", Spectate::default());

    let listed: std::collections::BTreeSet<String> =
        c.spec["components"]["schemas"].as_object().unwrap().keys().cloned().collect();
    let missing: Vec<_> = listed.difference(&c.checked).collect();
    assert!(missing.is_empty(), "schemas without a round-trip sample here: {missing:?}");

    // The schemas are not vacuous: what the server would refuse, they refuse too.
    c.rejects("ErrorReason", json!("bogus"));
    c.rejects("Probe", json!({ "keys": ["ArrowLeft"], "hold_ms": 250 }));
    c.rejects("Probe", json!({ "keys": ["ArrowLeft", "ArrowRight"], "hold_ms": 10 }));
    c.rejects("ErrorBody", json!({ "error": "x" }));
    c.rejects("Title", json!({ "id": "a b", "name": "x", "description": "", "launch": "", "min_gpu_class": 0, "width": 64, "height": 64, "fps": 30 }));
    c.rejects("Title", serde_json::to_value(Title { fps: 0, ..title() }).unwrap());
    c.rejects("RegisterRelay", json!({ "id": "r", "owner": "", "public_key": "k", "public_url": "ftp://x", "quic_addr": "", "region": "", "capacity": 1 }));
    c.rejects("MemberState", json!("asleep"));
    c.rejects("Verdict", json!("innocent"));
    c.rejects("Title", serde_json::to_value(Title { launch: "docker".into(), ..title() }).unwrap());
}
