//! Group commit: the one place where a shard's spool records become durable.
//!
//! Sessions (accepted messages) and the queue runner (delivery state) hand a
//! `PendingWrite` to `GroupCommit::commit` and wait. One committer task per shard, started
//! with the `GroupCommit` and woken whenever a write is queued, takes every queued write at
//! once as a batch, has one of the shard's syncer threads run `commit_batch` (pwritev + one
//! fdatasync per segment), and wakes each waiter with its own result.
//!
//! Up to `commits_in_flight` batches (`spool.commits_in_flight`, 1 or 2) are in flight at
//! once, each on a syncer thread of its own: with 2, a write queued while a batch is being
//! synced starts its own write + fdatasync at once instead of waiting for that batch to
//! finish first (issue 17: a message arriving behind a batch of delivery state records
//! used to pay two fdatasyncs). Batches complete strictly in the order they started: a
//! batch's results are released only after every earlier batch's, and a record whose
//! segment was retired meanwhile (an earlier or concurrent batch's write or fdatasync on
//! that file failed) fails too. Two fdatasyncs on one file race for its writeback error
//! (the kernel reports it once per open file, "fsyncgate"): the one that returns success
//! may have had its own pages lost, so success counts only once the earlier batch has
//! been seen to succeed. With 1 in flight this is the classic group commit: the next batch
//! gathers while one syncs.
//!
//! Delivery state records (the runner's sent/deferred/bounced) are exactly as durable as
//! message records (their writers wait for the fdatasync), but they never hold a slot a
//! message needs: a batch of state records only starts when no batch is in flight;
//! otherwise they wait and go with the next batch that carries a message (sharing its
//! fdatasync costs a message one small pwrite). Even when nothing is in flight, state
//! records queued alone first wait up to `spool.state_commit_delay` for a message to
//! ride with, while messages keep arriving (one was queued within that delay): at low
//! rates a delivery would otherwise cost a second fdatasync per message. Only the
//! runner's bookkeeping waits; a queue drained with no new mail never does, and the state
//! records sessions wait for (`commit_state_now`) start like messages.
//!
//! Why threads of their own rather than glommio's `spawn_blocking`: the blocking pool is
//! shared with other slow work (Maildir deliveries fsync each file and directory), and a
//! batch queued behind those would hold every waiting `250` (measured: acceptance p50
//! 60 ms while the demo delivered into its Maildir). The syncers do nothing else.
//!
//! A batch whose commit panics (on a syncer thread, or in its task on the io_uring path)
//! fails exactly as if its fdatasync had failed: no 250 for any of its records, and every
//! segment it touched is retired (`fail_panicked`). At shutdown the shard awaits
//! [`GroupCommit::close`], so no batch in flight is dropped with its executor.
//!
//! Owns: the shard's `ShardSpool` (behind `with_spool`), its commit queue and its syncer
//! threads (which end when the `GroupCommit` is dropped), and the commit-phase statistics.
//! Shard-local (`Rc`): it must never cross threads. Must never report success for a record
//! whose fdatasync failed, release a batch before an earlier one, or run disk I/O on the
//! executor thread.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use futures::channel::oneshot;
use futures::FutureExt;

use crate::commit_uring::{self, UringFiles};
use crate::segment::SegmentHandle;
use crate::spool::commit_batch_touching;
use crate::{Committed, PendingWrite, ShardSpool, SpoolError, StateChange};

/// Where a write's result goes, with the instant the committer sent it (the session
/// measures from there how long it waited for the CPU).
type Waiter = oneshot::Sender<(Result<Committed, SpoolError>, Instant)>;

/// What a syncer thread sends back: the results, the segments the batch wrote to, and
/// when it started and finished the disk work (so the committer can split the hand-offs
/// from the write + fdatasync).
type SyncReply = (
    Vec<Result<Committed, SpoolError>>,
    Vec<Arc<SegmentHandle>>,
    Instant,
    Instant,
);

/// One batch for the syncer thread, and where its results go.
type SyncJob = (Vec<PendingWrite>, oneshot::Sender<SyncReply>);

/// A queued write: the record, its waiter, when it was queued.
type Queued = (PendingWrite, Waiter, Instant);

/// How a shard's batches reach the disk (`spool.commit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CommitPath {
    /// pwritev + fdatasync on the shard's syncer threads (one per slot).
    #[default]
    Thread,
    /// Writes + fdatasync on the shard's own glommio io_uring, completed on the executor
    /// (`commit_uring`): no thread hop.
    Uring,
}

/// `spool.state_commit_delay` when not configured: how long delivery state records queued
/// alone wait for a message record to share its fdatasync before starting a batch of
/// their own.
pub const DEFAULT_STATE_COMMIT_DELAY: Duration = Duration::from_millis(10);

/// `spool.syncer_nice` when not configured: the syncer threads' nice value. They sleep in
/// fdatasync nearly all the time, but each batch first waits for one of them to get a
/// CPU; at nice 0 on a busy 2-core machine that hand-off was as long as the disk (p99
/// 3–4 ms at 4,000 msgs/s, docs/benchmarks.md), at -10 CFS lets a waking syncer preempt
/// the busy shard at once.
pub const DEFAULT_SYNCER_NICE: i32 = -10;

