//! Shared by the runner-level tests: a scripted SMTP next hop (std threads on
//! 127.0.0.1:0, optional STARTTLS with an rcgen certificate) that records every
//! transaction with its arrival time, and a harness that runs a `Runner` over a fresh
//! spool in a small glommio executor.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use glommio::{LocalExecutorBuilder, Placement};
use tern_queue::client::{ClientOptions, Timeouts};
use tern_queue::route::{Dns, DnsConfig, Router};
use tern_queue::runner::{DeliveryCounts, Runner, RunnerConfig};
use tern_queue::{BodyType, Envelope, GroupCommit, MsgRef, Recipient, ShardSpool, SpoolOptions};

// ------------------------------------------------------------------ the next hop

/// One transaction the sink accepted.
#[derive(Debug, Clone)]
pub struct Txn {
    pub mail: String,
    pub rcpts: Vec<String>,
    /// As received (dot-stuffed, terminator included).
    pub data: Vec<u8>,
    /// When the final dot arrived.
    pub at: Instant,
    pub tls: bool,
    /// The TLS handshake resumed an earlier session (server side).
    pub resumed: bool,
}

pub struct SinkOpts {
    /// EHLO keywords besides STARTTLS (offered when `tls` is set, before TLS only).
    pub keywords: Vec<String>,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// RCPT TO lines containing one of these get `550 5.1.1 no such user`.
    pub refuse: Vec<String>,
    /// Close the connection after each message's 250 (so the next one needs a new one).
    pub close_after_message: bool,
}

impl SinkOpts {
    pub fn plain(keywords: &[&str]) -> SinkOpts {
        SinkOpts {
            keywords: keywords.iter().map(|k| k.to_string()).collect(),
            tls: None,
            refuse: Vec::new(),
            close_after_message: false,
        }
    }
    pub fn starttls(keywords: &[&str], tls: Arc<rustls::ServerConfig>) -> SinkOpts {
        SinkOpts {
            tls: Some(tls),
            ..SinkOpts::plain(keywords)
        }
    }
}

/// A next hop that takes every message. Stops accepting when dropped.
pub struct Sink {
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<Txn>>>,
    /// Connections accepted.
    connections: Arc<Mutex<usize>>,
    stop: Arc<AtomicBool>,
}

impl Sink {
    pub fn start(opts: SinkOpts) -> Sink {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(Mutex::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let opts = Arc::new(opts);
        let (l, c, s) = (log.clone(), connections.clone(), stop.clone());
        std::thread::spawn(move || {
            for tcp in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(tcp) = tcp else { continue };
                *c.lock().unwrap() += 1;
                let (o, l) = (opts.clone(), l.clone());
                std::thread::spawn(move || serve(tcp, &o, &l));
            }
        });
        Sink {
            addr,
            log,
            connections,
            stop,
        }
    }

    pub fn txns(&self) -> Vec<Txn> {
        self.log.lock().unwrap().clone()
    }

    pub fn connections(&self) -> usize {
        *self.connections.lock().unwrap()
    }

    /// `smtp:[127.0.0.1]:port` plus `attrs`.
    pub fn route(&self, attrs: &str) -> String {
        format!("smtp:[127.0.0.1]:{} {attrs}", self.addr.port())
            .trim_end()
            .to_string()
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr); // wakes the accept loop
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

enum Stream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ServerConnection, TcpStream>>),
    Gone,
}

impl Stream {
    fn io(&mut self) -> &mut dyn ReadWrite {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.as_mut(),
            Stream::Gone => unreachable!(),
        }
    }
}

fn say(s: &mut Stream, text: &str) -> bool {
    s.io().write_all(text.as_bytes()).is_ok() && s.io().flush().is_ok()
}

