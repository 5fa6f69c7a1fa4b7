//! The durable spool of one shard: reserve → write → fdatasync, and recovery at start.
//!
//! Owns: the shard's segment directory `DIR/shard-NNN/` (its lock, its active segment,
//! the numbering of its segments) and the group-commit write path.
//! Must never: report a record as committed before an fdatasync covering it returned
//! success; report success for any record of a batch whose fdatasync failed; append to a
//! segment after a write or sync on it failed; write into another shard's directory;
//! panic on anything read from disk.
//!
//! # Write path (why it is split in two)
//! The engine runs one single-threaded executor per core. [`ShardSpool::prepare`] runs
//! on that thread and only does memory work: reserve the byte range in the active
//! segment (bump a counter), serialise the envelope. [`commit_batch`] runs on a blocking
//! thread (glommio `spawn_blocking`) for a *batch* of prepared records from the shard's
//! concurrent sessions: it computes the body checksums, writes every record with
//! `pwritev` at its reserved offset (header+envelope buffer and the body's `Bytes`
//! slices gathered, not copied), then issues ONE fdatasync per segment touched (group
//! commit: the stack notes measured 30–40x over a sync per record). Reservations are
//! made in order on the shard thread, so records never overlap even when batches commit
//! out of order.
//!
//! # Delivery state and recycling
//! `prepare_state` appends kind-2 records (see `state.rs`) through the same group
//! commit; `open` applies them into `Recovered::queue`; `finished` + `reclaim` delete a
//! segment once it is not active, all its messages are finished and it holds no state
//! record of a message whose (older) segment still exists (see `SegTrack`, and
//! docs/decisions.md, "Delivery state in the spool"). `load` reads a message back with
//! its body zero-copy from a cached read-only mapping.
//!
//! # Recovery
//! See `recovery.rs` for one segment's bytes. A shard's log is replayed by ONE function,
//! `replay`, used by `open` and by the offline `scan_spool_with_state`, so the tools list
//! exactly what the server delivers. `open` additionally zeroes torn tails (so the next
//! append at the cut point cannot be confused with old bytes) and continues appending in
//! the last segment after its last good record.

use std::collections::{BTreeMap, HashMap};
use std::fs::OpenOptions;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use bytes::Bytes;
use memmap2::Mmap;

use crate::envelope::Envelope;
use crate::error::{clone_io_error, is_no_space, SpoolError};
use crate::id::{parse_queue_id, QueueIdGen};
use crate::record::{
    align_up, deserialize_envelope, encode_state_into, envelope_capacity_hint,
    serialize_envelope_after, state_len, RecordHeader, SegmentHeader, KIND_MESSAGE, KIND_STATE,
    RECORD_ALIGN, RECORD_HEADER_SIZE, SEGMENT_HEADER_SIZE,
};
use crate::recovery::{scan_segment, Payload, SegmentScan};
use crate::segment::{
    create_segment, fdatasync, fsync_dir, list_segments, lock_shard_dir, map_readonly,
    parse_shard_dir_name, pwritev_all, remove_stale_temporaries, segment_file_name, shard_dir,
    zero_range, SegmentHandle,
};
use crate::state::{truncate_utf8, MsgId, MsgRef, QueuedMessage, StateChange, MAX_ID_LEN};

/// Smallest accepted `segment_size`: a header page plus room for a few small records.
pub const MIN_SEGMENT_SIZE: u64 = 8192;
/// Largest accepted `segment_size`: record offsets stay below 2^32, which the queue
/// runner's index relies on (`index.rs` keeps them as `u32`). A record larger than this
/// still gets a segment of its own, where it starts right after the header.
pub const MAX_SEGMENT_SIZE: u64 = 1 << 32;

/// Tuning knobs of a shard spool.
#[derive(Debug, Clone)]
pub struct SpoolOptions {
    /// Size of each segment file, created preallocated and zeroed. Default 32 MiB.
    /// Rounded up to 4 KiB; at least [`MIN_SEGMENT_SIZE`].
    pub segment_size: u64,
}

impl Default for SpoolOptions {
    fn default() -> Self {
        SpoolOptions {
            segment_size: 32 << 20,
        }
    }
}

/// What `open` returns in [`Recovered::messages`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listing {
    /// Every message record still on disk, finished or not, with its full envelope
    /// (for tools that list everything, and for the engine's start-up log).
    All,
    /// Leave `messages` empty: only the compact `queue` is built (a large queue then
    /// does not need every envelope in memory at once during start-up).
    QueueOnly,
}

/// What `open` found on disk.
#[derive(Debug, Clone, Default)]
pub struct Recovered {
    /// Every good message record of the segments that are kept, finished or not, in
    /// (segment, offset) order (empty with [`Listing::QueueOnly`]).
    pub messages: Vec<RecoveredMessage>,
    /// The messages with at least one pending recipient after applying every state
    /// record in log order, in (segment, offset) order: what the queue runner indexes.
    pub queue: Vec<QueuedMessage>,
    /// Message records found whose recipients are all final (not in `queue`).
    pub finished: usize,
    /// Good state-change records read.
    pub state_records: usize,
    /// State records that refer to no known message (its segment was recycled, or the
    /// reference or id does not match): ignored.
    pub state_records_ignored: usize,
    /// Segments deleted at start-up because everything in them was finished.
    pub segments_deleted: usize,
    /// Segment files whose header was valid and whose records were read.
    pub segments: usize,
    /// Segments whose tail held a torn (partially written) record, now zeroed.
    pub torn_tails_cut: usize,
    /// Corrupted records/regions skipped in the middle of segments (each logged); their
    /// segments are kept (evidence) until the operator removes them.
    pub corrupt_skipped: usize,
    /// Interrupted writes skipped in the middle of segments (each logged): records that
    /// never got a 250 (see `recovery.rs`), typically an earlier batch's write cut short
    /// by a crash while a later batch's was complete. Their segments are recycled as usual.
    pub interrupted_skipped: usize,
    /// Segment files whose header was unreadable: left untouched, never appended to.
    pub unreadable_segments: usize,
}

/// One message found on disk.
#[derive(Debug, Clone, PartialEq)]
pub struct RecoveredMessage {
    pub envelope: Envelope,
    pub segment: u64,
    pub offset: u64,
    pub body_len: u64,
    /// The shard directory it was found in (for `read_body`).
    pub shard: u16,
}

/// A record that became durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    /// Inline: committing a record allocates nothing for its id.
    pub id: MsgId,
    pub segment: u64,
    pub offset: u64,
}

/// Recycling bookkeeping of one segment (in memory only; rebuilt by `open`).
///
/// The rule (docs/decisions.md, "Delivery state in the spool"): a segment is deleted
/// when it is not the active one, every message record in it is finished (`live == 0`),
/// and it holds no state record of a message whose segment still exists (`pins == 0`).
/// The second condition keeps every state record — delivered recipients *and* the
/// record that finished a message — for as long as the message record it applies to is
/// on disk, so recovery can neither lose a delivered-recipient state nor resurrect a
/// finished message.
#[derive(Debug, Default)]
struct SegTrack {
    /// Offsets of this segment's message records, ascending (reservations only grow).
    msgs: Vec<u64>,
    /// Bit `i` set: the message at `msgs[i]` is finished.
    done: Vec<u64>,
    /// Message records not finished yet.
    live: usize,
    /// State records in this segment for messages of an older segment that still exists.
    pins: u32,
    /// (later segment, count): state records of *this* segment's messages held there;
    /// released (their `pins` decremented) when this segment is deleted.
    pinned: Vec<(u64, u32)>,
    /// Never delete: unlinking failed once (kept until restart), or recovery found
    /// corrupt records in it (kept for the operator).
    stuck: bool,
    /// The segment file's size (preallocated, so also what it takes on disk).
    bytes: u64,
}

