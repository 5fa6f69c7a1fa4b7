//! Reading a segment back: which records are good, which regions are corrupt, and
//! where the data ends.
//!
//! Owns: the walk over one segment's bytes. It is a pure function of those bytes (no
//! I/O), so it can be fuzzed and is shared by `ShardSpool::open` (which then cuts torn
//! tails) and the read-only `scan_spool`.
//! Must never: panic or index out of bounds on any input; trust a length before the
//! salted header checksum has validated it; treat bytes inside a body as a header
//! (bodies are skipped by length; during resynchronisation only a header sealed with
//! this segment's salt counts).
//!
//! The walk, from offset 4096:
//! - a valid header (salted CRC, known kind, lengths inside the segment) → check the
//!   envelope CRC, body CRC and rkyv validation; good → a record, bad → a corrupt region
//!   of exactly that record's length;
//! - anything else (zeros, garbage) → look for the next valid header at record
//!   alignment. Found: the bytes in between are a hole (all zero: a reservation whose
//!   write never happened, e.g. a failed batch) or a corrupt region; not found: stop.
//!
//! The data ends after the last good record. Bad regions before that are skipped (every
//! good record after them is kept: with two batches in flight on one segment, a later
//! batch's records may be durable, and acknowledged, behind an earlier batch's write that
//! never reached the disk); any non-zero bytes after it are the torn tail of an
//! interrupted write.
//!
//! # Interrupted writes and corruption (not from an RFC: our own rule)
//! A bad region before the data end is either an *interrupted write* or *corruption*, and
//! the difference decides whether its segment may be recycled. Segments are created full
//! of zeros and a record's range is written once, so a write that did not complete leaves
//! each part of its range either written or still zero: after kill -9 a prefix (the
//! kernel stops a write at a page boundary), after a power loss any subset of sectors.
//! Such a record never got its 250: that needs an fdatasync covering its whole range to
//! have returned success, after which no part of it is zero any more. So a bad region with
//! a part that is all zeros where the record has data is an interrupted write
//! ([`SegmentScan::interrupted`]): skipped, and no obstacle to deleting the segment once
//! its good records are finished. Judged on the range cut at 512-byte (sector) offsets:
//! - a record whose sealed header is valid (the header itself was written whole): a
//!   whole zero sector after the header, or a zero piece from the last sector boundary
//!   to the end of its data (padding excluded) — a kill -9 stops a write at a page
//!   boundary, so this catches every prefix-torn record, however short its lost tail;
//! - a region without a valid header (its header sector was lost): a whole zero sector,
//!   or a zero piece of at least [`RECORD_ALIGN`] bytes at its start or end (longer than
//!   a record's padding).
//!
//! Any other bad region is corruption ([`SegmentScan::corrupt`]): possibly a message that
//! was acknowledged and can no longer be read, so its segment is kept for the operator.
//! Neither is ever read as a record: only a sealed header with matching checksums is.
//!
//! XXX The rule can call corruption "interrupted" when a damaged record's data held an
//! aligned run of 512 zero bytes, or ended in zero bytes just past a sector boundary
//! (binary content only: text bodies end in CRLF); the segment is then recycled after its
//! other messages, losing only the unreadable record's remains, which were logged.

use crate::envelope::Envelope;
use crate::record::{
    align_up, decode_state, deserialize_envelope, RecordHeader, SegmentHeader, KIND_STATE,
    RECORD_ALIGN, RECORD_HEADER_SIZE, RECORD_MAGIC, SEGMENT_HEADER_SIZE,
};
use crate::state::StateChange;

/// A good record.
#[derive(Debug, Clone)]
pub struct ScannedRecord {
    pub offset: u64,
    pub header: RecordHeader,
    pub payload: Payload,
}

/// What a good record holds.
#[derive(Debug, Clone)]
pub enum Payload {
    /// Kind 1: an accepted message (its body stays in the segment).
    Message(Envelope),
    /// Kind 2: a delivery-state change of a message (this or an older segment).
    State(StateChange),
}

/// A byte range that is not a good record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRegion {
    pub start: u64,
    pub end: u64,
    pub reason: String,
}

