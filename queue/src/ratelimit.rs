//! Delivery rate limits: a token bucket per destination, for the runner.
//!
//! Owns: the [`RateLimit`] value (`queue.destination_rate`, `queue.destination_burst`,
//! the route attributes `rate=` and `burst=`) and the bucket arithmetic. A bucket holds at
//! most `burst` tokens, gains `rate` tokens per second, and each delivery to the
//! destination takes one; so in any interval of length T at most `burst + rate × T`
//! deliveries start.
//! Must never: sleep, lock or read a clock (the runner passes `now` and does the
//! waiting), or be shared between shards: each shard has its own buckets and enforces
//! its share of the configured rate (see docs/decisions.md, "Delivery rate limits").
//!
//! Tokens are counted in integer pico-tokens (10⁻¹² token) and rates in milli-messages
//! per second, so that one nanosecond at rate `r` mills adds exactly `r` pico-tokens: no
//! floating-point drift, and a caller that waits exactly the duration returned by
//! [`TokenBucket::try_take`] finds a whole token.

use std::time::{Duration, Instant};

/// Pico-tokens in one token.
const TOKEN: u128 = 1_000_000_000_000;

/// A rate limit: `milli_per_sec / 1000` messages per second, bursts of `burst`.
/// Integers, so that routes carrying one stay `Eq + Hash`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RateLimit {
    /// Messages per second × 1000 (0.5/s is 500). At least 1.
    pub milli_per_sec: u64,
    /// Tokens the bucket holds when full: deliveries that may start back to back after
    /// a quiet spell. At least 1.
    pub burst: u32,
}

impl RateLimit {
    /// `per_second` messages per second (fractions allowed, 0.001 resolution) with
    /// bursts of `burst` (0 = the rate rounded up, at least 1). `None` when
    /// `per_second` is not a positive finite number: no limit.
    pub fn per_second(per_second: f64, burst: u32) -> Option<RateLimit> {
        if !per_second.is_finite() || per_second <= 0.0 {
            return None;
        }
        let milli = (per_second * 1000.0).round().clamp(1.0, u64::MAX as f64) as u64;
        let burst = if burst == 0 {
            u32::try_from(milli.div_ceil(1000)).unwrap_or(u32::MAX)
        } else {
            burst
        };
        Some(RateLimit {
            milli_per_sec: milli,
            burst: burst.max(1),
        })
    }

    /// One shard's share when `shards` shards enforce this limit together: the rate
    /// divided by `shards`, the burst too (rounded down, at least 1 token).
    pub fn share(self, shards: usize) -> RateLimit {
        let n = shards.max(1) as u64;
        RateLimit {
            milli_per_sec: (self.milli_per_sec / n).max(1),
            burst: (u64::from(self.burst) / n).max(1) as u32,
        }
    }

    /// Messages per second, for logs and documentation.
    pub fn per_second_f64(self) -> f64 {
        self.milli_per_sec as f64 / 1000.0
    }
}

