//! Repairing loss between the render node and the relay, without I/O.
//!
//! The node keeps what it sent for a short while ([`RetransmitCache`]); the relay watches
//! the sequence numbers it receives ([`UpstreamRepair`]) and asks for each gap once —
//! again only if the resend is lost too — so one upstream loss costs one request and one
//! resend, however many viewers are watching. Viewers' own NACKs never reach this code:
//! the relay answers them from its per-viewer send buffers.
//!
//! Both are driven by an explicit `now` and tested on a simulated clock through a seeded
//! lossy link (see `tests` and [`crate::impair`]).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

/// The node's memory of the RTP packets it sent, by sequence number, for `max_age`.
#[derive(Debug)]
pub struct RetransmitCache {
    max_age: Duration,
    max_packets: usize,
    /// Consecutive packets; `first_seq` is the sequence number of the front one.
    packets: VecDeque<(Instant, Vec<u8>)>,
    first_seq: u16,
}

impl RetransmitCache {
    /// A cache holding packets for `max_age` (and never more than `max_packets`).
    pub fn new(max_age: Duration, max_packets: usize) -> Self {
        Self { max_age, max_packets: max_packets.max(1), packets: VecDeque::new(), first_seq: 0 }
    }

    /// Remembers packet `seq`, sent at `now`. Packets arrive in sequence order; a jump
    /// (the packetizer restarted) starts the cache afresh.
    pub fn insert(&mut self, now: Instant, seq: u16, packet: &[u8]) {
        let next = self.first_seq.wrapping_add(self.packets.len() as u16);
        if self.packets.is_empty() || seq != next {
            self.packets.clear();
            self.first_seq = seq;
        }
        self.packets.push_back((now, packet.to_vec()));
        while self.packets.len() > self.max_packets
            || self.packets.front().is_some_and(|(t, _)| now.saturating_duration_since(*t) > self.max_age)
        {
            self.packets.pop_front();
            self.first_seq = self.first_seq.wrapping_add(1);
        }
    }

    /// The packet with sequence number `seq`, if still held.
    pub fn get(&self, seq: u16) -> Option<&[u8]> {
        let index = usize::from(seq.wrapping_sub(self.first_seq));
        self.packets.get(index).map(|(_, p)| p.as_slice())
    }

    /// Packets held.
    pub fn len(&self) -> usize {
        self.packets.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.packets.is_empty()
    }
}

/// How the relay asks for lost packets.
#[derive(Debug, Clone, Copy)]
pub struct RepairConfig {
    /// How long a gap may be reordering before it is a loss.
    pub reorder_wait: Duration,
    /// Requests per missing packet at most (the first and the retries).
    pub max_tries: u32,
    /// A packet missing for longer than this is given up (its frame is too old to show).
    pub max_age: Duration,
    /// A jump larger than this is a restart of the stream, not a loss.
    pub max_gap: u16,
}

impl Default for RepairConfig {
    fn default() -> Self {
        Self { reorder_wait: Duration::from_millis(3), max_tries: 5, max_age: Duration::from_millis(400), max_gap: 512 }
    }
}

#[derive(Debug, Clone, Copy)]
struct Missing {
    since: Instant,
    tries: u32,
    /// When this entry is next looked at (its key in `due`).
    due: Instant,
}

/// Most packets missing at once; past it the oldest gaps are given up. A peer that jumps
/// its sequence numbers can cost the relay at most this many entries.
pub const MAX_MISSING: usize = 2048;

/// Counters of the repair's work.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RepairStats {
    /// Sequence numbers requested (each try counts).
    pub requested: u64,
    /// Missing packets that arrived after all.
    pub repaired: u64,
    /// Missing packets given up (too old, out of tries, or past [`MAX_MISSING`]).
    pub given_up: u64,
    /// Packets seen twice (a resend after the original arrived late).
    pub duplicates: u64,
}

/// The relay's gap detector for one upstream stream. Missing packets sit in a queue
/// ordered by when each is next due (asked for, retried or given up), so a timer costs
/// only the entries that are due, and their number is bounded by [`MAX_MISSING`].
#[derive(Debug)]
pub struct UpstreamRepair {
    config: RepairConfig,
    /// Highest extended sequence number seen.
    highest: Option<u64>,
    missing: BTreeMap<u64, Missing>,
    due: BTreeSet<(Instant, u64)>,
    rtt: Duration,
    stats: RepairStats,
}

