//! Configuration: the one TOML file, its defaults, and `--set key=value` overrides.
//!
//! Owns the typed view of every setting the engine reads. It parses and validates once, at
//! start-up (and later on reload); shards receive an immutable `Arc<Config>` and never parse
//! anything themselves. Unknown keys are errors: a typo must not silently fall back to a default.
//! This module must never perform I/O beyond reading the config file it is given.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Errors while loading a configuration. They name the key (and, from the TOML parser, the
/// line) so that an operator can fix the file without reading code.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("--set {arg}: expected key=value")]
    SetSyntax { arg: String },
    #[error("--set {key}: {message}")]
    SetPath { key: String, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

pub use tern_smtp::users::{Rate, UserRates};

/// The whole configuration. Field docs are the reference for docs/configuration.md.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Host name used in the greeting, EHLO reply and Received headers. Default: the machine's.
    pub hostname: String,
    /// Number of shards (one glommio executor pinned per core). 0 = one per available core.
    pub shards: usize,
    /// Started as root, switch to this unprivileged user after binding the ports (its
    /// group unless `group` is set). Empty: stay as started.
    pub user: String,
    pub group: String,
    /// Allow running as root with no `user` to switch to (test boxes, the demo).
    pub allow_root: bool,
    pub listeners: Listeners,
    pub tls: TlsConfig,
    pub limits: Limits,
    pub spool: SpoolConfig,
    pub relay: RelayConfig,
    pub auth: AuthConfig,
    pub queue: QueueConfig,
    pub shutdown: ShutdownConfig,
    pub executor: ExecutorConfig,
    pub log: LogConfig,
    pub admin: AdminConfig,
    pub metrics: MetricsConfig,
    /// DKIM signing keys and what is signed.
    pub dkim: crate::dkim::DkimConfig,
    /// Content filters (milter protocol 6) run on every accepted message before the 250.
    pub milter: crate::milter::MilterConfig,
    /// `[milter]`'s filters, checked and resolved when the configuration is loaded (a
    /// bad entry fails `check-config`, the start and a reload alike).
    #[serde(skip)]
    pub milters: std::sync::Arc<crate::milter::Filters>,
    /// Shared counters for a cluster of nodes.
    pub cluster: ClusterConfig,
    /// `auth.sender_map`, read and parsed when the configuration is loaded (so a map that
    /// does not parse fails `check-config`, the start and a reload alike).
    #[serde(skip)]
    pub senders: std::sync::Arc<tern_smtp::sender::SenderMap>,
    /// `[dkim]`'s keys, read, checked and parsed when the configuration is loaded (a bad
    /// key fails `check-config`, the start and a reload alike; never read per message).
    #[serde(skip)]
    pub dkim_signer: std::sync::Arc<crate::dkim::Signer>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Listeners {
    /// Port-25 role: MTA-to-MTA relay, STARTTLS offered.
    pub smtp: Vec<SocketAddr>,
    /// Port-587 role (RFC 6409): submission, STARTTLS offered.
    pub submission: Vec<SocketAddr>,
    /// Port-465 role (RFC 8314): implicit TLS from the first byte.
    pub smtps: Vec<SocketAddr>,
    /// Load balancers (HAProxy's proxy-protocol.txt, v1 or v2): a connection *from* one of
    /// these networks must begin with a PROXY header, whose client address then counts as
    /// the client's. Connections from anywhere else are never parsed for one.
    pub proxy_from: Vec<IpNet>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain. When unset (with `key`), a self-signed certificate is generated.
    pub cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Longest command line in octets, CRLF included (RFC 5321 §4.5.3.1.4: 512).
    pub command_line: usize,
    /// Longest text line in DATA, CRLF included (RFC 5321 §4.5.3.1.6: 1000).
    pub text_line: usize,
    /// Largest message accepted, in octets (advertised as SIZE).
    pub message_size: u64,
    /// Recipients per transaction (RFC 5321 §4.5.3.1.8 asks for at least 100).
    pub recipients: usize,
    /// Negative replies in one session before it is closed with 421 4.7.0.
    pub errors: u32,
    /// Time the client has to complete each request (command, or message body) after
    /// the previous reply, then 421 4.4.2.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Octets per second: bytes that do not complete a request extend its deadline by
    /// bytes / this (at most to `idle_timeout` from now). 0 = every byte restarts the timer.
    pub min_data_rate: u64,
    /// Concurrent connections one shard serves; more get 421 4.7.0.
    pub connections_per_shard: usize,
    /// Concurrent connections from one client IP on one shard; more get 421 4.7.0.
    pub connections_per_ip: usize,
    /// Time a balancer (`listeners.proxy_from`) has to send the whole PROXY header; no
    /// banner is sent before it arrives.
    #[serde(with = "humantime_serde")]
    pub proxy_timeout: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolConfig {
    /// Directory holding one sub-directory of segment files per shard.
    pub dir: PathBuf,
    /// Size of each preallocated segment file, in octets.
    pub segment_size: u64,
    /// Group commits a shard may have in flight at once (1 or 2): with 2, a message
    /// arriving while a batch syncs starts its own write + fdatasync at once (results are
    /// still released in order). See docs/decisions.md (issue 17).
    pub commits_in_flight: usize,
    /// How batches reach the disk: "thread" (pwritev + fdatasync on the shard's syncer
    /// threads) or "uring" (on the shard's own io_uring, no thread hop). See
    /// docs/decisions.md (issue 17).
    pub commit: SpoolCommit,
    /// How long delivery state records with no message record to share a commit with
    /// wait for one before taking an fdatasync of their own ("0s": never wait). See
    /// docs/decisions.md (issue 17).
    #[serde(with = "humantime_serde")]
    pub state_commit_delay: Duration,
    /// Nice value of the spool syncer threads (-20..=19; default -10): a waking syncer
    /// then gets a CPU at once instead of after the busy shard's time slice. Applies at
    /// start (restart to change). Negative values need CAP_SYS_NICE or RLIMIT_NICE: tern
    /// started as root raises RLIMIT_NICE before it drops privileges; under systemd use
    /// `LimitNICE=`.
    pub syncer_nice: i32,
}

/// `spool.commit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SpoolCommit {
    #[default]
    Thread,
    Uring,
}

impl SpoolCommit {
    pub fn path(self) -> tern_queue::commit::CommitPath {
        match self {
            SpoolCommit::Thread => tern_queue::commit::CommitPath::Thread,
            SpoolCommit::Uring => tern_queue::commit::CommitPath::Uring,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            SpoolCommit::Thread => "thread",
            SpoolCommit::Uring => "uring",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    /// Domains this server accepts mail for from anybody (final destination or relay-to).
    pub local_domains: Vec<String>,
    /// Client networks trusted to relay anywhere without AUTH. Empty by default: loopback is
    /// not trusted unless listed, so an open relay is never the accident of a default.
    pub trusted_networks: Vec<IpNet>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// SASL mechanisms offered, in this order. Plaintext ones (PLAIN, LOGIN) are offered
    /// only under TLS unless `allow_plaintext_without_tls`.
    pub mechanisms: Vec<String>,
    /// The user store (written by `tern passwd`): a file (a missing file means no users)
    /// or a `postgresql://` URL (see `pgusers`). Shown with its password redacted.
    #[serde(serialize_with = "serialize_store_path")]
    pub users: PathBuf,
    /// Realm users are looked up in (and DIGEST-MD5's realm). Empty: the host name, which
    /// is also `tern passwd`'s default.
    pub realm: String,
    /// Offer and accept PLAIN/LOGIN on unencrypted connections (legacy sites only).
    pub allow_plaintext_without_tls: bool,
    /// Allow an authorization identity different from the authentication identity.
    pub allow_authzid: bool,
    /// Failed AUTH attempts in one session before 421 4.7.0 and close.
    pub max_failures: u32,
    /// Delay added before each 535, growing with every failure in the session.
    #[serde(with = "humantime_serde")]
    pub tarpit: Duration,
    /// Listener roles that require AUTH before MAIL (530 5.7.0): "submission", "smtps", "smtp".
    pub require_on: Vec<String>,
    /// Mechanisms whose authenticated sessions may relay to any domain (sendmail's
    /// TRUST_AUTH_MECH). A session authenticated otherwise is treated as unauthenticated
    /// for relaying. Default: all of them.
    pub relay_mechanisms: Vec<String>,
    /// Failed AUTHs from one client IP (all shards together) within `ip_failure_window`
    /// after which AUTH from that IP gets 454 4.7.0 for `ip_block`.
    pub ip_failure_limit: u32,
    #[serde(with = "humantime_serde")]
    pub ip_failure_window: Duration,
    #[serde(with = "humantime_serde")]
    pub ip_block: Duration,
    /// Failed AUTHs as one login (from any address, all shards, all nodes with
    /// `[cluster] redis`) within `ip_failure_window` after which AUTH as that login gets
    /// 454 4.7.0 for `ip_block`, whatever the password. 0 (the default): never.
    pub login_failure_limit: u32,
    /// "any" (default): an authenticated session may use any MAIL FROM. "own": only
    /// addresses its login owns (the login itself when it is an address, login@realm
    /// otherwise, plus `sender_map`); others get 553 5.7.1. `<>` is always allowed.
    pub sender_policy: String,
    /// Extra grants, one per line: `address-or-@domain  login[, login...]`. Reloaded on
    /// SIGHUP and when the file changes. Empty: none. A `postgresql://` URL: the table
    /// `tern_sender_map` (one row per line), watched with LISTEN/NOTIFY.
    #[serde(serialize_with = "serialize_store_path")]
    pub sender_map: PathBuf,
    /// Apply the ownership rule to the From: addresses at the end of DATA too (550 5.7.1).
    pub check_header_from: bool,
    /// Messages one login may start, e.g. "100/1m" (counted at MAIL across all shards;
    /// over it: 450 4.7.1). Empty: no limit.
    pub user_message_rate: String,
    /// Recipients one login may add, e.g. "2000/1d" (at RCPT; over it: 452 4.5.3).
    pub user_recipient_rate: String,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            mechanisms: ["CRAM-MD5", "DIGEST-MD5", "SCRAM-SHA-256", "PLAIN", "LOGIN"]
                .map(String::from)
                .to_vec(),
            users: PathBuf::from("tern-users.db"),
            realm: String::new(),
            allow_plaintext_without_tls: false,
            allow_authzid: false,
            max_failures: 3,
            tarpit: Duration::from_millis(500),
            require_on: Vec::new(),
            relay_mechanisms: ["CRAM-MD5", "DIGEST-MD5", "SCRAM-SHA-256", "PLAIN", "LOGIN"]
                .map(String::from)
                .to_vec(),
            ip_failure_limit: 10,
            ip_failure_window: Duration::from_secs(600),
            ip_block: Duration::from_secs(900),
            login_failure_limit: 0,
            sender_policy: "any".into(),
            sender_map: PathBuf::new(),
            check_header_from: false,
            user_message_rate: String::new(),
            user_recipient_rate: String::new(),
        }
    }
}

/// Where the users are: `auth.users` read as a file path or a PostgreSQL URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserStore {
    File(PathBuf),
    Postgres(crate::pgusers::PgUrl),
}

