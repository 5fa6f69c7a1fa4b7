//! e2e 02: TLS — STARTTLS (RFC 3207) and implicit TLS (RFC 8314) as a client sees them.
//!
//! After STARTTLS the session starts over (no STARTTLS advertised, EHLO required), nothing
//! sent in plaintext after the STARTTLS command may be answered (CVE-2011-0411 class
//! command injection), both TLS 1.2 and 1.3 negotiate, the Received header records ESMTPS,
//! and hostile handshakes on the smtps port do not take the server down.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use tern_tests::{Client, Server, TlsVersion, IO_TIMEOUT};

#[test]
fn starttls_then_ehlo_and_transaction() {
    let s = Server::with(&[]);
    let mut c = s.smtp();
    let kw = c.ehlo("client.test");
    assert!(kw.iter().any(|k| k == "STARTTLS"), "{kw:?}");
    c.starttls(&s.cert(), TlsVersion::Any);
    assert!(c.is_tls());
    // RFC 3207 §4.2: the session is reset; the client must EHLO again.
    c.expect("MAIL FROM:<a@example.com>", 503, "5.5.1");
    let kw = c.ehlo("client.test");
    assert!(
        !kw.iter().any(|k| k == "STARTTLS"),
        "STARTTLS advertised inside TLS: {kw:?}"
    );
    for k in ["PIPELINING", "8BITMIME", "CHUNKING", "SMTPUTF8"] {
        assert!(kw.iter().any(|x| x == k), "{k} missing after TLS: {kw:?}");
    }
    c.expect("STARTTLS", 503, "5.5.1");
    let id = c.send_mail(
        "tls@example.com",
        &["b@demo.test"],
        b"Subject: over tls\r\n\r\nsecret\r\n",
    );
    c.quit();

    let m = s.stored_by_id(&id);
    let (hdr, rest) = m.split_received();
    assert!(hdr.contains(" with ESMTPS id "), "Received: {hdr:?}");
    assert_eq!(rest, b"Subject: over tls\r\n\r\nsecret\r\n");
}

/// Plaintext pipelined behind STARTTLS must be thrown away, never answered in plaintext
/// nor carried into the TLS session.
#[test]
fn starttls_injected_commands_discarded() {
    let s = Server::with(&[]);
    for injected in [
        &b"NOOP\r\n"[..],
        b"MAIL FROM:<evil@example.com>\r\n",
        b"EHLO evil\r\nMAIL FROM:<evil@example.com>\r\nRCPT TO:<b@demo.test>\r\n",
    ] {
        let mut c = s.smtp();
        c.ehlo("client.test");
        let mut wire = b"STARTTLS\r\n".to_vec();
        wire.extend_from_slice(injected);
        c.send(&wire);
        c.read_reply().check(220, "2.0.0 Ready to start TLS");
        // `upgrade` panics if any plaintext reply is pending.
        c.upgrade(&s.cert(), TlsVersion::Any);
        // The first reply over TLS is to our own EHLO, not to anything injected.
        let r = c.cmd("EHLO client.test");
        r.check(250, "localhost");
        assert!(r.lines.len() > 1, "not an EHLO reply: {r}");
        // An injected MAIL did not open a transaction.
        c.expect("MAIL FROM:<good@example.com>", 250, "2.1.0");
        c.expect("RCPT TO:<b@demo.test>", 250, "2.1.5");
        c.expect("DATA", 354, "End data");
        c.send(b"Subject: s\r\n\r\nx\r\n.\r\n");
        c.read_reply().queued_id();
        assert!(c.silent_for(Duration::from_millis(100)));
        c.quit();
    }
    let q = s.queue_list();
    assert_eq!(q.len(), 3, "{q:?}");
    assert!(q.iter().all(|e| e.sender == "good@example.com"), "{q:?}");
}

#[test]
fn implicit_tls_transaction() {
    // AUTH on smtps is covered in e2e_05; here the transport is under test.
    let s = Server::with(&[r#"auth.require_on=["submission"]"#]);
    let mut c = s.smtps();
    assert!(c.is_tls());
    let kw = c.ehlo("client.test");
    assert!(!kw.iter().any(|k| k == "STARTTLS"), "{kw:?}");
    c.expect("STARTTLS", 503, "5.5.1");
    let id = c.send_mail(
        "smtps@example.com",
        &["b@demo.test", "c@localhost"],
        b"Subject: smtps\r\n\r\n.leading dot\r\n",
    );
    c.quit();
    let m = s.stored_by_id(&id);
    assert_eq!(m.recipients, ["b@demo.test", "c@localhost"]);
    let (hdr, rest) = m.split_received();
    assert!(hdr.contains(" with ESMTPS id "), "Received: {hdr:?}");
    assert_eq!(rest, b"Subject: smtps\r\n\r\n.leading dot\r\n");
}

#[test]
fn tls12_and_tls13_negotiate() {
    let s = Server::with(&[]);
    for (v, want) in [
        (TlsVersion::Tls12, rustls::ProtocolVersion::TLSv1_2),
        (TlsVersion::Tls13, rustls::ProtocolVersion::TLSv1_3),
    ] {
        // implicit
        let mut c = Client::connect_tls(s.smtps, &s.cert(), v);
        c.expect_greeting();
        assert_eq!(c.tls_version(), Some(want));
        c.ehlo("client.test");
        c.expect("NOOP", 250, "2.0.0");
        c.quit();
        // STARTTLS
        let mut c = s.smtp();
        c.ehlo("client.test");
        c.starttls(&s.cert(), v);
        assert_eq!(c.tls_version(), Some(want));
        c.ehlo("client.test");
        c.expect("NOOP", 250, "2.0.0");
        c.quit();
    }
}

/// Reads until EOF/reset (closed = true) or timeout (closed = false); returns what arrived.
fn drain(mut t: TcpStream) -> (Vec<u8>, bool) {
    t.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match t.read(&mut buf) {
            Ok(0) => return (all, true),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return (all, false)
            }
            Err(_) => return (all, true),
            Ok(n) => all.extend_from_slice(&buf[..n]),
        }
    }
}

