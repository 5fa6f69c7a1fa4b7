//! The queue runner's in-memory index of one shard's queued messages, and its schedule.
//!
//! Owns: one compact slot per queued message (where its record is, its queue id, arrival,
//! recipient states, attempts, next attempt, flags), the lookup from a message record's
//! place (segment, offset) to its slot, the schedule of next attempts, and the shard's
//! table of last-reply texts. Must never: do I/O, allocate per message beyond its slot and
//! two small index entries, or be shared between shards (each runner owns one).
//!
//! Why it looks like this: an edge relay may hold millions of deferred messages, and the
//! index is what they cost in memory while bodies and envelopes stay on disk. A
//! `HashMap<MsgRef, QueuedMessage>` plus a `BTreeSet` schedule cost ~370 bytes per message
//! (a 24-byte key, a 112-byte value, a hash table that doubles, 48-byte tree entries).
//! Here a message costs one 56-byte slot in a chunked slab (no doubling: it grows
//! [`CHUNK`] slots at a time), 8 bytes in its segment's sorted offset list, and ~4 bytes in
//! a per-second schedule bucket:
//! - The queue id is kept as the 80 bits it encodes (timestamp, shard; see `id.rs`)
//!   instead of 23 inline bytes; ids of another shape (never made by tern, but the spool
//!   accepts them) go to a small side table.
//! - Messages are appended to segments in offset order, so each segment's list of
//!   (offset, slot) is sorted by construction and found by binary search; removal leaves a
//!   tombstone that is compacted away in bulk, and the list goes with its segment.
//! - The last reply is a `u32` into a reference-counted table of distinct texts: a
//!   backlog deferred by one broken next hop shares one copy.
//! - The schedule is a map from due second to a FIFO of slots, validated lazily: a
//!   message that was rescheduled, claimed, held or removed leaves a stale entry that is
//!   skipped when its second comes (it no longer matches the slot), instead of being
//!   searched for. Stale entries are bounded: the schedule is rebuilt from the slots when
//!   they outnumber the live messages.
//!
//! The runner sees whole [`QueuedMessage`] values (built from a slot on the fly, ~20 ns)
//! and writes them back with [`QueueIndex::update`], so the compact layout stays private.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use crate::id::{encode_queue_id_bytes, parse_queue_id};
use crate::state::{MsgId, MsgRef, QueuedMessage, RcptStates};

/// Slots per slab chunk: the index grows this many slots (~224 KiB) at a time.
pub const CHUNK: usize = 4096;
const NONE: u32 = u32::MAX;

const IN_FLIGHT: u8 = 1;
const HELD: u8 = 2;
const WARNED: u8 = 4;
const VACANT: u8 = 8;
/// The id is not of tern's 16-character form: it is in `odd_ids`.
const ODD_ID: u8 = 16;

/// One queued message, compact. 56 bytes.
struct Slot {
    arrival_unix_micros: u64,
    /// The id's timestamp (with `id_shard`, the whole id), unless `ODD_ID`.
    id_micros: u64,
    rcpt_states: RcptStates,
    segment: u32,
    /// The record's offset; for a vacant slot, the next vacant slot (`NONE`: last).
    offset: u32,
    /// Unix seconds, saturated at `u32::MAX` (the year 2106).
    next_attempt: u32,
    attempts: u32,
    /// Index into `Replies`, `NONE` for no reply.
    reply: u32,
    id_shard: u16,
    flags: u8,
}

impl Slot {
    fn vacant(next: u32) -> Slot {
        Slot {
            arrival_unix_micros: 0,
            id_micros: 0,
            rcpt_states: RcptStates::pending(0),
            segment: 0,
            offset: next,
            next_attempt: 0,
            attempts: 0,
            reply: NONE,
            id_shard: 0,
            flags: VACANT,
        }
    }
    fn is(&self, f: u8) -> bool {
        self.flags & f != 0
    }
    fn set(&mut self, f: u8, on: bool) {
        if on {
            self.flags |= f;
        } else {
            self.flags &= !f;
        }
    }
    /// Whether a schedule entry (`due`) still stands for this slot.
    fn due_at(&self, due: u32) -> bool {
        self.flags & (VACANT | IN_FLIGHT | HELD) == 0 && self.next_attempt == due
    }
}