/// One destination's bucket.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    limit: RateLimit,
    /// Pico-tokens available at `last`.
    tokens: u128,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket: the first `burst` deliveries go at once.
    pub fn new(limit: RateLimit, now: Instant) -> TokenBucket {
        TokenBucket {
            limit,
            tokens: u128::from(limit.burst) * TOKEN,
            last: now,
        }
    }

    fn capacity(&self) -> u128 {
        u128::from(self.limit.burst) * TOKEN
    }

    fn refill(&mut self, now: Instant) {
        // A clock that went backwards (it cannot with Instant, but be safe) adds nothing.
        let ns = now.saturating_duration_since(self.last).as_nanos();
        let gained = ns.saturating_mul(u128::from(self.limit.milli_per_sec));
        self.tokens = self.tokens.saturating_add(gained).min(self.capacity());
        self.last = now;
    }

    /// Takes a token if there is one; otherwise says how long until there is (the
    /// bucket is unchanged then: a caller that gives up loses nothing).
    pub fn try_take(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.tokens >= TOKEN {
            self.tokens -= TOKEN;
            return Ok(());
        }
        let missing = TOKEN - self.tokens;
        let ns = missing.div_ceil(u128::from(self.limit.milli_per_sec));
        Err(Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX)))
    }

    /// Whether the bucket is full at `now`: it then behaves exactly like a new one and
    /// may be dropped (the runner forgets idle destinations this way).
    pub fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.capacity()
    }

    pub fn limit(&self) -> RateLimit {
        self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsing_and_share() {
        assert_eq!(RateLimit::per_second(0.0, 5), None);
        assert_eq!(RateLimit::per_second(-1.0, 5), None);
        assert_eq!(RateLimit::per_second(f64::NAN, 5), None);
        let r = RateLimit::per_second(2.5, 0).unwrap();
        assert_eq!((r.milli_per_sec, r.burst), (2500, 3));
        let r = RateLimit::per_second(0.2, 0).unwrap();
        assert_eq!((r.milli_per_sec, r.burst), (200, 1));
        let s = RateLimit::per_second(10.0, 7).unwrap().share(4);
        assert_eq!((s.milli_per_sec, s.burst), (2500, 1));
        let s = RateLimit::per_second(0.001, 1).unwrap().share(8);
        assert_eq!((s.milli_per_sec, s.burst), (1, 1));
    }

    #[test]
    fn waiting_the_returned_time_yields_a_token() {
        let t0 = Instant::now();
        let limit = RateLimit::per_second(3.0, 2).unwrap();
        let mut b = TokenBucket::new(limit, t0);
        assert!(b.try_take(t0).is_ok());
        assert!(b.try_take(t0).is_ok());
        let w = b.try_take(t0).unwrap_err();
        assert_eq!(w, Duration::from_nanos(333_333_334));
        // A failed take costs nothing; just before the wait there is still no token.
        assert!(b.try_take(t0 + w - Duration::from_nanos(1)).is_err());
        assert!(b.try_take(t0 + w).is_ok());
        assert!(!b.is_full(t0 + w));
        assert!(b.is_full(t0 + w + Duration::from_secs(1)));
    }

    /// The limiter's promise: however the takes are timed, no interval of length T sees
    /// more than burst + rate × T successful takes.
    #[test]
    fn no_window_exceeds_burst_plus_rate() {
        let t0 = Instant::now();
        for (rate, burst) in [(2.0, 1), (5.0, 3), (0.5, 2), (40.0, 10)] {
            let limit = RateLimit::per_second(rate, burst).unwrap();
            let mut b = TokenBucket::new(limit, t0);
            let mut taken = Vec::new();
            // Attempts at irregular times over 20 s, twice as often as the rate on
            // average: bursts, gaps, eager retries.
            let mean_gap_us = (500_000.0 / rate) as u64;
            let mut t = Duration::ZERO;
            let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
            while t < Duration::from_secs(20) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let step = Duration::from_micros(x % (2 * mean_gap_us));
                t += step;
                match b.try_take(t0 + t) {
                    Ok(()) => taken.push(t),
                    Err(w) if x % 3 == 0 => t += w, // a caller that waits exactly
                    Err(_) => {}
                }
            }
            // A sanity check that the limiter was exercised (a token nobody takes while
            // the bucket is full is lost, so this is well under the rate).
            assert!(
                taken.len() as f64 > rate * 20.0 / 3.0,
                "{rate}: too few: {}",
                taken.len()
            );
            for window in [Duration::from_millis(250), Duration::from_secs(1)] {
                let allowed = burst as f64 + rate * window.as_secs_f64();
                for (i, start) in taken.iter().enumerate() {
                    let n = taken[i..]
                        .iter()
                        .take_while(|&&u| u < *start + window)
                        .count();
                    assert!(
                        n as f64 <= allowed,
                        "rate {rate} burst {burst}: {n} takes in {window:?} from {start:?}"
                    );
                }
            }
        }
    }
}
