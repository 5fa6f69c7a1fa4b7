//! Queue ids.
//!
//! Owns: generating one shard's queue ids and parsing them back.
//! Must never: hand out an id twice, across shards or across restarts.
//!
//! An id is 80 bits, written as 16 Crockford base32 characters (uppercase):
//! the high 64 bits are a microsecond timestamp, the low 16 bits the shard number.
//! - The shard number makes ids from different shards distinct without any
//!   coordination between shards (each shard owns its generator).
//! - The timestamp is `max(now, last + 1)`, so ids from one shard strictly increase even
//!   if the clock stands still or goes back; ids sort by time because the width is fixed
//!   and the Crockford alphabet is in ASCII order.
//! - After a restart the generator starts from `floor`, the largest timestamp found in
//!   the shard's spool, so a clock that went back cannot repeat an id that is on disk.
//!
//! XXX: ids of messages that are no longer on disk (delivered, segment deleted) could be
//! repeated after a restart with a clock set back. That is harmless for the spool, which
//! only needs ids unique among the records it holds; log correlation across such a
//! clock jump may be ambiguous.

use std::time::{SystemTime, UNIX_EPOCH};

use std::fmt;

const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
/// Length of every queue id.
pub const QUEUE_ID_LEN: usize = 16;

/// Microseconds since the Unix epoch from the system clock (0 if the clock is before 1970).
pub fn now_unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// One shard's id generator. Not shared: each shard thread owns its own.
#[derive(Debug, Clone)]
pub struct QueueIdGen {
    shard: u16,
    last: u64,
    clock: fn() -> u64,
}

impl QueueIdGen {
    /// `floor`: the largest timestamp recovered from this shard's segments (0 if none).
    pub fn new(shard: u16, floor: u64) -> Self {
        Self::with_clock(shard, floor, now_unix_micros)
    }

    /// Like `new` with an injected clock (tests: a clock that goes back).
    pub fn with_clock(shard: u16, floor: u64, clock: fn() -> u64) -> Self {
        QueueIdGen {
            shard,
            last: floor,
            clock,
        }
    }

    /// Replaces the clock (tests).
    pub fn set_clock(&mut self, clock: fn() -> u64) {
        self.clock = clock;
    }

    /// The next id.
    // `next` is the name the engine is written against; this is not an Iterator
    // because it never ends.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> String {
        self.next_id().as_str().to_owned()
    }

    /// The next id, inline (no allocation): what the accept path uses.
    pub fn next_id(&mut self) -> MsgId {
        let now = (self.clock)();
        // saturating: at u64::MAX micros (year ~586,000) ids stop increasing rather than
        // wrapping to small values that could collide with old ones.
        let value = now.max(self.last.saturating_add(1));
        self.last = value;
        MsgId::from_ascii(&encode_queue_id_bytes(value, self.shard))
    }

    /// The timestamp part of the last id handed out (or the floor).
    pub fn last(&self) -> u64 {
        self.last
    }

    /// Raises the floor (never lowers it).
    pub fn raise_floor(&mut self, floor: u64) {
        self.last = self.last.max(floor);
    }

    pub fn shard(&self) -> u16 {
        self.shard
    }
}

/// Encodes (timestamp, shard) as a 16-character id.
pub fn encode_queue_id(micros: u64, shard: u16) -> String {
    MsgId::from_ascii(&encode_queue_id_bytes(micros, shard))
        .as_str()
        .to_owned()
}

/// [`encode_queue_id`] without an allocation: the 16 ASCII characters.
pub fn encode_queue_id_bytes(micros: u64, shard: u16) -> [u8; QUEUE_ID_LEN] {
    let v: u128 = (u128::from(micros) << 16) | u128::from(shard);
    let mut out = [0u8; QUEUE_ID_LEN];
    for (i, c) in out.iter_mut().enumerate() {
        let shift = 5 * (QUEUE_ID_LEN - 1 - i);
        *c = CROCKFORD[((v >> shift) & 31) as usize];
    }
    out
}