/// Distinct last-reply texts with reference counts.
#[derive(Default)]
struct Replies {
    texts: Vec<(Option<Arc<str>>, u32)>,
    by_text: HashMap<Arc<str>, u32>,
    free: Vec<u32>,
}

impl Replies {
    fn acquire(&mut self, text: &Arc<str>) -> u32 {
        if let Some(&i) = self.by_text.get(text) {
            self.texts[i as usize].1 += 1;
            return i;
        }
        let i = match self.free.pop() {
            Some(i) => {
                self.texts[i as usize] = (Some(text.clone()), 1);
                i
            }
            None => {
                self.texts.push((Some(text.clone()), 1));
                (self.texts.len() - 1) as u32
            }
        };
        self.by_text.insert(text.clone(), i);
        i
    }
    fn release(&mut self, i: u32) {
        if i == NONE {
            return;
        }
        let Some(e) = self.texts.get_mut(i as usize) else {
            return;
        };
        e.1 = e.1.saturating_sub(1);
        if e.1 == 0 {
            if let Some(t) = e.0.take() {
                self.by_text.remove(&t);
            }
            self.free.push(i);
        }
    }
    fn get(&self, i: u32) -> Option<Arc<str>> {
        self.text(i).cloned()
    }
    fn text(&self, i: u32) -> Option<&Arc<str>> {
        self.texts.get(i as usize).and_then(|(t, _)| t.as_ref())
    }
    fn len(&self) -> usize {
        self.by_text.len()
    }
}

/// One segment's messages: (offset, slot) sorted by offset; removed ones keep their place
/// with slot `NONE` until compaction.
#[derive(Default)]
struct SegSlots {
    v: Vec<(u32, u32)>,
    dead: usize,
}

/// Memory the index holds, by part (for tests and the memory figures in the docs).
#[derive(Debug, Clone, Copy, Default)]
pub struct IndexFootprint {
    pub messages: usize,
    pub slab_bytes: usize,
    pub lookup_bytes: usize,
    pub schedule_bytes: usize,
    pub distinct_replies: usize,
}

/// The index of one shard's queued messages. See the module comment.
pub struct QueueIndex {
    shard: u16,
    chunks: Vec<Vec<Slot>>,
    free: u32,
    len: usize,
    by_seg: BTreeMap<u32, SegSlots>,
    sched: BTreeMap<u32, VecDeque<u32>>,
    sched_entries: usize,
    replies: Replies,
    odd_ids: HashMap<u32, MsgId>,
}

/// Why a message cannot be indexed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IndexError {
    /// The record's segment number or offset does not fit the compact form (segments are
    /// at most 4 GiB and numbered below 2^32; see `SpoolOptions`).
    OutOfRange(MsgRef),
    /// A message of another shard.
    WrongShard(MsgRef),
}

impl std::fmt::Display for IndexError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IndexError::OutOfRange(r) => write!(f, "record place {r:?} out of the index's range"),
            IndexError::WrongShard(r) => write!(f, "record {r:?} belongs to another shard"),
        }
    }
}

fn secs_u32(s: u64) -> u32 {
    u32::try_from(s).unwrap_or(u32::MAX)
}

impl QueueIndex {
    pub fn new(shard: u16) -> QueueIndex {
        QueueIndex {
            shard,
            chunks: Vec::new(),
            free: NONE,
            len: 0,
            by_seg: BTreeMap::new(),
            sched: BTreeMap::new(),
            sched_entries: 0,
            replies: Replies::default(),
            odd_ids: HashMap::new(),
        }
    }

