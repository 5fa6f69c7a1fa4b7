//! The shard's durable-accept step: DKIM signatures, queue id, Received: header, spool
//! record, 250.
//!
//! Sessions hand finished messages to `ShardStore::store`, which signs them (`dkim`: the
//! `DKIM-Signature:` fields become body slices of their own, so they are in the record and
//! a retry never signs again), assigns the queue id, prepends the trace header, has the spool reserve space for the record, and waits on the
//! shard's `GroupCommit` until the record is fdatasync'ed. Only then does the session
//! answer 250.
//!
//! A record whose write or fdatasync failed gets a 4xx, but its bytes may still be on
//! disk; it is then withdrawn (a durable state record marking every recipient final), so
//! that recovery does not deliver a message the client was told to send again.
//!
//! Must never: answer before the commit returned, or hold the spool borrowed across an await.

use tern_queue::runner::Runner;
use tern_queue::{GroupCommit, MsgId, MsgRef, RcptState, SpoolError, StateChange};

use std::cell::{Cell, RefCell};
use std::sync::Arc;

use tern_smtp::session::{Message, StoreError};

use crate::dkim::{Algorithm, Signer, SignerMode};
use crate::dkim_thread::{Gone, SigningThread, AUTO_MAX_IN_FLIGHT};

/// Cloneable, shard-local handle.
#[derive(Clone)]
pub struct ShardStore {
    commit: GroupCommit,
    hostname: std::rc::Rc<str>,
    runner: std::rc::Rc<Runner>,
    shard: u16,
    dkim: std::rc::Rc<DkimState>,
}

/// The shard's DKIM keys (swapped whole on reload) and its signature counts.
struct DkimState {
    signer: RefCell<Arc<Signer>>,
    signed: [Cell<u64>; Algorithm::ALL.len()],
    /// The shard's signing thread, started at the first message signed in
    /// `dkim.signer = "thread"` mode.
    thread: std::cell::OnceCell<Option<SigningThread>>,
    /// The signing thread was found gone (logged once; signatures made inline since).
    thread_gone: Cell<bool>,
}

fn map_err(e: &SpoolError) -> StoreError {
    if e.is_full() {
        StoreError::Full
    } else {
        StoreError::Local
    }
}

impl ShardStore {
    pub fn new(
        commit: GroupCommit,
        hostname: &str,
        runner: std::rc::Rc<Runner>,
        shard: u16,
        dkim: Arc<Signer>,
    ) -> Self {
        ShardStore {
            commit,
            hostname: hostname.into(),
            runner,
            shard,
            dkim: std::rc::Rc::new(DkimState {
                signer: RefCell::new(dkim),
                signed: Default::default(),
                thread: std::cell::OnceCell::new(),
                thread_gone: Cell::new(false),
            }),
        }
    }

    /// New DKIM keys (a reloaded configuration); messages being signed keep the old ones.
    pub fn set_dkim(&self, signer: Arc<Signer>) {
        *self.dkim.signer.borrow_mut() = signer;
    }

    /// Signatures made on this shard, per algorithm (`Algorithm::index`).
    pub fn dkim_signed(&self) -> [u64; Algorithm::ALL.len()] {
        std::array::from_fn(|i| self.dkim.signed[i].get())
    }

    /// Prepends the message's DKIM-Signature fields, if it is to be signed, before the
    /// message has an id (the Received: header that `finish` prepends is not signed,
    /// RFC 6376 §5.4). Computed on the shard's thread or its signing thread, as
    /// `dkim.signer` says.
    async fn sign(&self, msg: &mut Message) -> Result<(), StoreError> {
        let signer = self.dkim.signer.borrow().clone();
        if !signer.applies(msg) {
            return Ok(());
        }
        let signed = match signer.mode() {
            SignerMode::Inline => signer.sign_body_or_fail(&msg.body),
            SignerMode::Thread if !signer.has_keys_for(&msg.body) => Ok(Vec::new()),
            SignerMode::Thread => match self.signing_thread() {
                Some(t) => match t.sign(signer.clone(), msg.body.to_vec()).await {
                    Ok(answer) => answer,
                    Err(Gone) => self.sign_without_thread(&signer, &msg.body),
                },
                // No thread could be started: sign here rather than refuse mail.
                None => signer.sign_body_or_fail(&msg.body),
            },
            SignerMode::Auto => match signer.needs_rsa(&msg.body) {
                None => Ok(Vec::new()),
                // Ed25519 alone costs about what the hand-off would.
                Some(false) => signer.sign_body_or_fail(&msg.body),
                Some(true) => match self.signing_thread() {
                    Some(t) if t.in_flight() < AUTO_MAX_IN_FLIGHT => {
                        match t.sign(signer.clone(), msg.body.to_vec()).await {
                            Ok(answer) => answer,
                            Err(Gone) => self.sign_without_thread(&signer, &msg.body),
                        }
                    }
                    // Behind (a saturated shard starves the niced thread): here.
                    _ => signer.sign_body_or_fail(&msg.body),
                },
            },
        };
        let fields = signed.map_err(|e| {
            tracing::error!(error = %e, "message not accepted: DKIM signing failed");
            StoreError::Local
        })?;
        // Prepended last-first, so they end up in key order.
        for (alg, field) in fields.into_iter().rev() {
            msg.prepend_header(field);
            let c = &self.dkim.signed[alg.index()];
            c.set(c.get() + 1);
        }
        Ok(())
    }

