//! The shard's DKIM signing thread (`dkim.signer = "thread"`, and `"auto"` while it keeps
//! up).
//!
//! Owns: one OS thread per shard, started at the shard's first message to sign, that
//! computes signatures ([`Signer::sign_body`]) for the shard's sessions one after the
//! other, and ends when the shard drops its handle. The body goes over as reference-counted
//! slices (no copy); the answer comes back on a oneshot that wakes the waiting session's
//! task on the shard's executor, like a group commit's answer from the syncer thread.
//!
//! Why a thread at all: an RSA-2048 signature is about a millisecond of CPU. Made on the
//! shard's thread it delays every other session of the shard by that much; made here, the
//! kernel time-slices it against the shard, whose sessions keep being served.
//!
//! Must never: touch shard state, or outlive its shard's handle. A signature that panics
//! fails that one message (its session answers 451) and the thread goes on; if the thread
//! is gone all the same, [`SigningThread::sign`] says so ([`Gone`]) and the shard signs on
//! its own thread rather than refuse every later message.

use std::sync::Arc;

use bytes::Bytes;
use futures::channel::oneshot;

use crate::dkim::{Algorithm, SignError, Signer};

type Answer = Result<Vec<(Algorithm, Bytes)>, SignError>;

/// The signing thread is not there to answer (it could not take the job, or dropped it
/// unanswered): the caller signs on its own thread instead.
#[derive(Debug, PartialEq, Eq)]
pub struct Gone;

/// The signing thread's nice value: CFS gives a nice-10 thread about a tenth of a core
/// against a busy nice-0 one, and lets a waking shard preempt it.
const SIGNER_NICE: libc::c_int = 10;

/// `dkim.signer = "auto"`: signatures waiting for (or on) the thread beyond which the
/// shard signs on its own thread. Two means the thread is a whole signature behind: at
/// moderate load that almost never happens (300 RSA signatures/s keep it busy ~14% of
/// the time, two at once ~2%), at saturation it is the common case, and the niced
/// thread would only get the CPU the shards leave over (docs/benchmarks.md).
pub const AUTO_MAX_IN_FLIGHT: usize = 2;

struct Job {
    signer: Arc<Signer>,
    body: Vec<Bytes>,
    done: oneshot::Sender<Answer>,
}

/// A shard's handle on its signing thread.
pub struct SigningThread {
    tx: crossbeam::channel::Sender<Job>,
    /// Jobs sent and not yet answered (or given up by their session); shard-local.
    in_flight: std::rc::Rc<std::cell::Cell<usize>>,
}

/// Counts a job in flight until its session has the answer or went away.
struct InFlight(std::rc::Rc<std::cell::Cell<usize>>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.set(self.0.get().saturating_sub(1));
    }
}

impl SigningThread {
    /// Starts shard `shard`'s signing thread.
    pub fn spawn(shard: u16) -> std::io::Result<SigningThread> {
        let (tx, rx) = crossbeam::channel::unbounded::<Job>();
        std::thread::Builder::new()
            .name(format!("tern-dkim-{shard}"))
            .spawn(move || {
                // Below the shards in the scheduler: a shard thread that wakes preempts a
                // signature in progress, so the shard's other sessions are not held up by
                // RSA arithmetic. Linux's nice value is per thread (setpriority on our
                // own tid). Failure only means equal priority.
                // SAFETY: gettid and setpriority take plain integers and touch no memory.
                unsafe {
                    let tid = libc::gettid();
                    libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, SIGNER_NICE);
                }
                // Ends when the shard's handle (the only sender) is dropped.
                for job in rx {
                    // A panic fails this message only: the thread must stay for the next.
                    let answer = job.signer.sign_body_or_fail(&job.body);
                    // The session may have gone (client timeout): nothing to tell.
                    let _ = job.done.send(answer);
                }
            })?;
        Ok(SigningThread {
            tx,
            in_flight: Default::default(),
        })
    }

    /// Signatures sent to the thread and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.in_flight.get()
    }

    /// The signatures of `body` with `signer`'s keys, computed on the signing thread;
    /// [`Gone`] if the thread is not there to compute them.
    pub async fn sign(&self, signer: Arc<Signer>, body: Vec<Bytes>) -> Result<Answer, Gone> {
        let (done, rx) = oneshot::channel();
        self.in_flight.set(self.in_flight.get() + 1);
        let _counted = InFlight(self.in_flight.clone());
        self.tx.send(Job { signer, body, done }).map_err(|_| Gone)?;
        rx.await.map_err(|_| Gone)
    }

    /// A handle whose thread has already ended (tests of the callers' fallback).
    #[cfg(test)]
    pub fn stopped() -> SigningThread {
        let (tx, _) = crossbeam::channel::unbounded::<Job>();
        SigningThread {
            tx,
            in_flight: Default::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stopped_thread_answers_gone_and_counts_nothing_in_flight() {
        let t = SigningThread::stopped();
        let signer = Arc::new(Signer::default());
        let r = futures::executor::block_on(t.sign(signer, vec![Bytes::from_static(b"x")]));
        assert_eq!(r.err(), Some(Gone));
        assert_eq!(t.in_flight(), 0);
    }
}
