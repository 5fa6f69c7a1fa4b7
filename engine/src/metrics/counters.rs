//! Per-shard counters: what a shard counts, and the copy it hands out when asked.
//!
//! Owns: `ShardMetrics` (one per shard, `Cell`s and small `RefCell`s: shard-local, no locks,
//! nothing shared between shards) and the `Snapshot` a shard copies them into when asked
//! over its control channel (`shard::Control::Metrics`).
//! Must never: name the shard, the server or the HTTP side (a leaf: `shard` and
//! `shard_hooks` count into it, `metrics::http` renders its snapshots), or lock.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tern_queue::commit::{CommitStats, Histogram};

pub use tern_smtp::hooks::Reject;
use tern_smtp::hooks::Rejection;

/// How many recent rejections a shard keeps for the status page.
pub const RECENT: usize = 20;

/// One shard's counters. Updated on the shard's thread only; read by `snapshot`.
#[derive(Debug, Default)]
pub struct ShardMetrics {
    connections: Cell<u64>,
    tls_ok: Cell<u64>,
    tls_failed: Cell<u64>,
    accepted: Cell<u64>,
    rejected: [Cell<u64>; Reject::ALL.len()],
    /// Per mechanism: (successes, failures).
    auth: RefCell<BTreeMap<&'static str, (u64, u64)>>,
    accept_latency: RefCell<Histogram>,
    recent: RefCell<VecDeque<(u64, String)>>,
    /// Per-login rate checks: [message, recipient] × [allowed, refused].
    user_rate: [[Cell<u64>; 2]; 2],
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl ShardMetrics {
    /// A copy of these counters for shard `shard`; `also_recent` (the runner's recent
    /// delivery failures) joins the recent refusals, oldest first. The shard fills in what
    /// it counts elsewhere (sessions, deliveries, the queue).
    pub fn snapshot<'a>(
        &self,
        shard: usize,
        also_recent: impl IntoIterator<Item = &'a (u64, String)>,
    ) -> Snapshot {
        let label = |(t, s): &(u64, String)| (*t, format!("shard {shard}: {s}"));
        let mut recent: Vec<(u64, String)> = self.recent.borrow().iter().map(label).collect();
        recent.extend(also_recent.into_iter().map(label));
        recent.sort_by_key(|(t, _)| *t);
        Snapshot {
            shard,
            connections: self.connections.get(),
            tls_ok: self.tls_ok.get(),
            tls_failed: self.tls_failed.get(),
            auth: self.auth.borrow().clone(),
            accepted: self.accepted.get(),
            rejected: std::array::from_fn(|i| self.rejected[i].get()),
            user_rate: std::array::from_fn(|k| std::array::from_fn(|o| self.user_rate[k][o].get())),
            accept_latency: self.accept_latency.borrow().clone(),
            recent,
            ..Snapshot::default()
        }
    }

    pub fn connection(&self) {
        self.connections.set(self.connections.get() + 1);
    }

    pub fn tls(&self, ok: bool) {
        let c = if ok { &self.tls_ok } else { &self.tls_failed };
        c.set(c.get() + 1);
    }

    pub fn auth(&self, mechanism: &'static str, ok: bool) {
        let mut a = self.auth.borrow_mut();
        let e = a.entry(mechanism).or_default();
        if ok {
            e.0 += 1;
        } else {
            e.1 += 1;
        }
    }

    /// A message made durable; `took` is DATA end to the 250 (the spool commit).
    pub fn accepted(&self, took: Duration) {
        self.accepted.set(self.accepted.get() + 1);
        self.accept_latency.borrow_mut().observe(took);
    }

    /// A per-login rate check (`kind` 0 = message, 1 = recipient) and its outcome.
    pub fn user_rate(&self, kind: usize, allowed: bool) {
        let c = &self.user_rate[kind][usize::from(!allowed)];
        c.set(c.get() + 1);
    }

