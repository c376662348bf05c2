//! H.264 encoding through FFmpeg (`ffmpeg-next`).
//!
//! [`VideoEncoder::open`] probes the encoders in order of preference: `h264_nvenc`
//! (NVIDIA's hardware encoder) and then `libx264` on the CPU. Both are configured for the
//! lowest latency they offer: no B-frames, no look-ahead, no frame queue, one frame of
//! VBV, constrained-baseline profile so every browser decodes the stream. Which encoder
//! was chosen, and why the others were not, is reported to the caller for logging.

use ffmpeg::{Dictionary, Rational, codec, color, format::Pixel, frame, picture};
use ffmpeg_next as ffmpeg;
use thiserror::Error;

/// The H.264 profile-level-id the stream is announced with in SDP: constrained baseline,
/// level 3.1 (browsers accept higher levels with `level-asymmetry-allowed=1`).
pub const PROFILE_LEVEL_ID: u32 = 0x42e01f;

/// Encoder failures.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// No encoder could be opened; lists what was tried and why each failed.
    #[error("no H.264 encoder could be opened: {0}")]
    NoEncoder(String),
    /// FFmpeg failed while encoding.
    #[error("encoding failed: {0}")]
    Ffmpeg(#[from] ffmpeg::Error),
    /// The NV12 input has the wrong size.
    #[error("NV12 input is {got} bytes, expected {expected}")]
    BadInput {
        /// Bytes given.
        got: usize,
        /// Bytes expected.
        expected: usize,
    },
}

/// Which encoders to try, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncoderChoice {
    /// Probe `h264_nvenc`, fall back to `libx264`.
    Auto,
    /// Only `h264_nvenc`.
    Nvenc,
    /// Only `libx264`.
    X264,
}

/// Encoder settings.
#[derive(Debug, Clone)]
pub struct EncoderConfig {
    /// Picture width.
    pub width: u32,
    /// Picture height.
    pub height: u32,
    /// Frame rate.
    pub fps: u32,
    /// Target bitrate in bits per second.
    pub bitrate: u64,
    /// A keyframe at least every this many frames (0: only on request).
    pub keyframe_interval: u32,
    /// Encoders to try.
    pub choice: EncoderChoice,
}

/// One encoded access unit.
#[derive(Debug, Clone)]
pub struct EncodedFrame {
    /// Annex B bytes (start codes, SPS/PPS in-band before keyframes).
    pub data: Vec<u8>,
    /// Presentation timestamp in frames.
    pub pts: i64,
    /// Whether this is an IDR frame.
    pub keyframe: bool,
}

/// An opened H.264 encoder.
pub struct VideoEncoder {
    encoder: ffmpeg::encoder::Video,
    packet: ffmpeg::Packet,
    name: &'static str,
    probe_log: Vec<String>,
    config: EncoderConfig,
}

impl std::fmt::Debug for VideoEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VideoEncoder").field("name", &self.name).field("config", &self.config).finish()
    }
}

fn options(name: &str, config: &EncoderConfig) -> Dictionary<'static> {
    let mut o = Dictionary::new();
    // One frame of VBV: a frame never takes more than one frame interval to send.
    let per_frame = (config.bitrate / u64::from(config.fps.max(1))).max(1);
    match name {
        n if n.ends_with("_nvenc") => {
            o.set("preset", "p1");
            o.set("tune", "ull");
            o.set("zerolatency", "1");
            o.set("delay", "0");
            o.set("rc-lookahead", "0");
            o.set("rc", "cbr");
            if n == "h264_nvenc" {
                o.set("profile", "baseline");
            }
            o.set("forced-idr", "1");
            o.set("bufsize", &per_frame.to_string());
        }
        _ => {
            // rc_buffer_size too: FFmpeg re-applies it (and the max rate) to x264 on every frame.
            o.set("bufsize", &per_frame.to_string());
            o.set("preset", "ultrafast");
            o.set("tune", "zerolatency");
            o.set("profile", "baseline");
            o.set("forced-idr", "1");
            o.set(
                "x264-params",
                &format!(
                    "vbv-maxrate={0}:vbv-bufsize={1}:rc-lookahead=0:sync-lookahead=0:bframes=0",
                    config.bitrate / 1000,
                    (per_frame / 1000).max(1)
                ),
            );
        }
    }
    o.set("bf", "0");
    o
}

