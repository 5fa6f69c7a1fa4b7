//! DKIM signing (RFC 6376; Ed25519 per RFC 8463) of accepted mail, once, before the 250.
//!
//! Owns: the `[dkim]` configuration, the keys (read, checked and parsed once per
//! configuration load: at start, by `check-config` and on reload, never per message), the
//! choice of what is signed and the `DKIM-Signature:` fields themselves.
//!
//! Canonicalisation, header selection and the tag list are Stalwart's `mail-auth`
//! (`DkimSigner::sign_streaming`: the header section is buffered, the body slices are
//! hashed as they are, never copied); the signatures are made with AWS-LC (`aws-lc-rs`,
//! `SigningKeyPair`), 2.4x (RSA) and 2.5x (Ed25519) faster than ring here. See
//! docs/decisions.md.
//!
//! `ShardStore::store` calls [`Signer::sign`] and prepends what it returns as body slices
//! (like the Received: header), so the signatures are in the spool record and a retry
//! never signs again.
//!
//! Must never: read a key file per message, or apply a configuration only in part (a bad
//! key fails the whole load; a reload that fails keeps the previous keys).

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair, RsaKeyPair};
use bytes::Bytes;
use mail_auth::common::crypto::{Algorithm as DkimAlg, Sha256, SigningKey};
use mail_auth::common::headers::{HeaderWriter, Writable};
use mail_auth::dkim::{Canonicalization, DkimSigner};
use serde::{Deserialize, Serialize};
use tern_smtp::session::Message;

/// Key algorithm of a `[[dkim.keys]]` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    /// rsa-sha256, 2048 bits or more.
    Rsa,
    /// ed25519-sha256 (RFC 8463).
    Ed25519,
}

impl Algorithm {
    pub const ALL: [Algorithm; 2] = [Algorithm::Rsa, Algorithm::Ed25519];

    pub fn label(self) -> &'static str {
        match self {
            Algorithm::Rsa => "rsa",
            Algorithm::Ed25519 => "ed25519",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// Which mail is signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SignWhen {
    /// From sessions that authenticated (SMTP AUTH).
    Authenticated,
    /// From clients in `relay.trusted_networks`.
    Trusted,
}

/// `[dkim]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DkimConfig {
    /// Sign mail from these clients whose From: domain has keys.
    pub sign: Vec<SignWhen>,
    /// Keys, per domain and selector; a domain with several is signed with each.
    pub keys: Vec<KeyConfig>,
    /// Where signatures are computed: on the shard's own thread (`inline`) or on a
    /// signing thread of the shard's own (`thread`). See docs/decisions.md for the
    /// measurements behind the default.
    pub signer: SignerMode,
}

/// `dkim.signer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SignerMode {
    /// On the shard's thread, between the final dot and the spool write.
    #[default]
    Inline,
    /// On one signing thread per shard; the session waits for it like for its commit,
    /// and the shard serves its other sessions meanwhile.
    Thread,
    /// RSA signatures on the shard's signing thread while it keeps up (fewer than
    /// `dkim_thread::AUTO_MAX_IN_FLIGHT` waiting), on the shard's own thread when it
    /// falls behind (the shard is saturated: the niced thread would starve) and always
    /// for Ed25519-only keys (cheaper than the hand-off).
    Auto,
}

impl Default for DkimConfig {
    fn default() -> Self {
        DkimConfig {
            sign: vec![SignWhen::Authenticated, SignWhen::Trusted],
            keys: Vec::new(),
            signer: SignerMode::default(),
        }
    }
}

/// One `[[dkim.keys]]` entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// The signing domain (d=), also the From: domain whose mail this key signs.
    pub domain: String,
    /// The selector (s=): the key's DNS record is `<selector>._domainkey.<domain>`.
    pub selector: String,
    pub algorithm: Algorithm,
    /// PEM private key (PKCS#8; PKCS#1 for RSA too), mode 0600 or stricter.
    pub key: PathBuf,
}

