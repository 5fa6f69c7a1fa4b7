//! Security regression suite, in one place, against real `tern demo` processes.
//!
//! - SMTP smuggling (SEC Consult, 2023): every end-of-data look-alike (`\n.\n`, `\n.\r\n`,
//!   `\r.\r\n`, `\r\n.\r`, `\r\n.\n`, `\r\n\0.\r\n`) followed by a smuggled transaction,
//!   and BDAT/DATA mixes. Only CRLF.CRLF ends DATA; the smuggled transaction is never
//!   answered nor stored; the spool and the delivered Maildir file hold no second message.
//! - STARTTLS command injection on the smtp and submission ports (plaintext pipelined
//!   after STARTTLS is discarded), and response injection against tern's own outbound
//!   client (a next hop that pipelines a reply after its 220 to STARTTLS).
//! - AUTH line overflows, base64 garbage, `*` cancel, NUL bytes in commands and in AUTH
//!   data; over-long addresses and parameters; unknown and duplicated MAIL/RCPT parameters.
//! - Header injection: CR, LF, NUL, non-ASCII and parentheses in EHLO names, addresses, AUTH
//!   identities, MAIL AUTH= and ENVID: the Received: header and the stored and delivered
//!   bytes never carry an unescaped CR or LF from the client.
//!
//! Every refusal is checked by exact reply code and enhanced status code, and followed by
//! a marker command (VRFY, the only 252) to show that nothing else was answered in between.
//! The older suites (e2e_01, e2e_02, e2e_05) keep their own cases; this file duplicates the
//! end-to-end ones so that the whole attack surface is reviewed here.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use tern_smtp::sasl::client;
use tern_tests::{find, maildir, wait_for, Client, Server, TlsVersion};

/// The next reply after a step must be this one's (252 is unique to VRFY).
const MARKER: &str = "VRFY marker";

#[track_caller]
fn marker(c: &mut Client) {
    c.expect(MARKER, 252, "2.5.2");
}

/// A Maildir route for the demo (the harness's default route is a closed port).
fn maildir_route(dir: &Path) -> String {
    format!(
        r#"queue.routes={{"*"="maildir:{}/maildir"}}"#,
        dir.display()
    )
}

/// A CRAM-MD5 login as the demo user (allowed without TLS on submission).
fn cram_login(c: &mut Client) {
    let r = c.cmd("AUTH CRAM-MD5");
    r.check(334, "");
    let challenge = B64.decode(r.text().trim()).expect("base64 challenge");
    let resp = client::cram_md5("demo", "demo", &challenge);
    c.expect(&B64.encode(resp), 235, "2.7.0");
}

fn submission(s: &Server) -> Client {
    let mut c = Client::connect(s.submission);
    c.expect_greeting();
    c.ehlo("client.test");
    c
}

/// Every CR is followed by LF, every LF follows a CR, and (inside a header block) every
/// line after the first is folded: client bytes cannot start a header of their own.
#[track_caller]
fn assert_header_safe(what: &str, h: &[u8]) {
    for (i, &b) in h.iter().enumerate() {
        match b {
            b'\r' => assert_eq!(h.get(i + 1), Some(&b'\n'), "bare CR in {what}: {h:?}"),
            b'\n' => {
                assert!(i > 0 && h[i - 1] == b'\r', "bare LF in {what}: {h:?}");
                if i + 1 < h.len() {
                    assert!(
                        matches!(h[i + 1], b'\t' | b' '),
                        "unfolded line in {what}: {:?}",
                        String::from_utf8_lossy(h)
                    );
                }
            }
            b'\t' | 0x20..=0x7e => {}
            _ => panic!("byte {b:#04x} in {what}: {:?}", String::from_utf8_lossy(h)),
        }
    }
}

/// The header block of a delivered message (Return-Path:, Delivered-To:, Received:, the
/// client's headers): LF line ends only (a maildir(5) file), no CR or NUL left in a line,
/// every line a header field or a continuation. UTF-8 (SMTPUTF8 addresses) is allowed.
#[track_caller]
fn assert_header_block_safe(content: &str) {
    let head = &content[..content.find("\n\n").expect("header block") + 1];
    for line in head.split('\n').filter(|l| !l.is_empty()) {
        assert!(!line.contains(['\r', '\n', '\0']), "{line:?} in {head:?}");
        let field = line.split(':').next().unwrap();
        assert!(
            line.starts_with(['\t', ' '])
                || (!field.is_empty() && field.bytes().all(|b| b.is_ascii_graphic())),
            "{line:?} in {head:?}"
        );
    }
    assert!(content.contains("\nReceived: from "), "{head:?}");
}

