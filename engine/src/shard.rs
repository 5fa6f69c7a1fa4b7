//! One shard's runtime state, and the messages other threads send it.
//!
//! Owns: [`Shard`] (everything a shard's tasks share: its spool glue, its counters, its TLS
//! acceptor, its connection counts, the stop signal, the cross-shard mesh) and [`Control`]
//! (what the main thread, the admin socket and the metrics endpoint ask of a shard).
//! Must never: leave its thread (`Rc`, `Cell`, `RefCell`: never `Arc<Mutex>`), or name
//! the process-level modules above it (`server`, `admin::server`, `metrics::http`): they
//! send `Control` messages down; nothing here calls up.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use futures_rustls::TlsAcceptor;

use crate::admin::proto::{Request, ShardAnswer};
use crate::anvil::Anvil;
use crate::config::Config;
use crate::metrics::counters::{ShardMetrics, Snapshot};
use crate::notify::LocalNotify;
use crate::spool::ShardStore;
use crate::tls::Identity;
use crate::userstore::UserDb;

/// Shard-local state shared by the shard's tasks (Rc: it never leaves its thread).
pub struct Shard {
    pub id: usize,
    pub store: ShardStore,
    pub stopping: LocalNotify,
    /// The shard-to-shard mesh (failed-AUTH counting, ETRN broadcast).
    pub peers: Rc<Anvil>,
    pub idle_timeout: Duration,
    /// Octets per second that earn a client more time to finish a request (`conn`).
    pub min_data_rate: u64,
    pub grace: Duration,
    /// Receive scratch shared by the shard's idle connections (see conn::read_via_scratch).
    pub scratch: RefCell<Box<[u8]>>,
    /// The shard's counters (`metrics.rs`), read only through `Control::Metrics`.
    pub metrics: Rc<ShardMetrics>,
    /// The shard's TLS acceptor (its own rustls config); replaced whole on reload, so a
    /// handshake in progress keeps the configuration it started with.
    pub tls: RefCell<TlsAcceptor>,
    pub(crate) connections: Cell<usize>,
    pub(crate) per_ip: RefCell<HashMap<IpAddr, usize>>,
    pub(crate) max_connections: usize,
    pub(crate) max_per_ip: usize,
    /// Load balancers whose connections begin with a PROXY header (`conn::proxy_header`).
    pub proxy_from: Vec<ipnet::IpNet>,
    pub proxy_timeout: Duration,
    /// `tern ctl drain`: when it started (None: not draining). New connections get
    /// `421 4.3.2` once `drain_delay` has passed (the balancer's health check sees 503
    /// first), open sessions finish, the runner keeps delivering, `/healthz` answers 503.
    /// Set only by the admin `drain`/`undrain` requests (`admin::server::on_shard`).
    pub drain_started: Cell<Option<std::time::Instant>>,
    pub drain_delay: Duration,
    /// The shard's milter filters (`milter`): none configured costs one borrow per
    /// session.
    pub milters: crate::milter::ShardMilters,
}

impl Shard {
    /// Whether `tern ctl drain` is in force.
    pub fn draining(&self) -> bool {
        self.drain_started.get().is_some()
    }

    /// Does a connection from `ip` come through a load balancer (PROXY header first)?
    pub fn from_balancer(&self, ip: IpAddr) -> bool {
        !self.proxy_from.is_empty() && self.proxy_from.iter().any(|n| n.contains(&ip))
    }

    /// Counts a new connection, or says why it is refused.
    pub fn admit_connection(&self, ip: IpAddr) -> Result<(), &'static str> {
        if self.stopping.fired() {
            return Err("server shutting down");
        }
        if self
            .drain_started
            .get()
            .is_some_and(|t| t.elapsed() >= self.drain_delay)
        {
            return Err(DRAINING);
        }
        if self.connections.get() >= self.max_connections {
            return Err("too many connections");
        }
        let mut per_ip = self.per_ip.borrow_mut();
        let n = per_ip.entry(ip).or_insert(0);
        if *n >= self.max_per_ip {
            if *n == 0 {
                per_ip.remove(&ip);
            }
            return Err("too many connections from your address");
        }
        *n += 1;
        self.connections.set(self.connections.get() + 1);
        Ok(())
    }

    /// Connections being served now.
    pub fn connections(&self) -> usize {
        self.connections.get()
    }

    pub fn release_connection(&self, ip: IpAddr) {
        self.connections
            .set(self.connections.get().saturating_sub(1));
        let mut per_ip = self.per_ip.borrow_mut();
        if let Some(n) = per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&ip);
            }
        }
    }

    /// A copy of this shard's counters and queue figures (for a scrape).
    pub fn metrics_snapshot(&self) -> Snapshot {
        let runner = self.store.runner();
        let d = runner.delivery_counts();
        let mut snap = self.metrics.snapshot(self.id, &d.recent);
        snap.sessions = self.connections() as u64;
        snap.sent = d.sent;
        snap.deferred = d.deferred;
        snap.bounced = d.bounced;
        snap.queue = runner.len() as u64;
        snap.spool_bytes = self.store.group_commit().with_spool(|s| s.disk_bytes());
        snap.oldest_arrival_unix_micros = runner.oldest_arrival_unix_micros();
        snap.sync_latency = self.store.group_commit().sync_times();
        snap.commit = self.store.group_commit().stats();
        snap.draining = self.draining();
        snap.dkim_signed = self.store.dkim_signed();
        snap.milter = self
            .milters
            .counts()
            .into_iter()
            .map(|(f, a, n)| ((f, a), n))
            .collect();
        snap.milter_conns = self
            .milters
            .conn_counts()
            .into_iter()
            .map(|(f, a, n)| ((f, a), n))
            .collect();
        snap.accepting = !self.store.runner().over_high_water();
        snap
    }
}

/// Why a draining node refuses a connection (`421 4.3.2`, a temporary condition of this
/// node: the client tries another one).
pub const DRAINING: &str = "draining";

/// Messages from the main side to a shard.
pub enum Control {
    /// A block or over-rate login decided by the cluster (`[cluster] redis`), for the
    /// shard's anvil.
    Cluster(crate::cluster::News),
    /// A new user-store snapshot.
    Users(Arc<UserDb>),
    /// A new `auth.sender_map` snapshot (the file changed).
    Senders(Arc<tern_smtp::sender::SenderMap>),
    /// A new certificate and key (SIGHUP).
    Tls(Identity),
    /// A reloaded configuration: new sessions use its limits, policy and AUTH settings.
    Config(Arc<Config>),
    /// A request from the admin socket; the shard answers on the channel.
    Admin(Arc<Request>, std::sync::mpsc::Sender<ShardAnswer>),
    /// A metrics scrape: the shard answers with a copy of its counters.
    Metrics(std::sync::mpsc::Sender<Snapshot>),
}
