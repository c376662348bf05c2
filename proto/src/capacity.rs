//! Proof of capacity: an integer matrix product the checker can verify far more cheaply than
//! the node can compute it.
//!
//! The checker sends a [`Challenge`] — a random seed and a size `n`. Both sides derive the
//! same `n × n` matrices `A` and `B` of 32-bit words from the seed ([`Challenge::matrices`],
//! ChaCha8, so neither can be guessed before the seed is known). The node computes
//! `C = A·B mod 2³²` on its GPU (`n³` multiply-adds) and returns `C`; the checker accepts it
//! with [`verify`], Freivalds' algorithm: for a random vector `r`, `C·r = A·(B·r)` — three
//! matrix-vector products, `3n²` multiply-adds per round.
//!
//! Soundness over the ring ℤ/2³²: if `C ≠ A·B`, some entry `d` of `D = C − A·B` is non-zero;
//! with 2-adic valuation `v` (`d = 2^v · odd`), `d·r_j` hits any one value for at most
//! `2^v` of the `2³²` choices of `r_j`, so one round misses the error with probability at
//! most `2^(v−32)`. A wrong answer that is garbage (no work done, a replay of another
//! seed's answer) has `v = 0` almost surely and escapes a round with probability `2⁻³²`;
//! the worst case — errors only in the top bit, which saves the node no work — escapes a
//! round with probability ½, so [`VERIFY_ROUNDS`] rounds bound it by `2^-ROUNDS`.
//!
//! Over a session the checker sends the challenge as an input message
//! ([`crate::input::InputEvent::Capacity`]) and times the answer against what the node's
//! claimed GPU class implies ([`Budget`]): the node first sends a *commitment* to `C` (its
//! SHA-256, [`digest`]), which it cannot produce without computing `C`, then `C` itself in
//! chunks ([`CHUNK_BYTES`]); the checker takes the time to the commitment, reassembles `C`
//! ([`Assembly`]), checks it against the commitment and verifies it.
//!
//! Pure: no I/O, no clock; the caller brings the randomness for `r`.

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};
use std::time::Duration;
use thiserror::Error;

/// Matrix sizes must be a multiple of this (the GPU shader's tile edge).
pub const TILE: u32 = 16;
/// The largest challenge: 4096 × 4096 (64 MiB per matrix).
pub const MAX_N: u32 = 4096;
/// Freivalds rounds [`verify`] runs: a wrong product escapes all of them with probability
/// at most `2^-VERIFY_ROUNDS` (and `2^(-32·VERIFY_ROUNDS)` for a product that is garbage).
pub const VERIFY_ROUNDS: u32 = 8;

/// Bytes of the product per chunk message (a chunk and its header fit one control message).
pub const CHUNK_BYTES: usize = 4000;
/// The largest challenge a node answers over a session (its product, 4 MiB, is streamed back).
pub const MAX_SESSION_N: u32 = 1024;
/// What the deadline allows beyond the compute time the claimed class implies: deriving
/// `A` and `B` on the node's CPU, upload, read-back, hashing and scheduling.
pub const ALLOWANCE: Duration = Duration::from_millis(50);

/// What a claimed GPU class is held to: the challenge's size and the least throughput
/// (32-bit multiply-adds per second) a device of that class reaches on the `matmul`
/// shader. Floors are deliberately low, far below the class's hardware: they catch a node
/// that claims a class *far* above what it computes, not one a little slower than its peers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    /// Matrix size.
    pub n: u32,
    /// Least throughput, multiply-adds per second.
    pub floor_ops: f64,
}

impl Budget {
    /// The budget of GPU class `class` (0: CPU renderer, 1: integrated, 2 and above: discrete).
    ///
    /// | class | n   | floor        | (for scale) lavapipe on 2 cores |
    /// |-------|-----|--------------|----------------------------------|
    /// | 0     | 128 | 0.01 Gop/s   | 0.14–0.23 Gop/s                   |
    /// | 1     | 384 | 2 Gop/s      |                                  |
    /// | 2+    | 512 | 10 Gop/s     |                                  |
    pub fn for_class(class: u8) -> Self {
        match class {
            0 => Budget { n: 128, floor_ops: 0.01e9 },
            1 => Budget { n: 384, floor_ops: 2e9 },
            _ => Budget { n: 512, floor_ops: 10e9 },
        }
    }

