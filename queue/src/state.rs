//! Per-recipient delivery state: what a state-change record says, and the compact
//! in-memory form of a queued message that the queue runner indexes.
//!
//! Owns: `RcptState`, `StateChange` (one kind-2 record), `MsgRef` (where a message
//! record lives), `MsgId` (a queue id stored inline) and `QueuedMessage` with its
//! recipient state vector `RcptStates`. The byte layout of a state record is in
//! `record.rs`; applying records at start-up is in `spool.rs`.
//! Must never: do I/O; allocate per message in the steady state beyond an optional
//! last reply (and recipient vectors longer than 32, which are rare).
//!
//! # Semantics of a state record
//! `updates` are *deltas*: "recipient i is now in state s". Every other field
//! (`attempts`, `next_attempt_unix`, `last_reply`, `warned`, `held`) is *absolute*: the
//! latest record of a message wins. Recovery applies a message's records in log order
//! ((segment, offset) order), so the result is the state after the last durable record.

use std::fmt;

pub use crate::id::{MsgId, MAX_ID_LEN};
/// `StateChange::last_reply` is cut to this many bytes (at a character boundary).
pub const MAX_REPLY_LEN: usize = 512;

/// Delivery state of one recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RcptState {
    /// Still to be delivered (initial state).
    Pending,
    /// Accepted by the next hop.
    Delivered,
    /// Permanent failure: bounced or expired. Final, like `Delivered`.
    Failed,
}

impl RcptState {
    /// On-disk and in-bitset code.
    pub fn code(self) -> u8 {
        match self {
            RcptState::Pending => 0,
            RcptState::Delivered => 1,
            RcptState::Failed => 2,
        }
    }
    pub fn from_code(c: u8) -> Option<RcptState> {
        match c {
            0 => Some(RcptState::Pending),
            1 => Some(RcptState::Delivered),
            2 => Some(RcptState::Failed),
            _ => None,
        }
    }
    pub fn is_final(self) -> bool {
        self != RcptState::Pending
    }
}

/// Where a message record lives: shard, segment number, byte offset of its record.
/// Stable for the message's whole life (records never move).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MsgRef {
    pub shard: u16,
    pub segment: u64,
    pub offset: u64,
}

/// One state-change record: several recipient updates of one message plus its retry
/// bookkeeping. Written with [`crate::ShardSpool::prepare_state`] and committed with
/// [`crate::commit_batch`] like a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateChange {
    /// Which message: its message record. Must be a message of the same shard.
    pub msg: MsgRef,
    /// The message's queue id, written into the record and checked on recovery, so a
    /// record can never be applied to a different message at the same place.
    pub id: MsgId,
    /// Deltas: (recipient index in the envelope, new state).
    pub updates: Vec<(u32, RcptState)>,
    /// Delivery attempts so far (absolute).
    pub attempts: u32,
    /// Next attempt, unix seconds; 0 = none scheduled (absolute).
    pub next_attempt_unix: u64,
    /// Remote reply or local reason; cut to [`MAX_REPLY_LEN`] bytes when written.
    pub last_reply: String,
    /// A delay DSN was sent already.
    pub warned: bool,
    /// `tern queue hold` / `release`.
    pub held: bool,
}

/// Returns a shared copy of `reply`, reusing an identical one this thread already holds.
/// The table is per thread (each shard is one thread: no lock, no sharing) and bounded;
/// past its bound, replies are simply not interned.
pub fn intern_reply(reply: &str) -> std::sync::Arc<str> {
    use std::cell::RefCell;
    use std::collections::HashSet;
    use std::sync::Arc;
    const MAX_INTERNED: usize = 4096;
    thread_local! {
        static REPLIES: RefCell<HashSet<Arc<str>>> = RefCell::new(HashSet::new());
    }
    REPLIES.with(|t| {
        let mut t = t.borrow_mut();
        if let Some(a) = t.get(reply) {
            return a.clone();
        }
        let a: Arc<str> = Arc::from(reply);
        if t.len() < MAX_INTERNED {
            t.insert(a.clone());
        } else {
            // Drop texts no queued message uses any more, then try again next time.
            t.retain(|a| Arc::strong_count(a) > 1);
        }
        a
    })
}