    /// Messages in the index.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn slot(&self, s: u32) -> &Slot {
        &self.chunks[s as usize / CHUNK][s as usize % CHUNK]
    }

    fn slot_mut(&mut self, s: u32) -> &mut Slot {
        &mut self.chunks[s as usize / CHUNK][s as usize % CHUNK]
    }

    fn place(&self, r: MsgRef) -> Option<(u32, u32)> {
        if r.shard != self.shard {
            return None;
        }
        Some((
            u32::try_from(r.segment).ok()?,
            u32::try_from(r.offset).ok()?,
        ))
    }

    /// The slot of the message whose record is at `r`.
    fn find(&self, r: MsgRef) -> Option<u32> {
        let (seg, off) = self.place(r)?;
        let ss = self.by_seg.get(&seg)?;
        let i = ss.v.binary_search_by_key(&off, |&(o, _)| o).ok()?;
        let s = ss.v[i].1;
        (s != NONE).then_some(s)
    }

    fn msg_ref(&self, sl: &Slot) -> MsgRef {
        MsgRef {
            shard: self.shard,
            segment: u64::from(sl.segment),
            offset: u64::from(sl.offset),
        }
    }

    fn id_of(&self, s: u32, sl: &Slot) -> MsgId {
        if sl.is(ODD_ID) {
            // Always present: inserted with the ODD_ID flag, removed with the slot.
            return self.odd_ids.get(&s).copied().unwrap_or_default();
        }
        let b = encode_queue_id_bytes(sl.id_micros, sl.id_shard);
        // 16 ASCII characters: always valid UTF-8 and short enough.
        std::str::from_utf8(&b)
            .ok()
            .and_then(MsgId::new)
            .unwrap_or_default()
    }

    /// The message in slot `s`, whole.
    fn message(&self, s: u32) -> QueuedMessage {
        let sl = self.slot(s);
        QueuedMessage {
            msg: self.msg_ref(sl),
            id: self.id_of(s, sl),
            arrival_unix_micros: sl.arrival_unix_micros,
            next_attempt_unix: u64::from(sl.next_attempt),
            attempts: sl.attempts,
            warned: sl.is(WARNED),
            held: sl.is(HELD),
            rcpt_states: sl.rcpt_states.clone(),
            last_reply: self.replies.get(sl.reply),
        }
    }

    /// Stores `q`'s mutable fields into slot `s` (its place and id do not change).
    fn store(&mut self, s: u32, q: QueuedMessage, in_flight: bool) {
        let old_reply = self.slot(s).reply;
        // Usually the very same (interned) text: a pointer comparison.
        let same_reply = match (&q.last_reply, self.replies.text(old_reply)) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b) || a == b,
            (None, None) => true,
            _ => false,
        };
        let reply = if same_reply {
            old_reply
        } else {
            self.replies.release(old_reply);
            q.last_reply
                .as_ref()
                .map_or(NONE, |t| self.replies.acquire(t))
        };
        let sl = self.slot_mut(s);
        sl.arrival_unix_micros = q.arrival_unix_micros;
        sl.rcpt_states = q.rcpt_states;
        sl.next_attempt = secs_u32(q.next_attempt_unix);
        sl.attempts = q.attempts;
        sl.reply = reply;
        sl.set(WARNED, q.warned);
        sl.set(HELD, q.held);
        sl.set(IN_FLIGHT, in_flight);
    }

    fn alloc_slot(&mut self) -> u32 {
        if self.free != NONE {
            let s = self.free;
            self.free = self.slot(s).offset;
            return s;
        }
        if self.chunks.last().is_none_or(|c| c.len() == CHUNK) {
            self.chunks.push(Vec::with_capacity(CHUNK));
        }
        let n = self.chunks.len() - 1;
        let s = (n * CHUNK + self.chunks[n].len()) as u32;
        self.chunks[n].push(Slot::vacant(NONE));
        s
    }

    /// Adds `q` (not in flight) and schedules it at its next attempt. A message already
    /// indexed at the same place is replaced.
    pub fn insert(&mut self, q: QueuedMessage) -> Result<(), IndexError> {
        if q.msg.shard != self.shard {
            return Err(IndexError::WrongShard(q.msg));
        }
        let (seg, off) = self.place(q.msg).ok_or(IndexError::OutOfRange(q.msg))?;
        if off == NONE {
            return Err(IndexError::OutOfRange(q.msg));
        }
        if let Some(s) = self.find(q.msg) {
            self.remove_slot(s);
        }
        let s = self.alloc_slot();
        let (id_micros, id_shard, odd) = match parse_queue_id(q.id.as_str()) {
            Some((m, sh)) => (m, sh, false),
            None => (0, 0, true),
        };
        {
            let sl = self.slot_mut(s);
            *sl = Slot::vacant(NONE);
            sl.flags = if odd { ODD_ID } else { 0 };
            sl.id_micros = id_micros;
            sl.id_shard = id_shard;
            sl.segment = seg;
            sl.offset = off;
        }
        if odd {
            self.odd_ids.insert(s, q.id);
        }
        self.store(s, q, false);
        let ss = self.by_seg.entry(seg).or_default();
        match ss.v.last() {
            Some(&(o, _)) if o >= off => match ss.v.binary_search_by_key(&off, |&(o, _)| o) {
                Ok(i) => {
                    // A tombstone of the same place (find() found no live slot there).
                    ss.v[i].1 = s;
                    ss.dead = ss.dead.saturating_sub(1);
                }
                Err(i) => ss.v.insert(i, (off, s)),
            },
            _ => ss.v.push((off, s)),
        }
        self.len += 1;
        self.schedule_slot(s);
        Ok(())
    }

    /// The message at `r` and whether an attempt (or an admin change) has it claimed.
    pub fn get(&self, r: MsgRef) -> Option<(QueuedMessage, bool)> {
        let s = self.find(r)?;
        Some((self.message(s), self.slot(s).is(IN_FLIGHT)))
    }

    /// Whether `r` is indexed and claimed.
    pub fn in_flight(&self, r: MsgRef) -> Option<bool> {
        self.find(r).map(|s| self.slot(s).is(IN_FLIGHT))
    }

    /// Claims `r` for an attempt or an admin change: false if absent or already claimed.
    pub fn claim(&mut self, r: MsgRef) -> bool {
        match self.find(r) {
            Some(s) if !self.slot(s).is(IN_FLIGHT) => {
                self.slot_mut(s).set(IN_FLIGHT, true);
                true
            }
            _ => false,
        }
    }

    /// Changes the message at `r` with `f` (which gets the message and its claim flag) and
    /// stores the result. `None` if `r` is not indexed. The schedule is not touched: call
    /// [`QueueIndex::schedule`] or [`QueueIndex::remove`] after.
    pub fn update<T>(
        &mut self,
        r: MsgRef,
        f: impl FnOnce(&mut QueuedMessage, &mut bool) -> T,
    ) -> Option<T> {
        let s = self.find(r)?;
        let mut q = self.message(s);
        let mut in_flight = self.slot(s).is(IN_FLIGHT);
        let out = f(&mut q, &mut in_flight);
        self.store(s, q, in_flight);
        Some(out)
    }

    /// Puts `r` on the schedule at its next attempt (not if held or claimed: releasing
    /// the claim and scheduling go together, see `update`).
    pub fn schedule(&mut self, r: MsgRef) {
        if let Some(s) = self.find(r) {
            self.schedule_slot(s);
        }
    }

    fn schedule_slot(&mut self, s: u32) {
        let sl = self.slot(s);
        if sl.flags & (VACANT | IN_FLIGHT | HELD) != 0 {
            return;
        }
        let due = sl.next_attempt;
        self.sched.entry(due).or_default().push_back(s);
        self.sched_entries += 1;
        self.maybe_rebuild_schedule();
    }

    /// Makes `r` due at `due` (unix seconds; 0 = now) and schedules it.
    pub fn reschedule(&mut self, r: MsgRef, due: u64) {
        if let Some(s) = self.find(r) {
            self.slot_mut(s).next_attempt = secs_u32(due);
            self.schedule_slot(s);
        }
    }

    /// Removes `r`; returns the message if it was indexed.
    pub fn remove(&mut self, r: MsgRef) -> Option<QueuedMessage> {
        let s = self.find(r)?;
        let q = self.message(s);
        self.remove_slot(s);
        Some(q)
    }

    fn remove_slot(&mut self, s: u32) {
        let (seg, off, reply) = {
            let sl = self.slot(s);
            (sl.segment, sl.offset, sl.reply)
        };
        self.replies.release(reply);
        if self.slot(s).is(ODD_ID) {
            self.odd_ids.remove(&s);
        }
        let free = self.free;
        *self.slot_mut(s) = Slot::vacant(free);
        self.free = s;
        self.len -= 1;
        if let Some(ss) = self.by_seg.get_mut(&seg) {
            if let Ok(i) = ss.v.binary_search_by_key(&off, |&(o, _)| o) {
                if ss.v[i].1 == s {
                    ss.v[i].1 = NONE;
                    ss.dead += 1;
                }
            }
            if ss.dead == ss.v.len() {
                self.by_seg.remove(&seg);
            } else if ss.dead > 64 && ss.dead * 2 > ss.v.len() {
                ss.v.retain(|&(_, s)| s != NONE);
                ss.v.shrink_to_fit();
                ss.dead = 0;
            }
        }
        // Stale schedule entries of this slot are skipped when their second comes.
    }

    /// Takes the next message due at or before `now` (unix seconds) off the schedule and
    /// claims it. New messages (due 0) come first, then by due second, first in first out.
    pub fn claim_due(&mut self, now: u64) -> Option<MsgRef> {
        let now = secs_u32(now);
        loop {
            let mut e = self.sched.first_entry()?;
            let due = *e.key();
            if due > now {
                return None;
            }
            let Some(s) = e.get_mut().pop_front() else {
                e.remove();
                continue;
            };
            if e.get().is_empty() {
                e.remove();
            }
            self.sched_entries -= 1;
            if self.slot(s).due_at(due) {
                self.slot_mut(s).set(IN_FLIGHT, true);
                return Some(self.msg_ref(self.slot(s)));
            }
        }
    }

    /// The earliest second at which something may be due (a stale entry can make this
    /// early: the caller just finds nothing then).
    pub fn next_due(&self) -> Option<u64> {
        self.sched.keys().next().map(|&d| u64::from(d))
    }

    /// Makes every message that is neither held nor claimed due now. Returns how many.
    pub fn flush_all(&mut self) -> usize {
        let mut n = 0;
        for c in 0..self.chunks.len() {
            for i in 0..self.chunks[c].len() {
                let sl = &mut self.chunks[c][i];
                if sl.flags & (VACANT | IN_FLIGHT | HELD) == 0 {
                    sl.next_attempt = 0;
                    n += 1;
                }
            }
        }
        // Every entry now stands at 0 or is stale: rebuild rather than append.
        self.rebuild_schedule();
        n
    }

    fn maybe_rebuild_schedule(&mut self) {
        if self.sched_entries > 2 * self.len + 4096 {
            self.rebuild_schedule();
        }
    }

    fn rebuild_schedule(&mut self) {
        let mut due: Vec<(u32, u32)> = Vec::with_capacity(self.len);
        for (c, chunk) in self.chunks.iter().enumerate() {
            for (i, sl) in chunk.iter().enumerate() {
                if sl.flags & (VACANT | IN_FLIGHT | HELD) == 0 {
                    due.push((sl.next_attempt, (c * CHUNK + i) as u32));
                }
            }
        }
        // Oldest arrival first within a second, as the appends would have been.
        due.sort_by_key(|&(d, s)| (d, self.slot(s).arrival_unix_micros));
        self.sched.clear();
        self.sched_entries = due.len();
        for (d, s) in due {
            self.sched.entry(d).or_default().push_back(s);
        }
    }

    /// Every indexed message with its claim flag, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (QueuedMessage, bool)> + '_ {
        self.live_slots()
            .map(move |s| (self.message(s), self.slot(s).is(IN_FLIGHT)))
    }

    fn live_slots(&self) -> impl Iterator<Item = u32> + '_ {
        self.chunks.iter().enumerate().flat_map(|(c, chunk)| {
            chunk
                .iter()
                .enumerate()
                .filter(|(_, sl)| !sl.is(VACANT))
                .map(move |(i, _)| (c * CHUNK + i) as u32)
        })
    }

    /// The place of the message with queue id `id`, if indexed. A scan (admin tools only).
    pub fn find_id(&self, id: &str) -> Option<MsgRef> {
        let s = match parse_queue_id(id) {
            Some((m, sh)) => self.live_slots().find(|&s| {
                let sl = self.slot(s);
                !sl.is(ODD_ID) && sl.id_micros == m && sl.id_shard == sh
            })?,
            None => *self.odd_ids.iter().find(|(_, v)| v.as_str() == id)?.0,
        };
        Some(self.msg_ref(self.slot(s)))
    }

    /// Arrival of the oldest queued message (µs since the epoch). Looks only at the first
    /// segment that still holds a queued message: records are appended in commit order,
    /// so later segments hold later arrivals (up to one group commit's reordering).
    pub fn oldest_arrival_unix_micros(&self) -> Option<u64> {
        let ss = self.by_seg.values().next()?;
        ss.v.iter()
            .filter(|&&(_, s)| s != NONE)
            .map(|&(_, s)| self.slot(s).arrival_unix_micros)
            .min()
    }

    /// What the index holds in memory (capacities, not lengths).
    pub fn footprint(&self) -> IndexFootprint {
        let slab = self.chunks.capacity() * std::mem::size_of::<Vec<Slot>>()
            + self
                .chunks
                .iter()
                .map(|c| c.capacity() * std::mem::size_of::<Slot>())
                .sum::<usize>()
            + self
                .live_slots()
                .map(|s| self.slot(s).rcpt_states.heap_bytes())
                .sum::<usize>();
        let lookup = self
            .by_seg
            .values()
            .map(|ss| ss.v.capacity() * 8 + 64)
            .sum();
        let schedule = self.sched.values().map(|q| q.capacity() * 4 + 64).sum();
        IndexFootprint {
            messages: self.len,
            slab_bytes: slab,
            lookup_bytes: lookup,
            schedule_bytes: schedule,
            distinct_replies: self.replies.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::encode_queue_id;
    use crate::state::RcptState;

    fn msg(seg: u64, off: u64, micros: u64, rcpts: usize) -> QueuedMessage {
        QueuedMessage::new(
            MsgRef {
                shard: 1,
                segment: seg,
                offset: off,
            },
            MsgId::new(&encode_queue_id(micros, 1)).unwrap(),
            micros,
            rcpts,
        )
    }

    #[test]
    fn slot_is_56_bytes() {
        assert_eq!(std::mem::size_of::<Slot>(), 56);
    }

    #[test]
    fn insert_get_update_remove_round_trip() {
        let mut ix = QueueIndex::new(1);
        let a = msg(3, 4096, 1_700_000_000_000_000, 2);
        ix.insert(a.clone()).unwrap();
        let (got, fl) = ix.get(a.msg).unwrap();
        assert_eq!(got, a);
        assert!(!fl);
        ix.update(a.msg, |q, fl| {
            q.rcpt_states.set(0, RcptState::Delivered);
            q.attempts = 3;
            q.next_attempt_unix = 1_800_000_000;
            q.last_reply = Some(Arc::from("451 try later"));
            q.warned = true;
            *fl = true;
        });
        let (got, fl) = ix.get(a.msg).unwrap();
        assert!(fl);
        assert_eq!(got.attempts, 3);
        assert_eq!(got.rcpt_states.get(0), Some(RcptState::Delivered));
        assert_eq!(got.last_reply.as_deref(), Some("451 try later"));
        assert!(got.warned && !got.held);
        assert_eq!(ix.find_id(a.id.as_str()), Some(a.msg));
        assert_eq!(ix.remove(a.msg).map(|q| q.id), Some(a.id));
        assert!(ix.get(a.msg).is_none());
        assert!(ix.is_empty());
        assert_eq!(ix.footprint().distinct_replies, 0);
    }

    #[test]
    fn odd_ids_are_kept_whole() {
        let mut ix = QueueIndex::new(1);
        let mut q = msg(1, 100, 5, 1);
        q.id = MsgId::new("not-a-tern-id").unwrap();
        ix.insert(q.clone()).unwrap();
        assert_eq!(ix.get(q.msg).unwrap().0.id, q.id);
        assert_eq!(ix.find_id("not-a-tern-id"), Some(q.msg));
        ix.remove(q.msg);
        assert!(ix.odd_ids.is_empty());
    }

    #[test]
    fn schedule_is_due_order_and_skips_stale_entries() {
        let mut ix = QueueIndex::new(1);
        let msgs: Vec<QueuedMessage> = (0..5).map(|i| msg(1, 100 + i, 10 + i, 1)).collect();
        for q in &msgs {
            ix.insert(q.clone()).unwrap();
        }
        // All new: due 0, first in first out.
        assert_eq!(ix.claim_due(1000), Some(msgs[0].msg));
        assert_eq!(ix.claim_due(1000), Some(msgs[1].msg));
        // A claimed message is not handed out again; after its attempt it is rescheduled.
        ix.update(msgs[0].msg, |q, fl| {
            q.next_attempt_unix = 2000;
            *fl = false;
        });
        ix.schedule(msgs[0].msg);
        // msgs[2] moved later, msgs[3] held, msgs[4] removed: their due-0 entries go stale.
        ix.reschedule(msgs[2].msg, 1500);
        ix.update(msgs[3].msg, |q, _| q.held = true);
        ix.remove(msgs[4].msg);
        assert_eq!(ix.claim_due(1000), None);
        assert_eq!(ix.next_due(), Some(1500));
        assert_eq!(ix.claim_due(1999), Some(msgs[2].msg));
        assert_eq!(ix.claim_due(1999), None);
        assert_eq!(ix.claim_due(2000), Some(msgs[0].msg));
        // Released: scheduled at its own next attempt (0 here: never tried).
        ix.update(msgs[3].msg, |q, _| q.held = false);
        ix.schedule(msgs[3].msg);
        assert_eq!(ix.claim_due(2000), Some(msgs[3].msg));
        assert_eq!(ix.claim_due(u64::MAX), None);
    }

    #[test]
    fn flush_makes_unclaimed_unheld_messages_due() {
        let mut ix = QueueIndex::new(1);
        for i in 0..4 {
            let mut q = msg(1, 100 + i, 10 + i, 1);
            q.next_attempt_unix = 5000;
            q.held = i == 3;
            ix.insert(q).unwrap();
        }
        let first = ix.claim_due(u64::MAX).unwrap();
        assert_eq!(ix.flush_all(), 2);
        let mut got = [ix.claim_due(0).unwrap(), ix.claim_due(0).unwrap()];
        got.sort();
        assert!(!got.contains(&first));
        assert_eq!(ix.claim_due(u64::MAX), None);
    }

    #[test]
    fn stale_schedule_entries_stay_bounded() {
        let mut ix = QueueIndex::new(1);
        let q = msg(1, 100, 10, 1);
        ix.insert(q.clone()).unwrap();
        for t in 0..100_000u64 {
            ix.reschedule(q.msg, 10 + t);
        }
        assert!(ix.sched_entries <= 2 * ix.len() + 4097);
        assert_eq!(ix.claim_due(u64::MAX), Some(q.msg));
    }

    #[test]
    fn slots_and_segment_lists_are_reused_and_dropped() {
        let mut ix = QueueIndex::new(1);
        let n = 3 * CHUNK as u64;
        for i in 0..n {
            ix.insert(msg(i / 1000, 64 + i * 8, i, 1)).unwrap();
        }
        for i in 0..n {
            if i % 1000 != 999 {
                ix.remove(MsgRef {
                    shard: 1,
                    segment: i / 1000,
                    offset: 64 + i * 8,
                });
            }
        }
        assert_eq!(ix.len(), (n / 1000) as usize);
        // Each segment keeps one message; the lists were compacted.
        assert!(ix.by_seg.values().all(|ss| ss.v.len() <= 64 + 1));
        assert_eq!(
            ix.oldest_arrival_unix_micros(),
            Some(999),
            "oldest is the first segment's survivor"
        );
        let chunks = ix.chunks.len();
        for i in 0..n - 20 {
            ix.insert(msg(100 + i / 1000, 64 + i * 8, n + i, 1))
                .unwrap();
        }
        assert_eq!(ix.chunks.len(), chunks, "vacant slots are reused first");
    }

    #[test]
    fn wrong_shard_and_out_of_range_are_refused() {
        let mut ix = QueueIndex::new(2);
        assert!(matches!(
            ix.insert(msg(1, 1, 1, 1)),
            Err(IndexError::WrongShard(_))
        ));
        let mut ix = QueueIndex::new(1);
        assert!(matches!(
            ix.insert(msg(1, 1 << 33, 1, 1)),
            Err(IndexError::OutOfRange(_))
        ));
        assert!(ix.is_empty());
    }
}
