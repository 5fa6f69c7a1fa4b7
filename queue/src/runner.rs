//! The queue runner: one per shard, delivering that shard's queued messages.
//!
//! Holds a compact index of the shard's undelivered messages (`QueuedMessage`, ~150 bytes
//! each; envelopes and bodies stay on disk and are loaded, zero-copy, per attempt) and a
//! schedule ordered by next attempt. A message is tried as soon as it is accepted, then on
//! a backoff schedule (`retry_interval` doubling up to `max_retry_interval`, sendmail's
//! `-q15m` idea) until `max_age`. Each attempt groups the pending recipients by route
//! (maildir, a static SMTP next hop, the relayhost, or the recipient domain's mail host),
//! delivers, and records the per-recipient outcome as a state record through the shard's
//! `GroupCommit` before the index changes: 2xx delivered, 5xx failed (bounced to the
//! sender, RFC 3464), 4xx or connection trouble retried. A message with no pending
//! recipient is `finished` in the spool so its segment can be recycled.
//!
//! Owns: the shard's delivery schedule and in-flight count. Must never: deliver a message
//! of another shard, change the index before the state record is durable, bounce a
//! bounce (null sender), or hold more than `concurrency` deliveries in flight.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeSet, HashMap};
use std::rc::Rc;
use std::task::Waker;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::client::{ClientOptions, Reply};
use crate::commit::GroupCommit;
use crate::route::{Destination, Dns, Router};
use crate::state::{MsgId, MsgRef, QueuedMessage, RcptState};
use crate::{BodyType, Envelope, NOTIFY_DELAY, NOTIFY_NEVER};

/// Settings of the runner (from the `[queue]` configuration).
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    pub hostname: String,
    pub retry_interval: Duration,
    pub max_retry_interval: Duration,
    pub max_age: Duration,
    /// Send a delay DSN (to NOTIFY=DELAY recipients' sender) after this long; None = never.
    pub delay_warning: Option<Duration>,
    /// Deliveries in flight at once on this shard.
    pub concurrency: usize,
    /// Above this many queued messages on the shard, new mail gets 452 4.3.1.
    pub high_water_messages: usize,
    pub router: Router,
    pub client: ClientOptions,
    /// The resolver for MX and host lookups (`queue.resolver`; shared by the shards).
    pub dns: Dns,
    /// SMTP port for MX deliveries: 25 (RFC 5321 §5.1). A test seam, not a configuration
    /// key: tests point MX records at 127.0.0.1 and a scripted server on another port.
    pub mx_port: u16,
}

/// Outcome of one recipient in one attempt.
#[derive(Debug, Clone)]
pub(crate) enum Outcome {
    Delivered(String),
    /// Permanent failure: status code, enhanced code, text, remote MTA.
    Failed(Reply, Option<String>),
    /// Try again later.
    Deferred(String),
}

struct Entry {
    q: QueuedMessage,
    in_flight: bool,
}

/// The per-shard runner. Shard-local (`Rc`).
pub struct Runner {
    shard: u16,
    cfg: Rc<RunnerConfig>,
    commit: GroupCommit,
    index: RefCell<HashMap<MsgRef, Entry>>,
    schedule: RefCell<BTreeSet<(u64, MsgRef)>>,
    in_flight: Cell<usize>,
    over_water: Cell<bool>,
    waker: RefCell<Option<Waker>>,
    kicked: Cell<bool>,
    stopping: Cell<bool>,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

impl Runner {
    /// A runner for `shard`, starting from the messages recovery found still pending.
    pub fn new(
        shard: u16,
        cfg: RunnerConfig,
        commit: GroupCommit,
        recovered: Vec<QueuedMessage>,
    ) -> Rc<Runner> {
        let r = Rc::new(Runner {
            shard,
            cfg: Rc::new(cfg),
            commit,
            index: RefCell::new(HashMap::with_capacity(recovered.len())),
            schedule: RefCell::new(BTreeSet::new()),
            in_flight: Cell::new(0),
            over_water: Cell::new(false),
            waker: RefCell::new(None),
            kicked: Cell::new(false),
            stopping: Cell::new(false),
        });
        for q in recovered {
            r.insert(q);
        }
        r
    }

