//! tern-queue: the durable spool (and, later, the queue runner).
//!
//! How an accepted message becomes durable:
//! ```text
//! session (shard thread)                     blocking thread
//!   ShardSpool::prepare(env, body) ──PendingWrite──▶ commit_batch(batch)
//!     reserve bytes in the active segment            pwritev each record at its offset
//!     serialise the envelope (rkyv)                  one fdatasync per segment touched
//!   ◀──────────────── Vec<Result<Committed>> ────────┘   → the engine answers 250
//! ```
//! Modules, one concern each:
//! - `envelope` — what is stored about a message besides its body.
//! - `id` — queue ids, unique across shards and restarts.
//! - `record` — the byte layout of segment headers and records (the format spec).
//! - `segment` — the files: creation (preallocated, zeroed), lock, mapping, pwritev/fdatasync.
//! - `recovery` — walking a segment's bytes: good records, corrupt regions, torn tail.
//! - `state` — per-recipient delivery state: `StateChange` records and the
//!   `QueuedMessage` the queue runner works with.
//! - `index` — `QueueIndex`: the runner's compact in-memory index of a shard's queued
//!   messages (~70 bytes each) and its schedule of next attempts.
//! - `spool` — `ShardSpool` (one per shard): `prepare`, `prepare_state`, `commit_batch`,
//!   recovery into a queue, `load` (zero-copy body), `finished` and segment recycling;
//!   `scan_spool`, `read_body`.
//!
//! Delivery state flows the same way: the runner calls `prepare_state` (deltas of
//! recipient states plus attempts/next attempt/last reply), commits it with
//! `commit_batch` alongside new messages, and calls `finished` once a message has no
//! pending recipient; segments whose contents are all finished are deleted.
//! - `runner` — the shard's queue runner; `deliver`, `client/`, `route`, `maildir`,
//!   `dsn` and `ratelimit` (per-destination token buckets) serve it. `config`
//!   (`RunnerConfig`) and `outcome` (`Outcome`, `NextHop`) sit below both `runner` and
//!   `deliver`, so `deliver` never imports `runner`.
//! - `commit` — `GroupCommit`: the shard's committer task (group commit on glommio's
//!   blocking thread) shared by accepting sessions and the queue runner.
//!
//! Each shard owns `DIR/shard-NNN/`; no shard ever writes another's files. The on-disk
//! format is specified in `record.rs` (and docs/decisions.md, "Spool format and write path").
//!
//! ```
//! use bytes::Bytes;
//! use tern_queue::{commit_batch, read_body, BodyType, Envelope, ShardSpool, SpoolOptions};
//!
//! let dir = tempfile::tempdir()?;
//! let opts = SpoolOptions { segment_size: 1 << 20 };
//! let (mut spool, recovered) = ShardSpool::open(dir.path(), 0, opts.clone())?;
//! assert!(recovered.messages.is_empty());
//! let body = [Bytes::from_static(b"Received: ...\r\n"), Bytes::from_static(b"Subject: hi\r\n\r\nhello\r\n")];
//! let env = Envelope {
//!     id: spool.id_gen().next(),
//!     sender: "a@example.org".into(),
//!     recipients: vec![],
//!     arrival_unix_micros: 0,
//!     size: body.iter().map(|b| b.len() as u64).sum(),
//!     body_type: BodyType::SevenBit,
//!     smtputf8: false, ret: None, envid: None, deliver_by: None, auth: None,
//!     client_helo: "client.example".into(),
//!     client_addr: "192.0.2.1:5000".into(),
//! };
//! // On the shard thread: cheap, no syscalls.
//! let pending = spool.prepare(&env, &body)?;
//! // On a blocking thread, for a whole batch: pwritev + one fdatasync. Ok => answer 250.
//! let committed = commit_batch(vec![pending]).pop().unwrap()?;
//! drop(spool);
//! let (_spool, recovered) = ShardSpool::open(dir.path(), 0, opts)?;
//! assert_eq!(recovered.messages[0].envelope, env);
//! assert_eq!(read_body(dir.path(), 0, committed.segment, committed.offset)?, body.concat());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod client;
pub mod commit;
pub mod commit_uring;
pub mod config;
mod deliver;
pub mod dsn;
pub mod envelope;
pub mod error;
pub mod id;
pub mod index;
pub mod maildir;
mod outcome;
pub mod ratelimit;
pub mod record;
pub mod recovery;
pub mod route;
pub mod runner;
pub mod segment;
pub mod spool;
pub mod state;
pub mod tls_configs;

pub use commit::GroupCommit;
pub use envelope::{
    BodyType, DeliverBy, DeliverByMode, Envelope, Recipient, Ret, NOTIFY_DELAY, NOTIFY_FAILURE,
    NOTIFY_NEVER, NOTIFY_SUCCESS,
};
pub use error::SpoolError;
pub use id::{encode_queue_id, parse_queue_id, QueueIdGen};
pub use spool::{
    commit_batch, commit_batch_unsynced_for_bench, read_body, scan_spool, scan_spool_with_state,
    BodyRef, Committed, Listing, PendingWrite, Recovered, RecoveredMessage, SegmentInfo,
    ShardSpool, SpoolOptions,
};
pub use state::{
    MsgId, MsgRef, QueuedMessage, RcptState, RcptStates, StateChange, MAX_ID_LEN, MAX_REPLY_LEN,
};
