//! tern-engine: the SMTP side of tern.
//!
//! A map of the crate, in the order a connection meets it:
//!
//! - `config`: the TOML file and `--set` overrides, parsed once into an immutable `Config`.
//! - `server`: starts one glommio executor per core (a *shard*) and stops them on a signal.
//! - `bind`: the spool lock and the listening sockets, made before any shard starts.
//! - `listener`: each shard binds its own SO_REUSEPORT socket per configured address and
//!   accepts connections; `conn` drives one connection (plain, STARTTLS or implicit TLS).
//! - `session`: the I/O-free SMTP state machine: commands, DATA/BDAT, replies.
//! - `policy`: relay decisions per recipient.
//! - `anvil`: failed-AUTH counters per client IP, owned by hash(ip) shard, blocks broadcast.
//! - `sasl`: the AUTH mechanisms (sans-I/O server steps) and the per-shard nonce cache;
//!   `users`: the sasldb-style store of derived secrets and `tern passwd`.
//! - `tls`: rustls server configuration, PEM loading, generated self-signed certificates.
//! - `delivery`: `[queue]` settings for the shard's queue runner (`tern_queue::runner`).
//! - `admin`: the admin socket (`tern queue`, `tern ctl` against a running server): one
//!   std thread in the main process, requests forwarded to the shards' control tasks.
//! - `spool`: the shard's group-commit writer in front of `tern_queue`'s segment files; a
//!   message gets its 250 only after its record is fdatasync'ed.
//! - `stdio`, `sendmail`: local submission without a socket (`tern stdio`, `tern
//!   sendmail`): a `Session` driven in-process, the message handed to a running server's
//!   shard 0 (admin `submit`) or written straight into a free shard spool.
//!
//! Data flows one way: listener → conn → session → spool. Nothing on the per-command path
//! is shared between shards.

pub mod admin;
pub mod anvil;
pub mod bind;
pub mod clock;
pub mod config;
pub mod conn;
pub mod delivery;
pub mod metrics;
pub mod notify;
pub mod privileges;
pub mod sdnotify;
pub mod server;
pub mod shard;
pub mod shard_hooks;
pub mod spool;
pub mod tls;
pub mod userstore;
