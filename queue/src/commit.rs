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

use futures::channel::oneshot;

use crate::{commit_batch, Committed, PendingWrite, ShardSpool, SpoolError, StateChange};

type Waiter = oneshot::Sender<Result<Committed, SpoolError>>;

/// One batch for the syncer thread, and where its results go (with the time the disk
/// work took).
type SyncJob = (
    Vec<PendingWrite>,
    oneshot::Sender<(Vec<Result<Committed, SpoolError>>, std::time::Duration)>,
);

struct Inner {
    spool: ShardSpool,
    /// `None` only while dropping.
    syncer: Option<crossbeam::channel::Sender<SyncJob>>,
    /// Joined when the `GroupCommit` goes, so the spool (and its flock) outlives any batch
    /// still being written.
    syncer_thread: Option<std::thread::JoinHandle<()>>,
    queue: Vec<(PendingWrite, Waiter)>,
    /// The committer task's waker while it waits for writes (`None` while it is working
    /// on a batch, or before it first ran: it then finds the queue on its own).
    committer: Option<Waker>,
    /// Time of each batch's write + fdatasync (metrics: `tern_spool_sync_seconds`).
    sync_times: Histogram,
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
                let t0 = std::time::Instant::now();
                // A panic must not take the thread (and every later batch) with it: the
                // batch fails instead, and its writers get no 250.
                let r =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| commit_batch(writes)))
                        .unwrap_or_default();
                let _ = done.send((r, t0.elapsed()));
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
        let idle_committer = {
            let mut inner = self.inner.borrow_mut();
            inner.queue.push((write, tx));
            inner.committer.take()
        };
        if let Some(w) = idle_committer {
            w.wake();
        }
        match rx.await {
            Ok(r) => r,
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
        let (writes, waiters): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
        let n = writes.len();
        // Timed on the syncer thread, around the disk work only. The reply comes back
        // over a oneshot whose waker glommio accepts from a foreign thread.
        let (done_tx, done_rx) = oneshot::channel();
        let sent = inner.upgrade().is_some_and(|i| {
            i.borrow()
                .syncer
                .as_ref()
                .is_some_and(|s| s.send((writes, done_tx)).is_ok())
        });
        let (results, took) = match (sent, done_rx.await) {
            (true, Ok(r)) => r,
            _ => (Vec::new(), std::time::Duration::ZERO), // every waiter fails below
        };
        if let Some(i) = inner.upgrade() {
            i.borrow_mut().sync_times.observe(took);
        }
        let mut results = results.into_iter();
        for tx in waiters {
            let r = results.next().unwrap_or_else(|| {
                Err(SpoolError::Invalid(
                    "commit batch returned too few results".into(),
                ))
            });
            let _ = tx.send(r);
        }
        tracing::trace!(batch = n, "spool group commit");
    }
}
