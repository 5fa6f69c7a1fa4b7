//! Privilege drop: started as root, tern binds its ports, then becomes an unprivileged
//! user before any shard starts, so no client byte is ever read as root.
//!
//! Owns: resolving `user`/`group`, handing that user the spool and user store (owner-only
//! modes), clearing supplementary groups, setgid then setuid, and checking that root cannot
//! be regained. Must never: continue as root unless `allow_root` says so, or drop
//! privileges after a shard thread exists (every thread must end up with the same ids).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum PrivError {
    #[error("running as root: set `user` (an unprivileged account to switch to) or, for a test box, `allow_root = true`")]
    RootNotAllowed,
    #[error("unknown user {0:?}")]
    NoUser(String),
    #[error("unknown group {0:?}")]
    NoGroup(String),
    #[error("`user` is set but tern was not started as root (cannot switch users)")]
    NotRoot,
    #[error("{what}: {source}")]
    Sys {
        what: String,
        source: std::io::Error,
    },
}

fn sys(what: impl Into<String>) -> PrivError {
    PrivError::Sys {
        what: what.into(),
        source: std::io::Error::last_os_error(),
    }
}

/// Drops privileges as configured. Call after every privileged action (binding ports,
/// reading keys) and before starting shards. `also_own` are further files created while
/// root (the admin socket) that the service user must own.
pub fn drop_privileges(cfg: &Config, also_own: &[&Path]) -> Result<(), PrivError> {
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if cfg.user.is_empty() {
        if root && !cfg.allow_root {
            return Err(PrivError::RootNotAllowed);
        }
        return Ok(());
    }
    if !root {
        return Err(PrivError::NotRoot);
    }
    let (uid, user_gid) = lookup_user(&cfg.user)?;
    let gid = if cfg.group.is_empty() {
        user_gid
    } else {
        lookup_group(&cfg.group)?
    };
    // The spool and the user store belong to the service user, owner-only.
    chown_tree(&cfg.spool.dir, uid, gid)?;
    if cfg.auth.users.exists() {
        chown(&cfg.auth.users, uid, gid)?;
    }
    for p in also_own {
        if p.exists() {
            chown(p, uid, gid)?;
        }
    }
    raise_nice_limit(cfg.spool.syncer_nice);
    // SAFETY: plain syscalls on integers; order matters (groups and gid while still root).
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0 {
            return Err(sys("setgroups"));
        }
        if libc::setgid(gid) != 0 {
            return Err(sys("setgid"));
        }
        if libc::setuid(uid) != 0 {
            return Err(sys("setuid"));
        }
        // Root must be gone for good.
        if libc::setuid(0) == 0 || libc::geteuid() == 0 {
            return Err(PrivError::Sys {
                what: "privilege drop".into(),
                source: std::io::Error::other("could regain root after setuid"),
            });
        }
    }
    tracing::info!(user = %cfg.user, uid, gid, "dropped privileges");
    Ok(())
}

/// While still root: lets the unprivileged user set `nice` (the spool syncers' negative
/// nice value) after the drop, through RLIMIT_NICE (allowed nice = 20 - limit), which
/// survives setuid where CAP_SYS_NICE does not. Failure only costs the syncers their
/// priority (they warn), so it is logged, not fatal.
fn raise_nice_limit(nice: i32) {
    if nice >= 0 {
        return;
    }
    let want = (20 - nice) as libc::rlim_t;
    let mut cur = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write/read only the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NICE, &mut cur) == 0 && cur.rlim_cur >= want {
            return;
        }
        let lim = libc::rlimit {
            rlim_cur: want,
            rlim_max: want.max(cur.rlim_max),
        };
        if libc::setrlimit(libc::RLIMIT_NICE, &lim) != 0 {
            tracing::warn!(error = %std::io::Error::last_os_error(), "cannot raise RLIMIT_NICE for the spool syncer threads");
        }
    }
}

fn lookup_user(name: &str) -> Result<(u32, u32), PrivError> {
    let c = CString::new(name).map_err(|_| PrivError::NoUser(name.into()))?;
    // SAFETY: getpwnam returns a pointer to static storage or null; read at once, before
    // any other thread exists (this runs before shards start).
    let pw = unsafe { libc::getpwnam(c.as_ptr()) };
    if pw.is_null() {
        return Err(PrivError::NoUser(name.into()));
    }
    // SAFETY: non-null pointer from getpwnam.
    let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
    if uid == 0 {
        return Err(PrivError::NoUser(format!(
            "{name} (uid 0 is not unprivileged)"
        )));
    }
    Ok((uid, gid))
}

fn lookup_group(name: &str) -> Result<u32, PrivError> {
    let c = CString::new(name).map_err(|_| PrivError::NoGroup(name.into()))?;
    // SAFETY: as for getpwnam.
    let gr = unsafe { libc::getgrnam(c.as_ptr()) };
    if gr.is_null() {
        return Err(PrivError::NoGroup(name.into()));
    }
    // SAFETY: non-null pointer from getgrnam.
    Ok(unsafe { (*gr).gr_gid })
}

fn chown(path: &Path, uid: u32, gid: u32) -> Result<(), PrivError> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| sys(format!("chown {}", path.display())))?;
    // SAFETY: valid NUL-terminated path; lchown does not follow symlinks.
    if unsafe { libc::lchown(c.as_ptr(), uid, gid) } != 0 {
        return Err(sys(format!("chown {}", path.display())));
    }
    Ok(())
}

/// Gives `dir` and everything below it to uid:gid (creating `dir` if missing, mode 0700).
fn chown_tree(dir: &Path, uid: u32, gid: u32) -> Result<(), PrivError> {
    use std::os::unix::fs::PermissionsExt;
    if !dir.exists() {
        std::fs::create_dir_all(dir).map_err(|source| PrivError::Sys {
            what: format!("create {}", dir.display()),
            source,
        })?;
    }
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    chown(dir, uid, gid)?;
    let entries = std::fs::read_dir(dir).map_err(|source| PrivError::Sys {
        what: format!("list {}", dir.display()),
        source,
    })?;
    for e in entries.flatten() {
        let p = e.path();
        match e.file_type() {
            Ok(t) if t.is_dir() => chown_tree(&p, uid, gid)?,
            Ok(t) if t.is_symlink() => {}
            Ok(_) => chown(&p, uid, gid)?,
            Err(_) => {}
        }
    }
    Ok(())
}
