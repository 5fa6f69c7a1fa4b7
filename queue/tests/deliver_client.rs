//! The outbound SMTP client against small scripted servers (std threads on 127.0.0.1:0),
//! the client running inside a small glommio executor.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use glommio::{LocalExecutorBuilder, Placement};
use tern_queue::client::{
    connect, ClientError, ClientOptions, Reply, Stage, StarttlsPolicy, Timeouts, TlsPolicy,
};
use tern_queue::{BodyType, Envelope, Recipient, Ret, NOTIFY_DELAY, NOTIFY_FAILURE};

// ---------------------------------------------------------------- scripted server

enum S {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ServerConnection, TcpStream>>),
    Gone,
}

struct Peer {
    s: S,
    buf: Vec<u8>,
}

impl Peer {
    fn io(&mut self) -> &mut dyn ReadWrite {
        match &mut self.s {
            S::Plain(s) => s,
            S::Tls(s) => s.as_mut(),
            S::Gone => panic!("stream gone"),
        }
    }
    fn say(&mut self, s: &str) {
        let io = self.io();
        io.write_all(s.as_bytes()).unwrap();
        io.flush().unwrap();
    }
    fn fill(&mut self) -> usize {
        let mut chunk = [0u8; 65536];
        let n = self.io().read(&mut chunk).unwrap();
        self.buf.extend_from_slice(&chunk[..n]);
        n
    }
    /// One command line, without CRLF.
    fn line(&mut self) -> String {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let l = String::from_utf8(self.buf[..i].to_vec()).unwrap();
                self.buf.drain(..i + 2);
                return l;
            }
            assert!(self.fill() > 0, "client closed while a line was expected");
        }
    }
    fn expect(&mut self, prefix: &str) -> String {
        let l = self.line();
        assert!(
            l.to_ascii_uppercase()
                .starts_with(&prefix.to_ascii_uppercase()),
            "expected {prefix:?}, got {l:?}"
        );
        l
    }
    /// Whatever one read returns (the buffer, if it already holds something).
    fn read_once(&mut self) -> Vec<u8> {
        if self.buf.is_empty() {
            self.fill();
        }
        std::mem::take(&mut self.buf)
    }
    /// DATA content as sent (still stuffed), terminator included.
    fn data(&mut self) -> Vec<u8> {
        loop {
            if self.buf.starts_with(b".\r\n") {
                return self.buf.drain(..3).collect();
            }
            if let Some(i) = self.buf.windows(5).position(|w| w == b"\r\n.\r\n") {
                return self.buf.drain(..i + 5).collect();
            }
            assert!(self.fill() > 0, "client closed inside DATA");
        }
    }
    /// A `BDAT n LAST` command and its chunk.
    fn bdat_last(&mut self) -> Vec<u8> {
        let cmd = self.line();
        let n: usize = cmd
            .strip_prefix("BDAT ")
            .and_then(|r| r.strip_suffix(" LAST"))
            .unwrap_or_else(|| panic!("expected BDAT n LAST, got {cmd:?}"))
            .parse()
            .unwrap();
        self.exact(n)
    }
    fn exact(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            assert!(self.fill() > 0, "client closed inside BDAT");
        }
        self.buf.drain(..n).collect()
    }
    fn starttls(&mut self, config: Arc<rustls::ServerConfig>) {
        assert!(self.buf.is_empty(), "client pipelined past STARTTLS");
        let S::Plain(tcp) = std::mem::replace(&mut self.s, S::Gone) else {
            panic!("already TLS")
        };
        let conn = rustls::ServerConnection::new(config).unwrap();
        self.s = S::Tls(Box::new(rustls::StreamOwned::new(conn, tcp)));
    }
    /// The client's QUIT, then close.
    fn quit(&mut self) {
        self.expect("QUIT");
        self.say("221 2.0.0 bye\r\n");
    }
    fn ehlo(&mut self, keywords: &[&str]) {
        self.expect("EHLO client.test");
        let mut r = String::from("250-mx.test\r\n");
        for (i, k) in keywords.iter().enumerate() {
            let sep = if i + 1 == keywords.len() { ' ' } else { '-' };
            r.push_str(&format!("250{sep}{k}\r\n"));
        }
        if keywords.is_empty() {
            r = "250 mx.test\r\n".into();
        }
        self.say(&r);
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

struct Server {
    addr: SocketAddr,
    thread: JoinHandle<usize>,
}

/// Accepts one connection, runs `script` on it, then counts further connections
/// attempted within 100 ms (to prove reuse).
fn server(script: impl FnOnce(&mut Peer) + Send + 'static) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let thread = std::thread::spawn(move || {
        let (tcp, _) = listener.accept().unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut peer = Peer {
            s: S::Plain(tcp),
            buf: Vec::new(),
        };
        script(&mut peer);
        listener.set_nonblocking(true).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let mut extra = 0;
        while listener.accept().is_ok() {
            extra += 1;
        }
        extra
    });
    Server { addr, thread }
}

impl Server {
    fn finish(self) -> usize {
        self.thread.join().expect("server script failed")
    }
}

fn run<F: std::future::Future<Output = T> + 'static, T: 'static>(f: F) -> T {
    LocalExecutorBuilder::new(Placement::Unbound)
        .ring_depth(64)
        .io_memory(128 << 10)
        .make()
        .unwrap()
        .run(f)
}

fn opts() -> ClientOptions {
    let mut o = ClientOptions::new("client.test");
    o.timeouts = Timeouts::uniform(Duration::from_secs(5));
    o
}

fn env(rcpts: &[&str]) -> Envelope {
    Envelope {
        id: "Q1".into(),
        sender: "from@example.org".into(),
        recipients: rcpts
            .iter()
            .map(|a| Recipient {
                addr: (*a).into(),
                notify: 0,
                orcpt: None,
            })
            .collect(),
        arrival_unix_micros: 0,
        size: 0,
        body_type: BodyType::SevenBit,
        smtputf8: false,
        ret: None,
        envid: None,
        deliver_by: None,
        auth: None,
        client_helo: "c".into(),
        client_addr: "192.0.2.1:1".into(),
    }
}

