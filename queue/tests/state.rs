//! Delivery state in the spool: state-change records, recovery into the queue, `load`,
//! and segment recycling (docs/decisions.md, "Delivery state in the spool").

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use tern_queue::segment::segment_file_name;
use tern_queue::{
    commit_batch, BodyType, Committed, Envelope, MsgId, MsgRef, QueuedMessage, RcptState,
    Recipient, Recovered, ShardSpool, SpoolError, SpoolOptions, StateChange,
};

use RcptState::{Delivered, Failed, Pending};

const SHARD: u16 = 1;

fn opts() -> SpoolOptions {
    // The smallest segment: 4 KiB of records, so tests roll over after a few messages.
    SpoolOptions { segment_size: 8192 }
}

fn open(dir: &Path) -> (ShardSpool, Recovered) {
    ShardSpool::open(dir, SHARD, opts()).expect("open")
}

fn seg_path(dir: &Path, segment: u64) -> PathBuf {
    dir.join(format!("shard-{SHARD:03}"))
        .join(segment_file_name(segment))
}

/// A stored message: where it is, its envelope and body.
struct Msg {
    r: MsgRef,
    env: Envelope,
    body: Vec<u8>,
}

impl Msg {
    fn id(&self) -> MsgId {
        MsgId::new(&self.env.id).unwrap()
    }
    fn change(&self, updates: &[(u32, RcptState)]) -> StateChange {
        StateChange {
            msg: self.r,
            id: self.id(),
            updates: updates.to_vec(),
            attempts: 0,
            next_attempt_unix: 0,
            last_reply: String::new(),
            warned: false,
            held: false,
        }
    }
}

fn put(spool: &mut ShardSpool, rcpts: usize, body_len: usize) -> Msg {
    let body: Vec<u8> = (0..body_len).map(|i| (i * 7 + 3) as u8).collect();
    let parts = [
        Bytes::copy_from_slice(&body[..body_len / 3]),
        Bytes::copy_from_slice(&body[body_len / 3..]),
    ];
    let env = Envelope {
        id: spool.id_gen().next(),
        sender: "s@example.org".into(),
        recipients: (0..rcpts)
            .map(|i| Recipient {
                addr: format!("r{i}@example.net"),
                notify: 0,
                orcpt: None,
            })
            .collect(),
        arrival_unix_micros: 1_700_000_000_000_000,
        size: body_len as u64,
        body_type: BodyType::EightBitMime,
        smtputf8: false,
        ret: None,
        envid: None,
        deliver_by: None,
        auth: None,
        client_helo: "h".into(),
        client_addr: "192.0.2.1:1".into(),
    };
    let pw = spool.prepare(&env, &parts).unwrap();
    let c = commit_batch(vec![pw]).pop().unwrap().unwrap();
    Msg {
        r: MsgRef {
            shard: SHARD,
            segment: c.segment,
            offset: c.offset,
        },
        env,
        body,
    }
}

fn put_state(spool: &mut ShardSpool, c: &StateChange) -> Committed {
    let pw = spool.prepare_state(c).unwrap();
    commit_batch(vec![pw]).pop().unwrap().unwrap()
}

/// Delivers every recipient, makes it durable, tells the spool.
fn finish(spool: &mut ShardSpool, m: &Msg) {
    let ups: Vec<(u32, RcptState)> = (0..m.env.recipients.len() as u32)
        .map(|i| (i, Delivered))
        .collect();
    put_state(spool, &m.change(&ups));
    spool.finished(m.r).unwrap();
}

/// Writes 1-recipient filler messages until the active segment changes; returns them.
fn roll_over(spool: &mut ShardSpool) -> Vec<Msg> {
    let start = spool.active_segment().unwrap();
    let mut out = Vec::new();
    while spool.active_segment() == Some(start) {
        out.push(put(spool, 1, 1200));
    }
    out
}