impl VideoEncoder {
    /// Opens the first encoder of `config.choice` that works.
    pub fn open(config: &EncoderConfig) -> Result<Self, EncodeError> {
        ffmpeg::init().map_err(|e| EncodeError::NoEncoder(format!("FFmpeg failed to initialise: {e}")))?;
        let candidates: &[&'static str] = match config.choice {
            EncoderChoice::Auto => &["h264_nvenc", "libx264"],
            EncoderChoice::Nvenc => &["h264_nvenc"],
            EncoderChoice::X264 => &["libx264"],
        };
        let mut probe_log = Vec::new();
        for &name in candidates {
            match Self::try_open(name, config) {
                Ok(encoder) => {
                    probe_log.push(format!("{name}: opened"));
                    return Ok(Self {
                        encoder,
                        packet: ffmpeg::Packet::empty(),
                        name,
                        probe_log,
                        config: config.clone(),
                    });
                }
                Err(why) => probe_log.push(format!("{name}: {why}")),
            }
        }
        Err(EncodeError::NoEncoder(probe_log.join("; ")))
    }

    /// The encoders that actually open on this machine (a GPU without NVENC, such as an
    /// H100, lists only the CPU ones), probed at a small size: what a node advertises.
    pub fn available(config: &EncoderConfig) -> Vec<String> {
        if ffmpeg::init().is_err() {
            return Vec::new();
        }
        let small = EncoderConfig { width: 320, height: 180, ..config.clone() };
        ["h264_nvenc", "hevc_nvenc", "av1_nvenc", "libx264"]
            .into_iter()
            .filter(|name| Self::try_open(name, &small).is_ok())
            .map(str::to_string)
            .collect()
    }

    fn try_open(name: &str, config: &EncoderConfig) -> Result<ffmpeg::encoder::Video, String> {
        let codec = ffmpeg::encoder::find_by_name(name).ok_or("not built into this FFmpeg")?;
        let mut enc = codec::context::Context::new_with_codec(codec)
            .encoder()
            .video()
            .map_err(|e| format!("not a video encoder: {e}"))?;
        enc.set_width(config.width);
        enc.set_height(config.height);
        enc.set_format(Pixel::NV12);
        enc.set_time_base(Rational(1, config.fps as i32));
        enc.set_frame_rate(Some(Rational(config.fps as i32, 1)));
        enc.set_bit_rate(config.bitrate as usize);
        enc.set_max_bit_rate(config.bitrate as usize);
        enc.set_gop(if config.keyframe_interval == 0 { u32::MAX >> 1 } else { config.keyframe_interval });
        enc.set_max_b_frames(0);
        enc.set_colorspace(color::Space::BT709);
        enc.set_color_range(color::Range::MPEG);
        enc.open_with(options(name, config))
            .map_err(|e| format!("failed to open ({e}): no usable device, driver or setting"))
    }

    /// The target bitrate, bit/s.
    pub fn bitrate(&self) -> u64 {
        self.config.bitrate
    }

    /// Changes the target (and maximum) bitrate from the next frame on, without a keyframe:
    /// both libx264 and NVENC reconfigure their rate control when these change. The VBV
    /// buffer stays one frame of the starting rate.
    pub fn set_bitrate(&mut self, bps: u64) {
        let bps = bps.max(1);
        self.encoder.set_bit_rate(bps as usize);
        self.encoder.set_max_bit_rate(bps as usize);
        self.config.bitrate = bps;
    }

    /// The encoder in use (`h264_nvenc` or `libx264`).
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// What was tried and with what result, for the log.
    pub fn probe_log(&self) -> &[String] {
        &self.probe_log
    }