    /// How long after sending the challenge its commitment may arrive: the compute time at
    /// the floor, [`ALLOWANCE`], and two round trips of `rtt` (the challenge out, the
    /// commitment back, with slack for the path's jitter).
    pub fn deadline(&self, rtt: Duration) -> Duration {
        let work = u64::from(self.n).pow(3) as f64;
        Duration::from_secs_f64(work / self.floor_ops) + ALLOWANCE + rtt * 2
    }
}

/// The product's bytes as they travel: each word little-endian, row-major.
pub fn product_bytes(c: &[u32]) -> Vec<u8> {
    c.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// A chunk of a product as the relay passes it to the checker in one binary DataChannel
/// message: `seq` (the challenge's input sequence number) u32, `offset` u32 (big endian),
/// then the bytes.
pub fn chunk_message(seq: u32, offset: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + data.len());
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// `(seq, offset, bytes)` of a [`chunk_message`]; `None` for a message too short to be one.
pub fn parse_chunk_message(message: &[u8]) -> Option<(u32, u32, &[u8])> {
    let (seq, rest) = message.split_first_chunk::<4>()?;
    let (offset, data) = rest.split_first_chunk::<4>()?;
    Some((u32::from_be_bytes(*seq), u32::from_be_bytes(*offset), data))
}

/// The commitment to a product: SHA-256 of [`product_bytes`].
pub fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// The checker's reassembly of a product streamed in chunks after its commitment. Chunks
/// arrive in order (one reliable, ordered stream on each hop); anything else is an error.
#[derive(Debug, Clone)]
pub struct Assembly {
    n: u32,
    digest: [u8; 32],
    bytes: Vec<u8>,
}

impl Assembly {
    /// Expects the product of `challenge`, committed to as `digest`.
    pub fn new(challenge: &Challenge, digest: [u8; 32]) -> Self {
        Self { n: challenge.n, digest, bytes: Vec::new() }
    }

    fn want(&self) -> usize {
        (self.n as usize) * (self.n as usize) * 4
    }

    /// Adds the chunk at byte `offset`; `Ok(true)` once the product is complete.
    pub fn push(&mut self, offset: u32, data: &[u8]) -> Result<bool, CapacityError> {
        if offset as usize != self.bytes.len() {
            return Err(CapacityError::OutOfOrder { offset, expected: self.bytes.len() });
        }
        if data.is_empty() || self.bytes.len() + data.len() > self.want() {
            return Err(CapacityError::WrongLength {
                n: self.n,
                want: self.want() / 4,
                got: (self.bytes.len() + data.len()).div_ceil(4),
            });
        }
        self.bytes.extend_from_slice(data);
        Ok(self.bytes.len() == self.want())
    }

    /// Bytes received so far.
    pub fn received(&self) -> usize {
        self.bytes.len()
    }

    /// The product, if it is complete and matches the commitment.
    pub fn finish(self) -> Result<Vec<u32>, CapacityError> {
        if self.bytes.len() != self.want() {
            return Err(CapacityError::WrongLength { n: self.n, want: self.want() / 4, got: self.bytes.len() / 4 });
        }
        if digest(&self.bytes) != self.digest {
            return Err(CapacityError::NotCommitted);
        }
        Ok(self.bytes.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap_or_default())).collect())
    }
}

/// Why a challenge or an answer is refused.
#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum CapacityError {
    /// The size is zero, not a multiple of [`TILE`], or above [`MAX_N`].
    #[error("matrix size {0} must be a non-zero multiple of {TILE} up to {MAX_N}")]
    BadSize(u32),
    /// An answer of the wrong length.
    #[error("the product has {got} words, a {n}x{n} product has {want}")]
    WrongLength {
        /// The challenge's size.
        n: u32,
        /// Words expected.
        want: usize,
        /// Words received.
        got: usize,
    },
    /// A chunk of the product that does not continue the bytes received so far.
    #[error("a chunk at byte {offset} where byte {expected} was next")]
    OutOfOrder {
        /// The chunk's offset.
        offset: u32,
        /// The next byte expected.
        expected: usize,
    },
    /// The product sent is not the one committed to.
    #[error("the product does not match the commitment sent before it")]
    NotCommitted,
}

/// A proof-of-capacity challenge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Challenge {
    /// Random, chosen by the checker when it sends the challenge.
    pub seed: [u8; 32],
    /// Matrix size (rows = columns).
    pub n: u32,
}