/// A parsed private key.
pub enum SigningKeyPair {
    Rsa(RsaKeyPair),
    Ed25519(Ed25519KeyPair),
}

impl SigningKeyPair {
    /// Parses a PEM private key of algorithm `alg`; RSA keys under 2048 bits are refused.
    pub fn from_pem(pem: &[u8], alg: Algorithm) -> Result<SigningKeyPair, String> {
        use rustls::pki_types::PrivateKeyDer;
        let der = rustls_pemfile::private_key(&mut &pem[..])
            .map_err(|e| format!("not a PEM private key: {e}"))?
            .ok_or("no private key in the file (PEM \"PRIVATE KEY\" expected)")?;
        match (alg, &der) {
            (Algorithm::Rsa, PrivateKeyDer::Pkcs8(k)) => {
                RsaKeyPair::from_pkcs8(k.secret_pkcs8_der()).map_err(|e| e.to_string())
            }
            (Algorithm::Rsa, PrivateKeyDer::Pkcs1(k)) => {
                RsaKeyPair::from_der(k.secret_pkcs1_der()).map_err(|e| e.to_string())
            }
            (Algorithm::Ed25519, PrivateKeyDer::Pkcs8(k)) => {
                return Ed25519KeyPair::from_pkcs8_maybe_unchecked(k.secret_pkcs8_der())
                    .map(SigningKeyPair::Ed25519)
                    .map_err(|e| format!("not an Ed25519 key: {e}"));
            }
            _ => return Err(format!("not a {} key", alg.label())),
        }
        .map_err(|e| format!("not a usable RSA key (aws-lc: {e}; 2048 to 8192 bits)"))
        .and_then(|k| {
            let bits = k.public_modulus_len() * 8;
            if bits < 2048 {
                Err(format!("RSA key of {bits} bits: 2048 or more required"))
            } else {
                Ok(SigningKeyPair::Rsa(k))
            }
        })
    }

    pub fn algorithm(&self) -> Algorithm {
        match self {
            SigningKeyPair::Rsa(_) => Algorithm::Rsa,
            SigningKeyPair::Ed25519(_) => Algorithm::Ed25519,
        }
    }

    /// Size in bits (RSA modulus; 256 for Ed25519).
    pub fn bits(&self) -> usize {
        match self {
            SigningKeyPair::Rsa(k) => k.public_modulus_len() * 8,
            SigningKeyPair::Ed25519(_) => 256,
        }
    }

    /// The `p=` value of the key's DNS record (base64): SubjectPublicKeyInfo for RSA,
    /// the raw 32-byte key for Ed25519 (RFC 8463 §4.2).
    pub fn public_key_b64(&self) -> String {
        use base64::Engine;
        let raw = match self {
            SigningKeyPair::Rsa(k) => spki_rsa(k.public_key().as_ref()),
            SigningKeyPair::Ed25519(k) => k.public_key().as_ref().to_vec(),
        };
        base64::engine::general_purpose::STANDARD.encode(raw)
    }
}

/// Wraps a DER RSAPublicKey in a SubjectPublicKeyInfo (rsaEncryption, NULL parameters).
fn spki_rsa(rsa_public_key: &[u8]) -> Vec<u8> {
    fn len(out: &mut Vec<u8>, n: usize) {
        if n < 0x80 {
            out.push(n as u8);
        } else {
            let b = n.to_be_bytes();
            let skip = b.iter().take_while(|&&x| x == 0).count();
            out.push(0x80 | (b.len() - skip) as u8);
            out.extend_from_slice(&b[skip..]);
        }
    }
    const ALG: [u8; 15] = [
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
    ];
    let mut bits = vec![0x03];
    len(&mut bits, rsa_public_key.len() + 1);
    bits.push(0);
    bits.extend_from_slice(rsa_public_key);
    let mut out = vec![0x30];
    len(&mut out, ALG.len() + bits.len());
    out.extend_from_slice(&ALG);
    out.extend_from_slice(&bits);
    out
}

