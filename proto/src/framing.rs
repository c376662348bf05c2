//! Framing between render node and edge relay.
//!
//! One QUIC connection per node–relay pair carries:
//! * **datagrams**: one RTP packet each, behind a two-byte header
//!   (`version`, `kind`), so that loss is never turned into head-of-line blocking;
//! * **one bidirectional control stream** (opened by the node; the only stream a link
//!   may have) of length-prefixed messages: `type: u8`, `length: u16` (big endian), then
//!   `length` bytes of body. Each direction has its own message enum —
//!   [`NodeMessage`] node → relay, [`RelayMessage`] relay → node — so a message arriving
//!   in the wrong direction is a decoding error, not a case to handle.
//!
//! | message            | type | direction      | body                                                                  |
//! |--------------------|------|----------------|-----------------------------------------------------------------------|
//! | `Hello`            | 1    | node → relay   | width u16, height u16, fps u16, profile-level-id u32, encoder name length u8, encoder name (UTF-8, ≤ 64 bytes), node id length u8, node id (UTF-8, ≤ 64 bytes; empty for a node outside a pool), then either nothing (anonymous) or the node's ed25519 public key (32) and its signature (64) over the TLS exporter and everything before it (see [`crate::link`]) |
//! | `KeyframeRequest`  | 2    | relay → node   | empty                                                                 |
//! | `Goodbye`          | 3    | either         | reason (rest, UTF-8, ≤ 256 bytes)                                     |
//! | `Input`            | 4    | relay → node   | one player input message (`input.rs` format), forwarded unchanged     |
//! | `FrameInfo`        | 5    | node → relay   | rtp timestamp u32, input seq u32, render µs u32, encode µs u32, input age µs u32 |
//! | `SessionStart`     | 6    | relay → node   | the player's session token (UTF-8, ≤ 1024 bytes), which the node verifies itself |
//! | `SessionEnd`       | 7    | relay → node   | session id, hex (UTF-8, ≤ 64 bytes): the player left                  |
//! | `Nack`             | 8    | relay → node   | RTP sequence numbers the relay did not receive, u16 each (≤ 256): resend them |
//! | `Bitrate`          | 9    | relay → node   | target video bitrate, bit/s u32, from the player's congestion feedback |
//! | `Welcome`          | 10   | relay → node   | the relay's id (UTF-8, ≤ 64 bytes): the node's hello was verified and admitted |
//! | `AudioNack`        | 12   | relay → node   | like `Nack`, for the audio stream's sequence numbers                  |
//! | `SessionOver`      | 11   | node → relay   | session id length u8, session id (UTF-8, ≤ 64 bytes), reason (rest, UTF-8, ≤ 256 bytes): the session ended at the node (the title exited, crashed or never drew) |
//!
//! Datagram kinds: 1 = video RTP (node → relay); 3 = video RTP preceded by the frame's
//! capture time as a 64-bit NTP timestamp (first packet of each frame, for the
//! abs-capture-time extension); 4 = audio RTP (Opus, one 10 ms frame a packet) preceded by
//! its capture time as a 64-bit NTP timestamp on the same node clock as video frames (every
//! packet: the relay maps both streams' RTP times to that clock for lip sync); 2 =
//! supersedable player input such as mouse motion (relay → node), forwarded unchanged.

use thiserror::Error;

/// Version of the datagram and control framing. A peer speaking another version is refused.
pub const FRAMING_VERSION: u8 = 1;
/// ALPN protocol identifier for the node–relay QUIC connection.
pub const ALPN: &[u8] = b"pylon-media/1";
/// Largest control message body accepted.
pub const MAX_CONTROL_BODY: usize = 4096;
/// Bytes of datagram header before the RTP packet.
pub const DATAGRAM_HEADER_LEN: usize = 2;

/// What a media datagram carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum DatagramKind {
    /// An RTP packet of the video stream.
    VideoRtp = 1,
    /// A supersedable player input message (mouse motion).
    Input = 2,
    /// An RTP packet of the video stream preceded by an 8-byte NTP capture time.
    VideoRtpCaptured = 3,
    /// An RTP packet of the audio stream preceded by an 8-byte NTP capture time.
    AudioRtp = 4,
}

/// Seconds between the NTP epoch (1900) and the Unix epoch (1970).
const NTP_UNIX_OFFSET: u64 = 2_208_988_800;

/// A wall-clock time as a 64-bit NTP timestamp (Q32.32 seconds since 1900).
pub fn to_ntp(t: std::time::SystemTime) -> u64 {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() + NTP_UNIX_OFFSET;
    let frac = (u64::from(d.subsec_nanos()) << 32) / 1_000_000_000;
    (secs << 32) | frac
}