/// `spool.commits_in_flight` when not configured.
pub const DEFAULT_COMMITS_IN_FLIGHT: usize = 2;
/// The most batches a shard may have in flight (one syncer thread each).
pub const MAX_COMMITS_IN_FLIGHT: usize = 2;

/// One syncer thread and the channel to it.
struct Syncer {
    /// `None` only while dropping.
    tx: Option<crossbeam::channel::Sender<SyncJob>>,
    /// Joined when the `GroupCommit` goes, so the spool (and its flock) outlives any batch
    /// still being written.
    thread: Option<std::thread::JoinHandle<()>>,
}

struct Inner {
    spool: ShardSpool,
    /// One per batch that may be in flight (`commits_in_flight`); none on the io_uring
    /// path.
    syncers: Vec<Syncer>,
    /// The io_uring path's write handles (`CommitPath::Uring`).
    uring: Option<Rc<UringFiles>>,
    queue: Vec<Queued>,
    /// Message records (kind 1) in `queue`.
    queued_messages: usize,
    /// The committer task's waker while it waits for writes (`None` while it is working
    /// on a batch, or before it first ran: it then finds the queue on its own).
    committer: Option<Waker>,
    /// How long state records queued alone wait for a message to ride with
    /// ([`GroupCommit::set_state_commit_delay`]).
    state_delay: Duration,
    /// When the last message record was queued: state records wait for the next one only
    /// while messages keep coming (a queue drained with no new mail never waits).
    last_message_at: Option<Instant>,
    /// Batches started and not yet released to their waiters (kept by the committer).
    in_flight: usize,
    /// Tasks waiting in [`GroupCommit::close`] for the queue and the flights to empty.
    closers: Vec<Waker>,
    /// Time of each batch's write + fdatasync (metrics: `tern_spool_sync_seconds`).
    sync_times: Histogram,
    /// Where each message record's commit time goes (metrics: `tern_commit_wait_seconds`,
    /// `tern_commit_batch_records`).
    stats: CommitStats,
}

/// Upper bounds (seconds) of the latency histograms' buckets; +Inf is implied.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// A latency histogram over [`LATENCY_BUCKETS`] (not cumulative: `counts[i]` is the
/// number of observations in bucket i; the last entry is the overflow past 2.5 s).
/// Shard-local; copied out whole when metrics are scraped.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    pub counts: [u64; LATENCY_BUCKETS.len() + 1],
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    pub fn observe(&mut self, d: std::time::Duration) {
        let s = d.as_secs_f64();
        let i = LATENCY_BUCKETS
            .iter()
            .position(|&b| s <= b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.counts[i] += 1;
        self.sum += s;
        self.count += 1;
    }

    /// Adds `other` into `self` (merging shards).
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += b;
        }
        self.sum += other.sum;
        self.count += other.count;
    }
}

/// Upper bounds (seconds) of the commit-phase histograms' buckets: finer than
/// [`LATENCY_BUCKETS`], down to the microseconds a thread hand-off takes, so that p50,
/// p99 and p99.9 can be read off them (interpolated within a bucket); +Inf is implied.
pub const PHASE_BUCKETS: [f64; 24] = [
    0.000_005, 0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.000_75, 0.001, 0.0015,
    0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 2.5,
];

/// A histogram over [`PHASE_BUCKETS`] (not cumulative; the last entry is the overflow).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PhaseHistogram {
    pub counts: [u64; PHASE_BUCKETS.len() + 1],
    pub sum: f64,
    pub count: u64,
}

impl PhaseHistogram {
    pub fn observe(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        let i = PHASE_BUCKETS
            .iter()
            .position(|&b| s <= b)
            .unwrap_or(PHASE_BUCKETS.len());
        self.counts[i] += 1;
        self.sum += s;
        self.count += 1;
    }

    pub fn merge(&mut self, other: &PhaseHistogram) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += b;
        }
        self.sum += other.sum;
        self.count += other.count;
    }
}

/// Upper bounds of the records-per-batch histograms' buckets; +Inf is implied.
pub const COUNT_BUCKETS: [u64; 9] = [0, 1, 2, 4, 8, 16, 32, 64, 128];

/// A histogram of small counts over [`COUNT_BUCKETS`] (not cumulative).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CountHistogram {
    pub counts: [u64; COUNT_BUCKETS.len() + 1],
    pub sum: u64,
    pub count: u64,
}

impl CountHistogram {
    pub fn observe(&mut self, n: u64) {
        let i = COUNT_BUCKETS
            .iter()
            .position(|&b| n <= b)
            .unwrap_or(COUNT_BUCKETS.len());
        self.counts[i] += 1;
        self.sum += n;
        self.count += 1;
    }

    pub fn merge(&mut self, other: &CountHistogram) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += b;
        }
        self.sum += other.sum;
        self.count += other.count;
    }
}