    /// Encodes `frame` (from [`Self::new_input_frame`]) as frame number `pts`, as a
    /// keyframe if `keyframe`. Returns the access unit, or `None` if the encoder produced
    /// nothing for this frame. The encoders are configured without delay, so the access
    /// unit of a frame comes out of the call that takes it in.
    pub fn encode(
        &mut self,
        frame: &mut frame::Video,
        pts: i64,
        keyframe: bool,
    ) -> Result<Option<EncodedFrame>, EncodeError> {
        frame.set_pts(Some(pts));
        frame.set_kind(if keyframe { picture::Type::I } else { picture::Type::None });
        self.encoder.send_frame(frame)?;
        let mut out: Option<EncodedFrame> = None;
        loop {
            match self.encoder.receive_packet(&mut self.packet) {
                Ok(()) => {
                    let data = self.packet.data().unwrap_or_default();
                    let key = self.packet.is_key();
                    match &mut out {
                        Some(f) => {
                            f.data.extend_from_slice(data);
                            f.keyframe |= key;
                        }
                        None => {
                            out = Some(EncodedFrame {
                                data: data.to_vec(),
                                pts: self.packet.pts().unwrap_or(pts),
                                keyframe: key,
                            })
                        }
                    }
                }
                Err(ffmpeg::Error::Other { errno }) if errno == ffmpeg::util::error::EAGAIN => break,
                Err(ffmpeg::Error::Eof) => break,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(out)
    }

    /// The settings the encoder was opened with.
    pub fn config(&self) -> &EncoderConfig {
        &self.config
    }

    /// A frame in the encoder's input format (NV12, BT.709 limited range) to fill with
    /// [`load_nv12`] and pass to [`Self::encode`].
    pub fn new_input_frame(&self) -> frame::Video {
        let mut frame = frame::Video::new(Pixel::NV12, self.config.width, self.config.height);
        frame.set_color_space(color::Space::BT709);
        frame.set_color_range(color::Range::MPEG);
        frame
    }
}

/// Copies a tightly packed NV12 picture (pitch = width) into `frame`, whose planes may
/// have wider strides.
pub fn load_nv12(frame: &mut frame::Video, nv12: &[u8]) -> Result<(), EncodeError> {
    let (w, h) = (frame.width() as usize, frame.height() as usize);
    let expected = w * h * 3 / 2;
    if nv12.len() < expected {
        return Err(EncodeError::BadInput { got: nv12.len(), expected });
    }
    let (luma, chroma) = nv12.split_at(w * h);
    for (plane, src, rows) in [(0, luma, h), (1, chroma, h / 2)] {
        let stride = frame.stride(plane);
        let dst = frame.data_mut(plane);
        if stride == w {
            if let (Some(d), Some(s)) = (dst.get_mut(..w * rows), src.get(..w * rows)) {
                d.copy_from_slice(s);
            }
        } else {
            for (d, s) in dst.chunks_mut(stride).zip(src.chunks(w)).take(rows) {
                if let Some(d) = d.get_mut(..w) {
                    d.copy_from_slice(s);
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> EncoderConfig {
        EncoderConfig {
            width: 320,
            height: 240,
            fps: 30,
            bitrate: 1_000_000,
            keyframe_interval: 0,
            choice: EncoderChoice::X264,
        }
    }

    #[test]
    fn x264_encodes_every_frame_without_delay_and_keyframes_on_demand() {
        let mut enc = VideoEncoder::open(&config()).unwrap();
        assert_eq!(enc.name(), "libx264");
        let mut picture = vec![16u8; 320 * 240 * 3 / 2];
        let mut frame = enc.new_input_frame();
        for pts in 0..10i64 {
            for (i, b) in picture.iter_mut().enumerate().take(320 * 240) {
                *b = ((i as i64 + pts * 7) % 200) as u8 + 16;
            }
            load_nv12(&mut frame, &picture).unwrap();
            let key = pts == 0 || pts == 6;
            let f = enc.encode(&mut frame, pts, key).unwrap().expect("zero-latency: one access unit per frame");
            assert_eq!(f.pts, pts);
            assert_eq!(f.keyframe, key, "frame {pts}");
            assert_eq!(pylon_proto::h264::is_keyframe(&f.data), key);
            if key {
                // SPS and PPS travel in-band before every IDR.
                let types: Vec<u8> = pylon_proto::h264::split_annex_b(&f.data).map(|n| n[0] & 0x1f).collect();
                assert!(types.contains(&7) && types.contains(&8), "{types:?}");
            }
        }
    }

    #[test]
    fn short_input_is_an_error() {
        let enc = VideoEncoder::open(&config()).unwrap();
        let mut frame = enc.new_input_frame();
        assert!(matches!(load_nv12(&mut frame, &[0; 10]), Err(EncodeError::BadInput { .. })));
    }

    #[test]
    fn nvenc_is_probed_and_its_absence_explained() {
        match VideoEncoder::open(&EncoderConfig { choice: EncoderChoice::Auto, ..config() }) {
            Ok(enc) => {
                assert!(!enc.probe_log().is_empty());
                if enc.name() == "libx264" {
                    assert!(enc.probe_log()[0].starts_with("h264_nvenc: "), "{:?}", enc.probe_log());
                }
            }
            Err(e) => panic!("{e}"),
        }
    }
}