impl UpstreamRepair {
    /// A detector with `config`.
    pub fn new(config: RepairConfig) -> Self {
        Self {
            config,
            highest: None,
            missing: BTreeMap::new(),
            due: BTreeSet::new(),
            rtt: Duration::from_millis(10),
            stats: RepairStats::default(),
        }
    }

    /// The node↔relay round-trip time, which spaces retries.
    pub fn set_rtt(&mut self, rtt: Duration) {
        self.rtt = rtt;
    }

    /// What it has done so far.
    pub fn stats(&self) -> RepairStats {
        self.stats
    }

    /// Packets missing now.
    pub fn missing(&self) -> usize {
        self.missing.len()
    }

    fn retry(&self) -> Duration {
        (self.rtt * 3 / 2).max(Duration::from_millis(5))
    }

    fn forget(&mut self, seq: u64) -> bool {
        match self.missing.remove(&seq) {
            Some(m) => {
                self.due.remove(&(m.due, seq));
                true
            }
            None => false,
        }
    }

    fn clear(&mut self) {
        self.stats.given_up += self.missing.len() as u64;
        self.missing.clear();
        self.due.clear();
    }

    /// Records packet `seq` arriving at `now`; returns `false` for a duplicate, which the
    /// caller should drop.
    pub fn on_packet(&mut self, seq: u16, now: Instant) -> bool {
        let ext = crate::rtp::extend_sequence(self.highest, seq);
        let Some(highest) = self.highest else {
            self.highest = Some(ext);
            return true;
        };
        if ext > highest {
            let gap = ext - highest - 1;
            if gap > u64::from(self.config.max_gap) {
                // The stream restarted (a new node connection): nothing to repair.
                self.clear();
            } else {
                // Only the newest MAX_MISSING gaps are worth anything; older ones go first.
                let new = gap.min(MAX_MISSING as u64);
                while self.missing.len() as u64 + new > MAX_MISSING as u64 {
                    let Some((&oldest, _)) = self.missing.first_key_value() else { break };
                    self.forget(oldest);
                    self.stats.given_up += 1;
                }
                self.stats.given_up += gap - new;
                let due = now + self.config.reorder_wait;
                for s in ext - new..ext {
                    self.missing.insert(s, Missing { since: now, tries: 0, due });
                    self.due.insert((due, s));
                }
            }
            self.highest = Some(ext);
            true
        } else if self.forget(ext) {
            self.stats.repaired += 1;
            true
        } else {
            self.stats.duplicates += 1;
            false
        }
    }

    /// The sequence numbers to ask the node for now (at most `limit`), marking them asked.
    pub fn poll_requests(&mut self, now: Instant, limit: usize) -> Vec<u16> {
        let config = self.config;
        let retry = self.retry();
        let mut out = Vec::new();
        while out.len() < limit {
            let Some(&(due, seq)) = self.due.first() else { break };
            if due > now {
                break;
            }
            self.due.pop_first();
            let Some(m) = self.missing.get_mut(&seq) else { continue };
            // Give up on a packet too old to show, or whose last try had time to come back.
            if now.saturating_duration_since(m.since) > config.max_age || m.tries >= config.max_tries {
                self.missing.remove(&seq);
                self.stats.given_up += 1;
                continue;
            }
            m.tries += 1;
            m.due = (now + retry).min(m.since + config.max_age + Duration::from_nanos(1)).max(now);
            if m.tries >= config.max_tries {
                m.due = now + retry;
            }
            self.due.insert((m.due, seq));
            out.push(seq as u16);
        }
        self.stats.requested += out.len() as u64;
        out
    }