/// The phases of one message record's commit, in order (label `phase` of
/// `tern_commit_wait_seconds`).
pub const PHASES: [&str; 7] = [
    "queued",
    "to_syncer",
    "disk",
    "in_order",
    "from_syncer",
    "resume",
    "total",
];
const QUEUED: usize = 0;
const TO_SYNCER: usize = 1;
const DISK: usize = 2;
const IN_ORDER: usize = 3;
const FROM_SYNCER: usize = 4;
const RESUME: usize = 5;
const TOTAL: usize = 6;

/// Where a shard's commit time goes. Observed per message record (kind 1: what a 250
/// waits for; state records only count in the per-batch figures).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CommitStats {
    /// Per [`PHASES`]: queued (waiting for a free commit slot, i.e. for a batch in flight,
    /// and for the committer to take it), to_syncer (hand-off to the syncer thread), disk
    /// (its batch's write + fdatasync), in_order (done, but waiting for an earlier batch
    /// still in flight), from_syncer (the syncer's reply until the committer task runs),
    /// resume (the committer's reply until the waiting session runs: waiting for the
    /// CPU), total (`commit` called to `commit` returning).
    pub phases: [PhaseHistogram; PHASES.len()],
    /// Message records per batch.
    pub batch_messages: CountHistogram,
    /// State records per batch.
    pub batch_states: CountHistogram,
    /// Message records whose batch also carried state records (they shared its write
    /// and fdatasync).
    pub messages_sharing: u64,
    /// Message records that waited for a batch carrying state records (queued while it
    /// held the commit slot, or done before it and released after it).
    pub messages_behind_state: u64,
    /// ... of those, behind a batch of state records only.
    pub messages_behind_state_only: u64,
    /// Batches started while another batch was still in flight (`commits_in_flight` 2).
    pub batches_overlapped: u64,
}

impl CommitStats {
    pub fn merge(&mut self, other: &CommitStats) {
        for (a, b) in self.phases.iter_mut().zip(other.phases.iter()) {
            a.merge(b);
        }
        self.batch_messages.merge(&other.batch_messages);
        self.batch_states.merge(&other.batch_states);
        self.messages_sharing += other.messages_sharing;
        self.messages_behind_state += other.messages_behind_state;
        self.messages_behind_state_only += other.messages_behind_state_only;
        self.batches_overlapped += other.batches_overlapped;
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the channels ends each syncer after the batch it is writing, if any.
        for s in &mut self.syncers {
            s.tx.take();
        }
        // The committer, waiting for writes, finds the GroupCommit gone and ends.
        if let Some(w) = self.committer.take() {
            w.wake();
        }
        for s in &mut self.syncers {
            if let Some(t) = s.thread.take() {
                let _ = t.join();
            }
        }
    }
}

/// Cloneable, shard-local handle to the shard's spool and its committer.
#[derive(Clone)]
pub struct GroupCommit {
    inner: Rc<RefCell<Inner>>,
}

impl GroupCommit {
    /// Must be called inside the shard's glommio executor: the committer runs in the task
    /// queue current at this call (the shard's default queue), whoever queues a write. A
    /// committer running in the runner's lower-share delivery queue would hold every
    /// session's 250 at that lower share.
    pub fn new(spool: ShardSpool) -> Self {
        Self::with_commits_in_flight(spool, DEFAULT_COMMITS_IN_FLIGHT)
    }

    /// Like [`GroupCommit::new`], with up to `slots` batches in flight at once (clamped
    /// to 1..=[`MAX_COMMITS_IN_FLIGHT`]).
    pub fn with_commits_in_flight(spool: ShardSpool, slots: usize) -> Self {
        Self::with_options(spool, slots, CommitPath::Thread)
    }

    /// Like [`GroupCommit::with_commits_in_flight`], on the given commit path.
    pub fn with_options(spool: ShardSpool, slots: usize, path: CommitPath) -> Self {
        Self::with_syncer_nice(spool, slots, path, None)
    }

    /// Like [`GroupCommit::with_options`]; syncer threads set their nice value to
    /// `syncer_nice` if given (`spool.syncer_nice`; a negative one needs CAP_SYS_NICE or
    /// a raised RLIMIT_NICE: without it they warn once and keep the default).
    pub fn with_syncer_nice(
        spool: ShardSpool,
        slots: usize,
        path: CommitPath,
        syncer_nice: Option<i32>,
    ) -> Self {
        let slots = slots.clamp(1, MAX_COMMITS_IN_FLIGHT);
        let (syncers, uring) = match path {
            CommitPath::Thread => (
                (0..slots)
                    .map(|i| spawn_syncer(spool.shard(), i, syncer_nice))
                    .collect(),
                None,
            ),
            CommitPath::Uring => (Vec::new(), Some(Rc::new(UringFiles::default()))),
        };
        let inner = Rc::new(RefCell::new(Inner {
            spool,
            syncers,
            uring,
            queue: Vec::new(),
            queued_messages: 0,
            committer: None,
            state_delay: DEFAULT_STATE_COMMIT_DELAY,
            last_message_at: None,
            in_flight: 0,
            closers: Vec::new(),
            sync_times: Histogram::default(),
            stats: CommitStats::default(),
        }));
        // One long-lived task (not one per batch). It holds the `Inner` only weakly while
        // it waits, so dropping the last handle still closes the syncers and the spool.
        glommio::spawn_local(committer(Rc::downgrade(&inner), slots)).detach();
        GroupCommit { inner }
    }

