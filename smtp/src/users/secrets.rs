//! Derived per-user secrets and the primitive computations on them.
//!
//! Owns: turning a password into the values the user store keeps (CRAM-MD5
//! HMAC midstates, DIGEST-MD5 `H(user:realm:password)`, SCRAM-SHA-256
//! salt/iterations/StoredKey/ServerKey), and the keyed computations the SASL
//! mechanisms run on those values.
//!
//! Must never: keep or return the password, print a secret (the `Debug`
//! impls are redacted), or compare secrets in variable time (every equality
//! check on a secret-derived value goes through [`ct_eq16`]/[`ct_eq32`]).

use std::fmt;

use hmac::digest::block_api::{Block, CoreProxy, UpdateCore};
use hmac::digest::common::hazmat::{SerializableState, SerializedState};
use hmac::digest::CtOutput;
use hmac::{Hmac, KeyInit, Mac};
use md5::block_api::Md5Core;
use md5::{Digest, Md5};
use sha2::Sha256;

/// RFC 7677 §4: "the iteration count ... SHOULD be at least 4096".
pub const DEFAULT_SCRAM_ITERATIONS: u32 = 4096;
/// Refuse absurd iteration counts from a (possibly tampered) file: a huge
/// count would let the file stall `tern passwd` or a PLAIN fallback.
pub const MAX_SCRAM_ITERATIONS: u32 = 10_000_000;
/// Salt length written by `tern passwd` (RFC 5802 does not fix one; 16 bytes
/// is what Cyrus and most servers use).
pub const SCRAM_SALT_LEN: usize = 16;
/// Longest salt accepted from a file.
pub const MAX_SCRAM_SALT_LEN: usize = 64;

type HmacSha256 = Hmac<Sha256>;

/// SCRAM-SHA-256 server-side secrets (RFC 5802 §3). StoredKey lets the
/// server check a proof; ServerKey lets it prove itself. Neither lets an
/// attacker log in via SCRAM directly, but both allow an offline dictionary
/// attack (slowed by the iteration count).
#[derive(Clone, PartialEq, Eq)]
pub struct ScramSecrets {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

/// Everything the user store keeps for one `user@realm`. No password.
#[derive(Clone, PartialEq, Eq)]
pub struct Secrets {
    /// MD5 state after compressing one block `K ^ ipad` (RFC 2104 §2 step 1-2),
    /// as the four little-endian state words; RFC 2195 §4 / Cyrus
    /// `hmac_md5_precalc`.
    pub cram_inner: [u8; 16],
    /// MD5 state after compressing `K ^ opad`.
    pub cram_outer: [u8; 16],
    /// RFC 2831 §2.1.2.1: `H({ username-value, ":", realm-value, ":", passwd })`.
    pub digest_ha1: [u8; 16],
    pub scram: ScramSecrets,
}

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secrets { .. }")
    }
}

impl fmt::Debug for ScramSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ScramSecrets {{ iterations: {}, .. }}", self.iterations)
    }
}

impl Secrets {
    /// Derive all secrets from a password. `scram_password` is the
    /// SASLprep-ed password (RFC 5802 §2.2 Normalize()); CRAM-MD5 and DIGEST-MD5
    /// use the password octets as the client types them (neither RFC prepares
    /// the password).
    pub fn derive(
        user: &str,
        realm: &str,
        password: &str,
        scram_password: &str,
        salt: &[u8],
        iterations: u32,
    ) -> Secrets {
        let (cram_inner, cram_outer) = cram_midstates(password.as_bytes());
        Secrets {
            cram_inner,
            cram_outer,
            digest_ha1: digest_ha1(user, realm, password.as_bytes()),
            scram: scram_secrets(scram_password.as_bytes(), salt, iterations),
        }
    }

    /// A fixed, valid-looking secret set used when the user is unknown, so that
    /// an unknown user runs exactly the same computation as a wrong password
    /// (no timing oracle for user enumeration). It matches no password anyone
    /// can type: the values are not derived from any password.
    pub fn dummy() -> &'static Secrets {
        static DUMMY: Secrets = Secrets {
            cram_inner: [0x5a; 16],
            cram_outer: [0xa5; 16],
            digest_ha1: [0x3c; 16],
            scram: ScramSecrets {
                iterations: DEFAULT_SCRAM_ITERATIONS,
                salt: Vec::new(),
                stored_key: [0xc3; 32],
                server_key: [0x69; 32],
            },
        };
        &DUMMY
    }
}

/// Constant-time equality of two 16-byte values (MD5-sized).
pub fn ct_eq16(a: &[u8; 16], b: &[u8; 16]) -> bool {
    CtOutput::<Md5>::new((*a).into()) == CtOutput::<Md5>::new((*b).into())
}

/// Constant-time equality of two 32-byte values (SHA-256-sized).
pub fn ct_eq32(a: &[u8; 32], b: &[u8; 32]) -> bool {
    CtOutput::<Sha256>::new((*a).into()) == CtOutput::<Sha256>::new((*b).into())
}

// ---------------------------------------------------------------- CRAM-MD5

/// RFC 2104 §2: the key padded to the 64-byte block (hashed first if longer),
/// XORed with ipad/opad, each run through one MD5 compression. We keep the
/// two resulting chaining states instead of the password.
///
/// md-5 0.11 exposes the block-level core (`md5::block_api::Md5Core`) with
/// `SerializableState`, so this uses the crate's own compression function and
/// state encoding: no hand-written MD5.
pub fn cram_midstates(password: &[u8]) -> ([u8; 16], [u8; 16]) {
    let mut key = [0u8; 64];
    if password.len() > 64 {
        key[..16].copy_from_slice(&Md5::digest(password));
    } else {
        key[..password.len()].copy_from_slice(password);
    }
    let pad = |byte: u8| -> [u8; 16] {
        let block: [u8; 64] = std::array::from_fn(|i| key[i] ^ byte);
        let mut core = Md5Core::default();
        core.update_blocks(&[Block::<Md5Core>::from(block)]);
        let state = core.serialize();
        let mut out = [0u8; 16];
        out.copy_from_slice(&state[..16]);
        out
    };
    (pad(0x36), pad(0x5c))
}

