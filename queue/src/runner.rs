//! The queue runner: one per shard, delivering that shard's queued messages.
//!
//! Holds a compact index of the shard's undelivered messages and a schedule ordered by
//! next attempt (`index::QueueIndex`, ~70 bytes a message; envelopes and bodies stay on
//! disk and are loaded, zero-copy, per attempt). A message is tried as soon as it is accepted, then on
//! a backoff schedule (`retry_interval` doubling up to `max_retry_interval`, sendmail's
//! `-q15m` idea) until `max_age`. Each attempt groups the pending recipients by route
//! (maildir, a static SMTP next hop, the relayhost, or the recipient domain's mail host),
//! delivers, and records the per-recipient outcome as a state record through the shard's
//! `GroupCommit` before the index changes: 2xx delivered, 5xx failed (bounced to the
//! sender, RFC 3464), 4xx or connection trouble retried. A message with no pending
//! recipient is `finished` in the spool so its segment can be recycled.
//!
//! Per destination (a route, or an MX domain) a shard runs at most
//! `destination_concurrency` deliveries at once and starts them at most at its share of
//! the destination's rate (a token bucket, `ratelimit`): a delivery without a token waits
//! up to [`RATE_WAIT_INLINE`], else its recipients are *throttled*: not tried, not counted
//! as an attempt or a failure, due again when a token should be there.
//!
//! DSNs besides bounces: a delay warning (NOTIFY=DELAY), and success reports (RFC 3461
//! §5.2): NOTIFY=SUCCESS delivered into a maildir gets "delivered", relayed to a next hop
//! without DSN gets "relayed" (so does a BY=;N message relayed to a hop with neither DSN
//! nor DELIVERBY, RFC 2852 §4.1.4.2); a hop with DSN was handed NOTIFY/ORCPT and reports
//! itself, so nothing is sent.
//!
//! Outbound TLS: the shard builds one rustls client configuration per trust policy
//! (`tls_configs`) when `run` starts, from the policies configured, off the shard thread; every
//! connection under that policy shares it, and so resumes TLS sessions to next hops.
//! [`Runner::reload_client_tls`] rebuilds them (SIGHUP: CA files may have changed).
//!
//! Owns: the shard's delivery schedule and in-flight count. Must never: deliver a message
//! of another shard, change the index before the state record is durable, send any DSN to
//! a null sender, or hold more than `concurrency` deliveries in flight.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::task::Waker;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::client::{Reply, StarttlsPolicy};
use crate::commit::GroupCommit;
use crate::dsn::DsnKind;
use crate::index::QueueIndex;
use crate::outcome::Outcome;
use crate::ratelimit::{RateLimit, TokenBucket};
use crate::route::Destination;
use crate::state::{MsgId, MsgRef, QueuedMessage, RcptState, StateChange};
use crate::tls_configs::TrustKey;
use crate::SpoolError;
// Re-exported where the engine has always found it; defined below `deliver`, which reads it too.
pub use crate::config::RunnerConfig;
use crate::{BodyType, DeliverByMode, Envelope, NOTIFY_DELAY, NOTIFY_NEVER, NOTIFY_SUCCESS};

/// Longest a delivery waits in place for its destination's rate token; beyond that its
/// recipients are throttled and the message is due again later (a waiting delivery holds
/// one of the shard's `concurrency` slots, so the wait is kept short).
pub const RATE_WAIT_INLINE: Duration = Duration::from_secs(1);

/// Per-destination maps (slots, buckets) are pruned of idle entries beyond this size.
const DESTINATIONS_KEPT: usize = 1024;

/// The per-shard runner. Shard-local (`Rc`).
pub struct Runner {
    shard: u16,
    cfg: Rc<RunnerConfig>,
    commit: GroupCommit,
    /// The shard's queued messages and their schedule.
    index: RefCell<QueueIndex>,
    in_flight: Cell<usize>,
    over_water: Cell<bool>,
    waker: RefCell<Option<Waker>>,
    kicked: Cell<bool>,
    stopping: Cell<bool>,
    /// Idle outbound connections for reuse.
    pool: crate::deliver::ConnPool,
    /// Per-destination slots (`destination_concurrency`), keyed by the route.
    slots: RefCell<HashMap<Destination, Rc<glommio::sync::Semaphore>>>,
    /// Per-destination rate buckets (`destination_rate`, a route's `rate=`).
    buckets: RefCell<HashMap<Destination, TokenBucket>>,
    /// Recipient outcomes so far (metrics), and the last few failures.
    counts: RefCell<DeliveryCounts>,
}

/// Recipient outcomes counted by the runner since start (for metrics): shard-local,
/// copied out when scraped.
#[derive(Debug, Clone, Default)]
pub struct DeliveryCounts {
    pub sent: u64,
    pub deferred: u64,
    pub bounced: u64,
    /// The last [`RECENT_FAILURES`] deferrals and bounces: (unix seconds, text).
    pub recent: std::collections::VecDeque<(u64, String)>,
}

/// How many recent delivery failures a shard keeps for the status page.
pub const RECENT_FAILURES: usize = 20;