    /// How long delivery state records queued with no message record wait for one to
    /// share its fdatasync (`spool.state_commit_delay`); zero: they start a batch of their
    /// own as soon as no batch is in flight. At low rates a delivery otherwise costs a
    /// second fdatasync per message (half the disk flushes and a good part of the CPU
    /// at 500 msgs/s, docs/benchmarks.md); waiting delays only the runner's bookkeeping
    /// (the next hop already has the message) and widens the window in which a crash
    /// redelivers a delivered message by as much.
    pub fn set_state_commit_delay(&self, d: Duration) {
        self.inner.borrow_mut().state_delay = d;
    }

    /// Runs `f` with the shard's spool (id generation, `prepare`, `prepare_state`...).
    /// `f` must not await (it cannot: it is a plain closure).
    pub fn with_spool<R>(&self, f: impl FnOnce(&mut ShardSpool) -> R) -> R {
        f(&mut self.inner.borrow_mut().spool)
    }

    /// Latencies of the group commits so far (write + fdatasync of one batch).
    pub fn sync_times(&self) -> Histogram {
        self.inner.borrow().sync_times.clone()
    }

    /// Where the commit time of this shard's message records went so far.
    pub fn stats(&self) -> CommitStats {
        self.inner.borrow().stats.clone()
    }

    /// Makes a state change durable: `prepare_state`, then [`GroupCommit::commit`]. A
    /// record reserved in a segment that another batch's failure retired before it was
    /// written never reached the disk, so it is prepared again (in a newer segment), up to
    /// three times, rather than reported as failed.
    pub async fn commit_state(&self, change: &StateChange) -> Result<Committed, SpoolError> {
        self.commit_state_with(change, false).await
    }

    /// Like [`GroupCommit::commit_state`], for a state record a session waits for (a
    /// quarantined message's hold before its 250, a withdrawal before its 4xx): it starts
    /// a batch as a message record would, never waiting for `state_commit_delay`.
    pub async fn commit_state_now(&self, change: &StateChange) -> Result<Committed, SpoolError> {
        self.commit_state_with(change, true).await
    }

    async fn commit_state_with(
        &self,
        change: &StateChange,
        urgent: bool,
    ) -> Result<Committed, SpoolError> {
        let mut tries = 0;
        loop {
            let w = self.with_spool(|s| s.prepare_state(change))?;
            match self.commit_with(w, urgent).await {
                Err(SpoolError::SegmentUnusable { .. }) if tries < 2 => tries += 1,
                r => return r,
            }
        }
    }

    /// Waits until every write queued so far has been committed and released to its
    /// waiter (queue empty, no batch in flight). The shard calls it at shutdown once its
    /// sessions are gone, before its executor ends: a batch in flight on the io_uring path
    /// is a task of that executor, and would otherwise be dropped half-way (no 250 lost,
    /// since a 250 follows only a finished batch, but its writes abandoned mid-flight and a
    /// delivery state record that was being made durable not made so). Writes queued
    /// while it waits are waited for too.
    pub async fn close(&self) {
        std::future::poll_fn(|cx| {
            let mut i = self.inner.borrow_mut();
            if i.queue.is_empty() && i.in_flight == 0 {
                return Poll::Ready(());
            }
            i.closers.push(cx.waker().clone());
            Poll::Pending
        })
        .await;
    }

    /// Queues `write` for the next batch and waits until it is durable (or failed).
    /// Must be called inside the shard's glommio executor.
    pub async fn commit(&self, write: PendingWrite) -> Result<Committed, SpoolError> {
        self.commit_with(write, false).await
    }

    /// `urgent`: a state record a session waits for, started like a message record.
    async fn commit_with(
        &self,
        write: PendingWrite,
        urgent: bool,
    ) -> Result<Committed, SpoolError> {
        let (tx, rx) = oneshot::channel();
        let queued = Instant::now();
        let message = !write.is_state();
        let idle_committer = {
            let mut inner = self.inner.borrow_mut();
            inner.queue.push((write, tx, queued));
            inner.queued_messages += usize::from(message || urgent);
            if message {
                inner.last_message_at = Some(queued);
            }
            inner.committer.take()
        };
        if let Some(w) = idle_committer {
            w.wake();
        }
        match rx.await {
            Ok((r, sent)) => {
                if message {
                    let now = Instant::now();
                    let stats = &mut self.inner.borrow_mut().stats;
                    stats.phases[RESUME].observe(now.saturating_duration_since(sent));
                    stats.phases[TOTAL].observe(now.saturating_duration_since(queued));
                }
                r
            }
            Err(_) => Err(SpoolError::Invalid(
                "group committer dropped the write".into(),
            )),
        }
    }
}