impl SegTrack {
    fn add_msg(&mut self, offset: u64) {
        debug_assert!(self.msgs.last().is_none_or(|&l| l < offset));
        self.msgs.push(offset);
        if self.done.len() * 64 < self.msgs.len() {
            self.done.push(0);
        }
        self.live += 1;
    }
    fn find(&self, offset: u64) -> Option<usize> {
        self.msgs.binary_search(&offset).ok()
    }
    fn is_done(&self, i: usize) -> bool {
        self.done[i / 64] & (1 << (i % 64)) != 0
    }
    /// Marks message `i` finished; false if it already was.
    fn set_done(&mut self, i: usize) -> bool {
        if self.is_done(i) {
            return false;
        }
        self.done[i / 64] |= 1 << (i % 64);
        self.live -= 1;
        true
    }
    fn add_pin_to(&mut self, later: u64, count: u32) {
        match self.pinned.iter_mut().find(|(s, _)| *s == later) {
            Some((_, c)) => *c += count,
            None => self.pinned.push((later, count)),
        }
    }
    fn deletable(&self) -> bool {
        self.live == 0 && self.pins == 0 && !self.stuck
    }
}

/// A snapshot of one segment's recycling bookkeeping (tests, `tern queue` tools).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentInfo {
    pub number: u64,
    /// Message records in the segment.
    pub messages: usize,
    /// Of those, not finished.
    pub live: usize,
    /// State records here that keep the segment because their message's segment exists.
    pub pins: u32,
}

/// A read-only mapping of a whole segment, shared by the bodies handed out by `load`.
#[derive(Debug)]
struct SegMap {
    map: Mmap,
    salt: u64,
    /// min(file length, size in the header): nothing at or beyond is read.
    limit: u64,
    path: PathBuf,
}

/// Owner of a `Bytes` body: keeps the mapping alive (even after the segment file is
/// unlinked: the kernel keeps the pages until the last mapping goes).
struct MapOwner(Arc<SegMap>);
impl AsRef<[u8]> for MapOwner {
    fn as_ref(&self) -> &[u8] {
        &self.0.map
    }
}

/// A message body as [`ShardSpool::load`] returns it: `Bytes` viewing a read-only
/// mapping of the segment (zero-copy; cloning and slicing are cheap).
pub type BodyRef = Bytes;

/// The segment currently taking appends.
#[derive(Debug)]
struct Active {
    seg: Arc<SegmentHandle>,
    /// Next free (8-aligned) offset.
    write_off: u64,
}

/// One shard's spool. Owned by the shard thread; `prepare` takes `&mut self`, so there is
/// one reserver per shard and reservations never race.
#[derive(Debug)]
pub struct ShardSpool {
    dir: PathBuf,
    shard: u16,
    opts: SpoolOptions,
    active: Option<Active>,
    next_segment: u64,
    /// The next segment, being created (allocated and zeroed) ahead of time on a helper
    /// thread once the active one is half full, so a rollover does not stall the shard's
    /// executor for the ~20 ms that zeroing 32 MiB takes.
    spare: Option<JoinHandle<Result<SegmentHandle, SpoolError>>>,
    id_gen: QueueIdGen,
    /// Recycling bookkeeping of every segment that exists (readable ones).
    segs: BTreeMap<u64, SegTrack>,
    /// Segments that may have become deletable; examined by `reclaim`.
    reclaim_candidates: Vec<u64>,
    /// Read-only mappings for `load`, one per segment, made on first use. A Mutex (not a
    /// RefCell) keeps `ShardSpool: Sync`; it is never contended (one shard thread).
    maps: Mutex<HashMap<u64, Arc<SegMap>>>,
    /// Sum of `SegTrack::bytes`: see [`ShardSpool::disk_bytes`].
    disk_bytes: u64,
    /// Holds the flock for as long as the spool lives.
    _lock: std::fs::File,
}

/// One reserved, not yet written record. `Send + 'static` so a batch can move to a
/// blocking thread; see [`commit_batch`].
#[derive(Debug)]
pub struct PendingWrite {
    seg: Arc<SegmentHandle>,
    offset: u64,
    /// Record header (body checksum not yet filled in) + envelope + padding to 8.
    head: Vec<u8>,
    header: RecordHeader,
    body: Vec<Bytes>,
    /// Zero padding after the body up to the record's 8-byte aligned end.
    pad: usize,
    /// Inline: a pending write costs no allocation for its id.
    id: MsgId,
}

impl PendingWrite {
    pub fn id(&self) -> &str {
        self.id.as_str()
    }
    /// The whole record as one buffer for a positional write (header with the body's
    /// checksum, envelope, body, zero padding), with its segment, offset and id: for the
    /// io_uring commit path (`commit_uring`), whose writes own their buffers. Fails
    /// without writing if the segment was retired (as `commit_batch` does).
    pub(crate) fn into_buffer(
        mut self,
    ) -> Result<(Arc<SegmentHandle>, u64, MsgId, Vec<u8>), SpoolError> {
        if self.seg.is_retired() {
            return Err(SpoolError::SegmentUnusable {
                segment: self.seg.number,
            });
        }
        let body_crc = self
            .body
            .iter()
            .fold(0u32, |crc, b| crc32c::crc32c_append(crc, b));
        self.header.body_crc = body_crc;
        self.header
            .encode_into(&mut self.head, self.seg.salt, self.offset);
        let mut buf = self.head;
        buf.reserve(self.header.body_len as usize + self.pad);
        for b in &self.body {
            buf.extend_from_slice(b);
        }
        buf.resize(buf.len() + self.pad, 0);
        Ok((self.seg, self.offset, self.id, buf))
    }
    /// A delivery-state record (kind 2), not a message.
    pub fn is_state(&self) -> bool {
        self.header.kind == KIND_STATE
    }
    /// The record's queue id, inline.
    pub fn msg_id(&self) -> MsgId {
        self.id
    }
    pub fn segment(&self) -> u64 {
        self.seg.number
    }
    /// The segment the record is reserved in (the committer retires it if the batch's
    /// commit panics).
    pub(crate) fn segment_handle(&self) -> &Arc<SegmentHandle> {
        &self.seg
    }
    pub fn offset(&self) -> u64 {
        self.offset
    }
    /// Bytes the record occupies on disk, padding included.
    pub fn record_len(&self) -> u64 {
        self.head.len() as u64 + self.header.body_len + self.pad as u64
    }
}