impl std::fmt::Display for UserStore {
    /// The path, or the URL without its password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UserStore::File(p) => write!(f, "{}", p.display()),
            UserStore::Postgres(u) => write!(f, "{u}"),
        }
    }
}

impl UserStore {
    /// `postgresql://...`/`postgres://...` is a database, anything else a file path.
    pub fn from_path(p: &Path) -> UserStore {
        match p.to_str().and_then(crate::pgusers::PgUrl::parse) {
            Some(u) => UserStore::Postgres(u),
            None => UserStore::File(p.to_owned()),
        }
    }
}

/// `check-config` prints the configuration: never a database password.
fn serialize_store_path<S: serde::Serializer>(p: &Path, s: S) -> Result<S::Ok, S::Error> {
    match UserStore::from_path(p) {
        UserStore::Postgres(u) => s.serialize_str(&u.redacted()),
        UserStore::File(_) => p.serialize(s),
    }
}

impl AuthConfig {
    /// `auth.sender_map` when it names a database.
    pub fn sender_map_db(&self) -> Option<crate::pgusers::PgUrl> {
        self.sender_map
            .to_str()
            .and_then(crate::pgusers::PgUrl::parse)
    }

    /// The user store: a file or a PostgreSQL database.
    pub fn user_store(&self) -> UserStore {
        UserStore::from_path(&self.users)
    }