/// Starts syncer thread `i` of shard `shard`: it writes and syncs each batch it is sent,
/// and replies with the results. Without a thread every commit fails (no 250 without a
/// disk write).
fn spawn_syncer(shard: u16, i: usize, nice: Option<i32>) -> Syncer {
    let (tx, rx) = crossbeam::channel::unbounded::<SyncJob>();
    let name = if i == 0 {
        format!("tern-sync-{shard}")
    } else {
        format!("tern-sync-{shard}.{i}")
    };
    let spawned = std::thread::Builder::new().name(name).spawn(move || {
        if let Some(n) = nice {
            set_thread_nice(shard, i, n);
        }
        // Ends when every sender is gone (the GroupCommit was dropped).
        for (writes, done) in rx {
            let t0 = Instant::now();
            // A panic must not take the thread (and every later batch) with it: the batch
            // fails as if its fdatasync had failed (see `fail_panicked`).
            let segs = record_segments(&writes);
            let (r, touched) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                commit_batch_touching(writes)
            }))
            .unwrap_or_else(|_| fail_panicked(segs));
            let _ = done.send((r, touched, t0, Instant::now()));
        }
    });
    match spawned {
        Ok(h) => Syncer {
            tx: Some(tx),
            thread: Some(h),
        },
        Err(e) => {
            tracing::error!(error = %e, "cannot start a spool syncer thread");
            Syncer {
                tx: None,
                thread: None,
            }
        }
    }
}

/// Sets the calling thread's nice value (Linux's is per thread: setpriority on our own
/// thread id). A refusal is logged by the first syncer only and otherwise ignored: the
/// commit path works the same, only its hand-off may wait longer for a CPU.
fn set_thread_nice(shard: u16, i: usize, n: i32) {
    // SAFETY: gettid and setpriority take plain integers and touch no memory.
    let r = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, n)
    };
    if r != 0 && shard == 0 && i == 0 {
        tracing::warn!(
            nice = n,
            error = %std::io::Error::last_os_error(),
            "cannot set the spool syncer threads' nice value (a negative one needs CAP_SYS_NICE or RLIMIT_NICE, e.g. systemd's LimitNICE=); group commits may wait longer for a CPU"
        );
    }
}

/// A batch handed to a syncer, not yet released to its waiters.
struct Flight {
    done: oneshot::Receiver<SyncReply>,
    waiters: Vec<Waiter>,
    /// Per record: when it was queued, and whether it is a message record.
    queued: Vec<(Instant, bool)>,
    taken: Instant,
    sent_at: Instant,
    messages: usize,
    states: usize,
}

enum Step {
    Start(Vec<Queued>),
    Done(Option<SyncReply>),
    Gone,
}

