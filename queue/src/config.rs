//! The queue runner's settings (from the engine's `[queue]` configuration).
//!
//! Owns: [`RunnerConfig`], read by `runner` (scheduling, limits) and by `deliver` (routes,
//! client options, resolver). It sits below both so that `deliver` never imports `runner`;
//! `runner::RunnerConfig` re-exports it under the name the engine uses.
//! Must never: hold state that changes while the runner runs (it is shared read-only), or
//! do I/O.

use std::time::Duration;

use crate::client::ClientOptions;
use crate::ratelimit::RateLimit;
use crate::route::{Dns, Router};

/// Settings of the runner (from the `[queue]` configuration).
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    pub hostname: String,
    pub retry_interval: Duration,
    pub max_retry_interval: Duration,
    pub max_age: Duration,
    /// Send a delay DSN (to NOTIFY=DELAY recipients' sender) after this long; None = never.
    pub delay_warning: Option<Duration>,
    /// Deliveries in flight at once on this shard.
    pub concurrency: usize,
    /// Above this many queued messages on the shard, new mail gets 452 4.3.1.
    pub high_water_messages: usize,
    /// Above this many bytes of spool segments on the shard, likewise; 0 = no limit.
    pub high_water_bytes: u64,
    pub router: Router,
    pub client: ClientOptions,
    /// The resolver for MX and host lookups (`queue.resolver`; shared by the shards).
    pub dns: Dns,
    /// SMTP port for MX deliveries: 25 (RFC 5321 §5.1). A test seam, not a configuration
    /// key: tests point MX records at 127.0.0.1 and a scripted server on another port.
    pub mx_port: u16,
    /// Deliveries in flight at once to one destination (one route / MX domain) per shard,
    /// so a slow or small next hop is not hammered.
    pub destination_concurrency: usize,
    /// Deliveries started per second to one destination by this shard (its share of
    /// `queue.destination_rate`); `None` = no limit. A route's own `rate=` wins. Local
    /// (maildir) deliveries are never limited.
    pub destination_rate: Option<RateLimit>,
    /// The relayhost (as routed) and the credentials to AUTH to it with, if any.
    pub relayhost: Option<(String, u16)>,
    pub relayhost_auth: Option<(String, String)>,
}
