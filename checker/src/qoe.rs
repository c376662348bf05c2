//! The liveness and quality-of-experience check, without I/O: fed each decoded frame and
//! each received packet with an explicit `now`, it measures what a player would have seen
//! and judges it against what the node advertised.

use serde::Serialize;
use std::time::{Duration, Instant};

/// What the node claims to stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Advertised {
    /// Picture size, pixels.
    pub width: u32,
    pub height: u32,
    /// Frames per second.
    pub fps: u32,
}

/// How far the measured frame rate may stray from the advertised one (± 5 %).
pub const FPS_TOLERANCE: f64 = 0.05;

/// A freeze, as the W3C statistics define `freezeCount` and Chromium counts it: a gap
/// between two frames of at least the larger of [`FREEZE_INTERVALS`] average frame
/// durations and the average plus [`FREEZE_MARGIN`], the average taken over the last
/// [`FREEZE_WINDOW`] gaps (the advertised interval until there is one).
pub const FREEZE_INTERVALS: u32 = 3;
/// See [`FREEZE_INTERVALS`].
pub const FREEZE_MARGIN: Duration = Duration::from_millis(150);
/// See [`FREEZE_INTERVALS`].
pub const FREEZE_WINDOW: usize = 30;
/// The share of the watched time a stream may spend frozen (`totalFreezesDuration` over
/// the time watched) and still pass. A brief hitch, which a busy network or host gives any
/// stream now and then, does not fail a provider; a stream that keeps stopping does.
pub const FREEZE_BUDGET: f64 = 0.02;

/// Measures a stream from its first decoded frame.
#[derive(Debug)]
pub struct QoeMeter {
    advertised: Advertised,
    first: Option<Instant>,
    last: Option<Instant>,
    frames: u64,
    wrong_size: u64,
    freezes: u64,
    frozen: Duration,
    longest_gap: Duration,
    /// The last [`FREEZE_WINDOW`] gaps between frames.
    gaps: std::collections::VecDeque<Duration>,
    bytes: u64,
    bytes_since_first: u64,
    keyframes_asked: u64,
}

/// What the meter measured, and its verdict.
#[derive(Debug, Clone, Serialize)]
pub struct QoeReport {
    pub advertised: Advertised,
    /// Seconds from the first decoded frame to the last.
    pub seconds: f64,
    pub frames_decoded: u64,
    pub fps: f64,
    /// Frames whose size was not the advertised one.
    pub wrong_size: u64,
    pub freezes: u64,
    /// Time spent frozen: the freezes' gaps, summed (`totalFreezesDuration`), ms.
    pub frozen_ms: f64,
    pub longest_gap_ms: f64,
    pub bitrate_kbps: f64,
    /// Media bytes received (RTP payloads), all told.
    pub bytes: u64,
    /// Keyframes the checker asked for (PLI) because a frame could not be decoded.
    pub keyframes_asked: u64,
    /// Round-trip time to the relay (median of WebSocket pings on the signalling connection).
    pub rtt_ms: Option<f64>,
    /// Why the check failed; empty when it passed.
    pub failures: Vec<String>,
}

impl QoeReport {
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

impl QoeMeter {
    pub fn new(advertised: Advertised) -> Self {
        Self {
            advertised,
            first: None,
            last: None,
            frames: 0,
            wrong_size: 0,
            freezes: 0,
            frozen: Duration::ZERO,
            longest_gap: Duration::ZERO,
            gaps: std::collections::VecDeque::with_capacity(FREEZE_WINDOW),
            bytes: 0,
            bytes_since_first: 0,
            keyframes_asked: 0,
        }
    }

    /// A media packet's payload arrived.
    pub fn on_packet(&mut self, bytes: usize) {
        self.bytes += bytes as u64;
        if self.first.is_some() {
            self.bytes_since_first += bytes as u64;
        }
    }

    /// The checker asked for a keyframe.
    pub fn on_keyframe_request(&mut self) {
        self.keyframes_asked += 1;
    }

    /// A frame of `width` × `height` was decoded at `now`.
    pub fn on_frame(&mut self, now: Instant, width: u32, height: u32) {
        self.first.get_or_insert(now);
        if let Some(last) = self.last {
            let gap = now.saturating_duration_since(last);
            self.longest_gap = self.longest_gap.max(gap);
            if gap >= self.freeze_threshold() {
                self.freezes += 1;
                self.frozen += gap;
            }
            if self.gaps.len() == FREEZE_WINDOW {
                self.gaps.pop_front();
            }
            self.gaps.push_back(gap);
        }
        self.last = Some(now);
        self.frames += 1;
        if (width, height) != (self.advertised.width, self.advertised.height) {
            self.wrong_size += 1;
        }
    }

