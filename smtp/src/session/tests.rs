//! Session state machine tests: bytes in, replies out, no sockets.

use super::*;
use crate::hooks::NoHooks;
use std::time::Instant;

/// The time every test session runs at (the host passes it; here a fixed wall clock).
fn test_now() -> Now {
    Now::at(Instant::now(), 1_796_281_560_000_000)
}

fn cfg() -> Rc<SessionConfig> {
    Rc::new(SessionConfig {
        hostname: "mx.test".into(),
        kind: ListenerKind::Smtp,
        limits: SessionLimits {
            command_line: 512,
            text_line: 1000,
            message_size: 10_000,
            recipients: 3,
            errors: 20,
        },
        tls_available: true,
        policy: RelayPolicy::new(&["local.test".into()], &[]),
        auth: None,
        hooks: Rc::new(NoHooks),
        ehlo_cache: Default::default(),
    })
}

/// Feeds `input` in one piece; stores every message with id "ID<n>". Returns the replies
/// and the bodies stored.
fn drive(s: &mut Session, input: &[u8]) -> (String, Vec<Vec<u8>>) {
    let mut inbuf = BytesMut::from(input);
    let mut out = BytesMut::new();
    let mut stored = Vec::new();
    loop {
        match s.process(&mut inbuf, &mut out, test_now()) {
            Event::NeedInput | Event::Close => break,
            Event::Etrn(node) => s.etrn_started(&node, 0, &mut out),
            Event::Check(_) => s.checked(None, &mut out),
            Event::StartTls => {
                discard_input(&mut inbuf);
                break;
            }
            Event::Message(mut m) => {
                m.finish("mx.test", "ID");
                let body: Vec<u8> = m.body.iter().flat_map(|b| b.iter().copied()).collect();
                stored.push(body);
                s.stored(Ok("ID"), &mut out);
            }
        }
    }
    (String::from_utf8_lossy(&out).into_owned(), stored)
}

fn session() -> Session {
    Session::new(cfg(), "192.0.2.7:4000".parse().unwrap(), false, test_now())
}

fn codes(out: &str) -> Vec<&str> {
    out.lines().map(|l| &l[..3]).collect()
}

#[test]
fn full_transaction_pipelined() {
    let mut s = session();
    let (out, stored) = drive(
        &mut s,
        b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@local.test>\r\nDATA\r\nSubject: hi\r\n\r\n..dot\r\n.\r\nQUIT\r\n",
    );
    assert!(out.contains("250-PIPELINING"));
    assert!(out.contains("250 STARTTLS\r\n"));
    assert!(
        out.ends_with("250 2.0.0 Ok: queued as ID\r\n221 2.0.0 Bye\r\n"),
        "{out}"
    );
    assert_eq!(stored.len(), 1);
    let body = String::from_utf8(stored[0].clone()).unwrap();
    assert!(body.starts_with("Received: from c.test ([192.0.2.7])\r\n\tby mx.test (tern) with ESMTP id ID\r\n\tfor <x@local.test>;"), "{body}");
    assert!(body.ends_with("Subject: hi\r\n\r\n.dot\r\n"));
    assert!(s.is_closed());
}

#[test]
fn order_errors() {
    let mut s = session();
    let (out, _) = drive(&mut s, b"MAIL FROM:<a@b>\r\nEHLO x\r\nRCPT TO:<x@local.test>\r\nDATA\r\nMAIL FROM:<a@b>\r\nMAIL FROM:<a@b>\r\nDATA\r\nRCPT TO:<x@elsewhere.test>\r\nDATA\r\n");
    assert_eq!(codes(&out)[..1], ["503"]);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines
        .iter()
        .any(|l| l.starts_with("503 5.5.1 Error: need MAIL")));
    assert!(lines
        .iter()
        .any(|l| l.starts_with("503 5.5.1 Error: nested MAIL")));
    assert!(lines
        .iter()
        .any(|l| l.starts_with("503 5.5.1 Error: need RCPT")));
    assert!(lines
        .iter()
        .any(|l| l.starts_with("554 5.7.1 <x@elsewhere.test>: Relay access denied")));
    assert!(lines
        .last()
        .unwrap()
        .starts_with("554 5.5.1 Error: no valid recipients"));
}

#[test]
fn too_many_recipients() {
    let mut s = session();
    let (out, _) = drive(&mut s, b"EHLO x\r\nMAIL FROM:<>\r\nRCPT TO:<a@local.test>\r\nRCPT TO:<b@local.test>\r\nRCPT TO:<c@local.test>\r\nRCPT TO:<d@local.test>\r\n");
    assert!(
        out.ends_with("452 4.5.3 Error: too many recipients\r\n"),
        "{out}"
    );
}