/// Connects to `addr` with `o`, sends `e` with `body` to its recipients `rcpts`, quits:
/// the per-recipient results.
fn send_once(
    addr: SocketAddr,
    o: ClientOptions,
    e: Envelope,
    rcpts: &'static [usize],
    body: Vec<u8>,
) -> Vec<(usize, Reply)> {
    run(async move {
        let mut c = connect(addr, &o).await.unwrap();
        let r = c.send(&e, rcpts, &body).await.unwrap();
        c.quit().await;
        r
    })
}

fn codes(v: &[(usize, Reply)]) -> Vec<(usize, u16)> {
    v.iter().map(|(i, r)| (*i, r.code)).collect()
}

fn tls_server_config() -> (Arc<rustls::ServerConfig>, String) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let pem = ck.cert.pem();
    let key = rustls::pki_types::PrivateKeyDer::try_from(ck.signing_key.serialize_der()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![ck.cert.der().clone()], key)
    .unwrap();
    (Arc::new(config), pem)
}

const BODY: &[u8] = b"Subject: t\r\n\r\nhello\r\n";

// ---------------------------------------------------------------- tests

#[test]
fn pipelined_transaction_in_one_read_with_per_recipient_replies() {
    let srv = server(|p| {
        p.say("220 mx.test ESMTP\r\n");
        p.ehlo(&["PIPELINING", "SIZE 100000", "8BITMIME", "DSN"]);
        let batch = String::from_utf8(p.read_once()).unwrap();
        assert_eq!(
            batch,
            format!(
                "MAIL FROM:<from@example.org> SIZE={} RET=HDRS ENVID=id+2B1\r\n\
                 RCPT TO:<a@x.test> NOTIFY=FAILURE,DELAY ORCPT=rfc822;A+2Bb@x.test\r\n\
                 RCPT TO:<b@x.test>\r\n\
                 RCPT TO:<c@x.test>\r\n\
                 DATA\r\n",
                BODY.len()
            )
        );
        p.say("250 2.1.0 ok\r\n250 2.1.5 ok\r\n450 4.2.1 busy\r\n550 5.1.1 no such user\r\n354 go\r\n");
        assert_eq!(p.data(), b"Subject: t\r\n\r\nhello\r\n.\r\n");
        p.say("250 2.0.0 queued as X\r\n");
        p.quit();
    });
    let addr = srv.addr;
    let results = run(async move {
        let mut c = connect(addr, &opts()).await.unwrap();
        assert!(c.extensions().pipelining && c.extensions().dsn);
        assert_eq!(c.remote_name(), "mx.test");
        let mut e = env(&["a@x.test", "b@x.test", "c@x.test"]);
        e.ret = Some(Ret::Hdrs);
        e.envid = Some("id+1".into());
        e.recipients[0].notify = NOTIFY_FAILURE | NOTIFY_DELAY;
        e.recipients[0].orcpt = Some("rfc822;A+b@x.test".into());
        let r = c.send(&e, &[0, 1, 2], BODY).await.unwrap();
        c.quit().await;
        r
    });
    assert_eq!(codes(&results), [(0, 250), (1, 450), (2, 550)]);
    assert_eq!(results[0].1.text, "queued as X");
    assert_eq!(results[2].1.enhanced, Some((5, 1, 1)));
    assert_eq!(srv.finish(), 0);
}

#[test]
fn lockstep_without_pipelining_mail_refused_then_data_refused_on_one_connection() {
    let srv = server(|p| {
        p.say("220 mx.test\r\n");
        p.ehlo(&["8BITMIME"]);
        // No SIZE/DSN offered: no parameters.
        assert_eq!(p.line(), "MAIL FROM:<from@example.org>");
        p.say("451 4.3.0 try later\r\n");
        // Message 2 on the same connection: RSET first.
        p.expect("RSET");
        p.say("250 ok\r\n");
        p.expect("MAIL FROM:<from@example.org>");
        p.say("250 ok\r\n");
        p.expect("RCPT TO:<b@x.test>");
        p.say("250 ok\r\n");
        p.expect("RCPT TO:<a@x.test>");
        p.say("250 ok\r\n");
        p.expect("DATA");
        p.say("354 go\r\n");
        p.data();
        p.say("554 5.7.1 spam\r\n");
        // Message 3: DATA itself refused.
        p.expect("RSET");
        p.say("250 ok\r\n");
        p.expect("MAIL");
        p.say("250 ok\r\n");
        p.expect("RCPT");
        p.say("250 ok\r\n");
        p.expect("DATA");
        p.say("452 4.3.1 no space\r\n");
        p.quit();
    });
    let addr = srv.addr;
    let (r1, r2, r3) = run(async move {
        let mut c = connect(addr, &opts()).await.unwrap();
        let e = env(&["a@x.test", "b@x.test"]);
        let r1 = c.send(&e, &[0, 1], BODY).await.unwrap();
        let r2 = c.send(&e, &[1, 0], BODY).await.unwrap();
        let r3 = c.send(&e, &[0], BODY).await.unwrap();
        c.quit().await;
        (r1, r2, r3)
    });
    assert_eq!(codes(&r1), [(0, 451), (1, 451)]);
    assert_eq!(codes(&r2), [(1, 554), (0, 554)]);
    assert_eq!(codes(&r3), [(0, 452)]);
    assert_eq!(srv.finish(), 0);
}

#[test]
fn pipelined_mail_refusal_applies_to_every_recipient() {
    let srv = server(|p| {
        p.say("220 mx.test\r\n");
        p.ehlo(&["PIPELINING"]);
        p.expect("MAIL");
        p.expect("RCPT");
        p.expect("RCPT");
        p.expect("DATA");
        p.say("550 5.7.1 sender blocked\r\n503 5.5.1 need MAIL\r\n503 5.5.1 need MAIL\r\n503 5.5.1 no valid recipients\r\n");
        p.quit();
    });
    let addr = srv.addr;
    let r = run(async move {
        let mut c = connect(addr, &opts()).await.unwrap();
        let r = c.send(&env(&["a@x", "b@x"]), &[0, 1], BODY).await.unwrap();
        c.quit().await;
        r
    });
    assert_eq!(codes(&r), [(0, 550), (1, 550)]);
    assert_eq!(r[1].1.text, "sender blocked");
    srv.finish();
}

