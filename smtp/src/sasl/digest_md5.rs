//! DIGEST-MD5 server side (RFC 2831), authentication only (qop=auth).
//!
//! Owns: the digest-challenge, parsing the digest-response directive list
//! (RFC 2831 §7.1 `#rule`: quoted strings with `\` escapes, optional
//! whitespace, empty list elements), checking it against the stored
//! `H(user:realm:password)`, and producing `rspauth` (§2.1.3).
//!
//! Must never: accept a nonce that this shard did not issue for this
//! exchange, or accept one twice (RFC 2831 §2.1.2 "nonce-count ... detect
//! replay"; we do not support subsequent authentication, §2.2, so every nonce
//! is single-use), accept integrity/confidentiality (`auth-int`,
//! `auth-conf`, `cipher`) which we do not implement, accept a digest-uri for
//! another service or host, or parse without bounds.
//!
//! RFC 2831 is historic (RFC 6331); it is kept for clients that still
//! prefer it over SCRAM.
//!
//! Realm selection follows Cyrus SASL 2.1's server (`digestmd5_server_mech_step2`):
//! the account looked up is `username` when the response's `realm` equals the
//! realm we offered, else `username@realm` (`username` alone for an absent or
//! empty realm); that name is then split at its first `@` like every login
//! ([`crate::users::split_login`]). So `username="alice",realm="example.org"`
//! is user `alice` of realm `example.org` even though we offered another realm.
//! The response hash covers the `username` and `realm` values as sent, and we
//! keep only `H(user:realm:password)` of the stored user name and realm: a
//! response verifies only when they are exactly those two (Cyrus, which keeps
//! the password, also accepts `username="alice@example.org"` with the offered
//! realm; we cannot, and answer 535 like a wrong password).

use super::{login_secrets, unhex16, verdict, AuthContext, AuthFailure, Step};
use crate::users::secrets::ct_eq16;
use md5::{Digest as _, Md5};

/// Service name in `digest-uri` (RFC 4954 §4: "smtp").
pub(super) const SERVICE: &str = "smtp";
/// RFC 2831 §2.1.2: "The size of a digest-response is less than 4096 bytes."
const MAX_RESPONSE: usize = 4096;
/// More directives than this is not a real client.
const MAX_DIRECTIVES: usize = 32;

pub(super) struct Digest {
    nonce: String,
    service: &'static str,
}

impl Digest {
    /// RFC 2831 §2.1.1 digest-challenge.
    pub(super) fn start(
        ctx: &mut AuthContext,
        fixed: Option<&str>,
        service: &'static str,
    ) -> (Digest, Step) {
        let nonce = match fixed {
            Some(n) => {
                ctx.nonces.register(n.as_bytes(), ctx.now);
                n.to_owned()
            }
            None => ctx.nonces.issue(ctx.now),
        };
        let challenge = format!(
            "realm=\"{}\",nonce=\"{nonce}\",qop=\"auth\",charset=utf-8,algorithm=md5-sess",
            quote(ctx.realm)
        );
        (
            Digest { nonce, service },
            Step::Challenge(challenge.into_bytes()),
        )
    }

    pub(super) fn finish(self, response: &[u8], ctx: &mut AuthContext) -> Step {
        // This exchange is over whatever the client sent: its nonce must never
        // be accepted again, so consume it first.
        let live = ctx.nonces.consume(self.nonce.as_bytes(), ctx.now).is_ok();
        let d = match Directives::parse(response) {
            Ok(d) => d,
            Err(()) => return Step::Failure(AuthFailure::Malformed),
        };
        let fields = match d.validate(self.service, ctx.hostname) {
            Ok(f) => f,
            Err(f) => return Step::Failure(f),
        };
        // The nonce must be the one of this exchange AND have been live
        // (unused, unexpired) in the cache.
        if fields.nonce != self.nonce.as_bytes() || !live {
            return Step::Failure(AuthFailure::Replay);
        }
        // RFC 2831 §2.1.2: an absent realm means the empty realm in A1.
        let realm = fields.realm.as_deref().unwrap_or("");
        let login = account(&fields.username, realm, ctx.realm);
        let (secrets, found, _, _) = login_secrets(ctx.users, &login, ctx.realm);
        let ha1 = a1_hash(&secrets.digest_ha1, &fields);
        let expected = kd_response(&ha1, &fields, "AUTHENTICATE:");
        let ok = ct_eq16(&expected, &fields.response);
        let rspauth = kd_response(&ha1, &fields, ":");
        let server_final = format!("rspauth={}", super::hex_lower(&rspauth)).into_bytes();
        verdict(
            ok,
            found,
            &login,
            fields.authzid.as_deref(),
            ctx,
            Some(server_final),
        )
    }
}

