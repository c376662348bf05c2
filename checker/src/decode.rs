//! H.264 decoding with FFmpeg's decoder (through `ffmpeg-next`): the checker sees the
//! pixels a player would.

use ffmpeg_next as ffmpeg;

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("FFmpeg has no H.264 decoder (install libavcodec with h264)")]
    NoDecoder,
    #[error("the decoder produced {0:?}, not 4:2:0")]
    Format(ffmpeg::format::Pixel),
    #[error("FFmpeg: {0}")]
    Ffmpeg(#[from] ffmpeg::Error),
}

/// A decoded picture (4:2:0): its size and its planes, row by row without padding.
#[derive(Debug, Clone)]
pub struct Picture {
    pub width: u32,
    pub height: u32,
    /// Luma, `width` × `height`.
    pub luma: Vec<u8>,
    /// Chroma (Cb, Cr), each `(width + 1) / 2` × `(height + 1) / 2`.
    pub cb: Vec<u8>,
    pub cr: Vec<u8>,
}

impl Picture {
    pub fn y_at(&self, x: u32, y: u32) -> u8 {
        self.luma[(y * self.width + x) as usize]
    }
    pub fn u_at(&self, x: u32, y: u32) -> u8 {
        self.cb[((y / 2) * self.width.div_ceil(2) + x / 2) as usize]
    }
    pub fn v_at(&self, x: u32, y: u32) -> u8 {
        self.cr[((y / 2) * self.width.div_ceil(2) + x / 2) as usize]
    }
}

/// A plane's rows copied without the decoder's padding.
fn plane(frame: &ffmpeg::frame::Video, index: usize, width: u32, height: u32) -> Vec<u8> {
    let (stride, data) = (frame.stride(index), frame.data(index));
    let mut out = Vec::with_capacity((width * height) as usize);
    for row in 0..height as usize {
        out.extend_from_slice(&data[row * stride..row * stride + width as usize]);
    }
    out
}

/// One H.264 decoder, fed Annex B access units, one frame out per frame in (low delay).
pub struct H264Decoder {
    decoder: ffmpeg::decoder::Video,
    frame: ffmpeg::frame::Video,
}

impl std::fmt::Debug for H264Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H264Decoder").finish_non_exhaustive()
    }
}

impl H264Decoder {
    pub fn new() -> Result<Self, DecodeError> {
        ffmpeg::init()?;
        let codec = ffmpeg::decoder::find(ffmpeg::codec::Id::H264).ok_or(DecodeError::NoDecoder)?;
        let mut context = ffmpeg::codec::Context::new_with_codec(codec);
        context.set_flags(ffmpeg::codec::Flags::LOW_DELAY);
        let decoder = context.decoder().video()?;
        Ok(Self { decoder, frame: ffmpeg::frame::Video::empty() })
    }

    /// Decodes one access unit (Annex B); `Ok(None)` while the decoder waits for a keyframe
    /// or more data. A corrupt unit is an error the caller answers with a keyframe request.
    pub fn decode(&mut self, access_unit: &[u8]) -> Result<Option<Picture>, DecodeError> {
        self.decoder.send_packet(&ffmpeg::Packet::copy(access_unit))?;
        let mut out = None;
        while self.decoder.receive_frame(&mut self.frame).is_ok() {
            let format = self.frame.format();
            if !matches!(format, ffmpeg::format::Pixel::YUV420P | ffmpeg::format::Pixel::YUVJ420P) {
                return Err(DecodeError::Format(format));
            }
            let (width, height) = (self.frame.width(), self.frame.height());
            let (cw, ch) = (width.div_ceil(2), height.div_ceil(2));
            out = Some(Picture {
                width,
                height,
                luma: plane(&self.frame, 0, width, height),
                cb: plane(&self.frame, 1, cw, ch),
                cr: plane(&self.frame, 2, cw, ch),
            });
        }
        Ok(out)
    }
}
