//! The user store's file: reading a snapshot from disk and rewriting it atomically.
//!
//! Owns: the I/O around `tern_smtp::users` (which owns the format and the snapshot):
//! the mode check on load and the atomic, fsync'ed rewrite `tern passwd` uses.
//! Must never: load a file that group or others can read (a stolen file is a
//! password-equivalent for CRAM-MD5 and DIGEST-MD5 and a fast offline dictionary target,
//! see docs/decisions.md), leave a torn file behind, or print a secret.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

pub use tern_smtp::users::{UserDb, UserDbError};

/// Load a snapshot. Refuses a file that group or others can read
/// (`mode & 0o077 != 0`) and names the first malformed line.
pub fn load(path: &Path) -> Result<UserDb, UserDbError> {
    let io_err = |source: io::Error| {
        if source.kind() == io::ErrorKind::NotFound {
            UserDbError::NotFound {
                path: path.to_owned(),
            }
        } else {
            UserDbError::Io {
                path: path.to_owned(),
                source,
            }
        }
    };
    let mut file = File::open(path).map_err(io_err)?;
    // fstat the open file, not the path, so the check and the read see
    // the same inode.
    let meta = file.metadata().map_err(io_err)?;
    if !meta.is_file() {
        return Err(UserDbError::NotRegular {
            path: path.to_owned(),
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(UserDbError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    let mut bytes = Vec::with_capacity(meta.len().min(64 << 20) as usize);
    file.read_to_end(&mut bytes).map_err(io_err)?;
    UserDb::parse(&bytes, path)
}

/// Write atomically: a 0600 temporary file in the same directory, fsync,
/// rename over `path`, fsync the directory (so the rename itself is
/// durable). Readers see the old or the new file, never a torn one.
pub fn save(db: &UserDb, path: &Path) -> Result<(), UserDbError> {
    let io_err = |p: &Path| {
        let p = p.to_owned();
        move |source| UserDbError::Io { path: p, source }
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "tern-users.db".into());
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        file.write_all(db.to_text().as_bytes())
            .map_err(io_err(&tmp))?;
        file.sync_all().map_err(io_err(&tmp))?;
        fs::rename(&tmp, path).map_err(io_err(path))?;
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&dir))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
#[path = "userstore_tests.rs"]
mod tests;