    /// The effective realm: configured, or the host name.
    pub fn realm_or<'a>(&'a self, hostname: &'a str) -> &'a str {
        if self.realm.is_empty() {
            hostname
        } else {
            &self.realm
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// First retry after a temporary failure (sendmail's -q15m); doubles per attempt.
    #[serde(with = "humantime_serde")]
    pub retry_interval: Duration,
    /// Upper bound of the retry backoff.
    #[serde(with = "humantime_serde")]
    pub max_retry_interval: Duration,
    /// After this long in the queue, a message is bounced (4.4.7).
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// Send a delay DSN to senders who asked (NOTIFY=DELAY) after this long; "0s" = never.
    #[serde(with = "humantime_serde")]
    pub delay_warning: Duration,
    /// Deliveries in flight at once, per shard.
    pub concurrency: usize,
    /// Queued messages (all shards together) above which new mail gets 452 4.3.1.
    pub high_water_messages: usize,
    /// Spool bytes on disk (all shards' segment files together) above which new mail gets
    /// 452 4.3.1; 0 = no limit. Each shard enforces its share.
    pub high_water_bytes: u64,
    /// Smarthost for everything without a static route: "host", "host:port" or "[host]:port",
    /// optionally followed by route attributes (`tls=`, `ca=`, `rate=`, `burst=`).
    pub relayhost: String,
    /// File holding "user password" (one line, mode 0600) to AUTH to the relayhost with
    /// (PLAIN/LOGIN only under TLS, CRAM-MD5 otherwise). Empty: no AUTH.
    pub relayhost_auth_file: PathBuf,
    /// Deliveries in flight at once to one destination, per shard.
    pub destination_concurrency: usize,
    /// Deliveries started per second to one destination (a route, or a recipient domain
    /// delivered by MX), for the whole server: each shard enforces `rate / shards`.
    /// Fractions allowed; 0 = no limit. A route's `rate=` overrides it.
    pub destination_rate: f64,
    /// Deliveries that may start back to back after a quiet spell (also divided among the
    /// shards, at least 1 each); 0 = the rate rounded up.
    pub destination_burst: u32,
    /// Static routes by recipient domain ("*" = default): "maildir:/path", "smtp:[host]:port",
    /// with optional attributes `tls=none|may|encrypt|verify`, `ca=/file`, `rate=`, `burst=`.
    pub routes: std::collections::BTreeMap<String, String>,
    /// Outbound STARTTLS: "opportunistic", "required" or "never".
    pub starttls: String,
    /// Send bodies with BDAT (RFC 3030), pipelined with MAIL and RCPT, to next hops that
    /// offer CHUNKING and PIPELINING (one round trip per message instead of two); false:
    /// DATA, and BDAT only for BINARYMIME. Exim's `hosts_try_chunking`.
    pub chunking: bool,
    /// Verify next hops' certificates (off by default: opportunistic TLS, as Postfix's "may").
    pub tls_verify: bool,
    /// CA certificates (PEM) to verify next hops against; empty = the system bundle.
    pub tls_ca_file: PathBuf,
    /// TLS policy per recipient domain for MX deliveries (keys as for `routes`):
    /// "none", "may", "encrypt", "verify" or "verify ca=/file". Others use the global one.
    pub tls_policy: std::collections::BTreeMap<String, String>,
    /// Outbound connect timeout (RFC 5321 §4.5.3.2 timeouts apply to the rest).
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Scale for the RFC 5321 §4.5.3.2 command timeouts (5 min greeting/MAIL/RCPT, 10 min
    /// final dot): the maximum any single reply may take.
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    /// DNS server for MX and host lookups: "" = the system's resolv.conf, else "IP:port"
    /// (or a bare IP, port 53), asked over UDP (TCP for truncated answers).
    pub resolver: String,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            retry_interval: Duration::from_secs(15 * 60),
            max_retry_interval: Duration::from_secs(4 * 3600),
            max_age: Duration::from_secs(5 * 86400),
            delay_warning: Duration::from_secs(4 * 3600),
            concurrency: 64,
            high_water_messages: 2_000_000,
            high_water_bytes: 0,
            relayhost: String::new(),
            relayhost_auth_file: PathBuf::new(),
            destination_concurrency: 20,
            destination_rate: 0.0,
            destination_burst: 0,
            routes: Default::default(),
            starttls: "opportunistic".into(),
            chunking: true,
            tls_verify: false,
            tls_ca_file: PathBuf::new(),
            tls_policy: Default::default(),
            connect_timeout: Duration::from_secs(30),
            command_timeout: Duration::from_secs(300),
            resolver: String::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// How long sessions in the middle of a transaction may go on after SIGTERM/SIGINT.
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
    /// After `tern ctl drain`, how long new connections are still served while `/healthz`
    /// already answers 503: time for a balancer's health check to take the node out before
    /// it refuses anyone (2-3 times the check interval). 0: refuse at once.
    #[serde(with = "humantime_serde")]
    pub drain_delay: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExecutorConfig {
    /// io_uring ring depth per executor ring. Small values keep locked memory low.
    pub ring_depth: usize,
    /// Memory registered with io_uring per executor, in octets (counts against RLIMIT_MEMLOCK
    /// when the process lacks CAP_IPC_LOCK; see shared notes).
    pub io_memory: usize,
    /// Pin each shard to one CPU.
    pub pin: bool,
    /// Threads per shard for blocking work (Maildir deliveries: each fsyncs a file and a
    /// directory). The spool's fdatasync has a thread of its own and never waits here.
    pub blocking_threads: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// tracing filter directive, e.g. "info" or "tern_engine=debug".
    pub level: String,
    /// "text" (one human-readable line per event) or "json" (one JSON object per line).
    pub format: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// `redis://[user:password@]host:port[/db]` (or `redis+unix:///path`; `rediss://` is
    /// refused: this build has no TLS for Redis): AUTH failures per IP and per login, IP
    /// and login blocks, and per-login sending rates are counted across every node sharing
    /// it (Redis or Valkey 7.0+). Empty (the default): everything is counted on this node
    /// only. Shown with its password replaced; a file holding a password must not be
    /// group/world-readable.
    #[serde(serialize_with = "serialize_redacted")]
    pub redis: String,
}

fn serialize_redacted<S: serde::Serializer>(url: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&redact_url(url))
}

/// `url` with the password of its userinfo (`scheme://user:password@host`) replaced by
/// `***`, for logs, `check-config`, `features` and status output. A URL without one is
/// returned as it is. Generic: any `scheme://` URL.
pub fn redact_url(url: &str) -> String {
    let Some(i) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[i + 3..];
    // The authority ends at the first '/', '?' or '#'; its userinfo at its last '@'.
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let Some(at) = rest[..end].rfind('@') else {
        return url.to_string();
    };
    let userinfo = &rest[..at];
    match userinfo.find(':') {
        Some(c) => format!("{}{}:***{}", &url[..i + 3], &userinfo[..c], &rest[at..]),
        None => url.to_string(),
    }
}

/// Whether `url` carries a password (see [`redact_url`]).
pub fn url_has_password(url: &str) -> bool {
    redact_url(url) != url
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// The admin socket (`tern queue`, `tern ctl`): a Unix stream socket created mode 0600.
    /// Empty (the default): `admin.sock` inside `spool.dir`.
    pub socket: PathBuf,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address of the plain-HTTP metrics endpoint (`/metrics`, `/healthz`, `/` status page),
    /// e.g. "127.0.0.1:9580". Empty (the default): no endpoint. It has no authentication:
    /// bind it to loopback or a management network.
    pub listen: String,
}

impl MetricsConfig {
    /// The parsed address, None when off.
    pub fn addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        if self.listen.is_empty() {
            return Ok(None);
        }
        self.listen.parse().map(Some).map_err(|_| {
            ConfigError::Invalid(format!(
                "metrics.listen: {:?} is not an address:port",
                self.listen
            ))
        })
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            hostname: system_hostname(),
            shards: 0,
            user: String::new(),
            group: String::new(),
            allow_root: false,
            listeners: Listeners::default(),
            tls: TlsConfig::default(),
            limits: Limits::default(),
            spool: SpoolConfig::default(),
            relay: RelayConfig::default(),
            auth: AuthConfig::default(),
            queue: QueueConfig::default(),
            shutdown: ShutdownConfig::default(),
            executor: ExecutorConfig::default(),
            log: LogConfig::default(),
            admin: AdminConfig::default(),
            metrics: MetricsConfig::default(),
            dkim: Default::default(),
            milter: Default::default(),
            milters: Default::default(),
            cluster: ClusterConfig::default(),
            senders: Default::default(),
            dkim_signer: Default::default(),
        }
    }
}

impl Default for Listeners {
    fn default() -> Self {
        Listeners {
            smtp: vec![SocketAddr::from(([0, 0, 0, 0], 25))],
            submission: vec![SocketAddr::from(([0, 0, 0, 0], 587))],
            smtps: vec![SocketAddr::from(([0, 0, 0, 0], 465))],
            proxy_from: Vec::new(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            command_line: 512,
            text_line: 1000,
            message_size: 50 * 1024 * 1024,
            recipients: 1000,
            errors: 20,
            idle_timeout: Duration::from_secs(300),
            min_data_rate: 500,
            connections_per_shard: 10_000,
            connections_per_ip: 100,
            proxy_timeout: Duration::from_secs(5),
        }
    }
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            dir: PathBuf::from("spool"),
            segment_size: 32 * 1024 * 1024,
            commits_in_flight: tern_queue::commit::DEFAULT_COMMITS_IN_FLIGHT,
            commit: SpoolCommit::Thread,
            state_commit_delay: tern_queue::commit::DEFAULT_STATE_COMMIT_DELAY,
            syncer_nice: tern_queue::commit::DEFAULT_SYNCER_NICE,
        }
    }
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            local_domains: vec!["localhost".into()],
            trusted_networks: Vec::new(),
        }
    }
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            grace: Duration::from_secs(30),
            drain_delay: Duration::ZERO,
        }
    }
}