impl DeliveryCounts {
    fn failure(&mut self, text: String) {
        if self.recent.len() == RECENT_FAILURES {
            self.recent.pop_front();
        }
        self.recent.push_back((now_unix(), text));
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// When a throttled message is due again: whole seconds, rounded up, at least one.
fn throttled_due(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    now_unix() + secs.max(1)
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
            index: RefCell::new(QueueIndex::new(shard)),
            in_flight: Cell::new(0),
            over_water: Cell::new(false),
            waker: RefCell::new(None),
            kicked: Cell::new(false),
            stopping: Cell::new(false),
            pool: Default::default(),
            slots: RefCell::new(HashMap::new()),
            buckets: RefCell::new(HashMap::new()),
            counts: RefCell::new(DeliveryCounts::default()),
        });
        for q in recovered {
            r.insert(q);
        }
        r
    }

    /// Recipient outcomes since start, and the last few failures.
    pub fn delivery_counts(&self) -> DeliveryCounts {
        self.counts.borrow().clone()
    }

    /// Arrival time of the oldest queued message (µs since the epoch).
    pub fn oldest_arrival_unix_micros(&self) -> Option<u64> {
        self.index.borrow().oldest_arrival_unix_micros()
    }

    /// What the index holds in memory (tests, memory figures).
    pub fn index_footprint(&self) -> crate::index::IndexFootprint {
        self.index.borrow().footprint()
    }

    /// Messages queued on this shard.
    pub fn len(&self) -> usize {
        self.index.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether new mail should be refused for now (452 4.3.1): the shard holds
    /// `high_water_messages` messages, or its segments take `high_water_bytes` on disk.
    /// Hysteresis: once over a mark, the shard accepts again only at or below 90% of it
    /// (at least one less), so it does not flap at the edge.
    pub fn over_high_water(&self) -> bool {
        fn past(n: u64, mark: u64, was_over: bool) -> bool {
            if mark == 0 {
                return false; // no limit
            }
            if was_over {
                n > mark.saturating_sub((mark / 10).max(1))
            } else {
                n >= mark
            }
        }
        let was = self.over_water.get();
        let over = past(self.len() as u64, self.cfg.high_water_messages as u64, was)
            || past(
                self.commit.with_spool(|s| s.disk_bytes()),
                self.cfg.high_water_bytes,
                was,
            );
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

    /// Indexes a committed message that is held (a filter's quarantine: its held state
    /// record is durable already). It is not tried until `tern queue release`.
    pub fn enqueue_held(
        &self,
        msg: MsgRef,
        id: &str,
        arrival_unix_micros: u64,
        recipients: usize,
        reason: &str,
    ) {
        let Some(mid) = MsgId::new(id) else {
            tracing::error!(
                id,
                "queue id too long for the index; message left in the spool"
            );
            return;
        };
        let mut q = QueuedMessage::new(msg, mid, arrival_unix_micros, recipients);
        q.held = true;
        q.last_reply = Some(crate::state::intern_reply(reason));
        self.insert(q);
    }

    /// Makes every queued message due now (`tern queue flush`, ETRN). Returns how many.
    pub fn flush(&self) -> usize {
        let n = self.index.borrow_mut().flush_all();
        self.kick();
        n
    }

    /// Asks `run` to stop after the deliveries in flight.
    pub fn stop(&self) {
        self.stopping.set(true);
        self.kick();
    }

    fn insert(&self, q: QueuedMessage) {
        let id = q.id;
        if let Err(e) = self.index.borrow_mut().insert(q) {
            tracing::error!(shard = self.shard, %id, error = %e, "cannot index the message; left in the spool");
        }
    }

    fn kick(&self) {
        self.kicked.set(true);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// The trust policies the configuration names (the global one, the relay host's, the
    /// routes' and the MX table's), for the TLS configurations built at start.
    fn configured_trust(&self) -> Vec<TrustKey> {
        let mut keys: Vec<TrustKey> = Vec::new();
        let global = &self.cfg.client;
        let mut add = |o: &crate::client::ClientOptions| {
            let k = TrustKey::of(o);
            if o.starttls != StarttlsPolicy::Never && !keys.contains(&k) {
                keys.push(k);
            }
        };
        add(global);
        for p in self.cfg.router.tls_policies() {
            let mut o = global.clone();
            p.apply(&mut o);
            add(&o);
        }
        keys
    }

    /// Rebuilds the outbound TLS client configurations (SIGHUP / `tern ctl reload`): a
    /// changed CA file takes effect for the next connection. Idle connections are closed
    /// (they were verified under the old trust anchors), and sessions are not resumed
    /// across the change. A policy whose CA file can no longer be used defers its
    /// deliveries with that error until it is fixed (fail closed). Returns the errors,
    /// already logged.
    pub async fn reload_client_tls(&self) -> Vec<String> {
        let r = self.pool.tls.rebuild().await;
        self.pool.clear();
        let errors: Vec<String> = r
            .failed
            .iter()
            .map(|(k, e)| {
                tracing::error!(shard = self.shard, ca_file = ?k.ca_file, error = %e, "outbound TLS configuration not rebuilt; its deliveries defer");
                e.to_string()
            })
            .collect();
        tracing::info!(
            shard = self.shard,
            rebuilt = r.rebuilt,
            "outbound TLS configurations rebuilt"
        );
        errors
    }

    /// Outbound TLS configurations built on this shard (one per trust policy in use).
    pub fn client_tls_configs(&self) -> usize {
        self.pool.tls.len()
    }

    /// The scheduling loop. Runs until `stop`.
    pub async fn run(self: Rc<Self>) {
        // The TLS configurations of the configured policies first, on the blocking
        // thread (a few milliseconds for a system bundle): SMTP deliveries would wait for
        // them anyway, and this way no blocking job is left behind by a task of its own.
        for (k, e) in self.pool.tls.prepare(self.configured_trust()).await {
            // Not fatal: deliveries under this policy defer with the same error.
            tracing::error!(shard = self.shard, ca_file = ?k.ca_file, error = %e, "outbound TLS configuration");
        }
        loop {
            if self.stopping.get() {
                return;
            }
            self.pool.sweep();
            let now = now_unix();
            // Start every due message, up to the concurrency limit.
            loop {
                if self.in_flight.get() >= self.cfg.concurrency.max(1) {
                    break;
                }
                // Claimed (in flight) as it leaves the schedule.
                let next = self.index.borrow_mut().claim_due(now);
                let Some(r) = next else { break };
                self.in_flight.set(self.in_flight.get() + 1);
                let me = self.clone();
                glommio::spawn_local(async move {
                    me.attempt(r).await;
                    me.in_flight.set(me.in_flight.get() - 1);
                    me.kick();
                })
                .detach();
            }
            // Sleep until the next due time (at most a second, so the clock is re-read),
            // or until kicked.
            let next_due = self.index.borrow().next_due();
            let wait = match next_due {
                Some(due) if self.in_flight.get() < self.cfg.concurrency => {
                    Duration::from_secs(due.saturating_sub(now_unix()).min(1))
                }
                _ => Duration::from_secs(1),
            };
            if wait.is_zero() && next_due.is_some() && self.in_flight.get() < self.cfg.concurrency {
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
                self.index.borrow_mut().update(r, |q, in_flight| {
                    *in_flight = false;
                    q.held = true;
                });
                return;
            }
        };
        let q = match self.index.borrow().get(r) {
            Some((q, _)) => q,
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
        // RFC 2852 DELIVERBY: the by-time counts from arrival. In R mode the message is
        // returned once it has passed; in N mode the sender is told (a delay DSN) and
        // delivery goes on.
        let by_deadline = env.deliver_by.map(|b| {
            let arrival = (env.arrival_unix_micros / 1_000_000) as i64;
            (arrival.saturating_add(b.seconds).max(0) as u64, b.mode)
        });
        let by_expired_return =
            by_deadline.is_some_and(|(d, m)| m == crate::DeliverByMode::Return && now_unix() >= d);
        if age >= self.cfg.max_age || by_expired_return {
            let why = if by_expired_return {
                "delivery time (DELIVERBY) expired"
            } else {
                "delivery time expired"
            };
            for &i in &pending {
                outcomes.push((
                    i,
                    Outcome::failed_locally(Reply::local(554, (5, 4, 7), why)),
                ));
            }
        } else {
            outcomes = self.deliver(&env, &body, &pending).await;
        }

        // Recipients waiting for a rate token were not tried. If that is all of them,
        // nothing happened: no state record, no attempt counted, just due again later.
        let throttled = outcomes
            .iter()
            .filter_map(|(_, o)| match o {
                Outcome::Throttled(w) => Some(*w),
                _ => None,
            })
            .min();
        if let Some(wait) = throttled {
            if outcomes
                .iter()
                .all(|(_, o)| matches!(o, Outcome::Throttled(_)))
            {
                tracing::debug!(id = %q.id, wait_ms = wait.as_millis() as u64, "delivery: destination rate limit, retrying later");
                self.retry_throttled(r, wait);
                return;
            }
        }

        // Success reports (RFC 3461 §5.2), queued before the state record like bounces.
        self.success_reports(&env, &body, &outcomes).await;

        // Bounce newly failed recipients (never for a null sender).
        let failed: Vec<(usize, Reply, Option<String>)> = outcomes
            .iter()
            .filter_map(|(i, o)| match o {
                Outcome::Failed { reply, mta, .. } => Some((*i, reply.clone(), mta.clone())),
                _ => None,
            })
            .collect();
        // A failure that cannot be reported is not final yet: if its DSN could not be
        // queued, the recipients stay pending and are tried (and bounced) again later,
        // rather than marked failed with nobody told.
        let failures_reported =
            failed.is_empty() || self.bounce(&env, &body, &failed, DsnKind::Failure).await;

        let mut change = q.change(Vec::new());
        change.attempts = q.attempts + 1;
        let mut last = String::new();
        // Scoped: the borrow ends before any await below.
        {
            let mut counts = self.counts.borrow_mut();
            for (i, o) in &outcomes {
                let to = &env.recipients[*i].addr;
                match o {
                    Outcome::Delivered { line: reply, .. } => {
                        tracing::info!(id = %q.id, to = %to, delay_secs = age.as_secs(), status = "sent", reply = %reply, "delivery");
                        change.updates.push((*i as u32, RcptState::Delivered));
                        counts.sent += 1;
                    }
                    Outcome::Failed { line, .. } if !failures_reported => {
                        tracing::warn!(id = %q.id, to = %to, reply = %line, "delivery failed but its DSN could not be queued; the recipient stays pending");
                        last = format!("failed ({line}); DSN not queued yet");
                        counts.deferred += 1;
                    }
                    Outcome::Failed { line, .. } => {
                        tracing::info!(id = %q.id, to = %to, delay_secs = age.as_secs(), status = "bounced", reply = %line, "delivery");
                        change.updates.push((*i as u32, RcptState::Failed));
                        counts.bounced += 1;
                        counts.failure(format!("{} to {to}: bounced: {line}", q.id));
                    }
                    Outcome::Deferred(why) => {
                        tracing::info!(id = %q.id, to = %to, delay_secs = age.as_secs(), status = "deferred", reply = %why, "delivery");
                        last = why.clone();
                        counts.deferred += 1;
                        counts.failure(format!("{} to {to}: deferred: {why}", q.id));
                    }
                    // Still pending; comes back with the message (below).
                    Outcome::Throttled(_) => {}
                }
            }
        }
        let still_pending = !failures_reported
            || outcomes
                .iter()
                .any(|(_, o)| matches!(o, Outcome::Deferred(_)));
        change.last_reply = last;
        change.next_attempt_unix = if still_pending {
            let next = now_unix() + self.backoff(change.attempts).as_secs();
            // Come back exactly at a DELIVERBY deadline still ahead of us.
            let next = match by_deadline {
                Some((d, _)) if d > now_unix() => next.min(d),
                _ => next,
            };
            // Throttled recipients of the same message come back sooner (the deferred
            // ones are then retried early too: one due time per message).
            throttled.map_or(next, |w| next.min(throttled_due(w)))
        } else {
            throttled.map_or(0, throttled_due)
        };
        let by_notify_due =
            by_deadline.is_some_and(|(d, m)| m == crate::DeliverByMode::Notify && now_unix() >= d);

        // Delay warning (RFC 3461 NOTIFY=DELAY), once.
        if still_pending && !q.warned {
            let warn_after = if by_notify_due {
                Some(Duration::ZERO)
            } else {
                self.cfg.delay_warning
            };
            if let Some(w) = warn_after {
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
                        self.bounce(&env, &body, &delayed, DsnKind::Delay).await;
                    }
                    change.warned = true;
                }
            }
        }

        // Durable first, then the index.
        if let Err(e) = self.commit.commit_state(&change).await {
            tracing::error!(id = %q.id, error = %e, "cannot record delivery state; will retry the message");
            // The outcome is not durable: retry later (at-least-once).
            self.retry_at(r, now_unix() + self.cfg.retry_interval.as_secs());
            return;
        }
        let finished = {
            let mut index = self.index.borrow_mut();
            let finished = index.update(r, |q, in_flight| {
                let _ = q.apply(&change);
                *in_flight = false;
                q.is_finished()
            });
            match finished {
                Some(true) => {
                    index.remove(r);
                    true
                }
                Some(false) => {
                    index.schedule(r);
                    // Deferred: its pages need not stay resident until the next try.
                    self.commit.with_spool(|s| s.release_pages(r));
                    false
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
            // Wait for a slot of this destination (bounded by the shard's concurrency).
            let sem = self.slot(&dest);
            let permit = sem.acquire_permit(1).await;
            // Then for a rate token: taken with the slot held, so a delivery starts
            // right after its token (tokens taken long before the send would let a
            // burst through when slots free up together).
            if let Err(wait) = self.rate_token(&dest).await {
                drop(permit);
                out.extend(idx.iter().map(|&i| (i, Outcome::Throttled(wait))));
                continue;
            }
            out.extend(
                crate::deliver::to_destination(&self.cfg, &self.pool, &dest, env, body, &idx).await,
            );
            drop(permit);
        }
        out
    }

    /// The concurrency semaphore of `dest` (created on first use; idle ones are dropped
    /// when the map grows large: a semaphore nobody holds or awaits is only referenced by
    /// the map).
    fn slot(&self, dest: &Destination) -> Rc<glommio::sync::Semaphore> {
        let mut slots = self.slots.borrow_mut();
        if let Some(s) = slots.get(dest) {
            return s.clone();
        }
        if slots.len() >= DESTINATIONS_KEPT {
            slots.retain(|_, s| Rc::strong_count(s) > 1);
        }
        let s = Rc::new(glommio::sync::Semaphore::new(
            self.cfg.destination_concurrency.max(1) as u64,
        ));
        slots.insert(dest.clone(), s.clone());
        s
    }

    /// The rate limit of `dest`: the route's own, else the configured default; none for
    /// local delivery.
    fn rate_of(&self, dest: &Destination) -> Option<RateLimit> {
        match dest {
            Destination::Maildir(_) => None,
            Destination::Smtp { rate: Some(r), .. } => Some(*r),
            Destination::Smtp { .. } | Destination::Mx(_) => self.cfg.destination_rate,
        }
    }

    /// Takes a rate token for `dest`, waiting for it up to [`RATE_WAIT_INLINE`] in all;
    /// `Err(wait)` when there is none within that (the bucket is left as it was).
    async fn rate_token(&self, dest: &Destination) -> Result<(), Duration> {
        let Some(limit) = self.rate_of(dest) else {
            return Ok(());
        };
        let mut waited = Duration::ZERO;
        loop {
            let now = Instant::now();
            let taken = {
                let mut buckets = self.buckets.borrow_mut();
                match buckets.get_mut(dest) {
                    Some(b) => b.try_take(now),
                    None => {
                        if buckets.len() >= DESTINATIONS_KEPT {
                            // A full bucket is the same as a new one.
                            buckets.retain(|_, b| !b.is_full(now));
                        }
                        let mut b = TokenBucket::new(limit, now);
                        let t = b.try_take(now);
                        buckets.insert(dest.clone(), b);
                        t
                    }
                }
            };
            match taken {
                Ok(()) => return Ok(()),
                Err(wait) if waited + wait <= RATE_WAIT_INLINE => {
                    // Another delivery may take the token first; then we wait again.
                    glommio::timer::sleep(wait).await;
                    waited += wait;
                }
                Err(wait) => return Err(wait),
            }
        }
    }

    /// Every pending recipient of `r` waits for a rate token: put the message back, due
    /// when a token should be there (whole seconds, at least one, as the schedule
    /// counts). Nothing was tried, so nothing is recorded.
    fn retry_throttled(&self, r: MsgRef, wait: Duration) {
        self.retry_at(r, throttled_due(wait));
    }

    /// Ends `r`'s attempt without a durable outcome (a failed state write, or nothing
    /// tried): unclaimed, due at `due` (unix seconds), and its pages not kept resident
    /// until then.
    fn retry_at(&self, r: MsgRef, due: u64) {
        {
            let mut index = self.index.borrow_mut();
            index.update(r, |_, in_flight| *in_flight = false);
            index.reschedule(r, due);
        }
        self.commit.with_spool(|s| s.release_pages(r));
    }

    /// Success DSNs for the recipients of `outcomes` that were delivered (RFC 3461 §5.2,
    /// RFC 3464 §2.3.3): NOTIFY=SUCCESS into a maildir → "delivered"; to a next hop
    /// without DSN → "relayed" (it will not report); so does a BY=;N message to a hop
    /// with neither DSN nor DELIVERBY whatever its NOTIFY but NEVER (RFC 2852 §4.1.4.2).
    /// A hop with DSN was given NOTIFY and ORCPT: nothing from us.
    async fn success_reports(&self, env: &Envelope, body: &Bytes, outcomes: &[(usize, Outcome)]) {
        if env.sender.is_empty() {
            return;
        }
        let by_notify = env
            .deliver_by
            .is_some_and(|b| b.mode == DeliverByMode::Notify);
        let mut delivered = Vec::new();
        let mut relayed = Vec::new();
        for (i, o) in outcomes {
            let Outcome::Delivered { reply, hop, .. } = o else {
                continue;
            };
            // NOTIFY (SUCCESS asked, NEVER refused) is applied again by `dsn::bounce`;
            // here it only spares the clones for the many recipients that asked nothing.
            let success = env.recipients[*i].notify & NOTIFY_SUCCESS != 0;
            match hop {
                None if success => delivered.push((*i, reply.clone(), None)),
                Some(h) if !h.dsn && (success || (by_notify && !h.deliverby)) => {
                    relayed.push((*i, reply.clone(), Some(h.mta.clone())))
                }
                _ => {}
            }
        }
        if !delivered.is_empty() {
            self.bounce(env, body, &delivered, DsnKind::Success).await;
        }
        if !relayed.is_empty() {
            self.bounce(env, body, &relayed, DsnKind::Relayed).await;
        }
    }

    /// Builds a DSN of `kind` for the recipients in `failed` (those whose NOTIFY asks for
    /// it) and queues it from `<>` to the sender.
    async fn bounce(
        &self,
        env: &Envelope,
        body: &Bytes,
        failed: &[(usize, Reply, Option<String>)],
        kind: DsnKind,
    ) -> bool {
        if env.sender.is_empty() {
            return true; // never bounce a bounce
        }
        // NOTIFY (absent = FAILURE only, NEVER = nothing) is applied by dsn::bounce.
        let wanted = failed;
        let Some(dsn) = crate::deliver::build_dsn(&self.cfg.hostname, env, wanted, kind, body)
        else {
            return true;
        };
        let size = dsn.len() as u64;
        let bounce_body = [Bytes::from(dsn)];
        // A segment retired under us (a failed write or sync elsewhere): prepare again on
        // a fresh one, as a client's message is.
        for attempt in 0..3 {
            match self.queue_dsn(env, &bounce_body, size, kind).await {
                Ok(()) => return true,
                Err(SpoolError::SegmentUnusable { .. }) if attempt < 2 => continue,
                Err(e) => {
                    tracing::error!(orig = %env.id, error = %e, "cannot queue DSN");
                    return false;
                }
            }
        }
        false
    }

    /// Prepares and commits one DSN (`bounce`), then queues it for delivery.
    async fn queue_dsn(
        &self,
        env: &Envelope,
        bounce_body: &[Bytes; 1],
        size: u64,
        kind: DsnKind,
    ) -> Result<(), SpoolError> {
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
            s.prepare(&benv, bounce_body)
                .map(|w| (w, id, benv.arrival_unix_micros))
        });
        let (w, id, arrival) = prepared?;
        let c = self.commit.commit(w).await?;
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
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Queue tools (`tern queue ...` against a running server). Shard-local like the rest of
// the runner: the engine's admin thread sends a request to every shard's control task,
// which calls these and replies.
// ---------------------------------------------------------------------------------------

/// Where a queued message stands, as `tern queue list` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsgState {
    /// Being delivered now, or waiting for its first attempt.
    Active,
    /// Tried, and waiting for its next attempt.
    Deferred,
    /// On hold (`tern queue hold`): never tried until released.
    Held,
    /// Every recipient is final (only offline listings of `--all` show these).
    Done,
}

impl MsgState {
    pub fn of(q: &QueuedMessage, in_flight: bool) -> MsgState {
        if q.is_finished() {
            MsgState::Done
        } else if q.held {
            MsgState::Held
        } else if in_flight || q.attempts == 0 {
            MsgState::Active
        } else {
            MsgState::Deferred
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            MsgState::Active => "active",
            MsgState::Deferred => "deferred",
            MsgState::Held => "held",
            MsgState::Done => "done",
        }
    }
}

/// Which messages a queue tool applies to. Every given criterion must hold; an empty
/// selection matches every message.
#[derive(Debug, Clone, Default)]
pub struct Select {
    /// Exactly this queue id.
    pub id: Option<String>,
    /// The sender contains this (ASCII case-insensitive); "<>" matches the null sender.
    pub sender_contains: Option<String>,
    /// A *pending* recipient is in this domain (ASCII case-insensitive).
    pub rcpt_domain: Option<String>,
    /// Queued at least this long.
    pub min_age: Option<Duration>,
    /// Only messages in this state (`None`: any).
    pub state: Option<MsgState>,
}

impl Select {
    /// Whether the selection needs the envelope (sender or recipient addresses).
    pub fn needs_envelope(&self) -> bool {
        self.sender_contains.is_some() || self.rcpt_domain.is_some()
    }

    /// The criteria that need only the index entry.
    pub fn matches_entry(&self, q: &QueuedMessage, in_flight: bool, now_micros: u64) -> bool {
        if let Some(id) = &self.id {
            if q.id != id.as_str() {
                return false;
            }
        }
        if let Some(min) = self.min_age {
            if now_micros.saturating_sub(q.arrival_unix_micros) < min.as_micros() as u64 {
                return false;
            }
        }
        if let Some(st) = self.state {
            if MsgState::of(q, in_flight) != st {
                return false;
            }
        }
        true
    }

    /// The criteria that need the envelope (`q` gives the recipients' states).
    pub fn matches_envelope(&self, q: &QueuedMessage, env: &Envelope) -> bool {
        if let Some(s) = &self.sender_contains {
            let ok = if s == "<>" {
                env.sender.is_empty()
            } else {
                env.sender
                    .to_ascii_lowercase()
                    .contains(&s.to_ascii_lowercase())
            };
            if !ok {
                return false;
            }
        }
        if let Some(d) = &self.rcpt_domain {
            let d = d.trim_start_matches('@');
            let hit = env.recipients.iter().enumerate().any(|(i, r)| {
                q.rcpt_states.get(i) == Some(RcptState::Pending)
                    && r.addr
                        .rsplit_once('@')
                        .is_some_and(|(_, rd)| rd.eq_ignore_ascii_case(d))
            });
            if !hit {
                return false;
            }
        }
        true
    }
}

/// One message as the queue tools see it: the index entry and its envelope.
#[derive(Debug, Clone)]
pub struct QueueItem {
    pub q: QueuedMessage,
    pub in_flight: bool,
    pub envelope: Envelope,
}

impl QueueItem {
    pub fn state(&self) -> MsgState {
        MsgState::of(&self.q, self.in_flight)
    }
    /// Addresses of the recipients still pending.
    pub fn pending_recipients(&self) -> impl Iterator<Item = &str> + '_ {
        self.envelope
            .recipients
            .iter()
            .enumerate()
            .filter(|(i, _)| self.q.rcpt_states.get(*i) == Some(RcptState::Pending))
            .map(|(_, r)| r.addr.as_str())
    }
}

/// Result of an operation that changes messages (`delete`, `hold`, `release`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Changed {
    /// Messages the selection matched.
    pub matched: usize,
    /// Messages changed (the state record is durable).
    pub changed: usize,
    /// Matching messages in the middle of a delivery attempt, left alone: try again.
    pub busy: usize,
    /// Matching messages whose state record could not be written (logged).
    pub failed: usize,
}

