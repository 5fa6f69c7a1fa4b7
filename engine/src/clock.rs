//! The one place the engine reads the time it hands to the protocol core.
//!
//! Owns: building `tern_smtp::hooks::Now` from the monotonic and the wall clock.
//! Must never: be called from tern-smtp (the protocol core reads no clock: the shard
//! passes it the time with every call, so tests and fuzzers can pass any time).

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tern_smtp::hooks::Now;

/// The time now, for a `Session` call.
pub fn now() -> Now {
    let unix_micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    Now::at(Instant::now(), unix_micros)
}
