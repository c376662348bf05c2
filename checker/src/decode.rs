//! H.264 decoding with FFmpeg's decoder (through `ffmpeg-next`): the checker sees the
//! pixels a player would.

use ffmpeg_next as ffmpeg;

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("FFmpeg has no H.264 decoder (install libavcodec with h264)")]
    NoDecoder,
    #[error("FFmpeg: {0}")]
    Ffmpeg(#[from] ffmpeg::Error),
}

/// A decoded picture: its size and its luma plane (row by row, `width` bytes each).
#[derive(Debug, Clone)]
pub struct Picture {
    pub width: u32,
    pub height: u32,
    pub luma: Vec<u8>,
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
            let (width, height) = (self.frame.width(), self.frame.height());
            let stride = self.frame.stride(0);
            let data = self.frame.data(0);
            let mut luma = Vec::with_capacity((width * height) as usize);
            for row in 0..height as usize {
                luma.extend_from_slice(&data[row * stride..row * stride + width as usize]);
            }
            out = Some(Picture { width, height, luma });
        }
        Ok(out)
    }
}