/// `tern queue stats` for one shard.
#[derive(Debug, Clone, Default)]
pub struct QueueStats {
    pub messages: usize,
    pub active: usize,
    pub deferred: usize,
    pub held: usize,
    /// Pending recipients.
    pub recipients: usize,
    /// Sum of the message sizes (as stored, Received: header included).
    pub bytes: u64,
    pub oldest_arrival_unix_micros: Option<u64>,
    /// Pending recipients per recipient domain (lower-cased).
    pub domains: std::collections::BTreeMap<String, usize>,
    /// Messages whose envelope could not be read (their sizes and domains are missing).
    pub unreadable: usize,
}

/// What an admin change does to a message (live here, and offline in `tern queue`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminChange {
    Hold,
    Release,
    /// Every pending recipient becomes Failed, without a bounce.
    Delete,
}

impl AdminChange {
    /// The state record that makes the change to `q`; `None` if there is nothing to do
    /// (holding a held message, releasing one that is not held).
    pub fn record(self, q: &QueuedMessage) -> Option<StateChange> {
        match self {
            AdminChange::Hold if q.held => None,
            AdminChange::Release if !q.held => None,
            AdminChange::Hold | AdminChange::Release => {
                let mut c = q.change(Vec::new());
                c.held = self == AdminChange::Hold;
                Some(c)
            }
            AdminChange::Delete => {
                let updates = q
                    .rcpt_states
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| *s == RcptState::Pending)
                    .map(|(i, _)| (i as u32, RcptState::Failed))
                    .collect();
                let mut c = q.change(updates);
                c.last_reply = "deleted by the administrator".into();
                Some(c)
            }
        }
    }
}