impl Challenge {
    /// A challenge of size `n` from `seed`.
    pub fn new(seed: [u8; 32], n: u32) -> Result<Self, CapacityError> {
        if n == 0 || !n.is_multiple_of(TILE) || n > MAX_N {
            return Err(CapacityError::BadSize(n));
        }
        Ok(Self { seed, n })
    }

    /// Multiply-adds the product takes (`n³`).
    pub fn work(&self) -> u64 {
        u64::from(self.n).pow(3)
    }

    /// The matrices `A` and `B`, row-major, derived from the seed.
    pub fn matrices(&self) -> (Vec<u32>, Vec<u32>) {
        let len = (self.n as usize) * (self.n as usize);
        let mut rng = ChaCha8Rng::from_seed(self.seed);
        let mut fill = |len: usize| {
            let mut bytes = vec![0u8; len * 4];
            rng.fill_bytes(&mut bytes);
            bytes.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap_or_default())).collect::<Vec<u32>>()
        };
        let a = fill(len);
        let b = fill(len);
        (a, b)
    }
}

/// `C = A·B mod 2³²` on the CPU, the plain way (`n³`): what an honest node's GPU computes,
/// for tests and as the benchmark's baseline. Row-major `n × n` inputs.
pub fn multiply(a: &[u32], b: &[u32], n: usize) -> Vec<u32> {
    let mut c = vec![0u32; n * n];
    for (i, row) in c.chunks_exact_mut(n).enumerate() {
        for (k, &aik) in a.iter().skip(i * n).take(n).enumerate() {
            for (cij, &bkj) in row.iter_mut().zip(b.iter().skip(k * n).take(n)) {
                *cij = cij.wrapping_add(aik.wrapping_mul(bkj));
            }
        }
    }
    c
}

/// `M·v mod 2³²` for a row-major `n × n` matrix.
fn mat_vec(m: &[u32], v: &[u32], n: usize) -> Vec<u32> {
    m.chunks_exact(n)
        .map(|row| row.iter().zip(v).fold(0u32, |acc, (&x, &y)| acc.wrapping_add(x.wrapping_mul(y))))
        .collect()
}

