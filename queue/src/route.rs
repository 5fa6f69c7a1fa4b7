//! Where a recipient's mail goes next: static routes, the relay host, or MX.
//!
//! Owns: the route table ([`Router`]), the route string syntax (`maildir:/path`,
//! `smtp:host[:port]`, `smtp:[host][:port]`, Postfix transport(5) style), the lookup order,
//! and the DNS lookups of the next hop ([`Dns`]: MX records, RFC 5321 §5.1 and RFC 7505,
//! and host addresses).
//! Must never: do DNS on the shard thread (lookups run on the process' one resolver
//! thread, see [`Dns`]), or decide retries (it only says which DNS answers are permanent:
//! [`RouteError::permanent`]).
//!
//! Lookup order for a recipient domain (lower-cased, trailing dot removed):
//! 1. a route for the exact domain (`example.org`);
//! 2. a route for a parent domain written with a leading dot (`.example.org` matches
//!    `a.example.org` and `b.a.example.org`, not `example.org`), most specific first;
//! 3. the `*` route;
//! 4. the relay host (always used without MX lookup, like Postfix's `[host]`);
//! 5. otherwise [`Destination::Mx`] for the domain itself.
//!
//! Per-next-hop settings travel with the route: an `smtp:` route (and the relay host,
//! written the same way) may carry `tls=LEVEL`, `ca=/path`, `rate=N` and `burst=N`
//! attributes; MX deliveries take their TLS policy from a table keyed by recipient domain
//! (`queue.tls_policy`, same key syntax as the routes, looked up by
//! [`Router::mx_tls_policy`]).
//!
//! STANDARDS: RFC 5321 §5.1 (MX, implicit MX, address literals), RFC 7505 (null MX).
//! CONFIGURATION PARAMETERS: `queue.relayhost`, `queue.routes`, `queue.tls_policy`,
//! `queue.resolver`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use futures::channel::{mpsc, oneshot};
use futures::StreamExt;
use hickory_resolver::config::{
    LookupIpStrategy, NameServerConfigGroup, ResolveHosts, ResolverConfig,
};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::ProtoErrorKind;
use hickory_resolver::{Name, ResolveError, TokioResolver};

use crate::client::TlsPolicy;
use crate::ratelimit::RateLimit;

/// Where to send. `Hash + Eq`: the runner keys its per-destination concurrency slots and
/// rate buckets by it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Destination {
    /// SMTP to `host:port`. `mx` = look up MX records for `host` first (`smtp:host`);
    /// false for `smtp:[host]` (connect to the host's addresses directly).
    /// `options_name` selects a named set of client options (TLS/AUTH) from the
    /// configuration; `None` = the defaults. `tls` overrides the global STARTTLS policy
    /// for this next hop, `rate` the global `queue.destination_rate`.
    Smtp {
        host: String,
        port: u16,
        mx: bool,
        options_name: Option<String>,
        tls: Option<TlsPolicy>,
        rate: Option<RateLimit>,
    },
    /// Local delivery into a Maildir.
    Maildir(PathBuf),
    /// SMTP to the domain's MX hosts (RFC 5321 §5.1), port 25.
    Mx(String),
}

/// A route string or table that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("route {0:?}: unknown kind (expected maildir: or smtp:)")]
    UnknownKind(String),
    #[error("route {0:?}: empty host")]
    EmptyHost(String),
    #[error("route {0:?}: bad port")]
    BadPort(String),
    #[error("route {0:?}: maildir path must be absolute")]
    RelativeMaildir(String),
    #[error("route {0:?}: unknown, repeated or invalid attribute")]
    BadAttribute(String),
    #[error("route key {0:?} is not a domain, .domain or *")]
    BadKey(String),
    #[error("cannot resolve {host}: {reason}")]
    Resolve { host: String, reason: String },
    /// The domain publishes a null MX (RFC 7505): it accepts no mail. Permanent.
    #[error("{0} does not accept mail (null MX)")]
    NullMx(String),
    /// NXDOMAIN for the recipient domain. Permanent.
    #[error("domain {0} does not exist")]
    NoSuchDomain(String),
    /// The domain exists but has neither MX nor A/AAAA records. Permanent.
    #[error("{0} has no MX and no address record")]
    NoMailHost(String),
    /// SERVFAIL, a timeout, an unreachable resolver, anything else: try again later.
    #[error("DNS lookup for {name} failed: {reason}")]
    Dns { name: String, reason: String },
    /// A `queue.tls_policy` entry that cannot be used.
    #[error("tls_policy {0}")]
    BadPolicy(String),
    /// `queue.resolver` is not "" or "IP[:port]", or the resolver cannot be set up.
    #[error("resolver {0}")]
    Resolver(String),
}