impl Runner {
    /// Deliveries in flight on this shard.
    pub fn in_flight(&self) -> usize {
        self.in_flight.get()
    }

    /// References of the index entries that pass the entry-only criteria.
    fn candidates(&self, sel: &Select) -> Vec<MsgRef> {
        let now = now_micros();
        let index = self.index.borrow();
        if let Some(id) = &sel.id {
            // One message: find it without building every entry.
            return index
                .find_id(id)
                .and_then(|r| index.get(r))
                .filter(|(q, fl)| sel.matches_entry(q, *fl, now))
                .map(|(q, _)| vec![q.msg])
                .unwrap_or_default();
        }
        let mut v: Vec<(u64, MsgRef)> = index
            .iter()
            .filter(|(q, fl)| sel.matches_entry(q, *fl, now))
            .map(|(q, _)| (q.arrival_unix_micros, q.msg))
            .collect();
        v.sort_unstable();
        v.into_iter().map(|(_, r)| r).collect()
    }

    /// The item for `r` if it (still) matches `sel`; loads the envelope from the spool.
    fn item(&self, r: MsgRef, sel: &Select) -> Option<QueueItem> {
        let (q, in_flight) = self.index.borrow().get(r)?;
        let loaded = self.commit.with_spool(|s| {
            let l = s.load(r);
            // Listing a large queue must not leave every message resident.
            s.release_pages(r);
            l
        });
        let envelope = match loaded {
            Ok((env, _)) => env,
            Err(e) => {
                tracing::warn!(shard = self.shard, id = %q.id, error = %e, "queue tools: cannot load envelope");
                return None;
            }
        };
        sel.matches_envelope(&q, &envelope).then_some(QueueItem {
            q,
            in_flight,
            envelope,
        })
    }

