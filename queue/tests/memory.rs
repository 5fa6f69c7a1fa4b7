//! What the queue index costs per message: recover 100k small messages (1–2 recipients,
//! half of them deferred with a typical reply) and measure the heap that stays allocated
//! (the `queue` plus the spool's own per-segment bookkeeping) with a counting allocator.
//! Then the same messages in the runner's compact index (`QueueIndex`), which is what a
//! backlog costs for its whole life. Run with `--nocapture` to see the figures.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use bytes::Bytes;
use tern_queue::{
    commit_batch, index::QueueIndex, BodyType, Envelope, Listing, MsgId, MsgRef, QueuedMessage,
    RcptState, Recipient, ShardSpool, SpoolOptions, StateChange,
};

struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator; only counts bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static A: Counting = Counting;

const N: usize = 100_000;
const REPLY: &str = "451 4.7.1 <r1@example.net>: Recipient address rejected: Greylisted";

#[test]
fn queue_index_is_small() {
    let d = tempfile::tempdir().unwrap();
    let opts = SpoolOptions::default();
    let (mut spool, _) = ShardSpool::open(d.path(), 0, opts.clone()).unwrap();
    let body = [Bytes::from_static(
        b"Received: from x\r\nSubject: hi\r\n\r\nhello\r\n",
    )];
    let mut refs = Vec::with_capacity(N);
    for chunk in 0..N / 1000 {
        let mut batch = Vec::with_capacity(1000);
        for k in 0..1000 {
            let n = chunk * 1000 + k;
            let env = Envelope {
                id: spool.id_gen().next(),
                sender: "s@example.org".into(),
                recipients: (0..1 + n % 2)
                    .map(|i| Recipient {
                        addr: format!("r{i}@example.net"),
                        notify: 0,
                        orcpt: None,
                    })
                    .collect(),
                arrival_unix_micros: 1,
                size: body[0].len() as u64,
                body_type: BodyType::SevenBit,
                smtputf8: false,
                ret: None,
                envid: None,
                deliver_by: None,
                auth: None,
                client_helo: "client.example".into(),
                client_addr: "192.0.2.1:1".into(),
            };
            refs.push((env.id.clone(), env.recipients.len()));
            batch.push(spool.prepare(&env, &body).unwrap());
        }
        let done = commit_batch(batch);
        for (k, r) in done.into_iter().enumerate() {
            let c = r.unwrap();
            let i = chunk * 1000 + k;
            refs[i].0 = format!("{}@{}:{}", refs[i].0, c.segment, c.offset);
        }
    }
    // Defer every other message: rcpt 0 of the two-recipient ones delivered, a reply.
    for chunk in (0..N).collect::<Vec<_>>().chunks(2000) {
        let mut batch = Vec::new();
        for &i in chunk.iter().filter(|i| *i % 2 == 1) {
            let (id_at, rcpts) = &refs[i];
            let (id, at) = id_at.split_once('@').unwrap();
            let (seg, off) = at.split_once(':').unwrap();
            let c = StateChange {
                msg: MsgRef {
                    shard: 0,
                    segment: seg.parse().unwrap(),
                    offset: off.parse().unwrap(),
                },
                id: MsgId::new(id).unwrap(),
                updates: if *rcpts == 2 {
                    vec![(0, RcptState::Delivered)]
                } else {
                    vec![]
                },
                attempts: 1,
                next_attempt_unix: 1_800_000_000,
                last_reply: REPLY.into(),
                warned: false,
                held: false,
            };
            batch.push(spool.prepare_state(&c).unwrap());
        }
        assert!(commit_batch(batch).iter().all(|r| r.is_ok()));
    }
    drop(spool);
    drop(refs);

    let before = LIVE.load(Ordering::Relaxed);
    let (spool, mut rec) = ShardSpool::open_with(d.path(), 0, opts, Listing::QueueOnly).unwrap();
    rec.queue.shrink_to_fit();
    let after = LIVE.load(Ordering::Relaxed);
    assert_eq!(rec.queue.len(), N);
    assert_eq!(rec.state_records, N / 2);
    let deferred = rec.queue.iter().filter(|q| q.attempts == 1).count();
    assert_eq!(deferred, N / 2);

    let size = std::mem::size_of::<QueuedMessage>();
    let heap: usize = rec.queue.iter().map(|q| q.heap_bytes()).sum();
    let measured = (after - before) as f64 / N as f64;
    println!(
        "QueuedMessage: size_of {size} B; heap (replies, requested sizes) {:.1} B/msg \
         average ({} B for a deferred message with a {}-byte reply, 0 for a fresh one); \
         measured live heap after open (queue + spool bookkeeping) {measured:.1} B/msg over {N} messages",
        heap as f64 / N as f64,
        REPLY.len(),
        REPLY.len()
    );
    assert!(size <= 112, "QueuedMessage grew to {size} bytes");
    assert!(measured < 200.0, "{measured} B per queued message");

    // What the runner keeps for the life of the backlog: the recovered list moves into
    // the compact index (then is freed), next to the spool's per-segment bookkeeping.
    let before_index = LIVE.load(Ordering::Relaxed);
    let mut index = QueueIndex::new(0);
    for q in rec.queue.drain(..) {
        index.insert(q).unwrap();
    }
    drop(rec);
    let after_index = LIVE.load(Ordering::Relaxed);
    let fp = index.footprint();
    let kept = (after_index - before) as f64 / N as f64;
    println!(
        "runner index: {:.1} B/msg live heap (index + spool bookkeeping, the recovered list \
         freed); index parts per message: slab {:.1}, lookup {:.1}, schedule {:.1}; \
         {} distinct replies",
        kept,
        fp.slab_bytes as f64 / N as f64,
        fp.lookup_bytes as f64 / N as f64,
        fp.schedule_bytes as f64 / N as f64,
        fp.distinct_replies
    );
    let _ = before_index;
    assert_eq!(index.len(), N);
    assert_eq!(fp.distinct_replies, 1);
    assert!(
        kept < 100.0,
        "{kept} B per queued message in the runner's index"
    );
    drop(spool);
}