/// The key as mail-auth's `SigningKey` (borrowed: a signer is built per message).
struct KeyRef<'a>(&'a SigningKeyPair);

impl SigningKey for KeyRef<'_> {
    type Hasher = Sha256;

    fn sign(&self, input: impl Writable) -> mail_auth::Result<Vec<u8>> {
        // What is signed is the canonical signed header fields plus the DKIM-Signature
        // field without b=: small. RSA: AWS-LC hashes it (PKCS#1 v1.5 with SHA-256).
        let mut data = Vec::with_capacity(1024);
        input.write(&mut data);
        let fail = |e: String| {
            mail_auth::Error::Crypto(mail_auth::common::crypto::CryptoError::Library(e))
        };
        match self.0 {
            SigningKeyPair::Rsa(k) => {
                let mut sig = vec![0; k.public_modulus_len()];
                k.sign(
                    &aws_lc_rs::signature::RSA_PKCS1_SHA256,
                    &aws_lc_rs::rand::SystemRandom::new(),
                    &data,
                    &mut sig,
                )
                .map_err(|e| fail(e.to_string()))?;
                Ok(sig)
            }
            // RFC 8463 §3: PureEdDSA over the SHA-256 hash of the data, not the data.
            SigningKeyPair::Ed25519(k) => {
                let hash = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &data);
                Ok(k.sign(hash.as_ref()).as_ref().to_vec())
            }
        }
    }

    fn algorithm(&self) -> DkimAlg {
        match self.0 {
            SigningKeyPair::Rsa(_) => DkimAlg::RsaSha256,
            SigningKeyPair::Ed25519(_) => DkimAlg::Ed25519Sha256,
        }
    }
}

/// One loaded key.
pub struct LoadedKey {
    pub domain: String,
    pub selector: String,
    pub path: PathBuf,
    pub key: SigningKeyPair,
}

/// The signing state of one configuration: built by [`Signer::load`], shared (Arc) by
/// every shard, replaced whole on reload.
#[derive(Default)]
pub struct Signer {
    authenticated: bool,
    trusted: bool,
    mode: SignerMode,
    /// Lower-case domain → its keys, in configuration order.
    domains: HashMap<String, Vec<LoadedKey>>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("authenticated", &self.authenticated)
            .field("trusted", &self.trusted)
            .field("mode", &self.mode)
            .field("keys", &self.keys().count())
            .finish()
    }
}

/// RFC 6376 §5.4.1's recommended fields, plus the MIME ones (a changed Content-Type
/// changes what the reader sees). Signed when present; From: is listed once more than it
/// is present (oversigned), so that no From: can be added. Absent fields are not signed
/// as empty (that would break every mailing list that adds List-Id).
const SIGNED_FIELDS: &[&str] = &[
    "From",
    "Reply-To",
    "Subject",
    "Date",
    "To",
    "Cc",
    "Resent-Date",
    "Resent-From",
    "Resent-To",
    "Resent-Cc",
    "In-Reply-To",
    "References",
    "List-Id",
    "List-Help",
    "List-Unsubscribe",
    "List-Subscribe",
    "List-Post",
    "List-Owner",
    "List-Archive",
    "Message-ID",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
];

/// Why a message could not be signed (it is then refused with 451, not sent unsigned).
#[derive(Debug, thiserror::Error)]
#[error("DKIM signing with {domain}/{selector} failed: {why}")]
pub struct SignError {
    pub domain: String,
    pub selector: String,
    pub why: String,
}

