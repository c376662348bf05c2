//! H.264 over RTP, packetization mode 1 (RFC 6184): single NAL unit packets, STAP-A for
//! runs of small NAL units (SPS, PPS, SEI) and FU-A fragments for NAL units larger than
//! the packet budget.

use crate::rtp::{HEADER_LEN, RtpHeader};

/// NAL unit type of an access unit delimiter, which carries nothing a receiver needs.
const NAL_AUD: u8 = 9;
/// NAL unit type of an aggregation packet (STAP-A).
const NAL_STAP_A: u8 = 24;
/// NAL unit type of a fragmentation unit (FU-A).
const NAL_FU_A: u8 = 28;
/// NAL unit type of an IDR slice.
const NAL_IDR: u8 = 5;

/// Splits an Annex B byte stream (NAL units separated by `00 00 01` or `00 00 00 01`
/// start codes) into NAL units without their start codes. Bytes before the first start
/// code are ignored; empty NAL units are skipped.
pub fn split_annex_b(stream: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut starts = Vec::new();
    let mut i = 0;
    while i + 3 <= stream.len() {
        if stream.get(i..i + 3) == Some(&[0, 0, 1]) {
            starts.push((i, i + 3));
            i += 3;
        } else {
            i += 1;
        }
    }
    let mut nals = Vec::with_capacity(starts.len());
    for (n, &(_, body)) in starts.iter().enumerate() {
        let mut end = starts.get(n + 1).map_or(stream.len(), |&(sc, _)| sc);
        // A four-byte start code leaves a zero byte at the end of the previous unit, and
        // trailing_zero_8bits may follow a unit: neither belongs to the NAL unit.
        while end > body && stream.get(end - 1) == Some(&0) {
            end -= 1;
        }
        if let Some(nal) = stream.get(body..end)
            && !nal.is_empty()
        {
            nals.push(nal);
        }
    }
    nals.into_iter()
}

/// Whether an Annex B access unit contains an IDR slice (a keyframe).
pub fn is_keyframe(access_unit: &[u8]) -> bool {
    split_annex_b(access_unit).any(|nal| nal.first().is_some_and(|b| b & 0x1f == NAL_IDR))
}

/// Turns encoded access units into RTP packets for one stream.
#[derive(Debug, Clone)]
pub struct H264Packetizer {
    max_packet: usize,
    payload_type: u8,
    ssrc: u32,
    sequence: u16,
}

impl H264Packetizer {
    /// Smallest packet budget accepted: the RTP header, an FU indicator and header and
    /// at least one byte of fragment.
    pub const MIN_PACKET: usize = HEADER_LEN + 3;

    /// A packetizer whose packets (RTP header included) are at most `max_packet` bytes.
    /// `max_packet` is raised to [`Self::MIN_PACKET`] if smaller.
    pub fn new(max_packet: usize, payload_type: u8, ssrc: u32, first_sequence: u16) -> Self {
        Self { max_packet: max_packet.max(Self::MIN_PACKET), payload_type, ssrc, sequence: first_sequence }
    }

    /// The sequence number the next packet will carry.
    pub fn next_sequence(&self) -> u16 {
        self.sequence
    }

    /// Packetizes one access unit (Annex B) with RTP timestamp `timestamp`, calling `emit`
    /// with each complete RTP packet in order. The last packet carries the marker bit.
    /// Returns the number of packets emitted.
    pub fn packetize(&mut self, access_unit: &[u8], timestamp: u32, mut emit: impl FnMut(&[u8])) -> usize {
        let nals: Vec<&[u8]> =
            split_annex_b(access_unit).filter(|n| n.first().is_some_and(|b| b & 0x1f != NAL_AUD)).collect();
        let budget = self.max_packet - HEADER_LEN;
        // Plan the packets first so that the marker bit can be set on the last one.
        let mut plan: Vec<Packet<'_>> = Vec::new();
        let mut i = 0;
        while let Some(&nal) = nals.get(i) {
            // STAP-A: aggregate this unit with following ones while they fit together.
            let mut size = 1 + 2 + nal.len();
            let mut j = i + 1;
            while let Some(next) = nals.get(j) {
                if size + 2 + next.len() > budget {
                    break;
                }
                size += 2 + next.len();
                j += 1;
            }
            if j > i + 1 {
                plan.push(Packet::Stap(nals.get(i..j).unwrap_or_default()));
                i = j;
            } else if nal.len() <= budget {
                plan.push(Packet::Single(nal));
                i += 1;
            } else {
                let (hdr, body) = nal.split_first().unwrap_or((&0, &[]));
                let chunk = budget - 2;
                let count = body.len().div_ceil(chunk);
                for (k, part) in body.chunks(chunk).enumerate() {
                    plan.push(Packet::Fragment { header: *hdr, part, first: k == 0, last: k + 1 == count });
                }
                i += 1;
            }
        }
        let mut buf = Vec::with_capacity(self.max_packet);
        let total = plan.len();
        for (n, packet) in plan.into_iter().enumerate() {
            buf.clear();
            RtpHeader {
                marker: n + 1 == total,
                payload_type: self.payload_type,
                sequence: self.sequence,
                timestamp,
                ssrc: self.ssrc,
            }
            .write(&mut buf);
            packet.write(&mut buf);
            self.sequence = self.sequence.wrapping_add(1);
            emit(&buf);
        }
        total
    }
}