#[test]
fn bare_lf_in_command_and_long_line() {
    let mut s = session();
    let long = format!("NOOP {}\r\nNOOP\r\n", "x".repeat(600));
    let (out, _) = drive(&mut s, format!("NOOP\nNOOP\r\n{long}").as_bytes());
    // "NOOP\nNOOP\r\n" is one line with a bare LF inside: one error, not two commands.
    let c = codes(&out);
    assert_eq!(c, ["500", "500", "250"], "{out}");
    assert!(out.contains("line too long"));
}

#[test]
fn long_line_split_across_reads_is_discarded() {
    let mut s = session();
    let mut out = BytesMut::new();
    let mut inbuf = BytesMut::from(&b"NOOP "[..]);
    // Longer than any line tern buffers (AUTH lines may reach 12288 octets).
    inbuf.extend_from_slice(&[b'x'; 13_000]);
    assert!(matches!(
        s.process(&mut inbuf, &mut out, test_now()),
        Event::NeedInput
    ));
    assert!(inbuf.is_empty(), "buffer must not grow without bound");
    inbuf.extend_from_slice(b"yyy\r\nNOOP\r\n");
    s.process(&mut inbuf, &mut out, test_now());
    assert_eq!(
        &out[..],
        b"500 5.5.2 Error: line too long\r\n250 2.0.0 Ok\r\n"
    );
}

#[test]
fn error_limit_closes() {
    let mut s = session();
    let (out, _) = drive(&mut s, &b"BOGUS\r\n".repeat(25));
    assert_eq!(out.lines().filter(|l| l.starts_with("500")).count(), 20);
    assert!(out.ends_with("421 4.7.0 mx.test Error: too many errors\r\n"));
    assert!(s.is_closed());
}

#[test]
fn smuggling_rejected_session_usable() {
    let mut s = session();
    let (out, stored) = drive(
        &mut s,
        b"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@local.test>\r\nDATA\r\nhello\n.\nMAIL FROM:<evil@b>\r\nRCPT TO:<x@local.test>\r\nDATA\r\nsmuggled\r\n.\r\nNOOP\r\n",
    );
    assert!(stored.is_empty());
    assert!(out.contains("554 5.6.0"), "{out}");
    assert!(out.ends_with("250 2.0.0 Ok\r\n"));
}

#[test]
fn oversize_after_dot() {
    let mut s = session();
    let mut input = b"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@local.test>\r\nDATA\r\n".to_vec();
    for _ in 0..200 {
        input.extend_from_slice(&[b'a'; 98]);
        input.extend_from_slice(b"\r\n");
    }
    input.extend_from_slice(b".\r\nNOOP\r\n");
    let (out, stored) = drive(&mut s, &input);
    assert!(stored.is_empty());
    assert!(
        out.ends_with("552 5.3.4 Error: message file too big\r\n250 2.0.0 Ok\r\n"),
        "{out}"
    );
}

#[test]
fn size_param_checked() {
    let mut s = session();
    let (out, _) = drive(&mut s, b"EHLO x\r\nMAIL FROM:<a@b> SIZE=20000\r\n");
    assert!(out.ends_with("552 5.3.4 Error: message size exceeds fixed limit\r\n"));
}

#[test]
fn bdat_chunks() {
    let mut s = session();
    let (out, stored) = drive(
        &mut s,
        b"EHLO x\r\nMAIL FROM:<a@b> BODY=BINARYMIME\r\nRCPT TO:<x@local.test>\r\nBDAT 5\r\nab\ncdBDAT 3 LAST\r\n\x00\r.\r\nNOOP\r\n",
    );
    assert!(out.contains("250 2.0.0 Ok: 5 octets received"), "{out}");
    assert!(out.contains("queued as ID"));
    assert_eq!(stored.len(), 1);
    assert!(stored[0].ends_with(b"ab\ncd\x00\r."));
}

#[test]
fn bdat_without_transaction_consumes_chunk() {
    let mut s = session();
    let (out, _) = drive(&mut s, b"EHLO x\r\nBDAT 6 LAST\r\nQUIT\r\nNOOP\r\n");
    let c = codes(&out);
    assert_eq!(&c[c.len() - 2..], ["503", "250"], "{out}");
}

#[test]
fn binarymime_needs_bdat() {
    let mut s = session();
    let (out, _) = drive(
        &mut s,
        b"EHLO x\r\nMAIL FROM:<a@b> BODY=BINARYMIME\r\nRCPT TO:<x@local.test>\r\nDATA\r\n",
    );
    assert!(out.ends_with("503 5.5.1 Error: BODY=BINARYMIME requires BDAT\r\n"));
}