impl ShardSpool {
    /// Opens (creating directories) `DIR/shard-NNN/`, takes its lock, recovers existing
    /// segments and returns the messages found. Corrupted records in the middle of a
    /// segment are skipped and logged (`tracing::warn!` with the offset); a torn tail is
    /// cut (zeroed) and appends continue at the cut point.
    ///
    /// Then applies every state record (in log order) and returns in
    /// [`Recovered::queue`] the messages with a pending recipient; segments in which
    /// everything is finished are deleted (see [`ShardSpool::finished`]).
    pub fn open(
        dir: &Path,
        shard: u16,
        opts: SpoolOptions,
    ) -> Result<(ShardSpool, Recovered), SpoolError> {
        Self::open_with(dir, shard, opts, Listing::All)
    }

    /// [`ShardSpool::open`], choosing whether [`Recovered::messages`] is filled.
    pub fn open_with(
        dir: &Path,
        shard: u16,
        opts: SpoolOptions,
        listing: Listing,
    ) -> Result<(ShardSpool, Recovered), SpoolError> {
        let segment_size = align_up(opts.segment_size.max(MIN_SEGMENT_SIZE), 4096)
            .filter(|&s| s <= MAX_SEGMENT_SIZE)
            .ok_or_else(|| {
                SpoolError::Invalid(format!(
                    "segment_size {} is too large (at most {MAX_SEGMENT_SIZE})",
                    opts.segment_size
                ))
            })?;
        let opts = SpoolOptions { segment_size };
        let sdir = shard_dir(dir, shard);
        std::fs::create_dir_all(&sdir)
            .map_err(|e| SpoolError::io(format!("creating {}", sdir.display()), e))?;
        let lock = lock_shard_dir(&sdir)?;
        remove_stale_temporaries(&sdir)?;

        let ShardReplay {
            mut rec,
            segments,
            last_number,
            entries,
            pins,
            floor,
        } = replay(&sdir, shard, ReplayMode::Recover, listing)?;
        let next_segment = last_number.map_or(1, |n| n.saturating_add(1).max(1));
        let mut segs: BTreeMap<u64, SegTrack> = BTreeMap::new();
        let mut active = None;
        for s in segments {
            if Some(s.number) == last_number && !s.truncated {
                active = Some(Active {
                    seg: Arc::new(SegmentHandle::new(
                        s.number,
                        s.file,
                        s.header.salt,
                        s.header.size,
                        s.path,
                    )),
                    write_off: s.data_end,
                });
            }
            segs.insert(
                s.number,
                SegTrack {
                    // Corrupt records are evidence (and may be messages we could not
                    // read): such a segment is never deleted automatically.
                    stuck: s.corrupt,
                    bytes: s.header.size,
                    ..SegTrack::default()
                },
            );
        }
        // Entries are in (segment, offset) order, as `add_msg` wants them.
        for q in &entries {
            if let Some(t) = segs.get_mut(&q.msg.segment) {
                t.add_msg(q.msg.offset);
            }
        }
        for (&(msg_segment, in_segment), &count) in &pins {
            if let Some(t) = segs.get_mut(&msg_segment) {
                t.add_pin_to(in_segment, count);
            }
            if let Some(t) = segs.get_mut(&in_segment) {
                t.pins += count;
            }
        }
        for q in entries {
            if q.is_finished() {
                rec.finished += 1;
                if let Some(t) = segs.get_mut(&q.msg.segment) {
                    if let Some(i) = t.find(q.msg.offset) {
                        t.set_done(i);
                    }
                }
            } else {
                rec.queue.push(q);
            }
        }
        let reclaim_candidates = segs.keys().copied().collect();
        let mut spool = ShardSpool {
            dir: sdir,
            shard,
            opts,
            active,
            next_segment,
            spare: None,
            id_gen: QueueIdGen::new(shard, floor),
            disk_bytes: segs.values().map(|t| t.bytes).sum(),
            segs,
            reclaim_candidates,
            maps: Mutex::new(HashMap::new()),
            _lock: lock,
        };
        if spool.active.is_none() {
            // Create the first segment now, at start-up, rather than on the first accepted
            // message (zeroing a segment takes a while).
            spool.roll(spool.opts.segment_size)?;
        }
        rec.segments_deleted = spool.reclaim();
        if rec.segments_deleted > 0 {
            rec.messages.retain(|m| spool.segs.contains_key(&m.segment));
        }
        Ok((spool, rec))
    }

    pub fn id_gen(&mut self) -> &mut QueueIdGen {
        &mut self.id_gen
    }

    pub fn shard(&self) -> u16 {
        self.shard
    }

    /// The number of the segment currently taking appends.
    pub fn active_segment(&self) -> Option<u64> {
        self.active.as_ref().map(|a| a.seg.number)
    }

    /// Reserves space for one record and serialises its header and envelope.
    /// No syscalls unless a new segment must be created (the active one is full, or was
    /// retired after a failed write/sync). `env.size` must equal the body's length.
    pub fn prepare(&mut self, env: &Envelope, body: &[Bytes]) -> Result<PendingWrite, SpoolError> {
        let body_len: u64 = body.iter().map(|b| b.len() as u64).sum();
        if env.size != body_len {
            return Err(SpoolError::Invalid(format!(
                "envelope {} says size {} but the body is {} bytes",
                env.id, env.size, body_len
            )));
        }
        let Some(id) = MsgId::new(&env.id) else {
            return Err(SpoolError::Invalid(format!(
                "queue id {:?} is longer than {MAX_ID_LEN} bytes",
                env.id
            )));
        };
        // The envelope is serialised once, straight after room for the record header, into
        // the buffer `commit_batch` writes from (no second copy of it).
        let mut head = Vec::with_capacity(
            RECORD_HEADER_SIZE + envelope_capacity_hint(env) + RECORD_ALIGN as usize,
        );
        head.resize(RECORD_HEADER_SIZE, 0);
        let mut head = serialize_envelope_after(env, head).map_err(SpoolError::Invalid)?;
        let env_bytes = &head[RECORD_HEADER_SIZE..];
        let env_len = u32::try_from(env_bytes.len()).map_err(|_| {
            SpoolError::Invalid(format!("envelope {} is {} bytes", env.id, env_bytes.len()))
        })?;
        let header = RecordHeader {
            kind: KIND_MESSAGE,
            env_len,
            env_crc: crc32c::crc32c(env_bytes),
            body_len,
            // Filled in by commit_batch on the blocking thread: checksumming a large body is
            // the one CPU-heavy step, and it does not belong on the shard's executor.
            body_crc: 0,
        };
        let total = header
            .total_len()
            .ok_or_else(|| SpoolError::Invalid(format!("record {} is too large", env.id)))?;
        let head_len = header.envelope_end() as usize;
        let pad = (total - header.envelope_end() - body_len) as usize;
        let (seg, offset) = self.reserve(total)?;
        // Counted live from the reservation on: if the write fails the segment is kept
        // until the next restart recounts it (never deleted too early).
        self.segs.entry(seg.number).or_default().add_msg(offset);
        head.resize(head_len, 0);
        Ok(PendingWrite {
            seg,
            offset,
            head,
            header,
            body: body.to_vec(),
            pad,
            id,
        })
    }

