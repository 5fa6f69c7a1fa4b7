//! Wiring of the queue runner: the `[queue]` configuration turned into the runner's and
//! the outbound client's settings.
//!
//! The runner itself (scheduling, delivery, DSN) lives in `tern_queue::runner`; this
//! module only translates configuration. It must never hold state.

use tern_queue::client::{ClientOptions, StarttlsPolicy, Timeouts};
use tern_queue::ratelimit::RateLimit;
use tern_queue::route::{Destination, Dns, DnsConfig, Router};
use tern_queue::runner::RunnerConfig;

use crate::config::Config;

/// Builds one shard's runner settings. `shards` divides the queue-wide limits (the
/// high-water mark, and the destination rates: each shard enforces its share).
pub fn runner_config(cfg: &Config, shards: usize) -> Result<RunnerConfig, String> {
    let q = &cfg.queue;
    let relayhost = (!q.relayhost.is_empty()).then_some(q.relayhost.as_str());
    let router = Router::from_config(
        relayhost,
        q.routes.iter().map(|(k, v)| (k.as_str(), v.as_str())),
    )
    .and_then(|r| {
        r.with_mx_tls_policies(q.tls_policy.iter().map(|(k, v)| (k.as_str(), v.as_str())))
    })
    .map_err(|e| e.to_string())?
    .share_rates(shards);
    let mut client = ClientOptions::new(cfg.hostname.clone());
    client.starttls = match q.starttls.as_str() {
        "required" => StarttlsPolicy::Required,
        "never" => StarttlsPolicy::Never,
        _ => StarttlsPolicy::Opportunistic,
    };
    client.chunking = q.chunking;
    client.verify_certs = q.tls_verify;
    client.ca_file = (!q.tls_ca_file.as_os_str().is_empty()).then(|| q.tls_ca_file.clone());
    // RFC 5321 §4.5.3.2 timeouts, capped by command_timeout (tests shorten it).
    let d = Timeouts::default();
    let cap = |x: std::time::Duration| x.min(q.command_timeout);
    client.timeouts = Timeouts {
        connect: q.connect_timeout,
        greeting: cap(d.greeting),
        helo: cap(d.helo),
        mail: cap(d.mail),
        rcpt: cap(d.rcpt),
        data_init: cap(d.data_init),
        data_block: cap(d.data_block),
        data_final: cap(d.data_final).max(q.command_timeout),
        tls_handshake: cap(d.tls_handshake),
        // Replies must keep up this rate once they start (no configuration key yet).
        min_data_rate: d.min_data_rate,
    };
    // One resolver thread for the process: every shard gets a handle to the same one.
    let dns = DnsConfig::parse(&q.resolver)
        .and_then(Dns::shared)
        .map_err(|e| format!("queue.{e}"))?;
    let relayhost_auth = if q.relayhost_auth_file.as_os_str().is_empty() {
        None
    } else {
        Some(read_auth_file(&q.relayhost_auth_file)?)
    };
    let relayhost = relayhost.and_then(|r| match Destination::parse(&format!("smtp:{r}")) {
        Ok(Destination::Smtp { host, port, .. }) => Some((host.to_ascii_lowercase(), port)),
        _ => None,
    });
    Ok(RunnerConfig {
        hostname: cfg.hostname.clone(),
        retry_interval: q.retry_interval,
        max_retry_interval: q.max_retry_interval.max(q.retry_interval),
        max_age: q.max_age,
        delay_warning: (!q.delay_warning.is_zero()).then_some(q.delay_warning),
        concurrency: q.concurrency,
        high_water_messages: (q.high_water_messages / shards.max(1)).max(1),
        high_water_bytes: (q.high_water_bytes / shards.max(1) as u64)
            .max(u64::from(q.high_water_bytes > 0)),
        router,
        client,
        destination_concurrency: q.destination_concurrency,
        destination_rate: RateLimit::per_second(q.destination_rate, q.destination_burst)
            .map(|r| r.share(shards)),
        relayhost,
        relayhost_auth,
        dns,
        mx_port: 25,
    })
}

/// Reads "user password" from a file that only its owner may read (like sendmail's
/// authinfo): a group- or world-readable credentials file is refused.
fn read_auth_file(path: &std::path::Path) -> Result<(String, String), String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(format!(
            "{}: credentials file must not be group- or world-readable (chmod 600)",
            path.display()
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let line = text
        .lines()
        .find(|l| !l.trim().is_empty() && !l.starts_with('#'));
    match line.and_then(|l| l.trim().split_once(char::is_whitespace)) {
        Some((u, p)) if !u.is_empty() && !p.trim().is_empty() => {
            Ok((u.to_string(), p.trim().to_string()))
        }
        _ => Err(format!(
            "{}: expected one line \"user password\"",
            path.display()
        )),
    }
}
