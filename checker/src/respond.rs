//! The responsiveness check (proof of rendering) for the built-in demo, without I/O.
//!
//! A replayed recording or a repeated frame cannot answer input; a game that really runs
//! does, and the demo's answer is exact: the mouse aims the ship, so a move to a point
//! turns it to the heading of that point (`atan2`, `server/src/scene.rs`). The check takes
//! the controls (aiming where the ship points, and holding the brake so it stands still),
//! lets the ship settle, then at random times (unpredictable to the node) picks a random
//! aim point at least 100° off the ship's heading and either moves the mouse there (an
//! input trial) or only watches for it (a sham). An input trial passes when a decoded
//! picture shows the ship pointing at that point (± [`ResponseConfig::tolerance`], from
//! where the ship is in that picture, as the game computes it) within the window; a sham
//! fires when the ship turns there by itself. The times from each move sent to the
//! first frame decoded with the turn are the checker's click-to-photon.
//!
//! Fed decoded poses with an explicit `now`; `poll_input` says what to send when.

use crate::demo::{Pose, angle_between};
use pylon_proto::input::{InputEvent, key_index};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::collections::VecDeque;
use std::f32::consts::PI;
use std::time::{Duration, Instant};

/// How a check is run.
#[derive(Debug, Clone)]
pub struct ResponseConfig {
    /// Input trials (shams come on top, one for every two).
    pub trials: u32,
    /// How long a trial waits for the turn.
    pub window: Duration,
    /// How far the seen heading may be from the aimed one, radians.
    pub tolerance: f32,
    /// How long the ship is left to settle once the controls are taken.
    pub settle: Duration,
    /// The random pause before each trial, from..to.
    pub gap: (Duration, Duration),
    /// How far from the ship the aim point is, pixels.
    pub radius: f32,
    /// Input trials that must be answered (fraction).
    pub min_answered: f64,
    /// Shams that may fire (fraction).
    pub max_sham_fired: f64,
}

impl Default for ResponseConfig {
    fn default() -> Self {
        Self {
            trials: 12,
            window: Duration::from_secs(1),
            tolerance: 20f32.to_radians(),
            settle: Duration::from_millis(1500),
            gap: (Duration::from_millis(300), Duration::from_millis(900)),
            radius: 150.0,
            min_answered: 0.9,
            max_sham_fired: 0.2,
        }
    }
}

/// The key held to keep the ship still while it is checked.
const BRAKE: &str = "ArrowDown";

/// The heading from the ship to an aim point, as the game computes it.
fn heading_to(pose: Pose, (x, y): (f32, f32)) -> f32 {
    (y - pose.y).atan2(x - pose.x)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TrialKind {
    Input,
    Sham,
}

/// One trial's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Trial {
    pub kind: TrialKind,
    /// The heading aimed at (or, for a sham, watched for), degrees.
    pub target_deg: f32,
    /// From the move sent (the sham's start) to the first picture showing the turn, ms;
    /// `None`: not within the window.
    pub ms: Option<f64>,
}

/// The figures every responsiveness check reports (the demo's aimed turns here, a studio
/// title's probe in [`crate::probe`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Answers {
    /// Inputs the picture answered, of those sent.
    pub answered: u32,
    pub inputs: u32,
    /// Shams (no input) in which the picture moved as if answering, of those watched.
    pub sham_fired: u32,
    pub shams: u32,
    /// Input sent → first decoded frame that showed the answer, ms.
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
}

/// The `q` quantile of `v` (nearest rank).
pub(crate) fn percentile(mut v: Vec<f64>, q: f64) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    (!v.is_empty()).then(|| v[((v.len() - 1) as f64 * q).round() as usize])
}

/// What the check measured, and its verdict.
#[derive(Debug, Clone, Serialize)]
pub struct ResponseReport {
    pub trials: Vec<Trial>,
    #[serde(flatten)]
    pub answers: Answers,
    /// Why the check failed; empty when it passed.
    pub failures: Vec<String>,
}

impl ResponseReport {
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Waiting to see the ship.
    Start,
    Settling {
        until: Instant,
    },
    Pause {
        until: Instant,
    },
    /// Watching for the ship to point at `aim`.
    Trial {
        kind: TrialKind,
        aim: (f32, f32),
        since: Instant,
        deadline: Instant,
    },
    Done,
}

/// The check's state.
#[derive(Debug)]
pub struct ResponseCheck {
    config: ResponseConfig,
    rng: StdRng,
    pose: Option<Pose>,
    size: (u32, u32),
    phase: Phase,
    trials: Vec<Trial>,
    /// Stops a check whose ship never shows.
    give_up: Option<Instant>,
    /// Input to send, in order.
    outbox: VecDeque<InputEvent>,
}

impl ResponseCheck {
    /// `seed` must be unpredictable to the node (the checker draws it from the OS).
    pub fn new(config: ResponseConfig, seed: u64) -> Self {
        Self {
            config,
            rng: StdRng::seed_from_u64(seed),
            pose: None,
            size: (0, 0),
            phase: Phase::Start,
            trials: Vec::new(),
            give_up: None,
            outbox: VecDeque::new(),
        }
    }