    /// The shard's messages matching `sel`, oldest first, with their envelopes.
    // XXX: `ShardSpool::load` verifies the body checksum too, so listing reads every
    // listed body once (from the page cache, usually). An envelope-only load in spool.rs
    // would make this cheaper for large queues.
    pub async fn list(&self, sel: &Select) -> Vec<QueueItem> {
        let mut out = Vec::new();
        for r in self.candidates(sel) {
            if let Some(it) = self.item(r, sel) {
                out.push(it);
            }
            // Long listings must not starve the shard's sessions.
            glommio::yield_if_needed().await;
        }
        out
    }

    /// One message by queue id, with up to `body_cap` bytes of its body if asked.
    pub fn show(&self, id: &str, body_cap: Option<usize>) -> Option<(QueueItem, Option<Bytes>)> {
        let sel = Select {
            id: Some(id.to_string()),
            ..Select::default()
        };
        let r = *self.candidates(&sel).first()?;
        let item = self.item(r, &sel)?;
        let body = body_cap.and_then(|cap| {
            self.commit
                .with_spool(|s| s.load(r))
                .ok()
                .map(|(_, b)| b.slice(..b.len().min(cap)))
        });
        Some((item, body))
    }

    /// Makes the matching messages (not held, not in flight) due now. With an empty
    /// selection this is [`Runner::flush`]. Returns how many.
    pub async fn flush_matching(&self, sel: &Select) -> usize {
        if sel.id.is_none() && !sel.needs_envelope() && sel.min_age.is_none() {
            return self.flush();
        }
        let mut due = Vec::new();
        for r in self.candidates(sel) {
            let busy = self
                .index
                .borrow()
                .get(r)
                .is_none_or(|(q, in_flight)| in_flight || q.held);
            if busy {
                continue;
            }
            if !sel.needs_envelope() || self.item(r, sel).is_some() {
                due.push(r);
            }
            glommio::yield_if_needed().await;
        }
        for r in &due {
            self.reschedule(*r, 0);
        }
        self.kick();
        due.len()
    }

