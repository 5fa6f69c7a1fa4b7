//! The shard's durable-accept path: group commit in front of `tern_queue`'s segment files.
//!
//! Sessions hand finished messages to `ShardStore::store`, which reserves space in the
//! shard's current segment and queues the write. One committer task per shard takes every
//! queued write at once, runs `tern_queue::commit_batch` (pwritev + one fdatasync per
//! segment) on glommio's blocking thread, and completes each waiting session. While one
//! batch is being synced the next one accumulates: that is the group commit, and the 250
//! waits for its own batch.
//!
//! Owns: the shard's `ShardSpool` (so nothing else writes this shard's segments) and its
//! commit queue. Must never: answer before fdatasync returned, report success for a record
//! whose sync failed, or block the executor thread on disk I/O.

use std::cell::RefCell;
use std::rc::Rc;

use futures::channel::oneshot;
use tern_queue::{commit_batch, Committed, PendingWrite, ShardSpool, SpoolError};

use crate::session::{Message, StoreError};

struct Inner {
    spool: ShardSpool,
    queue: Vec<(PendingWrite, oneshot::Sender<Result<Committed, StoreError>>)>,
    committing: bool,
}

/// Cloneable, shard-local handle (Rc: it never leaves its shard).
#[derive(Clone)]
pub struct ShardStore {
    inner: Rc<RefCell<Inner>>,
    hostname: Rc<str>,
}

fn map_err(e: &SpoolError) -> StoreError {
    if e.is_full() {
        StoreError::Full
    } else {
        StoreError::Local
    }
}

impl ShardStore {
    pub fn new(spool: ShardSpool, hostname: &str) -> Self {
        ShardStore {
            inner: Rc::new(RefCell::new(Inner {
                spool,
                queue: Vec::new(),
                committing: false,
            })),
            hostname: Rc::from(hostname),
        }
    }

    /// Assigns the queue id, prepends the Received: header, writes the record and waits
    /// until it is durable. Returns the queue id.
    pub async fn store(&self, msg: &mut Message) -> Result<String, StoreError> {
        let (rx, start_committer) = {
            let mut inner = self.inner.borrow_mut();
            let id = inner.spool.id_gen().next();
            msg.finish(&self.hostname, &id);
            let pw = match inner.spool.prepare(&msg.envelope, &msg.body) {
                Ok(pw) => pw,
                Err(e) => {
                    tracing::error!(id = %id, error = %e, "spool prepare failed");
                    return Err(map_err(&e));
                }
            };
            let (tx, rx) = oneshot::channel();
            inner.queue.push((pw, tx));
            let start = !inner.committing;
            inner.committing = true;
            (rx, start)
        };
        if start_committer {
            // Spawned outside the borrow: glommio may poll the new task right away.
            let me = self.clone();
            glommio::spawn_local(async move { me.commit_loop().await }).detach();
        }
        match rx.await {
            Ok(Ok(c)) => Ok(c.id),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(StoreError::Local),
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
            // result, so catch it there and turn it into failures.
            let results = glommio::executor()
                .spawn_blocking(move || {
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| commit_batch(writes)))
                        .unwrap_or_default()
                })
                .await;
            let mut results = results.into_iter();
            for tx in waiters {
                let r = match results.next() {
                    Some(Ok(c)) => Ok(c),
                    Some(Err(e)) => {
                        tracing::error!(error = %e, "spool commit failed");
                        Err(map_err(&e))
                    }
                    None => Err(StoreError::Local),
                };
                let _ = tx.send(r);
            }
            tracing::trace!(batch = n, "spool group commit");
        }
    }
}