impl Default for ExecutorConfig {
    fn default() -> Self {
        ExecutorConfig {
            ring_depth: 256,
            io_memory: 512 * 1024,
            pin: true,
            blocking_threads: 4,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: "text".into(),
        }
    }
}

impl Config {
    /// Loads `path` (if any), applies `--set` overrides, and validates.
    pub fn load(path: Option<&Path>, sets: &[String]) -> Result<Config, ConfigError> {
        let (text, name, mode) = match path {
            Some(p) => {
                let read_err = |source| ConfigError::Read {
                    path: p.to_path_buf(),
                    source,
                };
                // fstat the open file, so the mode checked is the file read.
                let mut f = std::fs::File::open(p).map_err(read_err)?;
                let mode = {
                    use std::os::unix::fs::MetadataExt;
                    f.metadata().map_err(read_err)?.mode() & 0o7777
                };
                let mut text = String::new();
                std::io::Read::read_to_string(&mut f, &mut text).map_err(read_err)?;
                (text, p.display().to_string(), Some(mode))
            }
            None => (String::new(), "<defaults>".to_string(), None),
        };
        let cfg = Self::from_toml_str(&text, &name, sets)?;
        if let Some(mode) = mode {
            check_secret_mode(&cfg, &text, &name, mode)?;
        }
        Ok(cfg)
    }

