//! `pylon-checker`: plays a render node through its relay like a player would, on a WebRTC
//! stack independent of the relay's (webrtc-rs here, str0m there), and measures what it
//! sees.
//!
//! * [`client`]: the WebRTC session (signalling, H.264 receive, the player's DataChannels,
//!   NACK/PLI) and an FFmpeg decoder thread.
//! * [`qoe`]: the liveness and quality check, I/O-free: frames decoded at the advertised
//!   size and rate (± 5 %), freezes (as the W3C stats count them; at most 2 % of the
//!   watch frozen), bitrate, RTT.
//! * [`respond`]: the responsiveness check (proof of rendering) for the built-in demo,
//!   I/O-free: random aimed turns and shams, each judged from the decoded picture
//!   ([`demo`] reads the ship's heading off it); click-to-photon p50/p95.
//! * [`probe`]: the responsiveness check for studio titles, I/O-free: the title's two
//!   probe keys pressed in pairs of random order, and a test of whether the picture told
//!   them apart; click-to-photon p50/p95.
//! * [`capacity`]: the proof of capacity over the session, I/O-free: a matrix product
//!   sized for the GPU class the node claims, timed against the class's deadline and
//!   verified with Freivalds' algorithm.
//! * [`decode`]: FFmpeg's H.264 decoder.
//! * [`metrics`]: the pool checker's Prometheus `/metrics`.
//! * [`pool`]: the checker in a pool: its own key registered with the indexer (approved by
//!   the operator), checks asked for and made, outcomes reported signed.
//!
//! [`run`] performs one check (liveness, responsiveness for the demo, then the proof of
//! capacity) in one session.

pub mod capacity;
pub mod client;
pub mod decode;
pub mod demo;
pub mod metrics;
pub mod pool;
pub mod probe;
pub mod qoe;
pub mod respond;

pub use capacity::{CapacityCheck, CapacityReport};
pub use client::{ClientError, Event, Session};
pub use probe::{ProbeCheck, ProbeConfig, ProbeReport};
pub use qoe::{Advertised, QoeMeter, QoeReport};
pub use respond::{Answers, ResponseCheck, ResponseConfig, ResponseReport};

use std::time::{Duration, Instant};

/// One liveness check.
#[derive(Debug, Clone)]
pub struct CheckConfig {
    /// The relay's page URL for the session (`http://relay/play/<session>` or the relay's root).
    pub relay: String,
    /// The session token, when the relay is part of a pool.
    pub token: Option<String>,
    /// What the node advertised.
    pub advertised: Advertised,
    /// How long to watch after the first decoded frame, at least.
    pub duration: Duration,
    /// The node runs the built-in demo: check its exact answer to aimed turns.
    pub demo: bool,
    /// The node runs a studio title with this probe: check that its picture tells the
    /// probe's keys apart (ignored for the demo).
    pub probe: Option<pylon_indexer_client::api::Probe>,
    /// How long the first frame may take (connection, keyframe).
    pub first_frame_timeout: Duration,
    /// The GPU class the node claims: prove it with a capacity challenge after watching
    /// (`None`: no capacity check).
    pub gpu_class: Option<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("no frame decoded within {0:?} of connecting")]
    NoFirstFrame(Duration),
    #[error(transparent)]
    Probe(#[from] probe::UnknownKey),
}

/// What one check found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckReport {
    /// The role the relay granted (`player`; a `spectator`'s input never reaches the game).
    pub role: String,
    pub qoe: QoeReport,
    /// The demo's responsiveness (for a node running the demo).
    pub response: Option<ResponseReport>,
    /// A studio title's responsiveness (for a title with a probe).
    pub probe: Option<ProbeReport>,
    /// The proof of capacity (when the node's class was given).
    pub capacity: Option<CapacityReport>,
}

impl CheckReport {
    pub fn passed(&self) -> bool {
        self.qoe.passed()
            && self.response.as_ref().is_none_or(ResponseReport::passed)
            && self.probe.as_ref().is_none_or(ProbeReport::passed)
            && self.capacity.as_ref().is_none_or(CapacityReport::passed)
    }

    /// Every rule that failed.
    pub fn failures(&self) -> Vec<String> {
        let mut f = self.qoe.failures.clone();
        f.extend(self.response.iter().flat_map(|r| r.failures.iter().cloned()));
        f.extend(self.probe.iter().flat_map(|r| r.failures.iter().cloned()));
        f.extend(self.capacity.iter().flat_map(|r| r.failures.iter().cloned()));
        f
    }
}

