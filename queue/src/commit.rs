//! Group commit: the one place where a shard's spool records become durable.
//!
//! Sessions (accepted messages) and the queue runner (delivery state) hand a
//! `PendingWrite` to `GroupCommit::commit` and wait. One committer task per shard, started
//! with the `GroupCommit` and woken whenever a write is queued while it is idle, takes
//! every queued write at once, runs `commit_batch` (pwritev + one fdatasync per segment) on
//! the shard's own syncer thread, and wakes each waiter with its own result. While a batch
//! is being synced the next one accumulates, so concurrent writers share one fdatasync and
//! at most one `commit_batch` runs per shard at a time (which `commit_batch` requires).
//!
//! Why a thread of its own rather than glommio's `spawn_blocking`: the blocking pool is
//! shared with other slow work (Maildir deliveries fsync each file and directory), and a
//! batch queued behind those would hold every waiting `250` (measured: acceptance p50
//! 60 ms while the demo delivered into its Maildir). The syncer does nothing else, so a
//! batch waits only for the previous batch.
//!
//! Owns: the shard's `ShardSpool` (behind `with_spool`), its commit queue and its syncer
//! thread (which ends when the `GroupCommit` is dropped). Shard-local (`Rc`): it must never
//! cross threads. Must never report success for a record whose fdatasync failed, or run
//! disk I/O on the executor thread.

use std::cell::RefCell;
use std::rc::{Rc, Weak};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use futures::channel::oneshot;

use crate::{commit_batch, Committed, PendingWrite, ShardSpool, SpoolError, StateChange};

/// Where a write's result goes, with the instant the committer sent it (the session
/// measures from there how long it waited for the CPU).
type Waiter = oneshot::Sender<(Result<Committed, SpoolError>, Instant)>;

/// What the syncer thread sends back: the results, and when it started and finished the
/// disk work (so the committer can split the hand-offs from the write + fdatasync).
type SyncReply = (Vec<Result<Committed, SpoolError>>, Instant, Instant);

/// One batch for the syncer thread, and where its results go.
type SyncJob = (Vec<PendingWrite>, oneshot::Sender<SyncReply>);

/// A queued write: the record, its waiter, when it was queued.
type Queued = (PendingWrite, Waiter, Instant);

struct Inner {
    spool: ShardSpool,
    /// `None` only while dropping.
    syncer: Option<crossbeam::channel::Sender<SyncJob>>,
    /// Joined when the `GroupCommit` goes, so the spool (and its flock) outlives any batch
    /// still being written.
    syncer_thread: Option<std::thread::JoinHandle<()>>,
    queue: Vec<Queued>,
    /// The committer task's waker while it waits for writes (`None` while it is working
    /// on a batch, or before it first ran: it then finds the queue on its own).
    committer: Option<Waker>,
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
pub const PHASES: [&str; 6] = [
    "queued",
    "to_syncer",
    "disk",
    "from_syncer",
    "resume",
    "total",
];

/// Where a shard's commit time goes. Observed per message record (kind 1: what a 250
/// waits for; state records only count in the per-batch figures).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CommitStats {
    /// Per [`PHASES`]: queued (waiting for the batch in flight to finish and this one to
    /// be taken), to_syncer (hand-off to the syncer thread), disk (its batch's write +
    /// fdatasync), from_syncer (the syncer's reply until the committer task runs),
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
    /// Message records that were queued while a batch carrying state records was in
    /// flight (they waited for it before their own batch could start).
    pub messages_behind_state: u64,
    /// ... of those, behind a batch of state records only.
    pub messages_behind_state_only: u64,
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
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the channel ends the syncer after the batch it is writing, if any.
        self.syncer.take();
        // The committer, waiting for writes, finds the GroupCommit gone and ends.
        if let Some(w) = self.committer.take() {
            w.wake();
        }
        if let Some(t) = self.syncer_thread.take() {
            let _ = t.join();
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
        let (tx, rx) = crossbeam::channel::unbounded::<SyncJob>();
        let name = format!("tern-sync-{}", spool.shard());
        let spawned = std::thread::Builder::new().name(name).spawn(move || {
            // Ends when every sender is gone (the GroupCommit was dropped).
            for (writes, done) in rx {
                let t0 = Instant::now();
                // A panic must not take the thread (and every later batch) with it: the
                // batch fails instead, and its writers get no 250.
                let r =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| commit_batch(writes)))
                        .unwrap_or_default();
                let _ = done.send((r, t0, Instant::now()));
            }
        });
        let syncer_thread = match spawned {
            Ok(h) => Some(h),
            Err(e) => {
                // Every commit will fail (no 250 without a disk write).
                tracing::error!(error = %e, "cannot start the spool's syncer thread");
                None
            }
        };
        let inner = Rc::new(RefCell::new(Inner {
            spool,
            syncer: Some(tx),
            syncer_thread,
            queue: Vec::new(),
            committer: None,
            sync_times: Histogram::default(),
            stats: CommitStats::default(),
        }));
        // One long-lived task (not one per batch). It holds the `Inner` only weakly while
        // it waits, so dropping the last handle still closes the syncer and the spool.
        glommio::spawn_local(committer(Rc::downgrade(&inner))).detach();
        GroupCommit { inner }
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
        let mut tries = 0;
        loop {
            let w = self.with_spool(|s| s.prepare_state(change))?;
            match self.commit(w).await {
                Err(SpoolError::SegmentUnusable { .. }) if tries < 2 => tries += 1,
                r => return r,
            }
        }
    }

    /// Queues `write` for the next batch and waits until it is durable (or failed).
    /// Must be called inside the shard's glommio executor.
    pub async fn commit(&self, write: PendingWrite) -> Result<Committed, SpoolError> {
        let (tx, rx) = oneshot::channel();
        let queued = Instant::now();
        let message = !write.is_state();
        let idle_committer = {
            let mut inner = self.inner.borrow_mut();
            inner.queue.push((write, tx, queued));
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
                    stats.phases[4].observe(now.saturating_duration_since(sent));
                    stats.phases[5].observe(now.saturating_duration_since(queued));
                }
                r
            }
            Err(_) => Err(SpoolError::Invalid(
                "group committer dropped the write".into(),
            )),
        }
    }
}

