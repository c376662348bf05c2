//! The player's bitrate, decided from its congestion feedback, without I/O.
//!
//! str0m's transport-wide congestion control (TWCC) estimates what the player's path
//! carries; [`RateController`] turns estimates into encoder targets for the render node:
//! a drop is followed at once (the network is congested now), a rise is followed by at
//! most 15 % a second (recover smoothly, do not oscillate), and small changes are ignored.
//! Only the player's estimates feed it: spectators never drive the bitrate.

use std::time::{Duration, Instant};

/// Share of the estimate given to video (the rest: RTX, RTCP, audio later, headroom).
pub const HEADROOM: f64 = 0.85;
/// A target this much below the current one is applied at once.
const DECREASE_RATIO: f64 = 0.95;
/// Rises smaller than this are ignored.
const INCREASE_RATIO: f64 = 1.05;
/// Largest rise per step.
const INCREASE_STEP: f64 = 1.15;
/// Time between rises.
pub const INCREASE_INTERVAL: Duration = Duration::from_secs(1);

/// Turns bandwidth estimates into encoder bitrate targets.
#[derive(Debug, Clone)]
pub struct RateController {
    min_bps: u64,
    max_bps: u64,
    current: Option<u64>,
    last_rise: Option<Instant>,
}

impl RateController {
    /// A controller whose targets stay within `min_bps..=max_bps`.
    pub fn new(min_bps: u64, max_bps: u64) -> Self {
        Self { min_bps, max_bps: max_bps.max(min_bps), current: None, last_rise: None }
    }

    /// The target last decided, bit/s.
    pub fn current(&self) -> Option<u64> {
        self.current
    }

    /// A new estimate at `now`; returns a new target for the encoder, if it should change.
    pub fn on_estimate(&mut self, now: Instant, estimate_bps: u64) -> Option<u64> {
        let wanted = ((estimate_bps as f64 * HEADROOM) as u64).clamp(self.min_bps, self.max_bps);
        let next = match self.current {
            None => wanted,
            Some(c) if (wanted as f64) < c as f64 * DECREASE_RATIO => wanted,
            Some(c) if (wanted as f64) > c as f64 * INCREASE_RATIO => {
                if self.last_rise.is_some_and(|t| now.saturating_duration_since(t) < INCREASE_INTERVAL) {
                    return None;
                }
                self.last_rise = Some(now);
                wanted.min((c as f64 * INCREASE_STEP) as u64)
            }
            Some(_) => return None,
        };
        self.current = Some(next);
        Some(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds an estimate every 100 ms of simulated time; returns the targets decided, with
    /// their times in seconds.
    fn run(c: &mut RateController, t0: Instant, from_s: f64, to_s: f64, estimate: u64) -> Vec<(f64, u64)> {
        let mut out = Vec::new();
        let mut t = from_s;
        while t < to_s {
            if let Some(b) = c.on_estimate(t0 + Duration::from_secs_f64(t), estimate) {
                out.push((t, b));
            }
            t += 0.1;
        }
        out
    }

    #[test]
    fn follows_a_drop_at_once_and_recovers_smoothly() {
        let t0 = Instant::now();
        let mut c = RateController::new(500_000, 6_000_000);
        assert_eq!(run(&mut c, t0, 0.0, 5.0, 6_000_000), vec![(0.0, 5_100_000)]);
        // The path drops to 2 Mbit/s: lowered on the first estimate that says so.
        let drop = run(&mut c, t0, 5.0, 10.0, 2_000_000);
        assert_eq!(drop, vec![(5.0, 1_700_000)]);
        // Back to 6 Mbit/s: at most +15 % per second, never above 85 % of the estimate.
        let rise = run(&mut c, t0, 10.0, 30.0, 6_000_000);
        assert!(rise.len() >= 7, "{rise:?}");
        for pair in rise.windows(2) {
            assert!(pair[1].0 - pair[0].0 >= 0.95, "one rise per second: {rise:?}");
            assert!(pair[1].1 as f64 <= pair[0].1 as f64 * 1.151, "+15 % at most: {rise:?}");
        }
        assert_eq!(rise.last().unwrap().1, 5_100_000);
        assert_eq!(c.current(), Some(5_100_000));
    }

    #[test]
    fn stays_within_bounds_and_ignores_jitter_of_the_estimate() {
        let t0 = Instant::now();
        let mut c = RateController::new(1_000_000, 4_000_000);
        assert_eq!(c.on_estimate(t0, 100_000_000), Some(4_000_000), "capped at the node's maximum");
        assert_eq!(c.on_estimate(t0, 100_000), Some(1_000_000), "floored at the minimum");
        let t = t0 + Duration::from_secs(5);
        assert_eq!(c.on_estimate(t, 1_200_000), None, "0.85 × 1.2 M is under the floor: no change");
        let mut c = RateController::new(0, 10_000_000);
        c.on_estimate(t0, 5_000_000);
        for i in 1..50 {
            let wobble = if i % 2 == 0 { 5_100_000 } else { 4_900_000 };
            assert_eq!(c.on_estimate(t0 + Duration::from_millis(i * 100), wobble), None, "estimate noise is ignored");
        }
    }
}