/// Connects, waits for the first decoded frame, watches for `duration` (and, for the demo
/// or a title with a probe, until the responsiveness trials are done), judges what it
/// saw, and then, when the node's class is known, sends the capacity challenge and judges
/// the answer (the node's GPU works on it after the watching, so it cannot slow the
/// frames being judged). A stream that dies part way is a failed check (a report), not an
/// error; errors are for checks that could not be made.
pub async fn run(config: CheckConfig) -> Result<CheckReport, CheckError> {
    let (session, mut events) =
        Session::connect(&config.relay, config.token.as_deref(), config.first_frame_timeout).await?;
    tracing::info!(role = %session.role, relay = %config.relay, "connected; waiting for the first frame");
    let mut meter = QoeMeter::new(config.advertised);
    let mut response = config.demo.then(|| ResponseCheck::new(ResponseConfig::default(), rand::random()));
    let mut probe = match (&config.probe, config.demo) {
        (Some(p), false) => Some(ProbeCheck::new(p, ProbeConfig::default(), rand::random())?),
        _ => None,
    };
    let mut capacity = config.gpu_class.map(|class| CapacityCheck::new(class, rand::random()));
    // Freivalds' vectors; `Send` (a thread-local generator could not cross the awaits).
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::from_seed(rand::random());
    let mut watched: Option<QoeReport> = None;
    let mut seen: Option<demo::Pose> = None;
    let mut seq = 0u32;
    let started = Instant::now();
    let time_ms = |now: Instant| u32::try_from(now.duration_since(started).as_millis()).unwrap_or(u32::MAX);
    let first_deadline = tokio::time::Instant::now() + config.first_frame_timeout;
    let mut end: Option<tokio::time::Instant> = None;
    loop {
        let now = Instant::now();
        // Trials are judged on time only once every frame already decoded has been seen
        // (on a busy machine frames can queue here; one of them may hold the answer).
        while watched.is_none()
            && events.is_empty()
            && let Some(event) = response
                .as_mut()
                .and_then(|c| c.poll_input(now))
                .or_else(|| probe.as_mut().and_then(|c| c.poll_input(now)))
        {
            seq += 1;
            let msg = pylon_proto::input::InputMessage { seq, time_ms: time_ms(now), event };
            if let Err(e) = session.send_input(&msg).await {
                tracing::warn!("input not sent: {e}");
            }
        }
        let responding =
            response.as_ref().is_some_and(|c| !c.is_done()) || probe.as_ref().is_some_and(|c| !c.is_done());
        // The watching is over: judge it, then prove the capacity (if asked).
        if watched.is_none() && !responding && end.is_some_and(|e| tokio::time::Instant::now() >= e) {
            watched = Some(meter.finish(now, session.rtt_ms()));
            let Some(check) = capacity.as_mut() else { break };
            seq += 1;
            let msg = pylon_proto::input::InputMessage { seq, time_ms: time_ms(now), event: check.input() };
            let rtt = Duration::from_secs_f64(session.rtt_ms().unwrap_or(50.0) / 1000.0);
            check.on_sent(Instant::now(), seq, rtt);
            if let Err(e) = session.send_input(&msg).await {
                tracing::warn!("capacity challenge not sent: {e}");
            }
        }
        if watched.is_some() {
            let Some(check) = capacity.as_mut() else { break };
            check.handle_timeout(Instant::now());
            if check.is_done() {
                break;
            }
        }
        let trial_due = response
            .as_ref()
            .and_then(ResponseCheck::poll_timeout)
            .or_else(|| probe.as_ref().and_then(ProbeCheck::poll_timeout));
        let wake = match (end, trial_due) {
            _ if watched.is_some() => capacity
                .as_ref()
                .and_then(CapacityCheck::poll_timeout)
                .map_or(tokio::time::Instant::now(), tokio::time::Instant::from_std),
            (None, _) => first_deadline,
            (Some(_), Some(next)) if responding => tokio::time::Instant::from_std(next),
            (Some(end), _) => end,
        };
        let event = match tokio::time::timeout_at(wake, events.recv()).await {
            Ok(Some(event)) => event,
            Ok(None) => break,
            Err(_) if end.is_none() => {
                session.close().await;
                return Err(CheckError::NoFirstFrame(config.first_frame_timeout));
            }
            // Due: the top of the loop decides what comes next.
            Err(_) => continue,
        };
        match event {
            Event::Packet(bytes) if watched.is_none() => meter.on_packet(bytes),
            Event::Frame { at, picture } if watched.is_none() => {
                meter.on_frame(at, picture.width, picture.height);
                if end.is_none() {
                    end = Some(tokio::time::Instant::now() + config.duration);
                }
                if let Some(check) = response.as_mut() {
                    let pose = demo::ship_pose(&picture, seen.map(|p| (p.x, p.y)));
                    seen = pose.or(seen);
                    check.on_frame(at, picture.width, picture.height, pose);
                }
                if let Some(check) = probe.as_mut() {
                    check.on_frame(at, picture.width, picture.height, &picture.luma);
                }
            }
            // Before the first keyframe nothing decodes; only later failures count.
            Event::Undecodable if end.is_some() && watched.is_none() => meter.on_keyframe_request(),
            Event::Message(text) => {
                if let Some(check) = capacity.as_mut() {
                    check.on_text(Instant::now(), &text);
                }
            }
            Event::Binary(bytes) => {
                if let Some(check) = capacity.as_mut() {
                    check.on_binary(&mut rng, &bytes);
                }
            }
            Event::Closed(reason) => {
                tracing::warn!("the session ended during the check: {reason}");
                break;
            }
            Event::Packet(_) | Event::Frame { .. } | Event::Undecodable => {}
        }
    }
    let rtt = session.rtt_ms();
    let role = session.role.clone();
    session.close().await;
    let qoe = watched.unwrap_or_else(|| meter.finish(Instant::now(), rtt));
    let report = CheckReport {
        role,
        qoe,
        response: response.map(|c| c.report()),
        probe: probe.map(|c| c.report()),
        capacity: capacity.map(|c| c.report()),
    };
    tracing::info!(
        passed = report.passed(),
        fps = report.qoe.fps,
        frames = report.qoe.frames_decoded,
        capacity_ms = report.capacity.as_ref().and_then(|c| c.answered_ms),
        "check done"
    );
    Ok(report)
}