// ---------------------------------------------------------------------------------------
// SMTP smuggling
// ---------------------------------------------------------------------------------------

const SMUGGLED: &[u8] = b"MAIL FROM:<smuggled@example.com>\r\nRCPT TO:<victim@demo.test>\r\n\
DATA\r\nFrom: smuggled@example.com\r\nSubject: smuggled\r\n\r\nevil\r\n";

/// Each fake end of data, followed by a smuggled transaction and then the real CRLF.CRLF.
/// Bare CR/LF and NUL make the whole message a `554 5.6.0`, answered once, after the real
/// end; nothing smuggled is answered or stored.
#[test]
fn smuggling_fake_ends_of_data_are_body_and_refused() {
    let s = Server::with(&[]);
    let mut c = s.smtp();
    c.ehlo("client.test");
    let fakes: [&[u8]; 8] = [
        b"\n.\n",
        b"\n.\r\n",
        b"\r.\r\n",
        b"\r\n.\r",
        b"\r\n.\n",
        b"\r\n\x00.\r\n",
        b"\r\n.\x00\r\n",
        b"\r\n\x00.\x00\r\n",
    ];
    for fake in fakes {
        c.expect("MAIL FROM:<outer@example.com>", 250, "2.1.0");
        c.expect("RCPT TO:<outer@demo.test>", 250, "2.1.5");
        c.expect("DATA", 354, "End data");
        let mut wire = b"Subject: outer\r\n\r\nhello".to_vec();
        wire.extend_from_slice(fake);
        wire.extend_from_slice(SMUGGLED);
        wire.extend_from_slice(b".\r\n");
        c.send(&wire);
        let r = c.read_reply();
        r.check(554, "5.6.0");
        marker(&mut c);
        assert!(
            c.silent_for(Duration::from_millis(100)),
            "extra reply after {fake:?}"
        );
    }
    c.quit();
    assert!(s.stored().is_empty(), "nothing may be stored");
}

/// Control for the test above: the same bytes with a real CRLF.CRLF first are two
/// transactions, so the refusals above are not for some unrelated reason.
#[test]
fn smuggling_control_real_end_then_second_transaction() {
    let s = Server::with(&[]);
    let mut c = s.smtp();
    c.ehlo("client.test");
    c.expect("MAIL FROM:<outer@example.com>", 250, "2.1.0");
    c.expect("RCPT TO:<outer@demo.test>", 250, "2.1.5");
    c.expect("DATA", 354, "End data");
    let mut wire = b"Subject: outer\r\n\r\nhello\r\n.\r\n".to_vec();
    wire.extend_from_slice(SMUGGLED);
    wire.extend_from_slice(b".\r\n");
    c.send(&wire);
    c.read_reply().queued_id();
    c.read_reply().check(250, "2.1.0");
    c.read_reply().check(250, "2.1.5");
    c.read_reply().check(354, "End data");
    c.read_reply().queued_id();
    c.quit();
    assert_eq!(s.stored().len(), 2);
}

/// BDAT counts octets: a fake end of data and a whole transaction inside a chunk are
/// body bytes. The message is stored once, byte-exact, and delivered as one Maildir file.
#[test]
fn smuggling_inside_bdat_chunks_is_body() {
    let d = tempfile::tempdir().unwrap();
    let route = maildir_route(d.path());
    let s = Server::with(&[&route]);
    let mut c = s.smtp();
    c.ehlo("client.test");
    c.expect(
        "MAIL FROM:<outer@example.com> BODY=BINARYMIME",
        250,
        "2.1.0",
    );
    c.expect("RCPT TO:<outer@demo.test>", 250, "2.1.5");
    let mut chunk1 = b"Subject: outer\r\n\r\nhello\r\n.\r\n".to_vec();
    chunk1.extend_from_slice(SMUGGLED);
    chunk1.extend_from_slice(b".\r\n");
    let chunk2 = b"\n.\nQUIT\r\n\r\n.\r\n".to_vec();
    let mut wire = format!("BDAT {}\r\n", chunk1.len()).into_bytes();
    wire.extend_from_slice(&chunk1);
    c.send(&wire);
    c.read_reply()
        .check(250, &format!("2.0.0 Ok: {} octets received", chunk1.len()));
    let mut wire = format!("BDAT {} LAST\r\n", chunk2.len()).into_bytes();
    wire.extend_from_slice(&chunk2);
    c.send(&wire);
    let id = c.read_reply().queued_id();
    marker(&mut c);
    assert!(c.silent_for(Duration::from_millis(100)));
    c.quit();
    let stored = s.stored();
    assert_eq!(stored.len(), 1);
    let mut whole = chunk1.clone();
    whole.extend_from_slice(&chunk2);
    assert_eq!(stored[0].id, id);
    assert_eq!(stored[0].sender, "outer@example.com");
    assert_eq!(stored[0].content(), &whole[..]);
    // Maildir delivery is done before the spool records it: an empty queue means every
    // file there is to be is there.
    wait_for("delivery", Duration::from_secs(30), || {
        s.queue_list().is_empty()
    });
    let files = maildir(d.path());
    assert_eq!(files.len(), 1, "one Maildir file: {files:?}");
    assert_eq!(files[0].1.matches("Received: from").count(), 1);
    assert_eq!(files[0].1.matches("Return-Path:").count(), 1);
}