fn queued<'a>(rec: &'a Recovered, m: &Msg) -> Option<&'a QueuedMessage> {
    rec.queue.iter().find(|q| q.msg == m.r)
}

fn seg_exists(dir: &Path, n: u64) -> bool {
    seg_path(dir, n).exists()
}

#[test]
fn state_round_trip_across_restarts() {
    let d = tempfile::tempdir().unwrap();
    let (mut spool, _) = open(d.path());
    let a = put(&mut spool, 2, 100);
    let b = put(&mut spool, 1, 50);
    let c = put(&mut spool, 3, 10);
    // a: rcpt 0 delivered, rcpt 1 deferred. Batched with c's change: one fdatasync.
    let mut ca = a.change(&[(0, Delivered)]);
    ca.attempts = 1;
    ca.next_attempt_unix = 1_800_000_123;
    ca.last_reply = "451 4.7.1 greylisted, try again in 300 seconds".into();
    ca.warned = true;
    let cc = c.change(&[(0, Delivered), (1, Failed), (2, Delivered)]);
    let batch = vec![
        spool.prepare_state(&ca).unwrap(),
        spool.prepare_state(&cc).unwrap(),
    ];
    assert!(commit_batch(batch).iter().all(|r| r.is_ok()));
    drop(spool);

    let (mut spool, rec) = open(d.path());
    assert_eq!(rec.state_records, 2);
    assert_eq!(rec.finished, 1, "c has no pending recipient");
    assert_eq!(rec.messages.len(), 3, "`messages` lists finished ones too");
    assert_eq!(
        rec.queue.iter().map(|q| q.msg).collect::<Vec<_>>(),
        vec![a.r, b.r]
    );
    let qa = queued(&rec, &a).unwrap();
    assert_eq!(qa.id, a.env.id.as_str());
    assert_eq!(qa.rcpt_states.to_vec(), vec![Delivered, Pending]);
    assert_eq!(qa.attempts, 1);
    assert_eq!(qa.next_attempt_unix, 1_800_000_123);
    assert_eq!(
        qa.last_reply.as_deref(),
        Some("451 4.7.1 greylisted, try again in 300 seconds")
    );
    assert!(qa.warned && !qa.held);
    assert_eq!(qa.arrival_unix_micros, a.env.arrival_unix_micros);
    let qb = queued(&rec, &b).unwrap();
    assert_eq!(qb.rcpt_states.to_vec(), vec![Pending]);
    assert_eq!(
        (qb.attempts, qb.next_attempt_unix, qb.last_reply.as_deref()),
        (0, 0, None)
    );

    // Second restart after more changes: the later record wins for the absolute fields,
    // recipient deltas accumulate.
    let mut qa2 = qa.clone();
    let mut ch = qa2.change(vec![]);
    ch.attempts = 2;
    ch.held = true;
    ch.last_reply = "x".repeat(600);
    put_state(&mut spool, &ch);
    qa2.apply(&ch).unwrap();
    drop(spool);
    let (_spool, rec) = open(d.path());
    let qa3 = queued(&rec, &a).unwrap();
    assert_eq!(qa3, &qa2);
    assert_eq!(qa3.rcpt_states.to_vec(), vec![Delivered, Pending]);
    assert_eq!(qa3.attempts, 2);
    assert!(qa3.held && qa3.warned);
    assert_eq!(qa3.last_reply.as_deref().map(str::len), Some(512));
}

#[test]
fn state_record_in_a_later_segment_than_its_message() {
    let d = tempfile::tempdir().unwrap();
    let (mut spool, _) = open(d.path());
    let a = put(&mut spool, 2, 100);
    let fill = roll_over(&mut spool);
    let c = put_state(&mut spool, &a.change(&[(1, Failed)]));
    assert!(c.segment > a.r.segment);
    let info = spool.segment_info();
    assert_eq!(info.iter().find(|s| s.number == c.segment).unwrap().pins, 1);
    drop(spool);
    let (_spool, rec) = open(d.path());
    assert_eq!(
        queued(&rec, &a).unwrap().rcpt_states.to_vec(),
        vec![Pending, Failed]
    );
    assert_eq!(rec.queue.len(), 1 + fill.len());
}

