//! Milter filters (sendmail's content-filter protocol, version 6) run on the shard, on
//! each accepted message, before it is signed, committed and acknowledged.
//!
//! Owns: the `[milter]` configuration (filters, default actions, sendmail-style
//! timeouts, listener roles), the shard's connections to each filter (sockets on the
//! shard's executor like any other; one per session at a time, taken at the session's
//! CONNECT from the shard's pool of idle negotiated connections or opened, used for the
//! session's messages with `SMFIC_ABORT` between them when a conversation was cut short,
//! and given back at the session's end), the conversation itself (the protocol is
//! `tern_milter`; this module does the I/O and the timers), and the application of the
//! filters' verdicts and edits to the message.
//!
//! The conversation follows the session: CONNECT before the banner, HELO, MAIL and RCPT
//! before the session answers them (`tern_smtp::session::Event::Check`: a refusal is the
//! reply to that very command; only when some filter took one of those stages in its
//! negotiation, else the session answers them itself at no cost), then at end of data DATA, the header fields, EOH, the
//! body in chunks of at most 65535 bytes taken from the message's own slices, and
//! end-of-message. A stage the filter declined in negotiation is not sent; one it said it
//! will not answer is not waited for. Several filters run in order (sendmail's
//! `INPUT_MAIL_FILTER` list), each seeing the message as the filters before it left it.
//! A filter that accepts a message is not asked about it again; one that accepts (or
//! refuses) at CONNECT/HELO has decided for the whole session.
//!
//! The pool (per shard, per filter, `pool_idle` deep; an `Rc`/`RefCell` of the shard's,
//! no lock, no other thread): a session's connection goes back to it with
//! `SMFIC_QUIT_NC` ("quit, a new connection follows": the filter runs its close callback
//! and expects the next CONNECT, negotiation being per connection) only where the filter
//! is known to take that packet. libmilter takes QUIT_NC only after an end-of-message it
//! answered "continue", or after an unknown command; anywhere else it silently ignores
//! QUIT_NC and the CONNECT after it, which would then never be answered. So a connection
//! is kept when its last message ended in "continue", or when the filter negotiated
//! `SMFIP_NR_UNKN` without `SMFIP_NOUNKNOWN` (rspamd does), in which case an unanswered
//! `SMFIC_UNKNOWN` takes it there first. Everything else (an accept or refusal at
//! end-of-message from OpenDKIM and most libmilter filters, a session that ended
//! mid-conversation, any failure) closes the connection with its session, Postfix's
//! model. Postfix and sendmail never send QUIT_NC. A pooled connection the filter closed
//! while idle is noticed when taken, on TCP and unix sockets (`closed_while_idle`), and a
//! fresh one opened; one that dies after the take fails on its first exchange: up to MAIL
//! the stage is retried once on a fresh connection and the filter's other idle
//! connections are dropped. A reload that removes or moves a filter drops its idle
//! connections.
//!
//! Must never: hold a connection across threads or behind a lock (everything is the
//! shard's), wait without a timer, let a filter's text reach the client or a header
//! unescaped (see `tern_milter`), or answer a message twice: a filter that fails (refused
//! connection, garbage, timeout, death mid-message) gets its `default_action` exactly once
//! and its connection is dropped.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_lite::future;
use futures_lite::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use glommio::timer::Timer;
use serde::{Deserialize, Serialize};
use tern_milter::codec::{self, act, cmd};
use tern_milter::edit;
use tern_milter::{FilterReply, Negotiated, Response, Stage};
use tern_smtp::envelope::Recipient;
use tern_smtp::session::{ListenerKind, Message};

/// What a filter's failure (unreachable, timeout, protocol error) means for the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DefaultAction {
    /// 451 4.7.1: the client tries again later (nothing unfiltered gets through).
    Tempfail,
    /// Go on without this filter.
    Accept,
}

/// `[milter]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MilterConfig {
    /// Off: no filter runs (the filters stay configured).
    pub enable: bool,
    /// Default for every filter: what happens when it fails.
    pub default_action: DefaultAction,
    /// Default per-stage timeouts, sendmail's `T=` syntax: `C` connect, `S` each send,
    /// `R` each reply, `E` the end-of-message reply (e.g. "C:30s;S:10s;R:30s;E:5m").
    pub timeouts: String,
    /// Default listener roles filtered ("smtp", "submission", "smtps").
    pub listeners: Vec<String>,
    /// The filters, run in this order.
    pub filters: Vec<FilterConfig>,
    /// Default for every filter: how many idle, negotiated connections each shard keeps
    /// to it for the next SMTP sessions (0: one connection per session, closed with it).
    pub pool_idle: usize,
}

impl Default for MilterConfig {
    fn default() -> Self {
        MilterConfig {
            enable: true,
            default_action: DefaultAction::Tempfail,
            timeouts: DEFAULT_TIMEOUTS.into(),
            listeners: vec!["smtp".into(), "submission".into(), "smtps".into()],
            filters: Vec::new(),
            pool_idle: DEFAULT_POOL_IDLE,
        }
    }
}

/// Idle connections a shard keeps per filter. A shard serves its sessions one stage at a
/// time, so the connections in use at once are the shard's concurrent sessions; the idle
/// ones are what is left when a burst ends. 16 per shard covers the usual concurrency of
/// an edge relay without holding hundreds of filter-side threads (libmilter runs one per
/// connection) open for nothing.
pub const DEFAULT_POOL_IDLE: usize = 16;

/// sendmail's defaults are C:5m;S:10s;R:10s;E:5m; Postfix's are 30s/30s/300s. A filter
/// that cannot be reached within 30 s is better given up on while the client waits.
pub const DEFAULT_TIMEOUTS: &str = "C:30s;S:10s;R:30s;E:5m";

/// One `[[milter.filters]]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    /// A name for logs and metrics (default: the socket).
    #[serde(default)]
    pub name: Option<String>,
    /// `inet:host:port` (also `inet:port@host`, `inet6:[addr]:port`) or `unix:/path`.
    pub socket: String,
    #[serde(default)]
    pub default_action: Option<DefaultAction>,
    #[serde(default)]
    pub timeouts: Option<String>,
    #[serde(default)]
    pub listeners: Option<Vec<String>>,
    /// Off: this filter is skipped.
    #[serde(default = "yes")]
    pub enable: bool,
    /// Overrides `[milter].pool_idle` for this filter.
    #[serde(default)]
    pub pool_idle: Option<usize>,
}

fn yes() -> bool {
    true
}

/// Where a filter listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Inet(SocketAddr),
    Unix(PathBuf),
}

/// Per-stage timeouts (sendmail's `T=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Duration,
    pub send: Duration,
    pub reply: Duration,
    pub eom: Duration,
}