    /// Reserves and encodes a state-change record for `change.msg`, to be committed with
    /// [`commit_batch`] (in the same batches as messages: one fdatasync for all).
    /// No syscalls unless the active segment rolls over.
    ///
    /// `Err(Invalid)` if the message is not a known, unfinished message record of this
    /// shard. The recipient indices are not checked here (the spool keeps no envelopes
    /// in memory); recovery ignores a record with an index out of range.
    pub fn prepare_state(&mut self, change: &StateChange) -> Result<PendingWrite, SpoolError> {
        let m = change.msg;
        let known = m.shard == self.shard
            && self
                .segs
                .get(&m.segment)
                .and_then(|t| t.find(m.offset).map(|i| !t.is_done(i)))
                .unwrap_or(false);
        if !known {
            return Err(SpoolError::Invalid(format!(
                "state change for {} at {m:?}: not an unfinished message of shard {}",
                change.id, self.shard
            )));
        }
        // Encoded once, after room for the record header, in the buffer that is written.
        let mut head =
            Vec::with_capacity(RECORD_HEADER_SIZE + state_len(change) + RECORD_ALIGN as usize);
        head.resize(RECORD_HEADER_SIZE, 0);
        encode_state_into(change, &mut head);
        let payload = &head[RECORD_HEADER_SIZE..];
        let env_len = u32::try_from(payload.len()).map_err(|_| {
            SpoolError::Invalid(format!("state change for {} is too large", change.id))
        })?;
        let header = RecordHeader {
            kind: KIND_STATE,
            env_len,
            env_crc: crc32c::crc32c(payload),
            body_len: 0,
            body_crc: 0,
        };
        let total = header
            .total_len()
            .ok_or_else(|| SpoolError::Invalid("state change too large".into()))?;
        let (seg, offset) = self.reserve(total)?;
        if seg.number != m.segment {
            // This segment now holds state of a message in an older one: it must outlive
            // that segment (see `SegTrack`).
            if let Some(t) = self.segs.get_mut(&m.segment) {
                t.add_pin_to(seg.number, 1);
            }
            self.segs.entry(seg.number).or_default().pins += 1;
        }
        head.resize(total as usize, 0);
        Ok(PendingWrite {
            seg,
            offset,
            head,
            header,
            body: Vec::new(),
            pad: 0,
            id: change.id,
        })
    }

    /// The runner's signal that every recipient of `msg` is final and the state record
    /// saying so is durable (committed), and that no other write for `msg` is in flight.
    /// Idempotent. Deletes every segment that thereby becomes reclaimable (unlink, then
    /// fsync of the directory: a few ms on the calling thread, only when a segment goes).
    ///
    /// `Err(Invalid)` if `msg` is not a message record this spool knows.
    pub fn finished(&mut self, msg: MsgRef) -> Result<(), SpoolError> {
        let track = (msg.shard == self.shard)
            .then(|| self.segs.get_mut(&msg.segment))
            .flatten();
        let Some(track) = track else {
            return Err(SpoolError::Invalid(format!(
                "finished: no segment {} in shard {}",
                msg.segment, self.shard
            )));
        };
        let i = track.find(msg.offset).ok_or_else(|| {
            SpoolError::Invalid(format!("finished: no message record at {msg:?}"))
        })?;
        if track.set_done(i) && track.live == 0 {
            self.reclaim_candidates.push(msg.segment);
        }
        self.reclaim();
        Ok(())
    }

