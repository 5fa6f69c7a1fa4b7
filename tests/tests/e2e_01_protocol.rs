//! e2e 01: the SMTP protocol as a client sees it on the wire.
//!
//! Every verb and its reply, the EHLO keywords, ordering and syntax errors, pipelining
//! (RFC 2920), DATA transparency (RFC 5321 §4.5.2) and 8-bit bodies checked byte-exactly in
//! the spool, CHUNKING/BDAT (RFC 3030) with binary content, every limit (line length,
//! recipients, size, errors, idle timeout, connections), and SMTP smuggling: end-of-data
//! look-alikes with bare LF/CR must never end the message and the commands after them must
//! never be answered or stored.

use std::time::Duration;

use tern_tests::{dot_stuff, ehlo_client, find, Client, Server};

/// Marker to show that nothing was answered in between: the next reply after a step must
/// be the reply to this (252 is unique to VRFY).
const MARKER: &str = "VRFY marker";

#[track_caller]
fn expect_marker(c: &mut Client) {
    c.expect(MARKER, 252, "2.5.2");
}

// ---------------------------------------------------------------------------------------
// Greeting, EHLO, simple verbs
// ---------------------------------------------------------------------------------------

#[test]
fn greeting_ehlo_helo() {
    let s = Server::with(&[]);
    let mut c = Client::connect(s.smtp);
    assert_eq!(c.read_reply().to_string(), "220 localhost ESMTP tern");
    let r = c.cmd("EHLO client.test");
    assert_eq!(r.code, 250);
    assert_eq!(r.lines[0].split(' ').next(), Some("localhost"));
    // AUTH (SASL) is optional here; cleartext-password mechanisms must never be offered
    // before TLS (RFC 4954 §4, RFC 8314).
    if let Some(auth) = r.lines.iter().find(|l| l.starts_with("AUTH")) {
        for m in auth.split(' ').skip(1) {
            assert!(m != "PLAIN" && m != "LOGIN", "{m} offered without TLS: {r}");
        }
    }
    let kw: Vec<&str> = r.lines[1..]
        .iter()
        .map(String::as_str)
        .filter(|l| !l.starts_with("AUTH"))
        .collect();
    assert_eq!(
        kw,
        [
            "PIPELINING",
            "SIZE 52428800",
            "ENHANCEDSTATUSCODES",
            "8BITMIME",
            "DSN",
            "DELIVERBY",
            "CHUNKING",
            "BINARYMIME",
            "SMTPUTF8",
            "ETRN",
            "HELP",
            "STARTTLS"
        ],
        "EHLO keywords: {r}"
    );
    c.expect("EHLO", 501, "5.5.2");
    // EHLO again resets nothing harmful; HELO is accepted too.
    c.expect("HELO client.test", 250, "localhost");
    c.quit();

    // The submission listener greets the same way.
    let mut c = Client::connect(s.submission);
    c.expect_greeting();
    c.ehlo("client.test");
    c.quit();
}

#[test]
fn simple_verbs() {
    let s = Server::with(&[]);
    let mut c = ehlo_client(&s);
    c.expect("NOOP", 250, "2.0.0 Ok");
    c.expect("noop", 250, "2.0.0 Ok"); // verbs are case-insensitive
    c.expect("RSET", 250, "2.0.0 Ok");
    c.expect("VRFY postmaster", 252, "2.5.2");
    let h = c.cmd("HELP");
    assert_eq!(h.code, 214, "HELP: {h}");
    assert!(h.lines.len() > 1, "HELP should be multi-line: {h}");
    assert!(
        h.lines.iter().all(|l| l.starts_with("2.0.0")),
        "every HELP line carries 2.0.0: {h}"
    );
    c.expect("EXPN staff", 502, "5.5.1");
    c.expect("FROBNICATE", 500, "5.5.1");
    // RFC 1985: nothing is queued for the node.
    c.expect("ETRN demo.test", 251, "2.0.0");
    c.quit();
}