impl Timeouts {
    /// Parses "C:5s;S:10s;R:10s;E:5m" (any subset, over `base`; sendmail's bare numbers
    /// are seconds).
    pub fn parse(s: &str, base: Timeouts) -> Result<Timeouts, String> {
        let mut t = base;
        for part in s.split([';', ',']).map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once(':')
                .ok_or_else(|| format!("timeouts: {part:?} is not KEY:DURATION"))?;
            let v = v.trim();
            let d = if v.bytes().all(|b| b.is_ascii_digit()) {
                Duration::from_secs(v.parse().map_err(|e| format!("timeouts: {v:?}: {e}"))?)
            } else {
                humantime::parse_duration(v).map_err(|e| format!("timeouts: {v:?}: {e}"))?
            };
            if d.is_zero() {
                return Err(format!("timeouts: {part:?} must be above zero"));
            }
            match k.trim() {
                "C" => t.connect = d,
                "S" => t.send = d,
                "R" => t.reply = d,
                "E" => t.eom = d,
                other => return Err(format!("timeouts: unknown key {other:?} (C, S, R or E)")),
            }
        }
        Ok(t)
    }
}

/// One filter, checked and resolved at configuration load.
#[derive(Debug, Clone)]
pub struct Filter {
    pub name: Rc<str>,
    pub endpoint: Endpoint,
    pub default_action: DefaultAction,
    pub timeouts: Timeouts,
    /// Indexed by `role_index`.
    pub roles: [bool; 3],
    /// Idle connections kept per shard.
    pub pool_idle: usize,
}

// Rc<str> in an Arc-shared list: the list is built once and then only read; each shard
// gets its own copy (`Filters::for_shard`).
/// The configured filters, in order.
#[derive(Debug, Clone, Default)]
pub struct Filters {
    pub list: Vec<FilterSpec>,
}

/// A filter as the configuration load produced it (Send: it crosses to the shards).
#[derive(Debug, Clone)]
pub struct FilterSpec {
    pub name: String,
    pub endpoint: Endpoint,
    pub default_action: DefaultAction,
    pub timeouts: Timeouts,
    pub roles: [bool; 3],
    pub pool_idle: usize,
}

fn role_index(kind: ListenerKind) -> usize {
    match kind {
        ListenerKind::Smtp => 0,
        ListenerKind::Submission => 1,
        ListenerKind::Smtps => 2,
    }
}

fn roles(list: &[String]) -> Result<[bool; 3], String> {
    let mut r = [false; 3];
    for l in list {
        match l.as_str() {
            "smtp" => r[0] = true,
            "submission" => r[1] = true,
            "smtps" => r[2] = true,
            other => {
                return Err(format!(
                    "listeners: unknown role {other:?} (smtp, submission or smtps)"
                ))
            }
        }
    }
    Ok(r)
}

/// Parses `inet:host:port`, `inet:port@host`, `inet6:[addr]:port`, `unix:/path` (also
/// sendmail's `local:`). Host names are resolved once, here.
pub fn parse_socket(s: &str) -> Result<Endpoint, String> {
    let bad = |why: &str| format!("socket {s:?}: {why} (inet:host:port or unix:/path)");
    let (kind, rest) = s.split_once(':').ok_or_else(|| bad("no type"))?;
    match kind {
        "unix" | "local" => {
            let p = PathBuf::from(rest);
            if !p.is_absolute() {
                return Err(bad("the path must be absolute"));
            }
            Ok(Endpoint::Unix(p))
        }
        "inet" | "inet6" => {
            let (host, port) = if let Some((port, host)) = rest.split_once('@') {
                (host.to_string(), port)
            } else {
                let (h, p) = rest.rsplit_once(':').ok_or_else(|| bad("no port"))?;
                (
                    h.trim_start_matches('[').trim_end_matches(']').to_string(),
                    p,
                )
            };
            let port: u16 = port.parse().map_err(|_| bad("bad port"))?;
            if port == 0 {
                return Err(bad("port 0"));
            }
            if let Ok(ip) = host.parse::<std::net::IpAddr>() {
                return Ok(Endpoint::Inet(SocketAddr::new(ip, port)));
            }
            use std::net::ToSocketAddrs;
            (host.as_str(), port)
                .to_socket_addrs()
                .map_err(|e| bad(&format!("cannot resolve {host:?}: {e}")))?
                .next()
                .map(Endpoint::Inet)
                .ok_or_else(|| bad("host has no address"))
        }
        _ => Err(bad("unknown type")),
    }
}

impl Filters {
    /// Checks `[milter]` and resolves its sockets (configuration load, check-config,
    /// reload: a bad entry fails the whole load).
    pub fn load(cfg: &MilterConfig) -> Result<Filters, String> {
        let base = Timeouts::parse(
            DEFAULT_TIMEOUTS,
            Timeouts {
                connect: Duration::ZERO,
                send: Duration::ZERO,
                reply: Duration::ZERO,
                eom: Duration::ZERO,
            },
        )?;
        let timeouts = Timeouts::parse(&cfg.timeouts, base).map_err(|e| format!("milter.{e}"))?;
        let default_roles = roles(&cfg.listeners).map_err(|e| format!("milter.{e}"))?;
        let mut list = Vec::new();
        let mut names = std::collections::HashSet::new();
        for (i, f) in cfg.filters.iter().enumerate() {
            let at = format!("milter.filters[{i}]");
            let endpoint = parse_socket(&f.socket).map_err(|e| format!("{at}: {e}"))?;
            let name = f.name.clone().unwrap_or_else(|| f.socket.clone());
            if name.is_empty() || name.chars().any(|c| c.is_control() || c == '"') {
                return Err(format!("{at}: name {name:?} must be printable, no quotes"));
            }
            if !names.insert(name.clone()) {
                return Err(format!("{at}: duplicate filter name {name:?}"));
            }
            let t = match &f.timeouts {
                Some(s) => Timeouts::parse(s, timeouts).map_err(|e| format!("{at}.{e}"))?,
                None => timeouts,
            };
            let r = match &f.listeners {
                Some(l) => roles(l).map_err(|e| format!("{at}.{e}"))?,
                None => default_roles,
            };
            if !cfg.enable || !f.enable {
                continue;
            }
            list.push(FilterSpec {
                name,
                endpoint,
                default_action: f.default_action.unwrap_or(cfg.default_action),
                timeouts: t,
                roles: r,
                pool_idle: f.pool_idle.unwrap_or(cfg.pool_idle),
            });
        }
        Ok(Filters { list })
    }

    /// The shard's own copy (Rc names, never shared across threads).
    fn for_shard(&self) -> Rc<[Filter]> {
        self.list
            .iter()
            .map(|f| Filter {
                name: f.name.as_str().into(),
                endpoint: f.endpoint.clone(),
                default_action: f.default_action,
                timeouts: f.timeouts,
                roles: f.roles,
                pool_idle: f.pool_idle,
            })
            .collect()
    }
}

/// The shard's filters (replaced whole on reload), its idle connections to them and its
/// per-filter action counts.
pub struct ShardMilters {
    filters: RefCell<Rc<[Filter]>>,
    counts: Counts,
    /// Idle connections per filter name, each negotiated and left by its last session in
    /// a state where `SMFIC_QUIT_NC` is valid (see `Conn::reusable`). Only this shard's
    /// sessions touch them, one at a time: a `RefCell`, never a lock.
    pools: RefCell<HashMap<Rc<str>, Pool>>,
    /// Connections per (filter, "opened" | "reused").
    conn_counts: Counts,
}

/// One filter's idle connections on one shard.
struct Pool {
    /// Where they lead: a reload that moves the filter drops them.
    endpoint: Endpoint,
    idle: Vec<Conn>,
}

