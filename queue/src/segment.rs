//! One shard's segment files: naming, creation (preallocated and zeroed), the shard
//! lock, mapping for reads, and the raw positioned-write/sync calls.
//!
//! Owns: every syscall that creates, writes, syncs or maps a segment file.
//! Must never: extend a segment on the commit path (segments are created at full size
//! and filled with zeros, so a record write only overwrites allocated blocks and the
//! fdatasync has no metadata to flush); write through a mapping (mappings are read-only;
//! the stack notes measured mmap+msync as the slowest way to make data durable); touch
//! another shard's directory for writing; truncate a segment (a reader's mapping of a
//! truncated file would fault with SIGBUS).

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use memmap2::Mmap;

use crate::error::SpoolError;
use crate::record::SegmentHeader;

/// `DIR/shard-NNN`.
pub fn shard_dir(dir: &Path, shard: u16) -> PathBuf {
    dir.join(format!("shard-{shard:03}"))
}

/// Parses `shard-NNN` back into a shard number.
pub fn parse_shard_dir_name(name: &str) -> Option<u16> {
    let digits = name.strip_prefix("shard-")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The shard directories (`shard-NNN`) under a spool directory, by shard number.
pub fn shard_dirs(dir: &Path) -> std::io::Result<Vec<(u16, PathBuf)>> {
    let mut v: Vec<(u16, PathBuf)> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let s = e.file_name().to_str().and_then(parse_shard_dir_name)?;
            Some((s, e.path()))
        })
        .collect();
    v.sort();
    Ok(v)
}

/// Zero-padded so that a plain directory listing sorts segments by number.
pub fn segment_file_name(number: u64) -> String {
    format!("{number:016}.seg")
}

pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".seg")?;
    if digits.len() != 16 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The segments in a shard directory, sorted by number.
pub fn list_segments(shard_dir: &Path) -> Result<Vec<(u64, PathBuf)>, SpoolError> {
    let rd = fs::read_dir(shard_dir)
        .map_err(|e| SpoolError::io(format!("listing {}", shard_dir.display()), e))?;
    let mut out = Vec::new();
    for entry in rd {
        let entry =
            entry.map_err(|e| SpoolError::io(format!("listing {}", shard_dir.display()), e))?;
        let name = entry.file_name();
        if let Some(n) = name.to_str().and_then(parse_segment_file_name) {
            out.push((n, entry.path()));
        }
    }
    out.sort_by_key(|(n, _)| *n);
    Ok(out)
}

/// A segment that can take appends. Shared (via `Arc`) between the shard's `ShardSpool`
/// and the `PendingWrite`s of records reserved in it, which may be written on a blocking
/// thread.
#[derive(Debug)]
pub struct SegmentHandle {
    pub number: u64,
    pub file: File,
    pub salt: u64,
    pub size: u64,
    pub path: PathBuf,
    /// Set when a write or fdatasync on this file failed. After a failed fdatasync the
    /// kernel may have dropped the dirty pages and cleared the error, so a later sync
    /// could "succeed" without the data on disk (fsyncgate, 2018): never append again.
    retired: AtomicBool,
    /// Held across "fdatasync → retire on failure → check retired" (thread path). With
    /// two batches in flight on one file, a writeback error is reported to whichever
    /// fdatasync comes first (once per open file description): without this, batch B
    /// could take the error covering batch A's pages while A's sync returns 0 and A is
    /// released before B has retired the segment. Serialised, the second sync always
    /// sees the first one's retirement. Syncer threads only; never a shard.
    sync_lock: std::sync::Mutex<()>,
    /// The same rule for the io_uring path, whose syncs are tasks of one executor (an
    /// async lock: a blocking one would deadlock the executor).
    async_sync_lock: futures::lock::Mutex<()>,
    /// Unit tests only: a fault to inject into this segment's next syncs (see
    /// [`SyncFault`]), on either commit path, where no libc shim can reach (the io_uring
    /// path never calls libc's fdatasync).
    #[cfg(test)]
    fault: std::sync::atomic::AtomicU8,
}