    /// Deletes every segment that is reclaimable now (not active, all messages finished,
    /// no state record of a message whose segment still exists); returns how many.
    /// Called by `finished` and `open`; a segment that stops being active is examined at
    /// the next call.
    ///
    /// Deletion runs in rounds: unlink the ready segments, fsync the directory, and only
    /// then release what they pinned, so a later segment's deletion is never durable
    /// before the deletion of the segment whose messages its state records describe
    /// (otherwise a crash could bring back those messages without their final state).
    pub fn reclaim(&mut self) -> usize {
        let mut deleted = 0;
        loop {
            let active = self.active_segment();
            let mut cands = std::mem::take(&mut self.reclaim_candidates);
            cands.sort_unstable();
            cands.dedup();
            let ready: Vec<u64> = cands
                .into_iter()
                .filter(|n| Some(*n) != active && self.segs.get(n).is_some_and(|t| t.deletable()))
                .collect();
            if ready.is_empty() {
                return deleted;
            }
            let mut unlinked = Vec::new();
            for n in ready {
                let path = self.dir.join(segment_file_name(n));
                match std::fs::remove_file(&path) {
                    Ok(()) => unlinked.push(n),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => unlinked.push(n),
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e,
                            "cannot delete a finished segment; kept until restart");
                        if let Some(t) = self.segs.get_mut(&n) {
                            t.stuck = true;
                        }
                    }
                }
            }
            if unlinked.is_empty() {
                return deleted;
            }
            let synced = fsync_dir(&self.dir);
            if let Ok(mut maps) = self.maps.lock() {
                for n in &unlinked {
                    maps.remove(n);
                }
            }
            for n in unlinked {
                let Some(t) = self.segs.remove(&n) else {
                    continue;
                };
                self.disk_bytes = self.disk_bytes.saturating_sub(t.bytes);
                deleted += 1;
                tracing::debug!(shard = self.shard, segment = n, "deleted finished segment");
                if let Err(e) = &synced {
                    // The unlink may not be durable: keep what the segment pins, so it
                    // can never come back without the state records of its messages.
                    tracing::warn!(segment = n, error = %e,
                        "directory sync after deleting a segment failed; its state records are kept");
                    continue;
                }
                for (later, c) in t.pinned {
                    if let Some(lt) = self.segs.get_mut(&later) {
                        lt.pins = lt.pins.saturating_sub(c);
                        if lt.deletable() {
                            self.reclaim_candidates.push(later);
                        }
                    }
                }
            }
        }
    }

    /// The recycling bookkeeping of every segment, in number order.
    /// Bytes the shard's segment files take on disk (what the queue costs in space):
    /// kept as segments come and go (they are preallocated, so their size is fixed), as
    /// cheap to ask as the backpressure check on every MAIL needs.
    pub fn disk_bytes(&self) -> u64 {
        self.disk_bytes
    }

    pub fn segment_info(&self) -> Vec<SegmentInfo> {
        self.segs
            .iter()
            .map(|(&number, t)| SegmentInfo {
                number,
                messages: t.msgs.len(),
                live: t.live,
                pins: t.pins,
            })
            .collect()
    }

    /// Reads a message back: its envelope (deserialised) and its body, zero-copy from a
    /// read-only mapping of the segment (cached per segment), after checking the record
    /// header (salted checksum), the envelope and body checksums. Call only for records
    /// whose commit returned `Ok` (the mapping is read where it is not being written).
    pub fn load(&self, msg: MsgRef) -> Result<(Envelope, BodyRef), SpoolError> {
        if msg.shard != self.shard || !self.segs.contains_key(&msg.segment) {
            return Err(SpoolError::Invalid(format!(
                "load: no segment {} in shard {}",
                msg.segment, self.shard
            )));
        }
        let seg = self.mapping(msg.segment)?;
        let corrupt = |reason: &str| SpoolError::Corrupt {
            path: seg.path.clone(),
            offset: msg.offset,
            reason: reason.to_string(),
        };
        let (h, env_r, body_r) =
            message_at(&seg.map, seg.salt, seg.limit, msg.offset).map_err(corrupt)?;
        let env_bytes = &seg.map[env_r];
        if crc32c::crc32c(env_bytes) != h.env_crc {
            return Err(corrupt("envelope checksum mismatch"));
        }
        if crc32c::crc32c(&seg.map[body_r.clone()]) != h.body_crc {
            return Err(corrupt("body checksum mismatch"));
        }
        let env = deserialize_envelope(env_bytes).map_err(|r| corrupt(&r))?;
        let body = Bytes::from_owner(MapOwner(seg.clone())).slice(body_r);
        Ok((env, body))
    }

    /// Lets the kernel drop this process's page-table entries for the pages of `msg`'s
    /// record (the pages stay in the page cache; a later `load` maps them again).
    ///
    /// Why: `load` reads through a mapping, so every message tried once stays resident
    /// in the process (RssFile) for as long as its segment is mapped. A backlog of
    /// deferred messages would otherwise look like ~1 KiB of resident memory per message,
    /// all of it page cache the process no longer needs until the next attempt. The
    /// runner calls this after an attempt that leaves the message queued (not on the
    /// delivered path, which costs no syscall) and the queue tools after reading.
    pub fn release_pages(&self, msg: MsgRef) {
        if msg.shard != self.shard || !self.segs.contains_key(&msg.segment) {
            return;
        }
        let Ok(seg) = self.mapping(msg.segment) else {
            return;
        };
        let Ok((_, _, body_r)) = message_at(&seg.map, seg.salt, seg.limit, msg.offset) else {
            return;
        };
        // Whole 2 MiB blocks: one page fault on a file mapping maps more than its page
        // (fault-around, and whole large folios of the page cache: measured here, a fault
        // mapped up to 320 KiB around it), but never across a page-table (2 MiB)
        // boundary. Dropping only the record's own pages would leave its neighbours
        // mapped by its fault; zapping the block costs at most 512 entries.
        const WINDOW: usize = 2 * 1024 * 1024;
        let start = (msg.offset as usize) & !(WINDOW - 1);
        let end = body_r.end.div_ceil(WINDOW) * WINDOW;
        let end = end.min(seg.map.len());
        if end <= start {
            return;
        }
        // SAFETY: a read-only, shared, file-backed mapping: MADV_DONTNEED only drops the
        // page-table entries, and the next access faults the same file contents back in
        // from the page cache (unlike a private mapping, nothing is zeroed). Bodies still
        // held elsewhere (`Bytes` over this mapping) read the same bytes after the fault.
        let r = unsafe {
            seg.map
                .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start)
        };
        if let Err(e) = r {
            tracing::debug!(segment = msg.segment, error = %e, "madvise(DONTNEED) failed");
        }
    }

    fn mapping(&self, segment: u64) -> Result<Arc<SegMap>, SpoolError> {
        let mut maps = self
            .maps
            .lock()
            .map_err(|_| SpoolError::Invalid("segment mapping cache poisoned".into()))?;
        if let Some(m) = maps.get(&segment) {
            return Ok(m.clone());
        }
        let path = self.dir.join(segment_file_name(segment));
        let file = std::fs::File::open(&path)
            .map_err(|e| SpoolError::io(format!("opening segment {}", path.display()), e))?;
        let map = map_readonly(&file, &path)?;
        let sh = SegmentHeader::decode(&map).map_err(|reason| SpoolError::Corrupt {
            path: path.clone(),
            offset: 0,
            reason,
        })?;
        let limit = (map.len() as u64).min(sh.size);
        let m = Arc::new(SegMap {
            map,
            salt: sh.salt,
            limit,
            path,
        });
        maps.insert(segment, m.clone());
        Ok(m)
    }

    fn reserve(&mut self, total: u64) -> Result<(Arc<SegmentHandle>, u64), SpoolError> {
        if let Some(a) = &mut self.active {
            if !a.seg.is_retired()
                && a.write_off
                    .checked_add(total)
                    .is_some_and(|end| end <= a.seg.size)
            {
                let off = a.write_off;
                a.write_off += total;
                let seg = a.seg.clone();
                if self.spare.is_none() && a.write_off > a.seg.size / 2 {
                    self.start_spare();
                }
                return Ok((seg, off));
            }
            if a.seg.is_retired() {
                tracing::warn!(
                    segment = a.seg.number,
                    "segment retired after a failed write/sync; rolling"
                );
            }
        }
        // A record larger than a normal segment gets a segment of its own size.
        let needed = align_up(SEGMENT_HEADER_SIZE + total, 4096)
            .ok_or_else(|| SpoolError::Invalid(format!("record of {total} bytes is too large")))?;
        self.roll(self.opts.segment_size.max(needed))?;
        let a = self
            .active
            .as_mut()
            .ok_or_else(|| SpoolError::Invalid("no active segment after roll".into()))?;
        let off = a.write_off;
        a.write_off += total;
        Ok((a.seg.clone(), off))
    }

    /// Starts creating the next normal-size segment on a helper thread. Best effort: if
    /// the thread cannot be started, `roll` creates the segment itself.
    fn start_spare(&mut self) {
        let (dir, shard, number, size) = (
            self.dir.clone(),
            self.shard,
            self.next_segment,
            self.opts.segment_size,
        );
        let spawned = std::thread::Builder::new()
            .name(format!("tern-seg-{shard}"))
            .spawn(move || create_segment(&dir, shard, number, size));
        match spawned {
            Ok(handle) => {
                self.next_segment += 1;
                self.spare = Some(handle);
            }
            Err(e) => tracing::warn!(error = %e,
                "cannot start a thread to pre-create the next segment; creating it at rollover"),
        }
    }

    /// Makes a new segment of at least `size` bytes the active one: the spare if there is
    /// one (waiting for it if it is still being zeroed), else a new one created here.
    fn roll(&mut self, size: u64) -> Result<(), SpoolError> {
        let spare = match self.spare.take().map(|h| h.join()) {
            Some(Ok(Ok(seg))) if seg.size >= size => Some(seg),
            Some(Ok(Ok(seg))) => {
                // A record larger than a normal segment gets a segment of its own. The
                // unused spare is deleted rather than kept for later, so that segment
                // numbers stay in the order segments are used (rare: records > 32 MiB).
                if let Err(e) = std::fs::remove_file(&seg.path) {
                    tracing::warn!(path = %seg.path.display(), error = %e, "cannot remove unused spare segment");
                }
                None
            }
            Some(Ok(Err(e))) => {
                tracing::warn!(error = %e, "pre-creating the next segment failed; retrying at rollover");
                None
            }
            Some(Err(_)) => {
                tracing::error!(
                    "segment pre-creation thread panicked; creating the segment at rollover"
                );
                None
            }
            None => None,
        };
        let seg = match spare {
            Some(seg) => seg,
            None => {
                let number = self.next_segment;
                let seg = create_segment(&self.dir, self.shard, number, size)?;
                self.next_segment = number + 1;
                seg
            }
        };
        let bytes = seg.size;
        self.segs.entry(seg.number).or_default().bytes = bytes;
        self.disk_bytes += bytes;
        let old = self.active.replace(Active {
            seg: Arc::new(seg),
            write_off: SEGMENT_HEADER_SIZE,
        });
        if let Some(old) = old {
            // No longer active: it may already be reclaimable (examined by `reclaim`).
            self.reclaim_candidates.push(old.seg.number);
        }
        Ok(())
    }
}