impl RouteError {
    /// The SMTP reply code and enhanced status (RFC 3463) when this error is a permanent
    /// answer about the recipient domain, to bounce with; None = temporary (defer).
    ///
    /// 556 5.1.10 for a null MX is RFC 7505 §4.2; 550 5.1.2 ("bad destination system
    /// address") for NXDOMAIN and 550 5.4.4 ("unable to route") for a domain without mail
    /// host follow Postfix. A failed address lookup of one MX host is *not* permanent: the
    /// next host, or the next attempt, may do better.
    pub fn permanent(&self) -> Option<(u16, (u8, u16, u16))> {
        match self {
            RouteError::NullMx(_) => Some((556, (5, 1, 10))),
            RouteError::NoSuchDomain(_) => Some((550, (5, 1, 2))),
            RouteError::NoMailHost(_) => Some((550, (5, 4, 4))),
            _ => None,
        }
    }
}

impl Destination {
    /// Parses a route string:
    /// - `maildir:/abs/path`
    /// - `smtp:host`, `smtp:host:port` (MX lookup of `host`)
    /// - `smtp:[host]`, `smtp:[host]:port`, `smtp:[ipv6:2001:db8::1]:port` (no MX)
    ///
    /// followed by optional whitespace-separated attributes (each at most once, `smtp:`
    /// only): `options=NAME`; `tls=none|may|encrypt|verify` (see
    /// [`crate::client::TlsLevel`]) and `ca=/abs/file.pem` (with `tls=verify`: the trust
    /// anchors for this hop instead of `queue.tls_ca_file` or the system's);
    /// `rate=N` (messages per second to this destination, fractions allowed) and
    /// `burst=N`. The default port is 25.
    pub fn parse(s: &str) -> Result<Destination, RouteError> {
        let err_s = || s.to_string();
        let bad = || RouteError::BadAttribute(s.to_string());
        let mut words = s.split_ascii_whitespace();
        let spec = words
            .next()
            .ok_or_else(|| RouteError::UnknownKind(err_s()))?;
        let mut options_name = None;
        let mut tls_word: Option<&str> = None;
        let mut ca: Option<&str> = None;
        let mut rate: Option<f64> = None;
        let mut burst: Option<u32> = None;
        let mut any_attr = false;
        for w in words {
            any_attr = true;
            let (k, v) = w
                .split_once('=')
                .filter(|(_, v)| !v.is_empty())
                .ok_or_else(bad)?;
            match k {
                "options" if options_name.is_none() => options_name = Some(v.to_string()),
                "tls" if tls_word.is_none() => tls_word = Some(v),
                "ca" if ca.is_none() => ca = Some(v),
                "rate" if rate.is_none() => {
                    rate = Some(
                        v.parse::<f64>()
                            .ok()
                            .filter(|r| r.is_finite() && *r > 0.0)
                            .ok_or_else(bad)?,
                    )
                }
                "burst" if burst.is_none() => {
                    burst = Some(v.parse::<u32>().ok().filter(|b| *b > 0).ok_or_else(bad)?)
                }
                _ => return Err(bad()),
            }
        }
        let tls = match (tls_word, ca) {
            (None, None) => None,
            (None, Some(_)) => return Err(bad()),
            (Some(level), ca) => {
                let text = match ca {
                    Some(c) => format!("{level} ca={c}"),
                    None => level.to_string(),
                };
                Some(TlsPolicy::parse(&text).map_err(|_| bad())?)
            }
        };
        if burst.is_some() && rate.is_none() {
            return Err(bad());
        }
        let rate = rate.and_then(|r| RateLimit::per_second(r, burst.unwrap_or(0)));
        let (kind, rest) = spec
            .split_once(':')
            .ok_or_else(|| RouteError::UnknownKind(err_s()))?;
        match kind.to_ascii_lowercase().as_str() {
            "maildir" => {
                if any_attr {
                    return Err(bad());
                }
                let p = PathBuf::from(rest);
                if !p.is_absolute() {
                    return Err(RouteError::RelativeMaildir(err_s()));
                }
                Ok(Destination::Maildir(p))
            }
            "smtp" => {
                let (host, mx, after) = if let Some(inner) = rest.strip_prefix('[') {
                    let (host, after) = inner
                        .split_once(']')
                        .ok_or_else(|| RouteError::EmptyHost(err_s()))?;
                    let host = match host.get(..5) {
                        Some(p) if p.eq_ignore_ascii_case("ipv6:") => &host[5..],
                        _ => host,
                    };
                    (host, false, after)
                } else {
                    match rest.split_once(':') {
                        Some((h, _)) => (h, true, &rest[h.len()..]),
                        None => (rest, true, ""),
                    }
                };
                if host.is_empty() {
                    return Err(RouteError::EmptyHost(err_s()));
                }
                let port = match after {
                    "" => 25,
                    p => p
                        .strip_prefix(':')
                        .and_then(|p| p.parse::<u16>().ok())
                        .filter(|&p| p != 0)
                        .ok_or_else(|| RouteError::BadPort(err_s()))?,
                };
                Ok(Destination::Smtp {
                    host: host.to_ascii_lowercase(),
                    port,
                    mx,
                    options_name,
                    tls,
                    rate,
                })
            }
            _ => Err(RouteError::UnknownKind(err_s())),
        }
    }
}

