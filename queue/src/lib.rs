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
//! - `spool` — `ShardSpool` (one per shard), `commit_batch`, `scan_spool`, `read_body`.
//!
//! Each shard owns `DIR/shard-NNN/`; no shard ever writes another's files.

pub mod envelope;
pub mod error;
pub mod id;
pub mod record;
pub mod recovery;
pub mod segment;
pub mod spool;

pub use envelope::{
    BodyType, DeliverBy, DeliverByMode, Envelope, Recipient, Ret, NOTIFY_DELAY, NOTIFY_FAILURE,
    NOTIFY_NEVER, NOTIFY_SUCCESS,
};
pub use error::SpoolError;
pub use id::{encode_queue_id, parse_queue_id, QueueIdGen};
pub use spool::{
    commit_batch, commit_batch_unsynced_for_bench, read_body, scan_spool, Committed, PendingWrite,
    Recovered, RecoveredMessage, ShardSpool, SpoolOptions,
};