impl Signer {
    /// Reads and parses every key of `cfg`. Any problem fails the whole load.
    pub fn load(cfg: &DkimConfig) -> Result<Signer, String> {
        let mut s = Signer {
            authenticated: cfg.sign.contains(&SignWhen::Authenticated),
            trusted: cfg.sign.contains(&SignWhen::Trusted),
            mode: cfg.signer,
            domains: HashMap::new(),
        };
        for (i, k) in cfg.keys.iter().enumerate() {
            let at = format!("dkim.keys[{i}] ({}/{})", k.domain, k.selector);
            let domain = k.domain.trim_end_matches('.').to_ascii_lowercase();
            if !valid_name(&domain) || !domain.contains('.') {
                return Err(format!(
                    "{at}: domain {:?} is not a domain name (use A-labels for international names)",
                    k.domain
                ));
            }
            if !valid_name(&k.selector) {
                return Err(format!(
                    "{at}: selector {:?} is not a DNS label sequence",
                    k.selector
                ));
            }
            if k.key.as_os_str().is_empty() {
                return Err(format!("{at}: no key file (key = \"/path/key.pem\")"));
            }
            let key = read_key(&k.key, k.algorithm).map_err(|e| format!("{at}: {e}"))?;
            let list = s.domains.entry(domain.clone()).or_default();
            if list
                .iter()
                .any(|l| l.selector.eq_ignore_ascii_case(&k.selector))
            {
                return Err(format!("{at}: selector configured twice for this domain"));
            }
            list.push(LoadedKey {
                domain,
                selector: k.selector.clone(),
                path: k.key.clone(),
                key,
            });
        }
        Ok(s)
    }

    /// Every loaded key, for `tern features` and the start-up log.
    pub fn keys(&self) -> impl Iterator<Item = &LoadedKey> {
        let mut v: Vec<&LoadedKey> = self.domains.values().flatten().collect();
        v.sort_by(|a, b| (&a.domain, &a.selector).cmp(&(&b.domain, &b.selector)));
        v.into_iter()
    }

    pub fn is_empty(&self) -> bool {
        self.domains.is_empty()
    }

    /// Where this configuration computes signatures.
    pub fn mode(&self) -> SignerMode {
        self.mode
    }

    /// Whether `msg` comes from a client whose mail is signed (authenticated session or
    /// trusted client, as configured) and keys exist at all. Its From: domain decides the
    /// rest (`sign_body`).
    pub fn applies(&self, msg: &Message) -> bool {
        !self.domains.is_empty()
            && ((self.authenticated && msg.authenticated()) || (self.trusted && msg.trusted()))
    }

    /// Whether [`Signer::sign_body`] would sign this body (its From: domain has keys).
    pub fn has_keys_for(&self, body: &[Bytes]) -> bool {
        self.keys_for(body).is_some()
    }

    /// Whether this body's From: domain has an RSA key (a millisecond-class signature)
    /// among its keys; None when it has no keys (not signed).
    pub fn needs_rsa(&self, body: &[Bytes]) -> Option<bool> {
        self.keys_for(body)
            .map(|keys| keys.iter().any(|k| k.key.algorithm() == Algorithm::Rsa))
    }

    fn keys_for(&self, body: &[Bytes]) -> Option<&Vec<LoadedKey>> {
        tern_smtp::sender::header_section(body)
            .and_then(|h| from_domain(&h))
            .and_then(|d| self.domains.get(&d))
    }

    /// The `DKIM-Signature:` fields for `msg` (one per key of its From: domain), or none
    /// when it is not to be signed: not from an authenticated session or trusted client
    /// (as configured), no From: domain with keys. The body is read slice by slice; only
    /// the header section is copied.
    pub fn sign(&self, msg: &Message) -> Result<Vec<(Algorithm, Bytes)>, SignError> {
        if !self.applies(msg) {
            return Ok(Vec::new());
        }
        self.sign_body(&msg.body)
    }

