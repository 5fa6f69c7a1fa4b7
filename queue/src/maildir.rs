//! Local delivery into a Maildir (the qmail maildir(5) convention).
//!
//! Owns: creating `tmp/`, `new/`, `cur/` (mode 0700) when missing, writing one message per
//! recipient to `tmp/` under a unique name with `Return-Path:` and `Delivered-To:`
//! prepended, making it durable (fsync of the file, rename into `new/`, fsync of `new/`),
//! and cleaning up `tmp/` when any step fails.
//! Must never: overwrite an existing file (O_EXCL), leave a partial message in `new/`
//! (the rename is the commit point), or run on a shard thread (these are blocking
//! syscalls: the runner calls [`deliver`] through `spawn_blocking`).
//!
//! The message is stored with LF line endings, as maildir(5) files are (Postfix's
//! `virtual`, Dovecot's LDA and qmail all write them so; a reader that sees CRLF may keep
//! the CR in every line). Every CRLF of the body becomes LF while it is written, a slice at
//! a time through a small buffer (no copy of the whole body); a lone CR is data and stays.
//! The two added header lines end in LF too.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::envelope::Envelope;

/// What went wrong, and where.
#[derive(Debug, thiserror::Error)]
pub enum MaildirError {
    #[error("recipient index {0} out of range")]
    BadRecipient(usize),
    /// A CR, LF or other control in an address would corrupt the added headers.
    #[error("address {0:?} cannot be written into a header")]
    BadAddress(String),
    #[error("cannot create {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot sync {path}: {source}")]
    Sync {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot move {from} to {to}: {source}")]
    Rename {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl MaildirError {
    /// Out of space or quota: worth retrying later rather than bouncing.
    pub fn is_no_space(&self) -> bool {
        let src = match self {
            MaildirError::CreateDir { source, .. }
            | MaildirError::Write { source, .. }
            | MaildirError::Sync { source, .. }
            | MaildirError::Rename { source, .. } => source,
            _ => return false,
        };
        matches!(src.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
    }
}

/// Per-process sequence for unique names.
static SEQ: AtomicU64 = AtomicU64::new(0);

/// Delivers `body` for recipient `rcpt` of `env` into `maildir`; returns the path in `new/`.
pub fn deliver(
    maildir: &Path,
    env: &Envelope,
    rcpt: usize,
    body: &[u8],
    hostname: &str,
) -> Result<PathBuf, MaildirError> {
    let r = env
        .recipients
        .get(rcpt)
        .ok_or(MaildirError::BadRecipient(rcpt))?;
    for a in [&env.sender, &r.addr] {
        if a.bytes().any(|b| b < 0x20 || b == 0x7f) {
            return Err(MaildirError::BadAddress(a.clone()));
        }
    }
    ensure_dirs(maildir)?;

    let name = unique_name(hostname);
    let tmp = maildir.join("tmp").join(&name);
    let new = maildir.join("new").join(&name);
    let header = format!("Return-Path: <{}>\nDelivered-To: {}\n", env.sender, r.addr);

    let result = write_file(&tmp, header.as_bytes(), body).and_then(|()| {
        // maildir(5): the rename is the moment of delivery. The name is unique, so
        // rename cannot replace another message (link()+unlink() is the classic way to
        // be sure; with our unique names rename is enough and works on more filesystems).
        std::fs::rename(&tmp, &new).map_err(|source| MaildirError::Rename {
            from: tmp.clone(),
            to: new.clone(),
            source,
        })
    });
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(&maildir.join("new"))?;
    Ok(new)
}

fn write_file(path: &Path, header: &[u8], body: &[u8]) -> Result<(), MaildirError> {
    let werr = |source| MaildirError::Write {
        path: path.to_path_buf(),
        source,
    };
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(werr)?;
    // A 64 KiB buffer: the body goes out in pieces between CRLFs, gathered into few
    // write(2)s.
    let mut w = io::BufWriter::with_capacity(64 * 1024, f);
    w.write_all(header).map_err(werr)?;
    write_lf(&mut w, body).map_err(werr)?;
    let f = w.into_inner().map_err(|e| werr(e.into_error()))?;
    f.sync_all().map_err(|source| MaildirError::Sync {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes `bytes` with every CRLF as LF; a CR not followed by LF is kept.
pub fn write_lf(w: &mut impl Write, bytes: &[u8]) -> io::Result<()> {
    let mut start = 0;
    for lf in memchr::memchr_iter(b'\n', bytes) {
        // `start` is 0 or the position of the previous LF, so `lf - 1 >= start` here.
        if lf > start && bytes[lf - 1] == b'\r' {
            w.write_all(&bytes[start..lf - 1])?;
            // The LF goes out with the next piece.
            start = lf;
        }
    }
    w.write_all(&bytes[start..])
}

fn ensure_dirs(maildir: &Path) -> Result<(), MaildirError> {
    let mut created = false;
    for sub in ["", "tmp", "new", "cur"] {
        let p = maildir.join(sub);
        if p.is_dir() {
            continue;
        }
        match DirBuilder::new().recursive(true).mode(0o700).create(&p) {
            Ok(()) => created = true,
            Err(source) if source.kind() == io::ErrorKind::AlreadyExists && p.is_dir() => {}
            Err(source) => return Err(MaildirError::CreateDir { path: p, source }),
        }
    }
    if created {
        // Make the new directories themselves durable before a message depends on them.
        sync_dir(maildir)?;
        if let Some(parent) = maildir.parent() {
            let _ = sync_dir(parent);
        }
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), MaildirError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| MaildirError::Sync {
            path: dir.to_path_buf(),
            source,
        })
}

/// `secs.MusecPpidQseq.host` (the Maildir++/Dovecot style of maildir(5) unique names);
/// '/' and ':' in the host name are written as `\057` and `\072`.
fn unique_name(hostname: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let mut host = String::with_capacity(hostname.len());
    for c in hostname.chars() {
        match c {
            '/' => host.push_str("\\057"),
            ':' => host.push_str("\\072"),
            c if c.is_control() => host.push('_'),
            c => host.push(c),
        }
    }
    if host.is_empty() {
        host.push_str("localhost");
    }
    format!(
        "{}.M{}P{}Q{}.{}",
        now.as_secs(),
        now.subsec_micros(),
        std::process::id(),
        seq,
        host
    )
}

#[cfg(test)]
mod tests {
    use super::write_lf;

    fn lf(b: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        write_lf(&mut out, b).unwrap();
        out
    }

    #[test]
    fn crlf_becomes_lf_and_a_lone_cr_stays() {
        assert_eq!(lf(b""), b"");
        assert_eq!(lf(b"\r\n"), b"\n");
        assert_eq!(lf(b"a\r\nb\r\n\r\nc"), b"a\nb\n\nc");
        assert_eq!(lf(b"a\rb\n\r\r\n"), b"a\rb\n\r\n");
        assert_eq!(lf(b"\n\n\r"), b"\n\n\r");
        assert_eq!(lf(b"\r\r\n\r\n"), b"\r\n\n");
        // Against a plain replace, on every short string over {a, CR, LF}.
        for n in 0..6u32 {
            for code in 0..3u32.pow(n) {
                let mut c = code;
                let s: Vec<u8> = (0..n)
                    .map(|_| {
                        let b = b"a\r\n"[(c % 3) as usize];
                        c /= 3;
                        b
                    })
                    .collect();
                let want = String::from_utf8(s.clone()).unwrap().replace("\r\n", "\n");
                assert_eq!(lf(&s), want.as_bytes(), "{s:?}");
            }
        }
    }
}