/// A NUL-dot line inside a BDAT chunk cannot end the data here, but a 7bit/8BITMIME body
/// may be relayed later with DATA to a receiver that drops NULs: refused (554 5.6.0)
/// unless BODY=BINARYMIME, which can only be relayed with BDAT.
#[test]
fn smuggling_nul_dot_in_bdat_refused_unless_binarymime() {
    let s = Server::with(&[]);
    let mut c = s.smtp();
    c.ehlo("client.test");
    let mut chunk = b"Subject: outer\r\n\r\nhello\r\n\x00.\r\n".to_vec();
    chunk.extend_from_slice(SMUGGLED);
    for body in ["", " BODY=8BITMIME", " BODY=BINARYMIME"] {
        c.expect(
            &format!("MAIL FROM:<outer@example.com>{body}"),
            250,
            "2.1.0",
        );
        c.expect("RCPT TO:<outer@demo.test>", 250, "2.1.5");
        let mut wire = format!("BDAT {} LAST\r\n", chunk.len()).into_bytes();
        wire.extend_from_slice(&chunk);
        c.send(&wire);
        let r = c.read_reply();
        if body.contains("BINARYMIME") {
            r.queued_id();
        } else {
            r.check(554, "5.6.0");
        }
        marker(&mut c);
    }
    c.quit();
    let stored = s.stored();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].content(), &chunk[..]);
}

/// DATA and BDAT mixed in one transaction: after BDAT, DATA is refused (503 5.5.1) and
/// the lines that follow are commands of the still-open transaction, never a body; with
/// BODY=BINARYMIME, DATA is refused too. Nothing is stored from either.
#[test]
fn smuggling_bdat_data_mixes() {
    let s = Server::with(&[]);
    let mut c = s.smtp();
    c.ehlo("client.test");
    c.expect("MAIL FROM:<outer@example.com>", 250, "2.1.0");
    c.expect("RCPT TO:<outer@demo.test>", 250, "2.1.5");
    c.send(b"BDAT 7\r\nhello\r\n");
    c.read_reply().check(250, "2.0.0 Ok: 7 octets received");
    c.send(b"DATA\r\nMAIL FROM:<smuggled@example.com>\r\n.\r\n");
    c.read_reply().check(503, "5.5.1");
    c.read_reply().check(503, "5.5.1"); // nested MAIL: the outer transaction is open
    c.read_reply().check(500, "5.5.1"); // "." is not a command
    marker(&mut c);
    c.expect("RSET", 250, "2.0.0");
    c.expect(
        "MAIL FROM:<outer@example.com> BODY=BINARYMIME",
        250,
        "2.1.0",
    );
    c.expect("RCPT TO:<outer@demo.test>", 250, "2.1.5");
    c.send(b"DATA\r\nMAIL FROM:<smuggled@example.com>\r\n.\r\n");
    c.read_reply().check(503, "5.5.1"); // BODY=BINARYMIME requires BDAT
    c.read_reply().check(503, "5.5.1");
    c.read_reply().check(500, "5.5.1");
    marker(&mut c);
    c.quit();
    assert!(s.stored().is_empty());
}

// ---------------------------------------------------------------------------------------
// STARTTLS injection
// ---------------------------------------------------------------------------------------