    /// The shortest gap that is a freeze now (see [`FREEZE_INTERVALS`]).
    fn freeze_threshold(&self) -> Duration {
        let average = match u32::try_from(self.gaps.len()) {
            Ok(n) if n > 0 => self.gaps.iter().sum::<Duration>() / n,
            _ => Duration::from_secs(1) / self.advertised.fps.max(1),
        };
        (average * FREEZE_INTERVALS).max(average + FREEZE_MARGIN)
    }

    /// Frames decoded so far.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// The measurement ended at `now`: the report and its verdict.
    pub fn finish(&self, now: Instant, rtt_ms: Option<f64>) -> QoeReport {
        let seconds = match (self.first, self.last) {
            (Some(first), Some(last)) => last.saturating_duration_since(first).as_secs_f64(),
            _ => 0.0,
        };
        // Frames after the first over the time they took.
        let fps = if seconds > 0.0 { (self.frames - 1) as f64 / seconds } else { 0.0 };
        let mut failures = Vec::new();
        if self.frames == 0 {
            failures.push("no frame decoded".to_owned());
        } else {
            let want = f64::from(self.advertised.fps);
            if (fps - want).abs() > want * FPS_TOLERANCE {
                failures.push(format!("{fps:.2} fps, advertised {want} (± {:.0} %)", FPS_TOLERANCE * 100.0));
            }
            if self.wrong_size > 0 {
                failures.push(format!(
                    "{} of {} frames not at the advertised {}×{}",
                    self.wrong_size, self.frames, self.advertised.width, self.advertised.height
                ));
            }
            // Watched from the first frame to the end.
            let watched = self.first.map_or(Duration::ZERO, |first| now.saturating_duration_since(first));
            if self.frozen.as_secs_f64() > watched.as_secs_f64() * FREEZE_BUDGET {
                failures.push(format!(
                    "frozen {:.0} ms of {:.1} s watched (over {:.0} %): {} freezes, longest gap {:.0} ms",
                    self.frozen.as_secs_f64() * 1000.0,
                    watched.as_secs_f64(),
                    FREEZE_BUDGET * 100.0,
                    self.freezes,
                    self.longest_gap.as_secs_f64() * 1000.0
                ));
            }
            // A stream that stopped before the end is not live.
            if let Some(last) = self.last {
                let silent = now.saturating_duration_since(last);
                if silent >= self.freeze_threshold() {
                    failures.push(format!("no frame for the last {:.0} ms", silent.as_secs_f64() * 1000.0));
                }
            }
        }
        QoeReport {
            advertised: self.advertised,
            seconds,
            frames_decoded: self.frames,
            fps,
            wrong_size: self.wrong_size,
            freezes: self.freezes,
            frozen_ms: self.frozen.as_secs_f64() * 1000.0,
            longest_gap_ms: self.longest_gap.as_secs_f64() * 1000.0,
            bitrate_kbps: if seconds > 0.0 { self.bytes_since_first as f64 * 8.0 / seconds / 1000.0 } else { 0.0 },
            bytes: self.bytes,
            keyframes_asked: self.keyframes_asked,
            rtt_ms,
            failures,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HD30: Advertised = Advertised { width: 1280, height: 720, fps: 30 };

    /// `n` frames `interval` apart from `start`.
    fn feed(meter: &mut QoeMeter, start: Instant, n: u32, interval: Duration, size: (u32, u32)) -> Instant {
        let mut t = start;
        for i in 0..n {
            t = start + interval * i;
            meter.on_frame(t, size.0, size.1);
        }
        t
    }

    #[test]
    fn a_steady_stream_at_the_advertised_rate_passes() {
        let mut m = QoeMeter::new(HD30);
        let t0 = Instant::now();
        let end = feed(&mut m, t0, 301, Duration::from_micros(33_333), (1280, 720));
        let r = m.finish(end, Some(1.0));
        assert!(r.passed(), "{r:?}");
        assert!((r.fps - 30.0).abs() < 0.1, "{r:?}");
    }

    #[test]
    fn half_the_advertised_rate_fails() {
        let mut m = QoeMeter::new(HD30);
        let t0 = Instant::now();
        let end = feed(&mut m, t0, 151, Duration::from_micros(66_667), (1280, 720));
        let r = m.finish(end, None);
        assert!(!r.passed());
        assert!(r.failures[0].contains("15.00 fps"), "{r:?}");
    }

    #[test]
    fn six_percent_slow_fails_and_four_percent_passes() {
        for (fps, pass) in [(28.2, false), (28.8, true), (31.2, true), (31.8, false)] {
            let mut m = QoeMeter::new(HD30);
            let t0 = Instant::now();
            let end = feed(&mut m, t0, 301, Duration::from_secs_f64(1.0 / fps), (1280, 720));
            assert_eq!(m.finish(end, None).passed(), pass, "{fps} fps");
        }
    }

    #[test]
    fn a_freeze_a_stall_and_a_wrong_size_fail() {
        let mut m = QoeMeter::new(HD30);
        let t0 = Instant::now();
        let t = feed(&mut m, t0, 100, Duration::from_micros(33_333), (1280, 720));
        // Half a second without a frame.
        let t = feed(&mut m, t + Duration::from_millis(500), 100, Duration::from_micros(33_333), (1280, 720));
        let r = m.finish(t, None);
        assert_eq!(r.freezes, 1, "{r:?}");
        assert!(!r.passed());

        let mut m = QoeMeter::new(HD30);
        let t = feed(&mut m, t0, 300, Duration::from_micros(33_333), (640, 360));
        let r = m.finish(t, None);
        assert!(r.failures.iter().any(|f| f.contains("not at the advertised")), "{r:?}");

        let mut m = QoeMeter::new(HD30);
        let t = feed(&mut m, t0, 300, Duration::from_micros(33_333), (1280, 720));
        let r = m.finish(t + Duration::from_secs(2), None);
        assert!(r.failures.iter().any(|f| f.contains("no frame for the last")), "{r:?}");

        let r = QoeMeter::new(HD30).finish(t0, None);
        assert_eq!(r.failures, ["no frame decoded"]);
    }

    #[test]
    fn freezes_are_counted_as_the_w3c_stats_define_them() {
        // At 30 fps a gap is a freeze from the average (33 ms) plus 150 ms: 183 ms.
        for (gap_ms, freezes) in [(170, 0), (190, 1)] {
            let mut m = QoeMeter::new(HD30);
            let t0 = Instant::now();
            let t = feed(&mut m, t0, 60, Duration::from_micros(33_333), (1280, 720));
            let t = feed(&mut m, t + Duration::from_millis(gap_ms), 60, Duration::from_micros(33_333), (1280, 720));
            assert_eq!(m.finish(t, None).freezes, freezes, "a {gap_ms} ms gap");
        }
        // At 5 fps the average is 200 ms: a freeze from three of them, 600 ms.
        let five = Advertised { fps: 5, ..HD30 };
        for (gap_ms, freezes) in [(550, 0), (620, 1)] {
            let mut m = QoeMeter::new(five);
            let t0 = Instant::now();
            let t = feed(&mut m, t0, 40, Duration::from_millis(200), (1280, 720));
            feed(&mut m, t + Duration::from_millis(gap_ms), 2, Duration::from_millis(200), (1280, 720));
            assert_eq!(m.finish(t, None).freezes, freezes, "a {gap_ms} ms gap at 5 fps");
        }
    }

    #[test]
    fn one_brief_hitch_in_a_long_watch_passes_and_a_stream_that_keeps_stopping_fails() {
        let interval = Duration::from_micros(33_333);
        // 20 s with one 250 ms freeze: 1.25 % of the time frozen.
        let mut m = QoeMeter::new(HD30);
        let t0 = Instant::now();
        let t = feed(&mut m, t0, 300, interval, (1280, 720));
        let t = feed(&mut m, t + Duration::from_millis(250), 300, interval, (1280, 720));
        let r = m.finish(t, None);
        assert_eq!(r.freezes, 1, "{r:?}");
        assert!((r.frozen_ms - 250.0).abs() < 1.0, "{r:?}");
        assert!(r.passed(), "{r:?}");
        // The same 20 s with a 250 ms freeze every 4 s: 6 % frozen.
        let mut m = QoeMeter::new(HD30);
        let mut t = t0;
        for _ in 0..5 {
            t = feed(&mut m, t, 120, interval, (1280, 720)) + Duration::from_millis(250);
        }
        let r = m.finish(t - Duration::from_millis(250), None);
        assert_eq!(r.freezes, 4, "{r:?}");
        assert!(r.failures.iter().any(|f| f.starts_with("frozen 1000 ms")), "{r:?}");
    }
}
