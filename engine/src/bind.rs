//! Binding the SMTP listeners at start-up, and refusing a second server on the same ports
//! or the same spool, without refusing a restart.
//!
//! glommio listens with SO_REUSEPORT, which would let a second tern share our ports and
//! silently take part of the traffic. So every fixed port is first probed with a plain
//! bind, which fails while anyone else listens there, and only then bound once per shard
//! with SO_REUSEPORT.
//!
//! A server killed with SIGKILL and started again at once (systemd's `Restart=`) used to
//! fail that probe about half the time: the kernel tears down the dead process's io_uring,
//! and with it its listening sockets, only after the process has been reaped. Hence the
//! order here: first the spool directory is locked (an flock on the directory itself,
//! held for the life of the process and dropped by the kernel the moment the process
//! dies, unlike the sockets), so a second server on the same spool is refused at once;
//! then, the spool being ours, a port still in use is most likely our predecessor's socket
//! on its way out, and the probe is retried for [`PROBE_PATIENCE`] before giving up. A
//! second server on another spool but the same ports is still refused, only that late.
//!
//! (The lock is not the shards' `shard-NNN/LOCK`: those must be free when the shards
//! open their spools, after the ports are bound.)
//!
//! Must never: hand out an SO_REUSEPORT socket on a port someone else listens on.

use std::fs::File;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use crate::config::Config;
use tern_smtp::session::ListenerKind;

/// Why the listeners or the spool lock could not be had.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("cannot listen on {addr} ({kind}): {source}")]
    Bind {
        kind: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Spool(String),
}

/// How long a port still in use is probed again, the spool being ours, before start-up
/// fails: a dead predecessor's sockets are gone well within it (measured: milliseconds to
/// a few hundred on a loaded machine).
pub const PROBE_PATIENCE: Duration = Duration::from_secs(5);

/// One configured address, bound once per shard.
pub struct BoundListener {
    pub kind: ListenerKind,
    pub addr: SocketAddr,
    pub(crate) sockets: Vec<StdListener>,
}

/// The flock on the spool directory; held as long as this lives (keep it for the life of
/// the server).
pub struct SpoolLock {
    _dir: File,
}

/// Locks the spool directory `dir` (creating it), or says that another server holds it.
pub fn lock_spool(dir: &Path) -> Result<SpoolLock, BindError> {
    let shown = dir.display();
    std::fs::create_dir_all(dir)
        .map_err(|e| BindError::Spool(format!("cannot create {shown}: {e}")))?;
    let f = File::open(dir).map_err(|e| BindError::Spool(format!("cannot open {shown}: {e}")))?;
    // SAFETY: flock on a valid, owned file descriptor; no memory is passed.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(BindError::Spool(
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                format!("spool {shown} is in use by another server (is tern already running?)")
            } else {
                format!("cannot lock {shown}: {e}")
            },
        ));
    }
    Ok(SpoolLock { _dir: f })
}

/// Locks the spool, then creates `shards` SO_REUSEPORT listening sockets for every
/// configured address (see the module docs). Keep the lock as long as the server runs.
pub fn bind_all(cfg: &Config, shards: usize) -> Result<(SpoolLock, Vec<BoundListener>), BindError> {
    let lock = lock_spool(&cfg.spool.dir)?;
    let mut out = Vec::new();
    let kinds = [
        (ListenerKind::Smtp, &cfg.listeners.smtp),
        (ListenerKind::Submission, &cfg.listeners.submission),
        (ListenerKind::Smtps, &cfg.listeners.smtps),
    ];
    for (kind, addrs) in kinds {
        for &addr in addrs.iter() {
            let err = |source| BindError::Bind {
                kind: kind.name(),
                addr,
                source,
            };
            if addr.port() != 0 {
                probe(addr).map_err(|e| BindError::Bind {
                    kind: kind.name(),
                    addr,
                    source: if e.kind() == std::io::ErrorKind::AddrInUse {
                        std::io::Error::new(
                            e.kind(),
                            "address already in use (is another server running?)",
                        )
                    } else {
                        e
                    },
                })?;
            }
            let mut sockets = Vec::with_capacity(shards);
            let mut actual = addr;
            for _ in 0..shards {
                let s = reuseport_socket(actual).map_err(err)?;
                if actual.port() == 0 {
                    actual = s.local_addr().map_err(err)?;
                }
                sockets.push(s);
            }
            out.push(BoundListener {
                kind,
                addr: actual,
                sockets,
            });
        }
    }
    Ok((lock, out))
}

/// A plain bind of `addr` (closed again at once) succeeds: nobody listens there. "In use"
/// is retried for [`PROBE_PATIENCE`] (call it with the spool locked).
fn probe(addr: SocketAddr) -> std::io::Result<()> {
    let deadline = Instant::now() + PROBE_PATIENCE;
    let mut told = false;
    loop {
        match StdListener::bind(addr) {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline => {
                if !told {
                    tracing::info!(%addr, "address still in use (a previous server's socket closing?): waiting");
                    told = true;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e),
        }
    }
}

fn reuseport_socket(addr: SocketAddr) -> std::io::Result<StdListener> {
    let domain = if addr.is_ipv6() {
        Domain::IPV6
    } else {
        Domain::IPV4
    };
    let s = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        // Keep [::] from also claiming the IPv4 port, so both can be configured.
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s.into())
}
