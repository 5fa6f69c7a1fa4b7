//! The segment walk (`recovery::scan_segment`) and record decoders on in-memory segments
//! that start with a valid segment header, so the fuzzer spends its time on records
//! instead of on the header checksum. No files, no syncs.
//!
//! Two modes (low bit of the first byte):
//! - raw: the rest of the input is the segment body after a valid header;
//! - built: the input is a list of record specs. Each becomes a record with a correctly
//!   sealed header: a message (a real serialised envelope, or raw envelope bytes), a
//!   state change (a real payload, or raw bytes), a garbage run, or zeros; then optional
//!   byte flips inside the envelope/payload/body, with the checksums recomputed (so the
//!   rkyv validation and the state decoder see the mutated bytes) or left stale, and an
//!   optionally broken header checksum.
//!
//! Must hold for every input: no panic; records in order, 8-aligned, inside the segment;
//! corrupt regions before `data_end`, the torn tail at `data_end`. For built inputs whose
//! garbage forges no header: every record built intact is found at its offset with the
//! envelope or state change it was built from (no good record is lost behind a bad one;
//! except inside the claimed extent of a bad record whose sealed header claims more than
//! was written, which recovery skips by that length: see `recovery::tests`), every record
//! found is one that was built, and `data_end` is the end of the last good record.
#![no_main]
use tern_queue::record::{
    encode_state, serialize_envelope, RecordHeader, SegmentHeader, KIND_MESSAGE, KIND_STATE,
    RECORD_ALIGN, RECORD_HEADER_SIZE, SEGMENT_HEADER_SIZE,
};
use tern_queue::recovery::{scan_segment, Payload};
use tern_queue::{
    BodyType, DeliverBy, DeliverByMode, Envelope, MsgId, MsgRef, RcptState, Recipient, Ret,
    StateChange,
};

const SALT: u64 = 0x005e_ed0f_7e12_5a17;