/// The result of walking one segment.
#[derive(Debug, Clone)]
pub struct SegmentScan {
    pub header: SegmentHeader,
    pub records: Vec<ScannedRecord>,
    /// Corrupt regions before `data_end`: skipped, the records after them are kept; the
    /// segment is evidence (see the module doc).
    pub corrupt: Vec<BadRegion>,
    /// Interrupted writes before `data_end` (records that never got a 250: a sector of
    /// them was never written): skipped, the records after them are kept; the segment is
    /// recycled like a clean one.
    pub interrupted: Vec<BadRegion>,
    /// First byte after the last good record (8-aligned); appends continue here.
    pub data_end: u64,
    /// Non-zero bytes at or after `data_end`: a torn write to cut (zero) before appending.
    pub torn: Option<BadRegion>,
    /// The file is shorter than the size its header declares (someone truncated it):
    /// its records are readable but it must never be appended to.
    pub truncated: bool,
}

/// Walks a whole segment file's bytes. `Err` only when the segment header itself is
/// unusable (then nothing in the file can be trusted to be a record).
pub fn scan_segment(bytes: &[u8]) -> Result<SegmentScan, String> {
    let header = SegmentHeader::decode(bytes)?;
    if header.size < SEGMENT_HEADER_SIZE {
        return Err(format!(
            "segment header declares an impossible size {}",
            header.size
        ));
    }
    let file_len = bytes.len() as u64;
    let limit = file_len.min(header.size);
    let salt = header.salt;
    let mut records = Vec::new();
    // Each bad region, and whether it is an interrupted write (see the module doc).
    let mut bad: Vec<(BadRegion, bool)> = Vec::new();
    let mut pos = SEGMENT_HEADER_SIZE;
    while pos + RECORD_HEADER_SIZE as u64 <= limit {
        match header_at(bytes, pos, limit, salt) {
            Some((h, total)) => {
                let end = pos + total;
                match check_payload(bytes, pos, &h) {
                    Ok(payload) => records.push(ScannedRecord {
                        offset: pos,
                        header: h,
                        payload,
                    }),
                    Err(reason) => {
                        // The sealed header was written whole: judge the bytes after it,
                        // up to the end of the record's data (its zero padding excluded).
                        let data = if h.body_len == 0 {
                            RECORD_HEADER_SIZE as u64 + u64::from(h.env_len)
                        } else {
                            h.envelope_end() + h.body_len
                        };
                        let from = pos + RECORD_HEADER_SIZE as u64;
                        let unwritten = unwritten_piece(bytes, from, pos + data, u64::MAX, 1);
                        bad.push((
                            BadRegion {
                                start: pos,
                                end,
                                reason,
                            },
                            unwritten,
                        ))
                    }
                }
                pos = end;
            }
            None => match next_header(bytes, pos + RECORD_ALIGN, limit, salt) {
                Some(next) => {
                    let gap = &bytes[pos as usize..next as usize];
                    if gap.iter().any(|&b| b != 0) {
                        let unwritten =
                            unwritten_piece(bytes, pos, next, RECORD_ALIGN, RECORD_ALIGN);
                        bad.push((
                            BadRegion {
                                start: pos,
                                end: next,
                                reason: "bytes without a valid record header (corrupted region)"
                                    .into(),
                            },
                            unwritten,
                        ));
                    }
                    pos = next;
                }
                None => break,
            },
        }
    }
    let data_end = records.last().map_or(SEGMENT_HEADER_SIZE, |r| {
        // total_len was checked when the header was accepted.
        r.offset + r.header.total_len().unwrap_or(0)
    });
    let (before, after): (Vec<_>, Vec<_>) = bad.into_iter().partition(|b| b.0.start < data_end);
    let (interrupted, corrupt): (Vec<_>, Vec<_>) = before.into_iter().partition(|b| b.1);
    let (interrupted, corrupt): (Vec<BadRegion>, Vec<BadRegion>) = (
        interrupted.into_iter().map(|b| b.0).collect(),
        corrupt.into_iter().map(|b| b.0).collect(),
    );
    let torn = bytes
        .get(data_end as usize..limit as usize)
        .and_then(|tail| tail.iter().rposition(|&b| b != 0))
        .map(|last| {
            let end = align_up(data_end + last as u64 + 1, RECORD_ALIGN)
                .unwrap_or(limit)
                .min(limit);
            let reason = after.first().map_or_else(
                || "non-zero bytes after the last record".to_string(),
                |b| b.0.reason.clone(),
            );
            BadRegion {
                start: data_end,
                end,
                reason,
            }
        });
    Ok(SegmentScan {
        header,
        records,
        corrupt,
        interrupted,
        data_end,
        torn,
        truncated: file_len < header.size,
    })
}

/// The sector size an interrupted write is judged by: the smallest unit a disk writes
/// atomically (a page-cache page, 4096, is a multiple of it).
const SECTOR: u64 = 512;

