//! The server: binds the listeners, starts one glommio executor (shard) per core, and
//! stops them gracefully on SIGTERM/SIGINT.
//!
//! All sockets are created on the main thread (`bind.rs`) before any shard starts: one
//! SO_REUSEPORT socket per configured address per shard, so the kernel spreads connections
//! over shards, a port 0 resolves to one real port for all of them, and binding errors are
//! reported before anything runs (and, later, before privileges are dropped). Each shard
//! then owns its sockets, its connections, its counters and its spool segments; the only
//! cross-thread traffic is the stop message and the per-shard control channel (user-store
//! reloads, admin-socket requests: see `admin.rs`).
//!
//! Must never: share mutable state between shards, or report "ready" before every shard
//! has opened its spool and holds its listeners.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::os::fd::{FromRawFd, IntoRawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use futures::channel::{mpsc, oneshot};
use futures::FutureExt;
use futures::StreamExt;
use futures_rustls::TlsAcceptor;
use glommio::net::TcpListener;
use glommio::{LocalExecutorBuilder, Placement};

use crate::anvil::{Anvil, AnvilLimits, Mesh};
use crate::config::Config;
use crate::config::UserStore;
use crate::conn::{self, ListenerCtx};
use crate::notify::LocalNotify;
use crate::pgusers::{self, Status as UsersStatus};
pub use crate::shard::{Control, Shard};
use crate::shard_hooks::ShardHooks;
use crate::spool::ShardStore;
use crate::tls::{self, Identity};
use crate::userstore::{self, UserDb, UserDbError};
use glommio::channels::channel_mesh::MeshBuilder;
use tern_smtp::hooks::SessionHooks;
use tern_smtp::policy::RelayPolicy;
use tern_smtp::sasl::nonces::NonceCache;
use tern_smtp::sasl::Mechanism;
use tern_smtp::session::{AuthSetup, AuthShared, ListenerKind, SessionConfig};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Bind(#[from] crate::bind::BindError),
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("shard {shard}: {message}")]
    Shard { shard: usize, message: String },
    #[error("privileges: {0}")]
    Privileges(#[from] crate::privileges::PrivError),
    #[error("user store: {0}")]
    Users(#[from] UserDbError),
    #[error("user store: {0}")]
    UserDatabase(#[from] crate::pgusers::PgError),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("{0}")]
    Admin(String),
}

/// The delivery task queue's share of a shard against the default queue's 1000 (sessions,
/// the committer): a quarter, used in full whenever sessions leave the CPU idle.
const DELIVERY_SHARES: usize = 250;

/// What `run` reports once every shard is up.
pub struct Ready {
    pub shards: usize,
    pub listeners: Vec<(ListenerKind, SocketAddr)>,
    /// The metrics endpoint, when `[metrics] listen` is set.
    pub metrics: Option<SocketAddr>,
}

/// What the CLI hands the server besides its configuration.
#[derive(Default)]
pub struct Hooks {
    /// Changes the log filter at run time (`tern ctl log-level`).
    pub log_level: Option<crate::admin::server::LogLevelFn>,
    /// Reads the configuration again (from the file and `--set`s the server started
    /// with), for SIGHUP and `tern ctl reload`. None: only the user store and certificate
    /// are reloaded.
    pub reload_config: Option<ConfigLoader>,
}

/// How to read the configuration again.
pub type ConfigLoader = Arc<dyn Fn() -> Result<Config, String> + Send + Sync>;

/// Settings that only take effect at start-up: a reload reports them instead of
/// pretending to apply them.
fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let same = |a: &dyn erased::Ser, b: &dyn erased::Ser| a.ser() == b.ser();
    let mut v = Vec::new();
    if !same(&old.listeners, &new.listeners) {
        v.push("listeners");
    }
    if old.shards != new.shards {
        v.push("shards");
    }
    if !same(&old.spool, &new.spool) {
        v.push("spool");
    }
    if !same(&old.executor, &new.executor) {
        v.push("executor");
    }
    if old.user != new.user || old.group != new.group || old.allow_root != new.allow_root {
        v.push("user/group");
    }
    if !same(&old.queue, &new.queue) {
        v.push("queue");
    }
    if !same(&old.admin, &new.admin) {
        v.push("admin");
    }
    if !same(&old.metrics, &new.metrics) {
        v.push("metrics");
    }
    if old.cluster.redis != new.cluster.redis {
        v.push("cluster");
    }
    if old.hostname != new.hostname {
        v.push("hostname");
    }
    // A database store is watched by a thread started with the server: switching to,
    // from or between databases needs a restart (a file may be renamed live).
    let (a, b) = (old.auth.user_store(), new.auth.user_store());
    if a != b && (matches!(a, UserStore::Postgres(_)) || matches!(b, UserStore::Postgres(_))) {
        v.push("auth.users");
    }
    let (a, b) = (old.auth.sender_map_db(), new.auth.sender_map_db());
    if (a.is_some() || b.is_some()) && old.auth.sender_map != new.auth.sender_map {
        v.push("auth.sender_map");
    }
    v
}

/// Comparing configuration sections through their TOML form (they all serialise).
mod erased {
    pub trait Ser {
        fn ser(&self) -> String;
    }
    impl<T: serde::Serialize> Ser for T {
        fn ser(&self) -> String {
            toml::to_string(self).unwrap_or_default()
        }
    }
}

/// SIGHUP / `tern ctl reload`: the configuration (what can change live: limits, relay
/// policy, AUTH settings, log format aside), the certificate and the user store. Sessions
/// already open keep the settings they started with.
fn reload_all(
    current: &Arc<Config>,
    loader: Option<&ConfigLoader>,
    controls: &[mpsc::UnboundedSender<Control>],
    users: &UsersSource,
) -> Result<usize, String> {
    let cfg = match loader.map(|f| f()) {
        Some(Ok(new)) => {
            for what in restart_only_changes(current, &new) {
                tracing::warn!(
                    section = what,
                    "configuration changed: takes effect after a restart"
                );
            }
            let new = Arc::new(new);
            for c in controls {
                let _ = c.unbounded_send(Control::Config(new.clone()));
            }
            tracing::info!("configuration reloaded");
            new
        }
        Some(Err(e)) => {
            tracing::error!(error = %e, "configuration not reloaded; keeping the previous one");
            current.clone()
        }
        None => current.clone(),
    };
    reload_tls(&cfg, controls);
    reload_users(&cfg, controls, users)
}

/// Where reloads of the user store go: the file (read again on this thread), or the
/// database watcher (asked to reload the whole table).
#[derive(Clone)]
enum UsersSource {
    File(Arc<UsersStatus>),
    Database(pgusers::Watcher),
}

/// Sends the stop message to every shard, once, whoever asks first (a signal or the admin
/// socket).
#[derive(Clone)]
struct Stopper(Arc<std::sync::Mutex<Option<Vec<oneshot::Sender<()>>>>>);

impl Stopper {
    /// False if the server was stopping already.
    fn stop(&self) -> bool {
        let stops = self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        let first = stops.is_some();
        for s in stops.into_iter().flatten() {
            let _ = s.send(());
        }
        first
    }
}

/// Starts the server and blocks until it has stopped. `on_ready` is called once every
/// shard is serving (the CLI prints the listening addresses there).
pub fn run(
    cfg: Config,
    identity: Identity,
    on_ready: impl FnOnce(&Ready),
) -> Result<(), ServerError> {
    run_with(cfg, identity, Hooks::default(), on_ready)
}

/// [`run`] with hooks.
pub fn run_with(
    cfg: Config,
    identity: Identity,
    hooks: Hooks,
    on_ready: impl FnOnce(&Ready),
) -> Result<(), ServerError> {
    // First, so that a second server on the same configuration is told so before it
    // binds anything (SO_REUSEPORT would let it share the ports). Removed on every return.
    let mut admin_socket =
        crate::admin::server::AdminSocket::bind(&cfg.admin_socket()).map_err(ServerError::Admin)?;
    let started = std::time::Instant::now();
    let shards = cfg.shard_count();
    // Held until the server returns: see `bind.rs`.
    let (_spool_lock, listeners) = crate::bind::bind_all(&cfg, shards)?;
    // Bound before the privilege drop, like the SMTP ports.
    // (The address was checked when the configuration was loaded.)
    let metrics_listener = match cfg.metrics.addr().ok().flatten() {
        Some(addr) => {
            let err = |source| {
                ServerError::Bind(crate::bind::BindError::Bind {
                    kind: "metrics",
                    addr,
                    source,
                })
            };
            let l = std::net::TcpListener::bind(addr).map_err(err)?;
            let bound = l.local_addr().map_err(err)?;
            Some((l, bound))
        }
        None => None,
    };
    let ready_info = Ready {
        shards,
        listeners: listeners.iter().map(|l| (l.kind, l.addr)).collect(),
        metrics: metrics_listener.as_ref().map(|(_, a)| *a),
    };
    // Ports are bound and the TLS key is loaded: give up root before any shard (and so
    // any client byte) exists. The admin socket becomes the service user's too.
    crate::privileges::drop_privileges(&cfg, &[&cfg.admin_socket()])?;
    let store = cfg.auth.user_store();
    let users_status = Arc::new(UsersStatus::new(
        store.to_string(),
        matches!(store, UserStore::Postgres(_)),
    ));
    let users = Arc::new(match &store {
        UserStore::File(_) => {
            let db = load_users(&cfg)?;
            users_status.loaded(db.len());
            db
        }
        // Unreachable at start: serve with no snapshot (AUTH 454 4.7.0) and catch up, as
        // Postfix's SQL maps answer "try again later" while their database is down.
        UserStore::Postgres(url) => {
            pgusers::first_snapshot(url, &users_status)?.unwrap_or_else(UserDb::unavailable)
        }
    });
    // A sender map in the database: a first map before any shard, like the users; an
    // unreachable database leaves it empty until reached (grants only ever widen what a
    // login may use, so the node is stricter meanwhile, never looser).
    let mut cfg = cfg;
    if let Some(url) = cfg.auth.sender_map_db() {
        match pgusers::connect(&url) {
            Ok(mut client) => {
                let map = pgusers::load_senders(&mut client, &url)?;
                tracing::info!(store = %url, entries = map.len(), "sender map loaded");
                cfg.senders = Arc::new(map);
            }
            Err(e) => {
                tracing::error!(store = %url, error = %e, "sender map database unreachable at start: no grants until it is reached")
            }
        }
    }
    let cfg = Arc::new(cfg);
    let ticketer = tls::ticketer()?;
    let mesh: Mesh = MeshBuilder::full(shards, 1024);
    // `[cluster] redis`: the queue the shards feed; the thread starts once the shards'
    // control channels exist (it answers through them).
    let cluster = (!cfg.cluster.redis.is_empty()).then(|| {
        let (tx, rx) = crossbeam::channel::bounded::<crate::cluster::Op>(65_536);
        let status = Arc::new(crate::cluster::Status::new(crate::config::redact_url(
            &cfg.cluster.redis,
        )));
        (crate::cluster::Link::new(tx, status.clone()), rx, status)
    });

    // Hand each shard its own socket of every listener.
    let mut per_shard: Vec<Vec<(ListenerKind, StdListener)>> =
        (0..shards).map(|_| Vec::new()).collect();
    for l in listeners {
        for (i, s) in l.sockets.into_iter().enumerate() {
            per_shard[i].push((l.kind, s));
        }
    }

    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<(usize, Result<(), String>)>();
    let mut stops = Vec::new();
    let mut controls = Vec::new();
    let mut handles = Vec::new();
    for (i, sockets) in per_shard.into_iter().enumerate() {
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        stops.push(stop_tx);
        let (control_tx, control_rx) = mpsc::unbounded::<Control>();
        controls.push(control_tx);
        let placement = if cfg.executor.pin {
            Placement::Fixed(i % cpus)
        } else {
            Placement::Unbound
        };
        let cfg = cfg.clone();
        let identity = identity.clone();
        let ticketer = ticketer.clone();
        let users = users.clone();
        let mesh = mesh.clone();
        let ready_tx = ready_tx.clone();
        let link = cluster.as_ref().map(|(l, _, _)| l.clone());
        // The blocking pool floats: its threads mostly wait on the disk.
        let builder = LocalExecutorBuilder::new(placement)
            .blocking_thread_pool_placement(glommio::PoolPlacement::Unbound(
                cfg.executor.blocking_threads.max(1),
            ))
            .name(&format!("tern-shard-{i}"))
            .io_memory(cfg.executor.io_memory)
            .ring_depth(cfg.executor.ring_depth);
        let handle = builder
            .spawn(move || async move {
                shard_main(
                    i, cfg, identity, ticketer, users, mesh, sockets, stop_rx, control_rx,
                    ready_tx, link,
                )
                .await
            })
            .map_err(|e| ServerError::Shard {
                shard: i,
                message: e.to_string(),
            })?;
        handles.push(handle);
    }
    drop(ready_tx);

    // Executor construction errors only show up on join, so every shard reports in.
    let mut failure = None;
    for _ in 0..shards {
        // A shard whose executor could not start never reports; don't wait forever.
        match ready_rx.recv_timeout(Duration::from_secs(60)) {
            Ok((_, Ok(()))) => {}
            Ok((shard, Err(message))) => {
                failure.get_or_insert(ServerError::Shard { shard, message });
            }
            Err(_) => {
                failure.get_or_insert(ServerError::Shard {
                    shard: 0,
                    message: "a shard exited during start-up".into(),
                });
                break;
            }
        }
    }
    let cluster_status = match cluster {
        Some((_, rx, status)) if failure.is_none() => {
            let client = redis::Client::open(cfg.cluster.redis.as_str()).map_err(|e| {
                ServerError::Admin(format!(
                    "cluster.redis: {}",
                    crate::config::redact_url(&e.to_string())
                ))
            })?;
            let to_shards = controls.clone();
            crate::cluster::redis::spawn(
                client,
                crate::cluster::FailureLimits {
                    ip_limit: cfg.auth.ip_failure_limit,
                    login_limit: cfg.auth.login_failure_limit,
                    window: cfg.auth.ip_failure_window,
                    block: cfg.auth.ip_block,
                },
                rx,
                status.clone(),
                Box::new(move |news| {
                    for c in &to_shards {
                        let _ = c.unbounded_send(Control::Cluster(news.clone()));
                    }
                }),
            )
            .map_err(|e| ServerError::Admin(format!("cannot start the redis thread: {e}")))?;
            Some(status)
        }
        _ => None,
    };
    let stopper = Stopper(Arc::new(std::sync::Mutex::new(Some(stops))));
    if let Some(e) = failure {
        stopper.stop();
        for h in handles {
            let _ = h.join();
        }
        return Err(e);
    }
    // A database store's watcher: LISTEN/NOTIFY, new snapshots to every shard.
    let users_source = match &store {
        UserStore::File(_) => UsersSource::File(users_status.clone()),
        UserStore::Postgres(url) => {
            let publish_to = controls.clone();
            let alive_check = controls.clone();
            let w = pgusers::spawn_watcher(
                url.clone(),
                users_status.clone(),
                Box::new(move |db| {
                    for c in &publish_to {
                        let _ = c.unbounded_send(Control::Users(db.clone()));
                    }
                }),
                Box::new(move || !alive_check.iter().all(|c| c.is_closed())),
            )
            .map_err(|e| {
                ServerError::Admin(format!("cannot start the user database thread: {e}"))
            })?;
            UsersSource::Database(w)
        }
    };
    if let Some(url) = cfg.auth.sender_map_db() {
        let publish_to = controls.clone();
        let alive_check = controls.clone();
        pgusers::spawn_senders_watcher(
            url,
            Box::new(move |map| {
                for c in &publish_to {
                    let _ = c.unbounded_send(Control::Senders(map.clone()));
                }
            }),
            Box::new(move || !alive_check.iter().all(|c| c.is_closed())),
        )
        .map_err(|e| ServerError::Admin(format!("cannot start the sender map thread: {e}")))?;
    }
    // Signal handling is installed before "ready" is announced, so a supervisor that
    // signals right after reading it never hits the default (fatal) action.
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
    ])
    .map_err(ServerError::Signals)?;
    let sig_handle = signals.handle();
    let reload_cfg = cfg.clone();
    let reload_controls = controls.clone();
    let sig_stopper = stopper.clone();
    let sig_loader = hooks.reload_config.clone();
    let sig_users = users_source.clone();
    std::thread::Builder::new()
        .name("tern-signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if sig == signal_hook::consts::SIGHUP {
                    tracing::info!("SIGHUP: reloading");
                    let _ = reload_all(
                        &reload_cfg,
                        sig_loader.as_ref(),
                        &reload_controls,
                        &sig_users,
                    );
                    continue;
                }
                tracing::info!(
                    signal = sig,
                    "stopping: no new connections, draining sessions"
                );
                sig_stopper.stop();
            }
        })
        .map_err(ServerError::Signals)?;
    {
        let reload_cfg = cfg.clone();
        let reload_controls = controls.clone();
        let admin_stopper = stopper.clone();
        let admin_loader = hooks.reload_config.clone();
        let admin_users = users_source.clone();
        crate::admin::server::spawn(
            &mut admin_socket,
            crate::admin::server::AdminCtx {
                controls: controls.clone(),
                stop: Box::new(move || admin_stopper.stop()),
                reload: Box::new(move || {
                    reload_all(
                        &reload_cfg,
                        admin_loader.as_ref(),
                        &reload_controls,
                        &admin_users,
                    )
                }),
                userstore: users_status.clone(),
                log_level: hooks.log_level,
                started,
                cluster: cluster_status.clone(),
                cluster_client: cluster_status
                    .as_ref()
                    .and_then(|_| redis::Client::open(cfg.cluster.redis.as_str()).ok()),
            },
        )
        .map_err(|e| ServerError::Admin(format!("cannot start the admin thread: {e}")))?;
    }
    if let Some((l, _)) = metrics_listener {
        crate::metrics::http::spawn_http(
            l,
            controls.clone(),
            cluster_status.clone(),
            users_status.clone(),
        )
        .map_err(|e| ServerError::Admin(format!("cannot start the metrics thread: {e}")))?;
    }
    spawn_users_watcher(cfg.clone(), controls, users_source);
    on_ready(&ready_info);
    crate::sdnotify::notify("READY=1");

    for h in handles {
        if let Err(e) = h.join() {
            tracing::error!(error = %e, "shard ended with an error");
        }
    }
    sig_handle.close();
    drop(admin_socket);
    tracing::info!("stopped");
    Ok(())
}