impl ShardMilters {
    pub fn new(f: &Filters) -> ShardMilters {
        ShardMilters {
            filters: RefCell::new(f.for_shard()),
            counts: RefCell::new(BTreeMap::new()),
            pools: RefCell::new(HashMap::new()),
            conn_counts: RefCell::new(BTreeMap::new()),
        }
    }

    /// A reloaded configuration: sessions that start from now on use these filters. The
    /// idle connections of a filter that is gone or now listens elsewhere are closed;
    /// those of an unchanged filter stay (negotiation is per connection, and a changed
    /// timeout or role does not change what the filter negotiated).
    pub fn set(&self, f: &Filters) {
        let new = f.for_shard();
        self.pools
            .borrow_mut()
            .retain(|name, pool| match new.iter().find(|f| f.name == *name) {
                Some(f) if f.endpoint == pool.endpoint => {
                    pool.idle.truncate(f.pool_idle);
                    true
                }
                _ => false,
            });
        *self.filters.borrow_mut() = new;
    }

    /// An idle connection to `f`, if the shard has one.
    fn take(&self, f: &Filter) -> Option<Conn> {
        let mut pools = self.pools.borrow_mut();
        let pool = pools.get_mut(&f.name)?;
        if pool.endpoint != f.endpoint {
            // The session started before a reload moved the filter.
            return None;
        }
        while let Some(mut c) = pool.idle.pop() {
            if c.closed_while_idle() {
                continue;
            }
            c.proven = false;
            return Some(c);
        }
        None
    }

    /// A session is done with `c`: kept for the next session if it may be reused, the
    /// filter is still configured there and the pool has room; closed otherwise.
    fn give(&self, f: &Filter, mut c: Conn) {
        // Elsewhere than libmilter's end-of-message state, an `SMFIC_UNKNOWN` takes it to
        // its "unknown command" state, from which QUIT_NC is valid too (from every state:
        // mid-message, libmilter first falls back to HELO and runs the filter's abort
        // callback). Only for a filter that takes that packet and does not answer it (it
        // negotiated SMFIP_NR_UNKN and not SMFIP_NOUNKNOWN, as rspamd does): free, and
        // within what it asked for. Others (OpenDKIM, most libmilter filters) are reused
        // only after a message they answered with "continue".
        let bridge = !c.reusable && c.neg.takes_unknown_silently();
        if (!c.reusable && !bridge) || !c.rbuf.is_empty() {
            return;
        }
        let filters = self.filters.borrow();
        let Some(now) = filters
            .iter()
            .find(|x| x.name == f.name && x.endpoint == f.endpoint)
        else {
            return;
        };
        let mut pools = self.pools.borrow_mut();
        let pool = pools.entry(f.name.clone()).or_insert_with(|| Pool {
            endpoint: f.endpoint.clone(),
            idle: Vec::new(),
        });
        if pool.endpoint != f.endpoint || pool.idle.len() >= now.pool_idle {
            return;
        }
        // SMFIC_QUIT_NC: "this SMTP session is over, a new one follows on this
        // connection" (the filter runs its close callback and expects CONNECT next, with
        // no new negotiation). Queued, not sent: it goes out in the same write as the next
        // session's CONNECT, so the QUIT_NC costs no write of its own (on TCP the take
        // checks the idle socket with one recv(MSG_PEEK); see `closed_while_idle`).
        c.out.clear();
        if bridge {
            if std::mem::take(&mut c.in_message) {
                // The abandoned message: the filter's abort callback, as before a MAIL.
                codec::bare(&mut c.out, cmd::ABORT);
            }
            codec::unknown(&mut c.out, "QUIT");
        }
        codec::bare(&mut c.out, cmd::QUIT_NC);
        c.reusable = false;
        pool.idle.push(c);
    }

    /// Every idle connection to `name` is suspect (one of them was found dead).
    fn drop_pool(&self, name: &str) {
        self.pools.borrow_mut().remove(name);
    }

    /// The filters a new session on a `kind` listener runs; None (nothing allocated, no
    /// cost at all) when there are none.
    pub fn session(&self, kind: ListenerKind, hostname: &str) -> Option<MilterSession> {
        let all = self.filters.borrow();
        let i = role_index(kind);
        let list: Vec<Filter> = all.iter().filter(|f| f.roles[i]).cloned().collect();
        if list.is_empty() {
            return None;
        }
        let n = list.len();
        Some(MilterSession {
            filters: list,
            state: (0..n).map(|_| FilterState::default()).collect(),
            tls: None,
            hostname: hostname.to_string(),
            daemon: kind.name(),
            peer: None,
            helo: None,
            queue_id: None,
        })
    }

    fn count(&self, filter: &Rc<str>, action: &'static str) {
        bump(&self.counts, filter, action);
    }

    /// (filter, "opened" | "reused", count) for the metrics scrape.
    pub fn conn_counts(&self) -> Vec<(String, String, u64)> {
        snapshot(&self.conn_counts)
    }

    fn count_conn(&self, filter: &Rc<str>, how: &'static str) {
        bump(&self.conn_counts, filter, how);
    }

    /// (filter, action, count) for the metrics scrape.
    pub fn counts(&self) -> Vec<(String, String, u64)> {
        snapshot(&self.counts)
    }
}

/// A shard's counters per (filter, label).
type Counts = RefCell<BTreeMap<(Rc<str>, &'static str), u64>>;

fn bump(counts: &Counts, filter: &Rc<str>, label: &'static str) {
    *counts
        .borrow_mut()
        .entry((filter.clone(), label))
        .or_insert(0) += 1;
}

fn snapshot(counts: &Counts) -> Vec<(String, String, u64)> {
    counts
        .borrow()
        .iter()
        .map(|((f, l), n)| (f.to_string(), l.to_string(), *n))
        .collect()
}

/// A socket to a filter.
enum Stream {
    Tcp(glommio::net::TcpStream),
    /// With the descriptor the stream owns (glommio's `UnixStream` does not expose it;
    /// `closed_while_idle` needs it). Valid exactly as long as the stream: same variant,
    /// never used after it is dropped.
    Unix(glommio::net::UnixStream, RawFd),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut [u8],
    ) -> std::task::Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s, _) => std::pin::Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s, _) => std::pin::Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => std::pin::Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Unix(s, _) => std::pin::Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => std::pin::Pin::new(s).poll_flush(cx),
            Stream::Unix(s, _) => std::pin::Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_close(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => std::pin::Pin::new(s).poll_close(cx),
            Stream::Unix(s, _) => std::pin::Pin::new(s).poll_close(cx),
        }
    }
}

/// One open conversation with a filter.
struct Conn {
    io: Stream,
    neg: Negotiated,
    rbuf: BytesMut,
    out: BytesMut,
    /// A message conversation is open (MAIL sent, end-of-message not answered):
    /// SMFIC_ABORT before the next MAIL.
    in_message: bool,
    /// The filter is where libmilter accepts `SMFIC_QUIT_NC`: its last command was
    /// end-of-message, answered "continue" (libmilter's ST_ENDM). libmilter takes
    /// QUIT_NC only there (or after an unknown command): after an accept or a refusal it
    /// falls back to its HELO state, where it silently ignores QUIT_NC and then the next
    /// CONNECT, which would never be answered. Any other state: the connection is closed
    /// with its session.
    reusable: bool,
    /// A response was read on it in this session (a pooled connection that fails before
    /// that was probably closed by the filter while idle: retried on a fresh one).
    proven: bool,
}

