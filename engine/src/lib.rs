//! tern-engine: the server. It runs the protocol core (`tern_smtp`) on one glommio
//! executor per core and hands accepted mail to the queue (`tern_queue`). The `tern`
//! binary's command-line modules (`engine/src/cli/`) sit above this library and are not
//! part of it.
//!
//! A map, by layer (arrows point down only; `tests/tests/layers.rs` fails on a cycle):
//!
//! Process level (L2: the main thread and its helper threads)
//! - `server`: starts one shard per core, waits for them, reloads (SIGHUP), stops (SIGTERM).
//! - `bind`: the spool lock and the SO_REUSEPORT sockets, made before any shard starts.
//! - `admin::server`: the admin socket's thread; `metrics::http`: `/metrics`, `/healthz`,
//!   the status page. Both talk to shards only through `shard::Control` messages.
//! - `cluster::redis`: with `[cluster] redis`, the thread that counts AUTH failures and
//!   per-login rates in Redis (one pipeline per round trip) and hands the cluster's blocks
//!   to every shard as `shard::Control::Cluster`.
//!
//! Shard level (L1: one per core, never crossing threads)
//! - `shard`: `Shard` (what a shard's tasks share) and `Control` (what others ask of it).
//! - `conn`: one connection's socket I/O and TLS, driving a `tern_smtp::session::Session`.
//! - `shard_hooks`: the session's `SessionHooks`: counters, `NOQUEUE` and AUTH log lines,
//!   AUTH-failure blocks through `anvil` (the shard-to-shard mesh).
//! - `spool`: the shard's group-commit writer in front of `tern_queue`; a message gets its
//!   250 only after its record is fdatasync'ed.
//! - `metrics::counters`: per-shard counters (a leaf).
//!
//! Shared leaves: `config` (TOML + `--set`, immutable `Config`), `tls` (rustls server
//! configuration, certificates), `userstore` (the user file: load with mode check, atomic
//! save), `delivery` (`[queue]` → runner settings), `admin::proto` (the admin wire format
//! and client, also used by the CLI), `dkim` (keys and DKIM-Signature fields), `clock` (the time handed to the protocol core),
//! `notify`, `sdnotify`, `privileges`, `cluster` (what anvils and the Redis thread say to
//! each other, key names, batching).
//!
//! Data flows one way: listener → conn → session → spool → runner → client.

pub mod admin;
pub mod anvil;
pub mod bind;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod conn;
pub mod delivery;
pub mod dkim;
pub mod dkim_thread;
pub mod metrics;
pub mod milter;
pub mod notify;
pub mod pgusers;
pub mod privileges;
pub mod sdnotify;
pub mod server;
pub mod shard;
pub mod shard_hooks;
pub mod spool;
pub mod tls;
pub mod userstore;