/// Plaintext pipelined behind STARTTLS is thrown away, on port 25 and on submission: never
/// answered in plaintext, never carried into the TLS session.
#[test]
fn starttls_command_injection_discarded_smtp_and_submission() {
    let s = Server::with(&[]);
    for addr in [s.smtp, s.submission] {
        for injected in [
            &b"NOOP\r\n"[..],
            b"MAIL FROM:<evil@example.com>\r\nRCPT TO:<b@demo.test>\r\n",
            b"AUTH PLAIN AGRlbW8AZGVtbw==\r\n",
            b"EHLO evil\r\nQUIT\r\n",
        ] {
            let mut c = Client::connect(addr);
            c.expect_greeting();
            c.ehlo("client.test");
            let mut wire = b"STARTTLS\r\n".to_vec();
            wire.extend_from_slice(injected);
            c.send(&wire);
            c.read_reply().check(220, "2.0.0 Ready to start TLS");
            // `upgrade` panics if any plaintext reply is pending.
            c.upgrade(&s.cert(), TlsVersion::Any);
            // The injected AUTH did not authenticate, the injected MAIL opened nothing,
            // the injected QUIT closed nothing.
            marker(&mut c);
            if addr == s.submission {
                c.expect("MAIL FROM:<good@example.com>", 503, "5.5.1"); // no EHLO yet
                c.ehlo("client.test");
                c.expect("MAIL FROM:<good@example.com>", 530, "5.7.0");
            } else {
                c.expect("RCPT TO:<b@demo.test>", 503, "5.5.1");
            }
            assert!(c.silent_for(Duration::from_millis(100)));
            c.quit();
        }
    }
    assert!(s.stored().is_empty());
}

/// A fake next hop that offers STARTTLS and pipelines a reply behind its 220: tern's
/// outbound client must not start TLS or send anything else (CVE-2011-0411, client side);
/// the message stays queued.
#[test]
fn starttls_response_injection_refused_by_outbound_client() {
    let hop = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = hop.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        // One connection is enough; later retries find the listener closed.
        let Ok((sock, _)) = hop.accept() else { return };
        sock.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut w = sock.try_clone().unwrap();
        let mut r = BufReader::new(sock);
        let mut line = String::new();
        let _ = w.write_all(b"220 hop.test ESMTP\r\n");
        let _ = r.read_line(&mut line); // EHLO
        let _ = w.write_all(b"250-hop.test\r\n250 STARTTLS\r\n");
        line.clear();
        let _ = r.read_line(&mut line); // STARTTLS
        let _ = w.write_all(b"220 2.0.0 go ahead\r\n250 2.1.0 injected\r\n");
        let mut after = Vec::new();
        let _ = r.read_to_end(&mut after);
        let _ = tx.send([line.into_bytes(), after].concat());
    });
    let route = format!(r#"queue.routes={{"*"="smtp:[127.0.0.1]:{port}"}}"#);
    let s = Server::with(&[&route]);
    let mut c = s.smtp();
    c.ehlo("client.test");
    let id = c.send_mail(
        "a@example.com",
        &["b@demo.test"],
        b"Subject: x\r\n\r\nx\r\n",
    );
    c.quit();
    let seen = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the relay connected to the next hop");
    assert!(seen.starts_with(b"STARTTLS\r\n"), "{seen:?}");
    let after = &seen[b"STARTTLS\r\n".len()..];
    assert!(
        after.is_empty() || after == b"QUIT\r\n",
        "the client must send nothing (or only QUIT) after an injected reply, sent {:?}",
        String::from_utf8_lossy(after)
    );
    assert!(!after.starts_with(&[0x16]), "a TLS handshake was started");
    wait_for("the failure logged", Duration::from_secs(10), || {
        s.stderr_log()
            .contains("server sent data after its 220 to STARTTLS")
    });
    let q = s.queue_list();
    assert_eq!(q.len(), 1, "{q:?}");
    assert_eq!(q[0].id, id);
}

// ---------------------------------------------------------------------------------------
// AUTH framing, NUL bytes
// ---------------------------------------------------------------------------------------