/// The inverse of [`to_ntp`]; `None` before the Unix epoch.
pub fn from_ntp(ntp: u64) -> Option<std::time::SystemTime> {
    let secs = (ntp >> 32).checked_sub(NTP_UNIX_OFFSET)?;
    let nanos = ((ntp & 0xffff_ffff) * 1_000_000_000) >> 32;
    std::time::UNIX_EPOCH.checked_add(std::time::Duration::new(secs, nanos as u32))
}

/// Writes a video datagram whose RTP packet is the first of a frame captured at `capture`.
pub fn encode_captured_datagram(capture: std::time::SystemTime, rtp: &[u8], out: &mut Vec<u8>) {
    out.reserve(DATAGRAM_HEADER_LEN + 8 + rtp.len());
    out.push(FRAMING_VERSION);
    out.push(DatagramKind::VideoRtpCaptured as u8);
    out.extend_from_slice(&to_ntp(capture).to_be_bytes());
    out.extend_from_slice(rtp);
}

/// Writes an audio datagram: its RTP packet captured at `capture`.
pub fn encode_audio_datagram(capture: std::time::SystemTime, rtp: &[u8], out: &mut Vec<u8>) {
    out.reserve(DATAGRAM_HEADER_LEN + 8 + rtp.len());
    out.push(FRAMING_VERSION);
    out.push(DatagramKind::AudioRtp as u8);
    out.extend_from_slice(&to_ntp(capture).to_be_bytes());
    out.extend_from_slice(rtp);
}

/// Parses a datagram into its kind, the capture time (kinds 3 and 4) and the payload.
pub fn decode_media_datagram(buf: &[u8]) -> Result<(DatagramKind, Option<u64>, &[u8]), FramingError> {
    match buf {
        [FRAMING_VERSION, kind @ (3 | 4), rest @ ..] => {
            let (ntp, rtp) = rest.split_at_checked(8).ok_or(FramingError::Truncated)?;
            let ntp = u64::from_be_bytes(ntp.try_into().map_err(|_| FramingError::Truncated)?);
            let kind = if *kind == 3 { DatagramKind::VideoRtpCaptured } else { DatagramKind::AudioRtp };
            Ok((kind, Some(ntp), rtp))
        }
        _ => decode_datagram(buf).map(|(k, p)| (k, None, p)),
    }
}

/// Why a datagram or control message was refused.
#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum FramingError {
    /// Too few bytes for the header.
    #[error("frame truncated")]
    Truncated,
    /// A framing version this build does not speak.
    #[error("unsupported framing version {0}")]
    Version(u8),
    /// An unknown datagram kind or control message type.
    #[error("unknown message type {0}")]
    UnknownType(u8),
    /// A control message longer than [`MAX_CONTROL_BODY`].
    #[error("control message of {0} bytes exceeds the limit")]
    Oversized(usize),
    /// A body that does not match its type.
    #[error("malformed {0} body")]
    Malformed(&'static str),
}

/// Writes a media datagram: header then the RTP packet.
pub fn encode_datagram(kind: DatagramKind, rtp: &[u8], out: &mut Vec<u8>) {
    out.reserve(DATAGRAM_HEADER_LEN + rtp.len());
    out.push(FRAMING_VERSION);
    out.push(kind as u8);
    out.extend_from_slice(rtp);
}

/// Parses a media datagram into its kind and RTP bytes.
pub fn decode_datagram(buf: &[u8]) -> Result<(DatagramKind, &[u8]), FramingError> {
    match buf {
        [FRAMING_VERSION, 1, rtp @ ..] => Ok((DatagramKind::VideoRtp, rtp)),
        [FRAMING_VERSION, 2, input @ ..] => Ok((DatagramKind::Input, input)),
        [FRAMING_VERSION, other, ..] => Err(FramingError::UnknownType(*other)),
        [version, _, ..] => Err(FramingError::Version(*version)),
        _ => Err(FramingError::Truncated),
    }
}

/// Description of the video a node is about to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamHello {
    /// Picture width in pixels.
    pub width: u16,
    /// Picture height in pixels.
    pub height: u16,
    /// Nominal frame rate.
    pub fps: u16,
    /// H.264 profile-level-id (e.g. `0x42e01f`), as in SDP.
    pub profile_level_id: u32,
    /// Name of the encoder in use (`h264_nvenc`, `libx264`...), for logs and dashboards.
    pub encoder: String,
    /// The node's id in the pool (empty outside one): relays report their RTT to it.
    pub node: String,
}