/// A fault a unit test makes every sync of one segment hit (`SegmentHandle::inject`).
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SyncFault {
    /// The sync fails with EIO, as an fdatasync whose writeback failed does.
    Eio = 1,
    /// The sync panics (a bug in the commit path).
    Panic = 2,
}

impl SegmentHandle {
    pub fn new(number: u64, file: File, salt: u64, size: u64, path: PathBuf) -> Self {
        SegmentHandle {
            number,
            file,
            salt,
            size,
            path,
            retired: AtomicBool::new(false),
            sync_lock: std::sync::Mutex::new(()),
            async_sync_lock: futures::lock::Mutex::new(()),
            #[cfg(test)]
            fault: std::sync::atomic::AtomicU8::new(0),
        }
    }

    /// Unit tests: every later sync of this segment hits `fault`.
    #[cfg(test)]
    pub(crate) fn inject(&self, fault: SyncFault) {
        self.fault.store(fault as u8, Ordering::Release);
    }

    /// The injected fault's outcome instead of the real sync (unit tests only).
    fn injected(&self) -> Option<std::io::Result<()>> {
        #[cfg(test)]
        match self.fault.load(Ordering::Acquire) {
            1 => return Some(Err(std::io::Error::from_raw_os_error(libc::EIO))),
            2 => panic!("injected panic in the sync of segment {}", self.number),
            _ => {}
        }
        None
    }

    /// Runs `sync` (this file's fdatasync) under the segment's sync lock and answers
    /// whether this batch's writes are durable: the sync succeeded *and* no sync of
    /// another batch retired the segment (having consumed an error that may cover our
    /// pages). A failure retires the segment before the lock is released.
    pub fn sync_checked(&self, sync: impl FnOnce() -> std::io::Result<()>) -> std::io::Result<()> {
        let _serial = self.sync_lock.lock().unwrap_or_else(|e| e.into_inner());
        let r = match self.injected() {
            Some(r) => r,
            None => sync(),
        };
        self.checked(r)
    }

    /// [`SegmentHandle::sync_checked`] for an asynchronous sync (the io_uring path).
    pub async fn sync_checked_async<F>(&self, sync: F) -> std::io::Result<()>
    where
        F: std::future::Future<Output = std::io::Result<()>>,
    {
        let _serial = self.async_sync_lock.lock().await;
        let r = match self.injected() {
            Some(r) => r,
            None => sync.await,
        };
        self.checked(r)
    }

    fn checked(&self, synced: std::io::Result<()>) -> std::io::Result<()> {
        let r = synced.and_then(|()| {
            if self.is_retired() {
                Err(std::io::Error::other(
                    "segment retired after a failed write or a concurrent failed fdatasync",
                ))
            } else {
                Ok(())
            }
        });
        if r.is_err() {
            self.retire();
        }
        r
    }
    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Release);
    }
}

