//! Arbitrary bytes, split into arbitrary reads, through the whole session state machine
//! (commands, DATA, BDAT, AUTH PLAIN/LOGIN framing). Must hold for every input:
//! - never a panic;
//! - the same replies and the same stored messages (envelope and body) whatever the split
//!   (the first byte chooses the split points). After a STARTTLS the session discards the
//!   buffered input by design, so only what precedes the first STARTTLS is compared then;
//! - every reply line is `DDD[ -]...` ending in CRLF, with no bare CR or LF inside;
//! - the Received: header of every stored message is header-safe: its only CR/LF are the
//!   CRLFs ending its (folded) lines, and it is printable ASCII (header injection);
//! - a successful AUTH happens only if the input carries the password (user `user`,
//!   password `pencil`): a wrong password never authenticates.
#![no_main]
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::BytesMut;
use tern_smtp::envelope::Envelope;
use tern_smtp::hooks::{NoHooks, Now};
use tern_smtp::policy::RelayPolicy;
use tern_smtp::sasl::nonces::NonceCache;
use tern_smtp::sasl::Mechanism;
use tern_smtp::session::{
    discard_input, AuthSetup, AuthShared, Event, ListenerKind, Session, SessionConfig,
    SessionLimits,
};
use tern_smtp::users::{Secrets, UserDb};

fn users() -> Arc<UserDb> {
    static DB: OnceLock<Arc<UserDb>> = OnceLock::new();
    DB.get_or_init(|| {
        let mut db = UserDb::empty();
        db.insert(
            "user",
            "mx.test",
            Secrets::derive("user", "mx.test", "pencil", "pencil", b"salt", 16),
        )
        .expect("valid user");
        Arc::new(db)
    })
    .clone()
}

struct Run {
    out: Vec<u8>,
    stored: Vec<(Envelope, Vec<u8>)>,
    /// Output length and stored count when the first STARTTLS was accepted.
    at_starttls: Option<(usize, usize)>,
    authenticated: bool,
}

fn run(input: &[u8], step: usize, submission: bool) -> Run {
    let shared = Rc::new(AuthShared {
        users: RefCell::new(users()),
        nonces: RefCell::new(NonceCache::new(64, Duration::from_secs(60))),
        senders: RefCell::new(Default::default()),
    });
    // One fixed time for both runs: the protocol core reads no clock, so the Received:
    // headers and arrival times of the two runs are identical too.
    let now = Now::at(std::time::Instant::now(), 1_796_281_560_000_000);
    let cfg = Rc::new(SessionConfig {
        hostname: "mx.test".into(),
        kind: if submission {
            ListenerKind::Submission
        } else {
            ListenerKind::Smtp
        },
        limits: SessionLimits {
            command_line: 512,
            text_line: 1000,
            message_size: 4096,
            recipients: 5,
            errors: 50,
        },
        tls_available: true,
        policy: RelayPolicy::new(&["local.test".into()], &[]),
        // Only the mechanisms whose challenges are deterministic: CRAM/DIGEST/SCRAM send
        // random nonces, which would make the two runs' replies differ.
        auth: Some(AuthSetup {
            mechanisms: vec![Mechanism::Plain, Mechanism::Login],
            relay_mechanisms: vec![Mechanism::Plain, Mechanism::Login],
            allow_plaintext_without_tls: true,
            allow_authzid: false,
            max_failures: 3,
            tarpit: Duration::from_millis(1),
            required: submission,
            sender_own: false,
            check_header_from: false,
            realm: "mx.test".into(),
            shared,
        }),
        hooks: Rc::new(NoHooks),
        ehlo_cache: Default::default(),
    });
    let mut s = Session::new(cfg, "192.0.2.1:1000".parse().unwrap(), false, now);
    let mut inbuf = BytesMut::new();
    let mut out = BytesMut::new();
    let mut stored = Vec::new();
    let mut at_starttls = None;
    let mut authenticated = false;
    'feed: for piece in input.chunks(step.max(1)) {
        inbuf.extend_from_slice(piece);
        loop {
            let ev = s.process(&mut inbuf, &mut out, now);
            authenticated |= s.authenticated().is_some();
            let _ = s.take_delay();
            match ev {
                Event::NeedInput => break,
                Event::Close => break 'feed,
                Event::StartTls => {
                    at_starttls.get_or_insert((out.len(), stored.len()));
                    discard_input(&mut inbuf);
                    s.tls_started();
                    break;
                }
                Event::Etrn(node) => s.etrn_started(&node, 0, &mut out),
                Event::Check(_) => s.checked(None, &mut out),
                Event::Message(mut m) => {
                    m.finish("mx.test", "ID");
                    check_received(&m.body[0]);
                    // Both runs pass the same `now`, so the whole stored message, Received:
                    // header and arrival time included, must be identical.
                    stored.push((m.envelope.clone(), m.body.concat()));
                    s.stored(Ok("ID"), &mut out);
                }
            }
        }
    }
    Run {
        out: out.to_vec(),
        stored,
        at_starttls,
        authenticated,
    }
}

