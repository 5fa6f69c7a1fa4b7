//! `tern demo`: a working relay on embedded defaults, for a newcomer's first five minutes.
//!
//! Loopback listeners on 2525 (smtp), 2587 (submission) and 2465 (smtps), a self-signed
//! certificate generated once into the demo directory, and a spool under it. It prints
//! what it listens on and a command to try it. It must never listen on anything but
//! loopback by default and never write outside its directory.

use std::path::{Path, PathBuf};

use crate::config::{Config, ConfigError};
use crate::server::Ready;
use crate::session::ListenerKind;
use crate::tls::{Identity, TlsError};

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
"#
    )
}

/// Creates the demo directory, its certificate, and the configuration.
pub fn prepare(dir: &Path, sets: &[String]) -> Result<Prepared, DemoError> {
    std::fs::create_dir_all(dir).map_err(|source| DemoError::Dir {
        path: dir.to_path_buf(),
        source,
    })?;
    let config = Config::from_toml_str(&demo_toml(dir), "tern demo", sets)?;
    let (cert, key) = match (&config.tls.cert, &config.tls.key) {
        (Some(c), Some(k)) => (c.clone(), k.clone()),
        _ => (dir.join("cert.pem"), dir.join("key.pem")),
    };
    let identity = Identity::load_or_generate(&config.hostname, &cert, &key)?;
    Ok(Prepared { config, identity })
}

/// What a newcomer sees once the demo is up.
pub fn print_banner(dir: &Path, ready: &Ready) {
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
        println!(
            "  swaks --server {a} --tls --tls-verify=no --from you@example.com --to user@demo.test"
        );
    }
    if let Some(a) = find(ListenerKind::Smtps) {
        println!("Or with curl over implicit TLS:");
        println!("  printf 'Subject: hello\\r\\n\\r\\nhi\\r\\n' | curl -k --url smtps://{a} --mail-from you@example.com --mail-rcpt user@demo.test --upload-file -");
    }
    println!("Then list the queue:");
    println!("  tern queue list --spool {}/spool", dir.display());
    println!("Stop with Ctrl-C.");
}