#[test]
fn all_recipients_refused_but_server_sends_354_gets_an_empty_message() {
    let srv = server(|p| {
        p.say("220 mx.test\r\n");
        p.ehlo(&["PIPELINING"]);
        p.read_once();
        p.say("250 ok\r\n550 5.1.1 no\r\n354 go ahead anyway\r\n");
        assert_eq!(p.data(), b".\r\n");
        p.say("554 5.5.1 no recipients\r\n");
        p.quit();
    });
    let addr = srv.addr;
    let r = send_once(addr, opts(), env(&["a@x"]), &[0], BODY.to_vec());
    assert_eq!(codes(&r), [(0, 550)]);
    srv.finish();
}

#[test]
fn dot_stuffing_and_line_endings_are_byte_exact_at_the_server() {
    let body: &'static [u8] = b".starts with dot\r\nline\r\n.\r\n..two\r\nbare\nlf\n.dot after bare lf\r\nno final newline";
    let srv = server(|p| {
        p.say("220 mx.test\r\n");
        p.ehlo(&["PIPELINING"]);
        p.read_once();
        p.say("250 ok\r\n250 ok\r\n354 go\r\n");
        assert_eq!(
            String::from_utf8(p.data()).unwrap(),
            "..starts with dot\r\nline\r\n..\r\n...two\r\nbare\r\nlf\r\n..dot after bare lf\r\nno final newline\r\n.\r\n"
        );
        p.say("250 ok\r\n");
        p.quit();
    });
    let addr = srv.addr;
    let r = send_once(addr, opts(), env(&["a@x"]), &[0], body.to_vec());
    assert_eq!(codes(&r), [(0, 250)]);
    srv.finish();
}

#[test]
fn large_body_arrives_intact() {
    // > several write blocks, with dots at line starts throughout.
    let mut body = Vec::new();
    for i in 0..20_000 {
        body.extend_from_slice(
            format!(".line {i} ....................................\r\n").as_bytes(),
        );
    }
    let expected: Vec<u8> = {
        let mut e = Vec::new();
        for i in 0..20_000 {
            e.extend_from_slice(
                format!("..line {i} ....................................\r\n").as_bytes(),
            );
        }
        e.extend_from_slice(b".\r\n");
        e
    };
    let srv = server(move |p| {
        p.say("220 mx.test\r\n");
        p.ehlo(&[]);
        p.expect("MAIL");
        p.say("250 ok\r\n");
        p.expect("RCPT");
        p.say("250 ok\r\n");
        p.expect("DATA");
        p.say("354 go\r\n");
        assert!(p.data() == expected);
        p.say("250 ok\r\n");
        p.quit();
    });
    let addr = srv.addr;
    let r = send_once(addr, opts(), env(&["a@x"]), &[0], body.to_vec());
    assert_eq!(codes(&r), [(0, 250)]);
    srv.finish();
}

#[test]
fn connection_reuse_two_messages_one_tcp_connection() {
    let srv = server(|p| {
        p.say("220 mx.test\r\n");
        p.ehlo(&["PIPELINING"]);
        for n in 0..2 {
            if n == 1 {
                p.expect("RSET");
                p.say("250 2.0.0 ok\r\n");
            }
            p.expect("MAIL");
            p.expect("RCPT");
            p.expect("DATA");
            p.say("250 ok\r\n250 ok\r\n354 go\r\n");
            p.data();
            p.say(&format!("250 2.0.0 message {n}\r\n"));
        }
        p.quit();
    });
    let addr = srv.addr;
    let (a, b) = run(async move {
        let mut c = connect(addr, &opts()).await.unwrap();
        let a = c.send(&env(&["a@x"]), &[0], BODY).await.unwrap();
        assert!(c.is_usable());
        let b = c.send(&env(&["b@x"]), &[0], BODY).await.unwrap();
        c.quit().await;
        (a, b)
    });
    assert_eq!(a[0].1.text, "message 0");
    assert_eq!(b[0].1.text, "message 1");
    assert_eq!(srv.finish(), 0, "a second TCP connection was opened");
}

#[test]
fn reused_pipelining_connection_sends_rset_in_the_same_group_as_mail() {
    // The next hop reads the whole group before answering anything: a client that waited
    // for RSET's reply before sending MAIL would stall here until its timeout.
    let srv = server(|p| {
        p.say("220 mx.test\r\n");
        p.ehlo(&["PIPELINING"]);
        p.expect("MAIL");
        p.expect("RCPT");
        p.expect("DATA");
        p.say("250 ok\r\n250 ok\r\n354 go\r\n");
        p.data();
        p.say("250 2.0.0 message 0\r\n");
        p.expect("RSET");
        p.expect("MAIL");
        p.expect("RCPT");
        p.expect("DATA");
        p.say("250 2.0.0 reset\r\n250 ok\r\n250 ok\r\n354 go\r\n");
        p.data();
        p.say("250 2.0.0 message 1\r\n");
        // A refused RSET: the client gives the connection up.
        p.expect("RSET");
        p.expect("MAIL");
        p.expect("RCPT");
        p.expect("DATA");
        p.say("421 4.3.0 going away\r\n");
    });
    let addr = srv.addr;
    let (a, b, c3, usable) = run(async move {
        let mut c = connect(addr, &opts()).await.unwrap();
        let a = c.send(&env(&["a@x"]), &[0], BODY).await.unwrap();
        let b = c.send(&env(&["b@x"]), &[0], BODY).await.unwrap();
        let c3 = c.send(&env(&["c@x"]), &[0], BODY).await;
        let usable = c.is_usable();
        (a, b, c3, usable)
    });
    assert_eq!(a[0].1.text, "message 0");
    assert_eq!(b[0].1.text, "message 1");
    assert!(c3.is_err(), "a refused RSET fails the transaction: {c3:?}");
    assert!(!usable, "the connection is not reused after a refused RSET");
    srv.finish();
}