/// Loads the user store again and hands the new snapshot to every shard. A store that
/// fails to load (bad mode, syntax) is reported and the old one stays in force.
/// Loads the configured certificate and key again and hands them to every shard; a pair
/// that does not load is reported and the old one stays. (A generated certificate, used
/// when none is configured, is kept.)
fn reload_tls(cfg: &Config, controls: &[mpsc::UnboundedSender<Control>]) {
    let (Some(cert), Some(key)) = (&cfg.tls.cert, &cfg.tls.key) else {
        return;
    };
    match Identity::from_pem_files(cert, key) {
        Ok(identity) => {
            for c in controls {
                let _ = c.unbounded_send(Control::Tls(identity.clone()));
            }
            tracing::info!(cert = %cert.display(), "certificate reloaded");
        }
        Err(e) => tracing::error!(error = %e, "certificate not reloaded; keeping the previous one"),
    }
}

fn reload_users(
    cfg: &Config,
    controls: &[mpsc::UnboundedSender<Control>],
    source: &UsersSource,
) -> Result<usize, String> {
    let status = match source {
        UsersSource::Database(w) => return w.reload(),
        UsersSource::File(status) => status,
    };
    if let UserStore::Postgres(url) = cfg.auth.user_store() {
        // Never read a URL as a missing file (that would be an empty store).
        tracing::warn!(store = %url, "auth.users now names a database: takes effect after a restart; keeping the file's users");
        return Err("auth.users changed to a database: restart to use it".into());
    }
    match load_users(cfg) {
        Ok(db) => {
            let n = db.len();
            status.loaded(n);
            let db = Arc::new(db);
            for c in controls {
                let _ = c.unbounded_send(Control::Users(db.clone()));
            }
            Ok(n)
        }
        Err(e) => {
            tracing::error!(error = %e, "user store not reloaded; keeping the previous one");
            Err(format!("user store not reloaded: {e}"))
        }
    }
}

