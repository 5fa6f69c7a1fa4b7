//! `tern dkim keygen`: a new DKIM private key (PEM, mode 0600) and the DNS TXT record that
//! publishes its public half.
//!
//! Ed25519 keys come from ring (the crate that signs with them); RSA keys from the `rsa`
//! crate (ring cannot generate RSA keys), written as PKCS#8. The written key is read back
//! through the same parser the server uses, so what keygen writes the server loads.
//! Must never: overwrite an existing key file.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::process::ExitCode;

use base64::Engine;
use tern_engine::dkim::{Algorithm, SigningKeyPair};

#[derive(clap::Subcommand)]
pub enum DkimCmd {
    /// Generate a signing key and print its DNS record.
    Keygen(KeygenArgs),
}

#[derive(clap::Args)]
pub struct KeygenArgs {
    /// The signing domain (d=).
    #[arg(long)]
    domain: String,
    /// The selector (s=): the record is published at SELECTOR._domainkey.DOMAIN.
    #[arg(long)]
    selector: String,
    /// rsa or ed25519. Sign with both where the receivers matter: Ed25519 alone fails at
    /// some large providers.
    #[arg(long, default_value = "rsa", value_parser = ["rsa", "ed25519"])]
    algorithm: String,
    /// RSA modulus size (2048 or more).
    #[arg(long, default_value_t = 2048)]
    bits: usize,
    /// Directory for the key file DOMAIN.SELECTOR.ALGORITHM.pem.
    #[arg(long, default_value = ".")]
    dir: PathBuf,
}

pub fn run(cmd: DkimCmd) -> ExitCode {
    match cmd {
        DkimCmd::Keygen(a) => match keygen(&a) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tern dkim keygen: {e}");
                ExitCode::from(1)
            }
        },
    }
}

fn keygen(a: &KeygenArgs) -> Result<(), String> {
    let alg = match a.algorithm.as_str() {
        "ed25519" => Algorithm::Ed25519,
        _ => Algorithm::Rsa,
    };
    let domain = a.domain.trim_end_matches('.').to_ascii_lowercase();
    if !name_ok(&domain) || !name_ok(&a.selector) {
        return Err("--domain and --selector must be DNS names (A-labels)".into());
    }
    let pem = match alg {
        Algorithm::Ed25519 => {
            // PKCS#8 v1 (RFC 8410's form, no public key inside): what OpenSSL, and so
            // OpenDKIM and `openssl pkey`, read. ring writes v2 only, which OpenSSL 3.0
            // refuses ("wrong tag").
            let rng = aws_lc_rs::rand::SystemRandom::new();
            let der = aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8v1(&rng)
                .map_err(|e| format!("key generation failed: {e}"))?;
            pem("PRIVATE KEY", der.as_ref())
        }
        Algorithm::Rsa => {
            use rsa::pkcs8::EncodePrivateKey;
            if a.bits < 2048 || a.bits > 8192 {
                return Err("--bits must be between 2048 and 8192".into());
            }
            let mut rng = rsa::rand_core::OsRng;
            let key = rsa::RsaPrivateKey::new(&mut rng, a.bits)
                .map_err(|e| format!("key generation failed: {e}"))?;
            let der = key
                .to_pkcs8_der()
                .map_err(|e| format!("key encoding failed: {e}"))?;
            pem("PRIVATE KEY", der.as_bytes())
        }
    };
    // What the server will load: parse it back the same way.
    let key = SigningKeyPair::from_pem(pem.as_bytes(), alg)?;
    let path = a
        .dir
        .join(format!("{domain}.{}.{}.pem", a.selector, alg.label()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(pem.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    println!("{}", txt_record(&domain, &a.selector, &key));
    eprintln!(
        "Private key written to {} (mode 0600). Publish the record above, then add:\n\n[[dkim.keys]]\ndomain = \"{domain}\"\nselector = \"{}\"\nalgorithm = \"{}\"\nkey = \"{}\"",
        path.display(),
        a.selector,
        alg.label(),
        path.display()
    );
    Ok(())
}

/// `SELECTOR._domainkey.DOMAIN. IN TXT "v=DKIM1; k=...; p=..."`, the value cut into
/// strings of at most 255 octets (RFC 1035 character-strings; the resolver joins them).
pub fn txt_record(domain: &str, selector: &str, key: &SigningKeyPair) -> String {
    let value = format!(
        "v=DKIM1; k={}; p={}",
        key.algorithm().label(),
        key.public_key_b64()
    );
    let parts: Vec<String> = value
        .as_bytes()
        .chunks(255)
        .map(|c| format!("\"{}\"", String::from_utf8_lossy(c)))
        .collect();
    format!("{selector}._domainkey.{domain}. IN TXT {}", parts.join(" "))
}

fn name_ok(s: &str) -> bool {
    !s.is_empty()
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut s = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        s.push_str(&String::from_utf8_lossy(line));
        s.push('\n');
    }
    s.push_str(&format!("-----END {label}-----\n"));
    s
}
