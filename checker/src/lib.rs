//! `pylon-checker`: plays a render node through its relay like a player would, on a WebRTC
//! stack independent of the relay's (webrtc-rs here, str0m there), and measures what it
//! sees.
//!
//! * [`client`]: the WebRTC session (signalling, H.264 receive, the player's DataChannels,
//!   NACK/PLI) and an FFmpeg decoder thread.
//! * [`qoe`]: the liveness and quality check, I/O-free: frames decoded at the advertised
//!   size and rate (± 5 %), freezes, bitrate, RTT.
//! * [`respond`]: the responsiveness check (proof of rendering) for the built-in demo,
//!   I/O-free: random aimed turns and shams, each judged from the decoded picture
//!   ([`demo`] reads the ship's heading off it); click-to-photon p50/p95.
//! * [`decode`]: FFmpeg's H.264 decoder.
//! * [`metrics`]: the pool checker's Prometheus `/metrics`.
//! * [`pool`]: the checker in a pool: its own key registered with the indexer (approved by
//!   the operator), checks asked for and made, outcomes reported signed.
//!
//! [`run`] performs one check (liveness, and responsiveness for the demo) in one session.

pub mod client;
pub mod decode;
pub mod demo;
pub mod metrics;
pub mod pool;
pub mod qoe;
pub mod respond;

pub use client::{ClientError, Event, Session};
pub use qoe::{Advertised, QoeMeter, QoeReport};
pub use respond::{ResponseCheck, ResponseConfig, ResponseReport};

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
    /// How long the first frame may take (connection, keyframe).
    pub first_frame_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("no frame decoded within {0:?} of connecting")]
    NoFirstFrame(Duration),
}

/// What one check found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckReport {
    /// The role the relay granted (`player`; a `spectator`'s input never reaches the game).
    pub role: String,
    pub qoe: QoeReport,
    /// The demo's responsiveness (for a node running the demo).
    pub response: Option<ResponseReport>,
}

impl CheckReport {
    pub fn passed(&self) -> bool {
        self.qoe.passed() && self.response.as_ref().is_none_or(ResponseReport::passed)
    }
}

/// Connects, waits for the first decoded frame, watches for `duration` (and, for the demo,
/// until the responsiveness trials are done), and judges what it saw. A stream that dies
/// part way is a failed check (a report), not an error; errors are for checks that could
/// not be made.
pub async fn run(config: CheckConfig) -> Result<CheckReport, CheckError> {
    let (session, mut events) =
        Session::connect(&config.relay, config.token.as_deref(), config.first_frame_timeout).await?;
    tracing::info!(role = %session.role, relay = %config.relay, "connected; waiting for the first frame");
    let mut meter = QoeMeter::new(config.advertised);
    let mut response = config.demo.then(|| ResponseCheck::new(ResponseConfig::default(), rand::random()));
    let mut seen: Option<demo::Pose> = None;
    let mut seq = 0u32;
    let started = Instant::now();
    let first_deadline = tokio::time::Instant::now() + config.first_frame_timeout;
    let mut end: Option<tokio::time::Instant> = None;
    loop {
        let now = Instant::now();
        // Trials are judged on time only once every frame already decoded has been seen
        // (on a busy machine frames can queue here; one of them may hold the answer).
        while events.is_empty()
            && let Some(event) = response.as_mut().and_then(|c| c.poll_input(now))
        {
            seq += 1;
            let time_ms = u32::try_from(now.duration_since(started).as_millis()).unwrap_or(u32::MAX);
            let msg = pylon_proto::input::InputMessage { seq, time_ms, event };
            if let Err(e) = session.send_input(&msg).await {
                tracing::warn!("input not sent: {e}");
            }
        }
        let responding = response.as_ref().is_some_and(|c| !c.is_done());
        let wake = match (end, response.as_ref().and_then(ResponseCheck::poll_timeout)) {
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
            Err(_) if responding || end.is_some_and(|e| tokio::time::Instant::now() < e) => continue,
            Err(_) => break,
        };
        match event {
            Event::Packet(bytes) => meter.on_packet(bytes),
            Event::Frame { at, picture } => {
                meter.on_frame(at, picture.width, picture.height);
                if end.is_none() {
                    end = Some(tokio::time::Instant::now() + config.duration);
                }
                if let Some(check) = response.as_mut() {
                    let pose = demo::ship_pose(&picture, seen.map(|p| (p.x, p.y)));
                    seen = pose.or(seen);
                    check.on_frame(at, picture.width, picture.height, pose);
                }
            }
            // Before the first keyframe nothing decodes; only later failures count.
            Event::Undecodable if end.is_some() => meter.on_keyframe_request(),
            Event::Undecodable => {}
            Event::Message(_) => {}
            Event::Closed(reason) => {
                tracing::warn!("the session ended during the check: {reason}");
                break;
            }
        }
    }
    let rtt = session.rtt_ms();
    let role = session.role.clone();
    session.close().await;
    let report = CheckReport { role, qoe: meter.finish(Instant::now(), rtt), response: response.map(|c| c.report()) };
    tracing::info!(passed = report.passed(), fps = report.qoe.fps, frames = report.qoe.frames_decoded, "check done");
    Ok(report)
}