/// Reloads the user store when its file changes (`tern passwd` replaces it by rename, so
/// inode, size or mtime change), polling once a second.
fn spawn_users_watcher(
    cfg: Arc<Config>,
    controls: Vec<mpsc::UnboundedSender<Control>>,
    users: UsersSource,
) {
    use std::os::unix::fs::MetadataExt;
    let stamp = |p: &std::path::Path| {
        std::fs::metadata(p)
            .ok()
            .map(|m| (m.ino(), m.size(), m.mtime(), m.mtime_nsec()))
    };
    let mut last = stamp(&cfg.auth.users);
    // Whether the shards hold what the file says (false after a failed reload).
    let mut current = true;
    // The sender map is watched the same way (a path set at start; a reload that names
    // another file takes it over at that reload).
    let watch_map =
        !cfg.auth.sender_map.as_os_str().is_empty() && cfg.auth.sender_map_db().is_none();
    let mut last_map = watch_map.then(|| stamp(&cfg.auth.sender_map)).flatten();
    let _ = std::thread::Builder::new()
        .name("tern-users-watch".into())
        .spawn(move || loop {
            std::thread::sleep(Duration::from_secs(1));
            if controls.iter().all(|c| c.is_closed()) {
                return;
            }
            // A database store has its own watcher (LISTEN/NOTIFY).
            if let UsersSource::File(status) = &users {
                let now = stamp(&cfg.auth.users);
                if now != last {
                    last = now;
                    tracing::info!(file = %cfg.auth.users.display(), "user store changed: reloading");
                    current = reload_users(&cfg, &controls, &users).is_ok();
                }
                // The file is what the shards hold (its snapshot age stays near 0).
                if current {
                    status.verified();
                }
            }
            if watch_map {
                let now = stamp(&cfg.auth.sender_map);
                if now != last_map {
                    last_map = now;
                    match cfg.load_sender_map() {
                        Ok(map) => {
                            tracing::info!(file = %cfg.auth.sender_map.display(), entries = map.len(), "sender map changed: reloaded");
                            let map = Arc::new(map);
                            for c in &controls {
                                let _ = c.unbounded_send(Control::Senders(map.clone()));
                            }
                        }
                        Err(e) => tracing::error!(error = %e, "sender map changed but does not load; keeping the previous one"),
                    }
                }
            }
        });
}