#[test]
fn starttls_discards_pipelined_commands() {
    let mut s = session();
    let (out, _) = drive(&mut s, b"EHLO x\r\nSTARTTLS\r\nMAIL FROM:<evil@b>\r\n");
    assert!(out.ends_with("220 2.0.0 Ready to start TLS\r\n"), "{out}");
    s.tls_started();
    let (out, _) = drive(&mut s, b"MAIL FROM:<a@b>\r\nEHLO x\r\n");
    assert!(
        out.starts_with("503 5.5.1 Error: send HELO/EHLO first"),
        "{out}"
    );
    assert!(!out.contains("STARTTLS"));
}

#[test]
fn helo_rejects_params_and_misc_verbs() {
    let mut s = session();
    let (out, _) = drive(&mut s, b"HELO x\r\nMAIL FROM:<a@b> SIZE=10\r\nVRFY bob\r\nHELP\r\nEXPN list\r\nRSET\r\nMAIL FROM:<a@b> FOO=1\r\n");
    let c = codes(&out);
    assert_eq!(
        c,
        ["250", "555", "252", "214", "214", "214", "214", "502", "250", "555"],
        "{out}"
    );
}

#[test]
fn etrn_needs_ehlo_and_a_valid_node() {
    let mut s = session();
    let mut inbuf = BytesMut::from(
        &b"ETRN example.org\r\nEHLO x\r\nETRN bad/name\r\nETRN @example.org\r\n"[..],
    );
    let mut out = BytesMut::new();
    let ev = loop {
        match s.process(&mut inbuf, &mut out, test_now()) {
            Event::Etrn(node) => break node,
            Event::NeedInput => panic!("no ETRN event: {}", String::from_utf8_lossy(&out)),
            _ => {}
        }
    };
    assert_eq!(ev, "@example.org");
    s.etrn_started(&ev, 3, &mut out);
    let text = String::from_utf8_lossy(&out).to_string();
    assert!(text.starts_with("503 5.5.1"), "{text}");
    assert!(text.contains("250-ETRN\r\n"), "{text}");
    assert!(text.contains("501 5.5.4"), "{text}");
    assert!(
        text.ends_with("250 2.0.0 Queuing for node @example.org started\r\n"),
        "{text}"
    );
}

#[test]
fn auth_lines_may_reach_12288_octets_other_commands_may_not() {
    // Without AUTH configured the long AUTH line is still read whole (one 503), and a
    // NOOP of the same length is refused as too long: the limits differ by verb.
    let mut s = session();
    let long = "A".repeat(12_000);
    let (out, _) = drive(
        &mut s,
        format!("EHLO x\r\nAUTH PLAIN {long}\r\nNOOP {long}\r\nNOOP\r\n").as_bytes(),
    );
    let c = codes(&out);
    assert_eq!(&c[c.len() - 3..], ["503", "500", "250"], "{out}");
    // Past 12288 octets even AUTH is too long, and memory stays bounded.
    let mut s = session();
    let huge = "A".repeat(13_000);
    let (out, _) = drive(
        &mut s,
        format!("EHLO x\r\nAUTH PLAIN {huge}\r\nNOOP\r\n").as_bytes(),
    );
    assert!(out.contains("500 5.5.2 Error: line too long"), "{out}");
    assert!(out.ends_with("250 2.0.0 Ok\r\n"));
}