/// Cuts `s` to at most `max` bytes at a character boundary.
pub fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The states of a message's recipients, compact: up to 32 recipients are packed two
/// bits each into one `u64` (no allocation); longer vectors live on the heap. 16 bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct RcptStates(Repr);

#[derive(Clone, PartialEq, Eq)]
enum Repr {
    Small {
        len: u8,
        bits: u64,
    },
    /// Boxed twice on purpose: a thin pointer keeps `RcptStates` at 16 bytes.
    Large(Box<Large>),
}

#[derive(Clone, PartialEq, Eq)]
struct Large(Vec<RcptState>);

const SMALL_MAX: usize = 32;

impl RcptStates {
    /// `n` recipients, all pending.
    pub fn pending(n: usize) -> RcptStates {
        if n <= SMALL_MAX {
            RcptStates(Repr::Small {
                len: n as u8,
                bits: 0,
            })
        } else {
            RcptStates(Repr::Large(Box::new(Large(vec![RcptState::Pending; n]))))
        }
    }
    pub fn from_slice(states: &[RcptState]) -> RcptStates {
        let mut r = RcptStates::pending(states.len());
        for (i, s) in states.iter().enumerate() {
            r.set(i, *s);
        }
        r
    }
    pub fn len(&self) -> usize {
        match &self.0 {
            Repr::Small { len, .. } => *len as usize,
            Repr::Large(v) => v.0.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// `None` if `i` is out of range.
    pub fn get(&self, i: usize) -> Option<RcptState> {
        if i >= self.len() {
            return None;
        }
        match &self.0 {
            Repr::Small { bits, .. } => RcptState::from_code(((bits >> (2 * i)) & 3) as u8),
            Repr::Large(v) => Some(v.0[i]),
        }
    }
    /// Sets recipient `i`; returns false (and changes nothing) if `i` is out of range.
    pub fn set(&mut self, i: usize, s: RcptState) -> bool {
        if i >= self.len() {
            return false;
        }
        match &mut self.0 {
            Repr::Small { bits, .. } => {
                *bits = (*bits & !(3 << (2 * i))) | (u64::from(s.code()) << (2 * i));
            }
            Repr::Large(v) => v.0[i] = s,
        }
        true
    }
    pub fn iter(&self) -> impl Iterator<Item = RcptState> + '_ {
        (0..self.len()).filter_map(|i| self.get(i))
    }
    pub fn to_vec(&self) -> Vec<RcptState> {
        self.iter().collect()
    }
    /// Recipients still to be delivered.
    pub fn pending_count(&self) -> usize {
        match &self.0 {
            // A pending recipient is a 00 pair among the first `len`.
            Repr::Small { len, bits } => {
                let used = if *len == 32 {
                    u64::MAX
                } else {
                    (1u64 << (2 * len)) - 1
                };
                // Pairs with any bit set are final.
                let any = (bits | (bits >> 1)) & 0x5555_5555_5555_5555 & used;
                *len as usize - any.count_ones() as usize
            }
            Repr::Large(v) => v.0.iter().filter(|s| !s.is_final()).count(),
        }
    }
    /// Heap bytes owned (0 for up to 32 recipients).
    pub fn heap_bytes(&self) -> usize {
        match &self.0 {
            Repr::Small { .. } => 0,
            Repr::Large(v) => std::mem::size_of::<Large>() + v.0.capacity(),
        }
    }
}

impl fmt::Debug for RcptStates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// A message with at least one pending recipient, as the queue runner indexes it. The
/// envelope and body stay on disk ([`crate::ShardSpool::load`]); this is ~104 bytes plus
/// the last reply, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedMessage {
    pub msg: MsgRef,
    pub id: MsgId,
    pub arrival_unix_micros: u64,
    pub next_attempt_unix: u64,
    pub attempts: u32,
    pub warned: bool,
    pub held: bool,
    pub rcpt_states: RcptStates,
    /// `None` until a state record carried a non-empty reply.
    /// Interned per thread (see `intern_reply`): thousands of deferred messages usually
    /// share a handful of texts ("connection refused"...), and each keeps one pointer.
    pub last_reply: Option<std::sync::Arc<str>>,
}

