//! Per-shard challenge/nonce cache and random source.
//!
//! Owns: generating the server nonces of DIGEST-MD5 (RFC 2831 §2.1.1) and
//! SCRAM (RFC 5802 §5.1 `r=`), and the random part of CRAM-MD5 challenges;
//! remembering which nonces this shard issued and when; accepting each one
//! ONCE before it expires.
//!
//! Must never: be shared between shards or threads (it has no locks on
//! purpose: thread-per-core, one cache per shard, `!Sync` by construction is
//! not needed because the shard owns it by `&mut`), grow without bound, or
//! accept a nonce twice.
//!
//! Random source: one `StdRng` (ChaCha12, a CSPRNG) per cache, seeded once
//! from the OS. Nonces must be unpredictable — a predictable DIGEST-MD5 or
//! SCRAM nonce lets an attacker precompute or replay — so a non-cryptographic
//! `SmallRng` is not acceptable; ChaCha12 costs a few ns per nonce, and
//! seeding once per shard avoids a `getrandom` syscall per AUTH.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

/// Random bytes per generated nonce: 144 bits, 24 base64 characters (no `=`
/// padding, no `,` — valid in SCRAM's `r=` and in a DIGEST quoted-string).
pub const NONCE_RANDOM_BYTES: usize = 18;

/// Why a nonce was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonceError {
    /// Never issued by this shard, already used, or evicted.
    Unknown,
    /// Issued, but older than the TTL.
    Expired,
}

/// Issued nonces of one shard, bounded, each accepted once.
pub struct NonceCache {
    rng: StdRng,
    capacity: usize,
    ttl: Duration,
    /// Live nonces → (issue time, sequence number).
    live: HashMap<Box<[u8]>, (Instant, u64)>,
    /// Issue order, oldest first. Consumed nonces stay here until they reach
    /// the front or a compaction (lazy deletion: the sequence number tells a
    /// stale entry from a re-registered nonce).
    order: VecDeque<(u64, Box<[u8]>)>,
    next_seq: u64,
}

impl std::fmt::Debug for NonceCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "NonceCache {{ live: {}, capacity: {} }}",
            self.live.len(),
            self.capacity
        )
    }
}

impl NonceCache {
    /// A cache holding at most `capacity` live nonces (at least 1), each
    /// valid for `ttl`. Seeds its CSPRNG from the operating system once.
    /// Panics only if the kernel random source is unavailable at shard start
    /// (not something a client can cause).
    pub fn new(capacity: usize, ttl: Duration) -> NonceCache {
        Self::with_rng(capacity, ttl, StdRng::from_os_rng())
    }

    /// As [`NonceCache::new`] with a fixed seed: deterministic, for tests.
    pub fn with_seed(capacity: usize, ttl: Duration, seed: [u8; 32]) -> NonceCache {
        Self::with_rng(capacity, ttl, StdRng::from_seed(seed))
    }

    fn with_rng(capacity: usize, ttl: Duration, rng: StdRng) -> NonceCache {
        let capacity = capacity.max(1);
        NonceCache {
            rng,
            capacity,
            ttl,
            live: HashMap::with_capacity(capacity.min(4096)),
            order: VecDeque::with_capacity(capacity.min(4096)),
            next_seq: 0,
        }
    }

    /// Generate a fresh random nonce and register it.
    pub fn issue(&mut self, now: Instant) -> String {
        let mut raw = [0u8; NONCE_RANDOM_BYTES];
        self.rng.fill_bytes(&mut raw);
        let nonce = B64.encode(raw);
        self.register(nonce.as_bytes(), now);
        nonce
    }

    /// Random bits that are not registered (CRAM-MD5's challenge is held by
    /// its exchange, so it needs no cache entry).
    pub fn random_u64(&mut self) -> u64 {
        self.rng.next_u64()
    }

    /// Register a nonce chosen by the caller (used by `issue`, and by the
    /// fixed-nonce hook for RFC known-answer tests and benchmarks).
    pub fn register(&mut self, nonce: &[u8], now: Instant) {
        self.evict(now);
        let seq = self.next_seq;
        self.next_seq += 1;
        let key: Box<[u8]> = nonce.into();
        self.live.insert(key.clone(), (now, seq));
        self.order.push_back((seq, key));
    }