/// The route table of one tern instance (immutable; shared by the shards).
#[derive(Debug, Clone, Default)]
pub struct Router {
    /// Always an `smtp:[host]:port` destination (no MX), with its attributes.
    relayhost: Option<Destination>,
    routes: HashMap<String, Destination>,
    /// TLS policies for MX deliveries, keyed like `routes`.
    mx_tls: HashMap<String, TlsPolicy>,
}

/// A table key: `domain`, `.parent.domain` or `*`, normalised.
fn table_key(key: &str) -> Result<String, RouteError> {
    let k = normalise(key);
    let bare = k.strip_prefix('.').unwrap_or(&k);
    let ok = k == "*"
        || (!bare.is_empty()
            && bare.split('.').all(|l| {
                !l.is_empty()
                    && l.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b >= 0x80)
            }));
    if ok {
        Ok(k)
    } else {
        Err(RouteError::BadKey(key.to_string()))
    }
}

/// The value of `table` for `domain`: exact key, then `.parent` keys most specific first,
/// then `*`.
fn lookup<'a, T>(table: &'a HashMap<String, T>, domain: &str) -> Option<&'a T> {
    if table.is_empty() {
        return None;
    }
    if let Some(v) = table.get(domain) {
        return Some(v);
    }
    let mut rest = domain;
    while let Some(i) = rest.find('.') {
        if let Some(v) = table.get(&rest[i..]) {
            return Some(v);
        }
        rest = &rest[i + 1..];
    }
    table.get("*")
}

impl Router {
    /// `routes` keys: `domain`, `.parent.domain` or `*` (case-insensitive).
    pub fn new(
        relayhost: Option<(String, u16)>,
        routes: impl IntoIterator<Item = (String, Destination)>,
    ) -> Result<Router, RouteError> {
        let relay = relayhost.map(|(host, port)| Destination::Smtp {
            host: host.to_ascii_lowercase(),
            port,
            mx: false,
            options_name: None,
            tls: None,
            rate: None,
        });
        Router::build(relay, routes)
    }