impl QueuedMessage {
    /// A freshly accepted message: every recipient pending, no attempt yet.
    pub fn new(msg: MsgRef, id: MsgId, arrival_unix_micros: u64, recipients: usize) -> Self {
        QueuedMessage {
            msg,
            id,
            arrival_unix_micros,
            next_attempt_unix: 0,
            attempts: 0,
            warned: false,
            held: false,
            rcpt_states: RcptStates::pending(recipients),
            last_reply: None,
        }
    }

    /// Applies a state change (what recovery does with each record, and what the runner
    /// does to its index after a change became durable). Checks first, so an `Err`
    /// (wrong message, recipient index out of range) changes nothing.
    pub fn apply(&mut self, c: &StateChange) -> Result<(), String> {
        if c.msg != self.msg {
            return Err(format!("record is for {:?}, not {:?}", c.msg, self.msg));
        }
        if c.id != self.id {
            return Err(format!("record is for id {}, message is {}", c.id, self.id));
        }
        if let Some((i, _)) = c
            .updates
            .iter()
            .find(|(i, _)| *i as usize >= self.rcpt_states.len())
        {
            return Err(format!(
                "recipient index {i} out of range ({} recipients)",
                self.rcpt_states.len()
            ));
        }
        for (i, s) in &c.updates {
            self.rcpt_states.set(*i as usize, *s);
        }
        self.attempts = c.attempts;
        self.next_attempt_unix = c.next_attempt_unix;
        let reply = truncate_utf8(&c.last_reply, MAX_REPLY_LEN);
        self.last_reply = (!reply.is_empty()).then(|| intern_reply(reply));
        self.warned = c.warned;
        self.held = c.held;
        Ok(())
    }

    /// A state change for this message carrying its current bookkeeping and `updates`;
    /// adjust the fields before `prepare_state`.
    pub fn change(&self, updates: Vec<(u32, RcptState)>) -> StateChange {
        StateChange {
            msg: self.msg,
            id: self.id,
            updates,
            attempts: self.attempts,
            next_attempt_unix: self.next_attempt_unix,
            last_reply: self.last_reply.as_deref().unwrap_or("").to_string(),
            warned: self.warned,
            held: self.held,
        }
    }

    /// No recipient is pending any more.
    pub fn is_finished(&self) -> bool {
        self.rcpt_states.pending_count() == 0
    }

    /// Heap bytes owned by this entry (the reply and long recipient vectors), counted as
    /// requested sizes (the allocator rounds up a little).
    pub fn heap_bytes(&self) -> usize {
        // An interned reply is shared: count it once per distinct text, i.e. not here.
        self.rcpt_states.heap_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rcpt_states_small_and_large() {
        for n in [0usize, 1, 2, 31, 32, 33, 100] {
            let mut r = RcptStates::pending(n);
            assert_eq!(r.len(), n);
            assert_eq!(r.pending_count(), n);
            for i in (0..n).step_by(3) {
                assert!(r.set(i, RcptState::Delivered));
            }
            for i in (1..n).step_by(3) {
                assert!(r.set(i, RcptState::Failed));
            }
            assert!(!r.set(n, RcptState::Failed));
            assert_eq!(r.get(n), None);
            let expect: Vec<RcptState> = (0..n)
                .map(|i| match i % 3 {
                    0 => RcptState::Delivered,
                    1 => RcptState::Failed,
                    _ => RcptState::Pending,
                })
                .collect();
            assert_eq!(r.to_vec(), expect);
            assert_eq!(r.pending_count(), n / 3);
            assert_eq!(RcptStates::from_slice(&expect), r);
        }
        assert_eq!(std::mem::size_of::<RcptStates>(), 16);
    }

    #[test]
    fn ids_and_truncation() {
        let id = MsgId::new("0123456789ABCDEF").unwrap();
        assert_eq!(id.as_str(), "0123456789ABCDEF");
        assert!(MsgId::new(&"x".repeat(MAX_ID_LEN + 1)).is_none());
        assert_eq!(truncate_utf8("aé", 2), "a");
        assert_eq!(truncate_utf8("abc", 5), "abc");
    }
}