enum Packet<'a> {
    Single(&'a [u8]),
    Stap(&'a [&'a [u8]]),
    Fragment { header: u8, part: &'a [u8], first: bool, last: bool },
}

impl Packet<'_> {
    fn write(&self, out: &mut Vec<u8>) {
        match self {
            Packet::Single(nal) => out.extend_from_slice(nal),
            Packet::Stap(nals) => {
                // F is the OR of the aggregated units' F bits, NRI their maximum.
                let f = nals.iter().filter_map(|n| n.first()).fold(0, |acc, b| acc | (b & 0x80));
                let nri = nals.iter().filter_map(|n| n.first()).map(|b| b & 0x60).max().unwrap_or(0);
                out.push(f | nri | NAL_STAP_A);
                for nal in nals.iter() {
                    // A unit that fits in one packet is far below 64 KiB.
                    let len = u16::try_from(nal.len()).unwrap_or(u16::MAX);
                    out.extend_from_slice(&len.to_be_bytes());
                    out.extend_from_slice(nal);
                }
            }
            Packet::Fragment { header, part, first, last } => {
                out.push((header & 0xe0) | NAL_FU_A);
                out.push((u8::from(*first) << 7) | (u8::from(*last) << 6) | (header & 0x1f));
                out.extend_from_slice(part);
            }
        }
    }
}

/// Reassembles the NAL units of one access unit from its RTP payloads (the inverse of
/// [`H264Packetizer`]); used by tests and by receivers that need to inspect frames.
#[derive(Debug, Default)]
pub struct H264Depacketizer {
    nals: Vec<Vec<u8>>,
    fragment: Option<Vec<u8>>,
}

/// Why an RTP payload could not be depacketized.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum DepacketizeError {
    /// The payload is empty or a length field runs past its end.
    #[error("H.264 RTP payload truncated")]
    Truncated,
    /// A packet type that mode 1 does not allow (STAP-B, MTAP, FU-B) or a reserved one.
    #[error("unsupported H.264 RTP packet type {0}")]
    Unsupported(u8),
    /// A middle or last fragment arrived without its first fragment.
    #[error("FU-A fragment without a start")]
    OrphanFragment,
}

impl H264Depacketizer {
    /// Feeds one RTP payload.
    pub fn push(&mut self, payload: &[u8]) -> Result<(), DepacketizeError> {
        let (&first, rest) = payload.split_first().ok_or(DepacketizeError::Truncated)?;
        match first & 0x1f {
            1..=23 => self.nals.push(payload.to_vec()),
            NAL_STAP_A => {
                let mut rest = rest;
                while !rest.is_empty() {
                    let (len, tail) = rest.split_at_checked(2).ok_or(DepacketizeError::Truncated)?;
                    let len = usize::from(u16::from_be_bytes([
                        len.first().copied().unwrap_or(0),
                        len.get(1).copied().unwrap_or(0),
                    ]));
                    let (nal, tail) = tail.split_at_checked(len).ok_or(DepacketizeError::Truncated)?;
                    self.nals.push(nal.to_vec());
                    rest = tail;
                }
            }
            NAL_FU_A => {
                let (&fu, part) = rest.split_first().ok_or(DepacketizeError::Truncated)?;
                if fu & 0x80 != 0 {
                    let mut nal = vec![(first & 0xe0) | (fu & 0x1f)];
                    nal.extend_from_slice(part);
                    self.fragment = Some(nal);
                } else {
                    let nal = self.fragment.as_mut().ok_or(DepacketizeError::OrphanFragment)?;
                    nal.extend_from_slice(part);
                }
                if fu & 0x40 != 0 {
                    let nal = self.fragment.take().ok_or(DepacketizeError::OrphanFragment)?;
                    self.nals.push(nal);
                }
            }
            other => return Err(DepacketizeError::Unsupported(other)),
        }
        Ok(())
    }