/// The node's proof of identity in its hello: its registered key and a signature over the
/// connection's TLS exporter and the stream description (see [`crate::link`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloAuth {
    /// The node's ed25519 public key.
    pub public_key: [u8; 32],
    /// The signature.
    pub signature: [u8; 64],
}

/// The node's first message: what it streams and who it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeHello {
    /// The stream's description.
    pub stream: StreamHello,
    /// Proof of the node's key; `None` for an anonymous node (development, loopback).
    pub auth: Option<HelloAuth>,
}

impl NodeHello {
    /// The signed part of the body: everything before the key and signature.
    pub fn signed_body(stream: &StreamHello) -> Vec<u8> {
        let mut body = Vec::with_capacity(16 + stream.encoder.len() + stream.node.len());
        body.extend_from_slice(&stream.width.to_be_bytes());
        body.extend_from_slice(&stream.height.to_be_bytes());
        body.extend_from_slice(&stream.fps.to_be_bytes());
        body.extend_from_slice(&stream.profile_level_id.to_be_bytes());
        let encoder = truncate_utf8(&stream.encoder, MAX_ENCODER_NAME);
        body.push(encoder.len() as u8);
        body.extend_from_slice(encoder.as_bytes());
        let node = truncate_utf8(&stream.node, MAX_NODE_ID);
        body.push(node.len() as u8);
        body.extend_from_slice(node.as_bytes());
        body
    }
}

/// A message from the node to the relay.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum NodeMessage {
    /// The stream's parameters and the node's identity; first message on the stream.
    Hello(NodeHello),
    /// Which input the frame with this RTP timestamp is the first to reflect, and what the
    /// node spent on it (for click-to-photon and its breakdown).
    FrameInfo(FrameInfo),
    /// The node is closing the connection on purpose.
    Goodbye(String),
    /// The session ended at the node (its title exited, crashed or never drew).
    SessionOver {
        /// Session id (hex).
        session: String,
        /// Why, for the player.
        reason: String,
    },
    /// The node's answer to a checker's proof-of-capacity challenge, for the session's
    /// player (the checker).
    Capacity(CapacityReply),
    /// Another relay asks for a session's stream (a cascade): the first message on a link
    /// that relay dialed, instead of a node's hello. The relay dialed then sends the stream
    /// as a node would (its hello signed with its own relay key).
    Pull(Pull),
}

/// A relay's request for a session's stream from the relay carrying it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pull {
    /// The pulling relay's id in the pool.
    pub relay: String,
    /// The session whose stream it wants (hex).
    pub session: String,
    /// Its key and its signature over `link::PULL_CONTEXT`, this connection's exporter
    /// value, `relay` and `session`.
    pub auth: HelloAuth,
}

/// A node's answer to the proof-of-capacity challenge of input message `seq`
/// ([`crate::capacity`]): the commitment, then the product in order, or a refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CapacityReply {
    /// SHA-256 of the product, sent as soon as it is computed (the checker times this).
    Commit {
        /// The challenge's input sequence number.
        seq: u32,
        /// The commitment.
        digest: [u8; 32],
        /// The multiplication on the GPU, µs, as the node reports it (not trusted).
        gpu_us: u32,
        /// The whole job on the node, µs, as the node reports it (not trusted).
        wall_us: u32,
    },
    /// Product bytes from `offset` (at most [`crate::capacity::CHUNK_BYTES`]).
    Chunk {
        /// The challenge's input sequence number.
        seq: u32,
        /// Byte offset in the product.
        offset: u32,
        /// The bytes.
        data: Vec<u8>,
    },
    /// The node did not take the challenge (busy, no device, not a checker's session…).
    Refused {
        /// The challenge's input sequence number.
        seq: u32,
        /// Why.
        reason: String,
    },
}

/// A message from the relay to the node.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RelayMessage {
    /// The node's hello was verified and admitted; carries the relay's id.
    Welcome(String),
    /// Send a keyframe as soon as possible.
    KeyframeRequest,
    /// The relay is closing the connection on purpose (shutdown, refusal, revocation).
    Goodbye(String),
    /// One player input message, unchanged from the browser.
    Input(Vec<u8>),
    /// A player joined with this session token (the node verifies it).
    SessionStart(String),
    /// The player of this session (hex id) left.
    SessionEnd(String),
    /// Resend these RTP packets (lost between node and relay).
    Nack(Vec<u16>),
    /// Resend these audio RTP packets (lost between node and relay).
    AudioNack(Vec<u16>),
    /// Encode at this many bit/s (the player's bandwidth estimate).
    Bitrate(u32),
}