/// Loads the user store; a missing file is an empty store (AUTH then always fails), so a
/// relay without users still starts, but a file with bad permissions or syntax is an error.
pub fn load_users(cfg: &Config) -> Result<UserDb, ServerError> {
    match userstore::load(&cfg.auth.users) {
        Ok(db) => {
            tracing::info!(users = db.len(), file = %cfg.auth.users.display(), "user store loaded");
            for (user, realm) in db.unreachable() {
                // A login splits at its first '@' (Cyrus): no login reaches this entry.
                tracing::warn!(
                    file = %cfg.auth.users.display(),
                    entry = %format_args!("{user}@{realm}"),
                    "user name contains '@': no login can reach it (logins split at the first '@'); recreate it as user@realm"
                );
            }
            Ok(db)
        }
        Err(UserDbError::NotFound { .. }) => {
            tracing::warn!(file = %cfg.auth.users.display(), "user store not found: no AUTH user can log in");
            Ok(UserDb::empty())
        }
        Err(e) => Err(e.into()),
    }
}

#[allow(clippy::too_many_arguments)]
async fn shard_main(
    id: usize,
    cfg: Arc<Config>,
    identity: Identity,
    ticketer: Arc<dyn rustls::server::ProducesTickets>,
    users: Arc<UserDb>,
    mesh: Mesh,
    sockets: Vec<(ListenerKind, StdListener)>,
    stop_rx: oneshot::Receiver<()>,
    mut control_rx: mpsc::UnboundedReceiver<Control>,
    ready_tx: std::sync::mpsc::Sender<(usize, Result<(), String>)>,
    cluster: Option<crate::cluster::Link>,
) {
    // How long deliveries in flight may still finish after a stop (the sessions' grace).
    let grace = cfg.shutdown.grace;
    // Join the anvil mesh first: every shard must join before any can go on, so a shard
    // must not bail out of start-up before this point.
    let anvil = match Anvil::join(
        mesh,
        AnvilLimits {
            limit: cfg.auth.ip_failure_limit,
            login_limit: cfg.auth.login_failure_limit,
            window: cfg.auth.ip_failure_window,
            cooldown: cfg.auth.ip_block,
        },
    )
    .await
    {
        Ok(a) => a,
        Err(e) => {
            let _ = ready_tx.send((id, Err(e)));
            return;
        }
    };
    anvil.set_user_rates(cfg.user_rates());
    if let Some(link) = cluster {
        anvil.set_cluster(link);
    }
    type ShardListeners = Vec<(Rc<ListenerCtx>, TcpListener)>;
    let setup = || -> Result<(Rc<Shard>, ShardListeners, Rc<AuthShared>), String> {
        // The queue index keeps envelopes on disk: recover only what is still to deliver.
        let (spool, recovered) = tern_queue::ShardSpool::open_with(
            &cfg.spool.dir,
            id as u16,
            tern_queue::SpoolOptions {
                segment_size: cfg.spool.segment_size,
            },
            tern_queue::spool::Listing::QueueOnly,
        )
        .map_err(|e| format!("spool: {e}"))?;
        tracing::info!(
            shard = id,
            queued = recovered.queue.len(),
            finished = recovered.finished,
            segments = recovered.segments,
            segments_deleted = recovered.segments_deleted,
            torn_tails_cut = recovered.torn_tails_cut,
            corrupt_skipped = recovered.corrupt_skipped,
            interrupted_skipped = recovered.interrupted_skipped,
            "spool recovered"
        );
        let commit = tern_queue::GroupCommit::with_syncer_nice(
            spool,
            cfg.spool.commits_in_flight,
            cfg.spool.commit.path(),
            Some(cfg.spool.syncer_nice),
        );
        commit.set_state_commit_delay(cfg.spool.state_commit_delay);
        let runner_cfg = crate::delivery::runner_config(&cfg, cfg.shard_count())
            .map_err(|e| format!("queue: {e}"))?;
        let runner =
            tern_queue::runner::Runner::new(id as u16, runner_cfg, commit.clone(), recovered.queue);
        // Deliveries run in a task queue of their own with a smaller share of the shard
        // than sessions: when both have work, a client waiting for its 250 goes first,
        // and the queue still drains whenever sessions are idle (shares, not priorities).
        let delivery_tq = glommio::executor().create_task_queue(
            glommio::Shares::Static(DELIVERY_SHARES),
            glommio::Latency::NotImportant,
            "delivery",
        );
        let run = runner.clone().run();
        match glommio::spawn_local_into(run, delivery_tq) {
            Ok(t) => {
                t.detach();
            }
            Err(e) => {
                tracing::warn!(shard = id, error = %e, "no delivery task queue; deliveries share the sessions' queue");
                glommio::spawn_local(runner.clone().run()).detach();
            }
        }
        {
            let r = runner.clone();
            anvil.set_on_flush(move || {
                r.flush();
            });
        }
        let metrics = Rc::new(crate::metrics::counters::ShardMetrics::default());
        let tls_cfg = tls::server_config(&identity, ticketer.clone()).map_err(|e| e.to_string())?;
        let acceptor = TlsAcceptor::from(tls_cfg);
        let shard = Rc::new(Shard {
            id,
            store: ShardStore::new(
                commit,
                &cfg.hostname,
                runner,
                id as u16,
                cfg.dkim_signer.clone(),
            ),
            stopping: LocalNotify::new(),
            tls: RefCell::new(acceptor.clone()),
            peers: anvil.clone(),
            idle_timeout: cfg.limits.idle_timeout,
            min_data_rate: cfg.limits.min_data_rate,
            grace: cfg.shutdown.grace,
            scratch: RefCell::new(vec![0u8; crate::conn::READ_BODY].into_boxed_slice()),
            metrics: metrics.clone(),
            connections: Cell::new(0),
            per_ip: RefCell::new(HashMap::new()),
            max_connections: cfg.limits.connections_per_shard,
            max_per_ip: cfg.limits.connections_per_ip,
            proxy_from: cfg.listeners.proxy_from.clone(),
            proxy_timeout: cfg.limits.proxy_timeout,
            drain_started: Cell::new(None),
            drain_delay: cfg.shutdown.drain_delay,
            milters: crate::milter::ShardMilters::new(&cfg.milters),
        });
        // One SASL state per shard: its own nonces, its own snapshot handle.
        let auth_shared = Rc::new(AuthShared {
            users: RefCell::new(users.clone()),
            nonces: RefCell::new(NonceCache::new(16_384, Duration::from_secs(300))),
            senders: RefCell::new(cfg.senders.clone()),
        });
        let hooks = |kind: ListenerKind| -> Rc<dyn SessionHooks> {
            Rc::new(ShardHooks {
                shard: id,
                listener: kind.name(),
                metrics: metrics.clone(),
                anvil: anvil.clone(),
                auth: Some((
                    auth_shared.clone(),
                    cfg.auth.realm_or(&cfg.hostname).to_string(),
                )),
            })
        };
        let mut ctxs: HashMap<&'static str, Rc<ListenerCtx>> = HashMap::new();
        let mut out = Vec::new();
        for (kind, sock) in sockets {
            let ctx = ctxs
                .entry(kind.name())
                .or_insert_with(|| {
                    Rc::new(ListenerCtx {
                        session: RefCell::new(Rc::new(session_config(
                            &cfg,
                            kind,
                            &auth_shared,
                            hooks(kind),
                        ))),
                        acceptor: Some(acceptor.clone()),
                    })
                })
                .clone();
            // SAFETY: the fd comes from a listening std socket we own and give up here.
            let l = unsafe { TcpListener::from_raw_fd(sock.into_raw_fd()) };
            out.push((ctx, l));
        }
        Ok((shard, out, auth_shared))
    };
    let (shard, listeners, auth_shared) = match setup() {
        Ok(v) => v,
        Err(e) => {
            let _ = ready_tx.send((id, Err(e)));
            return;
        }
    };
    let ctx_list: Vec<Rc<ListenerCtx>> = listeners.iter().map(|(c, _)| c.clone()).collect();
    for (ctx, listener) in listeners {
        let shard = shard.clone();
        glommio::spawn_local(accept_loop(listener, ctx, shard)).detach();
    }
    let _ = ready_tx.send((id, Ok(())));

    // Control messages from the main side (reloads, admin requests). Swapping the Arc is
    // all a reload does: sessions in an exchange keep the snapshot they cloned. An admin
    // request runs in a task of its own, so a long one does not hold up a reload.
    let control_shard = shard.clone();
    glommio::spawn_local(async move {
        while let Some(c) = control_rx.next().await {
            match c {
                Control::Cluster(news) => control_shard.peers.cluster_news(news),
                Control::Users(db) => {
                    *auth_shared.users.borrow_mut() = db;
                }
                Control::Senders(map) => {
                    *auth_shared.senders.borrow_mut() = map;
                }
                Control::Config(new) => {
                    // A database map arrives from its own thread (Control::Senders).
                    if new.auth.sender_map_db().is_none() {
                        *auth_shared.senders.borrow_mut() = new.senders.clone();
                    }
                    control_shard.peers.set_user_rates(new.user_rates());
                    control_shard.store.set_dkim(new.dkim_signer.clone());
                    control_shard.milters.set(&new.milters);
                    for ctx in &ctx_list {
                        let (kind, hooks) = {
                            let old = ctx.session.borrow();
                            (old.kind, old.hooks.clone())
                        };
                        let fresh = session_config(&new, kind, &auth_shared, hooks);
                        *ctx.session.borrow_mut() = Rc::new(fresh);
                    }
                    // "configuration reloaded" is said when the shards are told; from
                    // this line on, this shard's new sessions have the new settings.
                    tracing::info!(shard = id, "configuration applied");
                    // Outbound TLS: re-read the CA files (a changed bundle takes effect,
                    // and sessions verified under the old one are not resumed).
                    let runner = control_shard.store.runner().clone();
                    glommio::spawn_local(async move {
                        for e in runner.reload_client_tls().await {
                            tracing::error!(shard = id, error = %e, "outbound TLS configuration not reloaded");
                        }
                    })
                    .detach();
                }
                Control::Tls(identity) => match tls::server_config(&identity, ticketer.clone()) {
                    Ok(c) => *control_shard.tls.borrow_mut() = TlsAcceptor::from(c),
                    Err(e) => tracing::error!(shard = id, error = %e, "TLS not reloaded"),
                },
                Control::Metrics(reply) => {
                    let _ = reply.send(control_shard.metrics_snapshot());
                }
                Control::Admin(req, reply) => {
                    let shard = control_shard.clone();
                    glommio::spawn_local(async move {
                        let answer = crate::admin::server::on_shard(&shard, &req).await;
                        let _ = reply.send((shard.id, answer));
                    })
                    .detach();
                }
            }
        }
    })
    .detach();

    let _ = stop_rx.await;
    let stop_at = std::time::Instant::now();
    shard.stopping.fire();
    let runner = shard.store.runner().clone();
    runner.stop();
    // Sessions finish their transaction (bounded by the grace period) and close.
    while shard.connections.get() > 0 {
        glommio::timer::sleep(Duration::from_millis(20)).await;
    }
    // Deliveries in flight finish too, within the same grace: one cut short after the
    // next hop's 250 but before its state record is on disk would be sent again after the
    // restart. (A stuck one is cut at the grace, as before: at least once, not lost.)
    while runner.in_flight() > 0 && stop_at.elapsed() < grace {
        glommio::timer::sleep(Duration::from_millis(20)).await;
    }
    // Every batch still in flight (on the io_uring path: tasks of this executor, which
    // end with it) completes and reaches its waiters before the shard goes.
    shard.store.group_commit().close().await;
    tracing::debug!(shard = id, "shard stopped");
}