/// Whether `[start, end)` holds a part that was evidently never written: cut at
/// [`SECTOR`]-aligned offsets, a whole sector of zeros, or a zero piece at the start (at
/// least `first_min` bytes) or at the end (at least `last_min` bytes) of the range. The
/// edge minimums keep zeros a record legitimately holds from counting: where the range
/// may end in a record's padding or start in a header's reserved fields, `RECORD_ALIGN`
/// (longer than either); where the caller cut the range to the record's data after its
/// validated header, nothing at the start and one byte at the end. See the module doc.
fn unwritten_piece(bytes: &[u8], start: u64, end: u64, first_min: u64, last_min: u64) -> bool {
    let mut p = start;
    while p < end {
        let q = ((p / SECTOR + 1) * SECTOR).min(end);
        let len = q - p;
        let counts = match (p % SECTOR == 0, q % SECTOR == 0) {
            (true, true) => true,
            // From a sector boundary to the end of the range.
            (true, false) => len >= last_min,
            // From the start of the range to a sector boundary.
            (false, true) => len >= first_min,
            // The whole range inside one sector (written atomically).
            (false, false) => len >= first_min.max(last_min),
        };
        if counts
            && bytes
                .get(p as usize..q as usize)
                .is_some_and(|piece| piece.iter().all(|&b| b == 0))
        {
            return true;
        }
        p = q;
    }
    false
}

/// A valid record header at `pos` whose record fits below `limit`: (header, total length).
fn header_at(bytes: &[u8], pos: u64, limit: u64, salt: u64) -> Option<(RecordHeader, u64)> {
    let end = pos.checked_add(RECORD_HEADER_SIZE as u64)?;
    let h = RecordHeader::decode(bytes.get(pos as usize..end as usize)?, salt, pos)?;
    let total = h.total_len()?;
    if pos.checked_add(total)? > limit {
        return None;
    }
    Some((h, total))
}

/// The first offset ≥ `from` (at record alignment) with a valid header.
fn next_header(bytes: &[u8], from: u64, limit: u64, salt: u64) -> Option<u64> {
    let mut q = from;
    while q + RECORD_HEADER_SIZE as u64 <= limit {
        // Cheap filter before the checksum: most positions are zeros or body bytes.
        if bytes.get(q as usize..q as usize + 4) == Some(&RECORD_MAGIC[..])
            && header_at(bytes, q, limit, salt).is_some()
        {
            return Some(q);
        }
        q += RECORD_ALIGN;
    }
    None
}