#[test]
fn hostile_handshakes_do_not_kill_the_server() {
    let s = Server::with(&["limits.idle_timeout=2s"]);
    // 1. Not TLS at all.
    let mut t = TcpStream::connect(s.smtps).unwrap();
    t.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let (got, closed) = drain(t);
    assert!(closed, "server kept a non-TLS client open on smtps");
    assert!(
        !got.starts_with(b"220"),
        "plaintext greeting on smtps: {got:?}"
    );
    // 2. A TLS record header promising more than is sent, then close.
    let mut t = TcpStream::connect(s.smtps).unwrap();
    t.write_all(&[
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ])
    .unwrap();
    drop(t);
    // 3. Connect and close at once.
    drop(TcpStream::connect(s.smtps).unwrap());
    // 4. A truncated handshake left hanging (must time out, not wedge a shard).
    let mut hang = TcpStream::connect(s.smtps).unwrap();
    hang.write_all(&[0x16, 0x03, 0x01, 0x00, 0x40]).unwrap();
    // 5. Garbage after STARTTLS on the plain port.
    let mut c = s.smtp();
    c.ehlo("client.test");
    c.expect("STARTTLS", 220, "2.0.0");
    c.send(&[0u8; 300]);
    drop(c);
    // 6. A record of random junk with a valid-looking header.
    let mut t = TcpStream::connect(s.smtps).unwrap();
    let mut junk = vec![0x16, 0x03, 0x03, 0x01, 0x00];
    junk.extend((0..256u32).map(|i| (i * 7 + 3) as u8));
    t.write_all(&junk).unwrap();
    let _ = drain(t);

    // Every shard still serves, on both kinds of listener.
    for _ in 0..6 {
        let mut c = s.smtps();
        c.ehlo("client.test");
        c.quit();
        let mut c = s.smtp();
        c.ehlo("client.test");
        c.quit();
    }
    // The hanging handshake is closed by the server (idle timeout 2s), not kept forever.
    let (got, closed) = drain(hang);
    assert!(closed, "a stalled TLS handshake was never timed out");
    assert!(!got.starts_with(b"220"), "{got:?}");
}

/// SIGHUP picks up a new certificate: the next TLS handshake presents it, while a session
/// opened before keeps working.
#[test]
fn sighup_reloads_the_certificate() {
    // openssl makes the second certificate.
    if !tern_tests::require_tool("openssl") {
        return;
    }
    let s = Server::with(&[r#"auth.require_on=["submission"]"#]);
    let mut before = s.smtps();
    before.ehlo("client.test");
    // A new self-signed pair, written over the demo's files.
    let new_cert = s.dir().join("new-cert.pem");
    let new_key = s.dir().join("new-key.pem");
    let out = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ])
        .args([
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .args(["-days", "2", "-keyout"])
        .arg(&new_key)
        .arg("-out")
        .arg(&new_cert)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::rename(&new_key, s.dir().join("key.pem")).unwrap();
    std::fs::rename(&new_cert, s.dir().join("cert.pem")).unwrap();
    unsafe { libc::kill(s.pid() as i32, libc::SIGHUP) };
    // The harness trusts exactly cert.pem, now the new certificate: a handshake verifies
    // only once the server presents it.
    let mut reloaded = false;
    for _ in 0..50 {
        let r = std::panic::catch_unwind(|| {
            let mut c = Client::connect_tls(s.smtps, &s.cert(), TlsVersion::Any);
            c.expect_greeting();
        });
        if r.is_ok() {
            reloaded = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(reloaded, "the new certificate was never presented");
    before.expect("NOOP", 250, "2.0.0");
}

/// TLS 1.2 resumption works whichever shard a reconnect lands on: tickets are sealed with
/// a key every shard shares, and no shard keeps a session-ID cache of its own (which would
/// resume only clients that happen to come back to the same shard). openssl's `-reconnect`
/// opens the connection six times with one session; with 2 shards, the five reconnects
/// spread over both.
#[test]
fn tls12_tickets_resume_on_every_shard() {
    if !tern_tests::require_tool("openssl") {
        return;
    }
    let s = Server::with(&[]);
    assert_eq!(s.shards, 2);
    let run = |extra: &[&str]| -> (usize, usize) {
        let out = std::process::Command::new("openssl")
            .args(["s_client", "-connect"])
            .arg(s.smtps.to_string())
            .args(["-tls1_2", "-reconnect"])
            .args(extra)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("openssl s_client");
        let text = String::from_utf8_lossy(&out.stdout);
        let count = |p: &str| text.lines().filter(|l| l.starts_with(p)).count();
        (count("New, TLSv1.2"), count("Reused, TLSv1.2"))
    };
    assert_eq!(run(&[]), (1, 5), "every reconnect resumes with a ticket");
    // Without tickets a client falls back to session IDs, which are not issued: every
    // handshake is a full one (this is what makes the first assertion mean something).
    assert_eq!(run(&["-no_ticket"]), (6, 0));
}