#[test]
fn command_order_errors() {
    let s = Server::with(&[]);
    let mut c = s.smtp();
    c.expect("MAIL FROM:<a@example.com>", 503, "5.5.1");
    c.expect("RCPT TO:<b@demo.test>", 503, "5.5.1");
    c.expect("DATA", 503, "5.5.1");
    c.ehlo("client.test");
    c.expect("RCPT TO:<b@demo.test>", 503, "5.5.1");
    c.expect("DATA", 503, "5.5.1");
    c.expect("MAIL FROM:<a@example.com>", 250, "2.1.0 Ok");
    c.expect("MAIL FROM:<a@example.com>", 503, "5.5.1");
    c.expect("DATA", 503, "5.5.1");
    // Relaying is refused; the domain and the exact text are part of the contract.
    c.expect(
        "RCPT TO:<someone@example.org>",
        554,
        "5.7.1 <someone@example.org>: Relay access denied",
    );
    c.expect("DATA", 554, "5.5.1 Error: no valid recipients");
    c.expect("RSET", 250, "2.0.0 Ok");
    // RSET ended the transaction: MAIL is allowed again.
    c.expect("MAIL FROM:<>", 250, "2.1.0 Ok");
    c.expect("RCPT TO:<postmaster@localhost>", 250, "2.1.5 Ok");
    c.expect("RCPT TO:<Someone@DEMO.TEST>", 250, "2.1.5 Ok");
    c.quit();
}

#[test]
fn syntax_and_parameter_errors() {
    let s = Server::with(&[]);
    let mut c = ehlo_client(&s);
    c.expect("MAIL", 501, "5.5.2");
    c.expect("MAIL TO:<a@example.com>", 501, "5.5.2");
    c.expect("MAIL FROM:<a@example.com> SIZE=abc", 501, "5.5.4");
    c.expect("MAIL FROM:<a@example.com> BODY=9BIT", 501, "5.5.4");
    c.expect("MAIL FROM:<a@example.com> FROB=1", 555, "5.5.4");
    c.expect("MAIL FROM:<not an address>", 501, "5.1.7");
    c.expect("MAIL FROM:<a@@example.com>", 501, "5.1.7");
    c.expect("MAIL FROM:<jösé@example.com>", 553, "5.6.7");
    c.expect("MAIL FROM:<a@example.com>", 250, "2.1.0");
    c.expect("RCPT TO:<@@>", 501, "5.1.3");
    c.expect("RCPT TO:<b@demo.test> FROB=1", 555, "5.5.4");
    c.expect("RCPT TO:<dösé@demo.test>", 553, "5.6.7");
    c.expect("RCPT", 501, "5.5.2");
    c.expect("RSET", 250, "2.0.0");
    // With SMTPUTF8 the same addresses are fine.
    c.expect("MAIL FROM:<jösé@example.com> SMTPUTF8", 250, "2.1.0");
    c.expect("RCPT TO:<dösé@demo.test>", 250, "2.1.5");
    c.expect("RSET", 250, "2.0.0");
    // DSN and DELIVERBY parameters are accepted.
    c.expect(
        "MAIL FROM:<a@example.com> RET=HDRS ENVID=abc123 BODY=8BITMIME SIZE=100",
        250,
        "2.1.0",
    );
    c.expect(
        "RCPT TO:<b@demo.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b@demo.test",
        250,
        "2.1.5",
    );
    c.expect("RSET", 250, "2.0.0");
    // BODY=BINARYMIME requires BDAT (RFC 3030 §3).
    c.expect("MAIL FROM:<a@example.com> BODY=BINARYMIME", 250, "2.1.0");
    c.expect("RCPT TO:<b@demo.test>", 250, "2.1.5");
    c.expect("DATA", 503, "5.5.1");
    c.quit();

    // ESMTP parameters after HELO are refused (RFC 5321 §4.1.1.11 / RFC 1869).
    let mut c = s.smtp();
    c.expect("HELO client.test", 250, "localhost");
    c.expect("MAIL FROM:<a@example.com> SIZE=10", 555, "5.5.4");
    c.expect("MAIL FROM:<a@example.com>", 250, "2.1.0");
    c.quit();
}

// ---------------------------------------------------------------------------------------
// Pipelining (RFC 2920)
// ---------------------------------------------------------------------------------------