#[test]
fn auth_line_overflow_garbage_and_cancel() {
    let s = Server::with(&["auth.tarpit=1ms", "auth.max_failures=20"]);
    let mut c = submission(&s);
    // An initial response longer than 12288 octets: 500 5.5.2, nothing else.
    let long = "A".repeat(12_300);
    c.expect(&format!("AUTH CRAM-MD5 {long}"), 500, "5.5.2");
    marker(&mut c);
    // A continuation line longer than 12288 octets, and a 1 MB one: refused, and the
    // exchange is over (the next line is a command again).
    for n in [12_289, 1 << 20] {
        c.expect("AUTH CRAM-MD5", 334, "");
        let mut wire = vec![b'A'; n];
        wire.extend_from_slice(b"\r\n");
        c.send(&wire);
        c.read_reply().check(500, "5.5.2");
        marker(&mut c);
    }
    // Base64 garbage: in the initial response and in a continuation.
    c.expect("AUTH CRAM-MD5 !!!notbase64", 501, "5.5.2");
    c.expect("AUTH CRAM-MD5 QUJD", 501, "5.5.2"); // CRAM-MD5 takes no initial response
    marker(&mut c);
    c.expect("AUTH CRAM-MD5", 334, "");
    c.expect("%%%", 501, "5.5.2");
    marker(&mut c);
    // "*" cancels.
    c.expect("AUTH CRAM-MD5", 334, "");
    c.expect("*", 501, "5.0.0");
    marker(&mut c);
    c.expect("AUTH DIGEST-MD5", 334, "");
    c.expect("*", 501, "5.0.0");
    marker(&mut c);
    // Still not authenticated after all that.
    c.expect("MAIL FROM:<a@example.com>", 530, "5.7.0");
    cram_login(&mut c);
    c.expect("MAIL FROM:<demo@localhost>", 250, "2.1.0");
    c.quit();
}

#[test]
fn nul_bytes_in_commands_and_auth_data() {
    let s = Server::with(&["auth.tarpit=1ms", "auth.max_failures=20"]);
    let mut c = s.smtp();
    for line in [
        &b"EHLO client\x00.test\r\n"[..],
        b"NOOP\x00\r\n",
        b"\x00EHLO client.test\r\n",
    ] {
        c.send(line);
        c.read_reply().check(500, "5.5.2");
    }
    c.ehlo("client.test");
    for line in [
        &b"MAIL FROM:<a\x00b@example.com>\r\n"[..],
        b"MAIL FROM:<a@example.com>\x00 SIZE=10\r\n",
    ] {
        c.send(line);
        c.read_reply().check(500, "5.5.2");
        marker(&mut c);
    }
    c.expect("MAIL FROM:<a@example.com>", 250, "2.1.0");
    c.send(b"RCPT TO:<b\x00@demo.test>\r\n");
    c.read_reply().check(500, "5.5.2");
    c.expect("DATA", 503, "5.5.1"); // need RCPT: the NUL line was never a RCPT
    c.quit();

    // In AUTH: a raw NUL in the line; NULs inside base64 are PLAIN's separators, and
    // extra ones make the message malformed.
    let mut t = s.smtps();
    t.ehlo("client.test");
    t.send(b"AUTH PLAIN \x00demo\x00demo\r\n");
    t.read_reply().check(500, "5.5.2");
    t.expect("AUTH PLAIN", 334, "");
    t.send(b"AGRlbW8A\x00ZGVtbw==\r\n");
    t.read_reply().check(500, "5.5.2");
    marker(&mut t);
    for msg in [
        &b"\x00demo\x00demo\x00"[..],
        b"\x00\x00demo\x00demo",
        b"\x00demo\x00de\x00mo",
        b"\x00demo",
    ] {
        t.expect(&format!("AUTH PLAIN {}", B64.encode(msg)), 501, "5.5.2");
    }
    t.expect("MAIL FROM:<a@example.com>", 530, "5.7.0");
    t.expect(
        &format!("AUTH PLAIN {}", B64.encode(b"\x00demo\x00demo")),
        235,
        "2.7.0",
    );
    t.quit();
    assert!(s.stored().is_empty());
}

// ---------------------------------------------------------------------------------------
// Over-long addresses and parameters, unknown and duplicated parameters
// ---------------------------------------------------------------------------------------