    /// Parses TOML text plus overrides. Separate from `load` so tests and `tern demo` can
    /// build a configuration without touching the file system.
    pub fn from_toml_str(text: &str, name: &str, sets: &[String]) -> Result<Config, ConfigError> {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: name.to_string(),
            message: e.to_string(),
        })?;
        for arg in sets {
            apply_set(&mut table, arg)?;
        }
        // Re-serialise so that serde's errors (unknown key, wrong type) come with the key
        // path; line numbers refer to the file only when no --set was given.
        let merged = if sets.is_empty() {
            text.to_string()
        } else {
            toml::to_string(&table).map_err(|e| ConfigError::Invalid(e.to_string()))?
        };
        let cfg: Config = toml::from_str(&merged).map_err(|e| ConfigError::Parse {
            path: name.to_string(),
            message: e.to_string(),
        })?;
        cfg.validate()?;
        let mut cfg = cfg;
        cfg.senders = std::sync::Arc::new(cfg.load_sender_map()?);
        cfg.dkim_signer = std::sync::Arc::new(
            crate::dkim::Signer::load(&cfg.dkim).map_err(ConfigError::Invalid)?,
        );
        cfg.milters = std::sync::Arc::new(
            crate::milter::Filters::load(&cfg.milter).map_err(ConfigError::Invalid)?,
        );
        Ok(cfg)
    }

    /// The per-login sending rates (validated at load).
    pub fn user_rates(&self) -> UserRates {
        UserRates {
            messages: Rate::parse(&self.auth.user_message_rate).ok().flatten(),
            recipients: Rate::parse(&self.auth.user_recipient_rate).ok().flatten(),
        }
    }

    /// The limits a session enforces, from `[limits]`.
    pub fn session_limits(&self) -> tern_smtp::session::SessionLimits {
        let l = &self.limits;
        tern_smtp::session::SessionLimits {
            command_line: l.command_line,
            text_line: l.text_line,
            message_size: l.message_size,
            recipients: l.recipients,
            errors: l.errors,
        }
    }

    /// Reads and parses `auth.sender_map` (an empty path: no grants).
    pub fn load_sender_map(&self) -> Result<tern_smtp::sender::SenderMap, ConfigError> {
        let path = &self.auth.sender_map;
        // A database map is read by the server (its own thread), never here.
        if path.as_os_str().is_empty() || self.auth.sender_map_db().is_some() {
            return Ok(Default::default());
        }
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        tern_smtp::sender::SenderMap::parse(&text)
            .map_err(|e| ConfigError::Invalid(format!("auth.sender_map: {}: {e}", path.display())))
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.metrics.addr()?;
        let l = &self.limits;
        if l.command_line < 512 {
            return Err(ConfigError::Invalid(
                "limits.command_line must be at least 512 (RFC 5321 §4.5.3.1.4)".into(),
            ));
        }
        if l.text_line < 1000 {
            return Err(ConfigError::Invalid(
                "limits.text_line must be at least 1000 (RFC 5321 §4.5.3.1.6)".into(),
            ));
        }
        if l.recipients == 0 || l.errors == 0 || l.message_size == 0 {
            return Err(ConfigError::Invalid(
                "limits.recipients, limits.errors and limits.message_size must be positive".into(),
            ));
        }
        if self.hostname.is_empty() || self.hostname.bytes().any(|b| !b.is_ascii_graphic()) {
            return Err(ConfigError::Invalid(
                "hostname must be a non-empty printable ASCII name".into(),
            ));
        }
        if self.listeners.smtp.is_empty()
            && self.listeners.submission.is_empty()
            && self.listeners.smtps.is_empty()
        {
            return Err(ConfigError::Invalid(
                "listeners: at least one of smtp, submission, smtps must list an address".into(),
            ));
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return Err(ConfigError::Invalid(
                "tls.cert and tls.key must be given together".into(),
            ));
        }
        for m in self
            .auth
            .mechanisms
            .iter()
            .chain(&self.auth.relay_mechanisms)
        {
            if tern_smtp::sasl::Mechanism::from_name(m).is_none() {
                return Err(ConfigError::Invalid(format!(
                    "auth.mechanisms: unknown mechanism {m:?} (expected CRAM-MD5, DIGEST-MD5, SCRAM-SHA-256, PLAIN, LOGIN)"
                )));
            }
        }
        for (key, v) in [
            ("user_message_rate", &self.auth.user_message_rate),
            ("user_recipient_rate", &self.auth.user_recipient_rate),
        ] {
            Rate::parse(v).map_err(|e| ConfigError::Invalid(format!("auth.{key}: {e}")))?;
        }
        if !matches!(self.auth.sender_policy.as_str(), "any" | "own") {
            return Err(ConfigError::Invalid(format!(
                "auth.sender_policy: expected \"any\" or \"own\", got {:?}",
                self.auth.sender_policy
            )));
        }
        for r in &self.auth.require_on {
            if !matches!(r.as_str(), "smtp" | "submission" | "smtps") {
                return Err(ConfigError::Invalid(format!(
                    "auth.require_on: unknown listener role {r:?} (expected smtp, submission, smtps)"
                )));
            }
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return Err(ConfigError::Invalid(format!(
                "log.format: expected \"text\" or \"json\", got {:?}",
                self.log.format
            )));
        }
        if !matches!(
            self.queue.starttls.as_str(),
            "opportunistic" | "required" | "never"
        ) {
            return Err(ConfigError::Invalid(format!(
                "queue.starttls: expected opportunistic, required or never, got {:?}",
                self.queue.starttls
            )));
        }
        if let Err(e) = tern_queue::route::DnsConfig::parse(&self.queue.resolver) {
            return Err(ConfigError::Invalid(format!("queue.{e}")));
        }
        let q = &self.queue;
        if !q.destination_rate.is_finite() || q.destination_rate < 0.0 {
            return Err(ConfigError::Invalid(format!(
                "queue.destination_rate: expected messages per second, 0 or more, got {}",
                q.destination_rate
            )));
        }
        // The route strings, the relay host and the TLS policy table: parsed here so that
        // check-config catches a typo, not only the server start.
        let relayhost = (!q.relayhost.is_empty()).then_some(q.relayhost.as_str());
        tern_queue::route::Router::from_config(
            relayhost,
            q.routes.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        )
        .and_then(|r| {
            r.with_mx_tls_policies(q.tls_policy.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        })
        .map_err(|e| ConfigError::Invalid(format!("queue: {e}")))?;
        if self.queue.concurrency == 0 || self.queue.high_water_messages == 0 {
            return Err(ConfigError::Invalid(
                "queue.concurrency and queue.high_water_messages must be positive".into(),
            ));
        }
        if self.auth.ip_failure_limit == 0 {
            return Err(ConfigError::Invalid(
                "auth.ip_failure_limit must be positive".into(),
            ));
        }
        if !self.cluster.redis.is_empty() {
            if let Err(e) = redis::Client::open(self.cluster.redis.as_str()) {
                return Err(ConfigError::Invalid(format!(
                    "cluster.redis: {:?} is not a Redis URL: {}",
                    redact_url(&self.cluster.redis),
                    redact_url(&e.to_string())
                )));
            }
        }
        if self.auth.max_failures == 0 {
            return Err(ConfigError::Invalid(
                "auth.max_failures must be positive".into(),
            ));
        }
        if self.spool.segment_size < 1024 * 1024 {
            return Err(ConfigError::Invalid(
                "spool.segment_size must be at least 1 MiB".into(),
            ));
        }
        if !(1..=tern_queue::commit::MAX_COMMITS_IN_FLIGHT).contains(&self.spool.commits_in_flight)
        {
            return Err(ConfigError::Invalid(format!(
                "spool.commits_in_flight must be 1 or {}",
                tern_queue::commit::MAX_COMMITS_IN_FLIGHT
            )));
        }
        if !(-20..=19).contains(&self.spool.syncer_nice) {
            return Err(ConfigError::Invalid(format!(
                "spool.syncer_nice must be between -20 and 19, got {}",
                self.spool.syncer_nice
            )));
        }
        if self.spool.state_commit_delay > Duration::from_secs(1) {
            return Err(ConfigError::Invalid(
                "spool.state_commit_delay must be at most 1s (deliveries hold their slot while it runs)".into(),
            ));
        }
        if self.spool.segment_size > tern_queue::spool::MAX_SEGMENT_SIZE {
            return Err(ConfigError::Invalid(
                "spool.segment_size must be at most 4 GiB (the queue index keeps 32-bit offsets)"
                    .into(),
            ));
        }
        // Each shard counts its preallocated active segment in its spool bytes: a share
        // below two segments would refuse mail with an empty queue.
        let hw = self.queue.high_water_bytes;
        if hw > 0 && hw / (self.shard_count() as u64) < 2 * self.spool.segment_size {
            return Err(ConfigError::Invalid(format!(
                "queue.high_water_bytes must be 0 (no limit) or at least 2 segments per shard \
                 ({} bytes with {} shards of spool.segment_size {})",
                2 * self.spool.segment_size * self.shard_count() as u64,
                self.shard_count(),
                self.spool.segment_size
            )));
        }
        Ok(())
    }

    /// The admin socket's path: `admin.socket`, or `admin.sock` in the spool directory.
    pub fn admin_socket(&self) -> PathBuf {
        if self.admin.socket.as_os_str().is_empty() {
            self.spool.dir.join("admin.sock")
        } else {
            self.admin.socket.clone()
        }
    }

    /// The number of shards to start: the configured count, or one per available core.
    pub fn shard_count(&self) -> usize {
        if self.shards > 0 {
            self.shards
        } else {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        }
    }
}