impl Drop for ShardSpool {
    fn drop(&mut self) {
        // Finish a segment being pre-created while the lock is still held (fields drop
        // after this), so the next opener never races with its rename.
        if let Some(h) = self.spare.take() {
            let _ = h.join();
        }
    }
}

fn report_corruption(path: &Path, scan: &SegmentScan) {
    for c in &scan.corrupt {
        tracing::warn!(path = %path.display(), offset = c.start, end = c.end, reason = %c.reason,
            "skipping corrupted spool record");
    }
    for c in &scan.interrupted {
        tracing::warn!(path = %path.display(), offset = c.start, end = c.end, reason = %c.reason,
            "skipping an interrupted write in the middle of a segment (a record that was never acknowledged; the records after it are kept)");
    }
}

/// Writes and syncs a batch of prepared records (call it on a blocking thread).
///
/// Per shard, run one `commit_batch` at a time, or release concurrent batches strictly in
/// the order they started and fail a finished batch whose segment got retired meanwhile
/// (what `commit::GroupCommit` does): otherwise a sync failure could be reported to one
/// batch while a concurrent batch on the same file sees a success.
///
/// Every record is written with pwritev at its reserved offset; then one fdatasync per
/// distinct segment. Results are in batch order. If any fdatasync fails, EVERY record of
/// the batch fails and the segment is retired (the next `prepare` rolls to a new one):
/// after a failed fdatasync the kernel may have thrown the dirty pages away, so nothing
/// written since the last good sync may be reported durable ("fsyncgate").
pub fn commit_batch(batch: Vec<PendingWrite>) -> Vec<Result<Committed, SpoolError>> {
    commit(batch, true).0
}

/// [`commit_batch`], also returning the segments the batch wrote to, so that a committer
/// with several batches in flight can fail a finished batch whose segment an earlier
/// batch's failure retired meanwhile (`commit::fail_retired`).
pub(crate) fn commit_batch_touching(
    batch: Vec<PendingWrite>,
) -> (Vec<Result<Committed, SpoolError>>, Vec<Arc<SegmentHandle>>) {
    commit(batch, true)
}

/// Like [`commit_batch`] but WITHOUT fdatasync: the records are NOT durable. For
/// benchmarks that separate write cost from sync cost; never use it to answer 250.
#[doc(hidden)]
pub fn commit_batch_unsynced_for_bench(
    batch: Vec<PendingWrite>,
) -> Vec<Result<Committed, SpoolError>> {
    commit(batch, false).0
}

fn commit(
    batch: Vec<PendingWrite>,
    sync: bool,
) -> (Vec<Result<Committed, SpoolError>>, Vec<Arc<SegmentHandle>>) {
    let mut results: Vec<Result<Committed, SpoolError>> = Vec::with_capacity(batch.len());
    // Distinct segments written to, in first-use order (a batch rarely spans more than two).
    let mut touched: Vec<Arc<SegmentHandle>> = Vec::new();
    for mut pw in batch {
        results.push(write_one(&mut pw).map(|()| {
            if !touched.iter().any(|s| Arc::ptr_eq(s, &pw.seg)) {
                touched.push(pw.seg.clone());
            }
            Committed {
                id: pw.id,
                segment: pw.seg.number,
                offset: pw.offset,
            }
        }));
    }
    if !sync {
        return (results, touched);
    }
    let mut sync_failure: Option<(u64, std::io::Error)> = None;
    for seg in &touched {
        // The segment may have been retired by a failed write in this batch, or by another
        // batch's failed fdatasync on this file, which may have consumed a writeback error
        // that also covered our pages (it is reported once per open file): then our
        // "success" proves nothing. `sync_checked` serialises the syncs of one segment so
        // that the check always follows the other batch's retirement.
        let synced = seg.sync_checked(|| fdatasync(&seg.file));
        if let Err(e) = synced {
            tracing::error!(segment = seg.number, path = %seg.path.display(), error = %e,
                "fdatasync failed; segment retired, the whole batch fails");
            sync_failure.get_or_insert((seg.number, e));
        }
    }
    if let Some((segment, e)) = sync_failure {
        fail_all(&mut results, segment, &e);
    }
    (results, touched)
}

/// After a failed fdatasync of `segment`: every record of the batch that was written
/// fails (nothing written since the last good sync may be reported durable).
pub(crate) fn fail_all(
    results: &mut [Result<Committed, SpoolError>],
    segment: u64,
    e: &std::io::Error,
) {
    for r in results.iter_mut() {
        if r.is_ok() {
            *r = Err(if is_no_space(e) {
                SpoolError::Full {
                    context: format!("syncing spool segment {segment}"),
                }
            } else {
                SpoolError::SyncFailed {
                    segment,
                    source: clone_io_error(e),
                }
            });
        }
    }
}

fn write_one(pw: &mut PendingWrite) -> Result<(), SpoolError> {
    if pw.seg.is_retired() {
        return Err(SpoolError::SegmentUnusable {
            segment: pw.seg.number,
        });
    }
    let body_crc = pw
        .body
        .iter()
        .fold(0u32, |crc, b| crc32c::crc32c_append(crc, b));
    pw.header.body_crc = body_crc;
    pw.header.encode_into(&mut pw.head, pw.seg.salt, pw.offset);
    const ZEROS: [u8; RECORD_ALIGN as usize] = [0; RECORD_ALIGN as usize];
    let mut bufs: Vec<&[u8]> = Vec::with_capacity(pw.body.len() + 2);
    bufs.push(&pw.head);
    bufs.extend(pw.body.iter().map(|b| b.as_ref()));
    // The segment is pre-zeroed, but writing the padding keeps the record self-contained
    // even where the range once held torn bytes.
    bufs.push(&ZEROS[..pw.pad]);
    pwritev_all(&pw.seg.file, &bufs, pw.offset).map_err(|e| {
        // A failed write leaves the range in an unknown state; stop appending here.
        pw.seg.retire();
        SpoolError::io(
            format!(
                "writing record {} to segment {} at offset {}",
                pw.id, pw.seg.number, pw.offset
            ),
            e,
        )
    })
}

/// Offline, read-only listing of every shard's messages under `dir` (for
/// `tern queue list --spool DIR`). Takes no lock and never modifies a file: torn tails
/// and corrupt records are logged and left alone.
pub fn scan_spool(dir: &Path) -> Result<Vec<RecoveredMessage>, SpoolError> {
    Ok(scan_spool_with_state(dir)?
        .into_iter()
        .map(|(m, _)| m)
        .collect())
}

/// Like [`scan_spool`], with each message's delivery state (recipient states, attempts,
/// next attempt, last reply, held) after applying every state record found, in segment
/// order, exactly as recovery does (`QueuedMessage::apply`). A message whose recipients
/// are all final is finished: `tern queue list` leaves it out unless asked for everything.
pub fn scan_spool_with_state(
    dir: &Path,
) -> Result<Vec<(RecoveredMessage, QueuedMessage)>, SpoolError> {
    let rd = std::fs::read_dir(dir)
        .map_err(|e| SpoolError::io(format!("listing {}", dir.display()), e))?;
    let mut shards = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| SpoolError::io(format!("listing {}", dir.display()), e))?;
        if let Some(shard) = entry.file_name().to_str().and_then(parse_shard_dir_name) {
            shards.push((shard, entry.path()));
        }
    }
    shards.sort_by_key(|(s, _)| *s);
    let mut out: Vec<(RecoveredMessage, QueuedMessage)> = Vec::new();
    for (shard, sdir) in shards {
        let r = replay(&sdir, shard, ReplayMode::ReadOnly, Listing::All)?;
        out.extend(r.rec.messages.into_iter().zip(r.entries));
    }
    Ok(out)
}

