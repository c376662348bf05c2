//! The RTP fixed header (RFC 3550 §5.1).

use thiserror::Error;

/// Size of the RTP fixed header without CSRCs or extensions.
pub const HEADER_LEN: usize = 12;

/// Why an RTP packet could not be parsed.
#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum RtpError {
    /// Fewer bytes than the header says there are.
    #[error("RTP packet truncated: {len} bytes, header needs {needed}")]
    Truncated {
        /// Bytes present.
        len: usize,
        /// Bytes the header requires.
        needed: usize,
    },
    /// The version field is not 2.
    #[error("RTP version {0} is not 2")]
    BadVersion(u8),
    /// The padding count exceeds the payload.
    #[error("RTP padding of {0} bytes exceeds the payload")]
    BadPadding(u8),
}

/// The fields of an RTP header that Pylon uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtpHeader {
    /// Marker bit: for video, the last packet of a frame.
    pub marker: bool,
    /// Payload type.
    pub payload_type: u8,
    /// Sequence number.
    pub sequence: u16,
    /// Media timestamp (90 kHz for video).
    pub timestamp: u32,
    /// Synchronisation source.
    pub ssrc: u32,
}

impl RtpHeader {
    /// Writes the 12-byte fixed header (no CSRCs, no extension, no padding) into `out`.
    pub fn write(&self, out: &mut Vec<u8>) {
        out.push(0x80);
        out.push((u8::from(self.marker) << 7) | (self.payload_type & 0x7f));
        out.extend_from_slice(&self.sequence.to_be_bytes());
        out.extend_from_slice(&self.timestamp.to_be_bytes());
        out.extend_from_slice(&self.ssrc.to_be_bytes());
    }
}

/// A parsed RTP packet borrowing its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtpPacket<'a> {
    /// The header fields.
    pub header: RtpHeader,
    /// The payload, with CSRCs, header extension and padding removed.
    pub payload: &'a [u8],
}

fn get(buf: &[u8], range: std::ops::Range<usize>) -> Result<&[u8], RtpError> {
    let needed = range.end;
    buf.get(range).ok_or(RtpError::Truncated { len: buf.len(), needed })
}

fn array<const N: usize>(buf: &[u8], at: usize) -> Result<[u8; N], RtpError> {
    get(buf, at..at + N)?.try_into().map_err(|_| RtpError::Truncated { len: buf.len(), needed: at + N })
}

impl<'a> RtpPacket<'a> {
    /// Parses an RTP packet. Header extensions and CSRCs are skipped, padding is removed.
    pub fn parse(buf: &'a [u8]) -> Result<Self, RtpError> {
        let fixed: [u8; HEADER_LEN] = array(buf, 0)?;
        let b0 = fixed[0];
        let version = b0 >> 6;
        if version != 2 {
            return Err(RtpError::BadVersion(version));
        }
        let padding = b0 & 0x20 != 0;
        let extension = b0 & 0x10 != 0;
        let csrc_count = usize::from(b0 & 0x0f);
        let header = RtpHeader {
            marker: fixed[1] & 0x80 != 0,
            payload_type: fixed[1] & 0x7f,
            sequence: u16::from_be_bytes([fixed[2], fixed[3]]),
            timestamp: u32::from_be_bytes([fixed[4], fixed[5], fixed[6], fixed[7]]),
            ssrc: u32::from_be_bytes([fixed[8], fixed[9], fixed[10], fixed[11]]),
        };
        let mut start = HEADER_LEN + 4 * csrc_count;
        get(buf, 0..start)?;
        if extension {
            let ext: [u8; 4] = array(buf, start)?;
            let words = usize::from(u16::from_be_bytes([ext[2], ext[3]]));
            start += 4 + 4 * words;
            get(buf, 0..start)?;
        }
        let mut end = buf.len();
        if padding {
            let pad = buf.last().copied().unwrap_or(0);
            if pad == 0 || usize::from(pad) > end - start {
                return Err(RtpError::BadPadding(pad));
            }
            end -= usize::from(pad);
        }
        let payload = get(buf, start..end)?;
        Ok(Self { header, payload })
    }
}

/// Unwraps a 16-bit RTP sequence number into a 64-bit one: the candidate nearest to
/// `highest`, the largest extended number seen so far (`None` before the first packet).
pub fn extend_sequence(highest: Option<u64>, seq: u16) -> u64 {
    match highest {
        None => u64::from(seq) + (1 << 16),
        Some(last) => {
            let base = (last & !0xffff) | u64::from(seq);
            [base.wrapping_sub(1 << 16), base, base + (1 << 16)]
                .into_iter()
                .min_by_key(|c| c.abs_diff(last))
                .unwrap_or(base)
        }
    }
}

/// Largest redundant block RFC 2198 can describe (10-bit length).
pub const RED_MAX_BLOCK: usize = 1023;
/// Largest timestamp offset of a redundant block (14 bits).
pub const RED_MAX_OFFSET: u32 = 0x3fff;