    fn build(
        relayhost: Option<Destination>,
        routes: impl IntoIterator<Item = (String, Destination)>,
    ) -> Result<Router, RouteError> {
        let mut table = HashMap::new();
        for (key, dest) in routes {
            table.insert(table_key(&key)?, dest);
        }
        Ok(Router {
            relayhost,
            routes: table,
            mx_tls: HashMap::new(),
        })
    }

    /// Builds a router from configuration strings: `relayhost` as `[host]:port`,
    /// `host:port` or `host` (always used without MX), with the same attributes as a
    /// route (`tls=`, `ca=`, `rate=`, `burst=`); routes as `(key, route string)`.
    pub fn from_config<'a>(
        relayhost: Option<&str>,
        routes: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Router, RouteError> {
        let relay = match relayhost {
            None => None,
            Some(r) => match Destination::parse(&format!("smtp:{r}"))? {
                Destination::Smtp {
                    host,
                    port,
                    options_name,
                    tls,
                    rate,
                    ..
                } => Some(Destination::Smtp {
                    host,
                    port,
                    mx: false,
                    options_name,
                    tls,
                    rate,
                }),
                _ => return Err(RouteError::UnknownKind(r.to_string())),
            },
        };
        let parsed = routes
            .into_iter()
            .map(|(k, v)| Destination::parse(v).map(|d| (k.to_string(), d)))
            .collect::<Result<Vec<_>, _>>()?;
        Router::build(relay, parsed)
    }

    /// Adds the TLS policy table for MX deliveries (`queue.tls_policy`): keys as for
    /// routes (recipient domain, `.parent`, `*`), values as [`TlsPolicy::parse`].
    pub fn with_mx_tls_policies<'a>(
        mut self,
        table: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Router, RouteError> {
        for (k, v) in table {
            let policy = TlsPolicy::parse(v)
                .map_err(|e| RouteError::BadPolicy(format!("{k:?} = {v:?}: {e}")))?;
            self.mx_tls.insert(table_key(k)?, policy);
        }
        Ok(self)
    }

    /// The TLS policy for MX delivery to `rcpt_domain`, if the table has one.
    pub fn mx_tls_policy(&self, rcpt_domain: &str) -> Option<&TlsPolicy> {
        if self.mx_tls.is_empty() {
            return None;
        }
        lookup(&self.mx_tls, &normalise(rcpt_domain))
    }

    /// Every TLS policy configured: the relay host's, the routes' and the MX table's
    /// (with repeats), so the runner can build their TLS configurations at start.
    pub fn tls_policies(&self) -> impl Iterator<Item = &TlsPolicy> + '_ {
        fn dest_tls(d: &Destination) -> Option<&TlsPolicy> {
            match d {
                Destination::Smtp { tls: Some(t), .. } => Some(t),
                _ => None,
            }
        }
        self.relayhost
            .iter()
            .filter_map(dest_tls)
            .chain(self.routes.values().filter_map(dest_tls))
            .chain(self.mx_tls.values())
    }

    /// Every `rate=` of the routes and the relay host divided among `shards` shards
    /// ([`RateLimit::share`]): route rates are configured for the whole server.
    pub fn share_rates(mut self, shards: usize) -> Router {
        let share = |d: &mut Destination| {
            if let Destination::Smtp { rate: Some(r), .. } = d {
                *r = r.share(shards);
            }
        };
        self.relayhost.iter_mut().for_each(share);
        self.routes.values_mut().for_each(share);
        self
    }

    /// The destination for a recipient domain (see the module documentation for the order).
    pub fn route(&self, rcpt_domain: &str) -> Destination {
        let domain = normalise(rcpt_domain);
        if let Some(d) = lookup(&self.routes, &domain) {
            return d.clone();
        }
        if let Some(d) = &self.relayhost {
            return d.clone();
        }
        Destination::Mx(domain)
    }
}

fn normalise(d: &str) -> String {
    d.trim_end_matches('.').to_ascii_lowercase()
}