#[test]
fn starttls_opportunistic_then_ehlo_again() {
    let (config, _) = tls_server_config();
    let srv = server(move |p| {
        p.say("220 mx.test\r\n");
        p.ehlo(&["PIPELINING", "STARTTLS", "AUTH PLAIN"]);
        p.expect("STARTTLS");
        p.say("220 2.0.0 go ahead\r\n");
        p.starttls(config);
        // Extensions are learnt again inside TLS.
        p.ehlo(&["PIPELINING", "8BITMIME"]);
        p.read_once();
        p.say("250 ok\r\n250 ok\r\n354 go\r\n");
        p.data();
        p.say("250 ok tls\r\n");
        p.quit();
    });
    let addr = srv.addr;
    let r = run(async move {
        let mut c = connect(addr, &opts()).await.unwrap();
        assert!(c.is_tls());
        assert!(!c.extensions().starttls && c.extensions().eightbitmime);
        assert!(c.extensions().auth.is_empty());
        let r = c.send(&env(&["a@x"]), &[0], BODY).await.unwrap();
        c.quit().await;
        r
    });
    assert_eq!(r[0].1.text, "ok tls");
    srv.finish();
}

#[test]
fn starttls_opportunistic_not_offered_stays_plain() {
    let srv = server(|p| {
        p.say("220 mx.test\r\n");
        p.ehlo(&["PIPELINING"]);
        p.quit();
    });
    let addr = srv.addr;
    run(async move {
        let c = connect(addr, &opts()).await.unwrap();
        assert!(!c.is_tls());
        c.quit().await;
    });
    srv.finish();
}

#[test]
fn starttls_required_verified_with_auth_plain() {
    let (config, ca_pem) = tls_server_config();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, ca_pem).unwrap();
    let srv = server(move |p| {
        p.say("220 mx.test\r\n");
        p.ehlo(&["STARTTLS", "AUTH PLAIN LOGIN CRAM-MD5"]);
        p.expect("STARTTLS");
        p.say("220 go ahead\r\n");
        p.starttls(config);
        p.ehlo(&["AUTH CRAM-MD5 PLAIN"]);
        let l = p.expect("AUTH PLAIN ");
        let raw = B64.decode(&l["AUTH PLAIN ".len()..]).unwrap();
        assert_eq!(raw, b"\0user\0secret");
        p.say("235 2.7.0 ok\r\n");
        p.quit();
    });
    let addr = srv.addr;
    let mut o = opts();
    o.starttls = StarttlsPolicy::Required;
    o.verify_certs = true;
    o.ca_file = Some(ca);
    o.server_name = Some("localhost".into());
    o.auth = Some(("user".into(), "secret".into()));
    run(async move {
        let c = connect(addr, &o).await.unwrap();
        assert!(c.is_tls() && c.is_authenticated());
        c.quit().await;
    });
    srv.finish();
}

/// Accepts `n` connections one after another, each: greeting, EHLO, STARTTLS, EHLO, QUIT.
/// Returns how each TLS handshake went, as the server saw it.
fn tls_server_n(
    n: usize,
    config: Arc<rustls::ServerConfig>,
) -> (SocketAddr, JoinHandle<Vec<Option<rustls::HandshakeKind>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let thread = std::thread::spawn(move || {
        (0..n)
            .map(|_| {
                let (tcp, _) = listener.accept().unwrap();
                tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut p = Peer {
                    s: S::Plain(tcp),
                    buf: Vec::new(),
                };
                p.say("220 mx.test\r\n");
                p.ehlo(&["STARTTLS"]);
                p.expect("STARTTLS");
                p.say("220 go ahead\r\n");
                p.starttls(config.clone());
                p.ehlo(&["PIPELINING"]);
                let kind = match &p.s {
                    S::Tls(t) => t.conn.handshake_kind(),
                    _ => None,
                };
                p.quit();
                kind
            })
            .collect()
    });
    (addr, thread)
}

/// Two connections with one shared configuration (what the runner passes): the second
/// resumes the first one's TLS session. Each with its own (`tls_config: None`, the old
/// per-connection build): both full handshakes.
#[test]
fn a_shared_tls_config_resumes_sessions_a_fresh_one_does_not() {
    use rustls::HandshakeKind::{Full, Resumed};
    let (config, ca_pem) = tls_server_config();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, ca_pem).unwrap();
    let mut o = opts();
    o.starttls = StarttlsPolicy::Required;
    o.verify_certs = true;
    o.ca_file = Some(ca.clone());
    o.server_name = Some("localhost".into());
    let twice = |o: ClientOptions, config: Arc<rustls::ServerConfig>| {
        let (addr, srv) = tls_server_n(2, config);
        let client = run(async move {
            let mut resumed = Vec::new();
            for _ in 0..2 {
                let c = connect(addr, &o).await.unwrap();
                assert!(c.is_tls());
                resumed.push(c.is_tls_resumed());
                c.quit().await;
            }
            resumed
        });
        (srv.join().expect("server script failed"), client)
    };

    let mut shared = o.clone();
    shared.tls_config = Some(tern_queue::client::tls::client_config(true, Some(&ca)).unwrap());
    let (server, client) = twice(shared, config.clone());
    assert_eq!(server, [Some(Full), Some(Resumed)]);
    assert_eq!(client, [false, true]);

    let (server, client) = twice(o, config);
    assert_eq!(server, [Some(Full), Some(Full)]);
    assert_eq!(client, [false, false]);
}