/// How [`replay`] may treat the files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReplayMode {
    /// The owning shard at start-up, holding the directory's lock: torn tails are zeroed
    /// (a later append at the cut point must not be confused with the old bytes).
    Recover,
    /// Offline tools: opens read-only, changes nothing (torn tails are only logged).
    ReadOnly,
}

/// One readable segment of the shard, as [`replay`] found it.
#[derive(Debug)]
struct ReplayedSegment {
    number: u64,
    path: PathBuf,
    /// Read-write with [`ReplayMode::Recover`] (the last one may take appends).
    file: std::fs::File,
    header: SegmentHeader,
    /// End of the last good record: where appends would continue.
    data_end: u64,
    /// The scan stopped before the end of the segment (never appended to again).
    truncated: bool,
    /// Corrupt records were skipped in it.
    corrupt: bool,
}

/// One shard's log replayed.
#[derive(Debug)]
struct ShardReplay {
    /// The counters, and with [`Listing::All`] every message record (`messages`, parallel
    /// to `entries`); `queue`, `finished` and `segments_deleted` are left to the caller.
    rec: Recovered,
    segments: Vec<ReplayedSegment>,
    /// The highest segment number on disk, readable or not: appends continue only there.
    last_number: Option<u64>,
    /// Every message record, finished or not, in (segment, offset) order, with its state
    /// after every state record that applies to it, in log order.
    entries: Vec<QueuedMessage>,
    /// (message's segment, state record's segment) → applied state records kept in a
    /// segment other than their message's (what `SegTrack` pins).
    pins: BTreeMap<(u64, u64), u32>,
    /// Largest queue-id timestamp of this shard found (see `QueueIdGen`).
    floor: u64,
}

/// Replays one shard's segments in log order: the ONE reading of a spool, used by the
/// server at start-up ([`ShardSpool::open_with`]) and by the offline tools
/// ([`scan_spool_with_state`]), so `tern queue list --spool` shows exactly the messages
/// and states the server would deliver.
///
/// Rules (not from an RFC, our own): a segment whose header names another shard or
/// number is skipped (left untouched, never recovered); corrupt records are skipped and
/// logged; a message record with an id longer than [`MAX_ID_LEN`] (never written by
/// `prepare`, but a spool may come from elsewhere) is kept under its id cut at a
/// character boundary, so it is delivered and listed (its state records, written
/// with the full id, will not match it); a state record applies only to a known message
/// with the same id, and is otherwise counted as ignored.
fn replay(
    sdir: &Path,
    shard: u16,
    mode: ReplayMode,
    listing: Listing,
) -> Result<ShardReplay, SpoolError> {
    let list = list_segments(sdir)?;
    let mut out = ShardReplay {
        rec: Recovered::default(),
        segments: Vec::new(),
        last_number: list.last().map(|(n, _)| *n),
        entries: Vec::new(),
        pins: BTreeMap::new(),
        floor: 0,
    };
    let mut at: HashMap<MsgRef, usize> = HashMap::new();
    let mut seen: std::collections::BTreeSet<u64> = std::collections::BTreeSet::new();
    for (number, path) in list {
        let opened = match mode {
            ReplayMode::Recover => OpenOptions::new().read(true).write(true).open(&path),
            ReplayMode::ReadOnly => std::fs::File::open(&path),
        };
        let file =
            opened.map_err(|e| SpoolError::io(format!("opening segment {}", path.display()), e))?;
        let scan = {
            let map = map_readonly(&file, &path)?;
            scan_segment(&map)
        };
        let scan = match scan {
            Ok(s) if s.header.shard == shard && s.header.number == number => s,
            Ok(s) => {
                tracing::warn!(path = %path.display(), header_shard = s.header.shard, header_number = s.header.number,
                    "segment header names another shard/segment; left untouched and not recovered");
                out.rec.unreadable_segments += 1;
                continue;
            }
            Err(reason) => {
                tracing::warn!(path = %path.display(), %reason, "unreadable segment; left untouched");
                out.rec.unreadable_segments += 1;
                continue;
            }
        };
        out.rec.segments += 1;
        seen.insert(number);
        report_corruption(&path, &scan);
        out.rec.corrupt_skipped += scan.corrupt.len();
        out.rec.interrupted_skipped += scan.interrupted.len();
        if let Some(torn) = &scan.torn {
            if mode == ReplayMode::Recover {
                tracing::warn!(path = %path.display(), offset = torn.start, end = torn.end, reason = %torn.reason,
                    "cutting torn tail (interrupted write)");
                // Zero the torn bytes: a later scan must not find pieces of the torn
                // record once new records have been appended in front of them.
                zero_range(&file, torn.start, torn.end).map_err(|e| {
                    SpoolError::io(format!("zeroing torn tail of {}", path.display()), e)
                })?;
                out.rec.torn_tails_cut += 1;
            } else {
                tracing::warn!(path = %path.display(), offset = torn.start, reason = %torn.reason,
                    "torn tail (left in place; the owning shard cuts it when it opens)");
            }
        }
        for r in scan.records {
            match r.payload {
                Payload::Message(envelope) => {
                    if let Some((micros, id_shard)) = parse_queue_id(&envelope.id) {
                        if id_shard == shard {
                            out.floor = out.floor.max(micros);
                        }
                    }
                    let msg = MsgRef {
                        shard,
                        segment: number,
                        offset: r.offset,
                    };
                    // `truncate_utf8` cuts to at most MAX_ID_LEN bytes, which always fits.
                    let id =
                        MsgId::new(truncate_utf8(&envelope.id, MAX_ID_LEN)).unwrap_or_default();
                    at.insert(msg, out.entries.len());
                    out.entries.push(QueuedMessage::new(
                        msg,
                        id,
                        envelope.arrival_unix_micros,
                        envelope.recipients.len(),
                    ));
                    if listing == Listing::All {
                        out.rec.messages.push(RecoveredMessage {
                            body_len: r.header.body_len,
                            envelope,
                            segment: number,
                            offset: r.offset,
                            shard,
                        });
                    }
                }
                Payload::State(change) => {
                    out.rec.state_records += 1;
                    let Some(&k) = at.get(&change.msg) else {
                        out.rec.state_records_ignored += 1;
                        if seen.contains(&change.msg.segment) {
                            tracing::warn!(path = %path.display(), offset = r.offset, msg = ?change.msg, id = %change.id,
                                "state record for no known message; ignored");
                        } else {
                            // The normal case after recycling: the message's segment was
                            // deleted when all its messages were finished.
                            tracing::debug!(path = %path.display(), offset = r.offset, msg = ?change.msg,
                                "state record for a recycled segment; ignored");
                        }
                        continue;
                    };
                    if let Err(reason) = out.entries[k].apply(&change) {
                        out.rec.state_records_ignored += 1;
                        tracing::warn!(path = %path.display(), offset = r.offset, %reason,
                            "state record does not match its message; ignored");
                        continue;
                    }
                    if change.msg.segment != number {
                        *out.pins.entry((change.msg.segment, number)).or_default() += 1;
                    }
                }
            }
        }
        out.segments.push(ReplayedSegment {
            number,
            path,
            file,
            header: scan.header,
            data_end: scan.data_end,
            truncated: scan.truncated,
            // Interrupted writes do not count: they never held acknowledged mail.
            corrupt: !scan.corrupt.is_empty(),
        });
    }
    Ok(out)
}