#[test]
fn overlong_addresses_and_parameters() {
    let s = Server::with(&["limits.command_line=2048", "limits.errors=100"]);
    let mut c = s.smtp();
    c.ehlo("client.test");
    let l64 = "l".repeat(64);
    let l65 = "l".repeat(65);
    let label = "d".repeat(63);
    // 4 labels of 63 + 3 dots = 255; one more octet is 256.
    let d255 = format!("{label}.{label}.{label}.{}", "d".repeat(63));
    let d256 = format!("{label}.{label}.{label}.{}", "d".repeat(64));
    let d256b = format!("{label}.{label}.{label}.{label}.x");
    assert_eq!(d255.len(), 255);
    // Local part: 64 is the limit.
    c.expect(&format!("MAIL FROM:<{l64}@example.com>"), 250, "2.1.0");
    c.expect("RSET", 250, "2.0.0");
    c.expect(&format!("MAIL FROM:<{l65}@example.com>"), 501, "5.1.7");
    c.expect("MAIL FROM:<a@example.com>", 250, "2.1.0");
    c.expect(&format!("RCPT TO:<{l65}@demo.test>"), 501, "5.1.3");
    // Domain: a label over 63, a domain over 255.
    c.expect(
        &format!("RCPT TO:<a@{}.test>", "d".repeat(64)),
        501,
        "5.1.3",
    );
    c.expect(&format!("RCPT TO:<a@{d256}>"), 501, "5.1.3");
    c.expect(&format!("RCPT TO:<a@{d256b}>"), 501, "5.1.3");
    c.expect("RSET", 250, "2.0.0");
    c.expect(&format!("MAIL FROM:<a@{d256}>"), 501, "5.1.7");
    // Path: over 256 octets even with a valid local part and domain.
    let long_path = format!("{l64}@{}", &d255[..200]);
    assert!(long_path.len() > 256 - 64);
    let p257 = format!("{l64}@{label}.{label}.{label}.{}", "d".repeat(4));
    assert!(p257.len() > 256 && p257.len() < 300, "{}", p257.len());
    c.expect(&format!("MAIL FROM:<{p257}>"), 501, "5.1.7");
    // Parameters: ENVID over 100, AUTH= over 500, ORCPT over 500, SIZE over 19 digits.
    c.expect(
        &format!("MAIL FROM:<a@example.com> ENVID={}", "e".repeat(101)),
        501,
        "5.5.4",
    );
    c.expect(
        &format!("MAIL FROM:<a@example.com> AUTH={}", "a".repeat(501)),
        501,
        "5.5.4",
    );
    c.expect(
        "MAIL FROM:<a@example.com> SIZE=99999999999999999999",
        501,
        "5.5.4",
    );
    c.expect("MAIL FROM:<a@example.com>", 250, "2.1.0");
    c.expect(
        &format!("RCPT TO:<b@demo.test> ORCPT=rfc822;{}", "o".repeat(500)),
        501,
        "5.5.4",
    );
    // Unknown and duplicated parameters.
    c.expect("RCPT TO:<b@demo.test> FOO=bar", 555, "5.5.4");
    c.expect(
        "RCPT TO:<b@demo.test> NOTIFY=NEVER NOTIFY=SUCCESS",
        501,
        "5.5.4",
    );
    c.expect(
        "RCPT TO:<b@demo.test> ORCPT=rfc822;a@b ORCPT=rfc822;c@d",
        501,
        "5.5.4",
    );
    c.expect("RSET", 250, "2.0.0");
    for (line, code, enh) in [
        ("MAIL FROM:<a@example.com> FOO=bar", 555, "5.5.4"),
        ("MAIL FROM:<a@example.com> XFORWARD", 555, "5.5.4"),
        ("MAIL FROM:<a@example.com> SIZE=1 SIZE=2", 501, "5.5.4"),
        (
            "MAIL FROM:<a@example.com> BODY=7BIT BODY=8BITMIME",
            501,
            "5.5.4",
        ),
        ("MAIL FROM:<a@example.com> SMTPUTF8 SMTPUTF8", 501, "5.5.4"),
        ("MAIL FROM:<a@example.com> RET=FULL RET=HDRS", 501, "5.5.4"),
        ("MAIL FROM:<a@example.com> ENVID=a ENVID=b", 501, "5.5.4"),
        ("MAIL FROM:<a@example.com> AUTH=<> AUTH=<>", 501, "5.5.4"),
        ("MAIL FROM:<a@example.com> SIZE", 501, "5.5.4"),
        ("MAIL FROM:<a@example.com> SMTPUTF8=yes", 501, "5.5.4"),
    ] {
        c.expect(line, code, enh);
        marker(&mut c);
    }
    // A command line over the limit: 500 5.5.2.
    c.expect(
        &format!("MAIL FROM:<a@example.com> ENVID={}", "e".repeat(2100)),
        500,
        "5.5.2",
    );
    // None of it opened a transaction.
    c.expect("RCPT TO:<b@demo.test>", 503, "5.5.1");
    c.quit();
}

// ---------------------------------------------------------------------------------------
// Header injection
// ---------------------------------------------------------------------------------------

