//! cluster: the vocabulary between the shards' anvils and the Redis counting thread
//! (`[cluster] redis`), and the Redis key names.
//!
//! Owns: [`Op`] (what a shard reports: a failed AUTH, a message or recipient a login
//! sent), [`News`] (what the Redis thread hands back to every shard: a block or an
//! over-rate login, set by any node), [`Link`] (a shard's non-blocking handle on the
//! thread's queue), [`Status`] (the thread's state for metrics and `tern ctl status`), the
//! key naming and escaping ([`escape_login`], [`Keys`]) and the batching of queued
//! operations into one pipeline ([`Batch`]).
//!
//! Must never: block or wait (a full queue drops the operation: counting is a defence,
//! not an account), name a shard or a runtime type, or put client text into a Redis key
//! unescaped. The thread itself is `cluster::redis`.

pub mod redis;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sha2::Digest;

/// Which per-login rate a count is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UserCount {
    Message,
    Recipient,
}

impl UserCount {
    fn tag(self) -> &'static str {
        match self {
            UserCount::Message => "msg",
            UserCount::Recipient => "rcpt",
        }
    }
}

/// What a shard reports to the Redis thread (one-way).
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// A failed AUTH from `ip`, trying `login` (escaped, see [`escape_login`]) if known.
    AuthFailure { ip: IpAddr, login: Option<Arc<str>> },
    /// `login` (escaped) sent one more message or recipient; its limit is `limit` per
    /// `per` (the login's own rate or the global one).
    UserSent {
        login: Arc<str>,
        what: UserCount,
        limit: u32,
        per: Duration,
    },
}

/// What a cluster-wide decision is about (logins escaped).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Subject {
    Ip(IpAddr),
    Login(Arc<str>),
    /// A login over its message or recipient rate.
    Over(UserCount, Arc<str>),
}

impl Subject {
    /// The member of the `tern:blocks` sorted set.
    pub fn member(&self) -> String {
        match self {
            Subject::Ip(ip) => format!("ip:{ip}"),
            Subject::Login(l) => format!("login:{l}"),
            Subject::Over(w, l) => format!("{}:{l}", w.tag()),
        }
    }

    /// The inverse of [`Subject::member`]; None for anything else (a foreign member).
    pub fn parse(member: &str) -> Option<Subject> {
        let (tag, rest) = member.split_once(':')?;
        if rest.is_empty() {
            return None;
        }
        Some(match tag {
            "ip" => Subject::Ip(rest.parse().ok()?),
            "login" => Subject::Login(rest.into()),
            "msg" => Subject::Over(UserCount::Message, rest.into()),
            "rcpt" => Subject::Over(UserCount::Recipient, rest.into()),
            _ => return None,
        })
    }
}

/// A cluster-wide decision, handed to every shard: `subject` is blocked (or over its
/// rate) for `remaining` from receipt.
#[derive(Debug, Clone, PartialEq)]
pub struct News {
    pub subject: Subject,
    pub remaining: Duration,
}

/// Longest escaped login kept readable; longer ones are hashed (keys stay short).
const MAX_ESCAPED: usize = 128;

/// A login as it appears in a Redis key or member: bytes outside `[A-Za-z0-9._@+-]` as
/// `%XX`, so no login can contain the `:` that separates key parts, a space, a newline or
/// a glob character; a login whose escaped form is over 128 bytes becomes `#` and the
/// first 32 hex digits of its SHA-256. Injective (distinct logins, distinct keys), as
/// `%` and `#` never stand for themselves.
pub fn escape_login(login: &str) -> String {
    let mut out = String::with_capacity(login.len());
    for b in login.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'@' | b'+' | b'-') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
        if out.len() > MAX_ESCAPED {
            break;
        }
    }
    if out.len() > MAX_ESCAPED {
        let d = sha2::Sha256::digest(login.as_bytes());
        out.clear();
        out.push('#');
        for b in &d[..16] {
            let _ = write!(out, "{b:02x}");
        }
    }
    out
}