    /// Signs on the shard's thread because the signing thread has gone (said once per
    /// shard): mail keeps being signed and accepted, at the inline mode's cost.
    fn sign_without_thread(
        &self,
        signer: &Signer,
        body: &[bytes::Bytes],
    ) -> Result<Vec<(Algorithm, bytes::Bytes)>, crate::dkim::SignError> {
        if !self.dkim.thread_gone.replace(true) {
            tracing::error!(
                shard = self.shard,
                "the DKIM signing thread has stopped: signing on the shard's thread from now on"
            );
        }
        signer.sign_body_or_fail(body)
    }

    /// The shard's signing thread, started on first use (`None` if the OS refused it,
    /// logged once).
    fn signing_thread(&self) -> Option<&SigningThread> {
        self.dkim
            .thread
            .get_or_init(|| match SigningThread::spawn(self.shard) {
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the DKIM signing thread; signing on the shard");
                    None
                }
            })
            .as_ref()
    }

    /// The shard's queue runner.
    pub fn runner(&self) -> &std::rc::Rc<Runner> {
        &self.runner
    }

    /// The shard's group committer (shared with the queue runner).
    pub fn group_commit(&self) -> &GroupCommit {
        &self.commit
    }

    /// A fresh queue id, for a message whose filters (milter macro `i`) must know it
    /// before it is stored (`store_as`).
    pub fn next_id(&self) -> MsgId {
        self.commit.with_spool(|spool| spool.id_gen().next_id())
    }

    /// Makes `msg` durable and returns its queue id (inline: the id is generated on the
    /// stack and copied only into the Received: header, the envelope and the record).
    pub async fn store(&self, msg: &mut Message) -> Result<MsgId, StoreError> {
        self.store_as(msg, None, None).await
    }

    /// `store`, with the id given (`next_id`) and, when a filter quarantined the message,
    /// held: its held state record is committed before the 250 and the runner never
    /// tries it until `tern queue release`.
    pub async fn store_as(
        &self,
        msg: &mut Message,
        id: Option<MsgId>,
        held: Option<&str>,
    ) -> Result<MsgId, StoreError> {
        if !self.accepting() {
            return Err(StoreError::Full);
        }
        self.sign(msg).await?;
        let prepared = self.commit.with_spool(|spool| {
            let id = id.unwrap_or_else(|| spool.id_gen().next_id());
            msg.finish(&self.hostname, id.as_str());
            spool.prepare(&msg.envelope, &msg.body).map_err(|e| (id, e))
        });
        let write = match prepared {
            Ok(w) => w,
            Err((id, e)) => {
                tracing::error!(id = %id, error = %e, "spool prepare failed");
                return Err(map_err(&e));
            }
        };
        let mut write = write;
        // A record reserved in a segment that another batch's failure retired before it
        // was written is not on disk at all: prepare it again (a newer segment) rather
        // than refuse a message that met no failure of its own.
        let mut attempt = 0;
        loop {
            let env = &msg.envelope;
            match self
                .commit_and_enqueue_as(write, env.arrival_unix_micros, env.recipients.len(), held)
                .await
            {
                Ok(c) => return Ok(c.id),
                Err(SpoolError::SegmentUnusable { .. }) if attempt < 2 => {
                    attempt += 1;
                    match self
                        .commit
                        .with_spool(|spool| spool.prepare(&msg.envelope, &msg.body))
                    {
                        Ok(w) => write = w,
                        Err(e) => {
                            tracing::error!(id = %msg.envelope.id, error = %e, "spool prepare failed");
                            return Err(map_err(&e));
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(id = %env.id, error = %e, "spool commit failed");
                    return Err(map_err(&e));
                }
            }
        }
    }

    /// Backpressure: past the high-water mark new mail waits (452 4.3.1) until the queue
    /// drains, so what is queued stays bounded.
    pub fn accepting(&self) -> bool {
        if self.runner.over_high_water() {
            tracing::warn!(
                queued = self.runner.len(),
                "queue above its high-water mark: deferring new mail"
            );
            return false;
        }
        true
    }

    /// Makes a prepared message record durable (group commit) and hands it to the runner,
    /// which tries it right away. Shared by SMTP sessions and the admin socket's submit.
    pub async fn commit_and_enqueue(
        &self,
        write: tern_queue::PendingWrite,
        arrival_unix_micros: u64,
        recipients: usize,
    ) -> Result<tern_queue::Committed, SpoolError> {
        self.commit_and_enqueue_as(write, arrival_unix_micros, recipients, None)
            .await
    }

    /// `commit_and_enqueue`, held when `held` gives a reason (see `store_as`).
    async fn commit_and_enqueue_as(
        &self,
        write: tern_queue::PendingWrite,
        arrival_unix_micros: u64,
        recipients: usize,
        held: Option<&str>,
    ) -> Result<tern_queue::Committed, SpoolError> {
        let msg = MsgRef {
            shard: self.shard,
            segment: write.segment(),
            offset: write.offset(),
        };
        // Inline (no allocation); only needed if the commit fails.
        let id = Some(write.msg_id());
        let c = match self.commit.commit(write).await {
            Ok(c) => c,
            Err(e) => {
                self.withdraw(msg, id, recipients, &e).await;
                return Err(e);
            }
        };
        if let Some(reason) = held {
            // Quarantine: held before anyone can try it, durably, before the 250. If that
            // record cannot be written the message is withdrawn and the client told 4xx,
            // rather than let a quarantined message out.
            let change = StateChange {
                msg,
                id: c.id,
                updates: Vec::new(),
                attempts: 0,
                next_attempt_unix: 0,
                last_reply: reason.to_string(),
                warned: false,
                held: true,
            };
            if let Err(e) = self.commit.commit_state_now(&change).await {
                self.withdraw(msg, Some(c.id), recipients, &e).await;
                return Err(e);
            }
            self.runner
                .enqueue_held(msg, c.id.as_str(), arrival_unix_micros, recipients, reason);
            return Ok(c);
        }
        // The record is where it was reserved (`msg`).
        self.runner
            .enqueue(msg, c.id.as_str(), arrival_unix_micros, recipients);
        Ok(c)
    }

    /// After a failed commit the client hears 4xx and will send the message again, but
    /// the record may be on disk all the same (written, then the fdatasync failed; or a
    /// write failed half-way): recovery would queue it, and the message would be
    /// delivered twice. A durable state record marking every recipient final withdraws
    /// it. Best effort: if that commit fails too, recovery may deliver it (a duplicate of
    /// the client's retry, never a loss), which is logged.
    async fn withdraw(&self, msg: MsgRef, id: Option<MsgId>, recipients: usize, why: &SpoolError) {
        match why {
            SpoolError::SegmentUnusable { .. } => {
                // Never written: only the reservation's bookkeeping is to be released,
                // so the retired segment can go once the rest of it is finished.
                let _ = self.commit.with_spool(|s| s.finished(msg));
                return;
            }
            SpoolError::Invalid(_) => return,
            _ => {}
        }
        let Some(mid) = id else {
            return;
        };
        let change = StateChange {
            msg,
            id: mid,
            updates: (0..recipients as u32)
                .map(|i| (i, RcptState::Failed))
                .collect(),
            attempts: 0,
            next_attempt_unix: 0,
            last_reply: "withdrawn: the client was answered 4xx (spool write or sync failed)"
                .into(),
            warned: false,
            held: false,
        };
        match self.commit.commit_state_now(&change).await {
            Ok(_) => {
                // Its segment no longer waits for it.
                let _ = self.commit.with_spool(|s| s.finished(msg));
                tracing::warn!(id = %mid, "record of a refused message withdrawn");
            }
            Err(e) => tracing::error!(id = %mid, error = %e,
                "cannot withdraw the record of a refused message; after a restart it may be delivered in addition to the client's retry"),
        }
    }
}