/// The domain of an address (`local@domain`; an address literal `[1.2.3.4]` stays as is).
pub fn domain_of(addr: &str) -> &str {
    addr.rsplit_once('@').map(|(_, d)| d).unwrap_or("")
}

/// Addresses of `host` (an IP literal or a name) on `port`.
///
/// Names are resolved with the system resolver (`ToSocketAddrs`, i.e. getaddrinfo) on
/// glommio's blocking thread pool. The runner does not use this any more (it uses
/// [`Dns::resolve`], so `queue.resolver` applies to every name); it stays for tools that
/// have no [`Dns`]. Must be called inside a glommio executor.
pub async fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, RouteError> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let h = host.to_string();
    let result = glommio::executor()
        .spawn_blocking(move || {
            // glommio reads an uninitialised result if the closure panics.
            std::panic::catch_unwind(|| {
                (h.as_str(), port)
                    .to_socket_addrs()
                    .map(|a| a.collect::<Vec<_>>())
                    .map_err(|e| e.to_string())
            })
            .unwrap_or_else(|_| Err("resolver panicked".into()))
        })
        .await;
    match result {
        Ok(addrs) if !addrs.is_empty() => Ok(addrs),
        Ok(_) => Err(RouteError::Resolve {
            host: host.to_string(),
            reason: "no addresses".into(),
        }),
        Err(reason) => Err(RouteError::Resolve {
            host: host.to_string(),
            reason,
        }),
    }
}

// ------------------------------------------------------------------------------- DNS

/// How to reach DNS: `queue.resolver` plus timeouts (the timeouts are not configuration
/// keys; tests shorten them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConfig {
    /// The DNS server to ask, over UDP (TCP for truncated answers); None = the servers of
    /// the system's resolv.conf.
    pub server: Option<SocketAddr>,
    /// Per query and server.
    pub timeout: Duration,
    /// Tries per query and server.
    pub attempts: usize,
}

impl Default for DnsConfig {
    /// The system resolver, glibc's defaults (5 s, 2 tries).
    fn default() -> Self {
        DnsConfig {
            server: None,
            timeout: Duration::from_secs(5),
            attempts: 2,
        }
    }
}

impl DnsConfig {
    /// Parses `queue.resolver`: "" (resolv.conf), "IP:port", "[IPv6]:port", or a bare IP
    /// (port 53).
    pub fn parse(s: &str) -> Result<DnsConfig, RouteError> {
        let s = s.trim();
        let server = if s.is_empty() {
            None
        } else if let Ok(a) = s.parse::<SocketAddr>() {
            Some(a)
        } else if let Ok(ip) = s.parse::<IpAddr>() {
            Some(SocketAddr::new(ip, 53))
        } else {
            return Err(RouteError::Resolver(format!(
                "{s:?}: expected \"\", \"IP\" or \"IP:port\""
            )));
        };
        Ok(DnsConfig {
            server,
            ..DnsConfig::default()
        })
    }

    /// Backstop for one request to the resolver thread (an MX lookup may take an MX, an A
    /// and an AAAA query); hickory's own timeouts should always fire first.
    fn request_limit(&self) -> Duration {
        self.timeout * (self.attempts.max(1) as u32) * 4 + Duration::from_secs(1)
    }
}

/// What an MX lookup found (RFC 5321 §5.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MxAnswer {
    /// Hosts to try in this order, names without the trailing dot: MX exchanges by
    /// preference (equal preference in random order, spreading load as §5.1 asks), or the
    /// domain itself (implicit MX), or an IP for an address literal (`[192.0.2.1]`).
    pub hosts: Vec<String>,
    /// No MX records: `hosts` is the domain itself (it has A/AAAA) or an address literal.
    pub implicit: bool,
}

