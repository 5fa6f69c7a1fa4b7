//! Client TLS configuration for the generator.
//!
//! Owns: building one `rustls::ClientConfig` per core (so each core has its own session
//! cache and no lock is shared on the handshake path), trust (`--cacert` or `--insecure`)
//! and session resumption (on by default, off with `--no-resume`).
//!
//! SECURITY: `--insecure` accepts any certificate (signatures over the handshake are still
//! checked, so the peer must hold the key of the certificate it shows). It exists for
//! self-signed test servers and must not be used against anything one cares about.

use std::path::Path;
use std::sync::Arc;

use rustls::client::Resumption;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};

/// How the generator decides to trust the server.
#[derive(Clone, Debug)]
pub enum Trust {
    CaFile(std::path::PathBuf),
    Insecure,
}

pub fn client_config(trust: &Trust, resume: bool) -> Result<Arc<ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let mut cfg = match trust {
        Trust::CaFile(path) => builder
            .with_root_certificates(load_roots(path)?)
            .with_no_client_auth(),
        Trust::Insecure => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(tern_queue::client::tls::NoVerify(provider)))
            .with_no_client_auth(),
    };
    cfg.resumption = if resume {
        Resumption::in_memory_sessions(1024)
    } else {
        Resumption::disabled()
    };
    Ok(Arc::new(cfg))
}

fn load_roots(path: &Path) -> Result<RootCertStore, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut roots = RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &pem[..]) {
        let cert = cert.map_err(|e| format!("{}: {e}", path.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("{}: no certificates", path.display()));
    }
    Ok(roots)
}

pub fn server_name(name: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(name.to_string()).map_err(|e| format!("bad TLS server name {name:?}: {e}"))
}