/// Most sequence numbers in one `Nack`.
pub const MAX_NACK_SEQS: usize = 256;

/// Latency facts about one frame, known to the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameInfo {
    /// RTP timestamp of the frame (as the node sent it).
    pub rtp_timestamp: u32,
    /// Highest input sequence number applied before the frame was rendered.
    pub input_seq: u32,
    /// Render and convert time, µs.
    pub render_us: u32,
    /// Encode time, µs.
    pub encode_us: u32,
    /// From the input's arrival at the node to the frame leaving it, µs.
    pub node_us: u32,
}

const MAX_ENCODER_NAME: usize = 64;
const MAX_NODE_ID: usize = 64;
const MAX_TOKEN: usize = 1024;
const MAX_SESSION_ID: usize = 64;
const MAX_REASON: usize = 256;
const MAX_RELAY_ID: usize = 64;

fn truncate_utf8(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or_default()
}

/// A message of one direction of the control stream.
pub trait WireMessage: Sized {
    /// Appends the framed message to `out`. Strings longer than their limit are truncated.
    fn encode(&self, out: &mut Vec<u8>);
    /// Decodes the body of a message of type `kind`.
    fn decode_body(kind: u8, body: &[u8]) -> Result<Self, FramingError>;

    /// Decodes one message from the front of `buf`. `Ok(None)` means more bytes are
    /// needed; `Ok(Some((message, consumed)))` gives the message and its framed length.
    fn decode(buf: &[u8]) -> Result<Option<(Self, usize)>, FramingError> {
        let [kind, l0, l1, rest @ ..] = buf else {
            return Ok(None);
        };
        let len = usize::from(u16::from_be_bytes([*l0, *l1]));
        if len > MAX_CONTROL_BODY {
            return Err(FramingError::Oversized(len));
        }
        let Some(body) = rest.get(..len) else {
            return Ok(None);
        };
        Ok(Some((Self::decode_body(*kind, body)?, 3 + len)))
    }
}

fn frame(out: &mut Vec<u8>, kind: u8, body: &[u8]) {
    out.push(kind);
    // Bodies are bounded by the truncations of their fields, far below u16::MAX.
    out.extend_from_slice(&u16::try_from(body.len()).unwrap_or(u16::MAX).to_be_bytes());
    out.extend_from_slice(body);
}

fn text(body: &[u8], max: usize, what: &'static str) -> Result<String, FramingError> {
    if body.len() > max {
        return Err(FramingError::Malformed(what));
    }
    std::str::from_utf8(body).map(str::to_owned).map_err(|_| FramingError::Malformed(what))
}

fn take_str<'a>(body: &'a [u8], max: usize, what: &'static str) -> Result<(&'a str, &'a [u8]), FramingError> {
    let [len, rest @ ..] = body else { return Err(FramingError::Malformed(what)) };
    let len = usize::from(*len);
    if len > max {
        return Err(FramingError::Malformed(what));
    }
    let (s, rest) = rest.split_at_checked(len).ok_or(FramingError::Malformed(what))?;
    Ok((std::str::from_utf8(s).map_err(|_| FramingError::Malformed(what))?, rest))
}

