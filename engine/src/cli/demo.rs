//! `tern demo`: a working relay on embedded defaults, for a newcomer's first five minutes.
//!
//! Loopback listeners on 2525 (smtp), 2587 (submission) and 2465 (smtps), a self-signed
//! certificate generated once into the demo directory, and a spool under it. It prints
//! what it listens on (the metrics endpoint too, on an ephemeral loopback port) and a
//! command to try it. It must never listen on anything but loopback by default and never
//! write outside its directory.

use std::path::{Path, PathBuf};

use tern_engine::config::{Config, ConfigError, QueueConfig};
use tern_engine::server::Ready;
use tern_engine::tls::{Identity, TlsError};
use tern_smtp::session::ListenerKind;

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot create {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot create the demo user: {0}")]
    User(String),
}

pub struct Prepared {
    pub config: Config,
    pub identity: Identity,
}

/// The demo's configuration, as TOML, so `--set` overrides work exactly as for `serve`.
fn demo_toml(dir: &Path) -> String {
    let d = dir
        .display()
        .to_string()
        .replace('\\', "\\\\")
        .replace('"', "\\\"");
    format!(
        r#"hostname = "localhost"
# The demo is a loopback toy: it may run as root (a real server sets `user`).
allow_root = true
[listeners]
smtp = ["127.0.0.1:2525"]
submission = ["127.0.0.1:2587"]
smtps = ["127.0.0.1:2465"]
[tls]
cert = "{d}/cert.pem"
key = "{d}/key.pem"
[spool]
dir = "{d}/spool"
[relay]
local_domains = ["localhost", "demo.test"]
[limits]
# Every demo client comes from loopback: allow plenty of connections per address.
connections_per_ip = 5000
[auth]
users = "{d}/users.db"
require_on = ["submission", "smtps"]
# Short blocks, so that trying wrong passwords locks loopback out for a minute, not 15.
ip_failure_limit = 50
ip_block = "60s"
[metrics]
# The metrics endpoint and status page, on an ephemeral loopback port (printed at start).
listen = "127.0.0.1:0"
[queue]
retry_interval = "1m"
[queue.routes]
"*" = "maildir:{d}/maildir"
"#
    )
}

/// Creates the demo directory, its certificate, and the configuration.
pub fn prepare(dir: &Path, sets: &[String]) -> Result<Prepared, DemoError> {
    std::fs::create_dir_all(dir).map_err(|source| DemoError::Dir {
        path: dir.to_path_buf(),
        source,
    })?;
    // Absolute paths: routes (maildir:) require them, and the banner is then copy-pastable
    // from any directory.
    let dir = &dir.canonicalize().map_err(|source| DemoError::Dir {
        path: dir.to_path_buf(),
        source,
    })?;
    let config = Config::from_toml_str(&demo_toml(dir), "tern demo", sets)?;
    let (cert, key) = match (&config.tls.cert, &config.tls.key) {
        (Some(c), Some(k)) => (c.clone(), k.clone()),
        _ => (dir.join("cert.pem"), dir.join("key.pem")),
    };
    let identity = Identity::load_or_generate(&config.hostname, &cert, &key)?;
    create_demo_user(&config)?;
    Ok(Prepared { config, identity })
}

/// The demo's user: `demo` / `demo`, created once in the demo's user store.
pub const DEMO_USER: &str = "demo";
pub const DEMO_PASSWORD: &str = "demo";

fn create_demo_user(config: &Config) -> Result<(), DemoError> {
    // A database store is managed with `tern passwd -f URL`; the demo leaves it alone.
    if config.auth.users.exists()
        || matches!(
            config.auth.user_store(),
            tern_engine::config::UserStore::Postgres(_)
        )
    {
        return Ok(());
    }
    let args = crate::cli::passwd::PasswdArgs {
        file: config.auth.users.clone(),
        init: false,
        realm: Some(config.auth.realm_or(&config.hostname).to_string()),
        create: true,
        delete: false,
        pipe: true,
        iterations: tern_smtp::users::secrets::DEFAULT_SCRAM_ITERATIONS,
        list: false,
        import_sasldb: None,
        overwrite: false,
        message_rate: None,
        recipient_rate: None,
        user: Some(DEMO_USER.to_string()),
    };
    let mut err = Vec::new();
    let code = crate::cli::passwd::run_with(
        &args,
        || Ok(DEMO_PASSWORD.to_string()),
        &mut std::io::sink(),
        &mut err,
    );
    if code != 0 {
        return Err(DemoError::User(
            String::from_utf8_lossy(&err).trim().to_string(),
        ));
    }
    Ok(())
}

