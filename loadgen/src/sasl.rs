//! The client side of SMTP AUTH (RFC 4954) for the generator.
//!
//! Owns: driving one AUTH exchange over an `SmtpConn` for PLAIN, LOGIN, CRAM-MD5,
//! DIGEST-MD5 and SCRAM-SHA-256. The cryptography comes from
//! `tern_smtp::sasl::client` (and its PBKDF2/HMAC helpers), so the generator and the
//! server's tests share one reference implementation.
//!
//! SCRAM-SHA-256 caches SaltedPassword per (salt, iterations), as RFC 5802 §5.1 allows a
//! client to: otherwise the generator would spend 4096 PBKDF2 rounds per handshake and
//! measure itself instead of the server. The server's final message (`v=`) is verified;
//! DIGEST-MD5's `rspauth` is verified too.

use std::cell::RefCell;
use std::collections::HashMap;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use rand::Rng as _;
use sha2::{Digest as _, Sha256};
use tern_smtp::sasl::client as sc;
use tern_smtp::users::secrets::{hmac_once, scram_hi};

use crate::conn::{OpError, SmtpConn};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum Mech {
    #[value(name = "PLAIN", alias = "plain")]
    Plain,
    #[value(name = "LOGIN", alias = "login")]
    Login,
    #[value(name = "CRAM-MD5", alias = "cram-md5")]
    CramMd5,
    #[value(name = "DIGEST-MD5", alias = "digest-md5")]
    DigestMd5,
    #[value(name = "SCRAM-SHA-256", alias = "scram-sha-256")]
    ScramSha256,
}

impl Mech {
    pub fn name(self) -> &'static str {
        match self {
            Mech::Plain => "PLAIN",
            Mech::Login => "LOGIN",
            Mech::CramMd5 => "CRAM-MD5",
            Mech::DigestMd5 => "DIGEST-MD5",
            Mech::ScramSha256 => "SCRAM-SHA-256",
        }
    }
}

pub struct Creds {
    pub user: String,
    pub password: String,
    /// DIGEST-MD5 realm when the server's challenge names none.
    pub realm: Option<String>,
}

/// ClientKey, StoredKey and ServerKey derived from one SaltedPassword.
type ScramKeys = ([u8; 32], [u8; 32], [u8; 32]);

/// Per-core client state (never shared between cores, never borrowed across an await).
#[derive(Default)]
pub struct SaslCache {
    /// (salt, iterations) -> (ClientKey, StoredKey, ServerKey)
    scram: RefCell<HashMap<(Vec<u8>, u32), ScramKeys>>,
}

fn b64(data: &[u8]) -> Vec<u8> {
    let mut v = B64.encode(data).into_bytes();
    v.extend_from_slice(b"\r\n");
    v
}

fn decode_challenge(reply: &crate::conn::Reply) -> Result<Vec<u8>, OpError> {
    B64.decode(reply.last().trim())
        .map_err(|_| OpError::Protocol("334 challenge is not base64".into()))
}

fn nonce() -> String {
    let bytes: [u8; 18] = rand::rng().random();
    B64.encode(bytes)
}

/// Runs AUTH `mech` to its 235. `server_host` is the host part of DIGEST-MD5's
/// digest-uri (the name in the server's greeting).
pub async fn authenticate(
    c: &mut SmtpConn,
    mech: Mech,
    creds: &Creds,
    server_host: &str,
    cache: &SaslCache,
) -> Result<(), OpError> {
    let (user, pw) = (creds.user.as_str(), creds.password.as_str());
    match mech {
        Mech::Plain => {
            let ir = B64.encode(sc::plain("", user, pw));
            c.cmd(format!("AUTH PLAIN {ir}\r\n").as_bytes())
                .await?
                .expect(235)?;
        }
        Mech::Login => {
            c.cmd(b"AUTH LOGIN\r\n").await?.expect(334)?;
            c.cmd(&b64(user.as_bytes())).await?.expect(334)?;
            c.cmd(&b64(pw.as_bytes())).await?.expect(235)?;
        }
        Mech::CramMd5 => {
            let r = c.cmd(b"AUTH CRAM-MD5\r\n").await?.expect(334)?;
            let challenge = decode_challenge(&r)?;
            c.cmd(&b64(&sc::cram_md5(user, pw, &challenge)))
                .await?
                .expect(235)?;
        }
        Mech::DigestMd5 => {
            let r = c.cmd(b"AUTH DIGEST-MD5\r\n").await?.expect(334)?;
            let challenge = decode_challenge(&r)?;
            let fields = parse_digest_challenge(&challenge);
            let nonce_s = fields
                .iter()
                .find(|(k, _)| k == "nonce")
                .map(|(_, v)| v.clone())
                .ok_or_else(|| OpError::Protocol("DIGEST-MD5 challenge without nonce".into()))?;
            let realm = fields
                .iter()
                .find(|(k, _)| k == "realm")
                .map(|(_, v)| v.clone())
                .or_else(|| creds.realm.clone())
                .unwrap_or_else(|| server_host.to_string());
            let uri = format!("smtp/{server_host}");
            let (resp, rspauth) = sc::digest_md5(user, &realm, pw, &nonce_s, &nonce(), &uri);
            let r = c.cmd(&b64(&resp)).await?.expect(334)?;
            if decode_challenge(&r)? != rspauth.as_bytes() {
                return Err(OpError::Protocol("DIGEST-MD5 rspauth mismatch".into()));
            }
            c.cmd(b"\r\n").await?.expect(235)?;
        }
        Mech::ScramSha256 => {
            let name = user.replace('=', "=3D").replace(',', "=2C");
            let cnonce = nonce();
            let bare = format!("n={name},r={cnonce}");
            let first = format!("n,,{bare}");
            let r = c
                .cmd(format!("AUTH SCRAM-SHA-256 {}\r\n", B64.encode(&first)).as_bytes())
                .await?
                .expect(334)?;
            let server_first = decode_challenge(&r)?;
            let (final_msg, server_sig) = scram_final(&bare, &server_first, &cnonce, pw, cache)?;
            let r = c.cmd(&b64(&final_msg)).await?.expect(334)?;
            let expect = format!("v={}", B64.encode(server_sig));
            if decode_challenge(&r)? != expect.as_bytes() {
                return Err(OpError::Protocol("SCRAM server signature mismatch".into()));
            }
            c.cmd(b"\r\n").await?.expect(235)?;
        }
    }
    Ok(())
}

