//! Group commit: the one place where a shard's spool records become durable.
//!
//! Sessions (accepted messages) and, later, the queue runner (delivery state) hand a
//! `PendingWrite` to `GroupCommit::commit` and wait. One committer task per shard takes
//! every queued write at once, runs `commit_batch` (pwritev + one fdatasync per segment) on
//! glommio's blocking thread, and wakes each waiter with its own result. While a batch is
//! being synced the next one accumulates, so concurrent writers share one fdatasync and
//! at most one `commit_batch` runs per shard at a time (which `commit_batch` requires).
//!
//! Owns: the shard's `ShardSpool` (behind `with_spool`) and its commit queue. Shard-local
//! (`Rc`): it must never cross threads. Must never report success for a record whose
//! fdatasync failed, or run disk I/O on the executor thread.

use std::cell::RefCell;
use std::rc::Rc;

use futures::channel::oneshot;

use crate::{commit_batch, Committed, PendingWrite, ShardSpool, SpoolError};

type Waiter = oneshot::Sender<Result<Committed, SpoolError>>;

struct Inner {
    spool: ShardSpool,
    queue: Vec<(PendingWrite, Waiter)>,
    committing: bool,
}

/// Cloneable, shard-local handle to the shard's spool and its committer.
#[derive(Clone)]
pub struct GroupCommit {
    inner: Rc<RefCell<Inner>>,
}

impl GroupCommit {
    pub fn new(spool: ShardSpool) -> Self {
        GroupCommit {
            inner: Rc::new(RefCell::new(Inner {
                spool,
                queue: Vec::new(),
                committing: false,
            })),
        }
    }

    /// Runs `f` with the shard's spool (id generation, `prepare`, `prepare_state`...).
    /// `f` must not await (it cannot: it is a plain closure).
    pub fn with_spool<R>(&self, f: impl FnOnce(&mut ShardSpool) -> R) -> R {
        f(&mut self.inner.borrow_mut().spool)
    }

    /// Queues `write` for the next batch and waits until it is durable (or failed).
    /// Must be called inside the shard's glommio executor.
    pub async fn commit(&self, write: PendingWrite) -> Result<Committed, SpoolError> {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut inner = self.inner.borrow_mut();
            inner.queue.push((write, tx));
            let start = !inner.committing;
            inner.committing = true;
            start
        };
        if start {
            // Spawned outside the borrow: glommio may poll the new task right away.
            let me = self.clone();
            glommio::spawn_local(async move { me.commit_loop().await }).detach();
        }
        match rx.await {
            Ok(r) => r,
            Err(_) => Err(SpoolError::Invalid(
                "group committer dropped the write".into(),
            )),
        }
    }

    async fn commit_loop(self) {
        loop {
            let batch = {
                let mut inner = self.inner.borrow_mut();
                if inner.queue.is_empty() {
                    inner.committing = false;
                    return;
                }
                std::mem::take(&mut inner.queue)
            };
            let (writes, waiters): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
            let n = writes.len();
            // A panic inside spawn_blocking would leave glommio reading an uninitialised
            // result, so it is caught there and turned into failures.
            let results = glommio::executor()
                .spawn_blocking(move || {
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| commit_batch(writes)))
                        .unwrap_or_default()
                })
                .await;
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
}