/// The shard's committer: takes the queued writes as one batch whenever a commit slot is
/// free, hands it to a syncer thread, and releases finished batches to their waiters in
/// the order they started (see the module doc). Ends when the `GroupCommit` is gone.
async fn committer(inner: Weak<RefCell<Inner>>, slots: usize) {
    let mut flights: VecDeque<Flight> = VecDeque::new();
    let mut started: usize = 0;
    // The batch released last: when, and how many (message, state) records it had, to
    // tell which messages waited behind state records.
    let mut previous: Option<(Instant, usize, usize)> = None;
    // Armed while state records wait alone for a message (`state_delay`): when it fires,
    // they start on their own. Keyed by its deadline so it is re-armed only when the
    // oldest waiting record changes.
    let mut linger: Option<(Instant, Pin<Box<glommio::timer::Timer>>)> = None;
    loop {
        let step = std::future::poll_fn(|cx| {
            let Some(rc) = inner.upgrade() else {
                return Poll::Ready(Step::Gone);
            };
            // Only the oldest batch can be released; a later one that finished first is
            // found ready as soon as the oldest is gone.
            if let Some(f) = flights.front_mut() {
                if let Poll::Ready(r) = Pin::new(&mut f.done).poll(cx) {
                    return Poll::Ready(Step::Done(r.ok()));
                }
            }
            let mut i = rc.borrow_mut();
            if flights.len() < slots {
                // State records never take the last free slot from a message: alone they
                // start only when nothing is in flight; otherwise they ride with the next
                // batch that carries a message (same fdatasync), or wait for the idle.
                // Alone and idle, they first wait up to `state_delay` for a message to
                // ride with.
                let mut start = i.queued_messages > 0;
                if !start && flights.is_empty() {
                    if let Some(&(_, _, oldest)) = i.queue.first() {
                        let due = oldest + i.state_delay;
                        let now = Instant::now();
                        let messages_coming = i
                            .last_message_at
                            .is_some_and(|t| now.saturating_duration_since(t) < i.state_delay);
                        if now >= due || !messages_coming {
                            start = true;
                        } else {
                            if linger.as_ref().is_none_or(|(d, _)| *d != due) {
                                linger =
                                    Some((due, Box::pin(glommio::timer::Timer::new(due - now))));
                            }
                            if let Some((_, t)) = linger.as_mut() {
                                start = t.as_mut().poll(cx).is_ready();
                            }
                        }
                    }
                }
                if start {
                    linger = None;
                    i.queued_messages = 0;
                    return Poll::Ready(Step::Start(std::mem::take(&mut i.queue)));
                }
                i.committer = Some(cx.waker().clone());
            }
            // All slots busy: the oldest batch's completion wakes us.
            Poll::Pending
        })
        .await;
        match step {
            Step::Gone => return,
            Step::Start(batch) => {
                let taken = Instant::now();
                if !flights.is_empty() {
                    if let Some(rc) = inner.upgrade() {
                        rc.borrow_mut().stats.batches_overlapped += 1;
                    }
                }
                let n = batch.len();
                let mut writes = Vec::with_capacity(n);
                let mut waiters = Vec::with_capacity(n);
                let mut queued = Vec::with_capacity(n);
                for (w, tx, at) in batch {
                    queued.push((at, !w.is_state()));
                    writes.push(w);
                    waiters.push(tx);
                }
                let messages = queued.iter().filter(|(_, m)| *m).count();
                // The reply comes back over a oneshot whose waker glommio accepts from a
                // foreign thread. If the batch cannot be sent, `done_tx` is dropped with
                // it and every waiter fails when the batch is released.
                let (done_tx, done_rx) = oneshot::channel();
                let sent_at = Instant::now();
                if let Some(rc) = inner.upgrade() {
                    let i = rc.borrow();
                    // Slots are freed in order, so syncer `started % slots` is idle.
                    let syncer = i.syncers.get(started % slots).and_then(|s| s.tx.as_ref());
                    if let Some(files) = i.uring.clone() {
                        // On the shard's own ring: a task of its own per batch, so that
                        // two batches can be in flight; its result goes the same way.
                        // The task holds the `Inner` (the spool, so its flock, and the
                        // committer that releases the result) until its writes and
                        // fdatasync are done, even if every handle is dropped meanwhile:
                        // never writes into a directory another process may own by then.
                        let keep = rc.clone();
                        glommio::spawn_local(async move {
                            let t0 = Instant::now();
                            let segs = record_segments(&writes);
                            // A panic in the commit (or the sync) must neither take the
                            // shard's executor down nor leave the segments appendable.
                            let r = std::panic::AssertUnwindSafe(commit_uring::commit_batch(
                                &files, writes,
                            ))
                            .catch_unwind()
                            .await;
                            let (r, touched) = r.unwrap_or_else(|_| fail_panicked(segs));
                            let _ = done_tx.send((r, touched, t0, Instant::now()));
                            drop(keep);
                        })
                        .detach();
                    } else if let Some(tx) = syncer {
                        let _ = tx.send((writes, done_tx));
                    }
                }
                started = started.wrapping_add(1);
                if let Some(rc) = inner.upgrade() {
                    rc.borrow_mut().in_flight = flights.len() + 1;
                }
                flights.push_back(Flight {
                    done: done_rx,
                    waiters,
                    queued,
                    taken,
                    sent_at,
                    messages,
                    states: n - messages,
                });
            }
            Step::Done(reply) => {
                let Some(f) = flights.pop_front() else {
                    continue;
                };
                let released = Instant::now();
                let (results, touched, began, finished) =
                    reply.unwrap_or((Vec::new(), Vec::new(), f.sent_at, f.sent_at));
                let results = fail_retired(results, &touched);
                if let Some(rc) = inner.upgrade() {
                    let mut i = rc.borrow_mut();
                    let disk = finished.saturating_duration_since(began);
                    i.sync_times.observe(disk);
                    let st = &mut i.stats;
                    st.batch_messages.observe(f.messages as u64);
                    st.batch_states.observe(f.states as u64);
                    if f.states > 0 {
                        st.messages_sharing += f.messages as u64;
                    }
                    let to_syncer = began.saturating_duration_since(f.sent_at);
                    // Released only after the previous batch: from this batch's finish
                    // to the previous release it waited for the order.
                    let prev_release = previous.map_or(finished, |p| p.0);
                    let in_order = prev_release.saturating_duration_since(finished);
                    let from_syncer =
                        released.saturating_duration_since(finished.max(prev_release));
                    for &(at, message) in &f.queued {
                        if !message {
                            continue;
                        }
                        st.phases[QUEUED].observe(f.taken.saturating_duration_since(at));
                        st.phases[TO_SYNCER].observe(to_syncer);
                        st.phases[DISK].observe(disk);
                        st.phases[IN_ORDER].observe(in_order);
                        st.phases[FROM_SYNCER].observe(from_syncer);
                        if let Some((prev_at, prev_msgs, prev_states)) = previous {
                            let waited_for_slot = at < prev_at && prev_at <= f.taken;
                            if prev_states > 0 && (waited_for_slot || !in_order.is_zero()) {
                                st.messages_behind_state += 1;
                                if prev_msgs == 0 {
                                    st.messages_behind_state_only += 1;
                                }
                            }
                        }
                    }
                }
                previous = Some((released, f.messages, f.states));
                let mut results = results.into_iter();
                let replied = Instant::now();
                for tx in f.waiters {
                    let r = results.next().unwrap_or_else(|| {
                        Err(SpoolError::Invalid(
                            "commit batch returned too few results".into(),
                        ))
                    });
                    let _ = tx.send((r, replied));
                }
                tracing::trace!(batch = f.queued.len(), "spool group commit");
                if let Some(rc) = inner.upgrade() {
                    let closers = {
                        let mut i = rc.borrow_mut();
                        i.in_flight = flights.len();
                        std::mem::take(&mut i.closers)
                    };
                    // Each re-checks (and re-registers if writes are still pending).
                    for w in closers {
                        w.wake();
                    }
                }
            }
        }
    }
}