/// The session settings of one listener role on one shard, from `cfg`. Built at start-up
/// and again on every configuration reload (sessions already open keep theirs).
fn session_config(
    cfg: &Config,
    kind: ListenerKind,
    auth_shared: &Rc<AuthShared>,
    hooks: Rc<dyn SessionHooks>,
) -> SessionConfig {
    let mechs = |names: &[String]| -> Vec<Mechanism> {
        names
            .iter()
            .filter_map(|m| Mechanism::from_name(m))
            .collect()
    };
    let mechanisms = mechs(&cfg.auth.mechanisms);
    let auth = (!mechanisms.is_empty()).then(|| AuthSetup {
        mechanisms,
        relay_mechanisms: mechs(&cfg.auth.relay_mechanisms),
        allow_plaintext_without_tls: cfg.auth.allow_plaintext_without_tls,
        allow_authzid: cfg.auth.allow_authzid,
        max_failures: cfg.auth.max_failures,
        tarpit: cfg.auth.tarpit,
        required: cfg.auth.require_on.iter().any(|r| r == kind.name()),
        sender_own: cfg.auth.sender_policy == "own",
        check_header_from: cfg.auth.check_header_from,
        realm: cfg.auth.realm_or(&cfg.hostname).to_string(),
        shared: auth_shared.clone(),
    });
    SessionConfig {
        hostname: cfg.hostname.clone(),
        kind,
        limits: cfg.session_limits(),
        tls_available: true,
        policy: RelayPolicy::new(&cfg.relay.local_domains, &cfg.relay.trusted_networks),
        auth,
        hooks,
        ehlo_cache: Default::default(),
    }
}

async fn accept_loop(listener: TcpListener, ctx: Rc<ListenerCtx>, shard: Rc<Shard>) {
    let mut stop = shard.stopping.wait();
    loop {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            (&mut stop).await;
            None
        })
        .await;
        match accepted {
            None => break,
            Some(Ok(stream)) => {
                let peer = match stream.peer_addr() {
                    Ok(p) => p,
                    Err(_) => continue,
                };
                // A bug in one session must not take the whole shard down with it.
                let fut = std::panic::AssertUnwindSafe(conn::serve(
                    stream,
                    peer,
                    ctx.clone(),
                    shard.clone(),
                ))
                .catch_unwind();
                glommio::spawn_local(async move {
                    if fut.await.is_err() {
                        tracing::error!(%peer, "session task panicked; connection dropped");
                    }
                })
                .detach();
            }
            Some(Err(e)) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(shard = shard.id, error = %e, "accept failed");
                glommio::timer::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    // Dropping the listener closes this shard's socket; the kernel stops routing to it.
}