#[test]
fn pipelined_batch_replies_in_order() {
    let s = Server::with(&[]);
    let mut c = ehlo_client(&s);
    c.send(
        b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@demo.test>\r\n\
          RCPT TO:<x@example.org>\r\nRCPT TO:<c@demo.test>\r\nDATA\r\n",
    );
    c.read_reply().check(250, "2.1.0");
    c.read_reply().check(250, "2.1.5");
    c.read_reply().check(554, "5.7.1 <x@example.org>");
    c.read_reply().check(250, "2.1.5");
    c.read_reply().check(354, "End data");
    c.send(b"Subject: pipelined\r\n\r\nhello\r\n.\r\n");
    let id = c.read_reply().queued_id();
    c.quit();

    let m = s.stored_by_id(&id);
    assert_eq!(m.sender, "a@example.com");
    assert_eq!(m.recipients, ["b@demo.test", "c@demo.test"]);
    assert_eq!(m.content(), b"Subject: pipelined\r\n\r\nhello\r\n");
}

/// RFC 2920 §3.2: the server should batch the replies to a pipelined group rather than
/// send one segment per reply. Counted in read() calls, not time.
#[test]
fn pipelined_batch_replies_arrive_together() {
    let s = Server::with(&[]);
    let mut c = ehlo_client(&s);
    c.reads = 0;
    c.send(
        b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@demo.test>\r\n\
          RCPT TO:<c@demo.test>\r\nRCPT TO:<d@demo.test>\r\nDATA\r\n",
    );
    for _ in 0..4 {
        assert_eq!(c.read_reply().code, 250);
    }
    c.read_reply().check(354, "End data");
    assert!(
        c.reads <= 2,
        "5 pipelined replies took {} reads (expected them batched)",
        c.reads
    );
}

#[test]
fn pipelined_whole_transaction_with_quit() {
    let s = Server::with(&[]);
    let mut c = s.smtp();
    c.send(
        b"EHLO client.test\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@demo.test>\r\n\
          DATA\r\nSubject: all at once\r\n\r\n..dot\r\nbody\r\n.\r\nQUIT\r\n",
    );
    c.read_reply().check(250, "localhost");
    c.read_reply().check(250, "2.1.0");
    c.read_reply().check(250, "2.1.5");
    c.read_reply().check(354, "End data");
    let id = c.read_reply().queued_id();
    c.read_reply().check(221, "2.0.0 Bye");
    assert!(c.closed(), "server kept the connection open after QUIT");

    let m = s.stored_by_id(&id);
    assert_eq!(m.content(), b"Subject: all at once\r\n\r\n.dot\r\nbody\r\n");
    let (hdr, _) = m.split_received();
    assert!(
        hdr.starts_with(
            "Received: from client.test ([127.0.0.1])\r\n\tby localhost (tern) with ESMTP id "
        ),
        "Received header: {hdr:?}"
    );
    assert!(hdr.contains(&format!("id {id}")), "{hdr:?}");
    assert!(hdr.contains("\tfor <b@demo.test>;"), "{hdr:?}");
}

// ---------------------------------------------------------------------------------------
// DATA: transparency, 8-bit, BDAT
// ---------------------------------------------------------------------------------------

#[test]
fn dot_stuffing_round_trip() {
    let s = Server::with(&[]);
    let mut c = ehlo_client(&s);
    let body: &[u8] = b"Subject: dots\r\n\r\n.\r\n..\r\n.hidden\r\n..double\r\n...\r\n\
                        a line. with dots.\r\n.\r\nend\r\n";
    let wire = dot_stuff(body);
    assert!(find(&wire, b"\r\n..\r\n").is_some()); // the lone "." went out as ".."
    let id = c.send_mail("dots@example.com", &["b@demo.test"], body);
    c.quit();
    assert_eq!(
        s.stored_by_id(&id).content(),
        body,
        "dot-unstuffing is not byte-exact"
    );
}