/// A filter's decision on a stage, a message or the whole session.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    Continue,
    Accept,
    Discard,
    Reply(FilterReply),
}

/// Why a conversation failed (the filter's default action follows).
#[derive(Debug)]
enum Failure {
    Io(io::Error),
    Timeout(&'static str),
    Protocol(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Io(e) => write!(f, "{e}"),
            Failure::Timeout(what) => write!(f, "timed out {what}"),
            Failure::Protocol(e) => write!(f, "protocol error: {e}"),
        }
    }
}

/// What the filters decided about a message.
#[derive(Debug)]
pub enum Outcome {
    /// Store it (edited in place); `held`: a filter quarantined it, with this reason.
    Store { held: Option<String> },
    /// Answer 2xx and drop it (a filter's discard, or no recipient left).
    Discard { filter: String },
    /// Answer this 4xx/5xx.
    Refuse(FilterReply),
}

/// The TLS facts of a session (`{tls_version}`, `{cipher}`).
#[derive(Debug, Clone)]
pub struct TlsInfo {
    pub version: String,
    pub cipher: String,
}

/// Where one filter stands in this session.
#[derive(Default)]
struct FilterState {
    conn: Option<Conn>,
    /// `conn` came from the shard's pool and has not answered anything yet.
    pooled: bool,
    /// The filter decided for the whole session (accept: never asked again; discard or
    /// a reply: every message gets it), or failed (its default action, sticky).
    session: Option<Verdict>,
    /// The filter accepted (or discarded) the current message: not asked again until
    /// the next MAIL.
    message: Option<Verdict>,
}

/// One SMTP session's filters and its connections to them.
pub struct MilterSession {
    filters: Vec<Filter>,
    state: Vec<FilterState>,
    tls: Option<TlsInfo>,
    /// `j`: this host's name.
    hostname: String,
    /// `{daemon_name}`: the listener role.
    daemon: &'static str,
    /// The client (the real one behind a PROXY header).
    peer: Option<SocketAddr>,
    /// The HELO name the filters were told.
    helo: Option<String>,
    /// The queue id the current message will have (macro `i` from MAIL on).
    queue_id: Option<tern_queue::MsgId>,
}

fn tempfail() -> FilterReply {
    FilterReply {
        code: 451,
        enhanced: "4.7.1".into(),
        text: "Service unavailable - try again later".into(),
    }
}

fn reject() -> FilterReply {
    FilterReply {
        code: 550,
        enhanced: "5.7.1".into(),
        text: "Command rejected".into(),
    }
}

/// What a stage's packets are, given the filter's negotiation (macros it wants, the
/// command if the stage is not skipped).
type Encode<'a> = &'a dyn Fn(&mut Conn);

impl MilterSession {
    /// The session's TLS (after a STARTTLS or on 465).
    pub fn set_tls(&mut self, tls: TlsInfo) {
        self.tls = Some(tls);
    }

    /// The queue id given to the current message's filters (`i`), if any.
    pub fn take_queue_id(&mut self) -> Option<tern_queue::MsgId> {
        self.queue_id.take()
    }

    /// Runs one stage over every filter still in the conversation, in order; the first
    /// refusal wins (later filters are not asked). A discard marks the message.
    async fn each(
        &mut self,
        shard: &ShardMilters,
        shard_id: usize,
        stage: Stage,
        encode: Encode<'_>,
    ) -> Option<FilterReply> {
        for i in 0..self.filters.len() {
            let f = self.filters[i].clone();
            let st = &self.state[i];
            match (&st.session, &st.message) {
                (Some(Verdict::Reply(r)), _) => return Some(r.clone()),
                (Some(_), _) | (None, Some(_)) => continue,
                (None, None) => {}
            }
            let mut r = self.step(shard, i, &f, stage, encode).await;
            // A dead idle connection fails at once (EOF, reset, broken pipe); a slow filter
            // times out, and trying it again would only double the client's wait.
            let dead = matches!(r, Err(Failure::Io(_) | Failure::Protocol(_)));
            if dead && self.retry_fresh(shard, shard_id, i, &f, stage) {
                r = self.step(shard, i, &f, stage, encode).await;
            }
            let v = match r {
                Ok(v) => v,
                Err(e) => {
                    self.state[i].conn = None;
                    shard.count(&f.name, "failed");
                    tracing::warn!(shard = shard_id, milter = %f.name, stage = stage.name(),
                        error = %e, default_action = ?f.default_action, "milter failed; default action taken");
                    let v = match f.default_action {
                        DefaultAction::Accept => Verdict::Accept,
                        DefaultAction::Tempfail => Verdict::Reply(tempfail()),
                    };
                    self.state[i].session = Some(v.clone());
                    if let Verdict::Reply(r) = v {
                        return Some(r);
                    }
                    continue;
                }
            };
            let session_wide = matches!(stage, Stage::Connect | Stage::Helo);
            match v {
                Verdict::Continue => {}
                Verdict::Accept | Verdict::Discard => {
                    shard.count(
                        &f.name,
                        if v == Verdict::Accept {
                            "accept"
                        } else {
                            "discard"
                        },
                    );
                    if session_wide {
                        self.state[i].session = Some(v);
                    } else {
                        self.state[i].message = Some(v);
                    }
                }
                Verdict::Reply(r) => {
                    shard.count(&f.name, if r.code >= 500 { "reject" } else { "tempfail" });
                    tracing::info!(shard = shard_id, milter = %f.name, stage = stage.name(),
                        code = r.code, enhanced = %r.enhanced, text = %r.text, "milter refused");
                    if session_wide {
                        self.state[i].session = Some(Verdict::Reply(r.clone()));
                    }
                    return Some(r);
                }
            }
        }
        None
    }

    /// One stage with one filter: connect (and replay CONNECT/HELO) if needed, send,
    /// wait for the verdict if the filter answers this stage.
    async fn step(
        &mut self,
        shard: &ShardMilters,
        i: usize,
        f: &Filter,
        stage: Stage,
        encode: Encode<'_>,
    ) -> Result<Verdict, Failure> {
        if self.state[i].conn.is_none() {
            let (mut c, pooled) = match shard.take(f) {
                Some(c) => (c, true),
                None => (open(f).await?, false),
            };
            shard.count_conn(&f.name, if pooled { "reused" } else { "opened" });
            self.state[i].pooled = pooled;
            // A connection opened after CONNECT (a filter added by a reload never is;
            // this is the first stage of a fresh session) starts with the session's story.
            if stage != Stage::Connect {
                self.encode_connect(&mut c);
                if let v @ (Verdict::Accept | Verdict::Discard | Verdict::Reply(_)) =
                    c.stage(Stage::Connect, f.timeouts).await?
                {
                    self.state[i].conn = Some(c);
                    return Ok(v);
                }
                if stage != Stage::Helo && self.helo.is_some() {
                    self.encode_helo(&mut c);
                    if let v @ (Verdict::Accept | Verdict::Discard | Verdict::Reply(_)) =
                        c.stage(Stage::Helo, f.timeouts).await?
                    {
                        self.state[i].conn = Some(c);
                        return Ok(v);
                    }
                }
            }
            self.state[i].conn = Some(c);
        }
        let Some(c) = self.state[i].conn.as_mut() else {
            return Err(Failure::Protocol("no connection".into()));
        };
        // Anything but a completed end-of-message leaves libmilter where QUIT_NC is
        // not valid (see `Conn::reusable`).
        c.reusable = false;
        if stage == Stage::Mail && std::mem::take(&mut c.in_message) {
            codec::bare(&mut c.out, cmd::ABORT);
        }
        if stage == Stage::Mail {
            c.in_message = true;
        }
        encode(c);
        c.stage(stage, f.timeouts).await
    }