/// The readable form of an escaped login (for `tern ctl limits`): `%XX` decoded; a hashed
/// one stays as it is.
pub fn unescape_login(esc: &str) -> String {
    if esc.starts_with('#') {
        return esc.to_string();
    }
    let b = esc.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The Redis key names, all under `tern:` so a shared Redis can hold other things.
pub struct Keys;

impl Keys {
    /// The sorted set of cluster-wide blocks and over-rate logins: member
    /// [`Subject::member`], score the Unix time in ms it ends.
    pub const BLOCKS: &'static str = "tern:blocks";

    pub fn authfail_ip(ip: IpAddr) -> String {
        format!("tern:authfail:ip:{ip}")
    }
    pub fn authfail_login(esc: &str) -> String {
        format!("tern:authfail:login:{esc}")
    }
    pub fn rate(what: UserCount, esc: &str) -> String {
        format!("tern:rate:{}:{esc}", what.tag())
    }
}

/// One counter of a batch: a key, how much to add, the window it expires after, the
/// limit at which its subject is blocked for `block` (a login's rate: the rest of the
/// window, read back with PTTL).
#[derive(Debug, Clone, PartialEq)]
pub struct Counter {
    pub key: String,
    pub add: u64,
    pub window: Duration,
    pub limit: u64,
    pub subject: Subject,
    /// None: blocked for the rest of the counter's window.
    pub block: Option<Duration>,
}

/// The AUTH-failure settings the thread counts with.
#[derive(Debug, Clone, Copy)]
pub struct FailureLimits {
    pub ip_limit: u32,
    /// 0: failures per login are counted but never block.
    pub login_limit: u32,
    pub window: Duration,
    pub block: Duration,
}

/// All operations queued since the last round trip, merged: one counter per key (its
/// increments summed), in first-seen order. One pipeline carries them all.
#[derive(Debug, Default)]
pub struct Batch {
    pub counters: Vec<Counter>,
    index: HashMap<String, usize>,
}

impl Batch {
    pub fn add(&mut self, op: Op, limits: &FailureLimits) {
        match op {
            Op::AuthFailure { ip, login } => {
                self.count(Counter {
                    key: Keys::authfail_ip(ip),
                    add: 1,
                    window: limits.window,
                    limit: u64::from(limits.ip_limit),
                    subject: Subject::Ip(ip),
                    block: Some(limits.block),
                });
                if let Some(l) = login {
                    self.count(Counter {
                        key: Keys::authfail_login(&l),
                        add: 1,
                        window: limits.window,
                        limit: if limits.login_limit == 0 {
                            u64::MAX
                        } else {
                            u64::from(limits.login_limit)
                        },
                        subject: Subject::Login(l),
                        block: Some(limits.block),
                    });
                }
            }
            Op::UserSent {
                login,
                what,
                limit,
                per,
            } => self.count(Counter {
                key: Keys::rate(what, &login),
                add: 1,
                window: per,
                limit: u64::from(limit),
                subject: Subject::Over(what, login),
                block: None,
            }),
        }
    }

    fn count(&mut self, c: Counter) {
        match self.index.get(&c.key) {
            Some(&i) => self.counters[i].add += c.add,
            None => {
                self.index.insert(c.key.clone(), self.counters.len());
                self.counters.push(c);
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.counters.is_empty()
    }

    pub fn len(&self) -> usize {
        self.counters.len()
    }
}

/// The thread's state, read by the metrics endpoint and `tern ctl status`.
#[derive(Debug)]
pub struct Status {
    /// The URL with any password replaced (`config::redact_url`).
    pub url: String,
    pub up: AtomicBool,
    /// Outages: times the node went from Redis to local counting.
    pub fallbacks: AtomicU64,
    /// Pipelines sent (one round trip each).
    pub round_trips: AtomicU64,
    /// Operations counted in Redis (failed AUTHs, messages, recipients).
    pub ops: AtomicU64,
    /// Operations dropped: queue full, or Redis down (counted locally only).
    pub dropped: AtomicU64,
}

impl Status {
    pub fn new(url: String) -> Status {
        Status {
            url,
            up: AtomicBool::new(false),
            fallbacks: AtomicU64::new(0),
            round_trips: AtomicU64::new(0),
            ops: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Prometheus text for the cluster series.
    pub fn render(&self) -> String {
        let g = |o: &AtomicU64| o.load(Ordering::Relaxed);
        format!(
            "# HELP tern_cluster_redis_up 1 while this node counts through Redis ([cluster] redis), 0 while it falls back to local counting.\n\
             # TYPE tern_cluster_redis_up gauge\ntern_cluster_redis_up {}\n\
             # HELP tern_cluster_redis_fallback_total Times this node lost Redis and fell back to local counting.\n\
             # TYPE tern_cluster_redis_fallback_total counter\ntern_cluster_redis_fallback_total {}\n\
             # HELP tern_cluster_redis_round_trips_total Pipelines sent to Redis (one round trip each).\n\
             # TYPE tern_cluster_redis_round_trips_total counter\ntern_cluster_redis_round_trips_total {}\n\
             # HELP tern_cluster_redis_ops_total Failed AUTHs, messages and recipients counted in Redis.\n\
             # TYPE tern_cluster_redis_ops_total counter\ntern_cluster_redis_ops_total {}\n\
             # HELP tern_cluster_redis_dropped_total Operations counted only locally (queue full or Redis down).\n\
             # TYPE tern_cluster_redis_dropped_total counter\ntern_cluster_redis_dropped_total {}\n",
            u8::from(self.is_up()),
            g(&self.fallbacks),
            g(&self.round_trips),
            g(&self.ops),
            g(&self.dropped),
        )
    }
}

/// A shard's handle on the Redis thread's queue. Sending never waits.
#[derive(Clone, Debug)]
pub struct Link {
    tx: crossbeam::channel::Sender<Op>,
    status: Arc<Status>,
}

impl Link {
    pub fn new(tx: crossbeam::channel::Sender<Op>, status: Arc<Status>) -> Link {
        Link { tx, status }
    }

    /// Queues `op`; while Redis is down, or the queue is full, it is dropped (the local
    /// anvil counted it already).
    pub fn send(&self, op: Op) {
        if !self.status.is_up() || self.tx.try_send(op).is_err() {
            self.status.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logins_escape_injectively_and_without_separators() {
        assert_eq!(escape_login("alice@example.org"), "alice@example.org");
        assert_eq!(escape_login("a:b"), "a%3Ab");
        assert_eq!(escape_login("a b\r\n*"), "a%20b%0D%0A%2A");
        assert_eq!(escape_login("%3A"), "%253A");
        assert_ne!(escape_login("a:b"), escape_login("a%3Ab"));
        assert_eq!(escape_login("é"), "%C3%A9");
        for l in ["a:b", "x y", "%41", "é@x", "tern:blocks"] {
            let e = escape_login(l);
            assert!(!e.contains(':') && !e.contains(' '), "{e}");
            assert_eq!(unescape_login(&e), l);
        }
        // Long logins are hashed: short keys, still distinct.
        let long = "x".repeat(500);
        let e = escape_login(&long);
        assert!(e.starts_with('#') && e.len() == 33, "{e}");
        assert_ne!(e, escape_login(&"x".repeat(501)));
        assert_eq!(escape_login(&"y".repeat(128)).len(), 128);
    }

    #[test]
    fn key_names_are_namespaced() {
        let ip: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(Keys::authfail_ip(ip), "tern:authfail:ip:2001:db8::1");
        assert_eq!(
            Keys::authfail_login(&escape_login("a:b")),
            "tern:authfail:login:a%3Ab"
        );
        assert_eq!(
            Keys::rate(UserCount::Recipient, "bob"),
            "tern:rate:rcpt:bob"
        );
        for s in [
            Subject::Ip(ip),
            Subject::Login("a%3Ab".into()),
            Subject::Over(UserCount::Message, "bob".into()),
            Subject::Over(UserCount::Recipient, "#00ff".into()),
        ] {
            assert_eq!(Subject::parse(&s.member()), Some(s));
        }
        assert_eq!(Subject::parse("other:x"), None);
        assert_eq!(Subject::parse("ip:not-an-ip"), None);
        assert_eq!(Subject::parse("login:"), None);
    }

    #[test]
    fn a_batch_merges_increments_per_key() {
        let limits = FailureLimits {
            ip_limit: 10,
            login_limit: 0,
            window: Duration::from_secs(600),
            block: Duration::from_secs(900),
        };
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        let mut b = Batch::default();
        for _ in 0..3 {
            b.add(
                Op::AuthFailure {
                    ip,
                    login: Some("bob".into()),
                },
                &limits,
            );
        }
        b.add(
            Op::AuthFailure {
                ip: other,
                login: None,
            },
            &limits,
        );
        for _ in 0..5 {
            b.add(
                Op::UserSent {
                    login: "bob".into(),
                    what: UserCount::Recipient,
                    limit: 100,
                    per: Duration::from_secs(60),
                },
                &limits,
            );
        }
        let keys: Vec<(&str, u64)> = b.counters.iter().map(|c| (c.key.as_str(), c.add)).collect();
        assert_eq!(
            keys,
            [
                ("tern:authfail:ip:192.0.2.1", 3),
                ("tern:authfail:login:bob", 3),
                ("tern:authfail:ip:192.0.2.2", 1),
                ("tern:rate:rcpt:bob", 5),
            ]
        );
        // login_limit 0: counted, never blocks.
        assert_eq!(b.counters[1].limit, u64::MAX);
        assert_eq!(b.counters[3].window, Duration::from_secs(60));
        assert_eq!(b.counters[3].block, None);
    }
}