impl WireMessage for NodeMessage {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            NodeMessage::Hello(h) => {
                let mut body = NodeHello::signed_body(&h.stream);
                if let Some(auth) = &h.auth {
                    body.extend_from_slice(&auth.public_key);
                    body.extend_from_slice(&auth.signature);
                }
                frame(out, 1, &body);
            }
            NodeMessage::Goodbye(reason) => frame(out, 3, truncate_utf8(reason, MAX_REASON).as_bytes()),
            NodeMessage::SessionOver { session, reason } => {
                let session = truncate_utf8(session, MAX_SESSION_ID);
                let mut body = vec![session.len() as u8];
                body.extend_from_slice(session.as_bytes());
                body.extend_from_slice(truncate_utf8(reason, MAX_REASON).as_bytes());
                frame(out, 11, &body);
            }
            NodeMessage::Capacity(CapacityReply::Commit { seq, digest, gpu_us, wall_us }) => {
                let mut body = seq.to_be_bytes().to_vec();
                body.extend_from_slice(digest);
                body.extend_from_slice(&gpu_us.to_be_bytes());
                body.extend_from_slice(&wall_us.to_be_bytes());
                frame(out, 13, &body);
            }
            NodeMessage::Capacity(CapacityReply::Chunk { seq, offset, data }) => {
                let mut body = seq.to_be_bytes().to_vec();
                body.extend_from_slice(&offset.to_be_bytes());
                body.extend_from_slice(data.get(..data.len().min(crate::capacity::CHUNK_BYTES)).unwrap_or_default());
                frame(out, 14, &body);
            }
            NodeMessage::Capacity(CapacityReply::Refused { seq, reason }) => {
                let mut body = seq.to_be_bytes().to_vec();
                body.extend_from_slice(truncate_utf8(reason, MAX_REASON).as_bytes());
                frame(out, 15, &body);
            }
            NodeMessage::Pull(p) => {
                let mut body = Vec::with_capacity(2 + p.relay.len() + p.session.len() + 96);
                for field in [truncate_utf8(&p.relay, MAX_NODE_ID), truncate_utf8(&p.session, MAX_SESSION_ID)] {
                    body.push(field.len() as u8);
                    body.extend_from_slice(field.as_bytes());
                }
                body.extend_from_slice(&p.auth.public_key);
                body.extend_from_slice(&p.auth.signature);
                frame(out, 16, &body);
            }
            NodeMessage::FrameInfo(f) => {
                let mut body = [0u8; 20];
                for (chunk, v) in
                    body.chunks_exact_mut(4).zip([f.rtp_timestamp, f.input_seq, f.render_us, f.encode_us, f.node_us])
                {
                    chunk.copy_from_slice(&v.to_be_bytes());
                }
                frame(out, 5, &body);
            }
        }
    }

    fn decode_body(kind: u8, body: &[u8]) -> Result<Self, FramingError> {
        Ok(match kind {
            16 => {
                let (relay, rest) = take_str(body, MAX_NODE_ID, "Pull")?;
                let (session, rest) = take_str(rest, MAX_SESSION_ID, "Pull")?;
                let (key, sig) = rest.split_at_checked(32).ok_or(FramingError::Malformed("Pull"))?;
                NodeMessage::Pull(Pull {
                    relay: relay.to_owned(),
                    session: session.to_owned(),
                    auth: HelloAuth {
                        public_key: key.try_into().map_err(|_| FramingError::Malformed("Pull"))?,
                        signature: sig.try_into().map_err(|_| FramingError::Malformed("Pull"))?,
                    },
                })
            }
            1 => {
                let bad = FramingError::Malformed("Hello");
                let [w0, w1, h0, h1, f0, f1, p0, p1, p2, p3, rest @ ..] = body else {
                    return Err(bad);
                };
                let (encoder, rest) = take_str(rest, MAX_ENCODER_NAME, "Hello")?;
                let (node, rest) = take_str(rest, MAX_NODE_ID, "Hello")?;
                let auth = match rest {
                    [] => None,
                    _ if rest.len() == 32 + 64 => {
                        let (key, sig) = rest.split_at(32);
                        Some(HelloAuth {
                            public_key: key.try_into().map_err(|_| FramingError::Malformed("Hello"))?,
                            signature: sig.try_into().map_err(|_| FramingError::Malformed("Hello"))?,
                        })
                    }
                    _ => return Err(bad),
                };
                NodeMessage::Hello(NodeHello {
                    stream: StreamHello {
                        width: u16::from_be_bytes([*w0, *w1]),
                        height: u16::from_be_bytes([*h0, *h1]),
                        fps: u16::from_be_bytes([*f0, *f1]),
                        profile_level_id: u32::from_be_bytes([*p0, *p1, *p2, *p3]),
                        encoder: encoder.to_owned(),
                        node: node.to_owned(),
                    },
                    auth,
                })
            }
            3 => NodeMessage::Goodbye(text(body, MAX_REASON, "Goodbye")?),
            11 => {
                let (session, reason) = take_str(body, MAX_SESSION_ID, "SessionOver")?;
                NodeMessage::SessionOver {
                    session: session.to_owned(),
                    reason: text(reason, MAX_REASON, "SessionOver")?,
                }
            }
            5 => {
                let words: Vec<u32> =
                    body.chunks_exact(4).map(|c| u32::from_be_bytes(c.try_into().unwrap_or([0; 4]))).collect();
                let (&[rtp_timestamp, input_seq, render_us, encode_us, node_us], 20) = (&words[..], body.len()) else {
                    return Err(FramingError::Malformed("FrameInfo"));
                };
                NodeMessage::FrameInfo(FrameInfo { rtp_timestamp, input_seq, render_us, encode_us, node_us })
            }
            13 => {
                let bad = || FramingError::Malformed("CapacityCommit");
                let (seq, rest) = body.split_first_chunk::<4>().ok_or_else(bad)?;
                let (digest, rest) = rest.split_first_chunk::<32>().ok_or_else(bad)?;
                let (gpu_us, rest) = rest.split_first_chunk::<4>().ok_or_else(bad)?;
                let Ok(wall_us) = <[u8; 4]>::try_from(rest) else { return Err(bad()) };
                NodeMessage::Capacity(CapacityReply::Commit {
                    seq: u32::from_be_bytes(*seq),
                    digest: *digest,
                    gpu_us: u32::from_be_bytes(*gpu_us),
                    wall_us: u32::from_be_bytes(wall_us),
                })
            }
            14 => {
                let bad = || FramingError::Malformed("CapacityChunk");
                let (seq, rest) = body.split_first_chunk::<4>().ok_or_else(bad)?;
                let (offset, data) = rest.split_first_chunk::<4>().ok_or_else(bad)?;
                if data.is_empty() || data.len() > crate::capacity::CHUNK_BYTES {
                    return Err(bad());
                }
                NodeMessage::Capacity(CapacityReply::Chunk {
                    seq: u32::from_be_bytes(*seq),
                    offset: u32::from_be_bytes(*offset),
                    data: data.to_vec(),
                })
            }
            15 => {
                let (seq, reason) = body.split_first_chunk::<4>().ok_or(FramingError::Malformed("CapacityRefused"))?;
                NodeMessage::Capacity(CapacityReply::Refused {
                    seq: u32::from_be_bytes(*seq),
                    reason: text(reason, MAX_REASON, "CapacityRefused")?,
                })
            }
            other => return Err(FramingError::UnknownType(other)),
        })
    }
}

