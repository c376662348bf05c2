//! The responsiveness check (proof of rendering) for studio titles, without I/O.
//!
//! A studio title has no known answer to an input, and most games animate whether or not
//! anyone plays, so "the picture changed after the input" proves nothing. What a
//! recording, a frozen picture or a game that never gets the input cannot do is tell two
//! inputs apart. The title's [`Probe`] names two keys that move something on screen in
//! opposite directions (the studio knows its game: a ship, a cursor, the camera). The
//! check presses them in pairs, each pair in a random order, at random times, with sham
//! intervals (no key) between pairs, and describes each press by how the picture moved
//! from the last frame before the press to the last one [`ProbeConfig::after`] past its
//! release: [`flow`] summed over the frames between, the optical-flow numerators of the
//! whole picture and of its top, middle and bottom thirds (content moving right adds to
//! the horizontal one whatever its contrast and wherever it is).
//!
//! The verdict is a test, not a threshold. For each pair, Δ is the first key's motion
//! minus the second's. Whatever a stream that ignores input shows, each Δ is as likely to
//! come out negated, since which key came first was a coin flip the node could not know.
//! A title that answers moves the picture the same way in every pair, so its Δs agree:
//! the statistic is their agreement, Σ over pairs i ≠ j of ⟨Δi, Δj⟩, and its p-value is
//! the share of random sign flips of the Δs that agree as much (a sign-flip permutation
//! test: exact in law, whatever the game draws). The title passes when it is at most
//! [`ProbeConfig::alpha`]: a stream that does not render the keys it was sent passes one
//! check in 1/alpha at most.
//!
//! Beside the verdict it reports, along the motion the other pairs agree on (leaving the
//! press's own pair out): how many presses moved the picture their key's way by at least
//! a quarter of the median swing between the keys (from the shams' median drift), how
//! many shams drifted that far, and the time from each answered press to the first frame
//! that moved its way by a larger step than 95 % of the shams' frames did
//! (click-to-photon).

use crate::respond::{Answers, percentile};
use pylon_indexer_client::api::Probe;
use pylon_proto::input::{InputEvent, key_index};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How a probe check is run.
#[derive(Debug, Clone)]
pub struct ProbeConfig {
    /// Pairs of presses (one of each key, in a random order).
    pub pairs: u32,
    /// Sham intervals, placed at random between pairs.
    pub shams: u32,
    /// How long the title is left after its setup keys.
    pub settle: Duration,
    /// The random pause before each press or sham, from..to.
    pub gap: (Duration, Duration),
    /// How long after a key's release its press is judged (the path's latency, and some).
    pub after: Duration,
    /// The largest chance of a stream that ignores input passing.
    pub alpha: f64,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        Self {
            pairs: 16,
            shams: 8,
            settle: Duration::from_secs(2),
            gap: (Duration::from_millis(250), Duration::from_millis(650)),
            after: Duration::from_millis(300),
            alpha: 1e-3,
        }
    }
}

/// Thumbnails are the picture averaged over blocks of this many pixels a side.
const THUMB_BLOCK: usize = 8;

/// A picture's luma averaged over [`THUMB_BLOCK`]-pixel squares.
#[derive(Debug, Clone, PartialEq)]
pub struct Thumb {
    pub width: usize,
    pub height: usize,
    pub px: Vec<f32>,
}

impl Thumb {
    /// `None` when `luma` is shorter than `width` × `height`.
    pub fn new(width: u32, height: u32, luma: &[u8]) -> Option<Self> {
        let (w, h) = (width as usize, height as usize);
        if luma.len() < w * h || w < THUMB_BLOCK || h < THUMB_BLOCK {
            return None;
        }
        let (tw, th) = (w / THUMB_BLOCK, h / THUMB_BLOCK);
        let mut px = vec![0f32; tw * th];
        for y in 0..th * THUMB_BLOCK {
            let row = &luma[y * w..y * w + tw * THUMB_BLOCK];
            let out = &mut px[(y / THUMB_BLOCK) * tw..(y / THUMB_BLOCK + 1) * tw];
            for (o, block) in out.iter_mut().zip(row.chunks_exact(THUMB_BLOCK)) {
                *o += block.iter().map(|&v| f32::from(v)).sum::<f32>();
            }
        }
        let n = (THUMB_BLOCK * THUMB_BLOCK) as f32;
        px.iter_mut().for_each(|v| *v /= n);
        Some(Self { width: tw, height: th, px })
    }
}

