//! The spool's error type.
//!
//! Owns: the mapping from operating-system failures to the few outcomes the engine must
//! tell apart (no space → 452 4.3.1, locked, corrupt data, everything else).
//! Must never: hide an errno. Every I/O error keeps its source and says what the spool
//! was doing when it happened.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong in the spool.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// An I/O error other than "no space", with what the spool was doing.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// No space left on the device (ENOSPC or EDQUOT). The engine answers 452 4.3.1.
    #[error("spool full (no space left on device) while {context}")]
    Full { context: String },
    /// Data on disk failed validation (checksum, magic, bounds or rkyv validation).
    #[error("corrupt spool data in {path} at offset {offset}: {reason}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    /// Another process (or another `ShardSpool` in this one) holds the shard's lock.
    #[error(
        "spool shard directory {path} is locked by another ShardSpool \
         (is a second tern running on the same spool directory?)"
    )]
    Locked { path: PathBuf },
    /// fdatasync of a segment failed. Nothing written to that file since its last good
    /// sync may be trusted ("fsyncgate"), so the whole batch fails and the segment is
    /// retired for appends.
    #[error("fdatasync of spool segment {segment} failed: {source}")]
    SyncFailed {
        segment: u64,
        #[source]
        source: io::Error,
    },
    /// The record was reserved in a segment that an earlier write or sync failure
    /// retired; it was not written. The caller may prepare it again (it goes to a new
    /// segment).
    #[error("spool segment {segment} was retired after an earlier write/sync failure")]
    SegmentUnusable { segment: u64 },
    /// The caller handed the spool something it cannot store (a programming error in
    /// the caller, not a disk problem).
    #[error("invalid record: {0}")]
    Invalid(String),
}

impl SpoolError {
    /// Wraps an I/O error with context, mapping "no space" to [`SpoolError::Full`].
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> SpoolError {
        let context = context.into();
        if is_no_space(&source) {
            SpoolError::Full { context }
        } else {
            SpoolError::Io { context, source }
        }
    }

    /// True for errors that mean "the disk is full": the engine maps them to 452.
    pub fn is_full(&self) -> bool {
        match self {
            SpoolError::Full { .. } => true,
            SpoolError::SyncFailed { source, .. } => is_no_space(source),
            _ => false,
        }
    }
}

pub(crate) fn is_no_space(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
        || e.kind() == io::ErrorKind::StorageFull
}

/// io::Error is not Clone; a sync failure must be reported to every record of a batch,
/// so each gets an equivalent error rebuilt from the errno (or kind and message).
pub(crate) fn clone_io_error(e: &io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(code) => io::Error::from_raw_os_error(code),
        None => io::Error::new(e.kind(), e.to_string()),
    }
}