/// What a newcomer sees once the demo is up.
pub fn print_banner(dir: &Path, queue: &QueueConfig, ready: &Ready) {
    let find = |k: ListenerKind| {
        ready
            .listeners
            .iter()
            .find(|(kind, _)| *kind == k)
            .map(|(_, a)| a.to_string())
    };
    println!();
    println!(
        "tern demo is running ({} shards). Spool: {}/spool",
        ready.shards,
        dir.display()
    );
    if let Some(a) = find(ListenerKind::Smtp) {
        println!("Try it (swaks):");
        println!("  swaks --server {a} --from you@example.com --to postmaster@localhost");
        println!("  swaks --server {a} --tls --from you@example.com --to user@demo.test");
    }
    if let Some(a) = find(ListenerKind::Submission) {
        println!("Authenticated submission (user {DEMO_USER}, password {DEMO_PASSWORD}) may relay anywhere:");
        println!("  swaks --server {a} --tls --auth PLAIN --auth-user {DEMO_USER} --auth-password {DEMO_PASSWORD} --from {DEMO_USER}@localhost --to friend@example.net");
        println!("  swaks --server {a} --auth CRAM-MD5 --auth-user {DEMO_USER} --auth-password {DEMO_PASSWORD} --from {DEMO_USER}@localhost --to friend@example.net");
    }
    if let Some(a) = find(ListenerKind::Smtps) {
        println!("Or with curl over implicit TLS:");
        println!("  printf 'Subject: hello\\r\\n\\r\\nhi\\r\\n' | curl -k --url smtps://{a} --user {DEMO_USER}:{DEMO_PASSWORD} --mail-from {DEMO_USER}@localhost --mail-rcpt friend@example.net --upload-file -");
    }
    if let Some(a) = ready.metrics {
        println!("Status page: http://{a}/  (Prometheus metrics: http://{a}/metrics)");
    }
    // Say where mail really goes: `--set queue.routes...` or a relayhost override the
    // demo's Maildir route.
    let maildir = format!("maildir:{}/maildir", dir.display());
    let routes: Vec<String> = queue
        .routes
        .iter()
        .map(|(k, v)| format!("{k} -> {v}"))
        .collect();
    if !queue.relayhost.is_empty() {
        println!("Every message is relayed to {}", queue.relayhost);
    } else if queue.routes.len() == 1 && queue.routes.get("*") == Some(&maildir) {
        println!(
            "Every message, local or relayed, is delivered into the Maildir {}/maildir/new/",
            dir.display()
        );
    } else if routes.is_empty() {
        println!("Mail is delivered to each domain's MX hosts (no static route).");
    } else {
        println!("Mail goes by these routes: {}", routes.join(", "));
        if !queue.routes.contains_key("*") {
            println!("Other domains: their MX hosts.");
        }
    }
    println!("More to try (restart the demo with these --set options):");
    println!("  --set 'auth.sender_policy=\"own\"'         MAIL FROM must be the login's own address (553 5.7.1)");
    println!("  --set 'auth.user_message_rate=\"100/1m\"'  per-login sending rate across shards (450 4.7.1)");
    println!(
        "  --set 'shutdown.drain_delay=\"2s\"'         then `tern ctl drain` for a rolling restart"
    );
    println!("  --set 'cluster.redis=\"redis://127.0.0.1:6379\"'  AUTH blocks and sending rates shared by every node using it");
    println!("  tern dkim keygen --domain example.org --selector s1 --dir keys   then [[dkim.keys]] (docs/configuration.md)");
    println!("Messages still waiting are listed with:");
    println!("  tern queue list --spool {}/spool", dir.display());
    println!("Stop with Ctrl-C.");
}