/// An MD5 hasher resumed from a stored midstate (one 64-byte block consumed).
fn md5_resume(midstate: &[u8; 16]) -> Md5 {
    let mut ser = SerializedState::<Md5Core>::default();
    ser[..16].copy_from_slice(midstate);
    ser[16..].copy_from_slice(&1u64.to_le_bytes());
    // Md5Core::deserialize accepts any 24 bytes (it only splits them into
    // words); the fallback keeps this total without a panic path.
    let core = Md5Core::deserialize(&ser).unwrap_or_default();
    Md5::compose(core, Default::default())
}

/// HMAC-MD5(K, message) computed from the stored midstates (RFC 2195 §2).
pub fn cram_hmac(inner: &[u8; 16], outer: &[u8; 16], message: &[u8]) -> [u8; 16] {
    let mut h = md5_resume(inner);
    h.update(message);
    let inner_hash = h.finalize();
    let mut h = md5_resume(outer);
    h.update(inner_hash);
    h.finalize().into()
}

// -------------------------------------------------------------- DIGEST-MD5

/// RFC 2831 §2.1.2.1: with charset=utf-8, a username-value or passwd whose
/// characters all fit ISO 8859-1 "must be converted to ISO 8859-1 before being
/// hashed". Cyrus applies the same rule to the realm; so do we, for
/// interoperability. Non-UTF-8 input is hashed as-is.
fn latin1_if_possible(s: &[u8], out: &mut Vec<u8>) {
    match std::str::from_utf8(s) {
        Ok(text) if text.chars().all(|c| (c as u32) <= 0xff) => {
            out.extend(text.chars().map(|c| c as u32 as u8));
        }
        _ => out.extend_from_slice(s),
    }
}

/// `H(username ":" realm ":" password)` — the A1 base of RFC 2831 §2.1.2.1.
pub fn digest_ha1(user: &str, realm: &str, password: &[u8]) -> [u8; 16] {
    let mut buf = Vec::with_capacity(user.len() + realm.len() + password.len() + 2);
    latin1_if_possible(user.as_bytes(), &mut buf);
    buf.push(b':');
    latin1_if_possible(realm.as_bytes(), &mut buf);
    buf.push(b':');
    latin1_if_possible(password, &mut buf);
    let out: [u8; 16] = Md5::digest(&buf).into();
    // Best effort: the buffer held the password.
    buf.iter_mut().for_each(|b| *b = 0);
    out
}

// ------------------------------------------------------------ SCRAM-SHA-256

/// HMAC-SHA-256 keyed with `key`.
pub fn hmac_sha256(key: &[u8]) -> HmacSha256 {
    // RFC 2104 §2 defines HMAC for keys of any length; the hmac crate's
    // `new_from_slice` only errs for fixed-key-size MACs, never for Hmac<D>.
    match HmacSha256::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC accepts keys of any length"),
    }
}

/// RFC 5802 §2.2 Hi(): PBKDF2-HMAC-SHA-256 with a 32-byte output.
pub fn scram_hi(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let keyed = hmac_sha256(password);
    let mut mac = keyed.clone();
    mac.update(salt);
    mac.update(&1u32.to_be_bytes());
    let mut u: [u8; 32] = mac.finalize().into_bytes().into();
    let mut out = u;
    for _ in 1..iterations {
        let mut mac = keyed.clone();
        mac.update(&u);
        u = mac.finalize().into_bytes().into();
        out.iter_mut().zip(u.iter()).for_each(|(o, x)| *o ^= x);
    }
    out
}

/// RFC 5802 §3: SaltedPassword → ClientKey → StoredKey, and ServerKey.
pub fn scram_secrets(password: &[u8], salt: &[u8], iterations: u32) -> ScramSecrets {
    let salted = scram_hi(password, salt, iterations);
    let client_key = hmac_once(&salted, b"Client Key");
    ScramSecrets {
        iterations,
        salt: salt.to_vec(),
        stored_key: Sha256::digest(client_key).into(),
        server_key: hmac_once(&salted, b"Server Key"),
    }
}

/// HMAC-SHA-256(key, message) in one call.
pub fn hmac_once(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut mac = hmac_sha256(key);
    mac.update(message);
    mac.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cram_midstates_match_plain_hmac() {
        for pw in [&b""[..], b"tanstaaftanstaaf", &[0x41; 64], &[0x42; 100]] {
            let (i, o) = cram_midstates(pw);
            let mut mac = Hmac::<Md5>::new_from_slice(pw).expect("any length");
            mac.update(b"<1896.697170952@postoffice.reston.mci.net>");
            let want: [u8; 16] = mac.finalize().into_bytes().into();
            assert_eq!(
                cram_hmac(&i, &o, b"<1896.697170952@postoffice.reston.mci.net>"),
                want
            );
        }
    }

    #[test]
    fn ct_eq_works() {
        assert!(ct_eq16(&[1; 16], &[1; 16]));
        assert!(!ct_eq16(&[1; 16], &[2; 16]));
        assert!(ct_eq32(&[1; 32], &[1; 32]));
        assert!(!ct_eq32(&[1; 32], &[0; 32]));
    }
}