/// The segment of each record of a batch, in batch order (kept aside in case the commit
/// panics and takes the batch with it).
fn record_segments(writes: &[PendingWrite]) -> Vec<Arc<SegmentHandle>> {
    writes.iter().map(|w| w.segment_handle().clone()).collect()
}

/// The results of a batch whose commit panicked (review finding F3): exactly what a failed
/// fdatasync gives. Nothing is known about which of its writes reached the file or
/// whether its sync ran, so every record fails (no 250; the engine then withdraws the
/// record with a state record in a newer segment, as after any sync failure) and every
/// segment it touched is retired: no later batch appends to, or is reported durable on, a
/// file whose state is unknown (`fail_retired` fails a concurrent batch on it too).
fn fail_panicked(
    segs: Vec<Arc<SegmentHandle>>,
) -> (Vec<Result<Committed, SpoolError>>, Vec<Arc<SegmentHandle>>) {
    let mut touched: Vec<Arc<SegmentHandle>> = Vec::new();
    let results = segs
        .iter()
        .map(|seg| {
            seg.retire();
            if !touched.iter().any(|t| Arc::ptr_eq(t, seg)) {
                tracing::error!(segment = seg.number, path = %seg.path.display(),
                    "spool commit panicked; segment retired, the whole batch fails");
                touched.push(seg.clone());
            }
            Err(SpoolError::SyncFailed {
                segment: seg.number,
                source: std::io::Error::other(
                    "the spool commit panicked: its writes and fdatasync are in an unknown state",
                ),
            })
        })
        .collect();
    (results, touched)
}

