//! `pylon-checker`: plays a render node through its relay like a player would, on a WebRTC
//! stack independent of the relay's (webrtc-rs here, str0m there), and measures what it
//! sees.
//!
//! * [`client`]: the WebRTC session (signalling, H.264 receive, the player's DataChannels,
//!   NACK/PLI) and an FFmpeg decoder thread.
//! * [`qoe`]: the liveness and quality check, I/O-free: frames decoded at the advertised
//!   size and rate (± 5 %), freezes, bitrate, RTT.
//! * [`decode`]: FFmpeg's H.264 decoder.
//!
//! [`run`] performs one liveness check against one relay URL.

pub mod client;
pub mod decode;
pub mod qoe;

pub use client::{ClientError, Event, Session};
pub use qoe::{Advertised, QoeMeter, QoeReport};

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
    /// How long to watch after the first decoded frame.
    pub duration: Duration,
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

/// Connects, waits for the first decoded frame, watches for `duration`, and judges what it
/// saw. A stream that dies part way is a failed check (a report), not an error; errors are
/// for checks that could not be made.
pub async fn run(config: CheckConfig) -> Result<QoeReport, CheckError> {
    let (session, mut events) =
        Session::connect(&config.relay, config.token.as_deref(), config.first_frame_timeout).await?;
    tracing::info!(role = %session.role, relay = %config.relay, "connected; waiting for the first frame");
    let mut meter = QoeMeter::new(config.advertised);
    let first_deadline = tokio::time::Instant::now() + config.first_frame_timeout;
    let mut end: Option<tokio::time::Instant> = None;
    loop {
        let deadline = end.unwrap_or(first_deadline);
        let event = match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(event)) => event,
            Ok(None) => break,
            Err(_) if end.is_none() => {
                session.close().await;
                return Err(CheckError::NoFirstFrame(config.first_frame_timeout));
            }
            Err(_) => break,
        };
        match event {
            Event::Packet(bytes) => meter.on_packet(bytes),
            Event::Frame { at, picture } => {
                meter.on_frame(at, picture.width, picture.height);
                if end.is_none() {
                    end = Some(tokio::time::Instant::now() + config.duration);
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
    session.close().await;
    let report = meter.finish(Instant::now(), rtt);
    tracing::info!(passed = report.passed(), fps = report.fps, frames = report.frames_decoded, "check done");
    Ok(report)
}