/// A handle to the process' DNS resolver (hickory-resolver with its cache). Cheap to
/// clone; `Send + Sync`; the futures it returns run on any executor.
///
/// hickory-resolver 0.25 runs on tokio only (its sockets and timers come from a
/// `RuntimeProvider`, which needs `Send` I/O that glommio's are not). So the resolver
/// lives on one dedicated thread, `tern-dns`, with a current-thread tokio runtime:
/// shards send each lookup over a channel and await the answer on a oneshot (glommio
/// accepts wakes from foreign threads). One thread per distinct [`DnsConfig`] in the
/// process ([`Dns::shared`]), not per shard and not per lookup; it exits when the last
/// handle is dropped. Lookups never block a shard; many are in flight at once on the
/// resolver thread. If that thread died, every lookup fails as temporary ("resolver
/// thread stopped"): mail is deferred, never bounced.
#[derive(Clone)]
pub struct Dns {
    inner: Arc<DnsInner>,
}

struct DnsInner {
    cfg: DnsConfig,
    jobs: mpsc::UnboundedSender<Job>,
}

impl std::fmt::Debug for Dns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dns").field("cfg", &self.inner.cfg).finish()
    }
}

enum Ask {
    /// MX of the name; if there is none, whether the name has A/AAAA.
    Mx(Name),
    /// A and AAAA of the name.
    Ip(Name),
}

enum Answer {
    /// (preference, exchange lower-cased without the trailing dot; "" = the root).
    Mx(Vec<(u16, String)>),
    NoMx {
        has_address: bool,
    },
    Ips(Vec<IpAddr>),
}

enum Fail {
    NxDomain,
    Temporary(String),
}

struct Job {
    ask: Ask,
    reply: oneshot::Sender<Result<Answer, Fail>>,
}

type Shared = Mutex<Vec<(DnsConfig, Weak<DnsInner>)>>;

impl Dns {
    /// The process' resolver for `cfg`: the running one if a handle for the same
    /// configuration is alive, else a new one (so the shards, each building its runner
    /// configuration, share one resolver thread and one cache).
    pub fn shared(cfg: DnsConfig) -> Result<Dns, RouteError> {
        static SHARED: OnceLock<Shared> = OnceLock::new();
        let mut all = SHARED
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        all.retain(|(_, w)| w.strong_count() > 0);
        if let Some(inner) = all
            .iter()
            .find(|(c, _)| *c == cfg)
            .and_then(|(_, w)| w.upgrade())
        {
            return Ok(Dns { inner });
        }
        let dns = Dns::new(cfg.clone())?;
        all.push((cfg, Arc::downgrade(&dns.inner)));
        Ok(dns)
    }

