//! 21: milter (protocol 6, tern as the MTA) against a scripted milter server double.
//!
//! `FakeMilter` is a small blocking milter server written here from the protocol
//! (libmilter's mfdef.h): it negotiates the actions and protocol steps a test scripts,
//! records every packet tern sends (command byte and data, per connection), answers each
//! stage that expects an answer (with a scripted verdict where one is set), and at
//! end-of-message sends the scripted edits and verdict. It can also misbehave: close the
//! connection at the first body chunk, answer garbage, or never answer.
//!
//! The tests check the byte stream (negotiation, macros with the queue id the client was
//! told, CONNECT/HELO/MAIL/RCPT/headers/body), that skipped and unanswered stages cost
//! nothing, every edit as it lands in the spool, every verdict as the client sees it (with
//! a filter's CR/LF never reaching it), quarantine (held in the queue), and the failures:
//! the default action taken, exactly one reply per message, nothing stored twice. And the
//! shard's connection pool: sessions reuse a connection (`SMFIC_QUIT_NC`, no new
//! negotiation) only where libmilter's state machine takes QUIT_NC, a connection the
//! filter closed while idle is replaced without losing or answering a message twice, and
//! a reload that moves a filter drops its idle connections.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tern_tests::{tern_bin, wait_for, Server};

#[derive(Clone, Copy, PartialEq)]
enum Misbehave {
    None,
    /// Close the connection at the first body chunk.
    DieAtBody,
    /// Answer the body with bytes that are no milter packet.
    GarbageAtBody,
    /// Never answer end-of-message.
    StallAtEom,
}

#[derive(Clone)]
struct Script {
    actions: u32,
    protocol: u32,
    /// (command byte, reply packet) replacing the default 'c' at that stage.
    at: Vec<(u8, Vec<u8>)>,
    /// Packets sent at end of message before the final one.
    eom: Vec<Vec<u8>>,
    verdict: Vec<u8>,
    misbehave: Misbehave,
    /// A header (`SMFIC_HEADER`) whose bytes contain this is rejected ('r').
    refuse_header: Option<&'static [u8]>,
}

impl Default for Script {
    fn default() -> Self {
        Script {
            actions: 0x1ff,
            protocol: 0,
            at: Vec::new(),
            eom: Vec::new(),
            verdict: packet(b'c', b""),
            misbehave: Misbehave::None,
            refuse_header: None,
        }
    }
}

fn packet(code: u8, data: &[u8]) -> Vec<u8> {
    let mut p = ((data.len() + 1) as u32).to_be_bytes().to_vec();
    p.push(code);
    p.extend_from_slice(data);
    p
}

fn cstrs(parts: &[&str]) -> Vec<u8> {
    let mut v = Vec::new();
    for p in parts {
        v.extend_from_slice(p.as_bytes());
        v.push(0);
    }
    v
}

type Log = Arc<Mutex<Vec<Vec<(u8, Vec<u8>)>>>>;

/// A connection the double accepted: TCP or unix.
trait Peer: Read + Write + Send + Sized + 'static {
    fn dup(&self) -> Option<Self>;
    fn close(&self);
}

impl Peer for TcpStream {
    fn dup(&self) -> Option<Self> {
        self.try_clone().ok()
    }
    fn close(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
}

impl Peer for UnixStream {
    fn dup(&self) -> Option<Self> {
        self.try_clone().ok()
    }
    fn close(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
}

type Closers = Arc<Mutex<Vec<Box<dyn Fn() + Send>>>>;

struct FakeMilter {
    /// What tern's `socket` setting says.
    socket: String,
    log: Log,
    /// Closes every accepted connection (a filter restart).
    socks: Closers,
    /// Set before the accept loop is woken up for the last time (`stop`).
    stop: Arc<AtomicBool>,
}

impl FakeMilter {
    fn start(script: Script) -> FakeMilter {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let socket = format!("inet:{}", l.local_addr().unwrap());
        FakeMilter::run(socket, move || l.accept().map(|(s, _)| s), script)
    }

    /// Listening on a unix socket at `path`.
    fn start_unix(path: &Path, script: Script) -> FakeMilter {
        let l = UnixListener::bind(path).unwrap();
        let socket = format!("unix:{}", path.display());
        FakeMilter::run(socket, move || l.accept().map(|(s, _)| s), script)
    }

    fn run<P: Peer>(
        socket: String,
        mut accept: impl FnMut() -> std::io::Result<P> + Send + 'static,
        script: Script,
    ) -> FakeMilter {
        let log: Log = Arc::default();
        let log2 = log.clone();
        let socks: Closers = Arc::default();
        let socks2 = socks.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        std::thread::spawn(move || {
            while let Ok(s) = accept() {
                if stop2.load(Ordering::SeqCst) {
                    // Dropping `accept` closes the listener.
                    return;
                }
                if let Some(c) = s.dup() {
                    socks2.lock().unwrap().push(Box::new(move || c.close()));
                }
                let idx = {
                    let mut g = log2.lock().unwrap();
                    g.push(Vec::new());
                    g.len() - 1
                };
                let log3 = log2.clone();
                let sc = script.clone();
                std::thread::spawn(move || {
                    // `socks` holds a clone: a conversation that ends closes it here.
                    let end = s.dup();
                    serve(s, sc, log3, idx);
                    if let Some(e) = end {
                        e.close();
                    }
                });
            }
        });
        FakeMilter {
            socket,
            log,
            socks,
            stop,
        }
    }

    /// Closes every connection, as a filter that restarts does.
    fn kill_connections(&self) {
        for close in self.socks.lock().unwrap().drain(..) {
            close();
        }
    }

    /// The filter process exits: its connections close, then its unix listener (woken by
    /// one last connection, which it drops) and the socket file is removed, as a
    /// restarting filter does before it binds the path again.
    fn stop_unix(self, path: &Path) {
        self.kill_connections();
        self.stop.store(true, Ordering::SeqCst);
        let _ = UnixStream::connect(path);
        std::fs::remove_file(path).unwrap();
    }

    fn socket(&self) -> String {
        self.socket.clone()
    }

