//! A shard-local, one-shot broadcast: "the server is stopping".
//!
//! Every session of a shard waits on it next to its socket read, so it must be cheap to
//! wait on and wake. It is `Rc`-based on purpose: it never crosses threads (each shard
//! gets its own, set by the shard's own task when the cross-thread stop message arrives)
//! and so needs no lock. It must never be shared between shards.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

#[derive(Default)]
struct Inner {
    fired: Cell<bool>,
    next_key: Cell<u64>,
    waiters: RefCell<HashMap<u64, Waker>>,
}

/// Cloneable handle; all clones see the same flag.
#[derive(Clone, Default)]
pub struct LocalNotify(Rc<Inner>);

impl LocalNotify {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn fired(&self) -> bool {
        self.0.fired.get()
    }

    /// Sets the flag and wakes every waiter.
    pub fn fire(&self) {
        self.0.fired.set(true);
        let waiters = std::mem::take(&mut *self.0.waiters.borrow_mut());
        for w in waiters.into_values() {
            w.wake();
        }
    }

    /// A future that completes once `fire` has been called.
    pub fn wait(&self) -> Wait {
        Wait {
            inner: self.0.clone(),
            key: None,
        }
    }
}

pub struct Wait {
    inner: Rc<Inner>,
    key: Option<u64>,
}

impl Future for Wait {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.inner.fired.get() {
            return Poll::Ready(());
        }
        let mut waiters = self.inner.waiters.borrow_mut();
        match self.key {
            Some(k) => {
                waiters
                    .entry(k)
                    .and_modify(|w| w.clone_from(cx.waker()))
                    .or_insert_with(|| cx.waker().clone());
            }
            None => {
                let k = self.inner.next_key.get();
                self.inner.next_key.set(k + 1);
                waiters.insert(k, cx.waker().clone());
                drop(waiters);
                self.key = Some(k);
            }
        }
        Poll::Pending
    }
}

impl Drop for Wait {
    fn drop(&mut self) {
        if let Some(k) = self.key {
            if let Ok(mut w) = self.inner.waiters.try_borrow_mut() {
                w.remove(&k);
            }
        }
    }
}