/// A prebuilt no-verify configuration must not stand in for a `verify` policy applied
/// later: `TlsPolicy::apply` drops it, and the wrong CA fails the handshake.
#[test]
fn applying_a_policy_drops_a_prebuilt_config() {
    let (config, _) = tls_server_config();
    let srv = server(move |p| {
        p.say("220 mx.test\r\n");
        p.ehlo(&["STARTTLS"]);
        p.expect("STARTTLS");
        p.say("220 go ahead\r\n");
        p.starttls(config);
        let mut b = [0u8; 16];
        let _ = p.io().read(&mut b);
    });
    let addr = srv.addr;
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("other.pem");
    std::fs::write(&other, tls_server_config().1).unwrap();
    let mut o = opts();
    o.tls_config = Some(tern_queue::client::tls::client_config(false, None).unwrap());
    TlsPolicy::parse(&format!("verify ca={}", other.display()))
        .unwrap()
        .apply(&mut o);
    assert!(o.tls_config.is_none());
    o.server_name = Some("localhost".into());
    let e = run(async move { connect(addr, &o).await.err().unwrap() });
    assert!(matches!(e, ClientError::Tls(_)), "{e}");
    srv.finish();
}

#[test]
fn starttls_required_but_not_offered_fails() {
    let srv = server(|p| {
        p.say("220 mx.test\r\n");
        p.ehlo(&["PIPELINING"]);
        p.quit();
    });
    let addr = srv.addr;
    let mut o = opts();
    o.starttls = StarttlsPolicy::Required;
    let e = run(async move { connect(addr, &o).await.err().unwrap() });
    assert!(matches!(e, ClientError::StartTlsNotOffered), "{e}");
    srv.finish();
}

#[test]
fn starttls_verification_failure_is_an_error() {
    let (config, _) = tls_server_config();
    let srv = server(move |p| {
        p.say("220 mx.test\r\n");
        p.ehlo(&["STARTTLS"]);
        p.expect("STARTTLS");
        p.say("220 go ahead\r\n");
        p.starttls(config);
        // The client aborts the handshake; reading shows the alert / EOF.
        let mut b = [0u8; 16];
        let _ = p.io().read(&mut b);
    });
    let addr = srv.addr;
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("other.pem");
    std::fs::write(&other, tls_server_config().1).unwrap();
    let mut o = opts();
    o.verify_certs = true;
    o.ca_file = Some(other);
    o.server_name = Some("localhost".into());
    let e = run(async move { connect(addr, &o).await.err().unwrap() });
    assert!(matches!(e, ClientError::Tls(_)), "{e}");
    srv.finish();
}

#[test]
fn response_injection_after_starttls_is_refused() {
    let srv = server(|p| {
        p.say("220 mx.test\r\n");
        p.ehlo(&["STARTTLS"]);
        p.expect("STARTTLS");
        p.say("220 go ahead\r\n250 injected\r\n");
    });
    let addr = srv.addr;
    let e = run(async move { connect(addr, &opts()).await.err().unwrap() });
    assert!(matches!(e, ClientError::StartTlsInjection), "{e}");
    srv.finish();
}

#[test]
fn auth_cram_md5_without_tls_and_never_plain() {
    let srv = server(|p| {
        p.say("220 mx.test\r\n");
        p.ehlo(&["AUTH PLAIN LOGIN CRAM-MD5"]);
        p.expect("AUTH CRAM-MD5");
        p.say(&format!(
            "334 {}\r\n",
            B64.encode("<1896.697170952@postoffice.reston.mci.net>")
        ));
        let l = p.line();
        assert_eq!(
            B64.decode(l).unwrap(),
            b"tim b913a602c7eda7a495b4e6e7334d3890"
        );
        p.say("235 ok\r\n");
        p.quit();
    });
    let addr = srv.addr;
    let mut o = opts();
    o.starttls = StarttlsPolicy::Never;
    o.auth = Some(("tim".into(), "tanstaaftanstaaf".into()));
    run(async move {
        let c = connect(addr, &o).await.unwrap();
        assert!(c.is_authenticated());
        c.quit().await;
    });
    srv.finish();

    // Only PLAIN offered and no TLS: refuse to authenticate.
    let srv = server(|p| {
        p.say("220 mx.test\r\n");
        p.ehlo(&["AUTH PLAIN LOGIN"]);
        p.quit();
    });
    let addr = srv.addr;
    let mut o = opts();
    o.auth = Some(("u".into(), "p".into()));
    let e = run(async move { connect(addr, &o).await.err().unwrap() });
    assert!(
        matches!(e, ClientError::AuthUnavailable { tls: false, .. }),
        "{e}"
    );
    // The server's script ends at QUIT; the client dropped the connection instead.
    let _ = srv.thread.join();
}

#[test]
fn helo_fallback_when_ehlo_is_refused() {
    let srv = server(|p| {
        p.say("220 old.test\r\n");
        p.expect("EHLO");
        p.say("502 5.5.2 what?\r\n");
        p.expect("HELO client.test");
        p.say("250 old.test\r\n");
        p.expect("MAIL FROM:<from@example.org>");
        p.say("250 ok\r\n");
        p.expect("RCPT");
        p.say("250 ok\r\n");
        p.expect("DATA");
        p.say("354 go\r\n");
        p.data();
        p.say("250 ok\r\n");
        p.quit();
    });
    let addr = srv.addr;
    let r = run(async move {
        let mut c = connect(addr, &opts()).await.unwrap();
        assert!(!c.extensions().esmtp);
        let r = c.send(&env(&["a@x"]), &[0], BODY).await.unwrap();
        c.quit().await;
        r
    });
    assert_eq!(codes(&r), [(0, 250)]);
    srv.finish();
}

#[test]
fn timeout_on_a_silent_server() {
    let srv = server(|p| {
        // Never greet; wait for the client to give up.
        let mut b = [0u8; 1];
        let _ = p.io().read(&mut b);
    });
    let addr = srv.addr;
    let mut o = opts();
    o.timeouts = Timeouts::uniform(Duration::from_millis(300));
    let started = std::time::Instant::now();
    let e = run(async move { connect(addr, &o).await.err().unwrap() });
    assert!(matches!(e, ClientError::Timeout(Stage::Greeting)), "{e}");
    assert!(started.elapsed() < Duration::from_secs(3));
    srv.finish();
}