    fn conns(&self) -> Vec<Vec<(u8, Vec<u8>)>> {
        self.log.lock().unwrap().clone()
    }
}

fn read_packet(s: &mut impl Read) -> Option<(u8, Vec<u8>)> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).ok()?;
    let n = u32::from_be_bytes(len) as usize;
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).ok()?;
    let code = *b.first()?;
    Some((code, b[1..].to_vec()))
}

fn serve(mut s: impl Read + Write, sc: Script, log: Log, idx: usize) {
    while let Some((code, data)) = read_packet(&mut s) {
        log.lock().unwrap()[idx].push((code, data.clone()));
        let reply: Option<Vec<u8>> = match code {
            b'O' => {
                let mut d = 6u32.to_be_bytes().to_vec();
                d.extend_from_slice(&sc.actions.to_be_bytes());
                d.extend_from_slice(&sc.protocol.to_be_bytes());
                Some(packet(b'O', &d))
            }
            b'D' | b'A' | b'K' => None,
            b'Q' => return,
            b'E' => {
                if sc.misbehave == Misbehave::StallAtEom {
                    std::thread::sleep(Duration::from_secs(30));
                    return;
                }
                for p in &sc.eom {
                    let _ = s.write_all(p);
                }
                Some(sc.verdict.clone())
            }
            b'L' if sc
                .refuse_header
                .is_some_and(|n| data.windows(n.len()).any(|w| w == n)) =>
            {
                Some(packet(b'r', b""))
            }
            b'B' if sc.misbehave == Misbehave::DieAtBody => return,
            b'B' if sc.misbehave == Misbehave::GarbageAtBody => {
                Some(b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec())
            }
            c => {
                let nr = match c {
                    b'C' => 0x1000,
                    b'H' => 0x2000,
                    b'M' => 0x4000,
                    b'R' => 0x8000,
                    b'T' => 0x10000,
                    b'L' => 0x80,
                    b'N' => 0x40000,
                    b'B' => 0x80000,
                    b'U' => 0x20000,
                    _ => 0,
                };
                if sc.protocol & nr != 0 {
                    None
                } else {
                    Some(
                        sc.at
                            .iter()
                            .find(|(k, _)| *k == c)
                            .map(|(_, p)| p.clone())
                            .unwrap_or_else(|| packet(b'c', b"")),
                    )
                }
            }
        };
        if let Some(r) = reply {
            if s.write_all(&r).is_err() {
                return;
            }
        }
    }
}

/// The macros of the `SMFIC_MACRO` packet for stage `stage` in a conversation.
fn macros(conv: &[(u8, Vec<u8>)], stage: u8) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (c, d) in conv {
        if *c == b'D' && d.first() == Some(&stage) {
            let parts: Vec<String> = d[1..]
                .split(|&b| b == 0)
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .collect();
            for kv in parts.chunks(2) {
                if kv.len() == 2 {
                    out.push((kv[0].clone(), kv[1].clone()));
                }
            }
        }
    }
    out
}

fn get(m: &[(String, String)], k: &str) -> Option<String> {
    m.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
}

const MSG: &[u8] =
    b"From: a@example.org\r\nTo: b@example.net\r\nSubject: hello\r\n\r\nline one\r\nline two\r\n";