impl WireMessage for RelayMessage {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            RelayMessage::Welcome(relay) => frame(out, 10, truncate_utf8(relay, MAX_RELAY_ID).as_bytes()),
            RelayMessage::KeyframeRequest => frame(out, 2, &[]),
            RelayMessage::Goodbye(reason) => frame(out, 3, truncate_utf8(reason, MAX_REASON).as_bytes()),
            RelayMessage::Input(bytes) => {
                frame(out, 4, bytes.get(..bytes.len().min(crate::input::MAX_INPUT_MESSAGE)).unwrap_or_default());
            }
            RelayMessage::SessionStart(token) => frame(out, 6, truncate_utf8(token, MAX_TOKEN).as_bytes()),
            RelayMessage::SessionEnd(session) => frame(out, 7, truncate_utf8(session, MAX_SESSION_ID).as_bytes()),
            RelayMessage::Nack(seqs) => {
                let body: Vec<u8> = seqs.iter().take(MAX_NACK_SEQS).flat_map(|s| s.to_be_bytes()).collect();
                frame(out, 8, &body);
            }
            RelayMessage::AudioNack(seqs) => {
                let body: Vec<u8> = seqs.iter().take(MAX_NACK_SEQS).flat_map(|s| s.to_be_bytes()).collect();
                frame(out, 12, &body);
            }
            RelayMessage::Bitrate(bps) => frame(out, 9, &bps.to_be_bytes()),
        }
    }

    fn decode_body(kind: u8, body: &[u8]) -> Result<Self, FramingError> {
        Ok(match kind {
            10 => RelayMessage::Welcome(text(body, MAX_RELAY_ID, "Welcome")?),
            2 if body.is_empty() => RelayMessage::KeyframeRequest,
            2 => return Err(FramingError::Malformed("KeyframeRequest")),
            3 => RelayMessage::Goodbye(text(body, MAX_REASON, "Goodbye")?),
            4 if body.len() <= crate::input::MAX_INPUT_MESSAGE => RelayMessage::Input(body.to_vec()),
            4 => return Err(FramingError::Malformed("Input")),
            6 => RelayMessage::SessionStart(text(body, MAX_TOKEN, "SessionStart")?),
            7 => RelayMessage::SessionEnd(text(body, MAX_SESSION_ID, "SessionEnd")?),
            8 | 12 => {
                if !body.len().is_multiple_of(2) || body.len() / 2 > MAX_NACK_SEQS {
                    return Err(FramingError::Malformed("Nack"));
                }
                let seqs = body.chunks_exact(2).map(|c| u16::from_be_bytes(c.try_into().unwrap_or([0; 2]))).collect();
                if kind == 8 { RelayMessage::Nack(seqs) } else { RelayMessage::AudioNack(seqs) }
            }
            9 => {
                let Ok(bytes) = <[u8; 4]>::try_from(body) else {
                    return Err(FramingError::Malformed("Bitrate"));
                };
                RelayMessage::Bitrate(u32::from_be_bytes(bytes))
            }
            other => return Err(FramingError::UnknownType(other)),
        })
    }
}