    /// A pooled connection failed before answering anything in this session: the filter
    /// closed it while it sat idle (restart, idle timeout). Nothing was decided on it, so
    /// the stage is tried once more on a fresh connection (which replays CONNECT and
    /// HELO), and the shard's other idle connections to the filter are dropped (after a
    /// restart they are all dead). Only up to MAIL: a later stage would need the earlier
    /// unanswered ones replayed too.
    // XXX a filter that answers none of CONNECT, HELO and MAIL (every `SMFIP_NR_*`) and
    // dies between the take (which checks the idle socket) and its first answer shows
    // the dead connection only at RCPT or DATA: its default action is taken then.
    fn retry_fresh(
        &mut self,
        shard: &ShardMilters,
        shard_id: usize,
        i: usize,
        f: &Filter,
        stage: Stage,
    ) -> bool {
        let st = &mut self.state[i];
        let unproven = st.pooled && st.conn.as_ref().is_some_and(|c| !c.proven);
        if !unproven || !matches!(stage, Stage::Connect | Stage::Helo | Stage::Mail) {
            return false;
        }
        st.conn = None;
        st.pooled = false;
        shard.drop_pool(&f.name);
        tracing::debug!(shard = shard_id, milter = %f.name, stage = stage.name(),
            "idle milter connection was closed by the filter; opening a new one");
        true
    }

    /// After CONNECT, with every filter's negotiation known: must HELO, MAIL and RCPT go
    /// through the filters before the session answers them? Not when no filter still in
    /// the conversation takes any of them (an end-of-message-only filter): the session
    /// then answers them itself, pipelined batches stay whole, and the skipped stages cost
    /// nothing at all. (Nothing is lost: a filter that declined a stage gets neither its
    /// packet nor its macros; the message's queue id is chosen at end of data instead.)
    pub fn checks_commands(&self) -> bool {
        self.state.iter().any(|st| {
            st.session.is_none()
                && st.conn.as_ref().is_none_or(|c| {
                    c.neg.sends(Stage::Helo) || c.neg.sends(Stage::Mail) || c.neg.sends(Stage::Rcpt)
                })
        })
    }

    /// The session is over: each connection that may carry another session goes back to
    /// the shard's pool, the others are closed.
    pub fn finish(&mut self, shard: &ShardMilters) {
        for (f, st) in self.filters.iter().zip(&mut self.state) {
            if let Some(c) = st.conn.take() {
                shard.give(f, c);
            }
        }
    }

    fn encode_connect(&self, c: &mut Conn) {
        encode_connect(c, &self.hostname, self.daemon, self.peer);
    }

    fn encode_helo(&self, c: &mut Conn) {
        if let Some(t) = &self.tls {
            c.macros(
                Stage::Helo,
                &[
                    ("{tls_version}", t.version.as_str()),
                    ("{cipher}", t.cipher.as_str()),
                ],
            );
        }
        if c.neg.sends(Stage::Helo) {
            codec::helo(&mut c.out, self.helo.as_deref().unwrap_or(""));
        }
    }

    /// The connect stage, before the greeting. A refusal is the whole session's.
    pub async fn connect(
        &mut self,
        shard: &ShardMilters,
        shard_id: usize,
        peer: SocketAddr,
    ) -> Option<FilterReply> {
        self.peer = Some(peer);
        let (hostname, daemon) = (self.hostname.clone(), self.daemon);
        let enc = move |c: &mut Conn| encode_connect(c, &hostname, daemon, Some(peer));
        self.each(shard, shard_id, Stage::Connect, &enc).await
    }

    /// HELO/EHLO (again after STARTTLS, with the TLS macros).
    pub async fn helo(
        &mut self,
        shard: &ShardMilters,
        shard_id: usize,
        name: &str,
    ) -> Option<FilterReply> {
        self.helo = Some(name.to_string());
        let tls = self.tls.clone();
        let name = name.to_string();
        let enc = move |c: &mut Conn| {
            if let Some(t) = &tls {
                c.macros(
                    Stage::Helo,
                    &[
                        ("{tls_version}", t.version.as_str()),
                        ("{cipher}", t.cipher.as_str()),
                    ],
                );
            }
            if c.neg.sends(Stage::Helo) {
                codec::helo(&mut c.out, &name);
            }
        };
        self.each(shard, shard_id, Stage::Helo, &enc).await
    }

    /// MAIL FROM: a new message (its queue id is chosen now, for macro `i`).
    pub async fn mail(
        &mut self,
        shard: &ShardMilters,
        shard_id: usize,
        queue_id: tern_queue::MsgId,
        sender: &str,
        login: Option<(&str, &str)>,
    ) -> Option<FilterReply> {
        for st in &mut self.state {
            st.message = None;
        }
        self.queue_id = Some(queue_id);
        let id = queue_id;
        let enc = |c: &mut Conn| {
            let (authen, mech) = login.unwrap_or_default();
            let pairs = [
                ("i", id.as_str()),
                ("{mail_addr}", sender),
                ("{auth_authen}", authen),
                ("{auth_type}", mech),
            ];
            c.macros(Stage::Mail, &pairs[..if login.is_some() { 4 } else { 2 }]);
            if c.neg.sends(Stage::Mail) {
                let auth = login.map(|(a, _)| format!("AUTH=<{a}>"));
                let auth = auth.as_deref();
                codec::envelope_addr(&mut c.out, cmd::MAIL, sender, auth.as_slice());
            }
        };
        self.each(shard, shard_id, Stage::Mail, &enc).await
    }

    /// RCPT TO.
    pub async fn rcpt(
        &mut self,
        shard: &ShardMilters,
        shard_id: usize,
        addr: &str,
    ) -> Option<FilterReply> {
        let enc = |c: &mut Conn| {
            c.macros(Stage::Rcpt, &[("{rcpt_addr}", addr)]);
            if c.neg.sends(Stage::Rcpt) {
                codec::envelope_addr(&mut c.out, cmd::RCPT, addr, &[]);
            }
        };
        self.each(shard, shard_id, Stage::Rcpt, &enc).await
    }