    /// A picture of `width` × `height` was decoded at `now`, showing the ship at `pose`
    /// (`None`: no ship found in it).
    pub fn on_frame(&mut self, now: Instant, width: u32, height: u32, pose: Option<Pose>) {
        self.size = (width, height);
        self.give_up.get_or_insert(now + Duration::from_secs(10));
        let Some(pose) = pose else { return };
        self.pose = Some(pose);
        if let Phase::Trial { kind, aim, since, .. } = self.phase
            && angle_between(pose.heading, heading_to(pose, aim)) <= self.config.tolerance
        {
            self.trials.push(Trial {
                kind,
                target_deg: heading_to(pose, aim).to_degrees(),
                ms: Some(now.saturating_duration_since(since).as_secs_f64() * 1000.0),
            });
            self.pause(now);
        }
    }

    fn pause(&mut self, now: Instant) {
        let (a, b) = self.config.gap;
        let gap = a + (b.saturating_sub(a)).mul_f64(self.rng.random::<f64>());
        self.phase = Phase::Pause { until: now + gap };
    }

    /// An aim point at least 100° from the ship's heading, inside the picture, and the
    /// heading it asks for.
    fn pick_target(&mut self, pose: Pose) -> (f32, u16, u16) {
        let (w, h) = (self.size.0.max(2) as f32, self.size.1.max(2) as f32);
        let mut best = (pose.heading + PI, pose.x, pose.y);
        for _ in 0..16 {
            let turn = self.rng.random_range(100f32.to_radians()..260f32.to_radians());
            let want = pose.heading + turn;
            let tx = (pose.x + self.config.radius * want.cos()).clamp(0.0, w - 1.0).round();
            let ty = (pose.y + self.config.radius * want.sin()).clamp(0.0, h - 1.0).round();
            let heading = (ty - pose.y).atan2(tx - pose.x);
            best = (heading, tx, ty);
            if angle_between(heading, pose.heading) >= 100f32.to_radians() && (tx - pose.x).hypot(ty - pose.y) > 40.0 {
                break;
            }
        }
        (best.0, best.1 as u16, best.2 as u16)
    }

    /// What to send at `now`, if anything (call until `None`); moves the check on.
    pub fn poll_input(&mut self, now: Instant) -> Option<InputEvent> {
        if let Some(event) = self.outbox.pop_front() {
            return Some(event);
        }
        if matches!(self.phase, Phase::Start | Phase::Settling { .. }) && self.give_up.is_some_and(|g| now >= g) {
            self.finish();
            return self.outbox.pop_front();
        }
        match self.phase {
            Phase::Start => {
                let pose = self.pose?;
                // Take the controls: aim where the ship already points, and brake.
                let (w, h) = (self.size.0.max(2) as f32, self.size.1.max(2) as f32);
                let x = (pose.x + 60.0 * pose.heading.cos()).clamp(0.0, w - 1.0) as u16;
                let y = (pose.y + 60.0 * pose.heading.sin()).clamp(0.0, h - 1.0) as u16;
                self.phase = Phase::Settling { until: now + self.config.settle };
                self.outbox.push_back(InputEvent::MouseMove { x, y, dx: 0, dy: 0 });
                if let Some(key) = key_index(BRAKE) {
                    self.outbox.push_back(InputEvent::KeyDown { key, modifiers: 0 });
                }
            }
            Phase::Settling { until } | Phase::Pause { until } if now >= until => {
                let inputs = self.trials.iter().filter(|t| t.kind == TrialKind::Input).count() as u32;
                let missed = self.trials.iter().filter(|t| t.kind == TrialKind::Input && t.ms.is_none()).count() as u32;
                // Once more aimed turns went unanswered than a pass allows, the verdict is
                // in: a stream that does not answer is not watched any longer.
                let may_miss = (f64::from(self.config.trials) * (1.0 - self.config.min_answered)).floor() as u32;
                if inputs >= self.config.trials || missed > may_miss {
                    self.finish();
                } else if let Some(pose) = self.pose {
                    // One sham for every two inputs, at random places in the sequence.
                    let kind = if self.rng.random_range(0..3) == 0 { TrialKind::Sham } else { TrialKind::Input };
                    let (_, x, y) = self.pick_target(pose);
                    let aim = (f32::from(x), f32::from(y));
                    self.phase = Phase::Trial { kind, aim, since: now, deadline: now + self.config.window };
                    if kind == TrialKind::Input {
                        self.outbox.push_back(InputEvent::MouseMove { x, y, dx: 0, dy: 0 });
                    }
                }
            }
            Phase::Trial { kind, aim, deadline, .. } if now >= deadline => {
                let target = self.pose.map_or(0.0, |p| heading_to(p, aim));
                self.trials.push(Trial { kind, target_deg: target.to_degrees(), ms: None });
                self.pause(now);
            }
            _ => {}
        }
        self.outbox.pop_front()
    }

