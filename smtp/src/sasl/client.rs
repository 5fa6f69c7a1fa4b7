//! Client-side SASL computations, for benchmarks, the load generator and
//! end-to-end tests.
//!
//! Owns: building the client responses of CRAM-MD5 (RFC 2195 §2), DIGEST-MD5
//! (RFC 2831 §2.1.2), SCRAM-SHA-256 (RFC 5802 §3) and PLAIN (RFC 4616 §2).
//!
//! Must never: be used by the server path (the server's verifiers live in the
//! mechanism modules and are tested against RFC vectors independently of
//! this code), or accept channel binding.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use md5::{Digest as _, Md5};
use sha2::Sha256;

use super::hex_lower;
use crate::users::secrets::{cram_hmac, cram_midstates, digest_ha1, hmac_once, scram_hi};

/// `user SP hex(HMAC-MD5(password, challenge))`.
pub fn cram_md5(user: &str, password: &str, challenge: &[u8]) -> Vec<u8> {
    let (inner, outer) = cram_midstates(password.as_bytes());
    format!(
        "{user} {}",
        hex_lower(&cram_hmac(&inner, &outer, challenge))
    )
    .into_bytes()
}

/// A digest-response (qop=auth, nc=00000001, charset=utf-8) for `nonce`.
/// Returns the response and the rspauth value the server must send back.
pub fn digest_md5(
    user: &str,
    realm: &str,
    password: &str,
    nonce: &str,
    cnonce: &str,
    digest_uri: &str,
) -> (Vec<u8>, String) {
    // RFC 2831 §2.1.2.1: with charset=utf-8, names and password that fit ISO 8859-1
    // are hashed in ISO 8859-1 (as Cyrus's and GNU SASL's clients do).
    let mut a1 = digest_ha1(user, realm, password.as_bytes()).to_vec();
    a1.extend_from_slice(format!(":{nonce}:{cnonce}").as_bytes());
    let ha1 = hex_lower(&Md5::digest(&a1));
    let kd = |a2: &str| {
        let ha2 = hex_lower(&Md5::digest(a2.as_bytes()));
        hex_lower(&Md5::digest(format!(
            "{ha1}:{nonce}:00000001:{cnonce}:auth:{ha2}"
        )))
    };
    let response = format!(
        "charset=utf-8,username=\"{user}\",realm=\"{realm}\",nonce=\"{nonce}\",nc=00000001,\
         cnonce=\"{cnonce}\",digest-uri=\"{digest_uri}\",response={},qop=auth",
        kd(&format!("AUTHENTICATE:{digest_uri}"))
    );
    (
        response.into_bytes(),
        format!("rspauth={}", kd(&format!(":{digest_uri}"))),
    )
}

/// The client-final-message for `client_first` (whose gs2 header must be
/// `n,,` or `y,,` or carry `a=`) after `server_first`. `None` if
/// `server_first` does not parse.
pub fn scram_client_final(
    client_first: &str,
    server_first: &[u8],
    password: &str,
) -> Option<Vec<u8>> {
    let sf = std::str::from_utf8(server_first).ok()?;
    let (mut r, mut s, mut i) = (None, None, None);
    for attr in sf.split(',') {
        match attr.split_at_checked(2)? {
            ("r=", v) => r = Some(v),
            ("s=", v) => s = Some(B64.decode(v).ok()?),
            ("i=", v) => i = v.parse::<u32>().ok(),
            _ => {}
        }
    }
    let (r, s, i) = (r?, s?, i?);
    let mut parts = client_first.splitn(3, ',');
    let (flag, authz, bare) = (parts.next()?, parts.next()?, parts.next()?);
    let gs2 = format!("{flag},{authz},");
    let salted = scram_hi(password.as_bytes(), &s, i);
    let client_key = hmac_once(&salted, b"Client Key");
    let stored_key: [u8; 32] = Sha256::digest(client_key).into();
    let without_proof = format!("c={},r={r}", B64.encode(gs2));
    let auth_message = format!("{bare},{sf},{without_proof}");
    let signature = hmac_once(&stored_key, auth_message.as_bytes());
    let proof: Vec<u8> = client_key
        .iter()
        .zip(signature)
        .map(|(k, s)| k ^ s)
        .collect();
    Some(format!("{without_proof},p={}", B64.encode(proof)).into_bytes())
}

/// `authzid NUL authcid NUL password`.
pub fn plain(authzid: &str, authcid: &str, password: &str) -> Vec<u8> {
    format!("{authzid}\0{authcid}\0{password}").into_bytes()
}