    /// The rest of the message (DATA, header, body, end-of-message) through every filter
    /// still in it, in order, applying their edits. Each filter's failure takes its
    /// default action (once; its connection is dropped).
    pub async fn filter(
        &mut self,
        shard: &ShardMilters,
        shard_id: usize,
        msg: &mut Message,
        queue_id: &str,
    ) -> Outcome {
        let mut held: Option<String> = None;
        let mut m = edit::Message::parse(std::mem::take(&mut msg.body));
        let done = |msg: &mut Message, m: edit::Message| {
            let edited = m.edited();
            msg.body = m.into_slices();
            if edited {
                msg.envelope.size = msg.body.iter().map(|b| b.len() as u64).sum();
            }
        };
        for i in 0..self.filters.len() {
            let f = self.filters[i].clone();
            let st = &self.state[i];
            let prior = st.session.clone().or_else(|| st.message.clone());
            let verdict = match prior {
                Some(v) => v,
                None if st.conn.is_none() => {
                    // No connection and no verdict: the filter never saw this message's
                    // MAIL (cannot happen today: CONNECT opens every connection and a
                    // failure leaves a sticky verdict), so it has no say on it.
                    continue;
                }
                None => {
                    let was_held = held.is_some();
                    let r = self.message(i, &f, &mut m, msg, queue_id, &mut held).await;
                    match r {
                        Ok(v) => {
                            if !was_held && held.is_some() {
                                shard.count(&f.name, "quarantine");
                            }
                            match &v {
                                Verdict::Continue => shard.count(&f.name, "continue"),
                                Verdict::Accept => shard.count(&f.name, "accept"),
                                Verdict::Discard => shard.count(&f.name, "discard"),
                                Verdict::Reply(r) => shard.count(
                                    &f.name,
                                    if r.code >= 500 { "reject" } else { "tempfail" },
                                ),
                            }
                            v
                        }
                        Err(e) => {
                            self.state[i].conn = None;
                            shard.count(&f.name, "failed");
                            tracing::warn!(shard = shard_id, id = queue_id, milter = %f.name,
                                error = %e, default_action = ?f.default_action, "milter failed; default action taken");
                            let v = match f.default_action {
                                DefaultAction::Accept => Verdict::Accept,
                                DefaultAction::Tempfail => Verdict::Reply(tempfail()),
                            };
                            self.state[i].session = Some(v.clone());
                            v
                        }
                    }
                }
            };
            match verdict {
                Verdict::Continue | Verdict::Accept => {}
                Verdict::Discard => {
                    done(msg, m);
                    return Outcome::Discard {
                        filter: f.name.to_string(),
                    };
                }
                Verdict::Reply(r) => {
                    tracing::info!(shard = shard_id, id = queue_id, milter = %f.name,
                        code = r.code, enhanced = %r.enhanced, text = %r.text, "milter refused the message");
                    done(msg, m);
                    return Outcome::Refuse(r);
                }
            }
            if msg.envelope.recipients.is_empty() {
                // Every recipient deleted: nothing to deliver (sendmail discards too).
                done(msg, m);
                return Outcome::Discard {
                    filter: f.name.to_string(),
                };
            }
        }
        done(msg, m);
        if let Some(why) = &held {
            tracing::info!(shard = shard_id, id = queue_id, reason = %why, "milter quarantined the message");
        }
        Outcome::Store { held }
    }

    /// DATA to end-of-message with one filter.
    async fn message(
        &mut self,
        i: usize,
        f: &Filter,
        m: &mut edit::Message,
        msg: &mut Message,
        queue_id: &str,
        held: &mut Option<String>,
    ) -> Result<Verdict, Failure> {
        let t = f.timeouts;
        let Some(c) = self.state[i].conn.as_mut() else {
            return Err(Failure::Protocol("no connection".into()));
        };
        // From here until an end-of-message "continue", libmilter would ignore QUIT_NC
        // (a refusal at DATA, a header, EOH or the body sends it back to its HELO state):
        // not reusable, and a message in progress for the UNKNOWN bridge to abort. Set
        // here too, not only in `step`, because a filter that takes none of HELO, MAIL
        // and RCPT never passes through `step` for a message.
        c.reusable = false;
        c.in_message = true;
        c.macros(Stage::Data, &[("i", queue_id)]);
        if c.neg.sends(Stage::Data) {
            codec::bare(&mut c.out, cmd::DATA);
        }
        match c.stage(Stage::Data, t).await? {
            Verdict::Continue => {}
            v => return Ok(v),
        }
        if c.neg.sends(Stage::Header) {
            let replies = c.neg.replies(Stage::Header);
            for fld in m.fields() {
                codec::header(&mut c.out, fld.name(), fld.value());
                if replies {
                    match c.stage(Stage::Header, t).await? {
                        Verdict::Continue => {}
                        v => return Ok(v),
                    }
                }
            }
        }
        c.macros(Stage::Eoh, &[]);
        if c.neg.sends(Stage::Eoh) {
            codec::bare(&mut c.out, cmd::EOH);
        }
        match c.stage(Stage::Eoh, t).await? {
            Verdict::Continue => {}
            v => return Ok(v),
        }
        if c.neg.sends(Stage::Body) {
            match c.body(m.body(), t).await? {
                Verdict::Continue => {}
                v => return Ok(v),
            }
        }
        c.macros(Stage::Eom, &[("i", queue_id)]);
        codec::bare(&mut c.out, cmd::BODYEOB);
        let v = c.eom(m, msg, t, held).await?;
        c.in_message = false;
        c.reusable = v == Verdict::Continue;
        Ok(v)
    }
}

/// A stage's answer as a verdict (`SMFIR_SKIP` is a continue outside the body); an
/// edit before end-of-message is a protocol error.
fn verdict_of(r: Response, stage: Stage) -> Result<Verdict, Failure> {
    Ok(match r {
        Response::Continue | Response::Skip | Response::Progress => Verdict::Continue,
        Response::Accept => Verdict::Accept,
        Response::Discard => Verdict::Discard,
        Response::Reject => Verdict::Reply(reject()),
        Response::Tempfail | Response::Shutdown => Verdict::Reply(tempfail()),
        Response::ReplyCode(r) => Verdict::Reply(r),
        other => {
            return Err(Failure::Protocol(format!(
                "{} at the {} stage",
                other.name(),
                stage.name()
            )))
        }
    })
}

/// CONNECT and its macros. The host name is "unknown": tern looks no client names up
/// (Postfix sends the same when a client has no verified name).
fn encode_connect(c: &mut Conn, hostname: &str, daemon: &str, peer: Option<SocketAddr>) {
    let addr = peer.map(|p| p.ip().to_string()).unwrap_or_default();
    let pairs = [
        ("j", hostname),
        ("{daemon_name}", daemon),
        ("{client_addr}", addr.as_str()),
        ("{client_name}", "unknown"),
    ];
    c.macros(Stage::Connect, &pairs);
    if c.neg.sends(Stage::Connect) {
        codec::connect(&mut c.out, "unknown", peer);
    }
}