/// Feeds `input` split at `cuts` (read boundaries), storing messages as "ID"; returns the
/// replies and the stored bodies.
fn drive_split(input: &[u8], cuts: &[usize]) -> (String, Vec<Vec<u8>>) {
    let mut s = session();
    let mut inbuf = BytesMut::new();
    let mut out = BytesMut::new();
    let mut stored = Vec::new();
    let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
    bounds.push(input.len());
    bounds.sort_unstable();
    let mut pos = 0;
    for b in bounds {
        inbuf.extend_from_slice(&input[pos..b]);
        pos = b;
        loop {
            match s.process(&mut inbuf, &mut out, test_now()) {
                Event::NeedInput | Event::Close => break,
                Event::StartTls => {
                    discard_input(&mut inbuf);
                    break;
                }
                Event::Etrn(node) => s.etrn_started(&node, 0, &mut out),
                Event::Check(_) => s.checked(None, &mut out),
                Event::Message(mut m) => {
                    m.finish("mx.test", "ID");
                    // Leave out the Received: header (it carries the current time).
                    stored.push(m.body[1..].concat());
                    s.stored(Ok("ID"), &mut out);
                }
            }
        }
    }
    (String::from_utf8_lossy(&out).into_owned(), stored)
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]
    /// Any byte stream, split at any points, yields the same replies and the same stored
    /// messages as when it arrives in one piece (issue 8 §2).
    #[test]
    fn any_split_same_replies_and_messages(
        body in proptest::collection::vec(
            proptest::sample::select(vec![b'a', b'.', b'\r', b'\n', b' ', 0u8, 0xe9]), 0..300),
        chunk in proptest::collection::vec(0u8..8, 0..3),
        cuts in proptest::collection::vec(0usize..2000, 0..12),
    ) {
        let mut input = b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@local.test>\r\nDATA\r\n".to_vec();
        input.extend_from_slice(&body);
        input.extend_from_slice(b"\r\n.\r\nMAIL FROM:<a@b.test> BODY=BINARYMIME\r\nRCPT TO:<x@local.test>\r\n");
        input.extend_from_slice(format!("BDAT {} LAST\r\n", chunk.len()).as_bytes());
        input.extend_from_slice(&chunk);
        input.extend_from_slice(b"NOOP\r\nQUIT\r\n");
        let whole = drive_split(&input, &[]);
        let split = drive_split(&input, &cuts);
        proptest::prop_assert_eq!(&whole.0, &split.0);
        proptest::prop_assert_eq!(&whole.1, &split.1);
        proptest::prop_assert!(whole.0.ends_with("221 2.0.0 Bye\r\n"));
    }
}

#[test]
fn output_limit_stops_processing_until_replies_are_written() {
    let mut s = session();
    s.set_output_limit(1024);
    // 2,000 pipelined EHLOs would make ~500 KB of replies in one call.
    let mut inbuf = BytesMut::from(&b"EHLO c.test\r\n".repeat(2000)[..]);
    let mut out = BytesMut::new();
    let mut rounds = 0;
    let mut replies = 0;
    loop {
        let ev = s.process(&mut inbuf, &mut out, test_now());
        assert!(matches!(ev, Event::NeedInput | Event::Close));
        // One EHLO reply (~250 octets) at most past the limit.
        assert!(out.len() < 1024 + 512, "{} octets pending", out.len());
        replies += String::from_utf8_lossy(&out).matches("250 ").count();
        out.clear();
        rounds += 1;
        if !s.take_output_full() {
            break;
        }
    }
    assert!(rounds > 10, "{rounds} rounds");
    // The junk-command limit ended the session at the 101st EHLO; nothing was lost
    // before that.
    assert_eq!(replies, MAX_JUNK_COMMANDS as usize);
    assert!(s.is_closed());
}

#[test]
fn junk_commands_are_limited_and_reset_by_an_accepted_message() {
    let mut s = session();
    let noops = b"NOOP\r\n".repeat(MAX_JUNK_COMMANDS as usize - 1);
    let (out, _) = drive(&mut s, &noops);
    assert_eq!(out.matches("250 2.0.0 Ok\r\n").count(), 99);
    // The 100th junk command (EHLO), a message, then 100 more are fine.
    let mut more =
        b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@local.test>\r\nDATA\r\nhi\r\n.\r\n"
            .to_vec();
    more.extend_from_slice(&b"RSET\r\n".repeat(MAX_JUNK_COMMANDS as usize));
    let (out, stored) = drive(&mut s, &more);
    assert_eq!(stored.len(), 1);
    assert!(!out.contains("421"), "{out}");
    assert!(!s.is_closed());
    // The 101st since the message: 421 and close.
    let (out, _) = drive(&mut s, b"NOOP\r\nNOOP\r\n");
    assert_eq!(
        out,
        "421 4.7.0 mx.test Error: too many commands without a message\r\n"
    );
    assert!(s.is_closed());
}

/// A session with AUTH (PLAIN, LOGIN, CRAM-MD5) for user `user` / `pencil`, allowed
/// without TLS.
fn auth_session() -> Session {
    auth_session_with(Rc::new(NoHooks))
}

fn auth_session_with(hooks: Rc<dyn SessionHooks>) -> Session {
    auth_session_full(hooks, false, false, "")
}