/// CR, LF, NUL in an EHLO name are refused as a line (500 5.5.2); non-ASCII, parentheses
/// and other header-significant characters are accepted but reach the Received: header
/// only as '?'. Checked in the spool and in the delivered Maildir file.
#[test]
fn header_injection_via_ehlo_name() {
    let d = tempfile::tempdir().unwrap();
    let route = maildir_route(d.path());
    let s = Server::with(&[&route]);
    let mut c = s.smtp();
    for line in [
        &b"EHLO evil\rX-Injected: cr\r\n"[..],
        b"EHLO evil\nX-Injected: lf\r\n",
        b"EHLO evil\r\nX-Injected: crlf\r\n", // the second line is a bad command
        b"EHLO evil\x00X-Injected: nul\r\n",
    ] {
        c.send(line);
        let r = c.read_reply();
        if line.starts_with(b"EHLO evil\r\n") {
            r.check(250, "localhost");
            c.read_reply().check(500, "5.5.1");
        } else {
            r.check(500, "5.5.2");
        }
    }
    let mut ids = Vec::new();
    for name in [
        "évil.test",
        "evil(comment)test",
        "a;by=evil.test",
        "x\u{85}y",
        "x\u{2028}y",
    ] {
        c.expect(&format!("EHLO {name}"), 250, "localhost");
        ids.push(c.send_mail(
            "a@example.com",
            &["b@demo.test"],
            b"Subject: x\r\n\r\nx\r\n",
        ));
    }
    c.quit();
    let stored = s.stored();
    assert_eq!(stored.len(), ids.len());
    for m in &stored {
        let (hdr, rest) = m.split_received();
        assert_header_safe("Received:", hdr.as_bytes());
        assert!(hdr.starts_with("Received: from "), "{hdr}");
        assert!(!hdr.contains('(') || hdr.contains(" (tern) "), "{hdr}");
        let from = &hdr["Received: from ".len()..hdr.find(" ([").unwrap()];
        assert!(
            from.bytes()
                .all(|b| b.is_ascii_graphic() && b != b'(' && b != b')'),
            "{from:?}"
        );
        assert_eq!(rest, b"Subject: x\r\n\r\nx\r\n");
        assert!(find(&m.body, b"X-Injected").is_none());
    }
    wait_for("delivery", Duration::from_secs(30), || {
        maildir(d.path()).len() == ids.len()
    });
    for (_, content) in maildir(d.path()) {
        assert_header_block_safe(&content);
        assert!(!content.contains("X-Injected"));
    }
}

/// Addresses: CR/LF/NUL never get into a command (500 5.5.2); non-ASCII without SMTPUTF8
/// is refused (553 5.6.7); quoted local parts with controls are refused (501 5.1.7 /
/// 5.1.3). What is accepted lands in Return-Path:/Delivered-To:/Received: without CR/LF.
#[test]
fn header_injection_via_addresses() {
    let d = tempfile::tempdir().unwrap();
    let route = maildir_route(d.path());
    let s = Server::with(&[&route]);
    let mut c = s.smtp();
    c.ehlo("client.test");
    for line in [
        &b"MAIL FROM:<a\r\nX-Injected: 1@example.com>\r\n"[..],
        b"MAIL FROM:<\"a\rX-Injected: 1\"@example.com>\r\n",
        b"MAIL FROM:<\"a\nX-Injected: 1\"@example.com>\r\n",
        b"MAIL FROM:<\"a\\\rX\"@example.com>\r\n",
    ] {
        c.send(line);
        // A CRLF inside splits the line: the first half lacks its '>', the second is an
        // unknown command.
        let r = c.read_reply();
        if find(line, b"\r\n").unwrap() < line.len() - 2 {
            r.check(501, "5.5.2");
            c.read_reply().check(500, "5.5.1");
        } else {
            r.check(500, "5.5.2");
        }
        marker(&mut c);
    }
    c.expect("MAIL FROM:<\"a\\\u{1}b\"@example.com>", 501, "5.1.7");
    c.expect("MAIL FROM:<\"a\u{7f}b\"@example.com>", 501, "5.1.7");
    c.expect("MAIL FROM:<évil@example.com>", 553, "5.6.7");
    c.expect("MAIL FROM:<a@example.com>", 250, "2.1.0");
    c.expect("RCPT TO:<\"b\\\u{1}\"@demo.test>", 501, "5.1.3");
    c.expect("RCPT TO:<évil@demo.test>", 553, "5.6.7");
    c.expect("RCPT TO:<\"b (x) ;\"@demo.test>", 250, "2.1.5");
    c.expect("DATA", 354, "End data");
    c.send(b"Subject: x\r\n\r\nx\r\n.\r\n");
    c.read_reply().queued_id();
    // SMTPUTF8: non-ASCII is fine, CR/LF still impossible.
    c.expect("MAIL FROM:<\u{e9}v@example.com> SMTPUTF8", 250, "2.1.0");
    c.expect("RCPT TO:<\u{e9}v\u{2028}x@demo.test>", 250, "2.1.5");
    c.expect("DATA", 354, "End data");
    c.send(b"Subject: y\r\n\r\ny\r\n.\r\n");
    c.read_reply().queued_id();
    c.quit();
    let stored = s.stored();
    assert_eq!(stored.len(), 2);
    for m in &stored {
        let (hdr, _) = m.split_received();
        assert_header_safe("Received:", hdr.as_bytes());
        assert!(!m.sender.contains(['\r', '\n', '\0']));
        assert!(m.recipients.iter().all(|r| !r.contains(['\r', '\n', '\0'])));
    }
    wait_for("delivery", Duration::from_secs(30), || {
        maildir(d.path()).len() == 2
    });
    for (_, content) in maildir(d.path()) {
        assert_header_block_safe(&content);
        assert!(!content.contains("X-Injected"));
    }
}

