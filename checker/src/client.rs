//! The checker's WebRTC client on webrtc-rs: the relay's signalling over a WebSocket, one
//! receive-only H.264 video transceiver, the player's two DataChannels (`input`, reliable
//! and ordered; `input-motion`, unordered without retransmission), NACK and PLI from the
//! stack's default interceptors, and an FFmpeg decoder on a thread of its own.

use crate::decode::{H264Decoder, Picture};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use webrtc::api::APIBuilder;
use webrtc::api::interceptor_registry::register_default_interceptors;
use webrtc::api::media_engine::MediaEngine;
use webrtc::api::setting_engine::SettingEngine;
use webrtc::data_channel::RTCDataChannel;
use webrtc::data_channel::data_channel_init::RTCDataChannelInit;
use webrtc::ice::mdns::MulticastDnsMode;
use webrtc::interceptor::registry::Registry;
use webrtc::media::io::sample_builder::SampleBuilder;
use webrtc::peer_connection::RTCPeerConnection;
use webrtc::peer_connection::configuration::RTCConfiguration;
use webrtc::peer_connection::peer_connection_state::RTCPeerConnectionState;
use webrtc::peer_connection::sdp::session_description::RTCSessionDescription;
use webrtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use webrtc::rtp::codecs::h264::H264Packet;
use webrtc::rtp_transceiver::RTCRtpTransceiverInit;
use webrtc::rtp_transceiver::rtp_codec::RTPCodecType;
use webrtc::rtp_transceiver::rtp_transceiver_direction::RTCRtpTransceiverDirection;