    /// A new resolver thread for `cfg`. Fails when the resolver cannot be set up (for
    /// the system resolver: resolv.conf unreadable).
    pub fn new(cfg: DnsConfig) -> Result<Dns, RouteError> {
        let (jobs, rx) = mpsc::unbounded::<Job>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let c = cfg.clone();
        std::thread::Builder::new()
            .name("tern-dns".into())
            .spawn(move || resolver_thread(c, rx, ready_tx))
            .map_err(|e| RouteError::Resolver(format!("cannot start its thread: {e}")))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Dns {
                inner: Arc::new(DnsInner { cfg, jobs }),
            }),
            Ok(Err(e)) => Err(RouteError::Resolver(e)),
            Err(_) => Err(RouteError::Resolver("thread died while starting".into())),
        }
    }

    /// The configuration this resolver was built with.
    pub fn config(&self) -> &DnsConfig {
        &self.inner.cfg
    }

    async fn ask(&self, ask: Ask) -> Result<Answer, Fail> {
        let (reply, rx) = oneshot::channel();
        if self.inner.jobs.unbounded_send(Job { ask, reply }).is_err() {
            return Err(Fail::Temporary("resolver thread stopped".into()));
        }
        rx.await
            .unwrap_or_else(|_| Err(Fail::Temporary("resolver thread stopped".into())))
    }

    /// The hosts to try for mail to `domain`, RFC 5321 §5.1:
    /// - MX records sorted by preference, equal preferences in random order;
    /// - no MX records: the domain itself if it has A/AAAA (implicit MX), else
    ///   [`RouteError::NoMailHost`];
    /// - a null MX (RFC 7505: a single MX whose exchange is the root, "."; any preference
    ///   is accepted, as are several "."): [`RouteError::NullMx`]. A "." among other MX
    ///   records breaks RFC 7505 §3 and is skipped;
    /// - NXDOMAIN (or a name that is not a valid domain): [`RouteError::NoSuchDomain`];
    /// - anything else (SERVFAIL, REFUSED, timeouts): [`RouteError::Dns`], temporary.
    ///
    /// An address literal (`[192.0.2.1]`, `[IPv6:2001:db8::1]`) needs no DNS.
    pub async fn mx_hosts(&self, domain: &str) -> Result<MxAnswer, RouteError> {
        let domain = normalise(domain);
        if let Some(lit) = domain.strip_prefix('[').and_then(|d| d.strip_suffix(']')) {
            let lit = lit.strip_prefix("ipv6:").unwrap_or(lit);
            return match lit.parse::<IpAddr>() {
                Ok(ip) => Ok(MxAnswer {
                    hosts: vec![ip.to_string()],
                    implicit: true,
                }),
                Err(_) => Err(RouteError::NoSuchDomain(domain)),
            };
        }
        // Absolute name: the search list of resolv.conf must not apply to mail domains.
        let Ok(name) = Name::from_utf8(format!("{domain}.")) else {
            return Err(RouteError::NoSuchDomain(domain));
        };
        match self.ask(Ask::Mx(name)).await {
            Ok(Answer::Mx(records)) => Ok(MxAnswer {
                hosts: order_mx(&domain, records)?,
                implicit: false,
            }),
            Ok(Answer::NoMx { has_address: true }) => Ok(MxAnswer {
                hosts: vec![domain],
                implicit: true,
            }),
            Ok(Answer::NoMx { has_address: false }) => Err(RouteError::NoMailHost(domain)),
            Ok(Answer::Ips(_)) => Err(RouteError::Dns {
                name: domain,
                reason: "unexpected answer".into(),
            }),
            Err(Fail::NxDomain) => Err(RouteError::NoSuchDomain(domain)),
            Err(Fail::Temporary(reason)) => Err(RouteError::Dns {
                name: domain,
                reason,
            }),
        }
    }

    /// Addresses (A and AAAA, in the resolver's order) of `host` on `port`; an IP literal
    /// is returned as is. A name with a dot is absolute (MX exchanges, configured hosts);
    /// a single label goes through resolv.conf's search list. /etc/hosts applies. Every
    /// error is [`RouteError::Resolve`]: the caller moves on to the next host.
    pub async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, RouteError> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        let err = |reason: &str| RouteError::Resolve {
            host: host.to_string(),
            reason: reason.to_string(),
        };
        let h = host.trim_end_matches('.');
        let name = if h.contains('.') {
            Name::from_utf8(format!("{h}."))
        } else {
            Name::from_utf8(h)
        }
        .map_err(|e| err(&e.to_string()))?;
        match self.ask(Ask::Ip(name)).await {
            Ok(Answer::Ips(ips)) if !ips.is_empty() => Ok(ips
                .into_iter()
                .map(|ip| SocketAddr::new(ip, port))
                .collect()),
            Ok(_) => Err(err("no addresses")),
            Err(Fail::NxDomain) => Err(err("no such host")),
            Err(Fail::Temporary(reason)) => Err(err(&reason)),
        }
    }
}

/// RFC 5321 §5.1 and RFC 7505 over one MX RRset (see [`Dns::mx_hosts`]).
fn order_mx(domain: &str, mut records: Vec<(u16, String)>) -> Result<Vec<String>, RouteError> {
    use rand::seq::SliceRandom;
    // Only root exchanges (normally the single null MX): the domain takes no mail.
    // Mixed with real exchanges, a "." breaks RFC 7505 §3 and is skipped.
    records.retain(|(_, h)| !h.is_empty());
    if records.is_empty() {
        return Err(RouteError::NullMx(domain.to_string()));
    }
    records.shuffle(&mut rand::rng());
    records.sort_by_key(|(pref, _)| *pref); // stable: equal preferences stay shuffled
    let mut hosts: Vec<String> = Vec::with_capacity(records.len());
    for (_, h) in records {
        if !hosts.contains(&h) {
            hosts.push(h);
        }
    }
    Ok(hosts)
}