/// Accumulates bytes from a control stream and yields whole messages of one direction.
#[derive(Debug)]
pub struct ControlDecoder<M> {
    buf: Vec<u8>,
    _direction: std::marker::PhantomData<fn() -> M>,
}

impl<M> Default for ControlDecoder<M> {
    fn default() -> Self {
        Self { buf: Vec::new(), _direction: std::marker::PhantomData }
    }
}

impl<M: WireMessage> ControlDecoder<M> {
    /// Adds bytes read from the stream.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes held that are not yet a whole message (at most one message's worth once
    /// [`Self::next_message`] has returned `Ok(None)`).
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// The next complete message, if any. After an error the stream is unusable: the
    /// caller should close it, since framing cannot be resynchronised.
    pub fn next_message(&mut self) -> Result<Option<M>, FramingError> {
        match M::decode(&self.buf)? {
            Some((msg, used)) => {
                self.buf.drain(..used);
                Ok(Some(msg))
            }
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(encoder: &str, node: &str) -> StreamHello {
        StreamHello {
            width: 1280,
            height: 720,
            fps: 60,
            profile_level_id: 0x42e01f,
            encoder: encoder.into(),
            node: node.into(),
        }
    }

    fn feed<M: WireMessage + std::fmt::Debug>(wire: &[u8]) -> Vec<M> {
        // One byte at a time: messages come out whole and in order.
        let mut dec = ControlDecoder::<M>::default();
        let mut got = Vec::new();
        for b in wire {
            dec.extend(std::slice::from_ref(b));
            while let Some(m) = dec.next_message().unwrap() {
                got.push(m);
            }
        }
        got
    }

    #[test]
    fn datagram_round_trip_every_length() {
        for len in 0..1500 {
            let rtp: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut buf = Vec::new();
            encode_datagram(DatagramKind::VideoRtp, &rtp, &mut buf);
            assert_eq!(decode_datagram(&buf), Ok((DatagramKind::VideoRtp, &rtp[..])));
        }
    }

    #[test]
    fn captured_datagrams_round_trip() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::new(1_800_000_000, 123_456_789);
        let mut buf = Vec::new();
        encode_captured_datagram(t, b"rtp", &mut buf);
        let (kind, ntp, rtp) = decode_media_datagram(&buf).unwrap();
        assert_eq!((kind, rtp), (DatagramKind::VideoRtpCaptured, &b"rtp"[..]));
        let back = from_ntp(ntp.unwrap()).unwrap();
        let err = back.duration_since(t).unwrap_or_else(|e| e.duration());
        assert!(err < std::time::Duration::from_nanos(2), "{err:?}");
        assert_eq!(decode_media_datagram(&[1, 3, 0, 0]), Err(FramingError::Truncated));
        buf.clear();
        encode_audio_datagram(t, b"opus", &mut buf);
        let (kind, audio_ntp, rtp) = decode_media_datagram(&buf).unwrap();
        assert_eq!((kind, audio_ntp, rtp), (DatagramKind::AudioRtp, ntp, &b"opus"[..]));
        assert_eq!(decode_media_datagram(&[1, 4, 0, 0, 0, 0, 0, 0, 0]), Err(FramingError::Truncated));
        assert_eq!(decode_media_datagram(&[1, 1, 7]).unwrap(), (DatagramKind::VideoRtp, None, &[7u8][..]));
        for len in 0..64 {
            let junk: Vec<u8> = std::iter::once(1).chain(std::iter::once(3)).chain((0..len).map(|i| i as u8)).collect();
            let _ = decode_media_datagram(&junk);
        }
    }

    #[test]
    fn datagram_garbage_is_an_error() {
        assert_eq!(decode_datagram(&[]), Err(FramingError::Truncated));
        assert_eq!(decode_datagram(&[1]), Err(FramingError::Truncated));
        assert_eq!(decode_datagram(&[9, 1, 0]), Err(FramingError::Version(9)));
        assert_eq!(decode_datagram(&[1, 77]), Err(FramingError::UnknownType(77)));
    }

    #[test]
    fn control_round_trip_and_streaming_in_each_direction() {
        let from_node = [
            NodeMessage::Hello(NodeHello { stream: stream("libx264", "node-7"), auth: None }),
            NodeMessage::Hello(NodeHello {
                stream: stream("", ""),
                auth: Some(HelloAuth { public_key: [7; 32], signature: [9; 64] }),
            }),
            NodeMessage::Goodbye("bye ✓".into()),
            NodeMessage::SessionOver { session: "ab".repeat(16), reason: "the game was killed by signal 11".into() },
            NodeMessage::SessionOver { session: String::new(), reason: String::new() },
            NodeMessage::Capacity(CapacityReply::Commit { seq: 7, digest: [9; 32], gpu_us: 1234, wall_us: u32::MAX }),
            NodeMessage::Capacity(CapacityReply::Chunk {
                seq: 7,
                offset: 4000,
                data: vec![0xfe; crate::capacity::CHUNK_BYTES],
            }),
            NodeMessage::Capacity(CapacityReply::Refused { seq: 8, reason: "busy".into() }),
            NodeMessage::FrameInfo(FrameInfo {
                rtp_timestamp: 9,
                input_seq: 8,
                render_us: 7,
                encode_us: 6,
                node_us: 5,
            }),
        ];
        let mut wire = Vec::new();
        from_node.iter().for_each(|m| m.encode(&mut wire));
        assert_eq!(feed::<NodeMessage>(&wire), from_node);

        let from_relay = [
            RelayMessage::Welcome("relay-1".into()),
            RelayMessage::KeyframeRequest,
            RelayMessage::Goodbye("bye ✓".into()),
            RelayMessage::SessionStart("token.text".into()),
            RelayMessage::SessionEnd("00ff".into()),
            RelayMessage::Nack(vec![0, 1, 65535]),
            RelayMessage::Nack(vec![]),
            RelayMessage::Bitrate(2_500_000),
            RelayMessage::Input(vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]),
        ];
        let mut wire = Vec::new();
        from_relay.iter().for_each(|m| m.encode(&mut wire));
        assert_eq!(feed::<RelayMessage>(&wire), from_relay);
    }