/// [`flow`]'s horizontal bands: the picture's top, middle and bottom thirds.
const BANDS: usize = 3;

/// How the picture moved from `from` to `to` (consecutive frames): the optical-flow
/// numerators `−Σ (to − from)·∂x` and `−Σ (to − from)·∂y` (gradients of the two frames'
/// mean, per pixel), over the whole picture and over each of [`BANDS`] horizontal bands.
/// Content moving right makes the first positive whether it is brighter or darker than
/// what it moves over (`−Δ·∂x ≈ u·∂x²`), wherever it is; a vertical scroll adds little
/// to it. Empty when the sizes differ.
pub fn flow(from: &Thumb, to: &Thumb) -> Vec<f32> {
    let (w, h) = (from.width, from.height);
    if w != to.width || h != to.height || w < 3 || h < 3 {
        return Vec::new();
    }
    let mean = |i: usize| (from.px[i] + to.px[i]) / 2.0;
    let mut out = vec![0f32; 2 * (1 + BANDS)];
    for y in 1..h - 1 {
        let band = 1 + (y * BANDS / h).min(BANDS - 1);
        let (mut fx, mut fy) = (0f32, 0f32);
        for x in 1..w - 1 {
            let i = y * w + x;
            let d = to.px[i] - from.px[i];
            fx -= d * (mean(i + 1) - mean(i - 1)) / 2.0;
            fy -= d * (mean(i + w) - mean(i - w)) / 2.0;
        }
        out[0] += fx;
        out[1] += fy;
        out[2 * band] += fx;
        out[2 * band + 1] += fy;
    }
    let per = 1.0 / ((w - 2) * (h - 2)) as f32;
    out.iter_mut().for_each(|v| *v *= per);
    out
}

/// What one press (or sham) is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PressKind {
    /// The probe's first key.
    FirstKey,
    /// Its second key.
    SecondKey,
    Sham,
}

/// One press and what it did.
#[derive(Debug, Clone, Serialize)]
pub struct Press {
    pub kind: PressKind,
    /// The pair it belongs to (`None`: a sham).
    pub pair: Option<u32>,
    /// Its motion along the one the other pairs agree on for its key (a sham's: along the
    /// first key's): positive is its key's way.
    pub response: f64,
}

/// A press as measured: its motion at the end, and at each frame during it (ms since it
/// was sent).
#[derive(Debug, Clone)]
struct Measured {
    kind: PressKind,
    pair: Option<u32>,
    motion: Vec<f32>,
    series: Vec<(f64, Vec<f32>)>,
}

/// What the check measured, and its verdict.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeReport {
    pub presses: Vec<Press>,
    /// Complete pairs judged.
    pub pairs: u32,
    /// The chance that a stream ignoring input agrees this much across pairs.
    pub p_value: f64,
    /// Presses that moved the picture their key's way, shams that drifted as far (see
    /// the module's doc), click-to-photon.
    #[serde(flatten)]
    pub answers: Answers,
    /// Why the check failed; empty when it passed.
    pub failures: Vec<String>,
}