    /// A refusal: counted by reason, and kept (peer, command, reply) in the recent list.
    pub fn rejected(&self, rej: &Rejection<'_>) {
        let i = rej.why.index();
        self.rejected[i].set(self.rejected[i].get() + 1);
        let mut r = self.recent.borrow_mut();
        if r.len() == RECENT {
            r.pop_front();
        }
        r.push_back((
            now_unix(),
            format!(
                "{}: {}: {} {} {} {}",
                rej.why.label(),
                rej.peer,
                rej.stage,
                rej.code,
                rej.enhanced,
                rej.text
            ),
        ));
    }
}

/// What one shard reports when scraped (plain data: crosses to the HTTP thread).
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Per-login rate checks: [message, recipient] × [allowed, refused].
    pub user_rate: [[u64; 2]; 2],
    /// The shard refuses new connections (`tern ctl drain`).
    pub draining: bool,
    /// The shard's spool takes new mail (under its high-water marks, not failed).
    pub accepting: bool,
    pub shard: usize,
    pub connections: u64,
    pub sessions: u64,
    pub tls_ok: u64,
    pub tls_failed: u64,
    pub auth: BTreeMap<&'static str, (u64, u64)>,
    pub accepted: u64,
    pub rejected: [u64; Reject::ALL.len()],
    pub sent: u64,
    pub deferred: u64,
    pub bounced: u64,
    pub queue: u64,
    /// Bytes of the shard's spool segment files.
    pub spool_bytes: u64,
    pub oldest_arrival_unix_micros: Option<u64>,
    pub accept_latency: Histogram,
    pub sync_latency: Histogram,
    /// Where the spool commits' time went (per message record) and what the batches held.
    pub commit: CommitStats,
    /// (unix seconds, "shard N: text"), rejections and delivery failures.
    pub recent: Vec<(u64, String)>,
    /// DKIM signatures made, per `dkim::Algorithm::index` (rsa, ed25519).
    pub dkim_signed: [u64; 2],
    /// Milter outcomes per (filter, action): accept, continue, reject, tempfail, discard,
    /// quarantine, failed (the default action was taken).
    pub milter: std::collections::BTreeMap<(String, String), u64>,
    /// Milter connections per (filter, how): opened (connect + negotiation) or reused
    /// (taken from the shard's pool, `SMFIC_QUIT_NC`).
    pub milter_conns: std::collections::BTreeMap<(String, String), u64>,
}

/// Copies the shard's counters (on the shard's thread).
impl Snapshot {
    pub fn oldest_age_secs(&self) -> f64 {
        self.oldest_arrival_unix_micros.map_or(0.0, |a| {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_micros() as u64);
            now.saturating_sub(a) as f64 / 1e6
        })
    }

    /// The sum of all shards (`shard="total"`); the oldest age is the maximum.
    pub fn total(all: &[Snapshot]) -> Snapshot {
        let mut t = Snapshot::default();
        for s in all {
            t.connections += s.connections;
            t.sessions += s.sessions;
            t.tls_ok += s.tls_ok;
            t.tls_failed += s.tls_failed;
            for (k, (ok, bad)) in &s.auth {
                let e = t.auth.entry(k).or_default();
                e.0 += ok;
                e.1 += bad;
            }
            t.accepted += s.accepted;
            for (a, b) in t.rejected.iter_mut().zip(s.rejected) {
                *a += b;
            }
            t.sent += s.sent;
            t.deferred += s.deferred;
            t.bounced += s.bounced;
            t.queue += s.queue;
            t.spool_bytes += s.spool_bytes;
            t.oldest_arrival_unix_micros =
                match (t.oldest_arrival_unix_micros, s.oldest_arrival_unix_micros) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            t.accept_latency.merge(&s.accept_latency);
            t.sync_latency.merge(&s.sync_latency);
            t.commit.merge(&s.commit);
            t.draining |= s.draining;
            for k in 0..2 {
                for o in 0..2 {
                    t.user_rate[k][o] += s.user_rate[k][o];
                }
            }
            for (a, b) in t.dkim_signed.iter_mut().zip(s.dkim_signed) {
                *a += b;
            }
            for (k, n) in &s.milter {
                *t.milter.entry(k.clone()).or_insert(0) += n;
            }
            for (k, n) in &s.milter_conns {
                *t.milter_conns.entry(k.clone()).or_insert(0) += n;
            }
        }
        t.accepting = !all.is_empty() && all.iter().all(|s| s.accepting);
        t
    }
}