    #[test]
    fn a_message_of_the_other_direction_is_an_error() {
        let mut wire = Vec::new();
        RelayMessage::SessionStart("t".into()).encode(&mut wire);
        assert_eq!(NodeMessage::decode(&wire), Err(FramingError::UnknownType(6)));
        wire.clear();
        NodeMessage::Hello(NodeHello { stream: stream("x", "n"), auth: None }).encode(&mut wire);
        assert_eq!(RelayMessage::decode(&wire), Err(FramingError::UnknownType(1)));
    }

    #[test]
    fn oversized_and_malformed_control_messages_are_errors() {
        assert_eq!(NodeMessage::decode(&[1, 0xff, 0xff]), Err(FramingError::Oversized(65535)));
        assert_eq!(NodeMessage::decode(&[1, 0, 2, 0, 0]), Err(FramingError::Malformed("Hello")));
        assert_eq!(RelayMessage::decode(&[2, 0, 1, 0]), Err(FramingError::Malformed("KeyframeRequest")));
        assert_eq!(RelayMessage::decode(&[3, 0, 1, 0xff]), Err(FramingError::Malformed("Goodbye")));
        assert_eq!(RelayMessage::decode(&[200, 0, 0]), Err(FramingError::UnknownType(200)));
        // A hello whose proof is cut short is not taken as anonymous.
        let mut wire = Vec::new();
        let auth = Some(HelloAuth { public_key: [1; 32], signature: [2; 64] });
        NodeMessage::Hello(NodeHello { stream: stream("x", "n"), auth }).encode(&mut wire);
        let body_len = wire.len() - 3 - 1;
        let mut cut = vec![1];
        cut.extend_from_slice(&(body_len as u16).to_be_bytes());
        cut.extend_from_slice(&wire[3..wire.len() - 1]);
        assert_eq!(NodeMessage::decode(&cut), Err(FramingError::Malformed("Hello")));
    }

    #[test]
    fn long_strings_are_truncated_on_a_char_boundary() {
        let mut wire = Vec::new();
        RelayMessage::Goodbye("é".repeat(500)).encode(&mut wire);
        let (back, _) = RelayMessage::decode(&wire).unwrap().unwrap();
        assert_eq!(back, RelayMessage::Goodbye("é".repeat(128)));
    }

    #[test]
    fn control_length_sweep_never_panics() {
        for kind in 0..=12u8 {
            for len in 0..1500usize {
                let mut buf = vec![kind];
                buf.extend_from_slice(&(len as u16).to_be_bytes());
                buf.extend((0..len).map(|i| (i * 7) as u8));
                for b in [&buf[..], buf.get(..len).unwrap_or(&[])] {
                    let _ = NodeMessage::decode(b);
                    let _ = RelayMessage::decode(b);
                    let _ = decode_datagram(b);
                    let _ = decode_media_datagram(b);
                }
            }
        }
    }
}