/// The relay's DataChannel labels (`edge-relay/src/forward.rs`).
const INPUT_CHANNEL: &str = "input";
const MOTION_CHANNEL: &str = "input-motion";
/// How often the round-trip time to the relay is probed.
const RTT_PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Frames the sample builder may hold back waiting for a late packet.
const MAX_LATE_PACKETS: u16 = 256;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("signalling with the relay at {url}: {source}")]
    Signalling { url: String, source: Box<tokio_tungstenite::tungstenite::Error> },
    #[error("the relay refused the session: {0}")]
    Refused(String),
    #[error("the relay closed signalling before answering")]
    NoAnswer,
    #[error("the relay sent a malformed signalling message: {0}")]
    BadMessage(#[from] serde_json::Error),
    #[error("WebRTC: {0}")]
    WebRtc(#[from] webrtc::Error),
    #[error("no connection to the relay within {0:?} (ICE/DTLS)")]
    ConnectTimeout(Duration),
    #[error("decoder: {0}")]
    Decode(#[from] crate::decode::DecodeError),
}

/// What the session saw, in the order it saw it.
#[derive(Debug)]
pub enum Event {
    /// A video RTP packet's payload arrived (bytes).
    Packet(usize),
    /// A frame was decoded; its last packet had arrived at `at` (the time the network
    /// delivered it, which the checker's own decoding cannot delay).
    Frame { at: Instant, picture: Picture },
    /// A frame could not be decoded; a keyframe was asked for.
    Undecodable,
    /// A text message from the relay on the input channel (frame info, clock, capacity).
    Message(String),
    /// A binary message from the relay on the input channel (a capacity product's chunk).
    Binary(Vec<u8>),
    /// The relay ended the session (`ended`/`bye`) or the connection failed.
    Closed(String),
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum ServerMessage {
    Answer { sdp: String, role: String },
    Error { message: String },
    Ended { reason: String },
    Bye { reason: String },
}

/// One session with a relay, as a player (or the role the relay grants).
pub struct Session {
    pc: Arc<RTCPeerConnection>,
    input: Arc<RTCDataChannel>,
    motion: Arc<RTCDataChannel>,
    /// The role the relay granted (`player` or `spectator`).
    pub role: String,
    video_ssrc: Arc<std::sync::atomic::AtomicU32>,
    /// Round-trip times to the relay, ms, one per probe.
    rtts: Arc<std::sync::Mutex<Vec<f64>>>,
    signalling: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("role", &self.role).finish_non_exhaustive()
    }
}

/// The relay's signalling URL (`ws://host/ws`) from its page URL (`http://host/…`).
pub fn signalling_url(relay: &str) -> String {
    let base = relay.trim_end_matches('/');
    let base = base
        .strip_prefix("https://")
        .map(|r| format!("wss://{r}"))
        .unwrap_or_else(|| base.strip_prefix("http://").map_or_else(|| base.to_owned(), |r| format!("ws://{r}")));
    // Only the origin: a /play/<session> path is the page, not the signalling endpoint.
    let origin_end = base.find("://").map_or(0, |i| i + 3);
    let origin = match base[origin_end..].find('/') {
        Some(slash) => &base[..origin_end + slash],
        None => base.as_str(),
    };
    format!("{origin}/ws")
}

impl Session {
    /// Offers to the relay at `relay` (its page URL) with `token`, and waits until the
    /// connection is up and the input channel open. Events (packets, frames, messages) arrive on the returned channel.
    pub async fn connect(
        relay: &str,
        token: Option<&str>,
        timeout: Duration,
    ) -> Result<(Self, mpsc::UnboundedReceiver<Event>), ClientError> {
        let url = signalling_url(relay);
        let (mut ws, _) = tokio_tungstenite::connect_async(&url)
            .await
            .map_err(|e| ClientError::Signalling { url: url.clone(), source: Box::new(e) })?;

        let mut media = MediaEngine::default();
        media.register_default_codecs()?;
        let registry = register_default_interceptors(Registry::new(), &mut media)?;
        let mut settings = SettingEngine::default();
        // Relays on this host (tests, a checker beside its relay) answer on loopback.
        settings.set_include_loopback_candidate(true);
        settings.set_ice_multicast_dns_mode(MulticastDnsMode::Disabled);
        let api = APIBuilder::new()
            .with_media_engine(media)
            .with_interceptor_registry(registry)
            .with_setting_engine(settings)
            .build();
        let pc = Arc::new(api.new_peer_connection(RTCConfiguration::default()).await?);
        pc.add_transceiver_from_kind(
            RTPCodecType::Video,
            Some(RTCRtpTransceiverInit { direction: RTCRtpTransceiverDirection::Recvonly, send_encodings: vec![] }),
        )
        .await?;
        let input = pc
            .create_data_channel(INPUT_CHANNEL, Some(RTCDataChannelInit { ordered: Some(true), ..Default::default() }))
            .await?;
        let motion = pc
            .create_data_channel(
                MOTION_CHANNEL,
                Some(RTCDataChannelInit { ordered: Some(false), max_retransmits: Some(0), ..Default::default() }),
            )
            .await?;

        let (events, rx) = mpsc::unbounded_channel();
        let video_ssrc = Arc::new(std::sync::atomic::AtomicU32::new(0));
        on_track(&pc, events.clone(), video_ssrc.clone());
        {
            let events = events.clone();
            input.on_message(Box::new(move |msg| {
                let event = if msg.is_string {
                    Event::Message(String::from_utf8_lossy(&msg.data).into_owned())
                } else {
                    Event::Binary(msg.data.to_vec())
                };
                let _ = events.send(event);
                Box::pin(async {})
            }));
        }
        // Input sent before the channel opens would be lost: connecting waits for it.
        let (open_tx, mut open_rx) = mpsc::channel::<()>(1);
        input.on_open(Box::new(move || {
            let _ = open_tx.try_send(());
            Box::pin(async {})
        }));
        let (up_tx, mut up_rx) = mpsc::channel::<Result<(), String>>(4);
        {
            let events = events.clone();
            pc.on_peer_connection_state_change(Box::new(move |state| {
                match state {
                    RTCPeerConnectionState::Connected => {
                        let _ = up_tx.try_send(Ok(()));
                    }
                    RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed => {
                        let _ = up_tx.try_send(Err(format!("{state}")));
                        let _ = events.send(Event::Closed(format!("connection {state}")));
                    }
                    _ => {}
                }
                Box::pin(async {})
            }));
        }

        let offer = pc.create_offer(None).await?;
        let mut gathered = pc.gathering_complete_promise().await;
        pc.set_local_description(offer).await?;
        let _ = gathered.recv().await;
        let local = pc.local_description().await.ok_or(ClientError::NoAnswer)?;
        let mut msg = serde_json::json!({ "type": "offer", "sdp": local.sdp, "role": "player" });
        if let Some(token) = token {
            msg["token"] = token.into();
        }
        let send = ws.send(tokio_tungstenite::tungstenite::Message::text(msg.to_string())).await;
        send.map_err(|e| ClientError::Signalling { url: url.clone(), source: Box::new(e) })?;
        let role = loop {
            let Some(Ok(frame)) = ws.next().await else { return Err(ClientError::NoAnswer) };
            let Ok(text) = frame.to_text() else { continue };
            if text.is_empty() {
                continue;
            }
            match serde_json::from_str::<ServerMessage>(text)? {
                ServerMessage::Answer { sdp, role } => {
                    pc.set_remote_description(RTCSessionDescription::answer(sdp)?).await?;
                    break role;
                }
                ServerMessage::Error { message } => return Err(ClientError::Refused(message)),
                ServerMessage::Ended { reason } | ServerMessage::Bye { reason } => {
                    return Err(ClientError::Refused(reason));
                }
            }
        };
        // The WebSocket stays open for the session: closing it ends the viewer. It also
        // carries the RTT probes: a WebSocket ping a second, timed to its pong (webrtc-rs's
        // ICE statistics leave the round-trip time at 0).
        let rtts = Arc::new(std::sync::Mutex::new(Vec::<f64>::new()));
        let samples = rtts.clone();
        let signalling = tokio::spawn(async move {
            use tokio_tungstenite::tungstenite::Message;
            let mut tick = tokio::time::interval(RTT_PROBE_INTERVAL);
            let mut sent: Option<Instant> = None;
            loop {
                tokio::select! {
                    frame = ws.next() => {
                        let Some(Ok(frame)) = frame else { break };
                        match frame {
                            Message::Pong(_) => {
                                if let Some(at) = sent.take() {
                                    let mut s = samples.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                                    s.push(at.elapsed().as_secs_f64() * 1000.0);
                                }
                            }
                            Message::Text(text) => {
                                if let Ok(ServerMessage::Ended { reason } | ServerMessage::Bye { reason }) =
                                    serde_json::from_str(&text)
                                {
                                    let _ = events.send(Event::Closed(reason));
                                }
                            }
                            _ => {}
                        }
                    }
                    _ = tick.tick() => {
                        if sent.is_none() && ws.send(Message::Ping(Bytes::new())).await.is_ok() {
                            sent = Some(Instant::now());
                        }
                    }
                }
            }
        });
        let deadline = tokio::time::Instant::now() + timeout;
        match tokio::time::timeout_at(deadline, up_rx.recv()).await {
            Ok(Some(Ok(()))) => {}
            Ok(Some(Err(state))) => return Err(ClientError::Refused(format!("connection {state}"))),
            _ => return Err(ClientError::ConnectTimeout(timeout)),
        }
        if tokio::time::timeout_at(deadline, open_rx.recv()).await.is_err() {
            return Err(ClientError::ConnectTimeout(timeout));
        }
        Ok((Self { pc, input, motion, role, video_ssrc, rtts, signalling }, rx))
    }

    /// Sends an input message on the reliable channel (or, for supersedable motion, the
    /// unordered one), in the player's binary format.
    pub async fn send_input(&self, msg: &pylon_proto::input::InputMessage) -> Result<(), ClientError> {
        let mut buf = Vec::new();
        msg.encode(&mut buf);
        let channel = if msg.is_supersedable() { &self.motion } else { &self.input };
        channel.send(&Bytes::from(buf)).await?;
        Ok(())
    }

    /// Sends a text message on the input channel (page → relay messages).
    pub async fn send_text(&self, text: &str) -> Result<(), ClientError> {
        self.input.send_text(text.to_owned()).await?;
        Ok(())
    }

    /// Asks the relay for a keyframe (RTCP PLI).
    pub async fn request_keyframe(&self) -> Result<(), ClientError> {
        send_pli(&self.pc, self.video_ssrc.load(std::sync::atomic::Ordering::Relaxed)).await
    }

    /// The median round-trip time to the relay so far, ms (WebSocket ping to pong on the
    /// signalling connection, one probe a second).
    pub fn rtt_ms(&self) -> Option<f64> {
        let mut s = self.rtts.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        s.sort_by(f64::total_cmp);
        s.get(s.len() / 2).copied()
    }

    /// Ends the session (closes the connection and the signalling).
    pub async fn close(self) {
        let _ = self.pc.close().await;
        self.signalling.abort();
    }
}

/// Asks the sender of `media_ssrc` for a keyframe (RTCP PLI).
async fn send_pli(pc: &RTCPeerConnection, media_ssrc: u32) -> Result<(), ClientError> {
    pc.write_rtcp(&[Box::new(PictureLossIndication { sender_ssrc: 0, media_ssrc })]).await?;
    Ok(())
}

/// Reads the video track's RTP, rebuilds access units, and decodes them on a thread of
/// its own; every packet, frame and decode failure becomes an [`Event`].
fn on_track(
    pc: &Arc<RTCPeerConnection>,
    events: mpsc::UnboundedSender<Event>,
    video_ssrc: Arc<std::sync::atomic::AtomicU32>,
) {
    let weak = Arc::downgrade(pc);
    pc.on_track(Box::new(move |track, _, _| {
        if track.kind() != RTPCodecType::Video {
            return Box::pin(async {});
        }
        video_ssrc.store(track.ssrc(), std::sync::atomic::Ordering::Relaxed);
        let events = events.clone();
        let weak = weak.clone();
        let ssrc = track.ssrc();
        Box::pin(async move {
            let (units, decoder_rx) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
            let decoded = events.clone();
            let (failed_tx, mut failed_rx) = mpsc::unbounded_channel::<()>();
            std::thread::Builder::new()
                .name("checker-decode".into())
                .spawn(move || decode_thread(decoder_rx, decoded, failed_tx))
                .ok();
            // Keyframe requests for frames the decoder could not use.
            tokio::spawn(async move {
                while failed_rx.recv().await.is_some() {
                    let Some(pc) = weak.upgrade() else { break };
                    let _ = send_pli(&pc, ssrc).await;
                }
            });
            let mut builder = SampleBuilder::new(MAX_LATE_PACKETS, H264Packet::default(), 90_000);
            while let Ok((packet, _)) = track.read_rtp().await {
                let _ = events.send(Event::Packet(packet.payload.len()));
                builder.push(packet);
                while let Some(sample) = builder.pop() {
                    if units.send((Instant::now(), sample.data.to_vec())).is_err() {
                        return;
                    }
                }
            }
        })
    }));
}

fn decode_thread(
    units: std::sync::mpsc::Receiver<(Instant, Vec<u8>)>,
    events: mpsc::UnboundedSender<Event>,
    failed: mpsc::UnboundedSender<()>,
) {
    let mut decoder = match H264Decoder::new() {
        Ok(d) => d,
        Err(e) => {
            let _ = events.send(Event::Closed(format!("decoder: {e}")));
            return;
        }
    };
    while let Ok((at, unit)) = units.recv() {
        match decoder.decode(&unit) {
            Ok(Some(picture)) => {
                let _ = events.send(Event::Frame { at, picture });
            }
            Ok(None) => {}
            Err(e) => {
                tracing::debug!("undecodable frame: {e}");
                let _ = events.send(Event::Undecodable);
                let _ = failed.send(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::signalling_url;

    #[test]
    fn the_signalling_url_is_the_pages_origin_with_ws() {
        assert_eq!(signalling_url("http://127.0.0.1:8080/"), "ws://127.0.0.1:8080/ws");
        assert_eq!(signalling_url("http://relay.example/play/abc"), "ws://relay.example/ws");
        assert_eq!(signalling_url("https://relay.example:8443/watch/x#token=t"), "wss://relay.example:8443/ws");
        assert_eq!(signalling_url("ws://relay:1"), "ws://relay:1/ws");
    }
}