/// Offset of the first byte of a state record's payload.
fn payload_at(c: &Committed) -> u64 {
    c.offset + 48
}

fn patch(path: &Path, offset: u64, bytes: &[u8]) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
}

#[test]
fn torn_state_record_at_the_tail_is_cut() {
    let d = tempfile::tempdir().unwrap();
    let (mut spool, _) = open(d.path());
    let a = put(&mut spool, 2, 100);
    let mut c1 = a.change(&[(0, Delivered)]);
    c1.attempts = 1;
    put_state(&mut spool, &c1);
    let mut c2 = a.change(&[(1, Delivered)]);
    c2.attempts = 2;
    let last = put_state(&mut spool, &c2);
    drop(spool);
    // The last record's write was interrupted: its payload is half garbage.
    patch(
        &seg_path(d.path(), last.segment),
        payload_at(&last) + 4,
        &[0xAB; 20],
    );
    let (mut spool, rec) = open(d.path());
    assert_eq!(rec.torn_tails_cut, 1);
    assert_eq!(rec.state_records, 1);
    let q = queued(&rec, &a).unwrap();
    assert_eq!(q.rcpt_states.to_vec(), vec![Delivered, Pending]);
    assert_eq!(q.attempts, 1);
    // The record written again is found after the next restart.
    put_state(&mut spool, &c2);
    spool.finished(a.r).unwrap();
    assert!(
        !seg_exists(d.path(), a.r.segment),
        "recycled: not active any more"
    );
    drop(spool);
    let (_s, rec) = open(d.path());
    assert_eq!(rec.torn_tails_cut, 0);
    assert!(rec.queue.is_empty());
}

/// Review finding F2: kill -9 with two batches in flight on one segment left the earlier
/// batch's record half-written (a page of it never reached the file) in the middle of the
/// segment, and the later batch's record complete behind it. Recovery keeps the later
/// record (it may have been acknowledged), counts the torn one as an interrupted write,
/// not corruption, and the segment is deleted once its messages are delivered, like a
/// clean one (before, it was kept forever as "corrupt").
#[test]
fn interrupted_write_mid_segment_keeps_what_follows_and_the_segment_is_recycled() {
    let d = tempfile::tempdir().unwrap();
    let (mut spool, _) = open(d.path());
    let a = put(&mut spool, 1, 100);
    let torn = put(&mut spool, 2, 1500);
    let c = put(&mut spool, 1, 100);
    assert_eq!((a.r.segment, c.r.segment), (torn.r.segment, torn.r.segment));
    let fill = roll_over(&mut spool);
    drop(spool);
    // The torn record's write stopped at a sector boundary: the rest is still zeros.
    let from = (torn.r.offset + 64).div_ceil(512) * 512;
    assert!(from < c.r.offset);
    patch(
        &seg_path(d.path(), torn.r.segment),
        from,
        &vec![0; (c.r.offset - from) as usize],
    );
    let (mut spool, rec) = open(d.path());
    assert_eq!(
        (
            rec.interrupted_skipped,
            rec.corrupt_skipped,
            rec.torn_tails_cut
        ),
        (1, 0, 0)
    );
    assert!(queued(&rec, &a).is_some() && queued(&rec, &c).is_some());
    assert!(queued(&rec, &torn).is_none(), "a torn record is never read");
    let (_, body) = spool.load(c.r).unwrap();
    assert_eq!(&body[..], &c.body[..]);
    let seg = torn.r.segment;
    finish(&mut spool, &a);
    for m in fill.iter().filter(|m| m.r.segment == seg) {
        finish(&mut spool, m);
    }
    assert!(seg_exists(d.path(), seg), "c is not delivered yet");
    finish(&mut spool, &c);
    assert!(
        !seg_exists(d.path(), seg),
        "every message delivered: the segment must be recycled"
    );
}