/// Checks the envelope and body (or the state payload) of a record whose header is valid.
fn check_payload(bytes: &[u8], pos: u64, h: &RecordHeader) -> Result<Payload, String> {
    let env_start = pos as usize + RECORD_HEADER_SIZE;
    let env = bytes
        .get(env_start..env_start + h.env_len as usize)
        .ok_or("envelope out of bounds")?;
    if crc32c::crc32c(env) != h.env_crc {
        return Err(if h.kind == KIND_STATE {
            "state record checksum mismatch".into()
        } else {
            "envelope checksum mismatch".into()
        });
    }
    if h.kind == KIND_STATE {
        return decode_state(env).map(Payload::State);
    }
    let body_start = (pos + h.envelope_end()) as usize;
    let body = bytes
        .get(body_start..body_start + h.body_len as usize)
        .ok_or("body out of bounds")?;
    if crc32c::crc32c(body) != h.body_crc {
        return Err("body checksum mismatch".into());
    }
    let envelope = deserialize_envelope(env)?;
    if envelope.size != h.body_len {
        return Err(format!(
            "envelope size {} disagrees with the record's body length {}",
            envelope.size, h.body_len
        ));
    }
    Ok(Payload::Message(envelope))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{RecordHeader, SegmentHeader, KIND_MESSAGE};

    const SALT: u64 = 0x5eed;

    fn segment_header(size: u64) -> Vec<u8> {
        SegmentHeader {
            shard: 0,
            number: 1,
            created_unix_micros: 0,
            salt: SALT,
            size,
        }
        .encode()
        .to_vec()
    }

    /// Appends a record with a sealed header for `env`/`body`, claiming `claim` body octets.
    fn push(seg: &mut Vec<u8>, env: &[u8], body: &[u8], claim: u64) -> u64 {
        let off = seg.len() as u64;
        let h = RecordHeader {
            kind: KIND_MESSAGE,
            env_len: env.len() as u32,
            env_crc: crc32c::crc32c(env),
            body_len: claim,
            body_crc: crc32c::crc32c(body),
        };
        let mut hb = [0u8; RECORD_HEADER_SIZE];
        h.encode_into(&mut hb, SALT, off);
        seg.extend_from_slice(&hb);
        seg.extend_from_slice(env);
        seg.resize(
            align_up(seg.len() as u64, RECORD_ALIGN).unwrap() as usize,
            0,
        );
        seg.extend_from_slice(body);
        seg.resize(
            align_up(seg.len() as u64, RECORD_ALIGN).unwrap() as usize,
            0,
        );
        off
    }

    fn envelope(size: u64) -> Vec<u8> {
        let env = Envelope {
            id: "ID".into(),
            sender: "a@b.example".into(),
            recipients: vec![],
            arrival_unix_micros: 0,
            size,
            body_type: crate::BodyType::SevenBit,
            smtputf8: false,
            ret: None,
            envid: None,
            deliver_by: None,
            auth: None,
            client_helo: "c".into(),
            client_addr: "192.0.2.1:1".into(),
        };
        crate::record::serialize_envelope(&env).unwrap().to_vec()
    }

    /// Writes `seg`'s final length into its header (the declared size).
    fn seal(seg: &mut [u8]) {
        let len = seg.len() as u64;
        seg[..SEGMENT_HEADER_SIZE as usize].copy_from_slice(&segment_header(len));
    }

    fn offsets(scan: &SegmentScan) -> Vec<u64> {
        scan.records.iter().map(|r| r.offset).collect()
    }

    /// Review finding F2: two batches in flight on one segment, kill -9. Batch A's record
    /// is only partly on disk (its header and first page written, the rest still zero),
    /// batch B's later record is complete and may have been acknowledged. B is recovered,
    /// A is an interrupted write (not corruption: its segment may be recycled), and
    /// appends continue after B.
    #[test]
    fn a_torn_record_in_the_middle_is_an_interrupted_write_and_what_follows_is_kept() {
        let env = envelope(9000);
        let body: Vec<u8> = (0..9000u32).map(|i| b'a' + (i % 26) as u8).collect();
        let mut seg = segment_header(0);
        let first = push(&mut seg, &envelope(5), b"first", 5);
        let torn = push(&mut seg, &env, &body, 9000);
        let torn_end = seg.len();
        let after = push(&mut seg, &envelope(5), b"after", 5);
        seal(&mut seg);
        // The write of `torn` stopped at the first page boundary past its start.
        let cut = (torn / 4096 + 1) * 4096;
        seg[cut as usize..torn_end].fill(0);
        let scan = scan_segment(&seg).unwrap();
        assert_eq!(offsets(&scan), [first, after]);
        assert!(scan.corrupt.is_empty(), "{:?}", scan.corrupt);
        assert_eq!(scan.interrupted.len(), 1);
        assert_eq!(
            (scan.interrupted[0].start, scan.interrupted[0].end),
            (torn, torn_end as u64)
        );
        assert_eq!(scan.interrupted[0].reason, "body checksum mismatch");
        assert_eq!(scan.data_end, seg.len() as u64);
        assert!(scan.torn.is_none());
    }

    /// The same with the torn record's header sector lost (a power loss writes sectors in
    /// any order) but its later sectors written: no header to skip it by, so the walk
    /// resynchronises on the next sealed header, and the gap is an interrupted write.
    #[test]
    fn a_record_whose_header_sector_was_never_written_is_an_interrupted_write() {
        let body: Vec<u8> = (0..3000u32).map(|i| b'A' + (i % 26) as u8).collect();
        let mut seg = segment_header(0);
        let first = push(&mut seg, &envelope(5), b"first", 5);
        let torn = push(&mut seg, &envelope(3000), &body, 3000);
        let torn_end = seg.len();
        let after = push(&mut seg, &envelope(5), b"after", 5);
        seal(&mut seg);
        let sector_end = ((torn / 512 + 1) * 512) as usize;
        seg[torn as usize..sector_end].fill(0);
        let scan = scan_segment(&seg).unwrap();
        assert_eq!(offsets(&scan), [first, after]);
        assert!(scan.corrupt.is_empty(), "{:?}", scan.corrupt);
        assert_eq!(scan.interrupted.len(), 1);
        assert_eq!(
            (scan.interrupted[0].start, scan.interrupted[0].end),
            (torn, torn_end as u64)
        );
    }

    /// The tear is at the last sector boundary of a record: only its last few data bytes
    /// are missing. Still an interrupted write (the zero piece is data, not padding).
    #[test]
    fn a_record_missing_only_its_last_data_bytes_is_an_interrupted_write() {
        let mut seg = segment_header(0);
        let first = push(&mut seg, &envelope(5), b"first", 5);
        let env = envelope(0);
        // A body that ends 3 bytes past a sector boundary.
        let probe = seg.len() + RECORD_HEADER_SIZE + env.len().div_ceil(8) * 8;
        let body_len = (probe / 512 + 2) * 512 + 3 - probe;
        let body = vec![b'z'; body_len];
        let torn = push(&mut seg, &envelope(body_len as u64), &body, body_len as u64);
        let data_end = seg.len() - (8 - 3);
        let after = push(&mut seg, &envelope(5), b"after", 5);
        seal(&mut seg);
        assert_eq!(data_end % 512, 3, "the test's own layout");
        seg[data_end - 3..data_end].fill(0);
        let scan = scan_segment(&seg).unwrap();
        assert_eq!(offsets(&scan), [first, after]);
        assert!(scan.corrupt.is_empty(), "{:?}", scan.corrupt);
        assert_eq!(scan.interrupted.len(), 1);
        assert_eq!(scan.interrupted[0].start, torn);
        // A flipped byte there instead is corruption.
        seg[data_end - 3..data_end].fill(b'y');
        let scan = scan_segment(&seg).unwrap();
        assert_eq!((scan.corrupt.len(), scan.interrupted.len()), (1, 0));
    }

    /// A record that was written whole and then damaged (no zero sector in it) stays
    /// corruption: never read as a record, and its segment is kept as evidence. So do
    /// garbage bytes where a header should be.
    #[test]
    fn damage_without_an_unwritten_sector_stays_corruption() {
        let body: Vec<u8> = (0..3000u32).map(|i| b'A' + (i % 26) as u8).collect();
        let mut seg = segment_header(0);
        push(&mut seg, &envelope(5), b"first", 5);
        let flipped = push(&mut seg, &envelope(3000), &body, 3000);
        let garbled = push(&mut seg, &envelope(3000), &body, 3000);
        let after = push(&mut seg, &envelope(5), b"after", 5);
        seal(&mut seg);
        seg[flipped as usize + 1000] ^= 0x20;
        seg[garbled as usize..garbled as usize + 16].fill(0xEE);
        let scan = scan_segment(&seg).unwrap();
        assert_eq!(scan.records.last().map(|r| r.offset), Some(after));
        assert_eq!(scan.records.len(), 2);
        assert!(scan.interrupted.is_empty(), "{:?}", scan.interrupted);
        let starts: Vec<u64> = scan.corrupt.iter().map(|c| c.start).collect();
        assert_eq!(starts, [flipped, garbled]);
        // Zeros only where a record has them anyway (its padding, the header's reserved
        // fields) are not taken for an unwritten sector.
        assert!(!unwritten_piece(&seg, flipped, after, 8, 8));
    }

    /// Found by the spool_segment fuzz target (minimised, 2026-11-29), kept as the
    /// specification: a record whose sealed header claims more body than is good is one
    /// corrupt region of exactly the claimed length, so a record that starts inside that
    /// extent is not looked for (the header checksum vouches for lengths; only resync
    /// after an unreadable header searches byte positions), and the first record after the
    /// extent is found again.
    #[test]
    fn bad_record_is_skipped_by_its_sealed_length() {
        let mut seg = segment_header(0);
        let env = envelope(5);
        let a = push(&mut seg, &env, b"hello", 5 + 256);
        let b = push(&mut seg, &env, b"hello", 5);
        let a_end = a + RecordHeader::decode(&seg[a as usize..], SALT, a)
            .and_then(|h| h.total_len())
            .unwrap();
        assert!(a_end > b && a_end > seg.len() as u64);
        seg.resize(a_end as usize, 0);
        let c = push(&mut seg, &env, b"hello", 5);
        let len = seg.len() as u64;
        seg[..SEGMENT_HEADER_SIZE as usize].copy_from_slice(&segment_header(len));
        let scan = scan_segment(&seg).unwrap();
        let offsets: Vec<u64> = scan.records.iter().map(|r| r.offset).collect();
        assert_eq!(offsets, [c], "b at {b} lies inside a's claimed extent");
        assert_eq!(scan.corrupt.len(), 1);
        assert_eq!(scan.corrupt[0].start, a);
        assert_eq!(scan.corrupt[0].end, c);
        assert_eq!(scan.corrupt[0].reason, "body checksum mismatch");
        assert_eq!(scan.data_end, len);
        assert!(scan.torn.is_none());
    }
}