/// A configuration file holding a password (a `cluster.redis` URL, or a database URL in
/// `auth.users` or `auth.sender_map`) must not be readable by group or others, as the user
/// store file must not (`userstore::load`). Only the file's own values count: a password
/// given by `--set` is the command line's business.
fn check_secret_mode(cfg: &Config, text: &str, name: &str, mode: u32) -> Result<(), ConfigError> {
    if mode & 0o077 == 0 {
        return Ok(());
    }
    let redis_in_file = toml::from_str::<toml::Table>(text)
        .ok()
        .and_then(|t| t.get("cluster")?.get("redis")?.as_str().map(str::to_string))
        .is_some_and(|u| url_has_password(&u));
    let db_in_file = |url: Option<crate::pgusers::PgUrl>| {
        url.is_some_and(|u| u.has_password() && text.contains(u.secret()))
    };
    let users = match cfg.auth.user_store() {
        UserStore::Postgres(u) => Some(u),
        UserStore::File(_) => None,
    };
    let holders: Vec<&str> = [
        ("cluster.redis", redis_in_file),
        ("auth.users", db_in_file(users)),
        ("auth.sender_map", db_in_file(cfg.auth.sender_map_db())),
    ]
    .into_iter()
    .filter_map(|(key, has)| has.then_some(key))
    .collect();
    if holders.is_empty() {
        return Ok(());
    }
    Err(ConfigError::Invalid(format!(
        "{name}: mode {mode:04o} lets group or others read it, and {} holds a password; run \
         `chmod 600 {name}` (or give the password another way, e.g. peer authentication \
         over the Unix socket for PostgreSQL)",
        holders.join(" and ")
    )))
}