    /// Takes the NAL units gathered so far, as an Annex B stream.
    pub fn take_annex_b(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        for nal in self.nals.drain(..) {
            out.extend_from_slice(&[0, 0, 0, 1]);
            out.extend_from_slice(&nal);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rtp::RtpPacket;

    fn au(nals: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        for n in nals {
            out.extend_from_slice(&[0, 0, 0, 1]);
            out.extend_from_slice(n);
        }
        out
    }

    fn nal(kind: u8, len: usize) -> Vec<u8> {
        let mut v = vec![0x60 | kind];
        v.extend((1..len).map(|i| (i % 251) as u8 | 1));
        v
    }

    fn packetize_all(p: &mut H264Packetizer, au: &[u8], ts: u32) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        p.packetize(au, ts, |pkt| out.push(pkt.to_vec()));
        out
    }

    #[test]
    fn splits_three_and_four_byte_start_codes() {
        let stream = [0, 0, 0, 1, 0x67, 1, 2, 0, 0, 1, 0x68, 3, 0, 0, 0, 1, 0x65, 4, 5];
        let nals: Vec<_> = split_annex_b(&stream).collect();
        assert_eq!(nals, vec![&[0x67, 1, 2][..], &[0x68, 3][..], &[0x65, 4, 5][..]]);
        assert!(is_keyframe(&stream));
        assert!(!is_keyframe(&[0, 0, 1, 0x41, 9]));
    }

    #[test]
    fn small_units_aggregate_and_large_units_fragment_at_the_budget() {
        let sps = nal(7, 20);
        let pps = nal(8, 6);
        let idr = nal(5, 5000);
        let mut p = H264Packetizer::new(1200, 102, 7, 65534);
        let pkts = packetize_all(&mut p, &au(&[sps.clone(), pps.clone(), idr.clone()]), 9000);
        // STAP-A (sps+pps) then ceil(4999 / 1186) = 5 fragments.
        assert_eq!(pkts.len(), 6);
        for (i, pkt) in pkts.iter().enumerate() {
            assert!(pkt.len() <= 1200, "packet {i} is {} bytes", pkt.len());
            let parsed = RtpPacket::parse(pkt).unwrap();
            assert_eq!(parsed.header.timestamp, 9000);
            assert_eq!(parsed.header.ssrc, 7);
            assert_eq!(parsed.header.payload_type, 102);
            assert_eq!(parsed.header.marker, i == pkts.len() - 1, "marker only on the last packet");
            assert_eq!(parsed.header.sequence, 65534u16.wrapping_add(i as u16), "sequence wraps");
        }
        assert_eq!(pkts[0][12] & 0x1f, NAL_STAP_A);
        assert_eq!(pkts[1][12] & 0x1f, NAL_FU_A);
        assert_eq!(pkts[1][13], 0x80 | 5, "first fragment has S and the IDR type");
        assert_eq!(pkts[5][13], 0x40 | 5, "last fragment has E");
        assert_eq!(p.next_sequence(), 4);

        let mut d = H264Depacketizer::default();
        for pkt in &pkts {
            d.push(RtpPacket::parse(pkt).unwrap().payload).unwrap();
        }
        assert_eq!(d.take_annex_b(), au(&[sps, pps, idr]));
    }

    #[test]
    fn a_unit_that_fits_exactly_is_a_single_packet() {
        let mut p = H264Packetizer::new(100, 96, 1, 0);
        let pkts = packetize_all(&mut p, &au(&[nal(1, 88)]), 0);
        assert_eq!(pkts.len(), 1);
        assert_eq!(pkts[0].len(), 100);
        let pkts = packetize_all(&mut p, &au(&[nal(1, 89)]), 3000);
        assert_eq!(pkts.len(), 2);
        assert!(RtpPacket::parse(&pkts[1]).unwrap().header.marker);
    }

    #[test]
    fn access_unit_delimiters_are_dropped() {
        let mut p = H264Packetizer::new(1200, 96, 1, 0);
        let pkts = packetize_all(&mut p, &au(&[vec![0x09, 0xf0], nal(1, 50)]), 0);
        assert_eq!(pkts.len(), 1);
        assert_eq!(pkts[0][12], 0x61);
    }

    #[test]
    fn every_size_round_trips_at_several_budgets() {
        for budget in [H264Packetizer::MIN_PACKET, 64, 1200] {
            for len in (1..3000).step_by(37) {
                let mut p = H264Packetizer::new(budget, 96, 1, 0);
                let unit = au(&[nal(1, len)]);
                let pkts = packetize_all(&mut p, &unit, 0);
                let mut d = H264Depacketizer::default();
                for pkt in &pkts {
                    assert!(pkt.len() <= budget);
                    d.push(RtpPacket::parse(pkt).unwrap().payload).unwrap();
                }
                assert_eq!(d.take_annex_b(), unit, "len {len} budget {budget}");
            }
        }
    }

    #[test]
    fn hostile_streams_never_panic() {
        for len in 0..1500usize {
            let junk: Vec<u8> = (0..len).map(|i| [0u8, 0, 1, 0x7c, 0xff][i % 5]).collect();
            let mut p = H264Packetizer::new(200, 96, 1, 0);
            p.packetize(&junk, 0, |_| {});
            let mut d = H264Depacketizer::default();
            let _ = d.push(&junk);
        }
    }
}