/// Reads until `buf` holds `needle`; false on EOF, error or timeout.
fn fill_until(s: &mut Stream, buf: &mut Vec<u8>, needle: &[u8]) -> bool {
    let mut chunk = [0u8; 16384];
    while memfind(buf, needle).is_none() {
        match s.io().read(&mut chunk) {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    true
}

fn memfind(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn serve(tcp: TcpStream, opts: &SinkOpts, log: &Mutex<Vec<Txn>>) {
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut s = Stream::Plain(tcp);
    let mut buf: Vec<u8> = Vec::new();
    let mut tls = false;
    let mut mail = String::new();
    let mut rcpts: Vec<String> = Vec::new();
    if !say(&mut s, "220 sink.test ESMTP\r\n") {
        return;
    }
    loop {
        if !fill_until(&mut s, &mut buf, b"\r\n") {
            return;
        }
        let i = memfind(&buf, b"\r\n").unwrap();
        let line = String::from_utf8_lossy(&buf[..i]).into_owned();
        buf.drain(..i + 2);
        let up = line.to_ascii_uppercase();
        let ok = if up.starts_with("EHLO") {
            let mut words: Vec<&str> = vec!["sink.test"];
            words.extend(opts.keywords.iter().map(String::as_str));
            if opts.tls.is_some() && !tls {
                words.push("STARTTLS");
            }
            let n = words.len();
            let mut r = String::new();
            for (k, w) in words.iter().enumerate() {
                let sep = if k + 1 == n { ' ' } else { '-' };
                r.push_str(&format!("250{sep}{w}\r\n"));
            }
            say(&mut s, &r)
        } else if up.starts_with("HELO") {
            say(&mut s, "250 sink.test\r\n")
        } else if up == "STARTTLS" && opts.tls.is_some() && !tls {
            if !say(&mut s, "220 2.0.0 go ahead\r\n") || !buf.is_empty() {
                return;
            }
            let Stream::Plain(tcp) = std::mem::replace(&mut s, Stream::Gone) else {
                return;
            };
            let conn = rustls::ServerConnection::new(opts.tls.clone().unwrap()).unwrap();
            s = Stream::Tls(Box::new(rustls::StreamOwned::new(conn, tcp)));
            tls = true;
            true
        } else if up.starts_with("MAIL") {
            mail = line.clone();
            rcpts.clear();
            say(&mut s, "250 2.1.0 ok\r\n")
        } else if up.starts_with("RCPT") && opts.refuse.iter().any(|r| line.contains(r.as_str())) {
            say(&mut s, "550 5.1.1 no such user\r\n")
        } else if up.starts_with("RCPT") {
            rcpts.push(line.clone());
            say(&mut s, "250 2.1.5 ok\r\n")
        } else if up == "DATA" {
            if !say(&mut s, "354 go ahead\r\n") {
                return;
            }
            let end = loop {
                if buf.starts_with(b".\r\n") {
                    break 3;
                }
                if let Some(j) = memfind(&buf, b"\r\n.\r\n") {
                    break j + 5;
                }
                if !fill_until(&mut s, &mut buf, b"\r\n.\r\n") {
                    return;
                }
            };
            let data: Vec<u8> = buf.drain(..end).collect();
            let n = {
                let mut l = log.lock().unwrap();
                l.push(Txn {
                    mail: mail.clone(),
                    rcpts: rcpts.clone(),
                    data,
                    at: Instant::now(),
                    tls,
                    resumed: match &s {
                        Stream::Tls(t) => {
                            t.conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed)
                        }
                        _ => false,
                    },
                });
                l.len()
            };
            let ok = say(&mut s, &format!("250 2.0.0 queued as {n}\r\n"));
            if opts.close_after_message {
                return;
            }
            ok
        } else if up == "RSET" || up == "NOOP" {
            say(&mut s, "250 2.0.0 ok\r\n")
        } else if up == "QUIT" {
            say(&mut s, "221 2.0.0 bye\r\n");
            return;
        } else {
            say(&mut s, "502 5.5.2 not here\r\n")
        };
        if !ok {
            return;
        }
    }
}

/// A self-signed certificate for `names` (IP strings become IP SANs) as a server
/// configuration, and its PEM (the CA file that verifies it).
pub fn tls_pair(names: &[&str]) -> (Arc<rustls::ServerConfig>, String) {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let ck = rcgen::generate_simple_self_signed(names).unwrap();
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

// ------------------------------------------------------------------ the runner

pub fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// An envelope from `sender` to `rcpts` (address, NOTIFY bits, ORCPT), arrived now.
pub fn envelope(sender: &str, rcpts: &[(&str, u8, Option<&str>)]) -> Envelope {
    Envelope {
        id: String::new(),
        sender: sender.into(),
        recipients: rcpts
            .iter()
            .map(|(a, n, o)| Recipient {
                addr: (*a).into(),
                notify: *n,
                orcpt: o.map(Into::into),
            })
            .collect(),
        arrival_unix_micros: now_micros(),
        size: 0,
        body_type: BodyType::SevenBit,
        smtputf8: false,
        ret: None,
        envid: None,
        deliver_by: None,
        auth: None,
        client_helo: "client.test".into(),
        client_addr: "192.0.2.1:1".into(),
    }
}

/// Runner settings for tests: quick timeouts, long retry interval (an attempt that
/// defers is not repeated within a test), no DNS needed for `[IP]` routes.
pub fn config(router: Router) -> RunnerConfig {
    let mut client = ClientOptions::new("relay.test");
    client.timeouts = Timeouts::uniform(Duration::from_secs(5));
    RunnerConfig {
        hostname: "relay.test".into(),
        retry_interval: Duration::from_secs(600),
        max_retry_interval: Duration::from_secs(600),
        max_age: Duration::from_secs(86400),
        delay_warning: None,
        concurrency: 8,
        high_water_messages: 10_000,
        high_water_bytes: 0,
        router,
        client,
        // Never asked: every route in these tests names an IP.
        dns: Dns::shared(DnsConfig::parse("127.0.0.1:9").unwrap()).unwrap(),
        mx_port: 25,
        destination_concurrency: 4,
        destination_rate: None,
        relayhost: None,
        relayhost_auth: None,
    }
}

/// What a run left behind.
#[derive(Debug)]
pub struct Run {
    /// Messages still queued when it stopped.
    pub left: usize,
    pub counts: DeliveryCounts,
}

/// Queues `msgs` (body "Subject: ..." unless given) on a fresh spool, runs a runner with
/// `cfg` until `done` holds (checked every 20 ms) or `limit` passes, then stops it.
pub fn run(
    cfg: RunnerConfig,
    msgs: Vec<(Envelope, Bytes)>,
    done: impl Fn(&Runner) -> bool + 'static,
    limit: Duration,
) -> Run {
    run_script(cfg, move |h| async move {
        h.queue_all(msgs).await;
        h.until(done, limit).await;
    })
}

/// A running runner on a fresh spool, for a test script.
pub struct Harness {
    pub runner: std::rc::Rc<Runner>,
    commit: GroupCommit,
}

impl Harness {
    /// Stores a message durably and hands it to the runner (as the server does).
    pub async fn queue(&self, env: Envelope, body: Bytes) {
        self.queue_all(vec![(env, body)]).await;
    }

    /// Stores every message, then hands them all to the runner at once.
    pub async fn queue_all(&self, msgs: Vec<(Envelope, Bytes)>) {
        let mut queued = Vec::new();
        for (mut env, body) in msgs {
            env.size = body.len() as u64;
            let w = self.commit.with_spool(|s| {
                env.id = s.id_gen().next();
                s.prepare(&env, std::slice::from_ref(&body)).unwrap()
            });
            let c = self.commit.commit(w).await.unwrap();
            queued.push((c, env));
        }
        for (c, env) in &queued {
            self.runner.enqueue(
                MsgRef {
                    shard: 0,
                    segment: c.segment,
                    offset: c.offset,
                },
                &env.id,
                env.arrival_unix_micros,
                env.recipients.len(),
            );
        }
    }

    /// Waits until `done` holds (checked every 20 ms) or `limit` passes; whether it held.
    pub async fn until(&self, done: impl Fn(&Runner) -> bool, limit: Duration) -> bool {
        let t = Instant::now();
        while !done(&self.runner) {
            if t.elapsed() >= limit {
                return false;
            }
            glommio::timer::sleep(Duration::from_millis(20)).await;
        }
        true
    }
}

/// Runs `f` on a small glommio executor of its own, as a shard would.
pub fn on_executor<T: 'static>(f: impl std::future::Future<Output = T> + 'static) -> T {
    LocalExecutorBuilder::new(Placement::Unbound)
        .ring_depth(64)
        .io_memory(128 << 10)
        .make()
        .unwrap()
        .run(f)
}

/// Shard 0's spool in `dir` (1 MiB segments), recovered.
pub fn open_spool(dir: &Path) -> ShardSpool {
    ShardSpool::open(
        dir,
        0,
        SpoolOptions {
            segment_size: 1 << 20,
        },
    )
    .unwrap()
    .0
}

/// Runs a runner with `cfg` on a fresh spool while `script` drives it, then stops it.
pub fn run_script<F, Fut>(cfg: RunnerConfig, script: F) -> Run
where
    F: FnOnce(std::rc::Rc<Harness>) -> Fut + 'static,
    Fut: std::future::Future<Output = ()> + 'static,
{
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    on_executor(async move {
        let commit = GroupCommit::new(open_spool(&path));
        let runner = Runner::new(0, cfg, commit.clone(), Vec::new());
        glommio::spawn_local(runner.clone().run()).detach();
        let h = std::rc::Rc::new(Harness {
            runner: runner.clone(),
            commit,
        });
        script(h).await;
        runner.stop();
        // Let deliveries and state writes in flight finish before the executor goes
        // (a blocking-thread job outliving it panics in glommio's thread).
        let t = Instant::now();
        while runner.in_flight() > 0 && t.elapsed() < Duration::from_secs(10) {
            glommio::timer::sleep(Duration::from_millis(20)).await;
        }
        Run {
            left: runner.len(),
            counts: runner.delivery_counts(),
        }
    })
}

/// Until the queue is empty.
pub fn empty(r: &Runner) -> bool {
    r.is_empty()
}

/// A message body.
pub fn body(subject: &str) -> Bytes {
    Bytes::from(format!(
        "Received: by relay.test\r\nSubject: {subject}\r\nFrom: s@sender.test\r\n\r\nhello\r\n"
    ))
}

/// The messages in `dir/new`, in name order.
pub fn maildir(dir: &Path) -> Vec<Vec<u8>> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir.join("new"))
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    names.sort();
    names.iter().map(|p| std::fs::read(p).unwrap()).collect()
}
