//! Metrics, in two layers: `counters` (per-shard counting, a leaf every shard module may
//! use) and `http` (the endpoint that gathers the shards' snapshots: process level, it
//! talks to the shards only through `shard::Control`). The arrow points from `http` down
//! to `counters`, never back.

pub mod counters;
pub mod http;
