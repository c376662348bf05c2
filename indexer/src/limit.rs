//! Rate limits on what anonymous callers can ask of the indexer, sans-IO (an explicit
//! `now`): one token bucket per key (a client address, a title), in a table of bounded
//! size.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How fast one key may go.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Requests per minute, sustained.
    pub per_minute: f64,
    /// Requests allowed at once.
    pub burst: f64,
}

impl Rate {
    /// `per_minute` sustained, `burst` at once.
    pub const fn new(per_minute: f64, burst: f64) -> Self {
        Self { per_minute, burst }
    }
}

/// Token buckets by key. Keys whose bucket has refilled are forgotten when the table
/// fills; if it is still full, requests of new keys are refused (the table's memory is
/// bounded whatever the number of addresses an attacker has).
#[derive(Debug)]
pub struct KeyedLimiter {
    rate: Rate,
    max_keys: usize,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl KeyedLimiter {
    /// A limiter at `rate` per key, remembering at most `max_keys` keys.
    pub fn new(rate: Rate, max_keys: usize) -> Self {
        Self { rate, max_keys, buckets: Mutex::new(HashMap::new()) }
    }

    fn refill(&self, tokens: f64, since: Instant, now: Instant) -> f64 {
        let per_second = self.rate.per_minute / 60.0;
        (tokens + now.saturating_duration_since(since).as_secs_f64() * per_second).min(self.rate.burst)
    }

    /// Takes one request for `key` at `now`: `Ok` if allowed, else how long until it
    /// would be.
    pub fn check(&self, key: &str, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if !buckets.contains_key(key) && buckets.len() >= self.max_keys {
            let rate = self.rate;
            buckets.retain(|_, (tokens, at)| {
                let per_second = rate.per_minute / 60.0;
                *tokens + now.saturating_duration_since(*at).as_secs_f64() * per_second < rate.burst
            });
            if buckets.len() >= self.max_keys {
                return Err(Duration::from_secs(1));
            }
        }
        let (tokens, at) = buckets.get(key).copied().unwrap_or((self.rate.burst, now));
        let tokens = self.refill(tokens, at, now);
        if tokens >= 1.0 {
            buckets.insert(key.to_string(), (tokens - 1.0, now));
            Ok(())
        } else {
            buckets.insert(key.to_string(), (tokens, now));
            let per_second = (self.rate.per_minute / 60.0).max(f64::MIN_POSITIVE);
            Err(Duration::from_secs_f64(((1.0 - tokens) / per_second).min(3600.0)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_gets_its_burst_then_its_rate_and_others_are_unaffected() {
        let t0 = Instant::now();
        let l = KeyedLimiter::new(Rate::new(60.0, 3.0), 100);
        let allowed = (0..200).filter(|_| l.check("10.0.0.1", t0).is_ok()).count();
        assert_eq!(allowed, 3);
        let wait = l.check("10.0.0.1", t0).unwrap_err();
        assert!(wait <= Duration::from_secs(1), "{wait:?}");
        assert!(l.check("10.0.0.2", t0).is_ok(), "another address has its own bucket");
        assert!(l.check("10.0.0.1", t0 + Duration::from_secs(1)).is_ok(), "one a second comes back");
    }

    #[test]
    fn the_table_stays_bounded_under_many_keys() {
        let t0 = Instant::now();
        let l = KeyedLimiter::new(Rate::new(6.0, 1.0), 50);
        let allowed = (0..10_000).filter(|i| l.check(&format!("k{i}"), t0).is_ok()).count();
        assert_eq!(allowed, 50, "new keys are refused while the table is full of fresh buckets");
        assert!(l.buckets.lock().unwrap().len() <= 50);
        // Once they have refilled, their places are reused.
        assert!(l.check("late", t0 + Duration::from_secs(600)).is_ok());
    }
}