/// A next hop that trickles its reply (every byte well within the wait, but the reply
/// far slower than `min_data_rate`) is cut off at the reply's deadline: the wait plus
/// bytes / rate, not a fresh wait per read. The server sees the client go away (its
/// writes fail) long before it would have finished the reply.
#[test]
fn a_trickled_reply_times_out_at_its_deadline_not_per_read() {
    const LINES: usize = 40;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let hop = std::thread::spawn(move || {
        let (mut tcp, _) = listener.accept().unwrap();
        // 40 lines of 30 bytes, one byte per 20 ms (50 B/s): 24 s in all.
        let line = b"220-trickle trickle trickle..\r\n";
        let mut sent = 0usize;
        for _ in 0..LINES {
            for &b in line.iter() {
                if tcp.write_all(&[b]).and_then(|()| tcp.flush()).is_err() {
                    return sent;
                }
                sent += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = tcp.write_all(b"220 done\r\n");
        sent
    });
    let mut o = opts();
    // Each read comes 20 ms after the last, far within 600 ms; at 100 B/s the 50 B/s
    // reply falls behind: deadline ≈ 0.6 s + 0.5 × elapsed, reached at ≈ 1.2 s.
    o.timeouts = Timeouts::uniform(Duration::from_millis(600));
    o.timeouts.min_data_rate = 100;
    let started = std::time::Instant::now();
    let e = run(async move { connect(addr, &o).await.err().unwrap() });
    let took = started.elapsed();
    assert!(matches!(e, ClientError::Timeout(Stage::Greeting)), "{e}");
    assert!(took < Duration::from_secs(6), "{took:?}");
    // The event on the other side: the server's writes failed once the client left.
    let sent = hop.join().expect("next hop");
    assert!(sent < LINES * 30, "the whole reply went out: {sent} bytes");
}

#[test]
fn timeout_waiting_for_the_final_reply_breaks_the_connection() {
    let srv = server(|p| {
        p.say("220 mx.test\r\n");
        p.ehlo(&["PIPELINING"]);
        p.read_once();
        p.say("250 ok\r\n250 ok\r\n354 go\r\n");
        p.data();
        let mut b = [0u8; 1];
        let _ = p.io().read(&mut b);
    });
    let addr = srv.addr;
    let mut o = opts();
    o.timeouts = Timeouts::uniform(Duration::from_secs(5));
    o.timeouts.data_final = Duration::from_millis(300);
    run(async move {
        let mut c = connect(addr, &o).await.unwrap();
        let e = c.send(&env(&["a@x"]), &[0], BODY).await.err().unwrap();
        assert!(matches!(e, ClientError::Timeout(Stage::DataFinal)), "{e}");
        assert!(!c.is_usable());
        assert!(matches!(
            c.send(&env(&["a@x"]), &[0], BODY).await,
            Err(ClientError::Broken)
        ));
        c.quit().await;
    });
    srv.finish();
}

#[test]
fn garbage_replies_are_errors_not_panics() {
    for garbage in [
        &b"hello world\r\n"[..],
        b"220-ok\r\n250 mismatch\r\n",
        b"999 nine\r\n",
        &[b'2'; 10_000][..],
        b"\xff\xfe\x00\r\n",
    ] {
        let g = garbage.to_vec();
        let srv = server(move |p| {
            p.io().write_all(&g).unwrap();
            let mut b = [0u8; 64];
            let _ = p.io().read(&mut b);
        });
        let addr = srv.addr;
        let e = run(async move { connect(addr, &opts()).await.err().unwrap() });
        assert!(
            matches!(
                e,
                ClientError::BadReply {
                    stage: Stage::Greeting,
                    ..
                }
            ),
            "{e}"
        );
        srv.finish();
    }
    // Garbage in the middle of a pipelined transaction, and a server that hangs up.
    for (reply, closed) in [(&b"250 ok\r\nxyz\r\n"[..], false), (b"250 ok\r\n", true)] {
        let reply = reply.to_vec();
        let srv = server(move |p| {
            p.say("220 mx.test\r\n");
            p.ehlo(&["PIPELINING"]);
            p.read_once();
            p.io().write_all(&reply).unwrap();
        });
        let addr = srv.addr;
        let e = run(async move {
            let mut c = connect(addr, &opts()).await.unwrap();
            c.send(&env(&["a@x"]), &[0], BODY).await.err().unwrap()
        });
        if closed {
            assert!(matches!(e, ClientError::Closed(Stage::Rcpt)), "{e}");
        } else {
            assert!(
                matches!(
                    e,
                    ClientError::BadReply {
                        stage: Stage::Rcpt,
                        ..
                    }
                ),
                "{e}"
            );
        }
        srv.finish();
    }
}

#[test]
fn service_closing_421_is_a_connection_error() {
    let srv = server(|p| {
        p.say("220 mx.test\r\n");
        p.ehlo(&[]);
        p.expect("MAIL");
        p.say("250 ok\r\n");
        p.expect("RCPT");
        p.say("421 4.7.0 shutting down\r\n");
    });
    let addr = srv.addr;
    let e = run(async move {
        let mut c = connect(addr, &opts()).await.unwrap();
        c.send(&env(&["a@x"]), &[0], BODY).await.err().unwrap()
    });
    match e {
        ClientError::ServiceClosing(r) => assert_eq!(r.enhanced, Some((4, 7, 0))),
        e => panic!("{e}"),
    }
    srv.finish();
}

#[test]
fn chunking_server_gets_mail_rcpt_bdat_and_the_unstuffed_body_in_one_write() {
    let body: &'static [u8] = b"Subject: c\r\n\r\n.leading dot\r\n.\r\nend\r\n";
    let srv = server(move |p| {
        p.say("220 mx.test\r\n");
        p.ehlo(&["PIPELINING", "CHUNKING", "8BITMIME"]);
        let mut expected = format!(
            "MAIL FROM:<from@example.org>\r\nRCPT TO:<a@x>\r\nRCPT TO:<b@x>\r\nBDAT {} LAST\r\n",
            body.len()
        )
        .into_bytes();
        expected.extend_from_slice(body);
        let mut got = p.read_once();
        while got.len() < expected.len() && p.fill() > 0 {
            got.append(&mut p.buf);
        }
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&expected)
        );
        p.say("250 ok\r\n250 ok\r\n451 4.3.0 later\r\n250 2.0.0 chunked ok\r\n");
        p.quit();
    });
    let addr = srv.addr;
    let r = run(async move {
        let mut c = connect(addr, &opts()).await.unwrap();
        let r = c.send(&env(&["a@x", "b@x"]), &[0, 1], body).await.unwrap();
        c.quit().await;
        r
    });
    let mut r = codes(&r);
    r.sort();
    assert_eq!(r, [(0, 250), (1, 451)]);
    srv.finish();
}

