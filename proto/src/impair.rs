//! A seeded model of a bad network path: random or bursty (Gilbert–Elliott) loss, delay,
//! jitter and reordering. Driven by an explicit `now`: the simulated-clock tests use it
//! directly, and `pylon-impair` (the UDP impairment proxy users test their own links
//! with) wraps it in sockets.

use std::time::{Duration, Instant};

/// How packets are lost.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LossModel {
    /// Nothing is lost.
    None,
    /// Each packet is lost with this probability, independently.
    Random(f64),
    /// Gilbert–Elliott: a good and a bad state; packets are lost with `loss_good` /
    /// `loss_bad` in each, and the state flips with `p_good_to_bad` / `p_bad_to_good`
    /// per packet.
    GilbertElliott {
        /// Chance per packet to enter the bad state.
        p_good_to_bad: f64,
        /// Chance per packet to leave it.
        p_bad_to_good: f64,
        /// Loss in the good state.
        loss_good: f64,
        /// Loss in the bad state.
        loss_bad: f64,
    },
}

impl LossModel {
    /// Bursty loss averaging `average` (0..1) in bursts of `mean_burst` packets.
    pub fn bursty(average: f64, mean_burst: f64) -> Self {
        let average = average.clamp(0.0, 0.99);
        let p_bad_to_good = 1.0 / mean_burst.max(1.0);
        Self::GilbertElliott {
            p_good_to_bad: average * p_bad_to_good / (1.0 - average),
            p_bad_to_good,
            loss_good: 0.0,
            loss_bad: 1.0,
        }
    }
}

/// A small deterministic generator (SplitMix64): the same seed gives the same path.
#[derive(Debug, Clone)]
struct SplitMix(u64);

impl SplitMix {
    fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One direction of an impaired path.
#[derive(Debug, Clone)]
pub struct Impairment {
    rng: SplitMix,
    loss: LossModel,
    bad: bool,
    delay: Duration,
    jitter: Duration,
    reorder: f64,
    last_delivery: Option<Instant>,
}

impl Impairment {
    /// A path with `loss`, a base one-way `delay`, up to `jitter` more (order kept), and a
    /// `reorder` chance that a packet is held back by one more `delay` (overtaken).
    pub fn new(seed: u64, loss: LossModel, delay: Duration, jitter: Duration, reorder: f64) -> Self {
        Self { rng: SplitMix(seed), loss, bad: false, delay, jitter, reorder, last_delivery: None }
    }

    fn lost(&mut self) -> bool {
        match self.loss {
            LossModel::None => false,
            LossModel::Random(p) => self.rng.next_f64() < p,
            LossModel::GilbertElliott { p_good_to_bad, p_bad_to_good, loss_good, loss_bad } => {
                let flip = if self.bad { p_bad_to_good } else { p_good_to_bad };
                if self.rng.next_f64() < flip {
                    self.bad = !self.bad;
                }
                self.rng.next_f64() < if self.bad { loss_bad } else { loss_good }
            }
        }
    }

    /// A packet enters the path at `now`: when it comes out, or `None` if it is lost.
    pub fn on_packet(&mut self, now: Instant) -> Option<Instant> {
        if self.lost() {
            return None;
        }
        let jitter = self.jitter.mul_f64(self.rng.next_f64());
        let mut at = now + self.delay + jitter;
        if self.reorder > 0.0 && self.rng.next_f64() < self.reorder {
            // Held back: later packets overtake it.
            return Some(at + self.delay.max(Duration::from_millis(1)));
        }
        // Jitter alone never reorders (a queue, not a shuffle).
        if let Some(last) = self.last_delivery {
            at = at.max(last);
        }
        self.last_delivery = Some(at);
        Some(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loss_rate(model: LossModel, n: usize) -> (f64, f64) {
        let t = Instant::now();
        let mut path = Impairment::new(7, model, Duration::ZERO, Duration::ZERO, 0.0);
        let mut lost = 0;
        let mut bursts = 0;
        let mut prev_lost = false;
        for _ in 0..n {
            let l = path.on_packet(t).is_none();
            if l {
                lost += 1;
                if !prev_lost {
                    bursts += 1;
                }
            }
            prev_lost = l;
        }
        (lost as f64 / n as f64, lost as f64 / bursts.max(1) as f64)
    }

    #[test]
    fn loss_models_average_what_they_promise() {
        let (rate, _) = loss_rate(LossModel::Random(0.05), 200_000);
        assert!((rate - 0.05).abs() < 0.003, "{rate}");
        let (rate, burst) = loss_rate(LossModel::bursty(0.02, 4.0), 400_000);
        assert!((rate - 0.02).abs() < 0.004, "{rate}");
        assert!((burst - 4.0).abs() < 0.5, "mean burst {burst}");
        assert_eq!(loss_rate(LossModel::None, 1000).0, 0.0);
    }

    #[test]
    fn delay_jitter_and_reordering() {
        let t0 = Instant::now();
        let d = Duration::from_millis(40);
        let mut path = Impairment::new(3, LossModel::None, d, Duration::from_millis(5), 0.0);
        let mut last = t0;
        for i in 0..1000u64 {
            let now = t0 + Duration::from_millis(i);
            let at = path.on_packet(now).unwrap();
            assert!(at >= now + d && at <= now + d + Duration::from_millis(5) || at == last);
            assert!(at >= last, "jitter keeps order");
            last = at;
        }
        let mut path = Impairment::new(3, LossModel::None, d, Duration::ZERO, 0.1);
        let deliveries: Vec<Instant> =
            (0..1000u64).map(|i| path.on_packet(t0 + Duration::from_millis(i)).unwrap()).collect();
        let overtaken = deliveries.windows(2).filter(|w| w[1] < w[0]).count();
        assert!((50..200).contains(&overtaken), "about 10% reordered: {overtaken}");
        // The same seed gives the same path.
        let mut a = Impairment::new(11, LossModel::Random(0.3), d, d, 0.2);
        let mut b = Impairment::new(11, LossModel::Random(0.3), d, d, 0.2);
        for i in 0..100u64 {
            let now = t0 + Duration::from_millis(i);
            assert_eq!(a.on_packet(now), b.on_packet(now));
        }
    }
}