/// The account a digest-response names, as Cyrus SASL 2.1 builds it: the
/// `username` as sent when the client kept the realm we offered, else
/// `username@realm` (no `@` for an empty realm). Also the identity reported.
fn account(username: &str, realm: &str, offered: &str) -> String {
    if realm == offered || realm.is_empty() {
        username.to_owned()
    } else {
        format!("{username}@{realm}")
    }
}

/// Quote a value for a quoted-string (RFC 2831 §7.2: `\` escapes `"` and `\`).
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// HEX(H(A1)) with A1 = { H(user:realm:passwd), ":", nonce, ":", cnonce [, ":", authzid] }.
fn a1_hash(ha1_base: &[u8; 16], f: &Fields) -> String {
    let mut h = Md5::new();
    h.update(ha1_base);
    h.update(b":");
    h.update(f.nonce);
    h.update(b":");
    h.update(f.cnonce);
    if let Some(z) = f.authzid_raw {
        h.update(b":");
        h.update(z);
    }
    super::hex_lower(&h.finalize())
}

/// KD(HEX(H(A1)), nonce:nc:cnonce:qop:HEX(H(A2))) with A2 = prefix + digest-uri
/// (RFC 2831 §2.1.2.1; prefix "AUTHENTICATE:" for response, ":" for rspauth).
fn kd_response(ha1_hex: &str, f: &Fields, a2_prefix: &str) -> [u8; 16] {
    let mut a2 = Md5::new();
    a2.update(a2_prefix.as_bytes());
    a2.update(f.digest_uri);
    let ha2 = super::hex_lower(&a2.finalize());
    let mut h = Md5::new();
    h.update(ha1_hex.as_bytes());
    h.update(b":");
    h.update(f.nonce);
    h.update(b":");
    h.update(f.nc);
    h.update(b":");
    h.update(f.cnonce);
    h.update(b":auth:");
    h.update(ha2.as_bytes());
    h.finalize().into()
}

/// The validated directives of a digest-response.
struct Fields<'a> {
    username: String,
    realm: Option<String>,
    nonce: &'a [u8],
    cnonce: &'a [u8],
    nc: &'a [u8],
    digest_uri: &'a [u8],
    response: [u8; 16],
    authzid: Option<String>,
    authzid_raw: Option<&'a [u8]>,
}

/// Raw directive list: name → value (unescaped). Values borrow from the
/// input unless they contained escapes.
struct Directives<'a> {
    items: Vec<(&'a [u8], std::borrow::Cow<'a, [u8]>)>,
}

fn is_lws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

/// RFC 2616 token characters (RFC 2831 §7.1 uses its grammar).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b)
}

