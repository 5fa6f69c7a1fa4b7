//! Arbitrary client messages through every SASL mechanism's server steps. Must hold:
//! - never a panic;
//! - a wrong password never succeeds: the store has user `user` with password `pencil`;
//!   PLAIN and LOGIN may succeed only if the client's messages carry `pencil`, the
//!   challenge-response mechanisms (CRAM-MD5, DIGEST-MD5, SCRAM-SHA-256) never, since the
//!   fuzzer cannot compute a keyed digest over a random server nonce;
//! - a success names an authcid the store knows (`user`), and never an authzid other than
//!   the authcid when authzids are not allowed;
//! - once an exchange has ended (success or failure), it does not come back to life.
#![no_main]
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tern_smtp::sasl::nonces::NonceCache;
use tern_smtp::sasl::{decode_client_line, AuthContext, ClientLine, Exchange, Mechanism, Step};
use tern_smtp::users::{Secrets, UserDb};

fn users() -> &'static UserDb {
    static DB: OnceLock<UserDb> = OnceLock::new();
    DB.get_or_init(|| {
        let mut db = UserDb::empty();
        db.insert(
            "user",
            "mx.test",
            Secrets::derive("user", "mx.test", "pencil", "pencil", b"salt", 16),
        )
        .expect("valid user");
        db
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let mech = Mechanism::ALL[sel as usize % Mechanism::ALL.len()];
    let allow_authzid = sel & 0x80 != 0;
    let mut nonces = NonceCache::new(64, Duration::from_secs(60));
    let mut ctx = AuthContext {
        users: users(),
        nonces: &mut nonces,
        hostname: "mx.test",
        realm: "mx.test",
        allow_authzid,
        now: Instant::now(),
        unix_secs: 1_796_281_560,
        login: None,
    };
    // The input is split into client messages at 0xff bytes. With bit 0x20 set, each is
    // an SMTP line that goes through the RFC 4954 base64 framing first (as the session
    // does), otherwise it is the decoded message itself.
    let framed = sel & 0x20 != 0;
    let decode = |p: &[u8], initial: bool| -> Option<Vec<u8>> {
        if !framed {
            return Some(p.to_vec());
        }
        match decode_client_line(p, initial) {
            Ok(ClientLine::Data(d)) => Some(d),
            Ok(ClientLine::Cancel) | Err(_) => None,
        }
    };
    let mut sent: Vec<Vec<u8>> = Vec::new();
    let mut parts = rest.split(|&b| b == 0xff);
    let initial = if sel & 0x40 != 0 {
        match parts.next().map(|p| decode(p, true)) {
            Some(Some(d)) => Some(d),
            Some(None) => return,
            None => None,
        }
    } else {
        None
    };
    if let Some(i) = &initial {
        sent.push(i.clone());
    }
    let (mut ex, mut step) = Exchange::start(mech, initial.as_deref(), &mut ctx);
    let mut ended = false;
    for p in parts {
        if !matches!(step, Step::Challenge(_)) {
            // Further input to a finished exchange must never succeed.
            ended = true;
        }
        let Some(d) = decode(p, false) else { break };
        sent.push(d.clone());
        let next = ex.step(&d, &mut ctx);
        if ended {
            assert!(
                !matches!(next, Step::Success { .. }),
                "{mech:?}: a finished exchange succeeded"
            );
            break;
        }
        step = next;
    }
    if let Step::Success {
        authcid, authzid, ..
    } = &step
    {
        assert!(
            matches!(mech, Mechanism::Plain | Mechanism::Login),
            "{mech:?} succeeded without the client knowing the password"
        );
        assert!(
            sent.iter().any(|m| m.windows(6).any(|w| w == b"pencil")),
            "{mech:?} succeeded without the password"
        );
        assert!(
            authcid == "user" || authcid.starts_with("user@"),
            "{authcid}"
        );
        if !allow_authzid {
            assert!(
                authzid.is_none() || authzid.as_deref() == Some(authcid.as_str()),
                "foreign authzid {authzid:?} accepted"
            );
        }
    }
});
