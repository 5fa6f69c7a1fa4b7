//! SASL tests: RFC known answers through the real server code, every failure
//! kind, replay/expiry, authzid rules, framing.

use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use md5::{Digest as _, Md5};

use super::*;
use crate::users::secrets::{hmac_once, scram_hi, Secrets};
use crate::users::UserDb;

const TTL: Duration = Duration::from_secs(60);

struct Harness {
    db: UserDb,
    nonces: NonceCache,
    hostname: String,
    realm: String,
    allow_authzid: bool,
    now: Instant,
}

impl Harness {
    /// `users`: (user, password), stored in `realm`; SCRAM with a fixed salt
    /// and few iterations (fast tests) unless `iterations` says otherwise.
    fn new(hostname: &str, realm: &str, users: &[(&str, &str)]) -> Harness {
        let mut db = UserDb::empty();
        for (u, p) in users {
            db.insert(u, realm, Secrets::derive(u, realm, p, p, b"salty salt", 16))
                .expect("insert");
        }
        Harness {
            db,
            nonces: NonceCache::with_seed(16, TTL, [1; 32]),
            hostname: hostname.into(),
            realm: realm.into(),
            allow_authzid: false,
            now: Instant::now(),
        }
    }

    fn ctx(&mut self) -> AuthContext<'_> {
        AuthContext {
            users: &self.db,
            nonces: &mut self.nonces,
            hostname: &self.hostname,
            realm: &self.realm,
            allow_authzid: self.allow_authzid,
            now: self.now,
            unix_secs: 1_796_281_560,
            login: None,
        }
    }

    fn start(&mut self, mech: Mechanism, initial: Option<&[u8]>) -> (Exchange, Step) {
        Exchange::start(mech, initial, &mut self.ctx())
    }

    fn step(&mut self, ex: &mut Exchange, resp: &[u8]) -> Step {
        ex.step(resp, &mut self.ctx())
    }
}

fn success(authcid: &str) -> Step {
    Step::Success {
        authcid: authcid.into(),
        authzid: None,
        server_final: None,
    }
}

fn challenge(step: &Step) -> Vec<u8> {
    match step {
        Step::Challenge(c) => c.clone(),
        other => panic!("expected a challenge, got {other:?}"),
    }
}

const BAD: Step = Step::Failure(AuthFailure::BadCredentials);
const MALFORMED: Step = Step::Failure(AuthFailure::Malformed);
const REPLAY: Step = Step::Failure(AuthFailure::Replay);
const DENIED: Step = Step::Failure(AuthFailure::AuthzidDenied);

// ------------------------------------------------------------------ names

#[test]
fn mechanism_names() {
    for m in Mechanism::ALL {
        assert_eq!(Mechanism::from_name(m.name()), Some(m));
        assert_eq!(Mechanism::from_name(&m.name().to_lowercase()), Some(m));
    }
    assert_eq!(
        Mechanism::from_name("Scram-Sha-256"),
        Some(Mechanism::ScramSha256)
    );
    assert_eq!(Mechanism::from_name("GSSAPI"), None);
    assert_eq!(Mechanism::from_name(""), None);
    assert!(Mechanism::Plain.is_plaintext() && Mechanism::Login.is_plaintext());
    assert!(!Mechanism::CramMd5.is_plaintext() && !Mechanism::ScramSha256.is_plaintext());
}

// ---------------------------------------------------------------- framing

#[test]
fn framing() {
    assert_eq!(decode_client_line(b"*", false), Ok(ClientLine::Cancel));
    assert_eq!(decode_client_line(b"*", true), Err(FramingError::BadBase64));
    assert_eq!(decode_client_line(b"=", true), Ok(ClientLine::Data(vec![])));
    assert_eq!(
        decode_client_line(b"=", false),
        Err(FramingError::BadBase64)
    );
    assert_eq!(decode_client_line(b"", false), Ok(ClientLine::Data(vec![])));
    assert_eq!(decode_client_line(b"", true), Err(FramingError::BadBase64));
    assert_eq!(
        decode_client_line(b"dGVzdA==", false),
        Ok(ClientLine::Data(b"test".to_vec()))
    );
    assert_eq!(
        decode_client_line(b"dGVzdA", true),
        Err(FramingError::BadBase64)
    );
    assert_eq!(
        decode_client_line(b"dGV zdA==", true),
        Err(FramingError::BadBase64)
    );
    assert_eq!(
        decode_client_line(b"!!!!", false),
        Err(FramingError::BadBase64)
    );
    let max = vec![b'A'; MAX_LINE];
    assert!(matches!(
        decode_client_line(&max, false),
        Ok(ClientLine::Data(_))
    ));
    let over = vec![b'A'; MAX_LINE + 4];
    assert_eq!(decode_client_line(&over, false), Err(FramingError::TooLong));
}

// --------------------------------------------------------------- CRAM-MD5

fn rfc2195() -> Harness {
    Harness::new(
        "postoffice.reston.mci.net",
        "postoffice.reston.mci.net",
        &[("tim", "tanstaaftanstaaf")],
    )
}