/// RFC 5802 §3 client-final-message and the ServerSignature to expect. The same algebra
/// as `tern_smtp::sasl::client::scram_client_final`, with SaltedPassword cached.
fn scram_final(
    bare: &str,
    server_first: &[u8],
    cnonce: &str,
    password: &str,
    cache: &SaslCache,
) -> Result<(Vec<u8>, [u8; 32]), OpError> {
    let bad = || OpError::Protocol("bad SCRAM server-first-message".into());
    let sf = std::str::from_utf8(server_first).map_err(|_| bad())?;
    let (mut r, mut s, mut i) = (None, None, None);
    for attr in sf.split(',') {
        match attr.split_at_checked(2) {
            Some(("r=", v)) => r = Some(v),
            Some(("s=", v)) => s = B64.decode(v).ok(),
            Some(("i=", v)) => i = v.parse::<u32>().ok(),
            _ => {}
        }
    }
    let (r, s, i) = (r.ok_or_else(bad)?, s.ok_or_else(bad)?, i.ok_or_else(bad)?);
    if !r.starts_with(cnonce) || i == 0 || i > 1_000_000 {
        return Err(bad());
    }
    let key = (s, i);
    let cached = cache.scram.borrow().get(&key).copied();
    let (client_key, stored_key, server_key) = match cached {
        Some(k) => k,
        None => {
            let salted = scram_hi(password.as_bytes(), &key.0, i);
            let client_key = hmac_once(&salted, b"Client Key");
            let stored_key: [u8; 32] = Sha256::digest(client_key).into();
            let server_key = hmac_once(&salted, b"Server Key");
            let k = (client_key, stored_key, server_key);
            cache.scram.borrow_mut().insert(key, k);
            k
        }
    };
    // c= is base64("n,,"): no channel binding, no authzid.
    let without_proof = format!("c=biws,r={r}");
    let auth_message = format!("{bare},{sf},{without_proof}");
    let signature = hmac_once(&stored_key, auth_message.as_bytes());
    let proof: Vec<u8> = client_key
        .iter()
        .zip(signature)
        .map(|(k, s)| k ^ s)
        .collect();
    let server_sig = hmac_once(&server_key, auth_message.as_bytes());
    Ok((
        format!("{without_proof},p={}", B64.encode(proof)).into_bytes(),
        server_sig,
    ))
}

/// RFC 2831 §2.1.1 digest-challenge: `key=value` or `key="quoted"` pairs.
fn parse_digest_challenge(c: &[u8]) -> Vec<(String, String)> {
    let s = String::from_utf8_lossy(c);
    let mut out = Vec::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let Some(eq) = rest.find('=') else { break };
        let key = rest[..eq]
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        rest = &rest[eq + 1..];
        let value;
        if let Some(q) = rest.strip_prefix('"') {
            let mut v = String::new();
            let mut chars = q.char_indices();
            let mut end = q.len();
            while let Some((idx, ch)) = chars.next() {
                match ch {
                    '\\' => {
                        if let Some((_, n)) = chars.next() {
                            v.push(n);
                        }
                    }
                    '"' => {
                        end = idx + 1;
                        break;
                    }
                    _ => v.push(ch),
                }
            }
            value = v;
            rest = &q[end.min(q.len())..];
        } else {
            let end = rest.find(',').unwrap_or(rest.len());
            value = rest[..end].trim().to_string();
            rest = &rest[end..];
        }
        rest = rest.trim_start_matches([',', ' ']);
        out.push((key, value));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_challenge_fields() {
        let f = parse_digest_challenge(
            br#"realm="localhost",nonce="OA6MG9tEQGm2hh",qop="auth",charset=utf-8,algorithm=md5-sess"#,
        );
        assert_eq!(f[0], ("realm".into(), "localhost".into()));
        assert_eq!(f[1], ("nonce".into(), "OA6MG9tEQGm2hh".into()));
        assert_eq!(f[3], ("charset".into(), "utf-8".into()));
        assert_eq!(f[4], ("algorithm".into(), "md5-sess".into()));
    }

    /// Our cached SCRAM computation must match the engine's reference client.
    #[test]
    fn scram_matches_engine_client() {
        let cache = SaslCache::default();
        let bare = "n=user,r=rOprNGfwEbeRWgbNEkqO";
        let sf = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
        let (ours, _) = scram_final(bare, sf, "rOprNGfwEbeRWgbNEkqO", "pencil", &cache).unwrap();
        let theirs = sc::scram_client_final(&format!("n,,{bare}"), sf, "pencil").unwrap();
        assert_eq!(ours, theirs);
        // RFC 7677 §3 test vector.
        assert_eq!(
            String::from_utf8(ours).unwrap(),
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        // Second time from the cache.
        let (again, _) = scram_final(bare, sf, "rOprNGfwEbeRWgbNEkqO", "pencil", &cache).unwrap();
        assert_eq!(
            again,
            sc::scram_client_final(&format!("n,,{bare}"), sf, "pencil").unwrap()
        );
    }
}