fn server_with(sockets: &[(String, &str)], extra: &[&str]) -> Server {
    let filters: Vec<String> = sockets
        .iter()
        .map(|(s, more)| format!("{{socket=\"{s}\"{more}}}"))
        .collect();
    let f = format!("milter.filters=[{}]", filters.join(","));
    let mut sets: Vec<&str> = vec![&f, r#"relay.trusted_networks=["127.0.0.0/8"]"#];
    sets.extend_from_slice(extra);
    Server::with(&sets)
}

/// Sends MSG and returns the reply to the end of data.
fn send(s: &Server, from: &str, to: &[&str], body: &[u8]) -> tern_tests::Reply {
    let mut c = s.smtp();
    c.ehlo("client.example");
    c.expect(&format!("MAIL FROM:<{from}>"), 250, "2.1.0");
    for t in to {
        c.expect(&format!("RCPT TO:<{t}>"), 250, "2.1.5");
    }
    c.expect("DATA", 354, "");
    let mut wire = tern_tests::dot_stuff(body);
    wire.extend_from_slice(b".\r\n");
    c.send(&wire);
    let r = c.read_reply();
    // Exactly one reply: the next command gets its own.
    c.expect("NOOP", 250, "2.0.0");
    r
}

#[test]
fn byte_stream_and_macros() {
    let f = FakeMilter::start(Script::default());
    let s = server_with(&[(f.socket(), "")], &[]);
    let r = send(
        &s,
        "a@example.org",
        &["b@example.net", "c@example.net"],
        MSG,
    );
    r.check(250, "2.0.0 Ok: queued as");
    let id = r.queued_id();
    let conns = f.conns();
    assert_eq!(conns.len(), 1);
    let conv = &conns[0];
    // Negotiation: version 6, every action offered.
    assert_eq!(conv[0].0, b'O');
    assert_eq!(&conv[0].1[..4], &6u32.to_be_bytes());
    assert_eq!(&conv[0].1[4..8], &0x1ffu32.to_be_bytes());
    let order: Vec<u8> = conv
        .iter()
        .map(|(c, _)| *c)
        .filter(|c| *c != b'D')
        .collect();
    assert_eq!(
        order,
        b"OCHMRRTLLLNBE".to_vec(),
        "{:?}",
        String::from_utf8_lossy(&order)
    );
    let connect = macros(conv, b'C');
    assert_eq!(get(&connect, "{client_addr}").as_deref(), Some("127.0.0.1"));
    assert_eq!(get(&connect, "{daemon_name}").as_deref(), Some("smtp"));
    assert!(get(&connect, "j").is_some_and(|j| !j.is_empty()));
    assert!(get(&connect, "{client_name}").is_some());
    let mail = macros(conv, b'M');
    assert_eq!(get(&mail, "i").as_deref(), Some(id.as_str()));
    assert_eq!(get(&mail, "{mail_addr}").as_deref(), Some("a@example.org"));
    let rcpts: Vec<String> = macros(conv, b'R')
        .into_iter()
        .filter(|(k, _)| k == "{rcpt_addr}")
        .map(|(_, v)| v)
        .collect();
    assert_eq!(rcpts, ["b@example.net", "c@example.net"]);
    assert_eq!(get(&macros(conv, b'E'), "i").as_deref(), Some(id.as_str()));
    // CONNECT: host name, family '4', port, address.
    let c = &conv.iter().find(|(c, _)| *c == b'C').unwrap().1;
    let nul = c.iter().position(|&b| b == 0).unwrap();
    assert_eq!(c[nul + 1], b'4');
    assert_eq!(&c[nul + 4..], b"127.0.0.1\0");
    let find = |code: u8| -> Vec<Vec<u8>> {
        conv.iter()
            .filter(|(c, _)| *c == code)
            .map(|(_, d)| d.clone())
            .collect()
    };
    assert_eq!(find(b'H'), [b"client.example\0".to_vec()]);
    assert_eq!(find(b'M'), [b"<a@example.org>\0".to_vec()]);
    assert_eq!(find(b'L')[2], b"Subject\0hello\0".to_vec());
    assert_eq!(find(b'B').concat(), b"line one\r\nline two\r\n".to_vec());
    // Stored as sent (nothing edited).
    let st = s.stored_by_id(&id);
    assert!(st.body.ends_with(MSG));
}

#[test]
fn skipped_and_unanswered_stages_are_not_sent_or_waited_for() {
    // NOHELO | NOHDRS | NOBODY, and no reply for CONNECT, MAIL, RCPT, DATA, EOH.
    let protocol = 0x2 | 0x20 | 0x10 | 0x1000 | 0x4000 | 0x8000 | 0x10000 | 0x40000;
    let f = FakeMilter::start(Script {
        protocol,
        eom: vec![packet(b'h', &cstrs(&["X-Checked", "eom only"]))],
        ..Script::default()
    });
    let s = server_with(&[(f.socket(), "")], &[]);
    let r = send(&s, "a@example.org", &["b@example.net"], MSG);
    r.check(250, "2.0.0");
    let conv = &f.conns()[0];
    let order: Vec<u8> = conv
        .iter()
        .map(|(c, _)| *c)
        .filter(|c| *c != b'D')
        .collect();
    assert_eq!(
        order,
        b"OCMRTNE".to_vec(),
        "{}",
        String::from_utf8_lossy(&order)
    );
    let st = s.stored_by_id(&r.queued_id());
    assert!(tern_tests::find(&st.body, b"X-Checked: eom only\r\n").is_some());
}

#[test]
fn every_edit_lands_in_the_spool() {
    let mut body = Vec::new();
    body.extend_from_slice(&packet(b'b', b"replaced body\r\n"));
    let f = FakeMilter::start(Script {
        eom: vec![
            packet(b'h', &cstrs(&["X-Spam-Flag", "NO"])),
            {
                let mut d = 0u32.to_be_bytes().to_vec();
                d.extend_from_slice(&cstrs(&["X-First", "top"]));
                packet(b'i', &d)
            },
            {
                let mut d = 1u32.to_be_bytes().to_vec();
                d.extend_from_slice(&cstrs(&["Subject", "[filtered] hello"]));
                packet(b'm', &d)
            },
            {
                let mut d = 1u32.to_be_bytes().to_vec();
                d.extend_from_slice(&cstrs(&["To", ""]));
                packet(b'm', &d)
            },
            // A header value trying to start a field of its own.
            packet(b'h', &cstrs(&["X-Injected", "a\r\nBcc: evil@example.com"])),
            packet(b'+', &cstrs(&["<added@example.net>"])),
            packet(b'-', &cstrs(&["<c@example.net>"])),
            packet(b'e', &cstrs(&["<new-sender@example.org>"])),
            body,
        ],
        ..Script::default()
    });
    let s = server_with(&[(f.socket(), "")], &[]);
    let r = send(
        &s,
        "a@example.org",
        &["b@example.net", "c@example.net"],
        MSG,
    );
    r.check(250, "2.0.0");
    let st = s.stored_by_id(&r.queued_id());
    let (_, rest) = st.split_received();
    let text = String::from_utf8_lossy(rest).into_owned();
    assert_eq!(
        text,
        "X-First: top\r\nFrom: a@example.org\r\nSubject: [filtered] hello\r\nX-Spam-Flag: NO\r\nX-Injected: a\r\n\tBcc: evil@example.com\r\n\r\nreplaced body\r\n"
    );
    assert_eq!(st.sender, "new-sender@example.org");
    assert_eq!(st.recipients, ["b@example.net", "added@example.net"]);
}

#[test]
fn verdicts_reach_the_client_safely() {
    // (script, expected code, expected reply text part)
    let cases: Vec<(Script, u16, &str)> = vec![
        (
            Script {
                verdict: packet(b'r', b""),
                ..Script::default()
            },
            550,
            "5.7.1 Command rejected",
        ),
        (
            Script {
                verdict: packet(b't', b""),
                ..Script::default()
            },
            451,
            "4.7.1",
        ),
        (
            Script {
                verdict: packet(b'y', b"554 5.7.1 Spam detected\r\n250 fake\0"),
                ..Script::default()
            },
            554,
            "5.7.1 Spam detected; 250 fake",
        ),
    ];
    for (script, code, text) in cases {
        let f = FakeMilter::start(script);
        let s = server_with(&[(f.socket(), "")], &[]);
        let r = send(&s, "a@example.org", &["b@example.net"], MSG);
        r.check(code, text);
        assert!(!r.text().contains('\r'));
        assert!(s.stored().is_empty(), "a refused message was stored");
    }
    // A reply code that is not 4xx/5xx is a protocol error: the default action.
    let f = FakeMilter::start(Script {
        verdict: packet(b'y', b"250 2.0.0 fine\0"),
        ..Script::default()
    });
    let s = server_with(&[(f.socket(), "")], &[]);
    send(&s, "a@example.org", &["b@example.net"], MSG).check(451, "4.7.1");
    assert!(s.stored().is_empty());
}

#[test]
fn discard_answers_250_and_stores_nothing() {
    let f = FakeMilter::start(Script {
        verdict: packet(b'd', b""),
        ..Script::default()
    });
    let s = server_with(&[(f.socket(), "")], &[]);
    send(&s, "a@example.org", &["b@example.net"], MSG).check(250, "2.0.0 Ok: queued as");
    assert!(s.stored().is_empty());
    wait_for("the discard log line", Duration::from_secs(10), || {
        s.stderr_log().contains("discarded by milter")
    });
}

#[test]
fn quarantine_holds_the_message_until_released() {
    let f = FakeMilter::start(Script {
        eom: vec![packet(b'q', b"looks phishy\0")],
        ..Script::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let route = format!(
        r#"queue.routes={{"*"="maildir:{}/maildir"}}"#,
        dir.path().display()
    );
    let s = server_with(&[(f.socket(), "")], &[&route]);
    let r = send(&s, "a@example.org", &["b@example.net"], MSG);
    r.check(250, "2.0.0");
    let id = r.queued_id();
    let sock = s.spool().join("admin.sock");
    let tern = |args: &[&str]| {
        let out = Command::new(tern_bin()).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "tern {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // Held in the running server's queue (the runner's own index), with the reason.
    let held = tern(&[
        "queue",
        "list",
        "--json",
        "--state",
        "held",
        "--socket",
        sock.to_str().unwrap(),
    ]);
    assert!(held.contains(&id), "held list: {held}");
    assert!(held.contains("looks phishy"), "held list: {held}");
    // And in the spool itself (durable: the state record was committed before the 250).
    let offline = tern(&[
        "queue",
        "list",
        "--json",
        "--state",
        "held",
        "--spool",
        s.spool().to_str().unwrap(),
    ]);
    assert!(offline.contains(&id), "offline held list: {offline}");
    // Released, it is delivered.
    tern(&["queue", "release", &id, "--socket", sock.to_str().unwrap()]);
    let new = dir.path().join("maildir/new");
    wait_for("delivery after release", Duration::from_secs(20), || {
        std::fs::read_dir(&new).map(|d| d.count()).unwrap_or(0) == 1
    });
}

#[test]
fn failing_filters_get_their_default_action_once() {
    for mis in [
        Misbehave::DieAtBody,
        Misbehave::GarbageAtBody,
        Misbehave::StallAtEom,
    ] {
        let f = FakeMilter::start(Script {
            misbehave: mis,
            ..Script::default()
        });
        // tempfail (the default): 451, nothing stored, one reply.
        let s = server_with(&[(f.socket(), ", timeouts=\"E:1s\"")], &[]);
        send(&s, "a@example.org", &["b@example.net"], MSG).check(451, "4.7.1");
        assert!(s.stored().is_empty());
        drop(s);
        // accept: stored unfiltered, exactly once.
        let s = server_with(
            &[(f.socket(), ", timeouts=\"E:1s\", default_action=\"accept\"")],
            &[],
        );
        let r = send(&s, "a@example.org", &["b@example.net"], MSG);
        r.check(250, "2.0.0");
        let all = s.stored();
        assert_eq!(all.len(), 1);
        assert!(all[0].body.ends_with(MSG));
    }
    // Nobody listening at all: refused at the connect stage (421, the client retries
    // later), or with default_action accept, filtered by nobody.
    let dead = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = dead.local_addr().unwrap();
    drop(dead);
    let s = server_with(&[(format!("inet:{addr}"), "")], &[]);
    let mut c = tern_tests::Client::connect(s.smtp);
    c.read_reply().check(421, "4.7.1");
    assert!(c.closed());
    drop(s);
    let s = server_with(
        &[(format!("inet:{addr}"), ", default_action=\"accept\"")],
        &[],
    );
    send(&s, "a@example.org", &["b@example.net"], MSG).check(250, "2.0.0");
    assert_eq!(s.stored().len(), 1);
}

#[test]
fn filters_run_in_order_and_see_earlier_edits() {
    let first = FakeMilter::start(Script {
        eom: vec![packet(b'h', &cstrs(&["X-First", "1"]))],
        ..Script::default()
    });
    let second = FakeMilter::start(Script {
        eom: vec![packet(b'h', &cstrs(&["X-Second", "2"]))],
        ..Script::default()
    });
    let s = server_with(&[(first.socket(), ""), (second.socket(), "")], &[]);
    let r = send(&s, "a@example.org", &["b@example.net"], MSG);
    r.check(250, "2.0.0");
    let seen: Vec<Vec<u8>> = second.conns()[0]
        .iter()
        .filter(|(c, _)| *c == b'L')
        .map(|(_, d)| d.clone())
        .collect();
    assert!(seen.contains(&b"X-First\x001\0".to_vec()));
    let st = s.stored_by_id(&r.queued_id());
    assert!(tern_tests::find(&st.body, b"X-First: 1\r\nX-Second: 2\r\n\r\n").is_some());
}

#[test]
fn disabled_or_other_roles_cost_nothing() {
    let f = FakeMilter::start(Script {
        verdict: packet(b'r', b""),
        ..Script::default()
    });
    let s = server_with(&[(f.socket(), ", listeners=[\"submission\"]")], &[]);
    send(&s, "a@example.org", &["b@example.net"], MSG).check(250, "2.0.0");
    drop(s);
    let s = server_with(&[(f.socket(), "")], &["milter.enable=false"]);
    send(&s, "a@example.org", &["b@example.net"], MSG).check(250, "2.0.0");
    assert!(f.conns().is_empty(), "a disabled filter was contacted");
}

#[test]
fn check_config_refuses_bad_milter_settings() {
    for (bad, says) in [
        (
            r#"milter.filters=[{socket="tcp:1.2.3.4:5"}]"#,
            "milter.filters[0]",
        ),
        (
            r#"milter.filters=[{socket="inet:127.0.0.1:1", timeouts="Q:5s"}]"#,
            "milter.filters[0].timeouts",
        ),
        (r#"milter.filters=[{socket="unix:relative"}]"#, "absolute"),
        (r#"milter.default_action="maybe""#, "default_action"),
        (r#"milter.listeners=["lmtp"]"#, "milter.listeners"),
    ] {
        let out = Command::new(tern_bin())
            .args(["check-config", "--set", bad])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{bad} was accepted");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(says),
            "{bad}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// One raw HTTP/1.1 GET of /metrics: the body.
fn scrape(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).expect("connect to the metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    String::from_utf8_lossy(&raw).into_owned()
}

#[test]
fn outcomes_are_counted_per_filter_and_action() {
    let f = FakeMilter::start(Script {
        verdict: packet(b'r', b""),
        ..Script::default()
    });
    let s = server_with(&[(f.socket(), ", name=\"spamcheck\"")], &[]);
    send(&s, "a@example.org", &["b@example.net"], MSG).check(550, "5.7.1");
    send(&s, "a@example.org", &["b@example.net"], MSG).check(550, "5.7.1");
    let m = scrape(s.metrics.expect("metrics endpoint"));
    assert!(
        m.contains(
            r#"tern_milter_actions_total{shard="total",filter="spamcheck",action="reject"} 2"#
        ),
        "{m}"
    );
    assert!(
        m.contains(r#"tern_messages_rejected_total{shard="total",reason="milter"} 2"#),
        "{m}"
    );
    let out = Command::new(tern_bin())
        .args(["features", "--set"])
        .arg(format!(
            "milter.filters=[{{socket=\"{}\",name=\"spamcheck\"}}]",
            f.socket()
        ))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Milter filter: spamcheck at inet:127.0.0.1:"),
        "{text}"
    );
}

#[test]
fn refusals_at_connect_helo_mail_and_rcpt_answer_those_commands() {
    // CONNECT: the banner is the filter's refusal (554 for 5xx), and the session ends.
    let f = FakeMilter::start(Script {
        at: vec![(b'C', packet(b'y', b"550 5.7.1 You are on a list\0"))],
        ..Script::default()
    });
    let s = server_with(&[(f.socket(), "")], &[]);
    let mut c = tern_tests::Client::connect(s.smtp);
    c.read_reply().check(554, "5.7.1 You are on a list");
    assert!(c.closed());
    drop(s);
    // HELO tempfail: 451 to EHLO, and MAIL needs a HELO again.
    let f = FakeMilter::start(Script {
        at: vec![(b'H', packet(b't', b""))],
        ..Script::default()
    });
    let s = server_with(&[(f.socket(), "")], &[]);
    let mut c = s.smtp();
    c.expect("EHLO client.example", 451, "4.7.1");
    c.expect("MAIL FROM:<a@example.org>", 503, "5.5.1");
    drop(s);
    // MAIL: refused with the filter's text; the session goes on.
    let f = FakeMilter::start(Script {
        at: vec![(
            b'M',
            packet(b'y', b"553 5.1.8 Sender domain does not exist\0"),
        )],
        ..Script::default()
    });
    let s = server_with(&[(f.socket(), "")], &[]);
    let mut c = s.smtp();
    c.ehlo("client.example");
    c.expect(
        "MAIL FROM:<a@example.org>",
        553,
        "5.1.8 Sender domain does not exist",
    );
    c.expect("RCPT TO:<b@example.net>", 503, "5.5.1");
    drop(s);
    // RCPT: one recipient refused, the other accepted and delivered alone.
    let f = FakeMilter::start(Script {
        at: vec![(b'R', packet(b'y', b"550 5.1.1 No such user\0"))],
        ..Script::default()
    });
    let s = server_with(&[(f.socket(), "")], &[]);
    let mut c = s.smtp();
    c.ehlo("client.example");
    c.expect("MAIL FROM:<a@example.org>", 250, "2.1.0");
    c.expect("RCPT TO:<b@example.net>", 550, "5.1.1 No such user");
    c.expect("RSET", 250, "2.0.0");
    c.quit();
    drop(s);
    // A filter that rejects only one address (scripted per packet is not possible here:
    // accept at RCPT means "this filter is done with the message").
    let f = FakeMilter::start(Script {
        at: vec![(b'R', packet(b'a', b""))],
        eom: vec![packet(b'h', &cstrs(&["X-Never", "sent"]))],
        ..Script::default()
    });
    let s = server_with(&[(f.socket(), "")], &[]);
    let r = send(&s, "a@example.org", &["b@example.net"], MSG);
    r.check(250, "2.0.0");
    let st = s.stored_by_id(&r.queued_id());
    assert!(tern_tests::find(&st.body, b"X-Never").is_none());
    let order: Vec<u8> = f.conns()[0]
        .iter()
        .map(|(c, _)| *c)
        .filter(|c| *c != b'D')
        .collect();
    assert_eq!(
        order,
        b"OCHMR".to_vec(),
        "{}",
        String::from_utf8_lossy(&order)
    );
}

#[test]
fn the_real_client_behind_a_proxy_header_is_what_filters_see() {
    let f = FakeMilter::start(Script::default());
    let s = server_with(
        &[(f.socket(), "")],
        &[r#"listeners.proxy_from=["127.0.0.0/8"]"#],
    );
    let mut c = tern_tests::Client::connect(s.smtp);
    c.send(b"PROXY TCP4 203.0.113.9 127.0.0.1 5555 25\r\n");
    c.read_reply().check(220, "");
    c.ehlo("client.example");
    c.expect("MAIL FROM:<a@example.org>", 250, "2.1.0");
    c.quit();
    let conv = &f.conns()[0];
    assert_eq!(
        get(&macros(conv, b'C'), "{client_addr}").as_deref(),
        Some("203.0.113.9")
    );
    let connect = &conv.iter().find(|(c, _)| *c == b'C').unwrap().1;
    assert!(connect.ends_with(b"4\x15\xb3203.0.113.9\0"), "{connect:?}");
}

fn write_config(path: &std::path::Path, dir: &std::path::Path, milter: &str) {
    std::fs::write(
        path,
        format!(
            "hostname = \"localhost\"\nallow_root = true\n\
             [listeners]\nsmtp = [\"127.0.0.1:0\"]\nsubmission = []\nsmtps = []\n\
             [spool]\ndir = \"{d}/spool\"\n[auth]\nusers = \"{d}/users.db\"\n\
             [relay]\nlocal_domains = [\"localhost\"]\ntrusted_networks = [\"127.0.0.0/8\"]\n\
             [queue.routes]\n\"*\" = \"smtp:[127.0.0.1]:9\"\n\
             [executor]\nring_depth = 64\n{milter}\n",
            d = dir.display()
        ),
    )
    .unwrap();
}

#[test]
fn sighup_swaps_filters_and_refuses_a_bad_milter_section() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let rejecting = FakeMilter::start(Script {
        verdict: packet(b'r', b""),
        ..Script::default()
    });
    let tagging = FakeMilter::start(Script {
        eom: vec![packet(b'h', &cstrs(&["X-Tagged", "yes"]))],
        ..Script::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("tern.toml");
    let section = |sock: &str| {
        // One name throughout: a reload that moves "f" must not hand out connections to
        // where "f" was.
        format!("[milter]\ntimeouts = \"C:5s;E:30s\"\n[[milter.filters]]\nname = \"f\"\nsocket = \"{sock}\"\n")
    };
    write_config(&cfg, dir.path(), &section(&rejecting.socket()));
    let mut child = Command::new(tern_bin())
        .args(["serve", "--config"])
        .arg(&cfg)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let log = tern_tests::drain_text(child.stderr.take().unwrap());
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let pid = child.id() as i32;
    let _kill = Kill(child);
    let mut smtp = None;
    let mut line = String::new();
    let shards: usize = loop {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "exited: {}",
            log.lock().unwrap()
        );
        if let Some(a) = line.trim().strip_prefix("listening: smtp ") {
            smtp = Some(a.parse::<SocketAddr>().unwrap());
        }
        if let Some(n) = line.strip_prefix("ready: ") {
            break n.split_whitespace().next().unwrap().parse().unwrap();
        }
    };
    let smtp = smtp.unwrap();
    // Every shard applies a reload on its own after the main thread says "configuration
    // reloaded": wait until all of them have, or a session may land on one that has not.
    let applied = |n: usize| tern_tests::wait_applied(&log, shards, n);
    let mail = |expect: u16| {
        let mut c = tern_tests::Client::connect(smtp);
        c.expect_greeting();
        c.ehlo("client.example");
        c.expect("MAIL FROM:<a@example.org>", 250, "2.1.0");
        c.expect("RCPT TO:<b@example.net>", 250, "2.1.5");
        c.expect("DATA", 354, "");
        c.send(b"Subject: x\r\n\r\nhi\r\n.\r\n");
        let r = c.read_reply();
        assert_eq!(
            r.code,
            expect,
            "{r:?}; tern's log:\n{}",
            log.lock().unwrap()
        );
    };
    mail(550);
    // Another filter: new sessions use it.
    write_config(&cfg, dir.path(), &section(&tagging.socket()));
    unsafe { libc::kill(pid, libc::SIGHUP) };
    applied(1);
    mail(250);
    // A bad [milter]: refused, the previous filters stay.
    write_config(&cfg, dir.path(), "[milter]\ntimeouts = \"Z:1s\"\n");
    unsafe { libc::kill(pid, libc::SIGHUP) };
    wait_for("the refused reload", Duration::from_secs(10), || {
        log.lock().unwrap().contains("configuration not reloaded")
    });
    assert!(log.lock().unwrap().contains("milter.timeouts"));
    mail(250);
    assert_eq!(rejecting.conns().len(), 1);
    // Two sessions after the reload, over one or two connections (two shards, each with
    // its own pool: a tagged message ends in a state where the connection is reused).
    let tagged = tagging.conns();
    assert!(
        (1..=2).contains(&tagged.len()),
        "{} connections",
        tagged.len()
    );
    let connects = tagged.iter().flatten().filter(|(c, _)| *c == b'C').count();
    assert_eq!(connects, 2);
    // "f" moves back: the idle connections to the tagging filter are dropped, the next
    // session talks to the rejecting one.
    write_config(&cfg, dir.path(), &section(&rejecting.socket()));
    unsafe { libc::kill(pid, libc::SIGHUP) };
    applied(2);
    mail(550);
    mail(550);
    assert_eq!(rejecting.conns().len(), 3);
    let connects = tagging
        .conns()
        .iter()
        .flatten()
        .filter(|(c, _)| *c == b'C')
        .count();
    assert_eq!(connects, 2);
}

/// Waits until the server has ended `n` sessions (a session gives its filter connections
/// back after its client is gone; the next one must not start before that).
fn ended(s: &Server, n: usize) {
    wait_for("the session's end", Duration::from_secs(10), || {
        s.stderr_log().matches(" disconnect").count() >= n
    });
}

fn order(conv: &[(u8, Vec<u8>)]) -> String {
    conv.iter()
        .map(|(c, _)| *c as char)
        .filter(|c| *c != 'D')
        .collect()
}

#[test]
fn sessions_reuse_the_shards_filter_connection_and_a_dead_one_is_replaced() {
    let f = FakeMilter::start(Script::default());
    // One shard: one pool, so every session finds the connection the last one left.
    let s = server_with(&[(f.socket(), "")], &["shards=1"]);
    let mut ids = Vec::new();
    for n in 1..=3 {
        let r = send(&s, "a@example.org", &["b@example.net"], MSG);
        r.check(250, "2.0.0");
        ids.push(r.queued_id());
        ended(&s, n);
    }
    let conns = f.conns();
    assert_eq!(conns.len(), 1, "three sessions, one filter connection");
    // Negotiated once; each later session starts with SMFIC_QUIT_NC and its own CONNECT,
    // with its own macros.
    assert_eq!(
        order(&conns[0]),
        "OCHMRTLLLNBE".to_string() + "KCHMRTLLLNBE" + "KCHMRTLLLNBE"
    );
    let mail_ids: Vec<String> = conns[0]
        .iter()
        .filter(|(c, d)| *c == b'D' && d.first() == Some(&b'M'))
        .filter_map(|(_, d)| get(&macros(&[(b'D', d.clone())], b'M'), "i"))
        .collect();
    assert_eq!(mail_ids, ids);
    let connect_macros = conns[0]
        .iter()
        .filter(|(c, d)| *c == b'D' && d.first() == Some(&b'C'))
        .count();
    assert_eq!(connect_macros, 3);

    // The filter restarts between sessions: the idle connection is dead. The next
    // session gets a fresh one (negotiated again), its message is filtered and
    // acknowledged once, and stored once.
    f.kill_connections();
    let r = send(&s, "a@example.org", &["b@example.net"], MSG);
    r.check(250, "2.0.0");
    ids.push(r.queued_id());
    let conns = f.conns();
    assert_eq!(conns.len(), 2);
    assert_eq!(order(&conns[1]), "OCHMRTLLLNBE");
    let stored = s.stored();
    assert_eq!(stored.len(), 4);
    for id in &ids {
        assert!(s.stored_by_id(id).body.ends_with(MSG));
    }
    drop(s);

    // A filter that asks for end-of-message only has nothing answered before it: a dead
    // idle connection is noticed when it is taken from the pool, not at the message.
    let f = FakeMilter::start(Script {
        protocol: 0x1 | 0x2 | 0x4 | 0x8 | 0x10 | 0x20 | 0x40 | 0x100 | 0x200,
        ..Script::default()
    });
    let s = server_with(&[(f.socket(), "")], &["shards=1"]);
    send(&s, "a@example.org", &["b@example.net"], MSG).check(250, "2.0.0");
    ended(&s, 1);
    send(&s, "a@example.org", &["b@example.net"], MSG).check(250, "2.0.0");
    ended(&s, 2);
    assert_eq!(f.conns().len(), 1);
    f.kill_connections();
    send(&s, "a@example.org", &["b@example.net"], MSG).check(250, "2.0.0");
    let conns = f.conns();
    assert_eq!(conns.len(), 2);
    assert_eq!(order(&conns[1]), "OE");
    assert_eq!(s.stored().len(), 3);
}

/// The same on a unix socket (clamav-milter's usual setup): an end-of-message-only filter
/// restarts while its connection sits idle in the shard's pool. Nothing before DATA would
/// show the dead connection; the take checks it (as on TCP), so the next message is judged
/// by the restarted filter, not given the default action (review finding M2).
#[test]
fn a_unix_filter_restarted_while_idle_judges_the_next_message() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("filter.sock");
    let eom_only = Script {
        protocol: 0x1 | 0x2 | 0x4 | 0x8 | 0x10 | 0x20 | 0x40 | 0x100 | 0x200,
        ..Script::default()
    };
    let old = FakeMilter::start_unix(&path, eom_only.clone());
    let s = server_with(&[(old.socket(), "")], &["shards=1"]);
    send(&s, "a@example.org", &["b@example.net"], MSG).check(250, "2.0.0");
    ended(&s, 1);
    assert_eq!(old.conns().len(), 1);
    assert_eq!(order(&old.conns()[0]), "OE");
    // The restart: the old process's connections and listener close, the new one binds
    // the same path and marks what it judged.
    old.stop_unix(&path);
    let new = FakeMilter::start_unix(
        &path,
        Script {
            eom: vec![packet(b'h', &cstrs(&["X-Judged-By", "restarted filter"]))],
            ..eom_only
        },
    );
    let r = send(&s, "a@example.org", &["b@example.net"], MSG);
    r.check(250, "2.0.0");
    let conns = new.conns();
    assert_eq!(conns.len(), 1, "a fresh connection to the restarted filter");
    assert_eq!(order(&conns[0]), "OE");
    let stored = s.stored_by_id(&r.queued_id());
    let body = String::from_utf8_lossy(&stored.body).into_owned();
    assert!(
        body.contains("X-Judged-By: restarted filter"),
        "not judged by the new filter: {body}"
    );
    assert_eq!(s.stored().len(), 2);
    assert!(!s.stderr_log().contains("milter failed"));
}

#[test]
fn quit_nc_is_sent_only_where_libmilter_takes_it() {
    // Accept at end-of-message puts libmilter back in its HELO state, where it ignores
    // SMFIC_QUIT_NC and the next CONNECT: such a connection closes with its session.
    let f = FakeMilter::start(Script {
        verdict: packet(b'a', b""),
        ..Script::default()
    });
    let s = server_with(&[(f.socket(), "")], &["shards=1"]);
    for n in 1..=2 {
        send(&s, "a@example.org", &["b@example.net"], MSG).check(250, "2.0.0");
        ended(&s, n);
    }
    // A session without a message (the filter saw CONNECT and HELO only) too.
    let mut c = s.smtp();
    c.ehlo("client.example");
    c.quit();
    ended(&s, 3);
    send(&s, "a@example.org", &["b@example.net"], MSG).check(250, "2.0.0");
    let conns = f.conns();
    assert_eq!(conns.len(), 4);
    assert!(conns.iter().all(|c| !order(c).contains('K')));
    assert_eq!(s.stored().len(), 3);
    drop(s);

    // A filter that takes SMFIC_UNKNOWN without answering it (SMFIP_NR_UNKN, as rspamd
    // negotiates) is walked to libmilter's "unknown command" state, from which QUIT_NC is
    // valid: reused after an accept, after a session without a message, and after one
    // that left mid-message (aborted first).
    let f = FakeMilter::start(Script {
        verdict: packet(b'a', b""),
        protocol: 0x20000,
        ..Script::default()
    });
    let s = server_with(&[(f.socket(), "")], &["shards=1"]);
    send(&s, "a@example.org", &["b@example.net"], MSG).check(250, "2.0.0");
    ended(&s, 1);
    let mut c = s.smtp();
    c.ehlo("client.example");
    c.quit();
    ended(&s, 2);
    let mut c = s.smtp();
    c.ehlo("client.example");
    c.expect("MAIL FROM:<a@example.org>", 250, "2.1.0");
    c.expect("RCPT TO:<b@example.net>", 250, "2.1.5");
    drop(c);
    ended(&s, 3);
    send(&s, "a@example.org", &["b@example.net"], MSG).check(250, "2.0.0");
    let conns = f.conns();
    assert_eq!(conns.len(), 1);
    assert_eq!(
        order(&conns[0]),
        "OCHMRTLLLNBE".to_string() + "UK" + "CH" + "UK" + "CHMR" + "AUK" + "CHMRTLLLNBE"
    );
    assert_eq!(s.stored().len(), 2);
}

/// A filter that takes none of HELO, MAIL and RCPT (libmilter turns absent callbacks
/// into SMFIP_NO*): its first message ends in "continue" (QUIT_NC would be valid), the
/// second is refused at a header, which puts libmilter back in its HELO state. The
/// connection must then close with the session, not go back to the pool with a QUIT_NC
/// libmilter would ignore (review finding: `message` left the first message's
/// "reusable" standing).
#[test]
fn a_message_refused_mid_way_after_a_clean_one_is_not_reused() {
    let f = FakeMilter::start(Script {
        protocol: 0x2 | 0x4 | 0x8,
        refuse_header: Some(b"refuse-me"),
        ..Script::default()
    });
    let s = server_with(&[(f.socket(), "")], &["shards=1"]);
    let mut c = s.smtp();
    c.ehlo("client.example");
    c.send_mail("a@example.org", &["b@example.net"], MSG);
    c.expect("MAIL FROM:<a@example.org>", 250, "2.1.0");
    c.expect("RCPT TO:<b@example.net>", 250, "2.1.5");
    c.expect("DATA", 354, "");
    c.send(b"Subject: refuse-me\r\n\r\nbody\r\n.\r\n");
    let r = c.read_reply();
    assert_eq!(r.code / 100, 5, "refused at the header: {r:?}");
    c.quit();
    ended(&s, 1);
    send(&s, "a@example.org", &["b@example.net"], MSG).check(250, "2.0.0");
    let conns = f.conns();
    assert_eq!(conns.len(), 2, "the first connection was reused");
    assert!(!order(&conns[0]).contains('K'), "{}", order(&conns[0]));
    assert_eq!(s.stored().len(), 2);
}

/// `tern-loadgen milter-noop` (the benchmarks' no-op filter) works with tern, in both
/// modes, and counts the messages it saw.
#[test]
fn loadgen_noop_milter_is_a_valid_filter() {
    use std::io::BufRead;
    let lg = tern_tests::tern_bin().with_file_name("tern-loadgen");
    if !tern_tests::require(
        lg.exists(),
        "target/<profile>/tern-loadgen (cargo build -p tern-loadgen)",
    ) {
        return;
    }
    for stages in ["all", "eom"] {
        let mut child = Command::new(&lg)
            .args(["milter-noop", "--listen", "127.0.0.1:0", "--stages", stages])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        err.read_line(&mut line).unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening: ")
            .expect("listening line")
            .to_string();
        let s = server_with(&[(format!("inet:{addr}"), "")], &[]);
        for n in 1..=3 {
            send(&s, "a@example.org", &["b@example.net"], MSG).check(250, "2.0.0");
            ended(&s, n);
        }
        drop(s);
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let out = child.wait_with_output().unwrap();
        // Three sessions over one or two connections (two shards, one pool each).
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(
            text.starts_with("connections 1 messages 3 replies ")
                || text.starts_with("connections 2 messages 3 replies "),
            "--stages {stages}: {text}"
        );
    }
}

/// A filter that answers every body chunk gets the body whole and in order, in chunks of
/// 65535 bytes but the last, however the message's slices fall.
#[test]
fn a_body_answered_chunk_by_chunk_arrives_whole_and_in_order() {
    let f = FakeMilter::start(Script::default());
    let s = server_with(&[(f.socket(), "")], &[]);
    let mut big = String::from("Subject: big\r\n\r\n");
    let mut n = 0;
    while big.len() < 200_000 {
        big.push_str(&format!("line {n} {}\r\n", "z".repeat(n % 900)));
        n += 1;
    }
    send(&s, "a@example.org", &["b@example.net"], big.as_bytes()).check(250, "2.0.0");
    let conv = &f.conns()[0];
    let chunks: Vec<&Vec<u8>> = conv
        .iter()
        .filter(|(c, _)| *c == b'B')
        .map(|(_, d)| d)
        .collect();
    assert!(chunks.len() >= 4, "{} chunks", chunks.len());
    let (last, full) = chunks.split_last().unwrap();
    assert!(full.iter().all(|d| d.len() == 65535));
    assert!(!last.is_empty() && last.len() <= 65535);
    let sent: Vec<u8> = chunks.iter().flat_map(|d| d.iter().copied()).collect();
    let body = &big.as_bytes()[big.find("\r\n\r\n").unwrap() + 4..];
    assert!(
        sent == body,
        "the body the filter saw differs from the message's"
    );
}

#[test]
fn skip_ends_the_body_early_and_refusals_are_logged_with_the_envelope() {
    let f = FakeMilter::start(Script {
        at: vec![(b'B', packet(b's', b""))],
        protocol: 0x400, // SMFIP_SKIP
        verdict: packet(b'y', b"554 5.7.1 No thanks\0"),
        ..Script::default()
    });
    let s = server_with(&[(f.socket(), "")], &[]);
    // A body of three chunks and more.
    let line = "y".repeat(998);
    let mut big = String::from("Subject: big\r\n\r\n");
    while big.len() < 200_000 {
        big.push_str(&line);
        big.push_str("\r\n");
    }
    send(&s, "a@example.org", &["b@example.net"], big.as_bytes()).check(554, "5.7.1 No thanks");
    let conv = &f.conns()[0];
    let bodies = conv.iter().filter(|(c, _)| *c == b'B').count();
    assert_eq!(bodies, 1, "body chunks sent after SMFIR_SKIP");
    assert_eq!(conv.last().map(|(c, _)| *c), Some(b'E'));
    assert!(conv
        .iter()
        .filter(|(c, _)| *c == b'B')
        .all(|(_, d)| d.len() == 65535));
    wait_for("the NOQUEUE line", Duration::from_secs(10), || {
        s.stderr_log()
            .contains("NOQUEUE: reject: END-OF-MESSAGE from [127.0.0.1]")
    });
    let log = s.stderr_log();
    assert!(
        log.contains("554 5.7.1 No thanks; from=<a@example.org> to=<b@example.net>"),
        "{log}"
    );
}