/// As `auth_session_with`, with `auth.sender_policy = own` (`own`), the From: check
/// (`header`) and a sender map text.
fn auth_session_full(hooks: Rc<dyn SessionHooks>, own: bool, header: bool, map: &str) -> Session {
    let mut users = UserDb::empty();
    users
        .insert(
            "user",
            "mx.test",
            crate::users::Secrets::derive("user", "mx.test", "pencil", "pencil", b"salt", 16),
        )
        .unwrap();
    let shared = Rc::new(AuthShared {
        users: RefCell::new(Arc::new(users)),
        nonces: RefCell::new(NonceCache::new(64, Duration::from_secs(60))),
        senders: RefCell::new(Arc::new(crate::sender::SenderMap::parse(map).unwrap())),
    });
    let base = cfg();
    let cfg = Rc::new(SessionConfig {
        hostname: base.hostname.clone(),
        kind: base.kind,
        limits: base.limits.clone(),
        tls_available: true,
        policy: RelayPolicy::new(&["local.test".into()], &[]),
        auth: Some(AuthSetup {
            mechanisms: vec![Mechanism::Plain, Mechanism::Login, Mechanism::CramMd5],
            relay_mechanisms: vec![],
            allow_plaintext_without_tls: true,
            allow_authzid: false,
            max_failures: 10,
            tarpit: Duration::ZERO,
            required: false,
            sender_own: own,
            check_header_from: header,
            realm: "mx.test".into(),
            shared,
        }),
        hooks,
        ehlo_cache: Default::default(),
    });
    Session::new(cfg, "192.0.2.7:4000".parse().unwrap(), false, test_now())
}

/// RFC 4954 §4: a line refused with 500 (too long, bare LF/CR, NUL) during an AUTH
/// exchange ends the exchange; the next line is a command, not a SASL response (it used
/// to be read as one: "501 5.5.2 Malformed authentication response" to the NOOP).
#[test]
fn refused_line_ends_auth_exchange() {
    let long = "A".repeat(13_000);
    let lines: [&[u8]; 4] = [
        long.as_bytes(),
        b"dXNlcg\x00==",
        b"dXNl\ncg==",
        b"dXNl\rcg==",
    ];
    for bad in lines {
        for mech in ["LOGIN", "CRAM-MD5"] {
            let mut s = auth_session();
            let mut input = format!("EHLO x\r\nAUTH {mech}\r\n").into_bytes();
            input.extend_from_slice(bad);
            input.extend_from_slice(b"\r\nNOOP\r\nMAIL FROM:<a@b.test>\r\n");
            let (out, _) = drive(&mut s, &input);
            let c = codes(&out);
            assert_eq!(&c[c.len() - 4..], ["334", "500", "250", "250"], "{out}");
            assert!(out.contains("500 5.5.2 "), "{out}");
            assert!(s.authenticated().is_none());
        }
    }
    // The same split across reads, the long line arriving in pieces (discarded as it comes).
    let mut s = auth_session();
    let mut inbuf = BytesMut::new();
    let mut out = BytesMut::new();
    let mut feed = |bytes: &[u8], s: &mut Session| {
        inbuf.extend_from_slice(bytes);
        assert!(matches!(
            s.process(&mut inbuf, &mut out, test_now()),
            Event::NeedInput
        ));
    };
    feed(b"EHLO x\r\nAUTH LOGIN\r\n", &mut s);
    for _ in 0..4 {
        feed(&[b'A'; 8192], &mut s);
    }
    feed(b"\r\nNOOP\r\n", &mut s);
    let text = String::from_utf8_lossy(&out).into_owned();
    assert!(
        text.ends_with("334 VXNlcm5hbWU6\r\n500 5.5.2 Error: line too long\r\n250 2.0.0 Ok\r\n"),
        "{text}"
    );
    // A good exchange still works after a refused one.
    let mut s = auth_session();
    let (out, _) = drive(
        &mut s,
        b"EHLO x\r\nAUTH LOGIN\r\nab\x00\r\nAUTH PLAIN AHVzZXIAcGVuY2ls\r\n",
    );
    assert!(out.ends_with("500 5.5.2 Error: bare <CR> or NUL in command\r\n235 2.7.0 Authentication successful\r\n"), "{out}");
}