    /// Done: the brake is let go.
    fn finish(&mut self) {
        if !matches!(self.phase, Phase::Start)
            && let Some(key) = key_index(BRAKE)
        {
            self.outbox.push_back(InputEvent::KeyUp { key, modifiers: 0 });
        }
        self.phase = Phase::Done;
    }

    /// When `poll_input` next has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::Start => self.give_up,
            Phase::Settling { until } | Phase::Pause { until } => Some(until),
            Phase::Trial { deadline, .. } => Some(deadline),
            Phase::Done => None,
        }
    }

    pub fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Done) && self.outbox.is_empty()
    }

    /// The verdict on the trials so far.
    pub fn report(&self) -> ResponseReport {
        let of = |k| self.trials.iter().filter(move |t: &&Trial| t.kind == k);
        let inputs = of(TrialKind::Input).count() as u32;
        let shams = of(TrialKind::Sham).count() as u32;
        let answered = of(TrialKind::Input).filter(|t| t.ms.is_some()).count() as u32;
        let sham_fired = of(TrialKind::Sham).filter(|t| t.ms.is_some()).count() as u32;
        let ms: Vec<f64> = of(TrialKind::Input).filter_map(|t| t.ms).collect();
        let mut failures = Vec::new();
        if inputs == 0 {
            failures.push("no input trial ran (the ship was never seen)".to_owned());
        } else if f64::from(answered) < f64::from(inputs) * self.config.min_answered {
            failures.push(format!("answered {answered} of {inputs} aimed turns"));
        }
        if f64::from(sham_fired) > f64::from(shams) * self.config.max_sham_fired {
            failures.push(format!("{sham_fired} of {shams} shams saw a turn nobody asked for"));
        }
        ResponseReport {
            trials: self.trials.clone(),
            answers: Answers {
                answered,
                inputs,
                sham_fired,
                shams,
                p50_ms: percentile(ms.clone(), 0.5),
                p95_ms: percentile(ms, 0.95),
            },
            failures,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A simulated demo: the ship at the centre, turned at once to any aim point it is
    /// sent (after `delay`), or never (`answers: false`: a recording or a still frame).
    fn run(answers: bool, delay: Duration, seed: u64) -> ResponseReport {
        let mut check = ResponseCheck::new(ResponseConfig::default(), seed);
        let t0 = Instant::now();
        let frame = Duration::from_micros(33_333);
        let mut heading = 0.3f32;
        let mut pending: Vec<(Instant, f32)> = Vec::new();
        let mut now = t0;
        while !check.is_done() && now < t0 + Duration::from_secs(120) {
            while let Some(event) = check.poll_input(now) {
                if let InputEvent::MouseMove { x, y, .. } = event
                    && answers
                {
                    pending.push((now + delay, (f32::from(y) - 240.0).atan2(f32::from(x) - 320.0)));
                }
            }
            pending.retain(|&(at, h)| {
                if at <= now {
                    heading = h;
                }
                at > now
            });
            check.on_frame(now, 640, 480, Some(Pose { x: 320.0, y: 240.0, heading }));
            now += frame;
        }
        check.report()
    }

    #[test]
    fn a_game_that_turns_passes_and_its_latency_is_measured() {
        for seed in 0..20 {
            let r = run(true, Duration::from_millis(70), seed);
            assert!(r.passed(), "seed {seed}: {r:?}");
            assert_eq!(r.answers.inputs, 12);
            let p50 = r.answers.p50_ms.unwrap();
            assert!((70.0..=110.0).contains(&p50), "seed {seed}: {p50}");
        }
    }

    #[test]
    fn a_stream_that_ignores_input_fails() {
        for seed in 0..20 {
            let r = run(false, Duration::ZERO, seed);
            assert!(!r.passed(), "seed {seed}: {r:?}");
            assert_eq!(r.answers.answered, 0);
            // Decided after the second unanswered turn of twelve (a pass allows one).
            assert_eq!(r.answers.inputs, 2, "seed {seed}: stopped once the verdict was in");
        }
    }

    #[test]
    fn a_ship_never_seen_fails_without_hanging() {
        let mut check = ResponseCheck::new(ResponseConfig::default(), 1);
        let t0 = Instant::now();
        let mut now = t0;
        while !check.is_done() {
            assert!(check.poll_input(now).is_none(), "nothing is sent before the ship is seen");
            check.on_frame(now, 640, 480, None);
            now += Duration::from_millis(33);
            assert!(now < t0 + Duration::from_secs(30), "the check never gave up");
        }
        assert!(!check.report().passed());
    }

    #[test]
    fn aim_points_stay_in_the_picture_and_far_from_the_heading() {
        let mut check = ResponseCheck::new(ResponseConfig::default(), 9);
        check.size = (640, 480);
        for i in 0..200 {
            let pose = Pose { x: (i * 37 % 640) as f32, y: (i * 53 % 480) as f32, heading: i as f32 * 0.7 };
            let (heading, x, y) = check.pick_target(pose);
            assert!(x < 640 && y < 480);
            let seen = (f32::from(y) - pose.y).atan2(f32::from(x) - pose.x);
            assert!(angle_between(seen, heading) < 1e-3);
        }
    }
}
