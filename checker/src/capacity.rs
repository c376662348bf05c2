//! The proof-of-capacity check over the session, I/O-free: the checker sends a challenge
//! sized for the GPU class the node claims ([`Budget::for_class`]), times the node's
//! commitment against the class's deadline, reassembles the product the relay passes on,
//! checks it against the commitment, and verifies it with Freivalds' algorithm.
//!
//! Messages from the relay on the input channel: the commitment or a refusal as text
//! (`{"type":"capacity","seq":…,"digest":"<hex>","gpu_us":…,"wall_us":…}` or
//! `{…,"refused":"<why>"}`), the product as binary chunks (`seq` u32, `offset` u32, then
//! bytes; big endian).

use pylon_proto::capacity::{Assembly, Budget, Challenge, parse_chunk_message, verify};
use pylon_proto::input::InputEvent;
use serde::Deserialize;
use std::time::{Duration, Instant};

/// How long after its commitment the whole product may take to arrive (it crosses the
/// node's uplink and the checker's DataChannel; the deadline is on the commitment).
pub const PRODUCT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a late commitment is still waited for, to report how late it was.
pub const LATE_GRACE: Duration = Duration::from_secs(10);

/// What the capacity check found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CapacityReport {
    /// The GPU class the node claims.
    pub class: u8,
    /// The challenge's matrix size.
    pub n: u32,
    /// How long the commitment may take, ms.
    pub deadline_ms: f64,
    /// How long it took (challenge sent → commitment received), ms.
    pub answered_ms: Option<f64>,
    /// Throughput the answer shows, multiply-adds per second ÷ 10⁹ (`n³` over `answered_ms`,
    /// so a lower bound: the network and the node's overhead count against it).
    pub gops: Option<f64>,
    /// The node's own report of its GPU time, ms (not trusted; for comparison).
    pub node_gpu_ms: Option<f64>,
    /// The product arrived whole, matched the commitment and verified.
    pub verified: bool,
    /// Verification on the checker (deriving the matrices, reassembly, Freivalds), ms.
    pub verify_ms: Option<f64>,
    /// Rules that failed.
    pub failures: Vec<String>,
}

impl CapacityReport {
    /// Whether the node proved the capacity its class claims.
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

#[derive(Debug, Deserialize)]
struct Reply {
    #[serde(rename = "type")]
    kind: String,
    seq: u32,
    #[serde(default)]
    digest: Option<String>,
    #[serde(default)]
    gpu_us: Option<u64>,
    #[serde(default)]
    refused: Option<String>,
}

#[derive(Debug)]
enum State {
    /// Not sent yet.
    Ready,
    /// Sent at `at` as input `seq`, due by `deadline`.
    Sent {
        at: Instant,
        seq: u32,
        deadline: Duration,
    },
    /// Committed in time; the product is arriving.
    Receiving {
        seq: u32,
        assembly: Assembly,
        by: Instant,
    },
    Done,
}

/// One proof-of-capacity challenge and its judgement.
#[derive(Debug)]
pub struct CapacityCheck {
    class: u8,
    budget: Budget,
    challenge: Challenge,
    state: State,
    report: CapacityReport,
}

impl CapacityCheck {
    /// A challenge for a node claiming GPU class `class`, from a random `seed`.
    pub fn new(class: u8, seed: [u8; 32]) -> Self {
        let budget = Budget::for_class(class);
        // The budget's sizes are valid by construction (a test holds them so).
        let challenge = Challenge::new(seed, budget.n).unwrap_or(Challenge { seed, n: 16 });
        let report = CapacityReport {
            class,
            n: challenge.n,
            deadline_ms: 0.0,
            answered_ms: None,
            gops: None,
            node_gpu_ms: None,
            verified: false,
            verify_ms: None,
            failures: Vec::new(),
        };
        Self { class, budget, challenge, state: State::Ready, report }
    }

    /// The input event that carries the challenge.
    pub fn input(&self) -> InputEvent {
        InputEvent::Capacity { seed: self.challenge.seed, n: u16::try_from(self.challenge.n).unwrap_or(u16::MAX) }
    }

