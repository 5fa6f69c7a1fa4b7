//! TLS: the rustls server configuration for STARTTLS (RFC 3207) and implicit TLS (RFC 8314).
//!
//! Owns loading the PEM certificate chain and key, generating a self-signed certificate
//! (rcgen) when none is configured, and building one `ServerConfig` per shard so that the
//! session cache is not a lock shared between cores. TLS 1.2 and 1.3 only. This module must
//! never log key material and never fall back to plaintext on its own.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: no PEM certificate found")]
    NoCert { path: PathBuf },
    #[error("{path}: no PEM private key found")]
    NoKey { path: PathBuf },
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(String),
    #[error("invalid certificate or key: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A certificate chain and its key, loaded once and cloned into each shard's config.
#[derive(Debug)]
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl Identity {
    /// Loads a PEM chain and key from files.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Identity, TlsError> {
        let read = |p: &Path| {
            std::fs::read(p).map_err(|source| TlsError::Read {
                path: p.to_path_buf(),
                source,
            })
        };
        let cert_pem = read(cert)?;
        let key_pem = read(key)?;
        let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut &cert_pem[..])
            .collect::<Result<_, _>>()
            .map_err(|source| TlsError::Read {
                path: cert.to_path_buf(),
                source,
            })?;
        if chain.is_empty() {
            return Err(TlsError::NoCert {
                path: cert.to_path_buf(),
            });
        }
        let key_der = rustls_pemfile::private_key(&mut &key_pem[..])
            .map_err(|source| TlsError::Read {
                path: key.to_path_buf(),
                source,
            })?
            .ok_or_else(|| TlsError::NoKey {
                path: key.to_path_buf(),
            })?;
        Ok(Identity {
            chain,
            key: key_der,
        })
    }

    /// Generates a self-signed certificate for `hostname` (and localhost, 127.0.0.1, ::1).
    pub fn self_signed(hostname: &str) -> Result<(Identity, String, String), TlsError> {
        let mut names = vec![hostname.to_string(), "localhost".to_string()];
        names.dedup();
        let mut params =
            rcgen::CertificateParams::new(names).map_err(|e| TlsError::Generate(e.to_string()))?;
        for ip in ["127.0.0.1", "::1"] {
            if let Ok(addr) = ip.parse() {
                params
                    .subject_alt_names
                    .push(rcgen::SanType::IpAddress(addr));
            }
        }
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, hostname);
        let key = rcgen::KeyPair::generate().map_err(|e| TlsError::Generate(e.to_string()))?;
        let cert = params
            .self_signed(&key)
            .map_err(|e| TlsError::Generate(e.to_string()))?;
        let cert_pem = cert.pem();
        let key_pem = key.serialize_pem();
        let identity = Identity {
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::try_from(key.serialize_der())
                .map_err(|e| TlsError::Generate(e.to_string()))?,
        };
        Ok((identity, cert_pem, key_pem))
    }

    /// Loads `cert`/`key` if they exist, otherwise generates a self-signed pair and writes
    /// it there (key mode 0600) so restarts keep the same certificate (clients may pin it).
    pub fn load_or_generate(hostname: &str, cert: &Path, key: &Path) -> Result<Identity, TlsError> {
        if cert.exists() && key.exists() {
            return Identity::from_pem_files(cert, key);
        }
        let (identity, cert_pem, key_pem) = Identity::self_signed(hostname)?;
        write_file(cert, cert_pem.as_bytes(), 0o644)?;
        write_file(key, key_pem.as_bytes(), 0o600)?;
        Ok(identity)
    }
}

fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| TlsError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(err)?;
    f.write_all(data).map_err(err)?;
    f.sync_all().map_err(err)
}

/// The ticket encrypter shared by all shards: the kernel spreads a client's connections
/// over shards, so a ticket issued by one must be accepted by the others. Only ticket key
/// rotation takes its lock for writing.
pub fn ticketer() -> Result<Arc<dyn rustls::server::ProducesTickets>, TlsError> {
    Ok(rustls::crypto::ring::Ticketer::new()?)
}

/// Builds a server configuration (one per shard): TLS 1.3 and 1.2, ring provider, a
/// per-shard session-ID cache and shared stateless tickets for resumption.
pub fn server_config(
    identity: &Identity,
    ticketer: Arc<dyn rustls::server::ProducesTickets>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())?;
    // No session-ID cache: a shard's cache would resume only clients that land on the same
    // shard again (SO_REUSEPORT spreads them), and one shared across shards is a lock on
    // every handshake. Tickets, sealed with the ticketer every shard shares, resume on any
    // shard (measured with OpenSSL's s_client in e2e 02; curl, swaks and Python's ssl
    // offer tickets by default as OpenSSL does, not measured here).
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.ticketer = ticketer;
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let c = dir.path().join("c.pem");
        let k = dir.path().join("k.pem");
        let a = Identity::load_or_generate("mx.test", &c, &k).unwrap();
        let b = Identity::load_or_generate("mx.test", &c, &k).unwrap();
        assert_eq!(a.chain, b.chain, "second call reuses the files");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&k).unwrap().permissions().mode() & 0o777,
            0o600
        );
        server_config(&a, ticketer().unwrap()).unwrap();
    }
}