/// The shard's committer: waits for queued writes, has the syncer thread write and sync
/// them as one batch, completes each waiter with its own result; the next batch gathers
/// meanwhile. Ends when the `GroupCommit` is gone.
async fn committer(inner: Weak<RefCell<Inner>>) {
    // The previous batch: when it finished and how many (message, state) records it had,
    // to tell which messages waited behind state records.
    let mut previous: Option<(Instant, usize, usize)> = None;
    loop {
        let batch = std::future::poll_fn(|cx| {
            let Some(inner) = inner.upgrade() else {
                return Poll::Ready(None);
            };
            let mut inner = inner.borrow_mut();
            if inner.queue.is_empty() {
                inner.committer = Some(cx.waker().clone());
                Poll::Pending
            } else {
                Poll::Ready(Some(std::mem::take(&mut inner.queue)))
            }
        })
        .await;
        let Some(batch) = batch else {
            return;
        };
        let taken = Instant::now();
        let n = batch.len();
        let mut writes = Vec::with_capacity(n);
        let mut waiters = Vec::with_capacity(n);
        // Per record: queued at, and whether it is a message record (observed) or not.
        let mut queued = Vec::with_capacity(n);
        for (w, tx, at) in batch {
            queued.push((at, !w.is_state()));
            writes.push(w);
            waiters.push(tx);
        }
        let messages = queued.iter().filter(|(_, m)| *m).count();
        let states = n - messages;
        // Timed on the syncer thread, around the disk work only. The reply comes back
        // over a oneshot whose waker glommio accepts from a foreign thread.
        let (done_tx, done_rx) = oneshot::channel();
        let sent_at = Instant::now();
        let sent = inner.upgrade().is_some_and(|i| {
            i.borrow()
                .syncer
                .as_ref()
                .is_some_and(|s| s.send((writes, done_tx)).is_ok())
        });
        let (results, started, finished) = match (sent, done_rx.await) {
            (true, Ok(r)) => r,
            _ => (Vec::new(), sent_at, sent_at), // every waiter fails below
        };
        let resumed = Instant::now();
        if let Some(i) = inner.upgrade() {
            let mut i = i.borrow_mut();
            let disk = finished.saturating_duration_since(started);
            i.sync_times.observe(disk);
            let st = &mut i.stats;
            st.batch_messages.observe(messages as u64);
            st.batch_states.observe(states as u64);
            if states > 0 {
                st.messages_sharing += messages as u64;
            }
            let to_syncer = started.saturating_duration_since(sent_at);
            let from_syncer = resumed.saturating_duration_since(finished);
            for &(at, message) in &queued {
                if !message {
                    continue;
                }
                st.phases[0].observe(taken.saturating_duration_since(at));
                st.phases[1].observe(to_syncer);
                st.phases[2].observe(disk);
                st.phases[3].observe(from_syncer);
                if let Some((prev_done, prev_msgs, prev_states)) = previous {
                    if at < prev_done && prev_states > 0 {
                        st.messages_behind_state += 1;
                        if prev_msgs == 0 {
                            st.messages_behind_state_only += 1;
                        }
                    }
                }
            }
        }
        previous = Some((resumed, messages, states));
        let mut results = results.into_iter();
        let replied = Instant::now();
        for tx in waiters {
            let r = results.next().unwrap_or_else(|| {
                Err(SpoolError::Invalid(
                    "commit batch returned too few results".into(),
                ))
            });
            let _ = tx.send((r, replied));
        }
        tracing::trace!(batch = n, "spool group commit");
    }
}