/// Writes an RFC 2198 redundant-audio payload into `out`: the `previous` block (its
/// timestamp offset back from the primary, and its bytes), when it fits, then the
/// `primary` block, both of payload type `pt`.
pub fn red_payload(pt: u8, previous: Option<(u32, &[u8])>, primary: &[u8], out: &mut Vec<u8>) {
    out.clear();
    let previous = previous.filter(|(offset, b)| *offset <= RED_MAX_OFFSET && b.len() <= RED_MAX_BLOCK);
    if let Some((offset, block)) = previous {
        let header = (1u32 << 31) | (u32::from(pt & 0x7f) << 24) | (offset << 10) | block.len() as u32;
        out.extend_from_slice(&header.to_be_bytes());
    }
    out.push(pt & 0x7f);
    if let Some((_, block)) = previous {
        out.extend_from_slice(block);
    }
    out.extend_from_slice(primary);
}

/// The primary block of an RFC 2198 payload: its payload type and bytes. `None` when the
/// headers run past the payload.
pub fn red_primary(payload: &[u8]) -> Option<(u8, &[u8])> {
    let mut at = 0;
    let mut redundant = 0usize;
    loop {
        let first = *payload.get(at)?;
        if first & 0x80 == 0 {
            let start = at + 1 + redundant;
            return Some((first & 0x7f, payload.get(start..)?));
        }
        let (b2, b3) = (*payload.get(at + 2)?, *payload.get(at + 3)?);
        redundant += (usize::from(b2 & 0x03) << 8) | usize::from(b3);
        at += 4;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_numbers_extend_across_the_wrap_and_back() {
        let first = extend_sequence(None, 65_535);
        assert_eq!(extend_sequence(Some(first), 0), first + 1, "forward across the wrap");
        assert_eq!(extend_sequence(Some(first + 1), 65_534), first - 1, "a late packet from before it");
        assert_eq!(extend_sequence(Some(first), 65_535), first, "a duplicate");
    }

    #[test]
    fn round_trip() {
        let h = RtpHeader { marker: true, payload_type: 102, sequence: 65535, timestamp: 0xdead_beef, ssrc: 42 };
        let mut buf = Vec::new();
        h.write(&mut buf);
        buf.extend_from_slice(b"payload");
        let p = RtpPacket::parse(&buf).unwrap();
        assert_eq!(p.header, h);
        assert_eq!(p.payload, b"payload");
    }

    #[test]
    fn extension_csrc_and_padding_are_skipped() {
        let mut buf = vec![0xb1, 96, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3];
        buf.extend_from_slice(&[9, 9, 9, 9]); // one CSRC
        buf.extend_from_slice(&[0xbe, 0xde, 0, 1, 1, 2, 3, 4]); // one-word extension
        buf.extend_from_slice(b"abc");
        buf.extend_from_slice(&[0, 2]); // two bytes of padding
        let p = RtpPacket::parse(&buf).unwrap();
        assert_eq!(p.payload, b"abc");
    }

    #[test]
    fn bad_version_and_padding_are_errors() {
        let mut buf = vec![0x40; 12];
        assert_eq!(RtpPacket::parse(&buf), Err(RtpError::BadVersion(1)));
        buf[0] = 0xa0;
        buf.push(200);
        assert_eq!(RtpPacket::parse(&buf), Err(RtpError::BadPadding(200)));
    }

    #[test]
    fn length_sweep_never_panics() {
        for first in [0x80u8, 0x90, 0xa0, 0xbf, 0xff] {
            for len in 0..1500 {
                let mut buf = vec![0xffu8; len];
                if let Some(b) = buf.first_mut() {
                    *b = first;
                }
                let _ = RtpPacket::parse(&buf);
            }
        }
    }

    #[test]
    fn red_payloads_carry_the_previous_frame_and_parse_back() {
        let mut out = Vec::new();
        red_payload(111, Some((480, &[1, 2, 3])), &[9, 9], &mut out);
        assert_eq!(out, vec![0x80 | 111, (480 >> 6) as u8, (((480 & 0x3f) << 2) as u8), 3, 111, 1, 2, 3, 9, 9]);
        assert_eq!(red_primary(&out), Some((111, &[9u8, 9][..])));
        // No previous frame (or one too old to describe): the primary alone.
        red_payload(111, Some((RED_MAX_OFFSET + 1, &[1])), &[7], &mut out);
        assert_eq!(out, vec![111, 7]);
        red_payload(111, None, &[7], &mut out);
        assert_eq!(red_primary(&out), Some((111, &[7u8][..])));
        // Truncated or lying headers are refused, never a panic.
        for bad in [&[][..], &[0x80, 0, 0], &[0xef, 0, 0x03, 0xff, 111]] {
            assert_eq!(red_primary(bad), None, "{bad:?}");
        }
    }
}