/// Creates segment `number` at its full size, filled with zeros, durably.
///
/// Written under a temporary name and renamed, so a crash mid-creation never leaves a
/// half-zeroed file that looks like a segment; `ShardSpool::open` deletes leftovers.
/// Zeros are written rather than `fallocate`d: fallocate leaves "unwritten" extents, and
/// the first write into one makes the next fdatasync convert the extent (a journal
/// commit) — the stack notes measured pre-zeroed files as the fastest target.
///
/// Takes ~20 ms for 32 MiB on the 2-core virtio machine, so `ShardSpool` normally runs
/// it ahead of time on a helper thread (see `ShardSpool::start_spare`).
pub fn create_segment(
    shard_dir: &Path,
    shard: u16,
    number: u64,
    size: u64,
) -> Result<SegmentHandle, SpoolError> {
    let name = segment_file_name(number);
    let path = shard_dir.join(&name);
    let tmp = shard_dir.join(format!("{name}.tmp"));
    let result = (|| {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| SpoolError::io(format!("creating segment {}", tmp.display()), e))?;
        let salt: u64 = rand::random();
        let header = SegmentHeader {
            shard,
            number,
            created_unix_micros: crate::id::now_unix_micros(),
            salt,
            size,
        };
        let hdr = header.encode();
        file.write_all_at(&hdr, 0)
            .map_err(|e| SpoolError::io(format!("writing segment header {}", tmp.display()), e))?;
        let zeros = vec![0u8; 1 << 20];
        let mut off = hdr.len() as u64;
        while off < size {
            let n = (size - off).min(zeros.len() as u64) as usize;
            file.write_all_at(&zeros[..n], off)
                .map_err(|e| SpoolError::io(format!("zeroing segment {}", tmp.display()), e))?;
            off += n as u64;
        }
        // fsync (not fdatasync): the file's size and its directory entry must be durable too.
        file.sync_all()
            .map_err(|e| SpoolError::io(format!("syncing new segment {}", tmp.display()), e))?;
        fs::rename(&tmp, &path)
            .map_err(|e| SpoolError::io(format!("renaming {} into place", tmp.display()), e))?;
        fsync_dir(shard_dir)?;
        Ok(SegmentHandle::new(number, file, salt, size, path.clone()))
    })();
    if result.is_err() {
        // Best effort: a leftover .tmp is also removed by the next open.
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Removes `*.seg.tmp` leftovers of a crash during segment creation (caller holds the lock).
pub fn remove_stale_temporaries(shard_dir: &Path) -> Result<(), SpoolError> {
    let rd = fs::read_dir(shard_dir)
        .map_err(|e| SpoolError::io(format!("listing {}", shard_dir.display()), e))?;
    for entry in rd.flatten() {
        if entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.ends_with(".seg.tmp"))
        {
            tracing::warn!(path = %entry.path().display(), "removing segment left half-created by a crash");
            fs::remove_file(entry.path())
                .map_err(|e| SpoolError::io(format!("removing {}", entry.path().display()), e))?;
        }
    }
    Ok(())
}

pub fn fsync_dir(dir: &Path) -> Result<(), SpoolError> {
    let d = File::open(dir)
        .map_err(|e| SpoolError::io(format!("opening directory {}", dir.display()), e))?;
    d.sync_all()
        .map_err(|e| SpoolError::io(format!("syncing directory {}", dir.display()), e))
}

/// Takes the shard's lock: flock(LOCK_EX|LOCK_NB) on `shard_dir/LOCK`, held as long as
/// the returned file is open. flock locks belong to the open file description, so a
/// second `ShardSpool` in the same process is refused too.
pub fn lock_shard_dir(shard_dir: &Path) -> Result<File, SpoolError> {
    let path = shard_dir.join("LOCK");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| SpoolError::io(format!("opening lock file {}", path.display()), e))?;
    // SAFETY: flock on a valid, owned file descriptor; no memory is passed.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(SpoolError::Locked {
                path: shard_dir.to_path_buf(),
            });
        }
        return Err(SpoolError::io(format!("locking {}", path.display()), e));
    }
    Ok(f)
}

/// Maps a segment read-only.
pub fn map_readonly(file: &File, path: &Path) -> Result<Mmap, SpoolError> {
    // SAFETY: the mapping is read-only and tern never truncates a segment (a truncated
    // file would make reads past its end fault). Concurrent pwrites by the owning shard
    // only touch regions past the records a reader has been told about, and the page
    // cache keeps the mapping coherent with them.
    unsafe { Mmap::map(file) }.map_err(|e| SpoolError::io(format!("mapping {}", path.display()), e))
}