#[test]
fn chunking_with_every_recipient_refused_reads_the_bdat_reply_and_keeps_the_connection() {
    let srv = server(move |p| {
        p.say("220 mx.test\r\n");
        p.ehlo(&["PIPELINING", "CHUNKING"]);
        p.expect("MAIL FROM:");
        p.expect("RCPT TO:<a@x>");
        p.bdat_last();
        // RFC 3030: the server consumes the chunk and refuses it.
        p.say("250 ok\r\n550 5.1.1 no such user\r\n554 5.5.1 no valid recipients\r\n");
        // The same connection carries the next message, in step.
        p.expect("RSET");
        p.expect("MAIL FROM:");
        p.expect("RCPT TO:<b@x>");
        assert_eq!(p.bdat_last(), BODY);
        p.say("250 reset\r\n250 ok\r\n250 ok\r\n250 2.0.0 second ok\r\n");
        p.quit();
    });
    let addr = srv.addr;
    let (first, second) = run(async move {
        let mut c = connect(addr, &opts()).await.unwrap();
        let first = c.send(&env(&["a@x"]), &[0], BODY).await.unwrap();
        assert!(c.is_usable());
        let second = c.send(&env(&["b@x"]), &[0], BODY).await.unwrap();
        c.quit().await;
        (first, second)
    });
    assert_eq!(codes(&first), [(0, 550)]);
    assert_eq!(codes(&second), [(0, 250)]);
    assert_eq!(second[0].1.text, "second ok");
    srv.finish();
}

#[test]
fn chunking_uses_data_for_bare_line_endings_and_large_bodies() {
    let big: &'static [u8] = Box::leak(
        b"Subject: big\r\n\r\n"
            .iter()
            .copied()
            .chain(std::iter::repeat_n(b"0123456789abcde\r\n".iter().copied(), 5000).flatten())
            .collect::<Vec<u8>>()
            .into_boxed_slice(),
    );
    assert!(big.len() > tern_queue::client::PIPELINED_CHUNK_MAX);
    let bare: &'static [u8] = b"Subject: b\r\n\r\nbare\nlf\r\n";
    let srv = server(move |p| {
        p.say("220 mx.test\r\n");
        p.ehlo(&["PIPELINING", "CHUNKING"]);
        // A bare LF: DATA, which repairs it (never a bare LF on the wire).
        p.expect("MAIL FROM:");
        p.expect("RCPT TO:<a@x>");
        p.expect("DATA");
        p.say("250 ok\r\n250 ok\r\n354 go\r\n");
        assert_eq!(p.data(), b"Subject: b\r\n\r\nbare\r\nlf\r\n.\r\n");
        p.say("250 2.0.0 repaired\r\n");
        // Too large to pipeline: DATA after the replies.
        p.expect("RSET");
        p.expect("MAIL FROM:");
        p.expect("RCPT TO:<a@x>");
        p.expect("DATA");
        p.say("250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n");
        let d = p.data();
        assert_eq!(d.len(), big.len() + 3);
        p.say("250 2.0.0 big\r\n");
        p.quit();
    });
    let addr = srv.addr;
    let (a, b) = run(async move {
        let mut c = connect(addr, &opts()).await.unwrap();
        let a = c.send(&env(&["a@x"]), &[0], bare).await.unwrap();
        let b = c.send(&env(&["a@x"]), &[0], big).await.unwrap();
        c.quit().await;
        (a, b)
    });
    assert_eq!(a[0].1.text, "repaired");
    assert_eq!(b[0].1.text, "big");
    srv.finish();
}

/// Two messages on one connection, each pipelined with BDAT; the server answers the
/// second group (RSET, MAIL, RCPT, BDAT) with `second`. The second message's outcome, and
/// whether the connection is still usable afterwards.
fn second_message_after_refused_rset(
    second: &'static str,
) -> (Result<Vec<(usize, Reply)>, ClientError>, bool) {
    let srv = server(move |p| {
        p.say("220 mx.test\r\n");
        p.ehlo(&["PIPELINING", "CHUNKING"]);
        p.expect("MAIL FROM:");
        p.expect("RCPT TO:<a@x>");
        p.bdat_last();
        p.say("250 ok\r\n250 ok\r\n250 2.0.0 first\r\n");
        p.expect("RSET");
        p.expect("MAIL FROM:");
        p.expect("RCPT TO:<b@x>");
        p.bdat_last();
        p.say(second);
    });
    let addr = srv.addr;
    let r = run(async move {
        let mut c = connect(addr, &opts()).await.unwrap();
        let first = c.send(&env(&["a@x"]), &[0], BODY).await.unwrap();
        assert_eq!(first[0].1.text, "first");
        let second = c.send(&env(&["b@x"]), &[0], BODY).await;
        let usable = c.is_usable();
        c.quit().await;
        (second, usable)
    });
    srv.finish();
    r
}

#[test]
fn a_refused_rset_with_the_message_pipelined_reads_on_and_keeps_a_taken_message() {
    // RSET refused, but the server takes the message all the same: delivered, not sent
    // again.
    let (second, usable) = second_message_after_refused_rset(
        "451 4.3.0 odd\r\n250 ok\r\n250 ok\r\n250 2.0.0 taken anyway\r\n",
    );
    let second = second.expect("a message the server took is a result, not an error");
    assert_eq!(codes(&second), [(0, 250)]);
    assert_eq!(second[0].1.text, "taken anyway");
    assert!(!usable, "a connection that refused RSET is not used again");
}