/// A little reader over the fuzz input; runs out gracefully (zeros).
struct In<'a>(&'a [u8]);
impl In<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, r)) => {
                self.0 = r;
                b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
    fn str(&mut self, max: usize) -> String {
        let n = self.u8() as usize % (max + 1);
        String::from_utf8_lossy(self.bytes(n)).into_owned()
    }
    fn empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn envelope(i: &mut In) -> Envelope {
    let flags = i.u8();
    let nrcpt = i.u8() % 4;
    Envelope {
        id: i.str(23),
        sender: i.str(40),
        recipients: (0..nrcpt)
            .map(|_| Recipient {
                addr: i.str(40),
                notify: i.u8() & 15,
                orcpt: (flags & 1 != 0).then(|| i.str(20)),
            })
            .collect(),
        arrival_unix_micros: u64::from(i.u16()) << 20,
        size: 0,
        body_type: match flags >> 6 {
            0 => BodyType::SevenBit,
            1 => BodyType::EightBitMime,
            _ => BodyType::BinaryMime,
        },
        smtputf8: flags & 2 != 0,
        ret: (flags & 4 != 0).then_some(if flags & 8 != 0 { Ret::Full } else { Ret::Hdrs }),
        envid: (flags & 16 != 0).then(|| i.str(20)),
        deliver_by: (flags & 32 != 0).then(|| DeliverBy {
            seconds: i64::from(i.u16() as i16),
            mode: if flags & 1 != 0 {
                DeliverByMode::Return
            } else {
                DeliverByMode::Notify
            },
            trace: flags & 8 != 0,
        }),
        auth: (flags & 2 != 0).then(|| i.str(20)),
        client_helo: i.str(30),
        client_addr: i.str(30),
    }
}

fn state_change(i: &mut In) -> StateChange {
    let n = i.u8() % 5;
    let flags = i.u8();
    StateChange {
        msg: MsgRef {
            shard: i.u16(),
            segment: u64::from(i.u16()),
            offset: u64::from(i.u16()) * 8,
        },
        id: MsgId::new(&i.str(23)).unwrap_or_else(|| MsgId::new("x").unwrap()),
        updates: (0..n)
            .map(|_| {
                let idx = u32::from(i.u8());
                let st = RcptState::from_code(i.u8() % 3).unwrap_or(RcptState::Pending);
                (idx, st)
            })
            .collect(),
        attempts: u32::from(i.u8()),
        next_attempt_unix: u64::from(i.u16()),
        last_reply: i.str(100),
        warned: flags & 1 != 0,
        held: flags & 2 != 0,
    }
}

#[derive(Debug)]
enum Expect {
    Message(Envelope),
    State(StateChange),
}

fn pad(seg: &mut Vec<u8>) {
    while !seg.len().is_multiple_of(RECORD_ALIGN as usize) {
        seg.push(0);
    }
}

/// Appends one record at the (aligned) end of `seg`.
fn push_record(
    seg: &mut Vec<u8>,
    kind: u16,
    env: &[u8],
    body: &[u8],
    spec: u8,
    i: &mut In,
) -> bool {
    let mut env = env.to_vec();
    let mut body = body.to_vec();
    // spec bits: 0x01 flip bytes, 0x02 recompute CRCs after the flips, 0x04 break the
    // header CRC, 0x08 claim a longer body than present (record runs past the end).
    let mut intact = true;
    let mut env_crc = crc32c::crc32c(&env);
    let mut body_crc = crc32c::crc32c(&body);
    if spec & 0x01 != 0 {
        let flips = i.u8() % 4 + 1;
        for _ in 0..flips {
            let at = i.u16() as usize;
            let x = i.u8().max(1);
            let total = env.len() + body.len();
            if total == 0 {
                break;
            }
            let at = at % total;
            if at < env.len() {
                env[at] ^= x;
            } else {
                body[at - env.len()] ^= x;
            }
        }
        intact = false;
        if spec & 0x02 != 0 {
            env_crc = crc32c::crc32c(&env);
            body_crc = crc32c::crc32c(&body);
        }
    }
    let offset = seg.len() as u64;
    let h = RecordHeader {
        kind,
        env_len: env.len() as u32,
        env_crc,
        body_len: body.len() as u64 + if spec & 0x08 != 0 { 1 << 20 } else { 0 },
        body_crc,
    };
    if spec & 0x08 != 0 && kind == KIND_MESSAGE {
        intact = false;
    }
    let mut hb = [0u8; RECORD_HEADER_SIZE];
    h.encode_into(&mut hb, SALT, offset);
    if spec & 0x04 != 0 {
        hb[40] ^= 1;
        intact = false;
    }
    seg.extend_from_slice(&hb);
    seg.extend_from_slice(&env);
    pad(seg);
    seg.extend_from_slice(&body);
    pad(seg);
    intact
}

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

/// Aligned offsets (outside `known`) where a header valid for this segment starts.
fn forged_headers(seg: &[u8], known: &[u64]) -> bool {
    let mut q = SEGMENT_HEADER_SIZE as usize;
    while q + RECORD_HEADER_SIZE <= seg.len() {
        if !known.contains(&(q as u64))
            && RecordHeader::decode(&seg[q..q + RECORD_HEADER_SIZE], SALT, q as u64).is_some()
        {
            return true;
        }
        q += RECORD_ALIGN as usize;
    }
    false
}

fn check_invariants(seg: &[u8]) -> Option<tern_queue::recovery::SegmentScan> {
    let scan = scan_segment(seg).expect("a valid segment header is accepted");
    let limit = (seg.len() as u64).min(scan.header.size);
    let mut prev_end = SEGMENT_HEADER_SIZE;
    for r in &scan.records {
        assert!(r.offset >= prev_end, "records overlap or go backwards");
        assert_eq!(r.offset % RECORD_ALIGN, 0);
        let end = r.offset + r.header.total_len().expect("accepted length");
        assert!(end <= limit, "record past the end of the segment");
        prev_end = end;
    }
    assert_eq!(scan.data_end, prev_end);
    assert!(scan.data_end <= limit.max(SEGMENT_HEADER_SIZE));
    for c in scan.corrupt.iter().chain(&scan.interrupted) {
        assert!(c.start < c.end && c.start < scan.data_end, "{c:?}");
    }
    if let Some(t) = &scan.torn {
        assert_eq!(t.start, scan.data_end);
        assert!(t.end > t.start && t.end <= limit, "{t:?}");
    }
    assert_eq!(scan.truncated, (seg.len() as u64) < scan.header.size);
    Some(scan)
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        // Raw: a valid header, then the fuzzer's bytes; the declared size is the file's
        // size, or (bit 1) a different one (a truncated or over-long file).
        let size = if mode & 2 != 0 {
            SEGMENT_HEADER_SIZE + u64::from(mode >> 2) * 64
        } else {
            SEGMENT_HEADER_SIZE + rest.len() as u64
        };
        let mut seg = segment_header(size);
        seg.extend_from_slice(rest);
        check_invariants(&seg);
        return;
    }
    let mut i = In(rest);
    let mut seg = segment_header(0);
    let mut expect: Vec<(u64, Expect)> = Vec::new();
    let mut starts: Vec<u64> = Vec::new();
    let mut n = 0;
    while !i.empty() && n < 16 {
        n += 1;
        let op = i.u8();
        let spec = op >> 3;
        let offset = seg.len() as u64;
        match op & 7 {
            0 | 1 => {
                // A message with a real envelope and a body.
                let mut env = envelope(&mut i);
                let blen = i.u16() as usize % 600;
                let body = i.bytes(blen).to_vec();
                env.size = body.len() as u64;
                let Ok(eb) = serialize_envelope(&env) else {
                    return;
                };
                starts.push(offset);
                if push_record(&mut seg, KIND_MESSAGE, &eb, &body, spec, &mut i) {
                    expect.push((offset, Expect::Message(env)));
                }
            }
            2 => {
                // Raw envelope bytes, sealed: exercises rkyv validation directly.
                let elen = i.u16() as usize % 400;
                let env = i.bytes(elen).to_vec();
                let blen = i.u8() as usize;
                let body = i.bytes(blen).to_vec();
                starts.push(offset);
                push_record(&mut seg, KIND_MESSAGE, &env, &body, spec, &mut i);
            }
            3 => {
                let c = state_change(&mut i);
                let p = encode_state(&c);
                starts.push(offset);
                if push_record(&mut seg, KIND_STATE, &p, &[], spec & !0x08, &mut i) {
                    expect.push((offset, Expect::State(c)));
                }
            }
            4 => {
                let plen = i.u8() as usize;
                let p = i.bytes(plen).to_vec();
                starts.push(offset);
                push_record(&mut seg, KIND_STATE, &p, &[], spec & !0x08, &mut i);
            }
            5 => {
                // Garbage (unaligned length allowed; then re-aligned with zeros).
                let len = i.u8() as usize;
                let g = i.bytes(len).to_vec();
                seg.extend_from_slice(&g);
                pad(&mut seg);
            }
            6 => {
                let len = (i.u8() as usize + 1) * 8;
                seg.resize(seg.len() + len, 0);
            }
            _ => {
                // A copy of the previous record's bytes at a new offset: its header is
                // sealed for the old offset, so it must not count here.
                // Capped: the segment doubles otherwise, and big inputs only slow the run.
                if let Some(&last) = starts.last() {
                    let copy = seg[last as usize..].to_vec();
                    if seg.len() + copy.len() <= 1 << 16 {
                        seg.extend_from_slice(&copy);
                    }
                }
            }
        }
    }
    let tail = i.u8();
    let file_len = seg.len() as u64;
    // Declared size: the file's, or larger (file truncated), or smaller (cut records).
    let size = match tail & 3 {
        0 | 1 => file_len,
        2 => file_len + 4096,
        _ => SEGMENT_HEADER_SIZE.max(file_len.saturating_sub(u64::from(tail >> 2) * 8)),
    };
    seg[..SEGMENT_HEADER_SIZE as usize].copy_from_slice(&segment_header(size));
    let Some(scan) = check_invariants(&seg) else {
        return;
    };
    if forged_headers(&seg, &starts) {
        return;
    }
    let limit = file_len.min(size);
    for (off, want) in &expect {
        let found = scan.records.iter().find(|r| r.offset == *off);
        let r = match found {
            Some(r) => r,
            None => {
                let h = RecordHeader::decode(
                    &seg[*off as usize..*off as usize + RECORD_HEADER_SIZE],
                    SALT,
                    *off,
                )
                .expect("intact header");
                // A record cut off by a smaller declared size is not expected.
                if off + h.total_len().unwrap() > limit {
                    continue;
                }
                // Nor one inside the claimed extent of an earlier record whose sealed
                // header claims more than was written (spec 0x08): recovery skips a bad
                // record by its length, which the header checksum vouches for.
                let shadowed = starts.iter().any(|&st| {
                    st < *off
                        && RecordHeader::decode(
                            &seg[st as usize..st as usize + RECORD_HEADER_SIZE],
                            SALT,
                            st,
                        )
                        .and_then(|h| h.total_len())
                        .is_some_and(|t| st + t > *off && st + t <= limit)
                });
                if shadowed {
                    continue;
                }
                panic!("intact record at {off} lost: {want:?}\n{scan:#?}");
            }
        };
        match (&r.payload, want) {
            (Payload::Message(got), Expect::Message(w)) => assert_eq!(got, w),
            (Payload::State(got), Expect::State(w)) => assert_eq!(got, w),
            (got, w) => panic!("record at {off}: got {got:?}, built {w:?}"),
        }
    }
    for r in &scan.records {
        assert!(
            starts.contains(&r.offset),
            "record found at {} that was never built",
            r.offset
        );
    }
    if let Some((last_off, _)) = expect
        .iter()
        .rev()
        .find(|(off, _)| scan.records.iter().any(|r| r.offset == *off))
    {
        assert!(scan.data_end > *last_off);
    }
});