/// Applies one `key.path=value` override. The value is read as a TOML value when it parses
/// as one (numbers, booleans, arrays, quoted strings) and as a bare string otherwise, so
/// `--set spool.dir=/var/spool/tern` works without shell-quoting gymnastics.
fn apply_set(table: &mut toml::Table, arg: &str) -> Result<(), ConfigError> {
    let (key, raw) = arg.split_once('=').ok_or_else(|| ConfigError::SetSyntax {
        arg: arg.to_string(),
    })?;
    let key = key.trim();
    if key.is_empty() {
        return Err(ConfigError::SetSyntax {
            arg: arg.to_string(),
        });
    }
    let value = parse_set_value(raw.trim());
    let parts: Vec<&str> = key.split('.').collect();
    let mut cur = table;
    for part in &parts[..parts.len() - 1] {
        let entry = cur
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = match entry {
            toml::Value::Table(t) => t,
            _ => {
                return Err(ConfigError::SetPath {
                    key: key.to_string(),
                    message: format!("{part} is not a table"),
                })
            }
        };
    }
    cur.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

fn parse_set_value(raw: &str) -> toml::Value {
    let doc = format!("v = {raw}");
    match toml::from_str::<toml::Table>(&doc) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or(toml::Value::String(raw.to_string())),
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

/// The machine's host name, or "localhost" if it cannot be read.
pub fn system_hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: buf is valid for buf.len() bytes; gethostname NUL-terminates on success.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "localhost".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    match std::str::from_utf8(&buf[..end]) {
        Ok(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic()) => s.to_string(),
        _ => "localhost".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        let c = Config::from_toml_str("", "t", &[]).unwrap();
        assert_eq!(c.limits.command_line, 512);
        assert_eq!(c.limits.message_size, 50 * 1024 * 1024);
        assert_eq!(c.limits.idle_timeout, Duration::from_secs(300));
    }

    #[test]
    fn segment_size_and_high_water_bytes_bounds() {
        let e = Config::from_toml_str("shards = 1\n[spool]\nsegment_size = 8589934592\n", "t", &[])
            .unwrap_err();
        assert!(e.to_string().contains("at most 4 GiB"), "{e}");
        // 2 shards of 32 MiB segments need at least 128 MiB, or 0.
        let e = Config::from_toml_str(
            "shards = 2\n[queue]\nhigh_water_bytes = 100000000\n",
            "t",
            &[],
        )
        .unwrap_err();
        assert!(e.to_string().contains("high_water_bytes"), "{e}");
        let ok = Config::from_toml_str(
            "shards = 2\n[queue]\nhigh_water_bytes = 134217728\n",
            "t",
            &[],
        );
        assert_eq!(ok.unwrap().queue.high_water_bytes, 134_217_728);
    }

    #[test]
    fn redact_url_hides_only_the_password() {
        for (url, shown) in [
            ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379"),
            ("redis://:s3cret@h:6379/0", "redis://:***@h:6379/0"),
            ("redis://user:p@ss:w@h/1", "redis://user:***@h/1"),
            ("redis://user@h", "redis://user@h"),
            (
                "postgresql://tern:pw@db/tern?sslmode=require",
                "postgresql://tern:***@db/tern?sslmode=require",
            ),
            ("redis://h/path@x:y", "redis://h/path@x:y"),
            ("not a url", "not a url"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
        assert!(url_has_password("redis://:x@h"));
        assert!(!url_has_password("redis://h"));
    }

    #[test]
    fn cluster_redis_is_checked_and_shown_redacted() {
        let c = Config::from_toml_str(
            "[cluster]\nredis = \"redis://:pw@127.0.0.1:6379\"\n",
            "t",
            &[],
        )
        .unwrap();
        let shown = toml::to_string(&c).unwrap();
        assert!(shown.contains("redis://:***@127.0.0.1:6379"), "{shown}");
        assert!(!shown.contains("pw@"), "{shown}");
        let e = Config::from_toml_str("[cluster]\nredis = \"http://:pw@h\"\n", "t", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("cluster.redis") && !e.contains("pw"), "{e}");
    }

    #[test]
    fn a_config_with_a_password_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tern.toml");
        std::fs::write(&p, "[cluster]\nredis = \"redis://:pw@127.0.0.1:1\"\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Config::load(Some(&p), &[]).unwrap_err().to_string();
        assert!(e.contains("chmod 600") && !e.contains("pw"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(Config::load(Some(&p), &[]).is_ok());
        // Without a password the mode is the operator's business.
        std::fs::write(&p, "[cluster]\nredis = \"redis://127.0.0.1:1\"\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(Config::load(Some(&p), &[]).is_ok());
    }

    #[test]
    fn users_url_is_redacted_and_its_file_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tern.toml");
        std::fs::write(
            &p,
            "[auth]\nusers = \"postgresql://tern:s3cret@db.example/mail\"\n",
        )
        .unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Config::load(Some(&p), &[]).unwrap_err().to_string();
        assert!(e.contains("mode 0644") && e.contains("chmod 600"), "{e}");
        assert!(!e.contains("s3cret"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let c = Config::load(Some(&p), &[]).unwrap();
        assert!(matches!(c.auth.user_store(), UserStore::Postgres(_)));
        let shown = toml::to_string(&c).unwrap();
        assert!(
            shown.contains("postgresql://tern:***@db.example/mail"),
            "{shown}"
        );
        assert!(
            !shown.contains("s3cret") && !format!("{}", c.auth.user_store()).contains("s3cret")
        );
        // No password in the URL: the file's mode is the operator's business.
        std::fs::write(
            &p,
            "[auth]\nusers = \"postgresql://tern@db.example/mail\"\n",
        )
        .unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(Config::load(Some(&p), &[]).is_ok());
        // The sender map in the database: redacted and checked alike.
        std::fs::write(
            &p,
            "[auth]\nsender_map = \"postgresql://tern:s3cret@db.example/mail\"\n",
        )
        .unwrap();
        let e = Config::load(Some(&p), &[]).unwrap_err().to_string();
        assert!(e.contains("mode 0644"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let c = Config::load(Some(&p), &[]).unwrap();
        assert!(c.auth.sender_map_db().is_some() && c.senders.is_empty());
        let shown = toml::to_string(&c).unwrap();
        assert!(
            shown.contains("sender_map = \"postgresql://tern:***@db.example/mail\""),
            "{shown}"
        );
        // A file path stays a file.
        let c =
            Config::from_toml_str("[auth]\nusers = \"/etc/tern/users.db\"\n", "t", &[]).unwrap();
        assert_eq!(
            c.auth.user_store(),
            UserStore::File("/etc/tern/users.db".into())
        );
    }

    #[test]
    fn unknown_key_is_an_error() {
        let e = Config::from_toml_str("[limits]\nbogus = 1\n", "t", &[]).unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
    }

    #[test]
    fn queue_resolver_is_empty_or_an_address() {
        let ok = Config::from_toml_str("[queue]\nresolver = \"127.0.0.1:5353\"\n", "t", &[]);
        assert_eq!(ok.unwrap().queue.resolver, "127.0.0.1:5353");
        let e =
            Config::from_toml_str("[queue]\nresolver = \"dns.example\"\n", "t", &[]).unwrap_err();
        assert!(e.to_string().contains("queue.resolver"), "{e}");
    }

    #[test]
    fn queue_rate_routes_and_tls_policy_are_checked() {
        let ok = Config::from_toml_str(
            "[queue]\ndestination_rate = 0.5\ndestination_burst = 3\n\
             relayhost = \"[smart.example]:587 tls=verify\"\n\
             [queue.routes]\n\"slow.example\" = \"smtp:[10.0.0.1] rate=2 tls=encrypt\"\n\
             [queue.tls_policy]\n\".bank.example\" = \"verify ca=/etc/tern/ca.pem\"\n",
            "t",
            &[],
        )
        .unwrap();
        assert_eq!(ok.queue.destination_rate, 0.5);
        for (bad, key) in [
            ("[queue]\ndestination_rate = -1\n", "destination_rate"),
            (
                "[queue.routes]\n\"x.example\" = \"smtp:[h] tls=maybe\"\n",
                "attribute",
            ),
            ("[queue]\nrelayhost = \"[h] rate=fast\"\n", "attribute"),
            (
                "[queue.tls_policy]\n\"x.example\" = \"strict\"\n",
                "tls_policy",
            ),
        ] {
            let e = Config::from_toml_str(bad, "t", &[])
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{bad}: {e}");
        }
    }

    #[test]
    fn set_overrides() {
        let c = Config::from_toml_str(
            "",
            "t",
            &[
                "limits.recipients=5".into(),
                "spool.dir=/tmp/x y".into(),
                "listeners.smtp=[\"127.0.0.1:0\"]".into(),
                "limits.idle_timeout=10s".into(),
            ],
        )
        .unwrap();
        assert_eq!(c.limits.recipients, 5);
        assert_eq!(c.spool.dir, PathBuf::from("/tmp/x y"));
        assert_eq!(c.listeners.smtp.len(), 1);
        assert_eq!(c.limits.idle_timeout, Duration::from_secs(10));
    }

    #[test]
    fn bad_value_names_key() {
        let e = Config::from_toml_str("[limits]\nrecipients = \"many\"\n", "t", &[]).unwrap_err();
        let s = e.to_string();
        assert!(s.contains("recipients") && s.contains("line 2"), "{s}");
    }
}