#[test]
fn corrupted_state_record_in_the_middle_is_skipped() {
    let d = tempfile::tempdir().unwrap();
    let (mut spool, _) = open(d.path());
    let a = put(&mut spool, 3, 100);
    put_state(&mut spool, &a.change(&[(0, Delivered)]));
    let mid = put_state(&mut spool, &a.change(&[(1, Failed)]));
    let mut c3 = a.change(&[]);
    c3.attempts = 3;
    put_state(&mut spool, &c3);
    drop(spool);
    patch(
        &seg_path(d.path(), mid.segment),
        payload_at(&mid) + 41,
        &[0x55],
    );
    let (_s, rec) = open(d.path());
    assert_eq!(rec.corrupt_skipped, 1);
    assert_eq!(rec.torn_tails_cut, 0);
    assert_eq!(rec.state_records, 2);
    let q = queued(&rec, &a).unwrap();
    assert_eq!(q.rcpt_states.to_vec(), vec![Delivered, Pending, Pending]);
    assert_eq!(q.attempts, 3);
}

#[test]
fn mismatching_state_records_are_ignored() {
    let d = tempfile::tempdir().unwrap();
    let (mut spool, _) = open(d.path());
    let a = put(&mut spool, 1, 10);
    let b = put(&mut spool, 2, 10);
    // Right place, wrong id (prepare cannot tell; recovery checks).
    let mut wrong_id = a.change(&[(0, Delivered)]);
    wrong_id.id = b.id();
    put_state(&mut spool, &wrong_id);
    // Recipient index out of range.
    put_state(&mut spool, &b.change(&[(0, Delivered), (2, Delivered)]));
    // Not a message at all: refused up front.
    let mut nowhere = a.change(&[]);
    nowhere.msg.offset += 8;
    assert!(matches!(
        spool.prepare_state(&nowhere),
        Err(SpoolError::Invalid(_))
    ));
    nowhere.msg = MsgRef {
        shard: SHARD + 1,
        ..a.r
    };
    assert!(spool.prepare_state(&nowhere).is_err());
    drop(spool);
    let (_s, rec) = open(d.path());
    assert_eq!((rec.state_records, rec.state_records_ignored), (2, 2));
    assert_eq!(
        queued(&rec, &a).unwrap().rcpt_states.to_vec(),
        vec![Pending]
    );
    assert_eq!(
        queued(&rec, &b).unwrap().rcpt_states.to_vec(),
        vec![Pending, Pending]
    );
}

#[test]
fn load_returns_the_exact_body_zero_copy() {
    let d = tempfile::tempdir().unwrap();
    let (mut spool, _) = open(d.path());
    let a = put(&mut spool, 2, 2000);
    let fill = roll_over(&mut spool);
    assert_eq!(fill[0].r.segment, a.r.segment);
    let b = put(&mut spool, 1, 777);
    let st = put_state(&mut spool, &b.change(&[]));
    let (env, body) = spool.load(a.r).unwrap();
    assert_eq!(env, a.env);
    assert_eq!(&body[..], &a.body[..]);
    let (env, body_b) = spool.load(b.r).unwrap();
    assert_eq!((env, &body_b[..]), (b.env.clone(), &b.body[..]));
    let (_, f0) = spool.load(fill[0].r).unwrap();
    assert_eq!(&f0[..], &fill[0].body[..]);
    // Not a message record / not a record / unknown segment.
    let not_msg = MsgRef {
        offset: st.offset,
        ..b.r
    };
    assert!(matches!(
        spool.load(not_msg),
        Err(SpoolError::Corrupt { .. })
    ));
    assert!(spool
        .load(MsgRef {
            offset: a.r.offset + 8,
            ..a.r
        })
        .is_err());
    assert!(spool
        .load(MsgRef {
            segment: 999,
            ..a.r
        })
        .is_err());
    // The body outlives the spool (it owns its mapping).
    drop(spool);
    assert_eq!(&body[..], &a.body[..]);
    // A damaged body is detected.
    let at = a.r.offset + 48 + 512;
    let old = {
        let f = std::fs::File::open(seg_path(d.path(), a.r.segment)).unwrap();
        let mut b = [0u8];
        f.read_exact_at(&mut b, at).unwrap();
        b[0]
    };
    patch(&seg_path(d.path(), a.r.segment), at, &[!old]);
    let (spool, rec) = open(d.path());
    assert_eq!(rec.corrupt_skipped, 1);
    assert_eq!(
        rec.segments_deleted, 0,
        "a segment with corrupt records is evidence"
    );
    assert!(seg_exists(d.path(), a.r.segment));
    let r = spool.load(a.r);
    assert!(matches!(r, Err(SpoolError::Corrupt { .. })), "{r:?}");
}