/// The trace header: printable ASCII and tabs, lines ending in CRLF, no other CR or LF.
fn check_received(h: &[u8]) {
    assert!(
        h.starts_with(b"Received: "),
        "{:?}",
        String::from_utf8_lossy(h)
    );
    assert!(h.ends_with(b"\r\n"));
    for (i, &b) in h.iter().enumerate() {
        match b {
            b'\r' => assert_eq!(h.get(i + 1), Some(&b'\n'), "bare CR in Received:"),
            b'\n' => {
                assert!(i > 0 && h[i - 1] == b'\r', "bare LF in Received:");
                // Every continuation line is folded (starts with white space).
                if i + 1 < h.len() {
                    assert!(
                        matches!(h[i + 1], b' ' | b'\t'),
                        "unfolded line in Received:"
                    );
                }
            }
            b'\t' | 0x20..=0x7e => {}
            _ => panic!("byte {b:#x} in Received: {:?}", String::from_utf8_lossy(h)),
        }
    }
}

fn check_replies(out: &[u8]) {
    let mut rest = out;
    while !rest.is_empty() {
        let end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("reply line without CRLF");
        let line = &rest[..end];
        assert!(
            !line.contains(&b'\r') && !line.contains(&b'\n'),
            "bare CR/LF in a reply"
        );
        assert!(
            line.len() >= 3 && line[..3].iter().all(u8::is_ascii_digit),
            "{line:?}"
        );
        assert!(
            line.len() == 3 || matches!(line[3], b' ' | b'-'),
            "{line:?}"
        );
        rest = &rest[end + 2..];
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let submission = first & 0x80 != 0;
    let whole = run(rest, rest.len(), submission);
    let split = run(rest, 1 + (first & 0x7f) as usize % 17, submission);
    check_replies(&whole.out);
    check_replies(&split.out);
    match (whole.at_starttls, split.at_starttls) {
        (None, None) => {
            assert_eq!(whole.out, split.out);
            assert_eq!(whole.stored, split.stored);
        }
        (Some((o1, s1)), Some((o2, s2))) => {
            assert_eq!(o1, o2, "STARTTLS accepted at a different point");
            assert_eq!(whole.out[..o1], split.out[..o2]);
            assert_eq!(whole.stored[..s1], split.stored[..s2]);
        }
        _ => panic!("STARTTLS accepted in one split only"),
    }
    if whole.authenticated || split.authenticated {
        assert!(
            rest.windows(6).any(|w| w == b"pencil") || contains_b64_pencil(rest),
            "authenticated without the password"
        );
    }
});

/// The password may arrive base64-encoded (any of the three alignments); decode every
/// base64 run of the input and look for it there.
fn contains_b64_pencil(input: &[u8]) -> bool {
    use base64::Engine as _;
    input
        .split(|b| !(b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=')))
        .filter_map(|tok| base64::engine::general_purpose::STANDARD.decode(tok).ok())
        .any(|d| d.windows(6).any(|w| w == b"pencil"))
}