impl ProbeReport {
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

#[derive(Debug, Clone, Copy)]
enum Item {
    Press { pair: u32, key: usize },
    Sham,
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Waiting for the first frame.
    Start,
    /// Pressing setup key `next` (`down`: held until `until`).
    Setup {
        next: usize,
        down: bool,
        until: Instant,
    },
    Pause {
        until: Instant,
    },
    Pressing {
        item: Item,
        since: Instant,
        release: Instant,
        end: Instant,
        released: bool,
    },
    Done,
}

/// The check's state.
#[derive(Debug)]
pub struct ProbeCheck {
    config: ProbeConfig,
    setup: Vec<u16>,
    keys: [u16; 2],
    hold: Duration,
    rng: StdRng,
    schedule: VecDeque<Item>,
    phase: Phase,
    /// The last decoded frame.
    latest: Option<Thumb>,
    /// How the picture moved since the current press was sent (summed [`flow`]).
    moved: Vec<f32>,
    series: Vec<(f64, Vec<f32>)>,
    presses: Vec<Measured>,
    give_up: Option<Instant>,
    outbox: VecDeque<InputEvent>,
    /// Seeds the sign flips of the verdict.
    flip_seed: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("the probe names a key the player's input cannot carry: {0:?}")]
pub struct UnknownKey(String);

impl ProbeCheck {
    /// `seed` must be unpredictable to the node (the checker draws it from the OS).
    pub fn new(probe: &Probe, config: ProbeConfig, seed: u64) -> Result<Self, UnknownKey> {
        let key = |k: &String| key_index(k).ok_or_else(|| UnknownKey(k.clone()));
        let setup = probe.setup.iter().map(key).collect::<Result<Vec<_>, _>>()?;
        let keys = [key(&probe.keys[0])?, key(&probe.keys[1])?];
        let mut rng = StdRng::seed_from_u64(seed);
        let mut blocks: Vec<Vec<Item>> = (0..config.pairs)
            .map(|pair| {
                let first = rng.random_range(0..2usize);
                vec![Item::Press { pair, key: first }, Item::Press { pair, key: 1 - first }]
            })
            .collect();
        blocks.extend((0..config.shams).map(|_| vec![Item::Sham]));
        blocks.shuffle(&mut rng);
        let flip_seed = rng.random();
        Ok(Self {
            flip_seed,
            hold: Duration::from_millis(u64::from(probe.hold_ms)),
            config,
            setup,
            keys,
            rng,
            schedule: blocks.into_iter().flatten().collect(),
            phase: Phase::Start,
            latest: None,
            moved: Vec::new(),
            series: Vec::new(),
            presses: Vec::new(),
            give_up: None,
            outbox: VecDeque::new(),
        })
    }

    /// A frame decoded at `now` (its luma plane, `width` × `height`).
    pub fn on_frame(&mut self, now: Instant, width: u32, height: u32, luma: &[u8]) {
        self.give_up.get_or_insert(now + Duration::from_secs(10));
        let Some(thumb) = Thumb::new(width, height, luma) else { return };
        if let (Phase::Pressing { since, .. }, Some(previous)) = (self.phase, &self.latest) {
            let ms = now.saturating_duration_since(since).as_secs_f64() * 1000.0;
            let step = flow(previous, &thumb);
            if step.len() == self.moved.len() || self.moved.is_empty() {
                self.moved.resize(step.len(), 0.0);
                self.moved.iter_mut().zip(&step).for_each(|(m, s)| *m += s);
                self.series.push((ms, self.moved.clone()));
            }
        }
        self.latest = Some(thumb);
    }

    fn pause(&mut self, now: Instant) {
        let (a, b) = self.config.gap;
        let gap = a + (b.saturating_sub(a)).mul_f64(self.rng.random::<f64>());
        self.phase = Phase::Pause { until: now + gap };
    }

    /// What to send at `now`, if anything (call until `None`); moves the check on.
    pub fn poll_input(&mut self, now: Instant) -> Option<InputEvent> {
        if let Some(event) = self.outbox.pop_front() {
            return Some(event);
        }
        match self.phase {
            Phase::Start if self.give_up.is_some_and(|g| now >= g) => self.phase = Phase::Done,
            // The first frame: the title is up; its setup keys, one by one.
            Phase::Start if self.latest.is_some() => match self.setup.first() {
                Some(&key) => {
                    self.outbox.push_back(InputEvent::KeyDown { key, modifiers: 0 });
                    self.phase = Phase::Setup { next: 0, down: true, until: now + Duration::from_millis(100) };
                }
                None => self.phase = Phase::Pause { until: now + self.config.settle },
            },
            Phase::Setup { next, down: true, until } if now >= until => {
                self.outbox.push_back(InputEvent::KeyUp { key: self.setup[next], modifiers: 0 });
                self.phase = Phase::Setup { next, down: false, until: now + Duration::from_millis(400) };
            }
            Phase::Setup { next, down: false, until } if now >= until => match self.setup.get(next + 1) {
                Some(&key) => {
                    self.outbox.push_back(InputEvent::KeyDown { key, modifiers: 0 });
                    self.phase = Phase::Setup { next: next + 1, down: true, until: now + Duration::from_millis(100) };
                }
                None => self.phase = Phase::Pause { until: now + self.config.settle },
            },
            Phase::Pause { until } if now >= until => match self.schedule.pop_front() {
                Some(item) => {
                    self.moved.clear();
                    self.series.clear();
                    if let Item::Press { key, .. } = item {
                        self.outbox.push_back(InputEvent::KeyDown { key: self.keys[key], modifiers: 0 });
                    }
                    let release = now + self.hold;
                    let end = release + self.config.after;
                    self.phase = Phase::Pressing { item, since: now, release, end, released: false };
                }
                None => self.phase = Phase::Done,
            },
            Phase::Pressing { item, since, release, end, released: false } if now >= release => {
                if let Item::Press { key, .. } = item {
                    self.outbox.push_back(InputEvent::KeyUp { key: self.keys[key], modifiers: 0 });
                }
                self.phase = Phase::Pressing { item, since, release, end, released: true };
            }
            Phase::Pressing { item, end, released: true, .. } if now >= end => {
                let (kind, pair) = match item {
                    Item::Press { pair, key: 0 } => (PressKind::FirstKey, Some(pair)),
                    Item::Press { pair, .. } => (PressKind::SecondKey, Some(pair)),
                    Item::Sham => (PressKind::Sham, None),
                };
                let moved = std::mem::take(&mut self.moved);
                self.presses.push(Measured { kind, pair, motion: moved, series: std::mem::take(&mut self.series) });
                self.pause(now);
            }
            _ => {}
        }
        self.outbox.pop_front()
    }