impl<'a> Directives<'a> {
    fn parse(input: &'a [u8]) -> Result<Directives<'a>, ()> {
        use std::borrow::Cow;
        if input.is_empty() || input.len() >= MAX_RESPONSE {
            return Err(());
        }
        let mut items: Vec<(&[u8], Cow<[u8]>)> = Vec::new();
        let mut i = 0;
        let skip = |i: &mut usize, pred: &dyn Fn(u8) -> bool| {
            while *i < input.len() && pred(input[*i]) {
                *i += 1;
            }
        };
        loop {
            // `#rule` allows empty elements: skip LWS and commas.
            skip(&mut i, &|b| is_lws(b) || b == b',');
            if i >= input.len() {
                break;
            }
            let start = i;
            skip(&mut i, &is_tchar);
            let name = &input[start..i];
            if name.is_empty() {
                return Err(());
            }
            skip(&mut i, &is_lws);
            if input.get(i) != Some(&b'=') {
                return Err(());
            }
            i += 1;
            skip(&mut i, &is_lws);
            let value: Cow<[u8]> = if input.get(i) == Some(&b'"') {
                i += 1;
                let start = i;
                let mut owned: Option<Vec<u8>> = None;
                loop {
                    match input.get(i) {
                        None => return Err(()), // unterminated
                        Some(b'"') => break,
                        Some(b'\\') => {
                            let buf = owned.get_or_insert_with(|| input[start..i].to_vec());
                            let escaped = *input.get(i + 1).ok_or(())?;
                            buf.push(escaped);
                            i += 2;
                        }
                        Some(&b) => {
                            if b < 0x20 && !is_lws(b) || b == 0x7f {
                                return Err(()); // CTL is not TEXT
                            }
                            if let Some(buf) = owned.as_mut() {
                                buf.push(b);
                            }
                            i += 1;
                        }
                    }
                }
                let v = match owned {
                    Some(v) => Cow::Owned(v),
                    None => Cow::Borrowed(&input[start..i]),
                };
                i += 1; // closing quote
                v
            } else {
                let start = i;
                skip(&mut i, &is_tchar);
                Cow::Borrowed(&input[start..i])
            };
            // RFC 2831 §2.1.2: most directives "MUST appear exactly once";
            // we refuse any duplicate rather than pick one.
            if items.iter().any(|(n, _)| n.eq_ignore_ascii_case(name)) {
                return Err(());
            }
            if items.len() >= MAX_DIRECTIVES {
                return Err(());
            }
            items.push((name, value));
            skip(&mut i, &is_lws);
            match input.get(i) {
                None => break,
                Some(b',') => i += 1,
                Some(_) => return Err(()),
            }
        }
        Ok(Directives { items })
    }

    fn get(&self, name: &str) -> Option<&[u8]> {
        self.items
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v.as_ref())
    }