#[test]
fn finished_segment_is_deleted_once_not_active_and_stays_gone() {
    let d = tempfile::tempdir().unwrap();
    let (mut spool, _) = open(d.path());
    let first = spool.active_segment().unwrap();
    let mut msgs = vec![put(&mut spool, 2, 100)];
    msgs.extend(roll_over(&mut spool));
    let keep = msgs.pop().unwrap(); // lives in the next segment
    assert!(msgs.iter().all(|m| m.r.segment == first));
    for m in &msgs {
        finish(&mut spool, m);
    }
    // Everything in `first` is finished, but its messages' final state records are in
    // the active segment: `first` goes; the active one stays (active).
    assert!(!seg_exists(d.path(), first));
    assert!(spool.segment_info().iter().all(|s| s.number != first));
    assert!(spool.finished(msgs[0].r).is_err(), "gone with its segment");
    drop(spool);
    let (_s, rec) = open(d.path());
    assert_eq!(rec.segments_deleted, 0);
    assert_eq!(rec.finished, 0, "no finished message reappears");
    assert_eq!(
        rec.state_records_ignored,
        msgs.len(),
        "they point at a recycled segment"
    );
    assert_eq!(
        rec.queue.iter().map(|q| q.msg).collect::<Vec<_>>(),
        vec![keep.r]
    );
    assert!(rec.messages.iter().all(|m| m.segment != first));
}

/// A segment whose own messages are all finished is kept while it holds state records of
/// an unfinished message in an older segment: deleting it would lose "rcpt 0 delivered".
#[test]
fn state_of_an_unfinished_older_message_pins_its_segment() {
    let d = tempfile::tempdir().unwrap();
    let (mut spool, _) = open(d.path());
    let s1 = spool.active_segment().unwrap();
    let a = put(&mut spool, 2, 100);
    let mut fill1 = roll_over(&mut spool);
    let s2 = spool.active_segment().unwrap();
    let x = fill1.pop().unwrap(); // in s2
    let c = put_state(&mut spool, &a.change(&[(0, Delivered)]));
    assert_eq!(c.segment, s2);
    let mut fill2 = roll_over(&mut spool);
    let y = fill2.pop().unwrap(); // in s3
    for m in fill1.iter().chain(&fill2).chain([&x]) {
        finish(&mut spool, m);
    }
    // s1: `a` is live. s2: all its messages finished, but it holds a's delivered state.
    assert!(seg_exists(d.path(), s1) && seg_exists(d.path(), s2));
    let info = spool.segment_info();
    let i2 = info.iter().find(|s| s.number == s2).unwrap();
    assert_eq!((i2.live, i2.pins), (0, 1));
    drop(spool);

    let (mut spool, rec) = open(d.path());
    assert_eq!(rec.segments_deleted, 0, "s2 must survive a restart too");
    assert_eq!(
        queued(&rec, &a).unwrap().rcpt_states.to_vec(),
        vec![Delivered, Pending]
    );
    assert_eq!(
        rec.queue.iter().map(|q| q.msg).collect::<Vec<_>>(),
        vec![a.r, y.r]
    );
    // Finishing `a` frees s1, which releases s2: both go.
    put_state(&mut spool, &a.change(&[(1, Delivered)]));
    spool.finished(a.r).unwrap();
    assert!(!seg_exists(d.path(), s1) && !seg_exists(d.path(), s2));
    drop(spool);
    let (_s, rec) = open(d.path());
    assert_eq!(
        rec.queue.iter().map(|q| q.msg).collect::<Vec<_>>(),
        vec![y.r]
    );
    assert_eq!(rec.finished, 0);
}