    /// When [`Self::poll_requests`] next has something to do.
    pub fn next_timeout(&self) -> Option<Instant> {
        self.due.first().map(|(t, _)| *t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::impair::{Impairment, LossModel};

    #[test]
    fn cache_holds_by_age_and_count() {
        let t0 = Instant::now();
        let mut c = RetransmitCache::new(Duration::from_millis(100), 1000);
        for i in 0..10u16 {
            c.insert(t0 + Duration::from_millis(u64::from(i) * 20), 65530u16.wrapping_add(i), &[i as u8]);
        }
        // At 180 ms, packets older than 100 ms are gone: those sent at 0..60 ms.
        assert_eq!(c.len(), 6);
        assert_eq!(c.get(65530), None);
        assert_eq!(c.get(65534), Some(&[4u8][..]));
        assert_eq!(c.get(3), Some(&[9u8][..]), "across the wrap");
        assert_eq!(c.get(4), None);
        let mut small = RetransmitCache::new(Duration::from_secs(1), 3);
        for i in 0..5u16 {
            small.insert(t0, i, &[0]);
        }
        assert_eq!((small.len(), small.get(1), small.get(2).is_some()), (3, None, true));
        small.insert(t0, 100, &[1]);
        assert_eq!((small.len(), small.get(100)), (1, Some(&[1u8][..])), "a jump restarts the cache");
    }

    #[test]
    fn a_gap_is_asked_for_once_after_the_reorder_wait_and_retried_only_if_still_missing() {
        let t0 = Instant::now();
        let mut r = UpstreamRepair::new(RepairConfig::default());
        r.set_rtt(Duration::from_millis(20));
        assert!(r.on_packet(10, t0));
        assert!(r.on_packet(13, t0));
        assert_eq!(r.missing(), 2);
        assert!(r.poll_requests(t0 + Duration::from_millis(1), 64).is_empty(), "might be reordering");
        // 11 arrives late: reordering, not loss.
        assert!(r.on_packet(11, t0 + Duration::from_millis(2)));
        assert_eq!(r.poll_requests(t0 + Duration::from_millis(3), 64), vec![12]);
        assert!(r.poll_requests(t0 + Duration::from_millis(10), 64).is_empty(), "not again within 1.5 RTT");
        assert_eq!(r.poll_requests(t0 + Duration::from_millis(34), 64), vec![12], "the resend was lost too");
        assert!(r.on_packet(12, t0 + Duration::from_millis(40)));
        assert!(!r.on_packet(12, t0 + Duration::from_millis(41)), "a duplicate is dropped");
        assert_eq!(r.stats(), RepairStats { requested: 2, repaired: 2, given_up: 0, duplicates: 1 });
        assert_eq!(r.next_timeout(), None);
    }

    #[test]
    fn sequence_jumps_cost_a_bounded_map_and_timers_touch_only_what_is_due() {
        let t0 = Instant::now();
        let mut r = UpstreamRepair::new(RepairConfig::default());
        let mut seq = 0u16;
        // An attacker's stream: every datagram jumps 512 ahead (just inside a gap).
        for i in 0..2_500u64 {
            seq = seq.wrapping_add(512);
            r.on_packet(seq, t0 + Duration::from_micros(i * 10));
            assert!(r.missing() <= MAX_MISSING);
        }
        assert_eq!(r.missing(), MAX_MISSING);
        let asked = r.poll_requests(t0 + Duration::from_millis(60), framing_limit());
        assert_eq!(asked.len(), framing_limit(), "one bounded batch per timer");
        assert!(r.next_timeout().is_some());
        // Everything is given up once too old, and nothing is left behind.
        for ms in (60..1_000).step_by(10) {
            r.poll_requests(t0 + Duration::from_millis(ms), usize::MAX);
        }
        assert_eq!((r.missing(), r.next_timeout()), (0, None));
    }

    fn framing_limit() -> usize {
        crate::framing::MAX_NACK_SEQS
    }

    #[test]
    fn old_or_hopeless_gaps_are_given_up_and_restarts_are_not_losses() {
        let t0 = Instant::now();
        let mut r = UpstreamRepair::new(RepairConfig { max_tries: 2, ..RepairConfig::default() });
        r.on_packet(1, t0);
        r.on_packet(3, t0);
        let mut asked = 0;
        for ms in (0..1000).step_by(5) {
            asked += r.poll_requests(t0 + Duration::from_millis(ms), 64).len();
        }
        assert_eq!(asked, 2, "two tries at most");
        assert_eq!(r.missing(), 0);
        assert_eq!(r.stats().given_up, 1);
        r.on_packet(40_000, t0 + Duration::from_secs(2));
        assert_eq!(r.missing(), 0, "a jump of thousands is a new stream");
        assert!(r.poll_requests(t0 + Duration::from_secs(3), 64).is_empty());
    }

    /// Node → lossy link (datagrams) → relay, with requests back on the control stream and
    /// resends through the lossy link again, on a simulated clock.
    fn recover_all(loss: LossModel, seed: u64) -> (usize, RepairStats) {
        let t0 = Instant::now();
        let one_way = Duration::from_millis(10);
        let mut down = Impairment::new(seed, loss, one_way, Duration::from_millis(1), 0.0);
        // Requests travel on the reliable QUIC control stream: late at worst, never lost.
        let mut up = Impairment::new(seed ^ 0xabcdef, LossModel::None, one_way, Duration::from_millis(1), 0.0);
        let mut cache = RetransmitCache::new(Duration::from_secs(1), 4096);
        let mut repair = UpstreamRepair::new(RepairConfig::default());
        repair.set_rtt(one_way * 2);
        let mut in_flight: Vec<(Instant, u16)> = Vec::new(); // to the relay
        let mut nacks: Vec<(Instant, Vec<u16>)> = Vec::new(); // to the node
        let mut received = std::collections::BTreeSet::new();
        // 5 s at 600 packets/s, then 0.5 s more: a loss is seen when a later packet arrives,
        // as in a live stream, so only the first 3000 are counted.
        let total = 3300u16;
        let step = Duration::from_micros(500);
        let mut now = t0;
        let mut next_send = 0u32;
        while now < t0 + Duration::from_secs(7) {
            // The node sends on schedule (600 packets/s) and resends what is asked.
            while next_send < u32::from(total) && t0 + Duration::from_micros(u64::from(next_send) * 1667) <= now {
                let seq = next_send as u16;
                cache.insert(now, seq, &[0; 8]);
                if let Some(at) = down.on_packet(now) {
                    in_flight.push((at, seq));
                }
                next_send += 1;
            }
            let (due, later): (Vec<_>, Vec<_>) = nacks.drain(..).partition(|(at, _)| *at <= now);
            nacks = later;
            for (_, seqs) in due {
                for seq in seqs {
                    if cache.get(seq).is_some()
                        && let Some(at) = down.on_packet(now)
                    {
                        in_flight.push((at, seq));
                    }
                }
            }
            // The relay receives, and asks for gaps.
            let (arrived, later): (Vec<_>, Vec<_>) = in_flight.drain(..).partition(|(at, _)| *at <= now);
            in_flight = later;
            for (_, seq) in arrived {
                if repair.on_packet(seq, now) && seq < 3000 {
                    received.insert(seq);
                }
            }
            let ask = repair.poll_requests(now, crate::framing::MAX_NACK_SEQS);
            if !ask.is_empty()
                && let Some(at) = up.on_packet(now)
            {
                nacks.push((at, ask));
            }
            now += step;
        }
        (received.len(), repair.stats())
    }

    #[test]
    fn every_packet_is_recovered_under_bursty_loss() {
        for (loss_pct, seed) in [1.0, 5.0, 10.0].into_iter().flat_map(|l| (1..=4).map(move |seed| (l, seed))) {
            let model = LossModel::bursty(loss_pct / 100.0, 3.0);
            let (got, stats) = recover_all(model, seed);
            assert_eq!(got, 3000, "{loss_pct}% bursty loss: {stats:?}");
            // Each loss costs about one request: the storm stays proportional to loss.
            let losses = 3000.0 * loss_pct / 100.0;
            assert!((stats.requested as f64) < losses * 2.5 + 20.0, "{loss_pct}%: {stats:?}");
        }
    }

    #[test]
    fn requests_stay_bounded_whatever_the_loss() {
        // Total loss upstream for a while: each missing packet is asked for at most
        // max_tries times, then given up; nothing grows without bound.
        let (got, stats) = recover_all(LossModel::Random(0.6), 9);
        assert!(got < 3000);
        assert!(stats.requested <= 3000 * u64::from(RepairConfig::default().max_tries), "{stats:?}");
    }
}