    /// Deletes the matching messages: every pending recipient becomes Failed, *without*
    /// a bounce (the operator decided), durably, and the message leaves the queue.
    pub async fn delete(&self, sel: &Select) -> Changed {
        self.admin_change(sel, AdminChange::Delete).await
    }

    /// Puts the matching messages on hold: they stay queued but are never tried.
    pub async fn hold(&self, sel: &Select) -> Changed {
        self.admin_change(sel, AdminChange::Hold).await
    }

    /// Releases held messages: they are tried at their next attempt time (at once if it
    /// has passed).
    pub async fn release(&self, sel: &Select) -> Changed {
        self.admin_change(sel, AdminChange::Release).await
    }

    /// Counts of the shard's queue. Loads every envelope (sizes, domains).
    pub async fn stats(&self) -> QueueStats {
        let mut st = QueueStats::default();
        let all = Select::default();
        for r in self.candidates(&all) {
            let Some((q, in_flight)) = self.index.borrow().get(r) else {
                continue;
            };
            st.messages += 1;
            match MsgState::of(&q, in_flight) {
                MsgState::Held => st.held += 1,
                MsgState::Deferred => st.deferred += 1,
                _ => st.active += 1,
            }
            st.recipients += q.rcpt_states.pending_count();
            st.oldest_arrival_unix_micros = Some(
                st.oldest_arrival_unix_micros
                    .map_or(q.arrival_unix_micros, |o| o.min(q.arrival_unix_micros)),
            );
            match self.item(r, &all) {
                Some(it) => {
                    st.bytes += it.envelope.size;
                    for a in it.pending_recipients() {
                        let d = a.rsplit_once('@').map_or("", |(_, d)| d);
                        *st.domains.entry(d.to_ascii_lowercase()).or_default() += 1;
                    }
                }
                None => st.unreadable += 1,
            }
            glommio::yield_if_needed().await;
        }
        st
    }