fn resolver_thread(
    cfg: DnsConfig,
    mut jobs: mpsc::UnboundedReceiver<Job>,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(format!("cannot start its runtime: {e}")));
            return;
        }
    };
    let resolver = match rt.block_on(async { build_resolver(&cfg) }) {
        Ok(r) => r,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    let limit = cfg.request_limit();
    rt.block_on(async move {
        while let Some(job) = jobs.next().await {
            let r = resolver.clone();
            tokio::spawn(async move {
                let answer = tokio::time::timeout(limit, answer(&r, job.ask))
                    .await
                    .unwrap_or_else(|_| Err(Fail::Temporary("DNS request timed out".into())));
                let _ = job.reply.send(answer);
            });
        }
    });
}

fn build_resolver(cfg: &DnsConfig) -> Result<TokioResolver, String> {
    let mut builder = match cfg.server {
        None => TokioResolver::builder_tokio()
            .map_err(|e| format!("cannot read the system configuration: {e}"))?,
        Some(addr) => TokioResolver::builder_with_config(
            ResolverConfig::from_parts(
                None,
                vec![],
                NameServerConfigGroup::from_ips_clear(&[addr.ip()], addr.port(), true),
            ),
            TokioConnectionProvider::default(),
        ),
    };
    let o = builder.options_mut();
    o.timeout = cfg.timeout;
    o.attempts = cfg.attempts.max(1);
    // Both families; the client tries the addresses in order.
    o.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    o.use_hosts_file = ResolveHosts::Auto;
    // hickory's default (32 records) is small for a relay.
    o.cache_size = 8192;
    Ok(builder.build())
}

enum Negative {
    NoData,
    NxDomain,
}

/// NOERROR without records = NoData, NXDOMAIN = NxDomain, anything else is temporary.
fn classify(e: &ResolveError) -> Result<Negative, Fail> {
    if let Some(ProtoErrorKind::NoRecordsFound { response_code, .. }) = e.proto().map(|p| p.kind())
    {
        return match *response_code {
            ResponseCode::NoError => Ok(Negative::NoData),
            ResponseCode::NXDomain => Ok(Negative::NxDomain),
            other => Err(Fail::Temporary(format!("server answered {other}"))),
        };
    }
    Err(Fail::Temporary(e.to_string()))
}

async fn answer(r: &TokioResolver, ask: Ask) -> Result<Answer, Fail> {
    match ask {
        Ask::Mx(name) => {
            let records: Vec<(u16, String)> = match r.mx_lookup(name.clone()).await {
                Ok(l) => l
                    .iter()
                    .map(|mx| {
                        let x = mx.exchange();
                        let h = if x.is_root() {
                            String::new()
                        } else {
                            x.to_ascii().trim_end_matches('.').to_ascii_lowercase()
                        };
                        (mx.preference(), h)
                    })
                    .collect(),
                Err(e) => match classify(&e)? {
                    Negative::NoData => Vec::new(),
                    Negative::NxDomain => return Err(Fail::NxDomain),
                },
            };
            if !records.is_empty() {
                return Ok(Answer::Mx(records));
            }
            // No MX: implicit MX if the domain has an address (RFC 5321 §5.1).
            match r.lookup_ip(name).await {
                Ok(l) => Ok(Answer::NoMx {
                    has_address: l.iter().next().is_some(),
                }),
                Err(e) => match classify(&e)? {
                    Negative::NoData => Ok(Answer::NoMx { has_address: false }),
                    Negative::NxDomain => Err(Fail::NxDomain),
                },
            }
        }
        Ask::Ip(name) => match r.lookup_ip(name).await {
            Ok(l) => Ok(Answer::Ips(l.iter().collect())),
            Err(e) => match classify(&e)? {
                Negative::NoData => Ok(Answer::Ips(Vec::new())),
                Negative::NxDomain => Err(Fail::NxDomain),
            },
        },
    }
}