/// NUL in a DATA body, or in a BDAT body that is not BINARYMIME, refuses the message: a
/// receiver that drops NULs would read CRLF NUL "." CRLF as the end of data. BINARYMIME
/// may carry any octet.
#[test]
fn nul_in_body_refused_unless_binarymime() {
    let mut s = session();
    let (out, stored) = drive(
        &mut s,
        b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@local.test>\r\nDATA\r\n\
          hello\r\n\x00.\r\nMAIL FROM:<evil@b.test>\r\n.\r\nNOOP\r\n",
    );
    assert!(stored.is_empty());
    assert!(
        out.ends_with("354 End data with <CR><LF>.<CR><LF>\r\n554 5.6.0 Error: NUL in message (RFC 5322 2.3, RFC 6152 2)\r\n250 2.0.0 Ok\r\n"),
        "{out}"
    );
    for body in ["", " BODY=8BITMIME", " BODY=7BIT"] {
        let mut s = session();
        let (out, stored) = drive(
            &mut s,
            format!("EHLO c.test\r\nMAIL FROM:<a@b.test>{body}\r\nRCPT TO:<x@local.test>\r\nBDAT 8 LAST\r\nab\r\n\x00.\r\nNOOP\r\n").as_bytes(),
        );
        assert!(stored.is_empty(), "{body}");
        assert!(out.ends_with("554 5.6.0 Error: NUL in message; only BODY=BINARYMIME may carry it\r\n250 2.0.0 Ok\r\n"), "{out}");
    }
    let mut s = session();
    let (out, stored) = drive(
        &mut s,
        b"EHLO c.test\r\nMAIL FROM:<a@b.test> BODY=BINARYMIME\r\nRCPT TO:<x@local.test>\r\n\
          BDAT 8 LAST\r\nab\r\n\x00.\r\nNOOP\r\n",
    );
    assert_eq!(stored.len(), 1, "{out}");
    assert!(stored[0].ends_with(b"ab\r\n\x00.\r\n"));
}

/// Records what a session reports to its host, and blocks one address.
#[derive(Default)]
struct Recorder {
    events: RefCell<Vec<String>>,
    blocked: Option<std::net::IpAddr>,
    blocked_login: Option<&'static str>,
}

impl SessionHooks for Recorder {
    fn auth_blocked(&self, ip: std::net::IpAddr) -> bool {
        self.blocked == Some(ip)
    }
    fn auth_login_blocked(&self, login: &str) -> bool {
        self.blocked_login == Some(login)
    }
    fn auth_attempt(&self, a: &AuthAttempt<'_>) {
        self.events.borrow_mut().push(format!(
            "auth {} {:?} {:?} {}",
            a.mechanism.name(),
            a.login,
            a.outcome,
            a.failures
        ));
    }
    fn rejected(&self, r: &Rejection<'_>) {
        self.events.borrow_mut().push(format!(
            "reject {} {} {} {} {} from={:?} to={:?} helo={:?}",
            r.why.label(),
            r.stage,
            r.code,
            r.enhanced,
            r.text,
            r.sender,
            r.recipient,
            r.helo
        ));
    }
}

#[test]
fn refusals_and_auth_results_reach_the_hooks() {
    use base64::Engine as _;
    let rec = Rc::new(Recorder::default());
    let mut s = auth_session_with(rec.clone());
    let bad = base64::engine::general_purpose::STANDARD.encode(b"\0user\0wrong");
    let good = base64::engine::general_purpose::STANDARD.encode(b"\0user\0pencil");
    let (out, _) = drive(
        &mut s,
        format!(
            "EHLO c.test\r\nAUTH PLAIN {bad}\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@elsewhere.test>\r\nRSET\r\nAUTH PLAIN {good}\r\nQUIT\r\n"
        )
        .as_bytes(),
    );
    assert!(out.contains("535 5.7.8"), "{out}");
    assert!(out.contains("554 5.7.1"), "{out}");
    assert!(out.contains("235 2.7.0"), "{out}");
    let ev = rec.events.borrow();
    assert_eq!(
        *ev,
        vec![
            "auth PLAIN Some(\"user\") Err(BadCredentials) 1".to_string(),
            "reject relay RCPT 554 5.7.1 <x@elsewhere.test>: Relay access denied from=Some(\"a@b.test\") to=Some(\"x@elsewhere.test\") helo=Some(\"c.test\")".to_string(),
            "auth PLAIN Some(\"user\") Ok(()) 1".to_string(),
        ]
    );
}

#[test]
fn a_blocked_address_is_refused_and_reported() {
    let rec = Rc::new(Recorder {
        blocked: Some("192.0.2.7".parse().unwrap()),
        ..Recorder::default()
    });
    let mut s = auth_session_with(rec.clone());
    let (out, _) = drive(&mut s, b"EHLO c.test\r\nAUTH PLAIN\r\n");
    assert!(out.contains("454 4.7.0"), "{out}");
    assert_eq!(rec.events.borrow().len(), 1);
    assert!(rec.events.borrow()[0].starts_with("reject auth_blocked AUTH 454 4.7.0"));
}