#[test]
fn eight_bit_body_byte_exact() {
    let s = Server::with(&[]);
    let mut c = ehlo_client(&s);
    let mut body = b"Subject: 8bit\r\nContent-Type: text/plain; charset=latin1\r\n\r\n".to_vec();
    let high: Vec<u8> = (0x80..=0xFFu8).collect();
    for chunk in high.chunks(32) {
        body.extend_from_slice(chunk);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice("UTF-8 too: żółw ünïcødé 日本\r\n".as_bytes());
    c.expect("MAIL FROM:<a@example.com> BODY=8BITMIME", 250, "2.1.0");
    c.expect("RCPT TO:<b@demo.test>", 250, "2.1.5");
    c.expect("DATA", 354, "End data");
    let mut wire = body.clone();
    wire.extend_from_slice(b".\r\n");
    c.send(&wire);
    let id = c.read_reply().queued_id();
    c.quit();
    assert_eq!(s.stored_by_id(&id).content(), &body[..]);
}

#[test]
fn bdat_chunks_binary_byte_exact() {
    let s = Server::with(&[]);
    let mut c = ehlo_client(&s);
    let chunks: Vec<Vec<u8>> = vec![
        b"Subject: binary\r\n\r\n".to_vec(),
        // bare LF, bare CR, NUL, an end-of-data look-alike, and every byte value
        b"a\nb\rc\0d\r\n.\r\nMAIL FROM:<x@example.com>\r\n".to_vec(),
        (0..=255u8).collect(),
        vec![b'.'; 3000], // bigger than a command line and a text line
    ];
    c.expect("MAIL FROM:<a@example.com> BODY=BINARYMIME", 250, "2.1.0");
    c.expect("RCPT TO:<b@demo.test>", 250, "2.1.5");
    for ch in &chunks {
        let mut wire = format!("BDAT {}\r\n", ch.len()).into_bytes();
        wire.extend_from_slice(ch);
        c.send(&wire);
        c.read_reply()
            .check(250, &format!("2.0.0 Ok: {} octets received", ch.len()));
    }
    // An empty last chunk ends the message.
    let id = c
        .expect("BDAT 0 LAST", 250, "2.0.0 Ok: queued as")
        .queued_id();

    // A second message in the same session, all chunks pipelined in one write.
    c.expect("MAIL FROM:<a@example.com>", 250, "2.1.0");
    c.expect("RCPT TO:<b@demo.test>", 250, "2.1.5");
    let mut wire = Vec::new();
    wire.extend_from_slice(b"BDAT 5\r\nhel\nlBDAT 7 LAST\r\no\r\n\r\n\r\n");
    c.send(&wire);
    c.read_reply().check(250, "2.0.0 Ok: 5 octets received");
    let id2 = c.read_reply().queued_id();
    c.expect("NOOP", 250, "2.0.0");
    c.quit();

    let expect: Vec<u8> = chunks.concat();
    assert_eq!(s.stored_by_id(&id).content(), &expect[..]);
    assert_eq!(s.stored_by_id(&id2).content(), b"hel\nlo\r\n\r\n\r\n");
}

#[test]
fn bdat_out_of_order_consumes_chunk() {
    let s = Server::with(&[]);
    let mut c = ehlo_client(&s);
    // The chunk must be consumed, not parsed as commands.
    c.send(b"BDAT 12\r\nNOOP\r\nNOOP\r\n");
    c.read_reply().check(503, "5.5.1");
    expect_marker(&mut c);
    c.expect("MAIL FROM:<a@example.com>", 250, "2.1.0");
    c.send(b"BDAT 6 LAST\r\nQUIT\r\n");
    c.read_reply().check(503, "5.5.1");
    expect_marker(&mut c);
    // DATA after BDAT in the same transaction is refused.
    c.expect("RCPT TO:<b@demo.test>", 250, "2.1.5");
    c.send(b"BDAT 3\r\nabc");
    c.read_reply().check(250, "2.0.0 Ok: 3 octets received");
    c.expect("DATA", 503, "5.5.1");
    // RSET in the middle of a BDAT transaction discards it.
    c.expect("RSET", 250, "2.0.0");
    c.expect("MAIL FROM:<a@example.com>", 250, "2.1.0");
    c.expect("RCPT TO:<b@demo.test>", 250, "2.1.5");
    c.send(b"BDAT 3 LAST\r\nxyz");
    let id = c.read_reply().queued_id();
    c.quit();
    assert_eq!(
        s.stored_by_id(&id).content(),
        b"xyz",
        "RSET left BDAT data behind"
    );
    assert_eq!(s.queue_list().len(), 1);
}

// ---------------------------------------------------------------------------------------
// Bare CR / LF and smuggling
// ---------------------------------------------------------------------------------------

#[test]
fn bare_lf_and_cr_in_commands() {
    let s = Server::with(&[]);
    let mut c = ehlo_client(&s);
    c.send(b"NOOP\nNOOP\r\n");
    c.read_reply().check(500, "5.5.2");
    expect_marker(&mut c);
    c.send(b"NOOP\rNOOP\r\n");
    c.read_reply().check(500, "5.5.2");
    expect_marker(&mut c);
    c.send(b"MAIL FROM:<a@example.com>\nRCPT TO:<b@demo.test>\r\n");
    c.read_reply().check(500, "5.5.2");
    expect_marker(&mut c);
    // No transaction was started by the bad line.
    c.expect("RCPT TO:<b@demo.test>", 503, "5.5.1");
    c.quit();
}

#[test]
fn data_bare_lf_cr_and_long_lines_rejected() {
    let s = Server::with(&[]);
    let mut c = ehlo_client(&s);
    let bad: Vec<Vec<u8>> = vec![
        b"Subject: x\r\n\r\nbare\nlf\r\n".to_vec(),
        b"Subject: x\r\n\r\nbare\rcr\r\n".to_vec(),
        b"Subject: x\r\n\r\nends with bare lf\n".to_vec(),
        {
            let mut v = b"Subject: x\r\n\r\n".to_vec();
            v.extend(std::iter::repeat_n(b'x', 999)); // 999 + CRLF = 1001 octets
            v.extend_from_slice(b"\r\n");
            v
        },
    ];
    for b in &bad {
        c.expect("MAIL FROM:<a@example.com>", 250, "2.1.0");
        c.expect("RCPT TO:<b@demo.test>", 250, "2.1.5");
        c.expect("DATA", 354, "End data");
        let mut wire = b.clone();
        wire.extend_from_slice(b"\r\n.\r\n");
        c.send(&wire);
        c.read_reply().check(554, "5.6.0");
        expect_marker(&mut c);
    }
    // A 1000-octet line (998 + CRLF... + one more is the limit) is fine.
    let mut ok = b"Subject: x\r\n\r\n".to_vec();
    ok.extend(std::iter::repeat_n(b'y', 998));
    ok.extend_from_slice(b"\r\n");
    let id = c.send_mail("a@example.com", &["b@demo.test"], &ok);
    c.quit();

    let stored = s.stored();
    assert_eq!(stored.len(), 1, "only the good message is stored");
    assert_eq!(stored[0].id, id);
    assert_eq!(stored[0].content(), &ok[..]);
}

/// SMTP smuggling (2023): an end-of-data sequence that one server accepts and another
/// does not lets an attacker inject a second message. tern must treat only CRLF.CRLF as the
/// end, reject a body with bare CR/LF, and never execute what follows the look-alike.
#[test]
fn smuggling_variants_never_answered_or_stored() {
    let s = Server::with(&[]);
    let mut c = ehlo_client(&s);
    let fakes: [&[u8]; 4] = [b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n"];
    for fake in fakes {
        c.expect("MAIL FROM:<outer@example.com>", 250, "2.1.0");
        c.expect("RCPT TO:<outer@demo.test>", 250, "2.1.5");
        c.expect("DATA", 354, "End data");
        let mut wire = b"Subject: outer\r\n\r\nhello".to_vec();
        wire.extend_from_slice(fake);
        wire.extend_from_slice(
            b"MAIL FROM:<smuggled@example.com>\r\nRCPT TO:<victim@demo.test>\r\n\
              DATA\r\nSubject: smuggled\r\n\r\nevil\r\n.\r\n",
        );
        c.send(&wire);
        // The smuggled "\r\n.\r\n" is the real end of the outer message; it has a bare LF
        // or CR, so it is refused: one reply for the whole thing.
        c.read_reply().check(554, "5.6.0");
        // The next reply must be the marker's: nothing smuggled was answered.
        expect_marker(&mut c);
        assert!(c.silent_for(Duration::from_millis(100)));
    }
    c.quit();
    let q = s.queue_list();
    assert!(q.is_empty(), "nothing may be stored: {q:?}");
}

/// Control: the same layout with a real CRLF.CRLF first is two legitimate commands after
/// a stored message (so the test above is not passing for the wrong reason).
#[test]
fn smuggling_control_real_end_then_commands() {
    let s = Server::with(&[]);
    let mut c = ehlo_client(&s);
    c.expect("MAIL FROM:<outer@example.com>", 250, "2.1.0");
    c.expect("RCPT TO:<outer@demo.test>", 250, "2.1.5");
    c.expect("DATA", 354, "End data");
    c.send(
        b"Subject: outer\r\n\r\nhello\r\n.\r\nMAIL FROM:<second@example.com>\r\n\
          RCPT TO:<victim@demo.test>\r\nDATA\r\nSubject: second\r\n\r\nok\r\n.\r\n",
    );
    let id1 = c.read_reply().queued_id();
    c.read_reply().check(250, "2.1.0");
    c.read_reply().check(250, "2.1.5");
    c.read_reply().check(354, "End data");
    let id2 = c.read_reply().queued_id();
    c.quit();
    let mut q = s.queue_list();
    q.sort_by_key(|e| e.sender.clone());
    assert_eq!(q.len(), 2, "{q:?}");
    assert_eq!(
        (q[0].id.as_str(), q[0].sender.as_str()),
        (id1.as_str(), "outer@example.com")
    );
    assert_eq!(
        (q[1].id.as_str(), q[1].sender.as_str()),
        (id2.as_str(), "second@example.com")
    );
}

/// The scanner's state must survive read boundaries: commands and the end of data split
/// into one-byte writes, a fake end split across writes, and a large body.
#[test]
fn data_split_across_writes_and_large_body() {
    let s = Server::with(&[]);
    let mut c = ehlo_client(&s);
    let pause = || std::thread::sleep(Duration::from_millis(3));
    for b in b"MAIL FROM:<split@example.com>\r\n" {
        c.send(&[*b]);
        pause();
    }
    c.read_reply().check(250, "2.1.0");
    c.expect("RCPT TO:<b@demo.test>", 250, "2.1.5");
    c.expect("DATA", 354, "End data");
    c.send(b"Subject: split\r\n\r\nbody\r");
    for b in b"\n..\r\n.x\r\n\r\n" {
        c.send(&[*b]);
        pause();
    }
    for b in b".\r\n" {
        c.send(&[*b]);
        pause();
    }
    let id1 = c.read_reply().queued_id();

    // A fake end split so that no single read shows it, then the real end.
    c.expect("MAIL FROM:<fake@example.com>", 250, "2.1.0");
    c.expect("RCPT TO:<b@demo.test>", 250, "2.1.5");
    c.expect("DATA", 354, "End data");
    c.send(b"Subject: fake\r\n\r\nx\n");
    pause();
    c.send(b".");
    pause();
    c.send(b"\nNOOP\r\n.\r\n");
    c.read_reply().check(554, "5.6.0");
    expect_marker(&mut c);

    // 4 MiB of varied lines, written in one go.
    let mut big = b"Subject: big\r\n\r\n".to_vec();
    let mut i = 0u64;
    while big.len() < 4 << 20 {
        let line = format!("{i:08} {}\r\n", ".".repeat((i % 97) as usize));
        big.extend_from_slice(line.as_bytes());
        i += 1;
    }
    let id2 = c.send_mail("big@example.com", &["b@demo.test"], &big);
    c.quit();

    assert_eq!(
        s.stored_by_id(&id1).content(),
        b"Subject: split\r\n\r\nbody\r\n.\r\nx\r\n\r\n" // ".x" unstuffs to "x"
    );
    assert_eq!(s.stored_by_id(&id2).content(), &big[..]);
    assert_eq!(s.queue_list().len(), 2);
}

// ---------------------------------------------------------------------------------------
// Limits
// ---------------------------------------------------------------------------------------

#[test]
fn limit_command_line_length() {
    let s = Server::with(&[]);
    let mut c = ehlo_client(&s);
    // 512 octets including CRLF is the RFC 5321 §4.5.3.1.4 minimum: accepted.
    let ok = format!("NOOP {}", "x".repeat(512 - 2 - 5));
    assert_eq!(ok.len() + 2, 512);
    c.expect(&ok, 250, "2.0.0");
    // 513: too long, and the session goes on.
    let long = format!("NOOP {}", "x".repeat(513 - 2 - 5));
    c.expect(&long, 500, "5.5.2 Error: line too long");
    expect_marker(&mut c);
    // Far too long (bigger than any buffer), sent in one write: one reply.
    let huge = format!("MAIL FROM:<{}@example.com>", "a".repeat(100_000));
    c.expect(&huge, 500, "5.5.2 Error: line too long");
    expect_marker(&mut c);
    c.expect("MAIL FROM:<a@example.com>", 250, "2.1.0");
    c.quit();
}

#[test]
fn limit_recipients() {
    let s = Server::with(&["limits.recipients=3"]);
    let mut c = ehlo_client(&s);
    c.expect("MAIL FROM:<a@example.com>", 250, "2.1.0");
    for i in 0..3 {
        c.expect(&format!("RCPT TO:<r{i}@demo.test>"), 250, "2.1.5");
    }
    c.expect("RCPT TO:<r3@demo.test>", 452, "4.5.3");
    c.expect("RCPT TO:<r4@demo.test>", 452, "4.5.3");
    c.expect("DATA", 354, "End data");
    c.send(b"Subject: r\r\n\r\nx\r\n.\r\n");
    let id = c.read_reply().queued_id();
    c.quit();
    let q = s.queue_list();
    assert_eq!(q.len(), 1, "{q:?}");
    assert_eq!(q[0].id, id);
    assert_eq!(
        q[0].recipients,
        ["r0@demo.test", "r1@demo.test", "r2@demo.test"]
    );
}

#[test]
fn limit_message_size() {
    let s = Server::with(&["limits.message_size=10000"]);
    let mut c = s.smtp();
    let kw = c.ehlo("client.test");
    assert!(
        kw.iter().any(|k| k == "SIZE 10000"),
        "EHLO must advertise the configured SIZE: {kw:?}"
    );
    c.expect("MAIL FROM:<a@example.com> SIZE=10001", 552, "5.3.4");
    c.expect("MAIL FROM:<a@example.com> SIZE=10000", 250, "2.1.0");
    c.expect("RCPT TO:<b@demo.test>", 250, "2.1.5");
    c.expect("DATA", 354, "End data");
    // The body lies about its size: refused after the final dot, session usable.
    let mut big = b"Subject: big\r\n\r\n".to_vec();
    for _ in 0..300 {
        big.extend_from_slice(&[b'z'; 98]);
        big.extend_from_slice(b"\r\n");
    }
    let mut wire = big.clone();
    wire.extend_from_slice(b".\r\n");
    c.send(&wire);
    c.read_reply().check(552, "5.3.4");
    expect_marker(&mut c);
    // The same with BDAT.
    c.expect("MAIL FROM:<a@example.com>", 250, "2.1.0");
    c.expect("RCPT TO:<b@demo.test>", 250, "2.1.5");
    let mut wire = format!("BDAT {} LAST\r\n", big.len()).into_bytes();
    wire.extend_from_slice(&big);
    c.send(&wire);
    c.read_reply().check(552, "5.3.4");
    expect_marker(&mut c);
    // Exactly at the limit is accepted (the limit is on the client's message, not on
    // tern's own Received: header).
    let mut exact = b"Subject: exact\r\n\r\n".to_vec();
    while exact.len() + 100 <= 10000 {
        exact.extend_from_slice(&[b'e'; 98]);
        exact.extend_from_slice(b"\r\n");
    }
    let pad = 10000 - exact.len() - 2;
    exact.extend(std::iter::repeat_n(b'p', pad));
    exact.extend_from_slice(b"\r\n");
    assert_eq!(exact.len(), 10000);
    let id_exact = c.send_mail("a@example.com", &["b@demo.test"], &exact);
    // And a small one still goes through.
    let id = c.send_mail(
        "a@example.com",
        &["b@demo.test"],
        b"Subject: small\r\n\r\nok\r\n",
    );
    c.quit();
    let mut q: Vec<String> = s.queue_list().into_iter().map(|e| e.id).collect();
    q.sort();
    let mut want = vec![id_exact.clone(), id];
    want.sort();
    assert_eq!(q, want);
    assert_eq!(s.stored_by_id(&id_exact).content(), &exact[..]);
}

#[test]
fn limit_errors() {
    let s = Server::with(&["limits.errors=3"]);
    let mut c = ehlo_client(&s);
    c.expect("FROB 1", 500, "5.5.1");
    c.expect("NOOP", 250, "2.0.0"); // successes do not reset nor count
    c.expect("RCPT TO:<b@demo.test>", 503, "5.5.1");
    // The third negative reply is followed by the 421 and the close.
    c.expect("EXPN x", 502, "5.5.1");
    c.read_reply()
        .check(421, "4.7.0 localhost Error: too many errors");
    assert!(c.closed(), "connection still open after 421");
    // The server is fine.
    ehlo_client(&s).quit();
}

#[test]
fn limit_idle_timeout() {
    let s = Server::with(&["limits.idle_timeout=1s"]);
    // Idle at the command prompt...
    let mut idle = s.smtp();
    // ...and idle in the middle of DATA.
    let mut mid = ehlo_client(&s);
    mid.expect("MAIL FROM:<a@example.com>", 250, "2.1.0");
    mid.expect("RCPT TO:<b@demo.test>", 250, "2.1.5");
    mid.expect("DATA", 354, "End data");
    mid.send(b"Subject: half\r\n\r\nhalf a mess");
    for c in [&mut idle, &mut mid] {
        c.read_reply()
            .check(421, "4.4.2 localhost Error: timeout exceeded");
        assert!(c.closed(), "connection still open after the timeout");
    }
    assert!(s.queue_list().is_empty());
    ehlo_client(&s).quit();
}

#[test]
fn limit_connections_per_ip() {
    // The per-IP limit is per shard; one shard makes it exact.
    let s = Server::with(&["shards=1", "limits.connections_per_ip=3"]);
    let mut held: Vec<Client> = (0..3).map(|_| s.smtp()).collect();
    let mut c = Client::connect(s.smtp);
    c.read_reply().check(421, "4.7.0");
    assert!(c.closed());
    // Closing one frees its slot (the accounting is released).
    held.pop().unwrap().quit();
    let mut ok = None;
    for _ in 0..50 {
        let mut c = Client::connect(s.smtp);
        let r = c.read_reply();
        if r.code == 220 {
            ok = Some(c);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut c = ok.expect("a slot never came free after a client quit");
    c.ehlo("client.test");
    c.quit();
    drop(held);
}

#[test]
fn limit_connections_per_shard() {
    let s = Server::with(&["shards=1", "limits.connections_per_shard=2"]);
    let _a = s.smtp();
    let _b = s.smtp();
    let mut c = Client::connect(s.submission);
    c.read_reply().check(421, "4.7.0");
    assert!(c.closed());
}

/// Listeners take IPv6 addresses too (dual configuration: [::1] and 127.0.0.1 at once).
#[test]
fn ipv6_and_ipv4_listeners_side_by_side() {
    let v6 = std::net::TcpListener::bind("[::1]:0").is_ok();
    if !tern_tests::require(v6, "an IPv6 loopback address (::1)") {
        return;
    }
    let s = Server::with(&[
        r#"listeners.smtp=["[::1]:0"]"#,
        r#"listeners.submission=["127.0.0.1:0"]"#,
    ]);
    assert!(s.smtp.is_ipv6(), "{}", s.smtp);
    let mut c = s.smtp();
    c.ehlo("client.test");
    let id = c.send_mail(
        "a@example.com",
        &["x@localhost"],
        b"Subject: v6\r\n\r\nhi\r\n",
    );
    let stored = s.stored_by_id(&id);
    let (received, _) = stored.split_received();
    assert!(received.contains("([::1])"), "{received}");
    c.quit();
    let mut v4 = Client::connect(s.submission);
    v4.expect_greeting();
}