    /// The challenge left as input message `seq` at `now`; `rtt` is the path's round trip.
    pub fn on_sent(&mut self, now: Instant, seq: u32, rtt: Duration) {
        let deadline = self.budget.deadline(rtt);
        self.report.deadline_ms = ms(deadline);
        self.state = State::Sent { at: now, seq, deadline };
    }

    fn fail(&mut self, why: String) {
        self.report.failures.push(why);
        self.state = State::Done;
    }

    /// A text message from the relay; `true` if it was about this challenge.
    pub fn on_text(&mut self, now: Instant, text: &str) -> bool {
        let Ok(reply) = serde_json::from_str::<Reply>(text) else { return false };
        let (at, seq, deadline) = match self.state {
            State::Sent { at, seq, deadline } if reply.kind == "capacity" && reply.seq == seq => (at, seq, deadline),
            _ => return false,
        };
        if let Some(why) = reply.refused {
            self.fail(format!("capacity: the node refused the challenge ({why})"));
            return true;
        }
        let took = now.duration_since(at);
        self.report.answered_ms = Some(ms(took));
        self.report.gops = Some(self.challenge.work() as f64 / took.as_secs_f64().max(1e-6) / 1e9);
        self.report.node_gpu_ms = reply.gpu_us.map(|us| us as f64 / 1000.0);
        let digest = reply.digest.and_then(|d| hex::decode(d).ok()).and_then(|d| <[u8; 32]>::try_from(d).ok());
        let Some(digest) = digest else {
            self.fail("capacity: the commitment is malformed".into());
            return true;
        };
        if took > deadline {
            self.fail(format!(
                "capacity: the {n}x{n} product took {:.0} ms; GPU class {} must answer within {:.0} ms",
                ms(took),
                self.class,
                ms(deadline),
                n = self.challenge.n
            ));
            return true;
        }
        self.state =
            State::Receiving { seq, assembly: Assembly::new(&self.challenge, digest), by: now + PRODUCT_TIMEOUT };
        true
    }

    /// A binary message from the relay (a chunk of the product).
    pub fn on_binary(&mut self, rng: &mut impl rand::RngCore, data: &[u8]) {
        let State::Receiving { seq, assembly, .. } = &mut self.state else { return };
        let Some((chunk_seq, offset, bytes)) = parse_chunk_message(data) else { return };
        if chunk_seq != *seq {
            return;
        }
        match assembly.push(offset, bytes) {
            Ok(false) => {}
            Ok(true) => {
                let State::Receiving { assembly, .. } = std::mem::replace(&mut self.state, State::Done) else {
                    return;
                };
                self.judge(assembly, rng);
            }
            Err(e) => self.fail(format!("capacity: the product is malformed ({e})")),
        }
    }

    fn judge(&mut self, assembly: Assembly, rng: &mut impl rand::RngCore) {
        let started = Instant::now();
        let product = match assembly.finish() {
            Ok(p) => p,
            Err(e) => return self.fail(format!("capacity: {e}")),
        };
        let (a, b) = self.challenge.matrices();
        let ok = verify(&self.challenge, &a, &b, &product, rng);
        self.report.verify_ms = Some(ms(started.elapsed()));
        match ok {
            Ok(true) => self.report.verified = true,
            Ok(false) => self.fail("capacity: the product is wrong (Freivalds' check failed)".into()),
            Err(e) => self.fail(format!("capacity: {e}")),
        }
    }