/// A blocked login gets the same 454 with the right password as with a wrong one (no
/// password oracle); the failure still counts; other logins are unaffected.
#[test]
fn a_blocked_login_is_refused_whatever_the_password() {
    use base64::Engine as _;
    let rec = Rc::new(Recorder {
        blocked_login: Some("user"),
        ..Recorder::default()
    });
    let mut s = auth_session_with(rec.clone());
    let bad = base64::engine::general_purpose::STANDARD.encode(b"\0user\0wrong");
    let good = base64::engine::general_purpose::STANDARD.encode(b"\0user\0pencil");
    let (out, _) = drive(
        &mut s,
        format!("EHLO c.test\r\nAUTH PLAIN {bad}\r\nAUTH PLAIN {good}\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@elsewhere.test>\r\n").as_bytes(),
    );
    let lines: Vec<&str> = out.lines().filter(|l| l.starts_with("454")).collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines[0] == lines[1] && lines[0].contains("4.7.0"), "{out}");
    assert!(!out.contains("235") && !out.contains("535"), "{out}");
    // Not authenticated: relaying is refused.
    assert!(out.contains("554 5.7.1"), "{out}");
    let ev = rec.events.borrow();
    assert!(
        ev[0].starts_with("auth PLAIN Some(\"user\") Err("),
        "{ev:?}"
    );
    assert!(
        ev.iter()
            .filter(|e| e.starts_with("reject auth_blocked"))
            .count()
            == 2,
        "{ev:?}"
    );
}

#[test]
fn received_header_uses_the_time_passed_in() {
    let mut s = session();
    let (_, stored) = drive(
        &mut s,
        b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<u@local.test>\r\nDATA\r\nhi\r\n.\r\n",
    );
    let body = String::from_utf8(stored[0].clone()).unwrap();
    assert!(
        body.starts_with("Received: from c.test ([192.0.2.7])\r\n\tby mx.test (tern) with ESMTP id ID\r\n\tfor <u@local.test>;\r\n\tThu, 03 Dec 2026 07:06:00 +0000\r\n"),
        "{body}"
    );
}

/// `auth.sender_policy = own` (Postfix's reject_sender_login_mismatch), for user `user`
/// of realm mx.test, with a map granting one address and one domain.
#[test]
fn sender_policy_own() {
    use base64::Engine as _;
    let login = base64::engine::general_purpose::STANDARD.encode(b"\0user\0pencil");
    let map = "shared@Example.ORG user, other\n@team.test user\n@nobody.test other\n";
    let try_from = |own: bool, auth: bool, from: &str| -> String {
        let mut s = auth_session_full(Rc::new(NoHooks), own, false, map);
        let a = if auth {
            format!("AUTH PLAIN {login}\r\n")
        } else {
            String::new()
        };
        let (out, _) = drive(
            &mut s,
            format!("EHLO c.test\r\n{a}MAIL FROM:<{from}>\r\n").as_bytes(),
        );
        out.lines().last().unwrap_or("").to_string()
    };
    // Owned: login@realm (any case), map entries by address and by domain, and <>.
    for from in [
        "user@mx.test",
        "USER@MX.TEST",
        "shared@example.org",
        "x@team.test",
        "",
    ] {
        assert_eq!(try_from(true, true, from), "250 2.1.0 Ok", "{from:?}");
    }
    // Not owned: another user's address, another domain, a domain granted to someone else.
    for from in ["other@mx.test", "user@elsewhere.test", "x@nobody.test"] {
        assert_eq!(
            try_from(true, true, from),
            format!("553 5.7.1 <{from}>: sender address not owned by user user"),
            "{from:?}"
        );
    }
    // Unauthenticated sessions and the default policy are unaffected.
    assert_eq!(try_from(true, false, "other@mx.test"), "250 2.1.0 Ok");
    assert_eq!(try_from(false, true, "other@mx.test"), "250 2.1.0 Ok");
}

#[test]
fn header_from_check() {
    use base64::Engine as _;
    let login = base64::engine::general_purpose::STANDARD.encode(b"\0user\0pencil");
    let send = |from_header: &str| -> (String, usize) {
        let rec = Rc::new(Recorder::default());
        let mut s = auth_session_full(rec.clone(), false, true, "");
        let (out, stored) = drive(
            &mut s,
            format!(
                "EHLO c.test\r\nAUTH PLAIN {login}\r\nMAIL FROM:<>\r\nRCPT TO:<u@local.test>\r\nDATA\r\n{from_header}Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n"
            )
            .as_bytes(),
        );
        (out, stored.len())
    };
    let (out, n) = send("From: User <user@mx.test>\r\n");
    assert!(out.contains("250 2.0.0 Ok: queued as ID"), "{out}");
    assert_eq!(n, 1);
    let (out, n) = send("From: \"user@mx.test\" <boss@mx.test>\r\n");
    assert!(
        out.contains("550 5.7.1 <boss@mx.test>: sender address not owned by user user"),
        "{out}"
    );
    assert_eq!(n, 0, "a refused message is not stored");
    // A folded From: with a second mailbox that is not owned.
    let (out, n) = send("From: user@mx.test,\r\n\tOther <other@mx.test>\r\n");
    assert!(out.contains("550 5.7.1 <other@mx.test>"), "{out}");
    assert_eq!(n, 0);
}