/// Connects and negotiates.
async fn open(f: &Filter) -> Result<Conn, Failure> {
    let t = f.timeouts;
    let io = timed(t.connect, "connecting", async {
        match &f.endpoint {
            Endpoint::Inet(a) => {
                let s = glommio::net::TcpStream::connect(*a)
                    .await
                    .map_err(|e| io::Error::other(e.to_string()))?;
                let _ = s.set_nodelay(true);
                Ok(Stream::Tcp(s))
            }
            Endpoint::Unix(p) => connect_unix(p).await,
        }
    })
    .await?
    .map_err(Failure::Io)?;
    let mut c = Conn {
        io,
        neg: Negotiated {
            version: 0,
            actions: 0,
            protocol: 0,
            macros: Default::default(),
        },
        rbuf: BytesMut::new(),
        out: BytesMut::new(),
        in_message: false,
        reusable: false,
        proven: false,
    };
    codec::optneg(&mut c.out);
    c.flush(t).await?;
    match c.read(t.reply, "waiting for option negotiation").await? {
        Response::OptNeg(n) => {
            codec::check_negotiation(&n).map_err(Failure::Protocol)?;
            c.neg = n;
            Ok(c)
        }
        other => Err(Failure::Protocol(format!(
            "{} instead of option negotiation",
            other.name()
        ))),
    }
}

/// Connects to a filter's unix socket, keeping the descriptor reachable for the idle
/// check (`closed_while_idle`): glommio's `UnixStream` does not expose it, but takes one
/// (`from_raw_fd`). The connect is non-blocking: on a unix socket it completes or fails at
/// once, except when the filter's listen backlog is full (EAGAIN), where it is tried again
/// shortly (the caller's connect timeout bounds it). The socket is then handed over in
/// blocking mode, as glommio's own `connect` leaves it (its reads and writes go through
/// io_uring or carry MSG_DONTWAIT).
async fn connect_unix(p: &Path) -> io::Result<Stream> {
    let s = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
    s.set_nonblocking(true)?;
    let addr = socket2::SockAddr::unix(p)?;
    let mut pause = Duration::from_millis(1);
    loop {
        match s.connect(&addr) {
            Ok(()) => break,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                Timer::new(pause).await;
                pause = (pause * 2).min(Duration::from_millis(100));
            }
            Err(e) => return Err(e),
        }
    }
    s.set_nonblocking(false)?;
    let fd = s.as_raw_fd();
    // SAFETY: `into_raw_fd` hands the descriptor's ownership to the new stream (which
    // closes it); `fd` is kept beside that stream only, and used only while it lives.
    let u = unsafe { glommio::net::UnixStream::from_raw_fd(s.into_raw_fd()) };
    Ok(Stream::Unix(u, fd))
}

impl Conn {
    /// Did the filter close this idle connection (restart, its own idle timeout), or send
    /// something unasked? One non-blocking `MSG_PEEK`, on TCP and unix sockets alike: a
    /// filter whose first stage is end-of-message would otherwise show a dead connection
    /// only there, too late to retry.
    fn closed_while_idle(&self) -> bool {
        if !self.rbuf.is_empty() {
            return true;
        }
        let fd = match &self.io {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(_, fd) => *fd,
        };
        let mut b = [0u8; 1];
        // SAFETY: recv into a 1-byte buffer we own, on a descriptor the stream owns;
        // MSG_PEEK | MSG_DONTWAIT neither consumes nor blocks.
        let r = unsafe {
            libc::recv(
                fd,
                b.as_mut_ptr().cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error().kind();
            return e != io::ErrorKind::WouldBlock && e != io::ErrorKind::Interrupted;
        }
        // 0: the filter closed it; > 0: bytes nobody asked for.
        true
    }

    /// Queues the macros of a stage the filter wants (those it asked for, or all).
    fn macros(&mut self, stage: Stage, pairs: &[(&str, &str)]) {
        if !self.neg.sends(stage) && stage != Stage::Eom {
            return;
        }
        // Most filters take every macro (they sent no symbol list in the negotiation,
        // libmilter's `smfi_setsymlist`): the stage's pairs go as they are, with no list
        // built per stage.
        if pairs.iter().all(|(n, _)| self.neg.wants_macro(stage, n)) {
            codec::macros(&mut self.out, stage, pairs);
            return;
        }
        let wanted: Vec<(&str, &str)> = pairs
            .iter()
            .filter(|(n, _)| self.neg.wants_macro(stage, n))
            .copied()
            .collect();
        codec::macros(&mut self.out, stage, &wanted);
    }

    async fn flush(&mut self, t: Timeouts) -> Result<(), Failure> {
        if self.out.is_empty() {
            return Ok(());
        }
        let out = std::mem::take(&mut self.out);
        let r = timed(t.send, "sending", self.io.write_all(&out)).await?;
        self.out = out;
        self.out.clear();
        r.map_err(Failure::Io)
    }

    /// Reads one response within `d` (a `SMFIR_PROGRESS` restarts the timer).
    async fn read(&mut self, d: Duration, what: &'static str) -> Result<Response, Failure> {
        loop {
            if let Some(r) =
                Response::decode(&mut self.rbuf).map_err(|e| Failure::Protocol(e.to_string()))?
            {
                self.proven = true;
                return Ok(r);
            }
            let mut chunk = [0u8; 4096];
            let n = timed(d, what, self.io.read(&mut chunk))
                .await?
                .map_err(Failure::Io)?;
            if n == 0 {
                return Err(Failure::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "filter closed the connection",
                )));
            }
            self.rbuf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Sends what is queued for a stage and, if the filter answers it, reads its verdict.
    async fn stage(&mut self, stage: Stage, t: Timeouts) -> Result<Verdict, Failure> {
        if !self.neg.sends(stage) || !self.neg.replies(stage) {
            // Nothing to wait for: the packets go out with the next one that is answered.
            return Ok(Verdict::Continue);
        }
        self.flush(t).await?;
        self.verdict(stage, t.reply, "waiting for a reply").await
    }

    async fn verdict(
        &mut self,
        stage: Stage,
        d: Duration,
        what: &'static str,
    ) -> Result<Verdict, Failure> {
        loop {
            let r = self.read(d, what).await?;
            if r == Response::Progress {
                continue;
            }
            return verdict_of(r, stage);
        }
    }

    /// The body, in chunks of at most 65535 bytes. A filter that answers every chunk gets
    /// them coalesced (fewer round trips); one that does not gets them written straight
    /// from the message's slices, several per write.
    async fn body(&mut self, body: &[Bytes], t: Timeouts) -> Result<Verdict, Failure> {
        const MAX: usize = codec::MAX_BODY_CHUNK;
        if self.neg.replies(Stage::Body) {
            // Each chunk is copied once, straight into the connection's output buffer
            // (reused from packet to packet: no buffer of its own per message).
            let mut left: usize = body.iter().map(Bytes::len).sum();
            let mut slices = body.iter().map(|b| &b[..]);
            let mut cur: &[u8] = &[];
            while left > 0 {
                let n = left.min(MAX);
                self.out.extend_from_slice(&codec::body_head(n));
                let mut need = n;
                while need > 0 {
                    if cur.is_empty() {
                        match slices.next() {
                            Some(b) => cur = b,
                            None => break,
                        }
                        continue;
                    }
                    let k = need.min(cur.len());
                    self.out.extend_from_slice(&cur[..k]);
                    cur = &cur[k..];
                    need -= k;
                }
                left -= n;
                self.flush(t).await?;
                // SMFIR_SKIP (offered with SMFIP_SKIP): the filter has seen enough of the
                // body; go straight to end-of-message.
                let mut r = self.read(t.reply, "waiting for a body reply").await?;
                while r == Response::Progress {
                    r = self.read(t.reply, "waiting for a body reply").await?;
                }
                if r == Response::Skip {
                    return Ok(Verdict::Continue);
                }
                match verdict_of(r, Stage::Body)? {
                    Verdict::Continue => {}
                    v => return Ok(v),
                }
            }
            return Ok(Verdict::Continue);
        }
        // No replies: queued packets first, then head + slice pairs, vectored.
        self.flush(t).await?;
        let mut heads: Vec<[u8; 5]> = Vec::new();
        let mut parts: Vec<&[u8]> = Vec::new();
        for b in body {
            for piece in b.chunks(MAX) {
                heads.push(codec::body_head(piece.len()));
                parts.push(piece);
            }
        }
        // Bounded batches so the IoSlice vector stays small.
        for (hs, ps) in heads.chunks(256).zip(parts.chunks(256)) {
            let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(hs.len() * 2);
            for (h, p) in hs.iter().zip(ps) {
                slices.push(IoSlice::new(h));
                slices.push(IoSlice::new(p));
            }
            timed(
                t.send,
                "sending the body",
                write_all_vectored(&mut self.io, &mut slices),
            )
            .await?
            .map_err(Failure::Io)?;
        }
        Ok(Verdict::Continue)
    }

    /// End of message: edits, then the verdict.
    async fn eom(
        &mut self,
        m: &mut edit::Message,
        msg: &mut Message,
        t: Timeouts,
        held: &mut Option<String>,
    ) -> Result<Verdict, Failure> {
        self.flush(t).await?;
        let mut body: Option<Vec<Bytes>> = None;
        loop {
            let r = self.read(t.eom, "waiting for end of message").await?;
            let need = |flag: u32, what: &str| -> Result<(), Failure> {
                if self.neg.may(flag) {
                    Ok(())
                } else {
                    Err(Failure::Protocol(format!("{what} without negotiating it")))
                }
            };
            match r {
                Response::Progress => {}
                Response::AddHeader { name, value } => {
                    need(act::ADDHDRS, "addheader")?;
                    m.add_header(&name, &value);
                }
                Response::InsertHeader { index, name, value } => {
                    need(act::ADDHDRS, "insheader")?;
                    m.insert_header(index, &name, &value);
                }
                Response::ChangeHeader { index, name, value } => {
                    need(act::CHGHDRS, "chgheader")?;
                    m.change_header(index, &name, &value);
                }
                Response::ReplaceBody(chunk) => {
                    need(act::CHGBODY, "replbody")?;
                    body.get_or_insert_with(Vec::new).push(chunk);
                }
                Response::AddRcpt { rcpt, .. } => {
                    if !self.neg.may(act::ADDRCPT) && !self.neg.may(act::ADDRCPT_PAR) {
                        return Err(Failure::Protocol("addrcpt without negotiating it".into()));
                    }
                    let r = &mut msg.envelope.recipients;
                    if !r.iter().any(|x| x.addr.eq_ignore_ascii_case(&rcpt)) {
                        r.push(Recipient {
                            addr: rcpt,
                            notify: 0,
                            orcpt: None,
                        });
                    }
                }
                Response::DelRcpt(rcpt) => {
                    need(act::DELRCPT, "delrcpt")?;
                    msg.envelope
                        .recipients
                        .retain(|x| !x.addr.eq_ignore_ascii_case(&rcpt));
                }
                Response::ChangeFrom { from, .. } => {
                    need(act::CHGFROM, "chgfrom")?;
                    msg.envelope.sender = from;
                }
                Response::Quarantine(reason) => {
                    need(act::QUARANTINE, "quarantine")?;
                    let reason: String = reason
                        .chars()
                        .map(|c| if c.is_control() { ' ' } else { c })
                        .take(200)
                        .collect();
                    *held = Some(if reason.is_empty() {
                        "quarantined by a filter".into()
                    } else {
                        reason
                    });
                }
                Response::OptNeg(_) => {
                    return Err(Failure::Protocol("optneg at end of message".into()))
                }
                other => {
                    // A verdict: the edits so far stand (libmilter sends them first).
                    if let Some(b) = body.take() {
                        m.replace_body(&b);
                    }
                    return Ok(match other {
                        Response::Continue | Response::Skip => Verdict::Continue,
                        Response::Accept => Verdict::Accept,
                        Response::Discard => Verdict::Discard,
                        Response::Reject => Verdict::Reply(reject()),
                        Response::Tempfail | Response::Shutdown => Verdict::Reply(tempfail()),
                        Response::ReplyCode(r) => Verdict::Reply(r),
                        _ => Verdict::Continue,
                    });
                }
            }
        }
    }
}

async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    mut bufs: &mut [IoSlice<'_>],
) -> io::Result<()> {
    while !bufs.is_empty() {
        let n = w.write_vectored(bufs).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut bufs, n);
    }
    Ok(())
}