    /// Accept `nonce` once: it must be live and younger than the TTL.
    /// Success or failure, the nonce is no longer accepted afterwards.
    pub fn consume(&mut self, nonce: &[u8], now: Instant) -> Result<(), NonceError> {
        let (issued, _) = self.live.remove(nonce).ok_or(NonceError::Unknown)?;
        if now.saturating_duration_since(issued) > self.ttl {
            return Err(NonceError::Expired);
        }
        Ok(())
    }

    /// Live (issued, unconsumed, not yet evicted) nonces.
    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Make room for one more: drop expired entries from the front, then the
    /// oldest live ones while full. Keeps `order` within 2×capacity by
    /// compacting consumed entries, so memory is bounded even when nonces
    /// are consumed promptly and never reach the front by expiry.
    fn evict(&mut self, now: Instant) {
        while let Some((seq, key)) = self.order.front() {
            let expired_or_stale = match self.live.get(key) {
                Some(&(issued, live_seq)) if live_seq == *seq => {
                    now.saturating_duration_since(issued) > self.ttl
                        || self.live.len() >= self.capacity
                }
                _ => true, // consumed or re-registered: stale queue entry
            };
            if !expired_or_stale {
                break;
            }
            if let Some((seq, key)) = self.order.pop_front() {
                if matches!(self.live.get(&key), Some(&(_, s)) if s == seq) {
                    self.live.remove(&key);
                }
            }
        }
        if self.order.len() >= 2 * self.capacity {
            let live = &self.live;
            self.order
                .retain(|(seq, key)| matches!(live.get(key), Some(&(_, s)) if s == *seq));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(cap: usize, ttl_secs: u64) -> NonceCache {
        NonceCache::with_seed(cap, Duration::from_secs(ttl_secs), [7; 32])
    }

    #[test]
    fn issued_nonce_is_accepted_once() {
        let mut c = cache(8, 60);
        let t = Instant::now();
        let n = c.issue(t);
        assert_eq!(n.len(), 24);
        assert!(!n.contains(','));
        assert_eq!(c.consume(n.as_bytes(), t), Ok(()));
        assert_eq!(c.consume(n.as_bytes(), t), Err(NonceError::Unknown));
    }

    #[test]
    fn unknown_nonce_refused() {
        let mut c = cache(8, 60);
        assert_eq!(
            c.consume(b"never-issued", Instant::now()),
            Err(NonceError::Unknown)
        );
    }

    #[test]
    fn nonces_are_distinct() {
        let mut c = cache(1000, 60);
        let t = Instant::now();
        let set: std::collections::HashSet<String> = (0..1000).map(|_| c.issue(t)).collect();
        assert_eq!(set.len(), 1000);
    }

    #[test]
    fn expired_nonce_refused() {
        let mut c = cache(8, 10);
        let t = Instant::now();
        let n = c.issue(t);
        assert_eq!(
            c.consume(n.as_bytes(), t + Duration::from_secs(11)),
            Err(NonceError::Expired)
        );
        // ...and it is gone afterwards.
        assert_eq!(c.consume(n.as_bytes(), t), Err(NonceError::Unknown));
        // Exactly at the TTL it is still valid.
        let m = c.issue(t);
        assert_eq!(c.consume(m.as_bytes(), t + Duration::from_secs(10)), Ok(()));
    }

    #[test]
    fn expired_entries_evicted_on_issue() {
        let mut c = cache(8, 10);
        let t = Instant::now();
        for _ in 0..5 {
            c.issue(t);
        }
        assert_eq!(c.len(), 5);
        c.issue(t + Duration::from_secs(11));
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn bounded_oldest_evicted_first() {
        let mut c = cache(3, 60);
        let t = Instant::now();
        let first = c.issue(t);
        let second = c.issue(t);
        c.issue(t);
        c.issue(t);
        assert_eq!(c.len(), 3);
        assert_eq!(c.consume(first.as_bytes(), t), Err(NonceError::Unknown));
        assert_eq!(c.consume(second.as_bytes(), t), Ok(()));
    }

    #[test]
    fn queue_stays_bounded_when_nonces_are_consumed() {
        let mut c = cache(4, 3600);
        let t = Instant::now();
        for _ in 0..10_000 {
            let n = c.issue(t);
            assert_eq!(c.consume(n.as_bytes(), t), Ok(()));
        }
        assert!(c.order.len() <= 2 * c.capacity());
        assert!(c.is_empty());
    }

    #[test]
    fn zero_capacity_means_one() {
        let mut c = cache(0, 60);
        let t = Instant::now();
        let n = c.issue(t);
        assert_eq!(c.capacity(), 1);
        assert_eq!(c.consume(n.as_bytes(), t), Ok(()));
    }
}