    /// When `poll_input` next has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::Start => self.give_up,
            Phase::Setup { until, .. } | Phase::Pause { until } => Some(until),
            Phase::Pressing { release, released: false, .. } => Some(release),
            Phase::Pressing { end, .. } => Some(end),
            Phase::Done => None,
        }
    }

    pub fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Done) && self.outbox.is_empty()
    }

    /// The verdict on the presses so far.
    pub fn report(&self) -> ProbeReport {
        let mut firsts = std::collections::BTreeMap::new();
        let mut seconds = std::collections::BTreeMap::new();
        for (at, p) in self.presses.iter().enumerate() {
            match (p.kind, p.pair) {
                (PressKind::FirstKey, Some(i)) => firsts.insert(i, at),
                (PressKind::SecondKey, Some(i)) => seconds.insert(i, at),
                _ => None,
            };
        }
        let len = self.presses.iter().map(|p| p.motion.len()).max().unwrap_or(0);
        let pairs: Vec<(usize, usize)> = firsts
            .iter()
            .filter_map(|(i, a)| seconds.get(i).map(|b| (*a, *b)))
            .filter(|(a, b)| len > 0 && self.presses[*a].motion.len() == len && self.presses[*b].motion.len() == len)
            .collect();
        let deltas: Vec<Vec<f32>> = pairs
            .iter()
            .map(|(a, b)| self.presses[*a].motion.iter().zip(&self.presses[*b].motion).map(|(x, y)| x - y).collect())
            .collect();
        let gram: Vec<Vec<f64>> = deltas.iter().map(|a| deltas.iter().map(|b| dot(a, b)).collect()).collect();
        let p_value = sign_flip_p(&gram, &mut StdRng::seed_from_u64(self.flip_seed));

        // Each pair's presses judged along what the other pairs agree on; shams along all.
        let sum = |skip: Option<usize>| {
            let mut w = vec![0f32; len];
            for (i, d) in deltas.iter().enumerate() {
                if Some(i) != skip {
                    w.iter_mut().zip(d).for_each(|(w, d)| *w += d);
                }
            }
            let norm = dot(&w, &w).sqrt();
            if norm > 0.0 {
                w.iter_mut().for_each(|v| *v /= norm as f32);
            }
            w
        };
        let all = sum(None);
        let along = |m: &[f32], w: &[f32]| if m.len() == w.len() { dot(m, w) } else { 0.0 };
        let templates: Vec<Vec<f32>> = (0..pairs.len()).map(|i| sum(Some(i))).collect();
        let mut pair_of = vec![None; self.presses.len()];
        for (i, (a, b)) in pairs.iter().enumerate() {
            pair_of[*a] = Some(i);
            pair_of[*b] = Some(i);
        }
        // What a press is judged along: its pair's template (none for a sham or a lone press).
        let template = |press: usize| pair_of[press].map(|i| templates[i].as_slice());
        let shams: Vec<usize> = (0..self.presses.len()).filter(|&i| self.presses[i].kind == PressKind::Sham).collect();
        let drift = median(shams.iter().map(|&i| along(&self.presses[i].motion, &all)).collect()).unwrap_or(0.0);
        let swing = median(
            pairs
                .iter()
                .map(|(a, b)| {
                    let w = template(*a).unwrap_or(&all);
                    along(&self.presses[*a].motion, w) - along(&self.presses[*b].motion, w)
                })
                .collect(),
        )
        .unwrap_or(0.0);
        let reach = if swing > 0.0 { swing / 4.0 } else { f64::INFINITY };
        // A press shows at the first frame that moved its key's way further since the frame
        // before than frames of the shams ever did (the 95th percentile of their steps).
        let steps = |p: &Measured, w: &[f32]| -> Vec<(f64, f64)> {
            let mut last = 0.0;
            p.series
                .iter()
                .map(|(t, m)| {
                    let at = along(m, w);
                    let step = at - last;
                    last = at;
                    (*t, step)
                })
                .collect()
        };
        let onset =
            percentile(shams.iter().flat_map(|&i| steps(&self.presses[i], &all)).map(|(_, s)| s.abs()).collect(), 0.95)
                .unwrap_or(0.0);
        let (mut answered, mut inputs, mut sham_fired, mut ms, mut presses) =
            (0u32, 0u32, 0u32, Vec::new(), Vec::new());
        for (i, p) in self.presses.iter().enumerate() {
            let w = template(i).unwrap_or(&all);
            let sign = if p.kind == PressKind::SecondKey { -1.0 } else { 1.0 };
            let response = sign * (along(&p.motion, w) - drift);
            match p.kind {
                PressKind::Sham => sham_fired += u32::from(response.abs() >= reach),
                _ if template(i).is_none() => {}
                _ => {
                    inputs += 1;
                    if response >= reach {
                        answered += 1;
                        if let Some((t, _)) = steps(p, w).into_iter().find(|(_, step)| sign * step > onset) {
                            ms.push(t);
                        }
                    }
                }
            }
            presses.push(Press { kind: p.kind, pair: p.pair, response });
        }
        let mut failures = Vec::new();
        if pairs.len() < 2 {
            failures.push(format!("{} pairs of presses judged (no picture seen?); at least 2 are needed", pairs.len()));
        } else if p_value > self.config.alpha {
            failures.push(format!(
                "the picture did not tell the probe's keys apart: p = {p_value:.2e} over {} pairs (at most {:.0e})",
                pairs.len(),
                self.config.alpha
            ));
        }
        ProbeReport {
            presses,
            pairs: pairs.len() as u32,
            p_value,
            answers: Answers {
                answered,
                inputs,
                sham_fired,
                shams: shams.len() as u32,
                p50_ms: percentile(ms.clone(), 0.5),
                p95_ms: percentile(ms, 0.95),
            },
            failures,
        }
    }
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum()
}