    /// Makes `r` due at `due` (unix seconds, 0: now).
    fn reschedule(&self, r: MsgRef, due: u64) {
        self.index.borrow_mut().reschedule(r, due);
    }

    /// Hold, release or delete: claim each matching message (so no attempt starts on it),
    /// write its state records in one group commit, then change the index. A message in
    /// the middle of an attempt is left alone and counted as busy: its attempt writes a
    /// state record of its own, which would otherwise race with ours.
    async fn admin_change(&self, sel: &Select, what: AdminChange) -> Changed {
        let mut out = Changed::default();
        // 1. Select (envelopes only when the selection needs them).
        let mut refs = Vec::new();
        for r in self.candidates(sel) {
            if sel.needs_envelope() {
                if self.item(r, sel).is_none() {
                    continue;
                }
                glommio::yield_if_needed().await;
            }
            refs.push(r);
        }
        // 2. Claim and build the changes; nothing awaits from here to the commit.
        let mut changes = Vec::new();
        for r in refs {
            let mut index = self.index.borrow_mut();
            let Some((q, in_flight)) = index.get(r) else {
                continue;
            };
            out.matched += 1;
            if in_flight {
                out.busy += 1;
                continue;
            }
            let Some(c) = what.record(&q) else { continue };
            index.claim(r); // claimed: the run loop and flush skip it
            changes.push(c);
        }
        // 3. Durable first: every record in one batch (one fdatasync).
        // join_all polls every future once before any completes: all records are queued
        // before the committer runs, so they share its next batch.
        let commits = changes
            .iter()
            .map(|c| async move { self.commit.commit_state(c).await.map(|_| ()) });
        let results = futures::future::join_all(commits).await;
        // 4. Then the index (and the spool's finished mark for deletions).
        for (c, res) in changes.iter().zip(results) {
            let r = c.msg;
            let finished = {
                let mut index = self.index.borrow_mut();
                let Some(finished) = index.update(r, |q, in_flight| {
                    *in_flight = false;
                    match &res {
                        Ok(()) => {
                            let _ = q.apply(c);
                            out.changed += 1;
                            tracing::info!(shard = self.shard, id = %c.id, action = ?what, "queue: changed by the administrator");
                        }
                        Err(err) => {
                            out.failed += 1;
                            tracing::error!(shard = self.shard, id = %c.id, error = %err, action = ?what, "queue: cannot record the change");
                        }
                    }
                    q.is_finished()
                }) else {
                    continue;
                };
                if finished {
                    index.remove(r);
                } else {
                    index.schedule(r);
                }
                finished
            };
            if finished {
                if let Err(e) = self.commit.with_spool(|s| s.finished(r)) {
                    tracing::warn!(id = %c.id, error = %e, "spool did not take the finished mark");
                }
            }
        }
        self.kick();
        out
    }
}