/// AUTH identities with CR/LF/NUL never authenticate (535 5.7.8, the same as a wrong
/// password), and MAIL AUTH= / ENVID= whose xtext decodes to CR, LF or NUL are refused
/// (501 5.5.4): an authenticated client cannot put a line break into the stored envelope.
#[test]
fn header_injection_via_auth_identities_and_xtext() {
    let s = Server::with(&["auth.tarpit=1ms", "auth.max_failures=20"]);
    let mut t = s.smtps();
    t.ehlo("client.test");
    // A CR/LF in the authcid is an unknown user; in the authzid (with the right
    // password) a foreign authzid: both 535 5.7.8, like any wrong password. A NUL inside
    // the password is a malformed PLAIN message: 501 5.5.2.
    for (msg, code, enh) in [
        (&b"\x00demo\r\nX-Injected: 1\x00demo"[..], 535, "5.7.8"),
        (b"demo\r\nX-Injected: 1\x00demo\x00demo", 535, "5.7.8"),
        (b"demo\nx\x00demo\x00demo", 535, "5.7.8"),
        (b"demo\rx\x00demo\x00demo", 535, "5.7.8"),
        (b"\x00demo\x00\x00demo", 501, "5.5.2"),
    ] {
        t.expect(&format!("AUTH PLAIN {}", B64.encode(msg)), code, enh);
    }
    t.expect("AUTH LOGIN", 334, "");
    t.expect(&B64.encode(b"demo\r\nX-Injected: 1"), 334, "");
    t.expect(&B64.encode(b"demo"), 535, "5.7.8");
    t.quit();

    let mut c = submission(&s);
    cram_login(&mut c);
    for (line, code, enh) in [
        (
            "MAIL FROM:<a@example.com> AUTH=x+0D+0AX-Injected:+201",
            501,
            "5.5.4",
        ),
        ("MAIL FROM:<a@example.com> AUTH=x+0Ay", 501, "5.5.4"),
        ("MAIL FROM:<a@example.com> AUTH=x+0Dy", 501, "5.5.4"),
        ("MAIL FROM:<a@example.com> AUTH=x+00y", 501, "5.5.4"),
        (
            "MAIL FROM:<a@example.com> ENVID=x+0D+0AX-Injected:+201",
            501,
            "5.5.4",
        ),
        ("MAIL FROM:<a@example.com> ENVID=x+00y", 501, "5.5.4"),
        ("MAIL FROM:<a@example.com> AUTH=x+0", 501, "5.5.4"),
        ("MAIL FROM:<a@example.com> AUTH=x\u{e9}", 501, "5.5.4"),
    ] {
        c.expect(line, code, enh);
        marker(&mut c);
    }
    c.expect(
        "MAIL FROM:<demo@localhost> AUTH=demo+2Bx@localhost ENVID=abc+2Bdef",
        250,
        "2.1.0",
    );
    c.expect(
        "RCPT TO:<b@demo.test> ORCPT=rfc822;b+0D+0A@demo.test",
        501,
        "5.5.4",
    );
    c.expect("RCPT TO:<b@demo.test>", 250, "2.1.5");
    c.expect("DATA", 354, "End data");
    c.send(b"Subject: x\r\n\r\nx\r\n.\r\n");
    let id = c.read_reply().queued_id();
    c.quit();

    let msgs = tern_queue::scan_spool(&s.spool()).expect("scan_spool");
    assert_eq!(msgs.len(), 1);
    let e = &msgs[0].envelope;
    assert_eq!(e.id, id);
    assert_eq!(e.auth.as_deref(), Some("demo+x@localhost"));
    assert_eq!(e.envid.as_deref(), Some("abc+def"));
    let m = s.stored_by_id(&id);
    let (hdr, _) = m.split_received();
    assert_header_safe("Received:", hdr.as_bytes());
}