/// The record that *finished* a message must stay as long as the message record: if the
/// segment holding it went first, a restart would bring the finished message back.
#[test]
fn final_state_record_outlives_nothing_it_describes() {
    let d = tempfile::tempdir().unwrap();
    let (mut spool, _) = open(d.path());
    let s1 = spool.active_segment().unwrap();
    let m = put(&mut spool, 1, 100);
    let other = put(&mut spool, 1, 100); // keeps s1 alive
    let mut fill = roll_over(&mut spool);
    let s2 = spool.active_segment().unwrap();
    let last = fill.pop().unwrap();
    finish(&mut spool, &m); // its final record goes to s2
    for f in &fill {
        finish(&mut spool, f);
    }
    finish(&mut spool, &last);
    let mut fill2 = roll_over(&mut spool); // s2 is no longer active
    fill2.pop(); // in s3
    for f in &fill2 {
        finish(&mut spool, f); // now every message in s2 is finished
    }
    assert!(spool
        .segment_info()
        .iter()
        .any(|s| s.number == s2 && s.live == 0 && s.pins > 0));
    spool.reclaim();
    assert!(
        seg_exists(d.path(), s2),
        "s2 holds m's final state while s1 exists"
    );
    drop(spool);
    let (_s, rec) = open(d.path());
    assert!(queued(&rec, &m).is_none(), "finished message reappeared");
    assert!(queued(&rec, &other).is_some());
    assert!(seg_exists(d.path(), s1) && seg_exists(d.path(), s2));
}

/// A crash after the final state became durable but before the segment was deleted:
/// the next start deletes it.
#[test]
fn open_deletes_segments_whose_messages_are_all_finished() {
    let d = tempfile::tempdir().unwrap();
    let (mut spool, _) = open(d.path());
    let s1 = spool.active_segment().unwrap();
    let mut msgs = roll_over(&mut spool);
    let keep = msgs.pop().unwrap();
    for m in &msgs {
        // Durable final state, but `finished` never called (the "crash").
        put_state(&mut spool, &m.change(&[(0, Delivered)]));
    }
    assert!(seg_exists(d.path(), s1));
    drop(spool);
    let (_s, rec) = open(d.path());
    assert_eq!(rec.segments_deleted, 1);
    assert!(!seg_exists(d.path(), s1));
    assert_eq!(rec.finished, msgs.len());
    assert_eq!(
        rec.queue.iter().map(|q| q.msg).collect::<Vec<_>>(),
        vec![keep.r]
    );
    assert!(rec.messages.iter().all(|m| m.segment != s1));
}

#[test]
fn finished_and_prepare_state_refuse_what_they_do_not_know() {
    let d = tempfile::tempdir().unwrap();
    let (mut spool, _) = open(d.path());
    let a = put(&mut spool, 1, 10);
    finish(&mut spool, &a);
    spool.finished(a.r).unwrap(); // idempotent
    assert!(matches!(
        spool.prepare_state(&a.change(&[(0, Pending)])),
        Err(SpoolError::Invalid(_))
    ));
    assert!(spool
        .finished(MsgRef {
            offset: 4104,
            ..a.r
        })
        .is_err());
    assert!(spool.finished(MsgRef { segment: 77, ..a.r }).is_err());
}