/// Parses an id back into (timestamp, shard); `None` if it is not one of ours.
pub fn parse_queue_id(id: &str) -> Option<(u64, u16)> {
    let b = id.as_bytes();
    if b.len() != QUEUE_ID_LEN {
        return None;
    }
    let mut v: u128 = 0;
    for &c in b {
        let d = CROCKFORD.iter().position(|&x| x == c)?;
        v = (v << 5) | d as u128;
    }
    let micros = u64::try_from(v >> 16).ok()?;
    Some((micros, (v & 0xffff) as u16))
}

/// Longest queue id a message may have: ids are stored inline in `MsgId`. The engine's
/// ids are 16 characters (`id::QUEUE_ID_LEN`).
pub const MAX_ID_LEN: usize = 23;

/// A queue id stored inline (no heap allocation): at most [`MAX_ID_LEN`] bytes of UTF-8.
/// The default is the empty id.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MsgId {
    len: u8,
    buf: [u8; MAX_ID_LEN],
}

impl MsgId {
    /// `None` if `s` is longer than [`MAX_ID_LEN`] bytes.
    pub fn new(s: &str) -> Option<MsgId> {
        if s.len() > MAX_ID_LEN {
            return None;
        }
        let mut buf = [0u8; MAX_ID_LEN];
        buf[..s.len()].copy_from_slice(s.as_bytes());
        Some(MsgId {
            len: s.len() as u8,
            buf,
        })
    }
    /// An id made of the Crockford characters `encode_queue_id_bytes` writes (ASCII, so
    /// valid UTF-8; [`QUEUE_ID_LEN`] fits in [`MAX_ID_LEN`]).
    pub fn from_ascii(id: &[u8; QUEUE_ID_LEN]) -> MsgId {
        const { assert!(QUEUE_ID_LEN <= MAX_ID_LEN) };
        let mut buf = [0u8; MAX_ID_LEN];
        buf[..id.len()].copy_from_slice(id);
        let m = MsgId {
            len: id.len() as u8,
            buf,
        };
        debug_assert!(id.is_ascii());
        m
    }

    pub fn as_str(&self) -> &str {
        // Only ever built from a &str, so this is valid UTF-8.
        std::str::from_utf8(&self.buf[..self.len as usize]).unwrap_or_default()
    }
}

impl fmt::Debug for MsgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}
impl fmt::Display for MsgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
impl PartialEq<str> for MsgId {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}
impl PartialEq<&str> for MsgId {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_parse_round_trip_and_order() {
        let a = encode_queue_id(1_700_000_000_000_000, 3);
        let b = encode_queue_id(1_700_000_000_000_001, 0);
        assert_eq!(a.len(), QUEUE_ID_LEN);
        assert!(a < b, "{a} !< {b}");
        assert_eq!(parse_queue_id(&a), Some((1_700_000_000_000_000, 3)));
        assert_eq!(
            parse_queue_id(&encode_queue_id(u64::MAX, u16::MAX)),
            Some((u64::MAX, u16::MAX))
        );
        assert_eq!(parse_queue_id("not-an-id"), None);
        assert_eq!(parse_queue_id("IIIIIIIIIIIIIIII"), None);
    }

    #[test]
    fn clock_going_back_does_not_repeat() {
        let mut g = QueueIdGen::with_clock(7, 1_000, || 5);
        let a = g.next();
        let b = g.next();
        assert!(a < b);
        assert_eq!(parse_queue_id(&a), Some((1_001, 7)));
        assert_eq!(parse_queue_id(&b), Some((1_002, 7)));
    }

    #[test]
    fn shards_never_collide() {
        let mut a = QueueIdGen::with_clock(1, 0, || 42);
        let mut b = QueueIdGen::with_clock(2, 0, || 42);
        assert_ne!(a.next(), b.next());
    }
}