/// A node that has never had a snapshot of its users (database unreachable since start)
/// answers AUTH with a temporary failure and lets nobody in; once a snapshot arrives the
/// same session authenticates.
#[test]
fn no_snapshot_yet_tempfails_auth() {
    let rec = Rc::new(Recorder::default());
    let mut s = auth_session_with(rec.clone());
    let real = {
        let a = s.cfg.auth.as_ref().unwrap();
        let real = a.shared.users.borrow().clone();
        *a.shared.users.borrow_mut() = Arc::new(UserDb::unavailable());
        real
    };
    // "\0user\0pencil"
    let (out, _) = drive(&mut s, b"EHLO c.test\r\nAUTH PLAIN AHVzZXIAcGVuY2ls\r\n");
    assert!(
        out.contains("454 4.7.0 Temporary authentication failure"),
        "{out}"
    );
    assert!(!out.contains("235"), "{out}");
    *s.cfg.auth.as_ref().unwrap().shared.users.borrow_mut() = real;
    let (out, _) = drive(&mut s, b"AUTH PLAIN AHVzZXIAcGVuY2ls\r\n");
    assert!(out.contains("235 2.7.0"), "{out}");
}

#[test]
fn filtered_commands_wait_for_the_verdict_and_refusals_undo_them() {
    let mut s = session();
    s.filter_commands();
    let mut inbuf = BytesMut::from(
        &b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@local.test>\r\nRCPT TO:<y@local.test>\r\nDATA\r\n"[..],
    );
    let mut out = BytesMut::new();
    // EHLO: no reply until the verdict, and no input consumed meanwhile.
    let Event::Check(Check::Helo(h)) = s.process(&mut inbuf, &mut out, test_now()) else {
        panic!("no HELO check")
    };
    assert_eq!(h, "c.test");
    assert!(out.is_empty());
    let left = inbuf.len();
    assert!(matches!(
        s.process(&mut inbuf, &mut out, test_now()),
        Event::NeedInput
    ));
    assert_eq!(inbuf.len(), left);
    s.checked(None, &mut out);
    assert!(String::from_utf8_lossy(&out).starts_with("250-mx.test"));
    out.clear();
    assert_eq!(
        s.process(&mut inbuf, &mut out, test_now()).check(),
        Some(Check::Mail("a@b.test".into()))
    );
    s.checked(None, &mut out);
    assert_eq!(
        s.process(&mut inbuf, &mut out, test_now()).check(),
        Some(Check::Rcpt("x@local.test".into()))
    );
    s.checked(Some((550, "5.1.1", "No such user")), &mut out);
    assert_eq!(
        s.process(&mut inbuf, &mut out, test_now()).check(),
        Some(Check::Rcpt("y@local.test".into()))
    );
    s.checked(Some((450, "4.7.1", "Later")), &mut out);
    // Both recipients refused: DATA has none.
    assert!(matches!(
        s.process(&mut inbuf, &mut out, test_now()),
        Event::NeedInput
    ));
    assert_eq!(
        String::from_utf8_lossy(&out),
        "250 2.1.0 Ok\r\n550 5.1.1 No such user\r\n450 4.7.1 Later\r\n554 5.5.1 Error: no valid recipients\r\n"
    );
    // A refused MAIL leaves no transaction.
    out.clear();
    let mut inbuf =
        BytesMut::from(&b"RSET\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@local.test>\r\n"[..]);
    assert!(s
        .process(&mut inbuf, &mut out, test_now())
        .check()
        .is_some());
    s.checked(Some((550, "5.7.1", "Go away")), &mut out);
    assert!(!s.in_transaction());
    assert!(matches!(
        s.process(&mut inbuf, &mut out, test_now()),
        Event::NeedInput
    ));
    assert_eq!(
        String::from_utf8_lossy(&out),
        "250 2.0.0 Ok\r\n550 5.7.1 Go away\r\n503 5.5.1 Error: need MAIL command\r\n"
    );
}

impl Event {
    fn check(self) -> Option<Check> {
        match self {
            Event::Check(c) => Some(c),
            _ => None,
        }
    }
}