    /// When [`Self::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.state {
            State::Sent { at, deadline, .. } => Some(*at + *deadline + LATE_GRACE),
            State::Receiving { by, .. } => Some(*by),
            State::Ready | State::Done => None,
        }
    }

    /// Gives up on answers that are overdue.
    pub fn handle_timeout(&mut self, now: Instant) {
        match &self.state {
            State::Sent { at, deadline, .. } if now >= *at + *deadline + LATE_GRACE => self.fail(format!(
                "capacity: no answer to the {n}x{n} challenge ({:.0} ms allowed for GPU class {})",
                ms(*deadline),
                self.class,
                n = self.challenge.n
            )),
            State::Receiving { by, assembly, .. } if now >= *by => {
                let got = assembly.received();
                self.fail(format!("capacity: the product stopped after {got} bytes"));
            }
            _ => {}
        }
    }

    /// Whether the challenge was sent.
    pub fn is_started(&self) -> bool {
        !matches!(self.state, State::Ready)
    }

    /// Whether the judgement is made.
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// The judgement so far (a challenge never answered is a failure).
    pub fn report(&self) -> CapacityReport {
        let mut r = self.report.clone();
        if !self.is_done() && r.failures.is_empty() {
            r.failures.push(format!("capacity: the {n}x{n} challenge was not answered", n = self.challenge.n));
        }
        r
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use pylon_proto::capacity::{CHUNK_BYTES, chunk_message, digest, multiply, product_bytes};
    use rand::SeedableRng;

    fn answer(product: &[u32]) -> (String, Vec<Vec<u8>>) {
        let bytes = product_bytes(product);
        let text = format!(
            r#"{{"type":"capacity","seq":9,"digest":"{}","gpu_us":1500,"wall_us":2000}}"#,
            hex::encode(digest(&bytes))
        );
        let chunks =
            bytes.chunks(CHUNK_BYTES).enumerate().map(|(i, c)| chunk_message(9, (i * CHUNK_BYTES) as u32, c)).collect();
        (text, chunks)
    }

    fn run(class: u8, delay: Duration, corrupt: bool) -> CapacityReport {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let mut check = CapacityCheck::new(class, [8; 32]);
        let InputEvent::Capacity { seed, n } = check.input() else { panic!() };
        let challenge = Challenge::new(seed, u32::from(n)).unwrap();
        let t0 = Instant::now();
        check.on_sent(t0, 9, Duration::from_millis(2));
        let (a, b) = challenge.matrices();
        let mut product = multiply(&a, &b, n as usize);
        if corrupt {
            product[17] = product[17].wrapping_add(1);
        }
        let (text, chunks) = answer(&product);
        assert!(!check.on_text(t0 + delay, r#"{"type":"capacity","seq":8,"refused":"busy"}"#), "another challenge's");
        assert!(check.on_text(t0 + delay, &text));
        for c in &chunks {
            check.on_binary(&mut rng, c);
        }
        check.handle_timeout(t0 + delay + PRODUCT_TIMEOUT + LATE_GRACE);
        assert!(check.is_done());
        check.report()
    }

    #[test]
    fn an_honest_answer_in_time_passes_and_a_late_or_wrong_one_fails() {
        let ok = run(0, Duration::from_millis(30), false);
        assert!(ok.passed(), "{:?}", ok.failures);
        assert!(ok.verified && ok.n == 128 && ok.gops.unwrap() > 0.05);
        // The same answer, but from a node that claims a discrete GPU: far too slow.
        let late = run(2, Duration::from_millis(800), false);
        assert!(!late.passed() && late.failures[0].contains("took 800 ms"), "{:?}", late.failures);
        let wrong = run(0, Duration::from_millis(30), true);
        assert!(!wrong.passed() && wrong.failures[0].contains("Freivalds"), "{:?}", wrong.failures);
    }

    #[test]
    fn silence_a_refusal_and_a_product_that_stops_all_fail() {
        let t0 = Instant::now();
        let mut silent = CapacityCheck::new(1, [1; 32]);
        assert!(!silent.is_started());
        silent.on_sent(t0, 3, Duration::ZERO);
        assert!(silent.poll_timeout().is_some());
        silent.handle_timeout(t0 + Duration::from_secs(1));
        assert!(!silent.is_done());
        assert!(!silent.report().passed());
        silent.handle_timeout(t0 + Duration::from_secs(20));
        assert!(silent.is_done() && silent.report().failures[0].contains("no answer"));

        let mut refused = CapacityCheck::new(0, [1; 32]);
        refused.on_sent(t0, 3, Duration::ZERO);
        assert!(refused.on_text(t0, r#"{"type":"capacity","seq":3,"refused":"busy"}"#));
        assert!(refused.report().failures[0].contains("refused"));

        let mut stops = CapacityCheck::new(0, [1; 32]);
        stops.on_sent(t0, 9, Duration::ZERO);
        let (text, chunks) = answer(&[0; 128 * 128]);
        assert!(stops.on_text(t0, &text));
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        stops.on_binary(&mut rng, &chunks[0]);
        stops.handle_timeout(t0 + PRODUCT_TIMEOUT);
        assert!(stops.report().failures[0].contains("stopped after 4000 bytes"));
    }
}
