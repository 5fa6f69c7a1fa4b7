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

/// The sink's server configuration (`--starttls`): the given PEM certificate and key, or a
/// fresh self-signed one for `localhost`. TLS 1.3 and 1.2, session tickets for resumption.
/// Built here rather than borrowed from the server so that the generator depends on the
/// protocol core only, never on the server it measures.
pub fn sink_server_config(
    files: Option<(&Path, &Path)>,
) -> Result<Arc<rustls::ServerConfig>, String> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let (chain, key): (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) = match files {
        Some((cert, key)) => {
            let read = |p: &Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
            let chain = rustls_pemfile::certs(&mut &read(cert)?[..])
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("{}: {e}", cert.display()))?;
            let key = rustls_pemfile::private_key(&mut &read(key)?[..])
                .map_err(|e| format!("{}: {e}", key.display()))?
                .ok_or_else(|| format!("{}: no private key", key.display()))?;
            (chain, key)
        }
        None => {
            let c = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
                .map_err(|e| e.to_string())?;
            let key = PrivateKeyDer::try_from(c.signing_key.serialize_der())
                .map_err(|e| e.to_string())?;
            (vec![c.cert.der().clone()], key)
        }
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| e.to_string())?;
    cfg.ticketer = rustls::crypto::ring::Ticketer::new().map_err(|e| e.to_string())?;
    Ok(Arc::new(cfg))
}
