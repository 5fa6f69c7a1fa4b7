//! `tern features`: what this binary can do and how it is configured (sendmail's `-d0`).
//!
//! Prints facts only (version, extensions, mechanisms, TLS provider, shards, limits), so
//! scripts can grep it. Must never print secrets or touch the spool.

use std::fmt::Write;

use tern_engine::config::Config;
use tern_smtp::sasl::Mechanism;

/// The feature report for `cfg`.
pub fn report(cfg: &Config) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "Version: tern {}", env!("CARGO_PKG_VERSION"));
    let _ = writeln!(
        o,
        "Compiled with: glommio (io_uring, thread-per-core), rustls 0.23 (ring provider), rkyv spool, crc32c"
    );
    let _ = writeln!(
        o,
        "ESMTP extensions: {} STARTTLS AUTH",
        tern_smtp::session::EHLO_EXTENSIONS.join(" ")
    );
    let all: Vec<&str> = Mechanism::ALL.iter().map(|m| m.name()).collect();
    let _ = writeln!(o, "SASL mechanisms compiled in: {}", all.join(" "));
    let _ = writeln!(
        o,
        "SASL mechanisms enabled: {} (plaintext without TLS: {})",
        cfg.auth.mechanisms.join(" "),
        if cfg.auth.allow_plaintext_without_tls {
            "allowed"
        } else {
            "refused"
        }
    );
    let _ = writeln!(
        o,
        "User store: {} ({})",
        cfg.auth.user_store(),
        match cfg.auth.user_store() {
            tern_engine::config::UserStore::File(_) => "file",
            tern_engine::config::UserStore::Postgres(_) =>
                "PostgreSQL, snapshot per shard, LISTEN/NOTIFY (postgres crate)",
        }
    );
    let map = match cfg.auth.sender_map_db() {
        Some(url) => format!("in PostgreSQL, {url}"),
        None => format!("{} entries", cfg.senders.len()),
    };
    let _ = writeln!(
        o,
        "Sender policy: {}{} (sender map: {map}; From: header check {})",
        cfg.auth.sender_policy,
        if cfg.auth.sender_policy == "own" {
            " (MAIL FROM must be owned by the login)"
        } else {
            ""
        },
        if cfg.auth.check_header_from {
            "on"
        } else {
            "off"
        }
    );
    let _ = writeln!(
        o,
        "TLS: rustls, TLS 1.2 and TLS 1.3, STARTTLS (RFC 3207) and implicit TLS (RFC 8314)"
    );
    let signer = &cfg.dkim_signer;
    if signer.is_empty() {
        let _ = writeln!(o, "DKIM: off (no [[dkim.keys]])");
    } else {
        let when: Vec<&str> = cfg
            .dkim
            .sign
            .iter()
            .map(|w| match w {
                tern_engine::dkim::SignWhen::Authenticated => "authenticated",
                tern_engine::dkim::SignWhen::Trusted => "trusted",
            })
            .collect();
        let _ = writeln!(
            o,
            "DKIM: signing mail from {} clients (relaxed/relaxed, mail-auth + AWS-LC, dkim.signer = {})",
            if when.is_empty() {
                "no".to_string()
            } else {
                when.join(" and ")
            },
            match signer.mode() {
                tern_engine::dkim::SignerMode::Inline => "inline",
                tern_engine::dkim::SignerMode::Thread => "thread",
                tern_engine::dkim::SignerMode::Auto => "auto",
            }
        );
        for k in signer.keys() {
            let _ = writeln!(
                o,
                "DKIM key: domain {} selector {} algorithm {} ({} bits)",
                k.domain,
                k.selector,
                k.key.algorithm().label(),
                k.key.bits()
            );
        }
    }
    if cfg.milters.list.is_empty() {
        let _ = writeln!(
            o,
            "Milter: protocol 6 client; {}",
            if cfg.milter.enable {
                "no filters configured"
            } else {
                "disabled (milter.enable = false)"
            }
        );
    } else {
        let _ = writeln!(
            o,
            "Milter: protocol 6 client, {} filter(s), run in order at end of data",
            cfg.milters.list.len()
        );
        for f in &cfg.milters.list {
            let roles: Vec<&str> = ["smtp", "submission", "smtps"]
                .iter()
                .zip(f.roles)
                .filter(|(_, on)| *on)
                .map(|(r, _)| *r)
                .collect();
            let t = f.timeouts;
            let _ = writeln!(
                o,
                "Milter filter: {} at {} default_action {} timeouts C:{}s;S:{}s;R:{}s;E:{}s listeners {} pool_idle {}",
                f.name,
                match &f.endpoint {
                    tern_engine::milter::Endpoint::Inet(a) => format!("inet:{a}"),
                    tern_engine::milter::Endpoint::Unix(p) => format!("unix:{}", p.display()),
                },
                match f.default_action {
                    tern_engine::milter::DefaultAction::Tempfail => "tempfail",
                    tern_engine::milter::DefaultAction::Accept => "accept",
                },
                t.connect.as_secs(),
                t.send.as_secs(),
                t.reply.as_secs(),
                t.eom.as_secs(),
                roles.join(","),
                f.pool_idle
            );
        }
    }
    if cfg.cluster.redis.is_empty() {
        let _ = writeln!(o, "Cluster counters: node-local (no [cluster] redis)");
    } else {
        let _ = writeln!(
            o,
            "Cluster counters: Redis {} (AUTH failures per IP and login, blocks, per-login rates; local counting while it is down)",
            tern_engine::config::redact_url(&cfg.cluster.redis)
        );
    }
    let _ = writeln!(o, "Host name: {}", cfg.hostname);
    let _ = writeln!(
        o,
        "Shards: {} (of {} available cores)",
        cfg.shard_count(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    let l = &cfg.limits;
    let _ = writeln!(
        o,
        "Limits: command line {} octets, text line {} octets, message {} octets, {} recipients, {} errors, idle timeout {}s, {} connections/shard, {} connections/IP/shard",
        l.command_line,
        l.text_line,
        l.message_size,
        l.recipients,
        l.errors,
        l.idle_timeout.as_secs(),
        l.connections_per_shard,
        l.connections_per_ip
    );
    let _ = writeln!(
        o,
        "Spool: {} (segments of {} octets, {} group commit(s) in flight per shard, commit path {}, state records wait up to {:?} for a message's commit, syncer nice {})",
        cfg.spool.dir.display(),
        cfg.spool.segment_size,
        cfg.spool.commits_in_flight,
        cfg.spool.commit.name(),
        cfg.spool.state_commit_delay,
        cfg.spool.syncer_nice
    );
    for (role, addrs) in [
        ("smtp", &cfg.listeners.smtp),
        ("submission", &cfg.listeners.submission),
        ("smtps", &cfg.listeners.smtps),
    ] {
        let a: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
        let _ = writeln!(o, "Listener {role}: {}", a.join(" "));
    }
    o
}

#[cfg(test)]
mod tests {
    #[test]
    fn mentions_the_essentials() {
        let cfg = tern_engine::config::Config::from_toml_str("", "t", &[]).unwrap();
        let r = super::report(&cfg);
        for needle in [
            "Version: tern",
            "CRAM-MD5",
            "SCRAM-SHA-256",
            "rustls",
            "Shards:",
            "Limits:",
        ] {
            assert!(r.contains(needle), "{needle} missing from\n{r}");
        }
    }

    #[test]
    fn never_shows_a_database_password() {
        let cfg = tern_engine::config::Config::from_toml_str(
            "[auth]\nusers = \"postgresql://tern:s3cret@db/mail\"\n\
             sender_map = \"postgresql://tern:s3cret@db/mail\"\n",
            "t",
            &[],
        )
        .unwrap();
        let r = super::report(&cfg);
        assert!(
            r.contains("User store: postgresql://tern:***@db/mail (PostgreSQL"),
            "{r}"
        );
        assert!(
            r.contains("sender map: in PostgreSQL, postgresql://tern:***@db/mail"),
            "{r}"
        );
        assert!(!r.contains("s3cret"), "{r}");
    }
}