/// Whether `c` is `A·B mod 2³²` for `challenge`'s matrices, by [`VERIFY_ROUNDS`] rounds of
/// Freivalds' check with random vectors from `rng`. `Err` for an answer of the wrong shape.
pub fn verify(
    challenge: &Challenge,
    a: &[u32],
    b: &[u32],
    c: &[u32],
    rng: &mut impl RngCore,
) -> Result<bool, CapacityError> {
    let n = challenge.n as usize;
    let want = n * n;
    for got in [a.len(), b.len(), c.len()] {
        if got != want {
            return Err(CapacityError::WrongLength { n: challenge.n, want, got });
        }
    }
    for _ in 0..VERIFY_ROUNDS {
        let r: Vec<u32> = (0..n).map(|_| rng.next_u32()).collect();
        if mat_vec(c, &r, n) != mat_vec(a, &mat_vec(b, &r, n), n) {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng() -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(7)
    }

    #[test]
    fn the_matrices_follow_from_the_seed_alone() {
        let c = Challenge::new([1; 32], 32).unwrap();
        assert_eq!(c.matrices(), c.matrices());
        let other = Challenge::new([2; 32], 32).unwrap();
        assert_ne!(c.matrices().0, other.matrices().0);
        let (a, b) = c.matrices();
        assert_ne!(a, b);
        assert_eq!(a.len(), 32 * 32);
    }

    #[test]
    fn a_product_is_reassembled_only_as_committed() {
        let ch = Challenge::new([3; 32], 32).unwrap();
        let (a, b) = ch.matrices();
        let bytes = product_bytes(&multiply(&a, &b, 32));
        let mut whole = Assembly::new(&ch, digest(&bytes));
        let mut done = false;
        for (i, chunk) in bytes.chunks(1000).enumerate() {
            assert!(!done);
            done = whole.push((i * 1000) as u32, chunk).unwrap();
        }
        assert!(done);
        let c = whole.finish().unwrap();
        assert_eq!(verify(&ch, &a, &b, &c, &mut rng()), Ok(true));
        // A product other than the one committed to.
        let mut other = Assembly::new(&ch, digest(&bytes));
        let mut changed = bytes.clone();
        changed[5] ^= 1;
        other.push(0, &changed).unwrap();
        assert_eq!(other.finish().unwrap_err(), CapacityError::NotCommitted);
        // A gap, a repeat, too much, too little.
        let mut gap = Assembly::new(&ch, digest(&bytes));
        assert!(matches!(gap.push(8, &bytes[8..16]), Err(CapacityError::OutOfOrder { .. })));
        gap.push(0, &bytes[..8]).unwrap();
        assert!(matches!(gap.push(0, &bytes[..8]), Err(CapacityError::OutOfOrder { .. })));
        assert!(matches!(gap.push(8, &[0; 32 * 32 * 4]), Err(CapacityError::WrongLength { .. })));
        assert!(matches!(gap.push(8, &[]), Err(CapacityError::WrongLength { .. })));
        assert!(matches!(gap.finish(), Err(CapacityError::WrongLength { .. })));
    }

    #[test]
    fn a_chunk_message_round_trips_and_a_short_one_is_refused() {
        let m = chunk_message(7, 4000, &[1, 2, 3]);
        assert_eq!(m, [0, 0, 0, 7, 0, 0, 0x0f, 0xa0, 1, 2, 3]);
        assert_eq!(parse_chunk_message(&m), Some((7, 4000, &[1u8, 2, 3][..])));
        assert_eq!(parse_chunk_message(&m[..7]), None);
    }

    #[test]
    fn a_claimed_class_sets_size_and_deadline() {
        let rtt = Duration::from_millis(10);
        let cpu = Budget::for_class(0);
        assert_eq!(cpu.n, 128);
        // 128³ at 0.01 Gop/s is 210 ms, plus the allowance and two round trips.
        assert_eq!(cpu.deadline(rtt).as_millis(), 209 + 50 + 20);
        let discrete = Budget::for_class(2);
        assert_eq!(Budget::for_class(7), discrete);
        assert!(discrete.deadline(rtt) < Duration::from_millis(90));
        for class in 0..3 {
            let b = Budget::for_class(class);
            assert!(Challenge::new([0; 32], b.n).is_ok() && b.n <= MAX_SESSION_N);
            assert!(b.n as usize * b.n as usize * 4 <= (MAX_SESSION_N as usize).pow(2) * 4);
        }
    }

    #[test]
    fn sizes_are_checked() {
        for n in [0, 8, 17, MAX_N + TILE] {
            assert_eq!(Challenge::new([0; 32], n), Err(CapacityError::BadSize(n)));
        }
        assert!(Challenge::new([0; 32], MAX_N).is_ok());
    }

    #[test]
    fn the_product_wraps_mod_2_32() {
        // [[2^31, 1], [3, 4]] · [[2, 5], [6, 7]]
        let a = [1u32 << 31, 1, 3, 4];
        let b = [2u32, 5, 6, 7];
        let c = multiply(&a, &b, 2);
        assert_eq!(c, vec![6, (1u32 << 31).wrapping_mul(5).wrapping_add(7), 30, 43]);
    }

    #[test]
    fn a_true_product_passes_and_every_kind_of_false_one_fails() {
        let ch = Challenge::new([9; 32], 64).unwrap();
        let (a, b) = ch.matrices();
        let c = multiply(&a, &b, 64);
        assert_eq!(verify(&ch, &a, &b, &c, &mut rng()), Ok(true));
        // One wrong word, anywhere.
        for (i, delta) in [(0usize, 1u32), (64 * 64 - 1, 1 << 20), (1234, 3)] {
            let mut bad = c.clone();
            bad[i] = bad[i].wrapping_add(delta);
            assert_eq!(verify(&ch, &a, &b, &bad, &mut rng()), Ok(false), "word {i} off by {delta}");
        }
        // Only the top bit wrong (the hardest error to see): caught with probability
        // 1 - 2^-8 per check; over 64 checks all but a few percent of a chance.
        let mut bad = c.clone();
        bad[77] ^= 1 << 31;
        let mut r = rng();
        let caught = (0..64).filter(|_| verify(&ch, &a, &b, &bad, &mut r) == Ok(false)).count();
        assert!(caught >= 63, "top-bit error caught {caught}/64");
        // Another seed's product (a replay), zeros (no work), the wrong shape.
        let other = Challenge::new([10; 32], 64).unwrap();
        let (oa, ob) = other.matrices();
        assert_eq!(verify(&ch, &a, &b, &multiply(&oa, &ob, 64), &mut rng()), Ok(false));
        assert_eq!(verify(&ch, &a, &b, &vec![0; 64 * 64], &mut rng()), Ok(false));
        assert!(matches!(verify(&ch, &a, &b, &c[1..], &mut rng()), Err(CapacityError::WrongLength { .. })));
    }
}