#[test]
fn a_refused_rset_with_the_message_pipelined_and_not_taken_is_an_error_to_retry() {
    // A 5xx here follows from the refused RSET: it must not bounce the message.
    let (second, _) = second_message_after_refused_rset(
        "503 5.5.1 bad sequence\r\n503 5.5.1 no\r\n503 5.5.1 no\r\n503 5.5.1 no\r\n",
    );
    match second {
        Err(ClientError::Unexpected {
            stage: Stage::Rset,
            reply,
        }) => assert_eq!(reply.code, 503),
        other => panic!("expected an RSET error, got {other:?}"),
    }
}

#[test]
fn binarymime_with_chunking_off_waits_for_the_rcpt_replies_before_bdat() {
    let body: &'static [u8] = b"Subject: bin\r\n\r\n\x00\x01";
    let srv = server(move |p| {
        p.say("220 mx.test\r\n");
        p.ehlo(&["PIPELINING", "CHUNKING", "BINARYMIME"]);
        p.expect("MAIL FROM:<from@example.org> BODY=BINARYMIME");
        p.expect("RCPT TO:<a@x>");
        p.say("250 ok\r\n550 5.1.1 no such user\r\n");
        // Nothing was accepted: a client that waited sends no chunk at all.
        p.quit();
    });
    let addr = srv.addr;
    let mut o = opts();
    o.chunking = false;
    let mut e = env(&["a@x"]);
    e.body_type = BodyType::BinaryMime;
    let r = send_once(addr, o, e, &[0], body.to_vec());
    assert_eq!(codes(&r), [(0, 550)]);
    srv.finish();
}

#[test]
fn chunking_off_sends_data_although_the_server_offers_chunking() {
    let srv = server(|p| {
        p.say("220 mx.test\r\n");
        p.ehlo(&["PIPELINING", "CHUNKING"]);
        let batch = String::from_utf8(p.read_once()).unwrap();
        assert_eq!(
            batch,
            "MAIL FROM:<from@example.org>\r\nRCPT TO:<a@x>\r\nDATA\r\n"
        );
        p.say("250 ok\r\n250 ok\r\n354 go\r\n");
        assert_eq!(p.data(), b"Subject: t\r\n\r\nhello\r\n.\r\n");
        p.say("250 2.0.0 data ok\r\n");
        p.quit();
    });
    let addr = srv.addr;
    let mut o = opts();
    o.chunking = false;
    let r = send_once(addr, o, env(&["a@x"]), &[0], BODY.to_vec());
    assert_eq!(r[0].1.text, "data ok");
    srv.finish();
}

#[test]
fn bdat_for_binarymime() {
    let body: &'static [u8] = b"Subject: bin\r\n\r\n\x00\x01.\r\n.\r\n\xff";
    let srv = server(move |p| {
        p.say("220 mx.test\r\n");
        p.ehlo(&["PIPELINING", "CHUNKING", "BINARYMIME", "8BITMIME"]);
        p.expect("MAIL FROM:<from@example.org> BODY=BINARYMIME");
        p.expect("RCPT TO:<a@x>");
        p.say("250 ok\r\n250 ok\r\n");
        let header = p.line();
        assert_eq!(header, format!("BDAT {} LAST", body.len()));
        assert_eq!(p.exact(body.len()), body);
        p.say("250 2.0.0 binary ok\r\n");
        p.quit();
    });
    let addr = srv.addr;
    let mut e = env(&["a@x"]);
    e.body_type = BodyType::BinaryMime;
    let r = send_once(addr, opts(), e, &[0], body.to_vec());
    assert_eq!(r[0].1.text, "binary ok");
    srv.finish();
}

#[test]
fn binarymime_without_server_support_fails_locally_with_5_6_3() {
    let srv = server(|p| {
        p.say("220 mx.test\r\n");
        p.ehlo(&["PIPELINING", "CHUNKING", "8BITMIME"]);
        // Nothing is sent for the message.
        p.quit();
    });
    let addr = srv.addr;
    let mut e = env(&["a@x", "b@x"]);
    e.body_type = BodyType::BinaryMime;
    let r = send_once(addr, opts(), e, &[0, 1], BODY.to_vec());
    assert_eq!(codes(&r), [(0, 554), (1, 554)]);
    assert_eq!(r[0].1.enhanced, Some((5, 6, 3)));
    srv.finish();
}

#[test]
fn size_smtputf8_and_8bitmime_parameters() {
    let srv = server(|p| {
        p.say("220 mx.test\r\n");
        p.ehlo(&["SIZE 10", "8BITMIME", "SMTPUTF8"]);
        // Message 1 is too big for SIZE 10: nothing is sent for it (and no RSET after it).
        p.expect("MAIL FROM:<from@example.org> SIZE=3 BODY=8BITMIME SMTPUTF8");
        p.say("250 ok\r\n");
        p.expect("RCPT TO:<\u{e9}@x>");
        p.say("250 ok\r\n");
        p.expect("DATA");
        p.say("354 go\r\n");
        p.data();
        p.say("250 ok\r\n");
        p.quit();
    });
    let addr = srv.addr;
    let (r1, r2) = run(async move {
        let mut c = connect(addr, &opts()).await.unwrap();
        let mut e = env(&["\u{e9}@x"]);
        e.body_type = BodyType::EightBitMime;
        e.smtputf8 = true;
        let r1 = c.send(&e, &[0], BODY).await.unwrap();
        let r2 = c.send(&e, &[0], b"\xe9\r\n").await.unwrap();
        c.quit().await;
        (r1, r2)
    });
    assert_eq!(r1[0].1.code, 552);
    assert_eq!(r1[0].1.enhanced, Some((5, 3, 4)));
    assert_eq!(r2[0].1.code, 250);
    srv.finish();
}

#[test]
fn connect_refused_is_a_connect_error() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    let e = run(async move { connect(addr, &opts()).await.err().unwrap() });
    assert!(matches!(e, ClientError::Connect { .. }), "{e}");
}