    /// Messages queued on this shard.
    pub fn len(&self) -> usize {
        self.index.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether new mail should be refused for now (452 4.3.1). Hysteresis: once over the
    /// mark, the shard accepts again only at or below 90% of it (at least one less).
    pub fn over_high_water(&self) -> bool {
        let n = self.len();
        let mark = self.cfg.high_water_messages;
        let low = mark.saturating_sub((mark / 10).max(1));
        let over = if self.over_water.get() {
            n > low
        } else {
            n >= mark
        };
        self.over_water.set(over);
        over
    }

    /// Adds a just-accepted message (durable already) and tries it at once.
    pub fn enqueue(&self, msg: MsgRef, id: &str, arrival_unix_micros: u64, recipients: usize) {
        let Some(id) = MsgId::new(id) else {
            tracing::error!(
                id,
                "queue id too long for the index; message left in the spool"
            );
            return;
        };
        self.insert(QueuedMessage::new(msg, id, arrival_unix_micros, recipients));
        self.kick();
    }

    /// Makes every queued message due now (`tern queue flush`, ETRN). Returns how many.
    pub fn flush(&self) -> usize {
        let refs: Vec<MsgRef> = self
            .index
            .borrow()
            .iter()
            .filter(|(_, e)| !e.in_flight && !e.q.held)
            .map(|(r, _)| *r)
            .collect();
        {
            let set: std::collections::HashSet<MsgRef> = refs.iter().copied().collect();
            let mut sched = self.schedule.borrow_mut();
            sched.retain(|(_, r)| !set.contains(r));
            for r in &refs {
                sched.insert((0, *r));
            }
        }
        self.kick();
        refs.len()
    }

    /// Asks `run` to stop after the deliveries in flight.
    pub fn stop(&self) {
        self.stopping.set(true);
        self.kick();
    }

    fn insert(&self, q: QueuedMessage) {
        let due = if q.held {
            u64::MAX
        } else {
            q.next_attempt_unix
        };
        self.schedule.borrow_mut().insert((due, q.msg));
        self.index.borrow_mut().insert(
            q.msg,
            Entry {
                q,
                in_flight: false,
            },
        );
    }

    fn kick(&self) {
        self.kicked.set(true);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// The scheduling loop. Runs until `stop`.
    pub async fn run(self: Rc<Self>) {
        loop {
            if self.stopping.get() {
                return;
            }
            let now = now_unix();
            // Start every due message, up to the concurrency limit.
            loop {
                if self.in_flight.get() >= self.cfg.concurrency.max(1) {
                    break;
                }
                let next = {
                    let mut sched = self.schedule.borrow_mut();
                    match sched.first().copied() {
                        Some((due, r)) if due <= now => {
                            sched.remove(&(due, r));
                            Some(r)
                        }
                        _ => None,
                    }
                };
                let Some(r) = next else { break };
                let ok = match self.index.borrow_mut().get_mut(&r) {
                    Some(e) if !e.in_flight => {
                        e.in_flight = true;
                        true
                    }
                    _ => false,
                };
                if ok {
                    self.in_flight.set(self.in_flight.get() + 1);
                    let me = self.clone();
                    glommio::spawn_local(async move {
                        me.attempt(r).await;
                        me.in_flight.set(me.in_flight.get() - 1);
                        me.kick();
                    })
                    .detach();
                }
            }
            // Sleep until the next due time (at most a second, so the clock is re-read),
            // or until kicked.
            let wait = {
                let sched = self.schedule.borrow();
                match sched.first() {
                    Some((due, _)) if self.in_flight.get() < self.cfg.concurrency => {
                        Duration::from_secs(due.saturating_sub(now_unix()).min(1))
                    }
                    _ => Duration::from_secs(1),
                }
            };
            if wait.is_zero()
                && !self.schedule.borrow().is_empty()
                && self.in_flight.get() < self.cfg.concurrency
            {
                glommio::yield_if_needed().await;
                continue;
            }
            self.kicked.set(false);
            let me = self.clone();
            futures_lite::future::or(
                async {
                    glommio::timer::sleep(wait).await;
                },
                std::future::poll_fn(move |cx| {
                    if me.kicked.get() {
                        std::task::Poll::Ready(())
                    } else {
                        *me.waker.borrow_mut() = Some(cx.waker().clone());
                        std::task::Poll::Pending
                    }
                }),
            )
            .await;
        }
    }

    /// One delivery attempt of one message.
    async fn attempt(&self, r: MsgRef) {
        let loaded = self.commit.with_spool(|s| s.load(r));
        let (env, body) = match loaded {
            Ok(v) => v,
            Err(e) => {
                // Unreadable record: nothing can be delivered or bounced. Keep it (the
                // segment stays as evidence) but stop trying; an operator must look.
                tracing::error!(shard = self.shard, msg = ?r, error = %e, "cannot load queued message; holding it");
                if let Some(e) = self.index.borrow_mut().get_mut(&r) {
                    e.in_flight = false;
                    e.q.held = true;
                }
                return;
            }
        };
        let q = match self.index.borrow().get(&r) {
            Some(e) => e.q.clone(),
            None => return,
        };
        let pending: Vec<usize> = q
            .rcpt_states
            .iter()
            .enumerate()
            .filter(|(_, s)| *s == RcptState::Pending)
            .map(|(i, _)| i)
            .collect();

        let age = Duration::from_micros(now_micros().saturating_sub(env.arrival_unix_micros));
        let mut outcomes: Vec<(usize, Outcome)> = Vec::with_capacity(pending.len());
        if age >= self.cfg.max_age {
            for &i in &pending {
                outcomes.push((
                    i,
                    Outcome::Failed(Reply::local(554, (5, 4, 7), "delivery time expired"), None),
                ));
            }
        } else {
            outcomes = self.deliver(&env, &body, &pending).await;
        }

        // Bounce newly failed recipients (never for a null sender).
        let failed: Vec<(usize, Reply, Option<String>)> = outcomes
            .iter()
            .filter_map(|(i, o)| match o {
                Outcome::Failed(rep, mta) => Some((*i, rep.clone(), mta.clone())),
                _ => None,
            })
            .collect();
        if !failed.is_empty() {
            self.bounce(&env, &body, &failed, crate::dsn::DsnKind::Failure)
                .await;
        }

        let mut change = q.change(Vec::new());
        change.attempts = q.attempts + 1;
        let mut last = String::new();
        for (i, o) in &outcomes {
            match o {
                Outcome::Delivered(reply) => {
                    tracing::info!(id = %q.id, to = %env.recipients[*i].addr, status = "sent", reply = %reply, "delivery");
                    change.updates.push((*i as u32, RcptState::Delivered));
                }
                Outcome::Failed(rep, _) => {
                    tracing::info!(id = %q.id, to = %env.recipients[*i].addr, status = "bounced", reply = %rep, "delivery");
                    change.updates.push((*i as u32, RcptState::Failed));
                }
                Outcome::Deferred(why) => {
                    tracing::info!(id = %q.id, to = %env.recipients[*i].addr, status = "deferred", reply = %why, "delivery");
                    last = why.clone();
                }
            }
        }
        let still_pending = outcomes
            .iter()
            .any(|(_, o)| matches!(o, Outcome::Deferred(_)));
        change.last_reply = last;
        change.next_attempt_unix = if still_pending {
            now_unix() + self.backoff(change.attempts).as_secs()
        } else {
            0
        };

        // Delay warning (RFC 3461 NOTIFY=DELAY), once.
        if still_pending && !q.warned {
            if let Some(w) = self.cfg.delay_warning {
                if age >= w {
                    let delayed: Vec<(usize, Reply, Option<String>)> = outcomes
                        .iter()
                        .filter(|(i, o)| {
                            matches!(o, Outcome::Deferred(_))
                                && env.recipients[*i].notify & NOTIFY_DELAY != 0
                        })
                        .map(|(i, o)| {
                            let text = match o {
                                Outcome::Deferred(t) => t.clone(),
                                _ => String::new(),
                            };
                            (*i, Reply::local(451, (4, 4, 1), &text), None)
                        })
                        .collect();
                    if !delayed.is_empty() {
                        self.bounce(&env, &body, &delayed, crate::dsn::DsnKind::Delay)
                            .await;
                    }
                    change.warned = true;
                }
            }
        }

        // Durable first, then the index.
        let prepared = self.commit.with_spool(|s| s.prepare_state(&change));
        let committed = match prepared {
            Ok(w) => self.commit.commit(w).await.map(|_| ()),
            Err(e) => Err(e),
        };
        if let Err(e) = committed {
            tracing::error!(id = %q.id, error = %e, "cannot record delivery state; will retry the message");
            // The outcome is not durable: retry later (at-least-once).
            let due = now_unix() + self.cfg.retry_interval.as_secs();
            if let Some(e) = self.index.borrow_mut().get_mut(&r) {
                e.in_flight = false;
            }
            self.schedule.borrow_mut().insert((due, r));
            return;
        }
        let finished = {
            let mut index = self.index.borrow_mut();
            match index.get_mut(&r) {
                Some(e) => {
                    let _ = e.q.apply(&change);
                    e.in_flight = false;
                    if e.q.is_finished() {
                        index.remove(&r);
                        true
                    } else {
                        let due = if e.q.held {
                            u64::MAX
                        } else {
                            e.q.next_attempt_unix
                        };
                        self.schedule.borrow_mut().insert((due, r));
                        false
                    }
                }
                None => false,
            }
        };
        if finished {
            if let Err(e) = self.commit.with_spool(|s| s.finished(r)) {
                tracing::warn!(id = %q.id, error = %e, "spool did not take the finished mark");
            }
        }
    }

    /// Backoff after `attempts` attempts: retry_interval × 2^(attempts-1), capped.
    fn backoff(&self, attempts: u32) -> Duration {
        let base = self.cfg.retry_interval;
        let factor = 1u32 << attempts.saturating_sub(1).min(16);
        base.saturating_mul(factor).min(self.cfg.max_retry_interval)
    }

    /// Delivers `rcpts` of `env`, grouped by destination.
    async fn deliver(
        &self,
        env: &Envelope,
        body: &Bytes,
        rcpts: &[usize],
    ) -> Vec<(usize, Outcome)> {
        let mut groups: Vec<(Destination, Vec<usize>)> = Vec::new();
        for &i in rcpts {
            let addr = &env.recipients[i].addr;
            let domain = addr.rsplit_once('@').map(|(_, d)| d).unwrap_or("localhost");
            let dest = self.cfg.router.route(domain);
            match groups.iter_mut().find(|(d, _)| *d == dest) {
                Some((_, v)) => v.push(i),
                None => groups.push((dest, vec![i])),
            }
        }
        let mut out = Vec::with_capacity(rcpts.len());
        for (dest, idx) in groups {
            out.extend(crate::deliver::to_destination(&self.cfg, &dest, env, body, &idx).await);
        }
        out
    }

    /// Builds a DSN for `failed` recipients and queues it from `<>` to the sender.
    async fn bounce(
        &self,
        env: &Envelope,
        body: &Bytes,
        failed: &[(usize, Reply, Option<String>)],
        kind: crate::dsn::DsnKind,
    ) {
        if env.sender.is_empty() {
            return; // never bounce a bounce
        }
        // NOTIFY (absent = FAILURE only, NEVER = nothing) is applied by dsn::bounce.
        let wanted = failed;
        let Some(dsn) = crate::deliver::build_dsn(&self.cfg.hostname, env, wanted, kind, body)
        else {
            return;
        };
        let size = dsn.len() as u64;
        let bounce_body = [Bytes::from(dsn)];
        let prepared = self.commit.with_spool(|s| {
            let id = s.id_gen().next();
            let benv = Envelope {
                id: id.clone(),
                sender: String::new(),
                recipients: vec![crate::Recipient {
                    addr: env.sender.clone(),
                    notify: NOTIFY_NEVER,
                    orcpt: None,
                }],
                arrival_unix_micros: now_micros(),
                size,
                body_type: BodyType::EightBitMime,
                smtputf8: env.smtputf8,
                ret: None,
                envid: None,
                deliver_by: None,
                auth: None,
                client_helo: self.cfg.hostname.clone(),
                client_addr: "local (bounce)".into(),
            };
            s.prepare(&benv, &bounce_body)
                .map(|w| (w, id, benv.arrival_unix_micros))
        });
        match prepared {
            Ok((w, id, arrival)) => match self.commit.commit(w).await {
                Ok(c) => {
                    tracing::info!(id = %id, orig = %env.id, to = %env.sender, kind = ?kind, "DSN queued");
                    self.enqueue(
                        MsgRef {
                            shard: self.shard,
                            segment: c.segment,
                            offset: c.offset,
                        },
                        &id,
                        arrival,
                        1,
                    );
                }
                Err(e) => tracing::error!(orig = %env.id, error = %e, "cannot queue DSN"),
            },
            Err(e) => tracing::error!(orig = %env.id, error = %e, "cannot queue DSN"),
        }
    }
}