#[test]
fn cram_md5_rfc2195_example() {
    let mut h = rfc2195();
    let (mut ex, step) =
        Exchange::start_with_nonce(Mechanism::CramMd5, None, &mut h.ctx(), "1896.697170952");
    assert_eq!(
        challenge(&step),
        b"<1896.697170952@postoffice.reston.mci.net>"
    );
    assert_eq!(ex.mechanism(), Mechanism::CramMd5);
    assert_eq!(
        h.step(&mut ex, b"tim b913a602c7eda7a495b4e6e7334d3890"),
        success("tim")
    );
    // The exchange is over.
    assert_eq!(
        h.step(&mut ex, b"tim b913a602c7eda7a495b4e6e7334d3890"),
        MALFORMED
    );
}

#[test]
fn cram_md5_failures() {
    let mut h = rfc2195();
    let resp = |user: &str| format!("{user} b913a602c7eda7a495b4e6e7334d3890");
    let run = |h: &mut Harness, r: &[u8]| {
        let (mut ex, _) =
            Exchange::start_with_nonce(Mechanism::CramMd5, None, &mut h.ctx(), "1896.697170952");
        h.step(&mut ex, r)
    };
    assert_eq!(
        run(
            &mut h,
            resp("tim").to_uppercase().replace("TIM", "tim").as_bytes()
        ),
        success("tim")
    );
    // Unknown user and wrong password: the same answer.
    assert_eq!(run(&mut h, resp("bob").as_bytes()), BAD);
    assert_eq!(run(&mut h, b"tim b913a602c7eda7a495b4e6e7334d3891"), BAD);
    for bad in [
        &b"timb913a602c7eda7a495b4e6e7334d3890"[..],
        b"tim b913",
        b" b913a602c7eda7a495b4e6e7334d3890",
        b"tim xx13a602c7eda7a495b4e6e7334d3890",
        b"",
    ] {
        assert_eq!(
            run(&mut h, bad),
            MALFORMED,
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
    let long = format!("{} b913a602c7eda7a495b4e6e7334d3890", "u".repeat(300));
    assert_eq!(run(&mut h, long.as_bytes()), MALFORMED);
    // A random challenge differs every time and has the RFC 2195 shape.
    let (_, a) = h.start(Mechanism::CramMd5, None);
    let (_, b) = h.start(Mechanism::CramMd5, None);
    let (a, b) = (challenge(&a), challenge(&b));
    assert_ne!(a, b);
    assert!(a.starts_with(b"<") && a.ends_with(b"@postoffice.reston.mci.net>"));
    // RFC 4954 §4: initial response to a server-first mechanism → 501.
    assert_eq!(h.start(Mechanism::CramMd5, Some(b"tim x")).1, MALFORMED);
}

// ------------------------------------------------------------- DIGEST-MD5

/// An independent DIGEST-MD5 client computation (RFC 2831 §2.1.2.1).
fn digest_client(
    user: &str,
    realm: &str,
    pw: &str,
    nonce: &str,
    cnonce: &str,
    uri: &str,
    authzid: Option<&str>,
) -> (String, String) {
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let h = |b: &[u8]| Md5::digest(b).to_vec();
    let mut a1 = h(format!("{user}:{realm}:{pw}").as_bytes());
    a1.extend_from_slice(format!(":{nonce}:{cnonce}").as_bytes());
    if let Some(z) = authzid {
        a1.extend_from_slice(format!(":{z}").as_bytes());
    }
    let ha1 = hex(&h(&a1));
    let kd = |a2: &str| {
        let ha2 = hex(&h(a2.as_bytes()));
        hex(&h(
            format!("{ha1}:{nonce}:00000001:{cnonce}:auth:{ha2}").as_bytes()
        ))
    };
    (kd(&format!("AUTHENTICATE:{uri}")), kd(&format!(":{uri}")))
}

fn digest_response(
    user: &str,
    realm: &str,
    nonce: &str,
    uri: &str,
    resp: &str,
    extra: &str,
) -> Vec<u8> {
    format!(
        "charset=utf-8,username=\"{user}\",realm=\"{realm}\",nonce=\"{nonce}\",nc=00000001,\
         cnonce=\"OA6MHXh6VqTrRk\",digest-uri=\"{uri}\",response={resp},qop=auth{extra}"
    )
    .into_bytes()
}

#[test]
fn digest_md5_rfc2831_example() {
    // RFC 2831 §4 is an IMAP example: run the real verifier with service "imap".
    let mut h = Harness::new(
        "elwood.innosoft.com",
        "elwood.innosoft.com",
        &[("chris", "secret")],
    );
    let (st, step) = digest_md5::Digest::start(&mut h.ctx(), Some("OA6MG9tEQGm2hh"), "imap");
    assert_eq!(
        challenge(&step),
        b"realm=\"elwood.innosoft.com\",nonce=\"OA6MG9tEQGm2hh\",qop=\"auth\",charset=utf-8,algorithm=md5-sess"
    );
    let resp = b"charset=utf-8,username=\"chris\",realm=\"elwood.innosoft.com\",\
nonce=\"OA6MG9tEQGm2hh\",nc=00000001,cnonce=\"OA6MHXh6VqTrRk\",\
digest-uri=\"imap/elwood.innosoft.com\",response=d388dad90d4bbd760a152321f2143af7,qop=auth";
    assert_eq!(
        st.finish(resp, &mut h.ctx()),
        Step::Success {
            authcid: "chris".into(),
            authzid: None,
            server_final: Some(b"rspauth=ea40f60335c427b5527b84dbabcdfffd".to_vec()),
        }
    );
    // The independent client agrees with the RFC.
    let (r, rsp) = digest_client(
        "chris",
        "elwood.innosoft.com",
        "secret",
        "OA6MG9tEQGm2hh",
        "OA6MHXh6VqTrRk",
        "imap/elwood.innosoft.com",
        None,
    );
    assert_eq!(r, "d388dad90d4bbd760a152321f2143af7");
    assert_eq!(rsp, "ea40f60335c427b5527b84dbabcdfffd");
}

fn digest_harness() -> Harness {
    Harness::new(
        "mx.example.org",
        "example.org",
        &[("chris", "secret"), ("zoe", "pw")],
    )
}

/// Start a DIGEST-MD5 exchange and pull the nonce out of the challenge.
fn digest_start(h: &mut Harness) -> (Exchange, String) {
    let (ex, step) = h.start(Mechanism::DigestMd5, None);
    let c = String::from_utf8(challenge(&step)).expect("utf8");
    let nonce = c
        .split("nonce=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .expect("nonce");
    (ex, nonce.to_owned())
}

#[test]
fn digest_md5_smtp_success_and_replay() {
    let mut h = digest_harness();
    let (mut ex, nonce) = digest_start(&mut h);
    let uri = "smtp/mx.example.org";
    let (r, rsp) = digest_client(
        "chris",
        "example.org",
        "secret",
        &nonce,
        "OA6MHXh6VqTrRk",
        uri,
        None,
    );
    let resp = digest_response("chris", "example.org", &nonce, uri, &r, "");
    assert_eq!(
        h.step(&mut ex, &resp),
        Step::Success {
            authcid: "chris".into(),
            authzid: None,
            server_final: Some(format!("rspauth={rsp}").into_bytes()),
        }
    );
    // Replaying the same response in a new exchange: the nonce was used.
    let (mut ex2, _) = digest_start(&mut h);
    assert_eq!(h.step(&mut ex2, &resp), REPLAY);
    // Even if an attacker registers nothing, the old nonce stays dead.
    assert_eq!(
        h.nonces.consume(nonce.as_bytes(), h.now),
        Err(nonces::NonceError::Unknown)
    );
}

#[test]
fn digest_md5_expired_nonce() {
    let mut h = digest_harness();
    let (mut ex, nonce) = digest_start(&mut h);
    let uri = "smtp/mx.example.org";
    let (r, _) = digest_client(
        "chris",
        "example.org",
        "secret",
        &nonce,
        "OA6MHXh6VqTrRk",
        uri,
        None,
    );
    h.now += TTL + Duration::from_secs(1);
    assert_eq!(
        h.step(
            &mut ex,
            &digest_response("chris", "example.org", &nonce, uri, &r, "")
        ),
        REPLAY
    );
}

#[test]
fn digest_md5_failures() {
    let mut h = digest_harness();
    let uri = "smtp/mx.example.org";
    let attempt =
        |h: &mut Harness, user: &str, pw: &str, uri: &str, extra: &str, authzid: Option<&str>| {
            let (mut ex, nonce) = digest_start(h);
            let (r, _) = digest_client(
                user,
                "example.org",
                pw,
                &nonce,
                "OA6MHXh6VqTrRk",
                uri,
                authzid,
            );
            h.step(
                &mut ex,
                &digest_response(user, "example.org", &nonce, uri, &r, extra),
            )
        };
    assert_eq!(attempt(&mut h, "chris", "wrong", uri, "", None), BAD);
    assert_eq!(attempt(&mut h, "nobody", "secret", uri, "", None), BAD);
    // Wrong service in digest-uri. (Any host is accepted: see check_digest_uri.)
    assert_eq!(
        attempt(&mut h, "chris", "secret", "imap/mx.example.org", "", None),
        BAD
    );
    // Integrity/confidentiality are not offered.
    assert_eq!(
        attempt(&mut h, "chris", "secret", uri, ",cipher=rc4", None),
        MALFORMED
    );
    assert_eq!(
        attempt(&mut h, "chris", "secret", uri, ",qop=auth-conf", None),
        MALFORMED
    );
    // authzid: equal is fine, other denied unless allowed.
    assert!(matches!(
        attempt(
            &mut h,
            "chris",
            "secret",
            uri,
            ",authzid=\"chris\"",
            Some("chris")
        ),
        Step::Success { authzid: None, .. }
    ));
    assert_eq!(
        attempt(
            &mut h,
            "chris",
            "secret",
            uri,
            ",authzid=\"zoe\"",
            Some("zoe")
        ),
        DENIED
    );
    h.allow_authzid = true;
    assert!(matches!(
        attempt(&mut h, "chris", "secret", uri, ",authzid=\"zoe\"", Some("zoe")),
        Step::Success { authzid: Some(z), .. } if z == "zoe"
    ));
    h.allow_authzid = false;
    // Garbage, missing directives, bad nc, nonce of another exchange.
    let (mut ex, _) = digest_start(&mut h);
    assert_eq!(h.step(&mut ex, b"username=\"chris"), MALFORMED);
    let (mut ex, nonce) = digest_start(&mut h);
    assert_eq!(
        h.step(
            &mut ex,
            format!("username=\"chris\",nonce=\"{nonce}\"").as_bytes()
        ),
        MALFORMED
    );
    let (mut ex, nonce) = digest_start(&mut h);
    let resp = digest_response(
        "chris",
        "example.org",
        &nonce,
        uri,
        "d388dad90d4bbd760a152321f2143af7",
        "",
    );
    let resp = String::from_utf8(resp)
        .expect("utf8")
        .replace("nc=00000001", "nc=00000002");
    assert_eq!(h.step(&mut ex, resp.as_bytes()), REPLAY);
    let (mut ex, _) = digest_start(&mut h);
    let (_, other) = digest_start(&mut h);
    let (r, _) = digest_client(
        "chris",
        "example.org",
        "secret",
        &other,
        "OA6MHXh6VqTrRk",
        uri,
        None,
    );
    assert_eq!(
        h.step(
            &mut ex,
            &digest_response("chris", "example.org", &other, uri, &r, "")
        ),
        REPLAY
    );
    // Initial response to DIGEST-MD5 (subsequent authentication) → 501.
    assert_eq!(
        h.start(Mechanism::DigestMd5, Some(b"username=\"x\"")).1,
        MALFORMED
    );
}

// ----------------------------------------------------------- SCRAM-SHA-256

fn rfc7677() -> Harness {
    let mut h = Harness::new("mx.example.org", "example.org", &[]);
    let salt = B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").expect("salt");
    h.db.insert(
        "user",
        "example.org",
        Secrets::derive("user", "example.org", "pencil", "pencil", &salt, 4096),
    )
    .expect("insert");
    h
}

const RFC7677_SNONCE: &str = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
const RFC7677_FINAL: &[u8] = b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";

#[test]
fn scram_sha256_rfc7677_example() {
    let mut h = rfc7677();
    let (mut ex, step) = Exchange::start_with_nonce(
        Mechanism::ScramSha256,
        Some(b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"),
        &mut h.ctx(),
        RFC7677_SNONCE,
    );
    assert_eq!(
        challenge(&step),
        b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    );
    assert_eq!(
        h.step(&mut ex, RFC7677_FINAL),
        Step::Success {
            authcid: "user".into(),
            authzid: None,
            server_final: Some(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=".to_vec()),
        }
    );
    // Replaying client-final after the exchange: the exchange is over, and a
    // new exchange with a fresh nonce does not match the old r=.
    assert_eq!(h.step(&mut ex, RFC7677_FINAL), MALFORMED);
    let (mut ex2, _) = h.start(
        Mechanism::ScramSha256,
        Some(b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"),
    );
    assert_eq!(h.step(&mut ex2, RFC7677_FINAL), REPLAY);
}

#[test]
fn scram_without_initial_response_and_expiry() {
    let mut h = rfc7677();
    let (mut ex, step) =
        Exchange::start_with_nonce(Mechanism::ScramSha256, None, &mut h.ctx(), RFC7677_SNONCE);
    assert_eq!(challenge(&step), b"");
    let first = h.step(&mut ex, b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO");
    assert!(challenge(&first).starts_with(b"r=rOprNGfwEbeRWgbNEkqO%hvYD"));
    h.now += TTL + Duration::from_secs(1);
    assert_eq!(h.step(&mut ex, RFC7677_FINAL), REPLAY);
}

/// A SCRAM client (RFC 5802 §3) for the failure tests.
fn scram_final(client_first: &str, server_first: &[u8], pw: &str, gs2: &str) -> Vec<u8> {
    let sf = std::str::from_utf8(server_first).expect("utf8");
    let mut r = "";
    let mut s = "";
    let mut i = 0;
    for a in sf.split(',') {
        if let Some(v) = a.strip_prefix("r=") {
            r = v;
        } else if let Some(v) = a.strip_prefix("s=") {
            s = v;
        } else if let Some(v) = a.strip_prefix("i=") {
            i = v.parse().expect("i");
        }
    }
    let salted = scram_hi(pw.as_bytes(), &B64.decode(s).expect("salt"), i);
    let client_key = hmac_once(&salted, b"Client Key");
    let stored: [u8; 32] = sha2::Sha256::digest(client_key).into();
    let bare = client_first.splitn(3, ',').nth(2).expect("bare");
    let without = format!("c={},r={r}", B64.encode(gs2));
    let auth = format!("{bare},{sf},{without}");
    let sig = hmac_once(&stored, auth.as_bytes());
    let proof: Vec<u8> = client_key.iter().zip(sig).map(|(a, b)| a ^ b).collect();
    format!("{without},p={}", B64.encode(proof)).into_bytes()
}

#[test]
fn scram_failures_and_authzid() {
    let mut h = Harness::new(
        "mx.example.org",
        "example.org",
        &[("alice", "pw"), ("bob", "pw2")],
    );
    let run = |h: &mut Harness, first: &str, pw: &str, gs2: &str| {
        let (mut ex, step) = h.start(Mechanism::ScramSha256, Some(first.as_bytes()));
        let sf = challenge(&step);
        let fin = scram_final(first, &sf, pw, gs2);
        h.step(&mut ex, &fin)
    };
    assert!(
        matches!(run(&mut h, "n,,n=alice,r=abc", "pw", "n,,"), Step::Success { ref authcid, server_final: Some(_), .. } if authcid == "alice")
    );
    assert!(matches!(
        run(&mut h, "y,,n=alice,r=abc", "pw", "y,,"),
        Step::Success { .. }
    ));
    assert_eq!(run(&mut h, "n,,n=alice,r=abc", "wrong", "n,,"), BAD);
    assert_eq!(run(&mut h, "n,,n=nobody,r=abc", "pw", "n,,"), BAD);
    // c= must repeat the gs2 header.
    assert_eq!(run(&mut h, "n,,n=alice,r=abc", "pw", "y,,"), MALFORMED);
    // authzid.
    assert!(matches!(
        run(&mut h, "n,a=alice,n=alice,r=abc", "pw", "n,a=alice,"),
        Step::Success { authzid: None, .. }
    ));
    assert_eq!(
        run(&mut h, "n,a=bob,n=alice,r=abc", "pw", "n,a=bob,"),
        DENIED
    );
    h.allow_authzid = true;
    assert!(
        matches!(run(&mut h, "n,a=bob,n=alice,r=abc", "pw", "n,a=bob,"), Step::Success { authzid: Some(ref z), .. } if z == "bob")
    );
    // Malformed client-first messages.
    for bad in [
        &b"p=tls-unique,,n=alice,r=abc"[..],
        b"n,,m=ext,n=alice,r=abc",
        b"n,,n=alice",
        b"n,,n=,r=abc",
        b"n,,n=al=ice,r=abc",
        b"n,,n=alice,r=",
        b"n,,n=alice,r=a\x01b",
        b"x,,n=alice,r=abc",
        b"n,n=alice,r=abc",
        b"",
    ] {
        assert_eq!(
            h.start(Mechanism::ScramSha256, Some(bad)).1,
            MALFORMED,
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
    let huge = format!("n,,n=alice,r={}", "a".repeat(5000));
    assert_eq!(
        h.start(Mechanism::ScramSha256, Some(huge.as_bytes())).1,
        MALFORMED
    );
    // Malformed client-final.
    let (mut ex, _) = h.start(Mechanism::ScramSha256, Some(b"n,,n=alice,r=abc"));
    assert_eq!(h.step(&mut ex, b"c=biws,r=abc"), MALFORMED);
    let (mut ex, _) = h.start(Mechanism::ScramSha256, Some(b"n,,n=alice,r=abc"));
    assert_eq!(h.step(&mut ex, b"c=biws,r=abc,p=!!"), MALFORMED);
}

#[test]
fn scram_unknown_user_looks_like_a_real_one() {
    let mut h = Harness::new("mx.example.org", "example.org", &[("alice", "pw")]);
    let sf = |h: &mut Harness, user: &str| {
        let first = format!("n,,n={user},r=abc");
        let c = challenge(&h.start(Mechanism::ScramSha256, Some(first.as_bytes())).1);
        let c = String::from_utf8(c).expect("utf8");
        let mut parts = c.split(',');
        parts.next();
        (
            parts.next().expect("s").to_owned(),
            parts.next().expect("i").to_owned(),
        )
    };
    let (s1, i1) = sf(&mut h, "ghost");
    let (s2, _) = sf(&mut h, "ghost");
    let (s3, _) = sf(&mut h, "ghost2");
    assert_eq!(s1, s2, "stable fake salt");
    assert_ne!(s1, s3);
    assert_eq!(i1, "i=4096");
    assert_eq!(B64.decode(&s1[2..]).expect("b64").len(), 16);
}

#[test]
fn scram_saslname_escapes() {
    let mut h = Harness::new("mx", "r", &[("a,b=c", "pw")]);
    let first = "n,,n=a=2Cb=3Dc,r=xyz";
    let (mut ex, step) = h.start(Mechanism::ScramSha256, Some(first.as_bytes()));
    let fin = scram_final(first, &challenge(&step), "pw", "n,,");
    assert!(
        matches!(h.step(&mut ex, &fin), Step::Success { ref authcid, .. } if authcid == "a,b=c")
    );
}

// ------------------------------------------------------------------ PLAIN

fn plain_harness() -> Harness {
    Harness::new(
        "mx.example.org",
        "example.org",
        &[("tim", "tanstaaftanstaaf"), ("ops", "x")],
    )
}

#[test]
fn plain_rules() {
    let mut h = plain_harness();
    let once = |h: &mut Harness, msg: &[u8]| h.start(Mechanism::Plain, Some(msg)).1;
    assert_eq!(once(&mut h, b"\0tim\0tanstaaftanstaaf"), success("tim"));
    assert_eq!(once(&mut h, b"tim\0tim\0tanstaaftanstaaf"), success("tim"));
    assert_eq!(once(&mut h, b"ops\0tim\0tanstaaftanstaaf"), DENIED);
    // Wrong password before authzid: credentials are judged first.
    assert_eq!(once(&mut h, b"ops\0tim\0wrong"), BAD);
    assert_eq!(once(&mut h, b"\0tim\0wrong"), BAD);
    assert_eq!(once(&mut h, b"\0nobody\0tanstaaftanstaaf"), BAD);
    assert_eq!(once(&mut h, b"\0Tim\0tanstaaftanstaaf"), BAD);
    for bad in [
        &b""[..],
        b"tim",
        b"\0tim",
        b"\0\0pw",
        b"\0tim\0",
        b"\0tim\0pw\0x",
        b"\0\xff\0pw",
    ] {
        assert_eq!(once(&mut h, bad), MALFORMED, "{bad:?}");
    }
    let long = [&b"\0tim\0"[..], &[b'a'; 2000]].concat();
    assert_eq!(once(&mut h, &long), MALFORMED);
    h.allow_authzid = true;
    assert_eq!(
        once(&mut h, b"ops\0tim\0tanstaaftanstaaf"),
        Step::Success {
            authcid: "tim".into(),
            authzid: Some("ops".into()),
            server_final: None
        }
    );
    // Without an initial response: empty challenge, then the message.
    let (mut ex, step) = h.start(Mechanism::Plain, None);
    assert_eq!(step, Step::Challenge(vec![]));
    assert_eq!(h.step(&mut ex, b"\0tim\0tanstaaftanstaaf"), success("tim"));
    assert_eq!(h.step(&mut ex, b"\0tim\0tanstaaftanstaaf"), MALFORMED);
}

#[test]
fn plain_non_ascii_password_uses_latin1_rule_consistently() {
    let mut h = Harness::new("mx", "r", &[("jos\u{e9}", "p\u{e4}ss"), ("yu", "\u{732b}")]);
    let msg = "\0jos\u{e9}\0p\u{e4}ss".as_bytes().to_vec();
    assert_eq!(
        h.start(Mechanism::Plain, Some(&msg)).1,
        success("jos\u{e9}")
    );
    let msg = "\0yu\0\u{732b}".as_bytes().to_vec();
    assert_eq!(h.start(Mechanism::Plain, Some(&msg)).1, success("yu"));
}

// ------------------------------------------------------------------ LOGIN

#[test]
fn login_flow() {
    let mut h = plain_harness();
    let (mut ex, step) = h.start(Mechanism::Login, None);
    assert_eq!(step, Step::Challenge(b"Username:".to_vec()));
    assert_eq!(
        h.step(&mut ex, b"tim"),
        Step::Challenge(b"Password:".to_vec())
    );
    assert_eq!(h.step(&mut ex, b"tanstaaftanstaaf"), success("tim"));
    assert_eq!(h.step(&mut ex, b"again"), MALFORMED);

    // Initial response carries the user name.
    let (mut ex, step) = h.start(Mechanism::Login, Some(b"tim"));
    assert_eq!(step, Step::Challenge(b"Password:".to_vec()));
    assert_eq!(h.step(&mut ex, b"wrong"), BAD);

    let (mut ex, _) = h.start(Mechanism::Login, None);
    h.step(&mut ex, b"nobody");
    assert_eq!(h.step(&mut ex, b"tanstaaftanstaaf"), BAD);

    let (mut ex, _) = h.start(Mechanism::Login, None);
    assert_eq!(h.step(&mut ex, b""), MALFORMED);
    let (mut ex, _) = h.start(Mechanism::Login, None);
    h.step(&mut ex, b"tim");
    assert_eq!(h.step(&mut ex, b""), MALFORMED);
    assert_eq!(h.start(Mechanism::Login, Some(b"")).1, MALFORMED);
    assert_eq!(h.start(Mechanism::Login, Some(&[b'u'; 300])).1, MALFORMED);
}

// ------------------------------------------------ unknown vs wrong, empty db

#[test]
fn empty_store_fails_every_mechanism_with_bad_credentials() {
    let mut h = Harness::new("mx", "r", &[]);
    assert_eq!(h.start(Mechanism::Plain, Some(b"\0a\0b")).1, BAD);
    let (mut ex, _) = h.start(Mechanism::Login, Some(b"a"));
    assert_eq!(h.step(&mut ex, b"b"), BAD);
    let (mut ex, _) = h.start(Mechanism::CramMd5, None);
    assert_eq!(h.step(&mut ex, b"a b913a602c7eda7a495b4e6e7334d3890"), BAD);
    let first = "n,,n=a,r=abc";
    let (mut ex, step) = h.start(Mechanism::ScramSha256, Some(first.as_bytes()));
    let fin = scram_final(first, &challenge(&step), "b", "n,,");
    assert_eq!(h.step(&mut ex, &fin), BAD);
}

// ------------------------------------------------- client helpers round trip

#[test]
fn client_helpers_round_trip() {
    let mut h = Harness::new("mx.example.org", "example.org", &[("ann", "pw")]);
    let (mut ex, step) = h.start(Mechanism::CramMd5, None);
    let resp = client::cram_md5("ann", "pw", &challenge(&step));
    assert_eq!(h.step(&mut ex, &resp), success("ann"));

    let (mut ex, nonce) = digest_start(&mut h);
    let (resp, rspauth) = client::digest_md5(
        "ann",
        "example.org",
        "pw",
        &nonce,
        "cn",
        "smtp/mx.example.org",
    );
    assert!(
        matches!(h.step(&mut ex, &resp), Step::Success { server_final: Some(f), .. } if f == rspauth.as_bytes())
    );

    let first = "n,,n=ann,r=cnonce";
    let (mut ex, step) = h.start(Mechanism::ScramSha256, Some(first.as_bytes()));
    let fin = client::scram_client_final(first, &challenge(&step), "pw").expect("final");
    assert!(matches!(h.step(&mut ex, &fin), Step::Success { .. }));
    assert_eq!(client::scram_client_final(first, b"garbage", "pw"), None);

    assert_eq!(
        h.start(Mechanism::Plain, Some(&client::plain("", "ann", "pw")))
            .1,
        success("ann")
    );
}

#[test]
fn a_finished_exchange_kills_its_nonce_even_on_malformed_input() {
    let mut h = digest_harness();
    let (mut ex, nonce) = digest_start(&mut h);
    assert_eq!(h.step(&mut ex, b"garbage"), MALFORMED);
    assert_eq!(
        h.nonces.consume(nonce.as_bytes(), h.now),
        Err(nonces::NonceError::Unknown)
    );
    let mut h = rfc7677();
    let (mut ex, _) = Exchange::start_with_nonce(
        Mechanism::ScramSha256,
        Some(b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"),
        &mut h.ctx(),
        RFC7677_SNONCE,
    );
    assert_eq!(h.step(&mut ex, b"c=biws"), MALFORMED);
    assert_eq!(
        h.nonces.consume(RFC7677_SNONCE.as_bytes(), h.now),
        Err(nonces::NonceError::Unknown)
    );
}

// ------------------------------------------------- user@realm logins (Cyrus)

/// Default realm `mx.example.org` with `ann`; `alice` lives in `example.org`
/// only, `bob` in both realms with different passwords.
fn realms_harness() -> Harness {
    let mut h = Harness::new("mx.example.org", "mx.example.org", &[("ann", "pw")]);
    for (u, r, p) in [
        ("alice", "example.org", "alicepw"),
        ("bob", "example.org", "bob-eo"),
        ("bob", "mx.example.org", "bob-mx"),
    ] {
        h.db.insert(u, r, Secrets::derive(u, r, p, p, b"salty salt", 16))
            .expect("insert");
    }
    h
}

#[test]
fn split_login_is_cyrus_first_at() {
    use crate::users::split_login;
    assert_eq!(split_login("alice", "d"), ("alice", "d"));
    assert_eq!(
        split_login("alice@example.org", "d"),
        ("alice", "example.org")
    );
    assert_eq!(split_login("a@b@c", "d"), ("a", "b@c"));
    assert_eq!(split_login("@r", "d"), ("", "r"));
    assert_eq!(split_login("a@", "d"), ("a", ""));
}

#[test]
fn plain_user_at_realm_selects_the_realm() {
    let mut h = realms_harness();
    let plain = |h: &mut Harness, u: &str, p: &str| {
        h.start(Mechanism::Plain, Some(&client::plain("", u, p))).1
    };
    assert_eq!(
        plain(&mut h, "alice@example.org", "alicepw"),
        success("alice@example.org")
    );
    // Bare `alice` is looked up in the default realm, where she does not exist.
    assert_eq!(plain(&mut h, "alice", "alicepw"), BAD);
    assert_eq!(plain(&mut h, "alice@example.org", "wrong"), BAD);
    // Same name, two realms, two passwords: the realm picks the secrets.
    assert_eq!(plain(&mut h, "bob", "bob-mx"), success("bob"));
    assert_eq!(
        plain(&mut h, "bob@mx.example.org", "bob-mx"),
        success("bob@mx.example.org")
    );
    assert_eq!(
        plain(&mut h, "bob@example.org", "bob-eo"),
        success("bob@example.org")
    );
    assert_eq!(plain(&mut h, "bob@example.org", "bob-mx"), BAD);
    // First `@`: realm `example.org@x` cannot exist; empty parts are unknown users.
    assert_eq!(plain(&mut h, "alice@example.org@x", "alicepw"), BAD);
    assert_eq!(plain(&mut h, "@example.org", "alicepw"), BAD);
    assert_eq!(plain(&mut h, "alice@", "alicepw"), BAD);
    // The authzid rule compares with the full login.
    assert_eq!(
        h.start(
            Mechanism::Plain,
            Some(&client::plain(
                "alice@example.org",
                "alice@example.org",
                "alicepw"
            ))
        )
        .1,
        success("alice@example.org")
    );
    assert_eq!(
        h.start(
            Mechanism::Plain,
            Some(&client::plain("alice", "alice@example.org", "alicepw"))
        )
        .1,
        DENIED
    );
}

#[test]
fn login_user_at_realm_selects_the_realm() {
    let mut h = realms_harness();
    for (user, pw, want) in [
        ("alice@example.org", "alicepw", success("alice@example.org")),
        ("alice", "alicepw", BAD),
        ("bob@example.org", "bob-eo", success("bob@example.org")),
    ] {
        let (mut ex, _) = h.start(Mechanism::Login, Some(user.as_bytes()));
        assert_eq!(h.step(&mut ex, pw.as_bytes()), want, "{user}");
    }
}

#[test]
fn cram_md5_user_at_realm_selects_the_realm() {
    let mut h = realms_harness();
    for (user, pw, want) in [
        ("alice@example.org", "alicepw", success("alice@example.org")),
        ("alice", "alicepw", BAD),
        ("bob@example.org", "bob-eo", success("bob@example.org")),
        ("bob@example.org", "bob-mx", BAD),
        ("bob", "bob-mx", success("bob")),
    ] {
        let (mut ex, step) = h.start(Mechanism::CramMd5, None);
        let resp = client::cram_md5(user, pw, &challenge(&step));
        assert_eq!(h.step(&mut ex, &resp), want, "{user}");
    }
}

#[test]
fn scram_user_at_realm_selects_the_realm() {
    let mut h = realms_harness();
    for (user, pw, ok) in [
        ("alice@example.org", "alicepw", true),
        ("alice", "alicepw", false),
        ("bob@example.org", "bob-eo", true),
        ("bob@example.org", "bob-mx", false),
    ] {
        let first = format!("n,,n={user},r=cnonce");
        let (mut ex, step) = h.start(Mechanism::ScramSha256, Some(first.as_bytes()));
        let fin = client::scram_client_final(&first, &challenge(&step), pw).expect("final");
        match h.step(&mut ex, &fin) {
            Step::Success { authcid, .. } => assert!(ok && authcid == user, "{user}"),
            other => assert!(!ok && other == BAD, "{user}: {other:?}"),
        }
    }
    // The salt sent for `alice@example.org` is alice's real one (the realm was
    // used for the lookup), and an unknown `x@example.org` gets a fake salt.
    let first = "n,,n=alice@example.org,r=c";
    let (_, step) = h.start(Mechanism::ScramSha256, Some(first.as_bytes()));
    let sf = String::from_utf8(challenge(&step)).expect("utf8");
    assert!(
        sf.contains(&format!(",s={},", B64.encode(b"salty salt"))),
        "{sf}"
    );
    let (_, step) = h.start(Mechanism::ScramSha256, Some(b"n,,n=x@example.org,r=c"));
    let sf = String::from_utf8(challenge(&step)).expect("utf8");
    assert!(!sf.contains(&B64.encode(b"salty salt")), "{sf}");
}

#[test]
fn digest_md5_realm_directive_selects_the_realm() {
    let mut h = realms_harness();
    let uri = "smtp/mx.example.org";
    // (username, realm sent, password, expected)
    let cases = [
        // The client kept the offered realm: bare user, default realm.
        ("bob", "mx.example.org", "bob-mx", success("bob")),
        // The client named another realm: Cyrus looks up username@realm, and
        // H(user:realm:pw) is exactly what `tern passwd -u example.org` stored.
        (
            "alice",
            "example.org",
            "alicepw",
            success("alice@example.org"),
        ),
        ("bob", "example.org", "bob-eo", success("bob@example.org")),
        ("bob", "example.org", "bob-mx", BAD),
        // A realm where the user does not exist.
        ("alice", "mx.example.org", "alicepw", BAD),
        // username="alice@example.org": Cyrus finds alice@example.org, but the
        // client hashed "alice@example.org:<realm>:pw", which the stored
        // H(alice:example.org:pw) cannot verify: refused like a wrong password.
        ("alice@example.org", "mx.example.org", "alicepw", BAD),
        ("alice@example.org", "example.org", "alicepw", BAD),
        // Absent/empty realm: A1 has an empty realm; no stored hash has one.
        ("bob", "", "bob-mx", BAD),
    ];
    for (user, realm, pw, want) in cases {
        let (mut ex, nonce) = digest_start(&mut h);
        let (resp, rspauth) = client::digest_md5(user, realm, pw, &nonce, "cn", uri);
        let got = h.step(&mut ex, &resp);
        match (&got, &want) {
            (
                Step::Success {
                    authcid,
                    server_final,
                    ..
                },
                Step::Success { authcid: w, .. },
            ) => {
                assert_eq!(authcid, w, "{user} {realm}");
                assert_eq!(server_final.as_deref(), Some(rspauth.as_bytes()));
            }
            _ => assert_eq!(got, want, "{user} {realm}"),
        }
    }
    // No realm directive at all: same as empty.
    let (mut ex, nonce) = digest_start(&mut h);
    let (r, _) = digest_client("bob", "", "bob-mx", &nonce, "OA6MHXh6VqTrRk", uri, None);
    let resp = format!(
        "charset=utf-8,username=\"bob\",nonce=\"{nonce}\",nc=00000001,\
         cnonce=\"OA6MHXh6VqTrRk\",digest-uri=\"{uri}\",response={r},qop=auth"
    );
    assert_eq!(h.step(&mut ex, resp.as_bytes()), BAD);
}

#[test]
fn unreachable_lists_user_names_with_at() {
    let mut db = UserDb::empty();
    let s = || Secrets::derive("x", "r", "p", "p", b"s", 1);
    db.insert("bob@corp", "example.org", s()).expect("insert");
    db.insert("ann", "example.org", s()).expect("insert");
    assert_eq!(db.unreachable(), vec![("bob@corp", "example.org")]);
}