    /// [`Signer::sign_body`], with a panic in the computation turned into an error for
    /// this message (451) rather than the end of the thread signing it: a shard and its
    /// sessions, or the signing thread and every later signature.
    pub fn sign_body_or_fail(&self, body: &[Bytes]) -> Result<Vec<(Algorithm, Bytes)>, SignError> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.sign_body(body)))
            .unwrap_or_else(|_| {
                Err(SignError {
                    domain: String::new(),
                    selector: String::new(),
                    why: "the signature computation panicked".into(),
                })
            })
    }

    /// [`Signer::sign`] for any message body, whoever sent it.
    pub fn sign_body(&self, body: &[Bytes]) -> Result<Vec<(Algorithm, Bytes)>, SignError> {
        let Some(header) = tern_smtp::sender::header_section(body) else {
            return Ok(Vec::new());
        };
        let Some(keys) = from_domain(&header).and_then(|d| self.domains.get(&d)) else {
            return Ok(Vec::new());
        };
        let fields = signed_fields(&header);
        let mut streams = Vec::with_capacity(keys.len());
        let signers: Vec<_> = keys
            .iter()
            .map(|k| {
                DkimSigner::from_key(KeyRef(&k.key))
                    .domain(k.domain.clone())
                    .selector(k.selector.clone())
                    .headers(fields.iter().copied())
                    .header_canonicalization(Canonicalization::Relaxed)
                    .body_canonicalization(Canonicalization::Relaxed)
            })
            .collect();
        for s in &signers {
            streams.push(s.sign_streaming());
        }
        // One pass over the body slices, each fed to every key's stream.
        for piece in body {
            for st in &mut streams {
                st.write(piece);
            }
        }
        let mut out = Vec::with_capacity(keys.len());
        for (k, st) in keys.iter().zip(streams) {
            let sig = st.finish().map_err(|e| SignError {
                domain: k.domain.clone(),
                selector: k.selector.clone(),
                why: e.to_string(),
            })?;
            out.push((k.key.algorithm(), Bytes::from(sig.to_header())));
        }
        Ok(out)
    }
}

/// DNS name syntax for domains and selectors: dot-separated LDH labels (underscores
/// allowed), 1..=63 octets each.
fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Reads a key file: it must exist, be readable by its owner only, and parse.
fn read_key(path: &Path, alg: Algorithm) -> Result<SigningKeyPair, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(format!(
            "{}: readable by group or others (mode {:04o}); chmod 600 it",
            path.display(),
            mode & 0o7777
        ));
    }
    let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    SigningKeyPair::from_pem(&pem, alg).map_err(|e| format!("{}: {e}", path.display()))
}

/// The domain of the first From: address, lower-cased.
fn from_domain(header: &[u8]) -> Option<String> {
    let addrs = tern_smtp::sender::header_from_addresses(header)?;
    let first = addrs.first()?;
    let (_, d) = first.rsplit_once('@')?;
    Some(d.trim_end_matches('.').to_ascii_lowercase())
}

/// The h= list for this header section: the recommended fields present, and From once
/// more than present.
fn signed_fields(header: &[u8]) -> Vec<&'static str> {
    let mut present = [false; SIGNED_FIELDS.len()];
    for line in header.split(|&b| b == b'\n') {
        if line.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
            continue;
        }
        let Some(colon) = memchr::memchr(b':', line) else {
            continue;
        };
        let name = line[..colon].trim_ascii_end();
        if let Some(i) = SIGNED_FIELDS
            .iter()
            .position(|f| f.as_bytes().eq_ignore_ascii_case(name))
        {
            present[i] = true;
        }
    }
    let mut v: Vec<&'static str> = SIGNED_FIELDS
        .iter()
        .zip(present)
        .filter(|(_, p)| *p)
        .map(|(f, _)| *f)
        .collect();
    // mail-auth signs every instance of a listed name and lists a name once more when
    // the template names it more often than it was found: From twice = oversigned.
    v.push("From");
    v
}

#[cfg(test)]
#[path = "dkim_tests.rs"]
mod tests;