/// A record reported durable by its own batch fails after all if its segment has been
/// retired by the time the batch is released: an earlier (or concurrent) batch's write or
/// fdatasync on that file failed, and that fdatasync may have consumed the writeback error
/// that also covered this record's pages.
fn fail_retired(
    mut results: Vec<Result<Committed, SpoolError>>,
    touched: &[Arc<SegmentHandle>],
) -> Vec<Result<Committed, SpoolError>> {
    for seg in touched.iter().filter(|s| s.is_retired()) {
        for r in results.iter_mut() {
            if matches!(r, Ok(c) if c.segment == seg.number) {
                *r = Err(SpoolError::SyncFailed {
                    segment: seg.number,
                    source: std::io::Error::other(
                        "segment retired: a write or fdatasync of another batch on it failed",
                    ),
                });
            }
        }
    }
    results
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MsgId;

    fn committed(segment: u64, offset: u64) -> Result<Committed, SpoolError> {
        Ok(Committed {
            id: MsgId::new("Q1").expect("short id"),
            segment,
            offset,
        })
    }

    /// The in-order release rule: a batch that finished fine but whose segment an earlier
    /// (or concurrent) batch's failure retired meanwhile fails on that segment only.
    #[test]
    fn a_finished_batch_fails_on_a_segment_retired_meanwhile() {
        let dir = std::env::temp_dir().join(format!("tern-fail-retired-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let seg = |n: u64| {
            let path = dir.join(format!("seg-{n}"));
            let file = std::fs::File::create(&path).expect("segment file");
            Arc::new(SegmentHandle::new(n, file, 7, 4096, path))
        };
        let (s1, s2) = (seg(1), seg(2));
        let results = || vec![committed(1, 0), committed(2, 64), committed(1, 128)];
        // Nothing retired: every success stands.
        let r = fail_retired(results(), &[s1.clone(), s2.clone()]);
        assert!(r.iter().all(|r| r.is_ok()));
        // Segment 1 retired by another batch's failed fdatasync: its records fail.
        s1.retire();
        let r = fail_retired(results(), &[s1, s2]);
        assert!(matches!(
            r[0],
            Err(SpoolError::SyncFailed { segment: 1, .. })
        ));
        assert!(r[1].is_ok());
        assert!(matches!(
            r[2],
            Err(SpoolError::SyncFailed { segment: 1, .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// The commit paths end to end on a real spool and a real glommio executor, with faults
/// injected into one segment's sync (`SegmentHandle::inject`: the io_uring path never
/// calls libc's fdatasync, so the LD_PRELOAD shim of e2e 14 cannot reach it).
#[cfg(test)]
mod fault_tests {
    use super::*;
    use crate::segment::SyncFault;
    use crate::SpoolOptions;
    use bytes::Bytes;
    use glommio::{LocalExecutorBuilder, Placement};

    fn run<T: 'static>(f: impl Future<Output = T> + 'static) -> T {
        LocalExecutorBuilder::new(Placement::Unbound)
            .ring_depth(64)
            .io_memory(128 << 10)
            .make()
            .expect("executor")
            .run(f)
    }

    fn prepare(commit: &GroupCommit) -> PendingWrite {
        commit.with_spool(|s| {
            let id = s.id_gen().next();
            s.prepare(
                &crate::spool::tests::env(&id, 5),
                &[Bytes::from_static(b"hello")],
            )
            .expect("prepare")
        })
    }

    fn open(dir: &std::path::Path) -> ShardSpool {
        let opts = SpoolOptions {
            segment_size: 1 << 20,
        };
        ShardSpool::open(dir, 0, opts).expect("open").0
    }

    /// Two records in one batch on a segment whose sync hits `fault`: neither gets a
    /// success, the segment is retired, and the next record goes to a new segment and
    /// commits (the committer, its syncers and the executor survived).
    fn faulty_sync(path: CommitPath, fault: SyncFault) {
        let d = tempfile::tempdir().expect("tempdir");
        let dir = d.path().to_path_buf();
        run(async move {
            let commit = GroupCommit::with_options(open(&dir), 2, path);
            let (w1, w2) = (prepare(&commit), prepare(&commit));
            let seg = w1.segment_handle().clone();
            assert!(Arc::ptr_eq(&seg, w2.segment_handle()));
            seg.inject(fault);
            let (r1, r2) = futures::join!(commit.commit(w1), commit.commit(w2));
            for r in [&r1, &r2] {
                assert!(
                    matches!(r, Err(SpoolError::SyncFailed { segment, .. }) if *segment == seg.number),
                    "{path:?} {fault:?}: {r:?}"
                );
            }
            assert!(seg.is_retired(), "{path:?} {fault:?}: segment not retired");
            let w3 = prepare(&commit);
            assert_ne!(w3.segment(), seg.number, "a retired segment took a record");
            let c = commit.commit(w3).await.expect("commit after the fault");
            assert!(c.segment > seg.number);
        });
    }

    /// Review finding F3: a panic in the syncer thread's commit (here: in its sync).
    #[test]
    fn a_panic_in_the_thread_path_sync_fails_the_batch_and_retires_the_segment() {
        faulty_sync(CommitPath::Thread, SyncFault::Panic);
    }

    /// Review finding F3 on the io_uring path: the panic happens on the shard's executor.
    #[test]
    fn a_panic_in_the_io_uring_sync_fails_the_batch_and_retires_the_segment() {
        faulty_sync(CommitPath::Uring, SyncFault::Panic);
    }

    /// fdatasync failing on the io_uring path: no success, segment retired.
    #[test]
    fn a_failed_io_uring_fdatasync_fails_the_batch_and_retires_the_segment() {
        faulty_sync(CommitPath::Uring, SyncFault::Eio);
    }

    /// The same through the hook on the thread path (e2e 14 tests it with the libc shim).
    #[test]
    fn a_failed_thread_path_fdatasync_fails_the_batch_and_retires_the_segment() {
        faulty_sync(CommitPath::Thread, SyncFault::Eio);
    }

    /// Review finding F6: `close` returns only once every queued write has its result, so
    /// a shard that awaits it before its executor ends abandons no batch; every record
    /// reported committed is found after a restart.
    #[test]
    fn close_waits_for_every_batch_in_flight() {
        for path in [CommitPath::Uring, CommitPath::Thread] {
            let d = tempfile::tempdir().expect("tempdir");
            let dir = d.path().to_path_buf();
            let committed = run(async move {
                let commit = GroupCommit::with_options(open(&dir), 2, path);
                let results: Rc<RefCell<Vec<Result<Committed, SpoolError>>>> = Rc::default();
                for _ in 0..40 {
                    let (commit, results) = (commit.clone(), results.clone());
                    glommio::spawn_local(async move {
                        let w = prepare(&commit);
                        let r = commit.commit(w).await;
                        results.borrow_mut().push(r);
                    })
                    .detach();
                }
                // Let the writers queue (they run when this task yields).
                glommio::yield_if_needed().await;
                futures_lite::future::yield_now().await;
                commit.close().await;
                let results = results.borrow();
                assert_eq!(results.len(), 40, "{path:?}: close returned early");
                results
                    .iter()
                    .map(|r| r.as_ref().map(|c| c.id).expect("committed"))
                    .collect::<Vec<_>>()
            });
            let (_s, rec) = ShardSpool::open(d.path(), 0, SpoolOptions::default()).expect("reopen");
            for id in committed {
                assert!(
                    rec.messages.iter().any(|m| m.envelope.id == id.as_str()),
                    "{path:?}: {id} reported committed, not recovered"
                );
            }
        }
    }
}