/// pwritev of all `bufs` at `offset`, retrying on EINTR and on short writes, in chunks
/// of at most IOV_MAX buffers. The body slices are gathered, never copied.
pub fn pwritev_all(file: &File, bufs: &[&[u8]], mut offset: u64) -> io::Result<()> {
    const IOV_MAX: usize = 1024;
    let mut idx = 0; // first buffer not completely written
    let mut skip = 0; // bytes of bufs[idx] already written
    while idx < bufs.len() {
        if bufs[idx].len() == skip {
            idx += 1;
            skip = 0;
            continue;
        }
        let mut iov: Vec<libc::iovec> = Vec::with_capacity((bufs.len() - idx).min(IOV_MAX));
        for (k, b) in bufs[idx..].iter().take(IOV_MAX).enumerate() {
            let s = if k == 0 { &b[skip..] } else { b };
            iov.push(libc::iovec {
                iov_base: s.as_ptr() as *mut libc::c_void,
                iov_len: s.len(),
            });
        }
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: every iovec points into a live slice borrowed for this call; the kernel
        // only reads from them.
        let n = unsafe {
            libc::pwritev(
                file.as_raw_fd(),
                iov.as_ptr(),
                iov.len() as libc::c_int,
                off,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "pwritev wrote 0 bytes",
            ));
        }
        let mut n = n as usize;
        offset += n as u64;
        while n > 0 && idx < bufs.len() {
            let left = bufs[idx].len() - skip;
            if n >= left {
                n -= left;
                idx += 1;
                skip = 0;
            } else {
                skip += n;
                n = 0;
            }
        }
    }
    Ok(())
}

/// fdatasync, retrying on EINTR.
pub fn fdatasync(file: &File) -> io::Result<()> {
    loop {
        // SAFETY: fdatasync on a valid owned descriptor.
        let rc = unsafe { libc::fdatasync(file.as_raw_fd()) };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Overwrites `[start, end)` with zeros (used to erase a torn tail) and syncs.
pub fn zero_range(file: &File, start: u64, end: u64) -> io::Result<()> {
    let zeros = vec![0u8; (end.saturating_sub(start)).min(1 << 20) as usize];
    let mut off = start;
    while off < end {
        let n = ((end - off) as usize).min(zeros.len());
        file.write_all_at(&zeros[..n], off)?;
        off += n as u64;
    }
    fdatasync(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two batches in flight on one segment: B's fdatasync takes the writeback error
    /// (which covered A's pages too) while A's, made at the same time, returns 0. A must
    /// not be reported durable, whichever thread finishes first (review finding F1).
    #[test]
    fn a_sync_that_follows_another_batchs_failed_sync_fails_too() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("s");
        let f = File::create(&path).unwrap();
        let seg = std::sync::Arc::new(SegmentHandle::new(1, f, 0, 0, path));
        let (entered_tx, entered_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let b = {
            let seg = seg.clone();
            std::thread::spawn(move || {
                seg.sync_checked(|| {
                    entered_tx.send(()).unwrap();
                    // B's sync is slow to return its EIO: A arrives meanwhile.
                    go_rx.recv().unwrap();
                    Err(std::io::Error::from_raw_os_error(libc::EIO))
                })
            })
        };
        entered_rx.recv().unwrap();
        let a = {
            let seg = seg.clone();
            std::thread::spawn(move || seg.sync_checked(|| Ok(())))
        };
        go_tx.send(()).unwrap();
        assert!(b.join().unwrap().is_err(), "B's own failure");
        assert!(
            a.join().unwrap().is_err(),
            "A must fail: B consumed the error"
        );
        assert!(seg.is_retired());
        // And after a failure, a later sync never succeeds on this segment.
        assert!(seg.sync_checked(|| Ok(())).is_err());
    }

    #[test]
    fn names_round_trip() {
        assert_eq!(parse_segment_file_name(&segment_file_name(42)), Some(42));
        assert_eq!(parse_segment_file_name("42.seg"), None);
        assert_eq!(parse_shard_dir_name("shard-007"), Some(7));
        assert_eq!(parse_shard_dir_name("shard-x"), None);
        assert_eq!(parse_shard_dir_name("shard-99999"), None);
    }

    #[test]
    fn pwritev_gathers_and_handles_many_buffers() {
        let d = tempfile::tempdir().unwrap();
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(d.path().join("f"))
            .unwrap();
        let parts: Vec<Vec<u8>> = (0..3000u32)
            .map(|i| vec![(i % 251) as u8; (i % 7) as usize])
            .collect();
        let refs: Vec<&[u8]> = parts.iter().map(|p| p.as_slice()).collect();
        pwritev_all(&f, &refs, 100).unwrap();
        let expect: Vec<u8> = parts.concat();
        let mut got = vec![0u8; expect.len()];
        f.read_exact_at(&mut got, 100).unwrap();
        assert_eq!(got, expect);
    }
}