/// Reads the body of the record at (`shard`, `segment`, `offset`) through a read-only
/// mapping, verifying the record header (salted checksum) and the body checksum.
pub fn read_body(dir: &Path, shard: u16, segment: u64, offset: u64) -> Result<Vec<u8>, SpoolError> {
    let path = shard_dir(dir, shard).join(crate::segment::segment_file_name(segment));
    let file = std::fs::File::open(&path)
        .map_err(|e| SpoolError::io(format!("opening segment {}", path.display()), e))?;
    let map = map_readonly(&file, &path)?;
    let corrupt = |offset: u64, reason: &str| SpoolError::Corrupt {
        path: path.clone(),
        offset,
        reason: reason.to_string(),
    };
    let sh = SegmentHeader::decode(&map).map_err(|r| corrupt(0, &r))?;
    let limit = (map.len() as u64).min(sh.size);
    let (h, _, body_r) =
        message_at(&map, sh.salt, limit, offset).map_err(|r| corrupt(offset, r))?;
    let body = &map[body_r];
    if crc32c::crc32c(body) != h.body_crc {
        return Err(corrupt(offset, "body checksum mismatch"));
    }
    Ok(body.to_vec())
}

/// The message record at `offset` of a mapped segment: its validated header (salted
/// checksum, kind 1) and the byte ranges of its envelope and body, checked against
/// `limit`. Checksums of the envelope and body are the caller's to verify.
fn message_at(
    map: &[u8],
    salt: u64,
    limit: u64,
    offset: u64,
) -> Result<(RecordHeader, Range<usize>, Range<usize>), &'static str> {
    if offset < SEGMENT_HEADER_SIZE || offset & (RECORD_ALIGN - 1) != 0 {
        return Err("not a record offset");
    }
    let hdr_bytes = offset
        .checked_add(RECORD_HEADER_SIZE as u64)
        .filter(|&end| end <= limit)
        .and_then(|end| map.get(offset as usize..end as usize))
        .ok_or("record offset beyond the segment")?;
    let h = RecordHeader::decode(hdr_bytes, salt, offset).ok_or("no valid record header")?;
    if h.kind != KIND_MESSAGE {
        return Err("not a message record");
    }
    let env_start = offset + RECORD_HEADER_SIZE as u64;
    let start = offset + h.envelope_end();
    let end = start
        .checked_add(h.body_len)
        .filter(|&end| end <= limit)
        .ok_or("body extends beyond the segment")?;
    Ok((
        h,
        env_start as usize..(env_start + u64::from(h.env_len)) as usize,
        start as usize..end as usize,
    ))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::envelope::BodyType;

    /// A recipient-less envelope with `id` and `size` (also for other modules' tests).
    pub(crate) fn env(id: &str, size: u64) -> Envelope {
        Envelope {
            id: id.into(),
            sender: String::new(),
            recipients: vec![],
            arrival_unix_micros: 0,
            size,
            body_type: BodyType::SevenBit,
            smtputf8: false,
            ret: None,
            envid: None,
            deliver_by: None,
            auth: None,
            client_helo: "h".into(),
            client_addr: "127.0.0.1:1".into(),
        }
    }

    /// Points the spool's active segment at a device file, so the next records go there.
    fn redirect_active(spool: &mut ShardSpool, device: &str) -> u64 {
        let f = OpenOptions::new().write(true).open(device).unwrap();
        let number = spool.next_segment + 1000;
        spool.active = Some(Active {
            seg: Arc::new(SegmentHandle::new(
                number,
                f,
                1,
                1 << 30,
                PathBuf::from(device),
            )),
            write_off: SEGMENT_HEADER_SIZE,
        });
        number
    }

    #[test]
    fn enospc_on_write_is_full_and_retires_the_segment() {
        let d = tempfile::tempdir().unwrap();
        let (mut spool, _) =
            ShardSpool::open(d.path(), 0, SpoolOptions { segment_size: 8192 }).unwrap();
        let bad = redirect_active(&mut spool, "/dev/full"); // every write: ENOSPC
        let a = spool
            .prepare(&env("A", 3), &[Bytes::from_static(b"abc")])
            .unwrap();
        let b = spool
            .prepare(&env("B", 3), &[Bytes::from_static(b"def")])
            .unwrap();
        assert_eq!((a.segment(), b.segment()), (bad, bad));
        let r = commit_batch(vec![a, b]);
        assert!(matches!(&r[0], Err(SpoolError::Full { .. })), "{:?}", r[0]);
        assert!(r[0].as_ref().unwrap_err().is_full());
        // The first failure retired the segment; the second record was not written there.
        assert!(matches!(&r[1], Err(SpoolError::SegmentUnusable { segment }) if *segment == bad));
        // The next prepare rolls to a fresh, real segment.
        let c = spool
            .prepare(&env("C", 3), &[Bytes::from_static(b"ghi")])
            .unwrap();
        assert_ne!(c.segment(), bad);
        assert!(commit_batch(vec![c]).into_iter().all(|r| r.is_ok()));
    }

    #[test]
    fn failed_fdatasync_fails_the_whole_batch_and_retires_the_segment() {
        let d = tempfile::tempdir().unwrap();
        let (mut spool, _) =
            ShardSpool::open(d.path(), 0, SpoolOptions { segment_size: 8192 }).unwrap();
        // A record in a real segment, then records in a "segment" whose fdatasync fails
        // (/dev/null accepts writes but fdatasync on it returns EINVAL).
        let good = spool
            .prepare(&env("G", 1), &[Bytes::from_static(b"g")])
            .unwrap();
        let bad = redirect_active(&mut spool, "/dev/null");
        let x = spool
            .prepare(&env("X", 1), &[Bytes::from_static(b"x")])
            .unwrap();
        let r = commit_batch(vec![good, x]);
        for res in &r {
            assert!(
                matches!(res, Err(SpoolError::SyncFailed { segment, .. }) if *segment == bad),
                "{res:?}"
            );
        }
        let y = spool
            .prepare(&env("Y", 1), &[Bytes::from_static(b"y")])
            .unwrap();
        assert_ne!(y.segment(), bad, "retired segment must not take appends");
        let r = commit_batch(vec![y]);
        assert!(r[0].is_ok());
        drop(spool);
        // Only Y is reported... but G's bytes were written and synced to a real file,
        // so recovery may legitimately find it; what matters is that Y is there.
        let (_s, rec) = ShardSpool::open(d.path(), 0, SpoolOptions { segment_size: 8192 }).unwrap();
        assert!(rec.messages.iter().any(|m| m.envelope.id == "Y"));
    }
}
