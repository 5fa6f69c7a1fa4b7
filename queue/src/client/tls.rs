//! The rustls client configuration for outbound STARTTLS (RFC 3207).
//!
//! Owns: choosing trust anchors (a configured CA file, else the system bundle), the ring
//! provider, the no-verification verifier used when `verify_certs` is off, and the size
//! of each configuration's TLS session cache (resumption to next hops).
//! Reading the CA file is blocking file I/O: the runner builds configurations on glommio's
//! blocking thread and caches them per shard (`crate::tls_configs`).
//! Must never: skip the handshake signature checks (even the no-verify verifier proves the
//! peer holds the key of the certificate it sent; it only skips trusting that
//! certificate), or silently run with an empty trust store when verification is on.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::Resumption;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// Why no TLS client configuration could be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("cannot read CA file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no usable CA certificate in {0}")]
    NoCa(String),
    #[error("rustls: {0}")]
    Rustls(#[from] rustls::Error),
    /// The build panicked on the blocking thread (a bug; the panic is not propagated to
    /// the shard).
    #[error("building the TLS client configuration panicked")]
    Panicked,
}

/// TLS sessions remembered per configuration (rustls' in-memory store, keyed by server
/// name). A shard talks to a few hundred next hops at most at a time; each entry is a few
/// hundred bytes, so this bounds the store at well under a megabyte per configuration.
pub const SESSION_CACHE: usize = 256;

/// Well-known system CA bundles (the list Go's crypto/x509 uses on Linux).
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/pki/tls/cacert.pem",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the client configuration. Reads `ca_file` (or the system bundle) when `verify`
/// is on: blocking I/O, so never on a shard thread. A configuration carries its own
/// session store: reusing one configuration for successive connections is what lets
/// them resume TLS sessions (the runner keeps one per shard and trust policy).
pub fn client_config(
    verify: bool,
    ca_file: Option<&Path>,
) -> Result<Arc<ClientConfig>, TlsConfigError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let mut config = if verify {
        let roots = load_roots(ca_file)?;
        builder.with_root_certificates(roots).with_no_client_auth()
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
            .with_no_client_auth()
    };
    // The rustls default today, stated so that the size is ours: resumption (TLS 1.3
    // tickets, TLS 1.2 ids and tickets) saves the next hop and us a full handshake per
    // connection.
    config.resumption = Resumption::in_memory_sessions(SESSION_CACHE);
    Ok(Arc::new(config))
}

fn load_roots(ca_file: Option<&Path>) -> Result<RootCertStore, TlsConfigError> {
    let candidates: Vec<&Path> = match ca_file {
        Some(p) => vec![p],
        None => SYSTEM_BUNDLES.iter().map(Path::new).collect(),
    };
    let mut roots = RootCertStore::empty();
    for path in &candidates {
        let pem = match std::fs::read(path) {
            Ok(p) => p,
            Err(source) if ca_file.is_some() => {
                return Err(TlsConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })
            }
            Err(_) => continue,
        };
        for cert in rustls_pemfile::certs(&mut &pem[..]).flatten() {
            // A bundle may hold certificates rustls cannot use; skip those, not the file.
            let _ = roots.add(cert);
        }
        if !roots.is_empty() {
            break;
        }
    }
    if roots.is_empty() {
        return Err(TlsConfigError::NoCa(match ca_file {
            Some(p) => p.display().to_string(),
            None => "the system CA bundles".into(),
        }));
    }
    Ok(roots)
}

/// Accepts any certificate (opportunistic TLS, RFC 7435: encryption against passive
/// eavesdroppers without authentication), but still checks the handshake signatures.
/// Public so that other clients of the project (the load generator's `--insecure`) use
/// this one verifier instead of a copy.
#[derive(Debug)]
pub struct NoVerify(pub Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