/// Runs `f` for at most `d`.
async fn timed<F: std::future::Future>(
    d: Duration,
    what: &'static str,
    f: F,
) -> Result<F::Output, Failure> {
    future::or(async { Ok(f.await) }, async {
        Timer::new(d).await;
        Err(Failure::Timeout(what))
    })
    .await
}

/// A quarantined message's state record reason, for `tern queue list` (made safe).
pub fn held_reason(reason: &str) -> String {
    format!("quarantined by milter: {reason}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_parse_like_sendmail() {
        let base = Timeouts::parse(
            DEFAULT_TIMEOUTS,
            Timeouts {
                connect: Duration::ZERO,
                send: Duration::ZERO,
                reply: Duration::ZERO,
                eom: Duration::ZERO,
            },
        )
        .unwrap();
        assert_eq!(base.connect, Duration::from_secs(30));
        let t = Timeouts::parse("C:5s;S:10;R:1m;E:5m", base).unwrap();
        assert_eq!(t.connect, Duration::from_secs(5));
        assert_eq!(t.send, Duration::from_secs(10));
        assert_eq!(t.reply, Duration::from_secs(60));
        assert_eq!(t.eom, Duration::from_secs(300));
        assert!(Timeouts::parse("X:5s", base).is_err());
        assert!(Timeouts::parse("C:0s", base).is_err());
        assert!(Timeouts::parse("C", base).is_err());
    }

    #[test]
    fn sockets() {
        assert_eq!(
            parse_socket("inet:127.0.0.1:11332").unwrap(),
            Endpoint::Inet("127.0.0.1:11332".parse().unwrap())
        );
        assert_eq!(
            parse_socket("inet:8891@127.0.0.1").unwrap(),
            Endpoint::Inet("127.0.0.1:8891".parse().unwrap())
        );
        assert_eq!(
            parse_socket("inet6:[::1]:8891").unwrap(),
            Endpoint::Inet("[::1]:8891".parse().unwrap())
        );
        assert_eq!(
            parse_socket("unix:/run/x.sock").unwrap(),
            Endpoint::Unix("/run/x.sock".into())
        );
        assert!(parse_socket("unix:rel").is_err());
        assert!(parse_socket("tcp:1.2.3.4:5").is_err());
        assert!(parse_socket("inet:1.2.3.4").is_err());
        assert!(parse_socket("inet:1.2.3.4:0").is_err());
    }
}