    /// Apply RFC 2831 §2.1.2's rules and ours; borrow the values.
    fn validate(&'a self, service: &str, hostname: &str) -> Result<Fields<'a>, AuthFailure> {
        use AuthFailure::Malformed;
        let utf8 = match self.get("charset") {
            None => false,
            Some(c) if c.eq_ignore_ascii_case(b"utf-8") => true,
            Some(_) => return Err(Malformed),
        };
        // Without charset=utf-8, username and realm are ISO 8859-1 (§2.1.2).
        let text = |v: &[u8]| -> Result<String, AuthFailure> {
            if utf8 {
                std::str::from_utf8(v)
                    .map(str::to_owned)
                    .map_err(|_| Malformed)
            } else {
                Ok(v.iter().map(|&b| char::from(b)).collect())
            }
        };
        let username = text(self.get("username").ok_or(Malformed)?)?;
        if username.is_empty() {
            return Err(Malformed);
        }
        let realm = self.get("realm").map(text).transpose()?;
        let nonce = self.get("nonce").ok_or(Malformed)?;
        let cnonce = self.get("cnonce").ok_or(Malformed)?;
        if cnonce.is_empty() {
            return Err(Malformed);
        }
        // §2.1.2: nc-value is 8LHEX; no subsequent authentication, so the
        // first and only use of the nonce has count 1.
        let nc = self.get("nc").ok_or(Malformed)?;
        if !nc.eq_ignore_ascii_case(b"00000001") {
            return Err(AuthFailure::Replay);
        }
        match self.get("qop") {
            None => {}
            Some(q) if q.eq_ignore_ascii_case(b"auth") => {}
            Some(_) => return Err(Malformed), // we offered only "auth"
        }
        if self.get("cipher").is_some() {
            return Err(Malformed);
        }
        let digest_uri = self.get("digest-uri").ok_or(Malformed)?;
        check_digest_uri(digest_uri, service, hostname)?;
        let response = unhex16(self.get("response").ok_or(Malformed)?).ok_or(Malformed)?;
        let authzid_raw = self.get("authzid");
        // authzid is always UTF-8 (§2.1.2.1).
        let authzid = authzid_raw
            .map(|z| {
                std::str::from_utf8(z)
                    .map(str::to_owned)
                    .map_err(|_| Malformed)
            })
            .transpose()?;
        Ok(Fields {
            username,
            realm,
            nonce,
            cnonce,
            nc,
            digest_uri,
            response,
            authzid,
            authzid_raw,
        })
    }
}

/// §2.1.2 digest-uri = serv-type "/" host [ "/" serv-name ]. serv-type must be
/// ours ("smtp"). The host is NOT required to be our host name: clients put
/// whatever name or address they connected to (swaks puts the IP, roaming
/// clients behind a load balancer put the balancer's name), and the protection
/// the host check would add is already given by the nonce, which this shard
/// issued and accepts once. The host must still be a syntactically sane name.
fn check_digest_uri(uri: &[u8], service: &str, _hostname: &str) -> Result<(), AuthFailure> {
    let uri = std::str::from_utf8(uri).map_err(|_| AuthFailure::Malformed)?;
    let mut parts = uri.split('/');
    let (Some(serv), Some(host), _serv_name, None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthFailure::Malformed);
    };
    let sane = |h: &str| {
        !h.is_empty()
            && h.len() <= 255
            && h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-:[]_".contains(&b))
    };
    if !sane(host) {
        return Err(AuthFailure::Malformed);
    }
    if !serv.eq_ignore_ascii_case(service) {
        // A response for another service is not ours to accept.
        return Err(AuthFailure::BadCredentials);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_quotes_escapes_and_whitespace() {
        let d = Directives::parse(br#" username = "ch\"ris" ,, realm="a,b" , nc=00000001 ,"#)
            .expect("parses");
        assert_eq!(d.get("USERNAME"), Some(&b"ch\"ris"[..]));
        assert_eq!(d.get("realm"), Some(&b"a,b"[..]));
        assert_eq!(d.get("nc"), Some(&b"00000001"[..]));
    }

    #[test]
    fn rejects_bad_lists() {
        for bad in [
            &b"username=\"unterminated"[..],
            b"username=\"a\",username=\"b\"",
            b"username",
            b"=x",
            b"username=\"a\" realm=\"b\"",
            b"username=\"a\\",
            b"",
        ] {
            assert!(
                Directives::parse(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = vec![b'a'; MAX_RESPONSE];
        assert!(Directives::parse(&long).is_err());
        let many: String = (0..40).map(|i| format!("x{i}=1,")).collect();
        assert!(Directives::parse(many.as_bytes()).is_err());
    }

    #[test]
    fn digest_uri_rules() {
        assert!(check_digest_uri(b"smtp/mx.example", "smtp", "MX.example").is_ok());
        assert!(check_digest_uri(b"smtp/mx.example/mx.example", "smtp", "mx.example").is_ok());
        assert!(check_digest_uri(b"imap/mx.example", "smtp", "mx.example").is_err());
        // Any host: clients name the address or balancer they connected to.
        assert!(check_digest_uri(b"smtp/127.0.0.1", "smtp", "mx.example").is_ok());
        assert!(check_digest_uri(b"smtp/other", "smtp", "mx.example").is_ok());
        assert!(check_digest_uri(b"smtp/bad host", "smtp", "mx.example").is_err());
        assert!(check_digest_uri(b"smtp", "smtp", "mx.example").is_err());
    }
}