/// Sign patterns drawn at random when there are more than 2^15 of them to try.
const FLIPS: usize = 20_000;

/// The sign-flip test of the pairs' agreement: with `gram` the Δs' inner products, the
/// share of sign patterns s (all of them for up to 16 pairs, else [`FLIPS`] drawn, the
/// observed one counted) whose agreement `Σ_{i≠j} s_i s_j ⟨Δi, Δj⟩` is at least the
/// observed one (all signs +). 1 for fewer than 2 pairs.
pub fn sign_flip_p(gram: &[Vec<f64>], rng: &mut StdRng) -> f64 {
    let n = gram.len();
    if n < 2 {
        return 1.0;
    }
    let agreement = |s: &[f64]| -> f64 {
        let mut t = 0.0;
        for i in 0..n {
            for j in 0..n {
                if i != j {
                    t += s[i] * s[j] * gram[i][j];
                }
            }
        }
        t
    };
    let observed = agreement(&vec![1.0; n]);
    // Relative slack: the observed pattern must count as "at least as much" despite rounding.
    let bar = observed - 1e-9 * observed.abs();
    let mut s = vec![1.0; n];
    if n <= 16 {
        // s and −s agree equally: fix the first sign.
        let patterns = 1usize << (n - 1);
        let mut count = 0usize;
        for bits in 0..patterns {
            for (i, v) in s.iter_mut().enumerate().skip(1) {
                *v = if bits >> (i - 1) & 1 == 1 { -1.0 } else { 1.0 };
            }
            count += usize::from(agreement(&s) >= bar);
        }
        count as f64 / patterns as f64
    } else {
        let mut count = 1usize;
        for _ in 0..FLIPS {
            s.iter_mut().for_each(|v| *v = if rng.random::<bool>() { 1.0 } else { -1.0 });
            count += usize::from(agreement(&s) >= bar);
        }
        count as f64 / (FLIPS + 1) as f64
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => None,
        n if n % 2 == 1 => Some(v[n / 2]),
        n => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe() -> Probe {
        Probe { setup: vec!["Enter".into()], keys: ["ArrowLeft".into(), "ArrowRight".into()], hold_ms: 250 }
    }

    const W: usize = 512;
    const H: usize = 288;

    /// A simulated title at 60 fps: a textured floor scrolling down 2 px a frame, three
    /// bright enemies drifting about at random, and a bright ship near the bottom that,
    /// when the title `answers`, flies 4 px a frame left for ArrowLeft and right for
    /// ArrowRight while held, seen `delay` (60 ms) later; when it does not, it drifts by
    /// itself like the enemies.
    fn run(answers: bool, seed: u64) -> ProbeReport {
        let left = key_index("ArrowLeft").unwrap();
        let right = key_index("ArrowRight").unwrap();
        let delay = Duration::from_millis(60);
        let mut check = ProbeCheck::new(&probe(), ProbeConfig::default(), seed).unwrap();
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5151);
        let floor: Vec<u8> = (0..W * H).map(|_| rng.random_range(30..90)).collect();
        let t0 = Instant::now();
        let mut now = t0;
        let mut frame = 0usize;
        let mut ship = (W as f64 / 2.0, H as f64 - 40.0);
        let mut enemies: Vec<(f64, f64, f64, f64)> = (0..3)
            .map(|_| (rng.random_range(0.0..W as f64), rng.random_range(0.0..H as f64 / 2.0), 0.0, 1.0))
            .collect();
        let mut held: VecDeque<(Instant, i8)> = VecDeque::new();
        let mut velocity = 0i8;
        let mut sent = Vec::new();
        let mut luma = vec![0u8; W * H];
        while !check.is_done() {
            assert!(now - t0 < Duration::from_secs(120), "the check ends");
            while let Some(e) = check.poll_input(now) {
                sent.push(e.clone());
                let v = match e {
                    InputEvent::KeyDown { key, .. } if key == left => -1,
                    InputEvent::KeyDown { key, .. } if key == right => 1,
                    InputEvent::KeyUp { .. } => 0,
                    _ => continue,
                };
                held.push_back((now + delay, v));
            }
            while held.front().is_some_and(|(at, _)| *at <= now) {
                velocity = held.pop_front().unwrap().1;
            }
            if answers {
                ship.0 += 4.0 * f64::from(velocity);
            } else {
                ship.0 += rng.random_range(-4.0..=4.0);
            }
            ship.0 = ship.0.clamp(8.0, W as f64 - 8.0);
            for e in &mut enemies {
                e.2 = (e.2 + rng.random_range(-0.5..=0.5)).clamp(-4.0, 4.0);
                e.0 = (e.0 + e.2).rem_euclid(W as f64);
                e.1 = (e.1 + e.3).rem_euclid(H as f64);
            }
            for y in 0..H {
                let from = (y + H - (2 * frame) % H) % H;
                luma[y * W..(y + 1) * W].copy_from_slice(&floor[from * W..(from + 1) * W]);
            }
            for (x, y) in enemies.iter().map(|e| (e.0, e.1)).chain([ship]) {
                let (x, y) = (x as usize, y as usize);
                for yy in y.saturating_sub(8)..(y + 8).min(H) {
                    for xx in x.saturating_sub(8)..(x + 8).min(W) {
                        luma[yy * W + xx] = 220;
                    }
                }
            }
            check.on_frame(now, W as u32, H as u32, &luma);
            now += Duration::from_micros(16_667);
            frame += 1;
        }
        let report = check.report();
        // Every key pressed is released, and the setup key came first.
        let downs = sent.iter().filter(|e| matches!(e, InputEvent::KeyDown { .. })).count();
        let ups = sent.iter().filter(|e| matches!(e, InputEvent::KeyUp { .. })).count();
        assert_eq!(downs, ups);
        assert!(matches!(sent[0], InputEvent::KeyDown { key, .. } if Some(key) == key_index("Enter")));
        report
    }

    #[test]
    fn a_title_that_answers_its_keys_passes_while_everything_else_moves() {
        for seed in 0..5 {
            let r = run(true, seed);
            assert!(r.passed(), "{:?}", r.failures);
            assert_eq!((r.pairs, r.answers.inputs, r.answers.shams), (16, 32, 8));
            assert!(r.p_value < 1e-4, "{}", r.p_value);
            // Enemies as big and as fast as the ship blur single presses; pairs agree.
            assert!(r.answers.answered >= 16, "{}", r.answers.answered);
            // 60 ms of delay, and frames every 16.7 ms.
            let p50 = r.answers.p50_ms.unwrap();
            assert!((60.0..=100.0).contains(&p50), "{p50}");
        }
    }

    #[test]
    fn a_stream_that_ignores_input_fails_however_it_animates() {
        let mut passed = 0;
        for seed in 0..20 {
            let r = run(false, seed);
            passed += u32::from(r.passed());
        }
        assert_eq!(passed, 0, "at most one in a thousand by chance; none in these 20");
    }

    #[test]
    fn a_title_never_seen_fails_without_hanging() {
        let mut check = ProbeCheck::new(&probe(), ProbeConfig::default(), 1).unwrap();
        let t0 = Instant::now();
        check.on_frame(t0, 0, 0, &[]);
        assert_eq!(check.poll_input(t0), None);
        let later = check.poll_timeout().unwrap();
        assert!(check.poll_input(later).is_none() && check.is_done());
        assert!(!check.report().passed());
    }

    #[test]
    fn the_sign_flip_test_counts_the_patterns_that_agree_as_much() {
        let mut rng = StdRng::seed_from_u64(3);
        // Ten identical Δs: only all-equal signs (2 of 1024, 1 of 512 with the first
        // fixed) agree as much.
        let same = vec![vec![1.0; 10]; 10];
        assert!((sign_flip_p(&same, &mut rng) - 1.0 / 512.0).abs() < 1e-12);
        // Orthogonal Δs agree on nothing: every pattern ties.
        let orthogonal: Vec<Vec<f64>> = (0..6).map(|i| (0..6).map(|j| f64::from(u8::from(i == j))).collect()).collect();
        assert_eq!(sign_flip_p(&orthogonal, &mut rng), 1.0);
        assert_eq!(sign_flip_p(&[vec![4.0]], &mut rng), 1.0);
        // Twenty identical Δs: drawn patterns, the observed one counted.
        let many = vec![vec![1.0; 20]; 20];
        let p = sign_flip_p(&many, &mut rng);
        assert!((1.0 / 20_001.0..3.0 / 20_001.0).contains(&p), "{p}");
    }

    #[test]
    fn flow_is_signed_by_the_direction_whatever_the_contrast() {
        let (w, h) = (256u32, 96u32);
        let spot = |x0: u32, level: u8| {
            let mut luma = vec![120u8; (w * h) as usize];
            for y in 8..32 {
                for x in x0..x0 + 32 {
                    luma[(y * w + x) as usize] = level;
                }
            }
            Thumb::new(w, h, &luma).unwrap()
        };
        for level in [230, 20] {
            let f = flow(&spot(64, level), &spot(72, level));
            assert_eq!(f.len(), 2 * (1 + BANDS));
            assert!(f[0] > 0.0 && f[1].abs() < 1e-6, "moved right: {f:?}");
            assert!(f[2] > 0.0 && f[4] == 0.0 && f[6] == 0.0, "in the top band: {f:?}");
            let back = flow(&spot(72, level), &spot(64, level));
            assert!(back[0] < 0.0, "moved left: {back:?}");
        }
        assert!(flow(&spot(0, 200), &Thumb::new(64, 64, &[16; 64 * 64]).unwrap()).is_empty());
        let bad =
            ProbeCheck::new(&Probe { keys: ["Nope".into(), "ArrowLeft".into()], ..probe() }, ProbeConfig::default(), 0);
        assert!(bad.is_err());
    }
}
