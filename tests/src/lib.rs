//! End-to-end test support: starts real tern processes and talks to them over real sockets.
//!
//! Map of this crate (chasquid style: numbered end-to-end tests, one concern per file):
//!
//! - `tests/e2e_01_protocol.rs`   every verb, reply and limit, pipelining, DATA/BDAT, smuggling
//! - `tests/e2e_02_tls.rs`        STARTTLS, implicit TLS, TLS versions, hostile handshakes
//! - `tests/e2e_03_durability.rs` kill -9 after the 250, graceful stop, 1000 connections
//! - `tests/e2e_04_interop.rs`    Python smtplib, curl, swaks against a live server
//! - `tests/e2e_13_floods.rs`     idle floods, never-reading pipeliners, slowloris: memory and cut-offs
//! - `tests/e2e_14_faults.rs`     disk full (tmpfs), fdatasync EIO (LD_PRELOAD shim; io_uring path: FUSE), bad next hops, TLS leaks
//! - `tests/e2e_16_haproxy.rs`    two nodes behind a real HAProxy: PROXY v1/v2, real client addresses, rolling restart under load
//! - `tests/e2e_24_cluster.rs`    the reference cluster (packaging/cluster/): three nodes in network
//!   namespaces behind HAProxy, users in PostgreSQL, counters in Redis, kill -9, adoption
//! - `tests/security.rs`          the security regression suite in one place: smuggling,
//!   STARTTLS injection, AUTH/NUL/length abuse, header injection
//!
//! This file is the harness they share:
//!
//! - [`Server`] runs `tern demo` in its own temporary directory with ephemeral ports, so
//!   every test has its own server and tests run in parallel. It waits for `ready:` on
//!   stdout, drains stderr into memory (shown when a test fails to start a server), and
//!   kills the child on drop: no test may leave a server running.
//! - [`Client`] is a small blocking SMTP client over `TcpStream`, upgradable in place to
//!   TLS (rustls, ring provider) for STARTTLS, or TLS from the first byte for smtps. Every
//!   socket has read and write timeouts, so a server that hangs fails the test instead of
//!   hanging CI.
//! - [`Server::queue_list`] and [`Server::stored`] read the spool the way an operator
//!   would (`tern queue list --json`) and byte-exactly (`tern_queue::scan_spool` and
//!   `tern_queue::read_body`).
//!
//! A test that needs something of the machine (a tool, root, an IPv6 loopback) asks
//! [`require`] / [`require_tool`]: skipped with a message on a developer's machine, a
//! failure when `CI` is set.
//!
//! The binary under test is `target/<profile>/tern`, next to the test executable's parent
//! directory; `TERN_BIN` overrides it. If it is missing it is built once with
//! `cargo build -p tern-engine --bin tern`.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub mod postgres;

/// Read/write timeout on every client socket: long enough for a loaded 2-core CI machine,
/// short enough that a hang is reported as a failure.
pub const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a server may take to print `ready:`.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Settings every test server gets (before the test's own, which override them): small
/// io_uring rings so many servers in parallel do not exhaust locked memory, two shards
/// whatever the machine's core count, and a next hop that refuses connections, so that
/// accepted mail stays queued (deferred) where the protocol tests inspect it. Delivery
/// tests set their own routes.
const DEFAULT_SETS: &[&str] = &[
    "executor.ring_depth=64",
    "shards=2",
    r#"queue.routes={"*"="smtp:[127.0.0.1]:9"}"#,
    r#"listeners.smtp=["127.0.0.1:0"]"#,
    r#"listeners.submission=["127.0.0.1:0"]"#,
    r#"listeners.smtps=["127.0.0.1:0"]"#,
];

/// The tern binary under test (see the crate docs).
pub fn tern_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("TERN_BIN") {
            return PathBuf::from(p);
        }
        // target/debug/deps/e2e_01_protocol-HASH -> target/debug/tern
        let exe = std::env::current_exe().expect("current_exe");
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test executable has a grandparent directory");
        let bin = dir.join("tern");
        if !bin.exists() {
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let st = Command::new(cargo)
                .args(["build", "-p", "tern-engine", "--bin", "tern"])
                .status()
                .expect("running cargo build for the tern binary");
            assert!(st.success(), "cargo build -p tern-engine --bin tern failed");
            assert!(bin.exists(), "{} still missing after build", bin.display());
        }
        bin
    })
}

/// True when running in CI (the `CI` environment variable set, other than empty, `0` or
/// `false`): there, whatever a test needs from the machine must be present (see [`require`]).
pub fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// The one rule for a test that needs something of the machine (a tool, root, an IPv6
/// loopback, ...): true when it is `available` (go on); otherwise the test fails under CI,
/// where `.ci/run` provides everything, and on a developer's machine it is skipped with a
/// message (false: the test returns at once).
#[track_caller]
pub fn require(available: bool, what: &str) -> bool {
    if available {
        return true;
    }
    assert!(
        !in_ci(),
        "{what}: required under CI (.ci/run installs or provides it)"
    );
    eprintln!("skipped: {what}: not available on this machine");
    false
}

/// Whether an executable `name` is on `PATH` (what `command -v` says).
pub fn tool_found(name: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).any(|d| {
        std::fs::metadata(d.join(name))
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// [`require`] for an executable on `PATH`.
#[track_caller]
pub fn require_tool(name: &str) -> bool {
    require(tool_found(name), &format!("{name} (not installed)"))
}

/// One running (or stopped) `tern demo` process and its directory.
pub struct Server {
    child: Option<Child>,
    dir: PathBuf,
    /// Owns the temporary directory when the harness made it (deleted on drop).
    _tmp: Option<tempfile::TempDir>,
    sets: Vec<String>,
    /// Extra environment of the process (e.g. LD_PRELOAD for fault injection).
    env: Vec<(String, String)>,
    /// `Some(file)`: `tern serve --config file` with only the test's `sets` (no harness
    /// defaults), instead of `tern demo --dir`.
    config: Option<PathBuf>,
    /// A command the server runs under (e.g. `ip netns exec NS`), kept for restarts; it
    /// must exec tern in its own process, so that the pid is tern's.
    wrapper: Vec<String>,
    pub smtp: SocketAddr,
    pub submission: SocketAddr,
    pub smtps: SocketAddr,
    /// The metrics endpoint (`listening: metrics ADDR`), when the server prints one.
    pub metrics: Option<SocketAddr>,
    pub shards: usize,
    stderr: Arc<Mutex<Vec<u8>>>,
}

impl Server {
    /// Starts `tern demo` in `dir` (a fresh temporary directory when `None`) with the
    /// harness defaults plus `sets` (`key=value`, later ones win).
    pub fn start(dir: Option<&Path>, sets: &[&str]) -> Server {
        Server::start_with_env(dir, sets, &[])
    }

    /// [`Server::start`] with extra environment variables (kept for restarts).
    pub fn start_with_env(dir: Option<&Path>, sets: &[&str], env: &[(&str, &str)]) -> Server {
        let (tmp, dir) = match dir {
            Some(d) => (None, d.to_path_buf()),
            None => {
                let t = tempfile::Builder::new()
                    .prefix("tern-e2e-")
                    .tempdir()
                    .expect("tempdir");
                let p = t.path().to_path_buf();
                (Some(t), p)
            }
        };
        let mut s = Server {
            child: None,
            dir,
            _tmp: tmp,
            sets: sets.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            smtp: ([0, 0, 0, 0], 0).into(),
            submission: ([0, 0, 0, 0], 0).into(),
            smtps: ([0, 0, 0, 0], 0).into(),
            metrics: None,
            shards: 0,
            stderr: Arc::new(Mutex::new(Vec::new())),
            config: None,
            wrapper: Vec::new(),
        };
        s.spawn();
        s
    }

    /// `wrapper... tern serve --config CONFIG --set ...` with `dir` as the server's
    /// directory (kept; its spool is wherever CONFIG says, see [`Server::spool`]): for
    /// tests that run a configuration file as an operator would (e.g. the reference
    /// cluster's, inside a network namespace). No harness defaults are added.
    pub fn serve(wrapper: &[&str], dir: &Path, config: &Path, sets: &[&str]) -> Server {
        let mut s = Server {
            child: None,
            dir: dir.to_path_buf(),
            _tmp: None,
            sets: sets.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            smtp: ([0, 0, 0, 0], 0).into(),
            submission: ([0, 0, 0, 0], 0).into(),
            smtps: ([0, 0, 0, 0], 0).into(),
            metrics: None,
            shards: 0,
            stderr: Arc::new(Mutex::new(Vec::new())),
            config: Some(config.to_path_buf()),
            wrapper: wrapper.iter().map(|s| s.to_string()).collect(),
        };
        s.spawn();
        s
    }

    /// Shorthand for `Server::start(None, sets)`.
    pub fn with(sets: &[&str]) -> Server {
        Server::start(None, sets)
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "server already running");
        let mut cmd = match self.wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(tern_bin());
                c
            }
            None => Command::new(tern_bin()),
        };
        let defaults = match &self.config {
            Some(file) => {
                cmd.arg("serve").arg("--config").arg(file);
                &[][..]
            }
            None => {
                cmd.arg("demo").arg("--dir").arg(&self.dir);
                DEFAULT_SETS
            }
        };
        for s in defaults
            .iter()
            .copied()
            .chain(self.sets.iter().map(String::as_str))
        {
            cmd.arg("--set").arg(s);
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", tern_bin().display()));

        // Drain stderr for the whole life of the process (a full pipe would block the server).
        let errbuf = Arc::new(Mutex::new(Vec::new()));
        self.stderr = errbuf.clone();
        let mut err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = err.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                errbuf.lock().unwrap().extend_from_slice(&chunk[..n]);
            }
        });

        // stdout: the listening/ready lines, then keep draining.
        let (tx, rx) = mpsc::channel::<String>();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        self.child = Some(child);

        let deadline = Instant::now() + START_TIMEOUT;
        let (mut smtp, mut sub, mut smtps) = (None, None, None);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match rx.recv_timeout(left) {
                Ok(l) => l,
                Err(e) => {
                    let log = self.stderr_log();
                    self.kill9();
                    panic!("tern demo did not become ready ({e:?}); stderr:\n{log}");
                }
            };
            if let Some(rest) = line.strip_prefix("listening: ") {
                let mut it = rest.split_whitespace();
                let kind = it.next().unwrap_or("");
                let addr: SocketAddr = it
                    .next()
                    .and_then(|a| a.parse().ok())
                    .unwrap_or_else(|| panic!("bad listening line: {line}"));
                match kind {
                    "smtp" => smtp = Some(addr),
                    "submission" => sub = Some(addr),
                    "smtps" => smtps = Some(addr),
                    "metrics" => self.metrics = Some(addr),
                    _ => {}
                }
            } else if let Some(rest) = line.strip_prefix("ready: ") {
                self.shards = rest
                    .split_whitespace()
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                break;
            }
        }
        std::thread::spawn(move || while rx.recv().is_ok() {});
        self.smtp = smtp.expect("no smtp listener printed");
        self.submission = sub.expect("no submission listener printed");
        self.smtps = smtps.expect("no smtps listener printed");
    }

    /// The demo directory (cert.pem, key.pem, spool/).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn spool(&self) -> PathBuf {
        self.dir.join("spool")
    }

    pub fn cert(&self) -> PathBuf {
        self.dir.join("cert.pem")
    }

    /// Sends SIGHUP (reload) to the server.
    pub fn sighup(&self) {
        // SAFETY: plain kill(2) on our own running child's pid.
        let r = unsafe { libc::kill(self.pid() as i32, libc::SIGHUP) };
        assert_eq!(r, 0, "kill(SIGHUP) failed");
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server not running").id()
    }

    /// Everything the server wrote to stderr so far (its log).
    pub fn stderr_log(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// SIGKILL and reap. The directory is kept.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM (graceful stop); use [`Server::wait`] to reap.
    pub fn sigterm(&self) {
        let pid = self.pid() as libc::pid_t;
        // SAFETY: plain kill(2) on our own child's pid, which has not been reaped yet.
        let r = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(r, 0, "kill(SIGTERM) failed");
    }

    /// Waits (at most `timeout`) for the server to exit and reaps it.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().expect("server not running");
        loop {
            if let Some(st) = child.try_wait().expect("try_wait") {
                self.child = None;
                return st;
            }
            if Instant::now() > deadline {
                let log = self.stderr_log();
                self.kill9();
                panic!("tern did not exit within {timeout:?}; stderr:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().expect("try_wait").is_none(),
            None => false,
        }
    }

    /// Starts the server again on the same directory (after `kill9`, or after `wait`), with
    /// the same settings. Ports change (they are ephemeral).
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// Plain connection to the smtp listener, greeting read and checked.
    pub fn smtp(&self) -> Client {
        let mut c = Client::connect(self.smtp);
        c.expect_greeting();
        c
    }

    /// Implicit-TLS connection to the smtps listener, greeting read and checked.
    pub fn smtps(&self) -> Client {
        let mut c = Client::connect_tls(self.smtps, &self.cert(), TlsVersion::Any);
        c.expect_greeting();
        c
    }

    /// `tern queue list --spool DIR/spool --json`, parsed. An absent spool directory is an
    /// empty queue.
    pub fn queue_list(&self) -> Vec<QueueEntry> {
        let spool = self.spool();
        if !spool.exists() {
            return Vec::new();
        }
        let out = Command::new(tern_bin())
            .args(["queue", "list", "--json", "--spool"])
            .arg(&spool)
            .output()
            .expect("running tern queue list");
        assert!(
            out.status.success(),
            "tern queue list failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .expect("queue list output is UTF-8")
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(QueueEntry::parse)
            .collect()
    }

    /// Every message in the spool with its exact stored bytes, read offline through the
    /// queue crate (scan_spool + read_body).
    pub fn stored(&self) -> Vec<Stored> {
        let spool = self.spool();
        if !spool.exists() {
            return Vec::new();
        }
        let msgs = tern_queue::scan_spool(&spool).expect("scan_spool");
        msgs.into_iter()
            .map(|m| {
                let body = read_stored_body(&spool, &m);
                assert_eq!(
                    body.len() as u64,
                    m.body_len,
                    "body_len of {}",
                    m.envelope.id
                );
                Stored {
                    id: m.envelope.id.clone(),
                    sender: m.envelope.sender.clone(),
                    recipients: m
                        .envelope
                        .recipients
                        .iter()
                        .map(|r| r.addr.clone())
                        .collect(),
                    body,
                }
            })
            .collect()
    }

    /// The stored message with queue id `id` (panics with the spool's ids if absent).
    pub fn stored_by_id(&self, id: &str) -> Stored {
        let all = self.stored();
        let ids: Vec<String> = all.iter().map(|s| s.id.clone()).collect();
        all.into_iter()
            .find(|s| s.id == id)
            .unwrap_or_else(|| panic!("message {id} not in the spool (spool has {ids:?})"))
    }
}

/// Runs `tern demo --dir DIR` with the harness defaults plus `sets` where it must be
/// refused (another server holds its spool or ports): waits for the process to exit
/// (at most the start-up timeout; a server that prints `ready:` instead fails the test
/// at once) and returns its stderr. Panics unless it exited with a failure status.
#[track_caller]
pub fn start_refused(dir: &Path, sets: &[&str]) -> String {
    let mut cmd = Command::new(tern_bin());
    cmd.arg("demo").arg("--dir").arg(dir);
    for s in DEFAULT_SETS.iter().chain(sets) {
        cmd.arg("--set").arg(s);
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {}: {e}", tern_bin().display()));
    let mut err = child.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        String::from_utf8_lossy(&v).into_owned()
    });
    // stdout closes when the process exits; a `ready:` line before that is the failure.
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel::<bool>();
    std::thread::spawn(move || {
        let ready = BufReader::new(out)
            .lines()
            .map_while(Result::ok)
            .any(|l| l.starts_with("ready:"));
        let _ = tx.send(ready);
    });
    let ready = rx.recv_timeout(START_TIMEOUT);
    if ready != Ok(false) {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "a second server was not refused ({ready:?}); stderr:\n{}",
            stderr.join().unwrap_or_default()
        );
    }
    let status = child.wait().expect("waiting for the refused server");
    let log = stderr.join().unwrap_or_default();
    assert!(
        !status.success(),
        "a second server exited with {status} instead of failing; stderr:\n{log}"
    );
    log
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// One line of `tern queue list --json`.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueEntry {
    pub id: String,
    pub size: u64,
    pub sender: String,
    pub recipients: Vec<String>,
}

impl QueueEntry {
    fn parse(line: &str) -> QueueEntry {
        let v = json::parse(line).unwrap_or_else(|e| panic!("bad JSON line {line:?}: {e}"));
        let get = |k: &str| {
            v.get(k)
                .unwrap_or_else(|| panic!("queue list line without {k}: {line}"))
        };
        QueueEntry {
            id: get("id").as_str().to_string(),
            size: get("size").as_u64(),
            sender: get("sender").as_str().to_string(),
            recipients: get("recipients")
                .as_array()
                .iter()
                .map(|r| r.as_str().to_string())
                .collect(),
        }
    }
}

/// A message as stored in the spool.
#[derive(Debug, Clone)]
pub struct Stored {
    pub id: String,
    pub sender: String,
    pub recipients: Vec<String>,
    /// Received: header + the message exactly as accepted.
    pub body: Vec<u8>,
}

impl Stored {
    /// Splits the stored bytes into (the Received: header tern prepended, the rest). The
    /// header ends at the first CRLF not followed by folding whitespace.
    pub fn split_received(&self) -> (&str, &[u8]) {
        assert!(
            self.body.starts_with(b"Received: "),
            "stored message {} does not start with Received: {:?}",
            self.id,
            String::from_utf8_lossy(&self.body[..self.body.len().min(200)])
        );
        let mut i = 0;
        loop {
            let nl = find(&self.body[i..], b"\r\n")
                .map(|p| p + i)
                .unwrap_or_else(|| panic!("unterminated Received: header in {}", self.id));
            let next = self.body.get(nl + 2).copied();
            if next != Some(b'\t') && next != Some(b' ') {
                let hdr = std::str::from_utf8(&self.body[..nl + 2]).expect("header is UTF-8");
                return (hdr, &self.body[nl + 2..]);
            }
            i = nl + 2;
        }
    }

    /// The message exactly as accepted, without tern's Received: header.
    pub fn content(&self) -> &[u8] {
        self.split_received().1
    }
}

/// The stored bytes of one scanned message.
fn read_stored_body(spool: &Path, m: &tern_queue::RecoveredMessage) -> Vec<u8> {
    tern_queue::read_body(spool, m.shard, m.segment, m.offset)
        .unwrap_or_else(|e| panic!("read_body {}: {e}", m.envelope.id))
}

/// Byte-string search.
pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

// ------------------------------------------------------------------------------------
// The client.
// ------------------------------------------------------------------------------------

/// One SMTP reply: code and the text of each line (after "NNN-" / "NNN ").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Reply {
    /// First line's text.
    pub fn text(&self) -> &str {
        self.lines.first().map(String::as_str).unwrap_or("")
    }

    /// The queue id from `250 2.0.0 Ok: queued as ID`.
    pub fn queued_id(&self) -> String {
        assert_eq!(self.code, 250, "not a 250: {self}");
        self.text()
            .strip_prefix("2.0.0 Ok: queued as ")
            .unwrap_or_else(|| panic!("not a queued reply: {self}"))
            .trim()
            .to_string()
    }

    /// Asserts the code and that the first line starts with `prefix`.
    #[track_caller]
    pub fn check(&self, code: u16, prefix: &str) -> &Self {
        assert!(
            self.code == code && self.text().starts_with(prefix),
            "expected `{code} {prefix}...`, got `{self}`"
        );
        self
    }
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, l) in self.lines.iter().enumerate() {
            let sep = if i + 1 == self.lines.len() { ' ' } else { '-' };
            if i > 0 {
                f.write_str(" | ")?;
            }
            write!(f, "{}{}{}", self.code, sep, l)?;
        }
        Ok(())
    }
}

/// Which TLS versions the client offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsVersion {
    Any,
    Tls12,
    Tls13,
}

/// A rustls client config trusting only `cert` (the demo's self-signed certificate).
pub fn tls_config(cert: &Path, v: TlsVersion) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(cert).unwrap_or_else(|e| panic!("reading {}: {e}", cert.display()));
    for c in rustls_pemfile::certs(&mut &pem[..]) {
        roots
            .add(c.expect("parsing cert.pem"))
            .expect("adding root");
    }
    let b = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ));
    let b = match v {
        TlsVersion::Any => b.with_safe_default_protocol_versions(),
        TlsVersion::Tls12 => b.with_protocol_versions(&[&rustls::version::TLS12]),
        TlsVersion::Tls13 => b.with_protocol_versions(&[&rustls::version::TLS13]),
    }
    .expect("protocol versions");
    Arc::new(b.with_root_certificates(roots).with_no_client_auth())
}

enum Conn {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
    Gone,
}

impl Read for Conn {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(b),
            Conn::Tls(s) => s.read(b),
            Conn::Gone => unreachable!(),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(b),
            Conn::Tls(s) => s.write(b),
            Conn::Gone => unreachable!(),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            Conn::Tls(s) => s.flush(),
            Conn::Gone => unreachable!(),
        }
    }
}

/// A blocking SMTP client for tests. Panics (with what it got) on anything unexpected.
pub struct Client {
    conn: Conn,
    buf: Vec<u8>,
    /// Number of successful read() calls that returned data: lets a test see whether
    /// pipelined replies came back together.
    pub reads: usize,
}

fn tcp(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    timeouts(s)
}

fn timeouts(s: TcpStream) -> TcpStream {
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

impl Client {
    /// Plain TCP; the greeting is not read.
    pub fn connect(addr: SocketAddr) -> Client {
        Client {
            conn: Conn::Plain(tcp(addr)),
            buf: Vec::new(),
            reads: 0,
        }
    }

    /// Plain TCP from the local address `src` (any port): e.g. 127.0.0.2, so that tests
    /// can tell clients apart by address (every 127.0.0.0/8 address is loopback on Linux,
    /// no setup needed). The greeting is not read.
    pub fn connect_from(src: std::net::IpAddr, addr: SocketAddr) -> Client {
        let domain = socket2::Domain::for_address(addr);
        let sock = socket2::Socket::new(domain, socket2::Type::STREAM, None)
            .unwrap_or_else(|e| panic!("socket: {e}"));
        sock.bind(&SocketAddr::new(src, 0).into())
            .unwrap_or_else(|e| panic!("bind {src}: {e}"));
        sock.connect(&addr.into())
            .unwrap_or_else(|e| panic!("connect {addr} from {src}: {e}"));
        Client {
            conn: Conn::Plain(timeouts(sock.into())),
            buf: Vec::new(),
            reads: 0,
        }
    }

    /// TLS from the first byte (smtps); handshake done; the greeting is not read.
    pub fn connect_tls(addr: SocketAddr, cert: &Path, v: TlsVersion) -> Client {
        let mut c = Client::connect(addr);
        c.upgrade(cert, v);
        c
    }

    fn tcp_ref(&self) -> &TcpStream {
        match &self.conn {
            Conn::Plain(s) => s,
            Conn::Tls(s) => s.get_ref(),
            Conn::Gone => unreachable!(),
        }
    }

    /// The raw socket (e.g. to shut down the write half).
    pub fn socket(&self) -> &TcpStream {
        self.tcp_ref()
    }

    pub fn is_tls(&self) -> bool {
        matches!(self.conn, Conn::Tls(_))
    }

    /// The negotiated TLS version, if TLS.
    pub fn tls_version(&self) -> Option<rustls::ProtocolVersion> {
        match &self.conn {
            Conn::Tls(s) => s.conn.protocol_version(),
            _ => None,
        }
    }

    /// Starts TLS on the existing TCP stream and completes the handshake. Panics if the
    /// server sent anything we have not consumed (it must not answer past STARTTLS).
    pub fn upgrade(&mut self, cert: &Path, v: TlsVersion) {
        assert!(
            self.buf.is_empty(),
            "unread plaintext before the TLS handshake: {:?}",
            String::from_utf8_lossy(&self.buf)
        );
        let tcp = match std::mem::replace(&mut self.conn, Conn::Gone) {
            Conn::Plain(s) => s,
            _ => panic!("upgrade on a TLS connection"),
        };
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let conn = rustls::ClientConnection::new(tls_config(cert, v), name).expect("tls client");
        let mut s = rustls::StreamOwned::new(conn, tcp);
        while s.conn.is_handshaking() {
            s.conn
                .complete_io(&mut s.sock)
                .unwrap_or_else(|e| panic!("TLS handshake failed: {e}"));
        }
        self.conn = Conn::Tls(Box::new(s));
    }

    /// STARTTLS, expect 220 2.0.0, handshake.
    pub fn starttls(&mut self, cert: &Path, v: TlsVersion) {
        self.cmd("STARTTLS").check(220, "2.0.0 Ready to start TLS");
        self.upgrade(cert, v);
    }

    /// Writes raw bytes (one write call, so one packet on loopback for small writes).
    pub fn send(&mut self, bytes: &[u8]) {
        self.conn
            .write_all(bytes)
            .unwrap_or_else(|e| panic!("write: {e}"));
        self.conn.flush().unwrap_or_else(|e| panic!("flush: {e}"));
    }

    /// Reads more bytes into the buffer; Ok(0) on EOF.
    fn fill(&mut self) -> std::io::Result<usize> {
        let mut chunk = [0u8; 16384];
        let n = self.conn.read(&mut chunk)?;
        if n > 0 {
            self.reads += 1;
            self.buf.extend_from_slice(&chunk[..n]);
        }
        Ok(n)
    }

    fn read_line(&mut self) -> String {
        loop {
            if let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
                assert!(
                    nl > 0 && self.buf[nl - 1] == b'\r',
                    "reply line not ended by CRLF: {:?}",
                    String::from_utf8_lossy(&self.buf[..=nl])
                );
                let line: Vec<u8> = self.buf.drain(..=nl).collect();
                return String::from_utf8(line[..line.len() - 2].to_vec())
                    .unwrap_or_else(|_| panic!("reply not UTF-8: {line:?}"));
            }
            match self.fill() {
                Ok(0) => panic!(
                    "connection closed while waiting for a reply (partial: {:?})",
                    String::from_utf8_lossy(&self.buf)
                ),
                Ok(_) => {}
                Err(e) => panic!(
                    "read error while waiting for a reply: {e} (partial: {:?})",
                    String::from_utf8_lossy(&self.buf)
                ),
            }
        }
    }

    /// Reads one (possibly multi-line) reply.
    pub fn read_reply(&mut self) -> Reply {
        let mut lines = Vec::new();
        loop {
            let l = self.read_line();
            let b = l.as_bytes();
            assert!(
                b.len() >= 3 && b[..3].iter().all(u8::is_ascii_digit),
                "malformed reply line {l:?}"
            );
            let code: u16 = l[..3].parse().unwrap();
            let (more, text) = match b.get(3) {
                None => (false, ""),
                Some(b' ') => (false, &l[4..]),
                Some(b'-') => (true, &l[4..]),
                Some(_) => panic!("malformed reply line {l:?}"),
            };
            if let Some(first) = lines.first().map(|(c, _): &(u16, String)| *c) {
                assert_eq!(first, code, "code changed inside a multi-line reply: {l:?}");
            }
            lines.push((code, text.to_string()));
            if !more {
                return Reply {
                    code,
                    lines: lines.into_iter().map(|(_, t)| t).collect(),
                };
            }
        }
    }

    /// Sends `line` + CRLF and reads the reply.
    pub fn cmd(&mut self, line: &str) -> Reply {
        self.send(format!("{line}\r\n").as_bytes());
        self.read_reply()
    }

    /// `cmd` and check code + text prefix.
    #[track_caller]
    pub fn expect(&mut self, line: &str, code: u16, prefix: &str) -> Reply {
        let r = self.cmd(line);
        r.check(code, prefix);
        r
    }

    #[track_caller]
    pub fn expect_greeting(&mut self) -> Reply {
        let r = self.read_reply();
        r.check(220, "localhost ESMTP tern");
        r
    }

    /// EHLO, expecting 250 and returning the keyword lines (everything after the first).
    #[track_caller]
    pub fn ehlo(&mut self, name: &str) -> Vec<String> {
        let r = self.cmd(&format!("EHLO {name}"));
        r.check(250, "localhost");
        r.lines[1..].to_vec()
    }

    /// MAIL/RCPT.../DATA/body/dot one step at a time; returns the queue id. `body` must
    /// already be CRLF-terminated and is dot-stuffed here.
    #[track_caller]
    pub fn send_mail(&mut self, from: &str, to: &[&str], body: &[u8]) -> String {
        self.expect(&format!("MAIL FROM:<{from}>"), 250, "2.1.0 Ok");
        for t in to {
            self.expect(&format!("RCPT TO:<{t}>"), 250, "2.1.5 Ok");
        }
        self.expect("DATA", 354, "End data with <CR><LF>.<CR><LF>");
        let mut wire = dot_stuff(body);
        wire.extend_from_slice(b".\r\n");
        self.send(&wire);
        self.read_reply().queued_id()
    }

    /// QUIT, expect 221 and the server closing.
    #[track_caller]
    pub fn quit(mut self) {
        self.expect("QUIT", 221, "2.0.0 Bye");
        assert!(self.closed(), "server did not close after QUIT");
    }

    /// True if the server closes the connection (EOF or reset) before `IO_TIMEOUT`; bytes
    /// that arrive first are an error.
    #[track_caller]
    pub fn closed(&mut self) -> bool {
        loop {
            if !self.buf.is_empty() {
                panic!(
                    "expected the connection to close, got {:?}",
                    String::from_utf8_lossy(&self.buf)
                );
            }
            match self.fill() {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return false
                }
                // reset, or TLS without close_notify: closed
                Err(_) => return true,
            }
        }
    }

    /// True if nothing arrives within `d` (the connection may stay open). Used to show a
    /// command was never answered.
    pub fn silent_for(&mut self, d: Duration) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        self.tcp_ref().set_read_timeout(Some(d)).unwrap();
        let r = self.fill();
        self.tcp_ref().set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        match r {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => true,
            Err(_) => true,
        }
    }

    /// Bytes received but not yet consumed as replies.
    pub fn pending(&self) -> &[u8] {
        &self.buf
    }
}

/// RFC 5321 §4.5.2 transparency: a '.' at the start of a line is doubled.
pub fn dot_stuff(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 16);
    let mut at_line_start = true;
    for &b in body {
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_line_start = b == b'\n';
    }
    out
}

/// A plain server on the smtp port, client greeted and EHLO'd as `client.test`.
pub fn ehlo_client(s: &Server) -> Client {
    let mut c = s.smtp();
    c.ehlo("client.test");
    c
}

// ------------------------------------------------------------------------------------
// A very small JSON reader for `tern queue list --json` (flat objects of strings,
// numbers and arrays), so the tests need no JSON dependency.
// ------------------------------------------------------------------------------------

pub mod json {
    #[derive(Debug, Clone, PartialEq)]
    pub enum Value {
        Str(String),
        Num(f64),
        Arr(Vec<Value>),
        Obj(Vec<(String, Value)>),
        Bool(bool),
        Null,
    }

    impl Value {
        pub fn get(&self, k: &str) -> Option<&Value> {
            match self {
                Value::Obj(kv) => kv.iter().find(|(key, _)| key == k).map(|(_, v)| v),
                _ => None,
            }
        }
        pub fn as_str(&self) -> &str {
            match self {
                Value::Str(s) => s,
                v => panic!("not a string: {v:?}"),
            }
        }
        pub fn as_u64(&self) -> u64 {
            match self {
                Value::Num(n) => *n as u64,
                v => panic!("not a number: {v:?}"),
            }
        }
        pub fn as_array(&self) -> &[Value] {
            match self {
                Value::Arr(a) => a,
                v => panic!("not an array: {v:?}"),
            }
        }
    }

    pub fn parse(s: &str) -> Result<Value, String> {
        let mut p = P {
            s: s.as_bytes(),
            i: 0,
        };
        let v = p.value()?;
        p.ws();
        if p.i != p.s.len() {
            return Err(format!("trailing data at {}", p.i));
        }
        Ok(v)
    }

    struct P<'a> {
        s: &'a [u8],
        i: usize,
    }

    impl P<'_> {
        fn ws(&mut self) {
            while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
                self.i += 1;
            }
        }
        fn eat(&mut self, c: u8) -> Result<(), String> {
            self.ws();
            if self.s.get(self.i) == Some(&c) {
                self.i += 1;
                Ok(())
            } else {
                Err(format!("expected {:?} at {}", c as char, self.i))
            }
        }
        fn value(&mut self) -> Result<Value, String> {
            self.ws();
            match self.s.get(self.i) {
                Some(b'"') => self.string().map(Value::Str),
                Some(b'[') => {
                    self.i += 1;
                    let mut v = Vec::new();
                    self.ws();
                    if self.s.get(self.i) == Some(&b']') {
                        self.i += 1;
                        return Ok(Value::Arr(v));
                    }
                    loop {
                        v.push(self.value()?);
                        self.ws();
                        match self.s.get(self.i) {
                            Some(b',') => self.i += 1,
                            Some(b']') => {
                                self.i += 1;
                                return Ok(Value::Arr(v));
                            }
                            _ => return Err(format!("bad array at {}", self.i)),
                        }
                    }
                }
                Some(b'{') => {
                    self.i += 1;
                    let mut kv = Vec::new();
                    self.ws();
                    if self.s.get(self.i) == Some(&b'}') {
                        self.i += 1;
                        return Ok(Value::Obj(kv));
                    }
                    loop {
                        self.ws();
                        let k = self.string()?;
                        self.eat(b':')?;
                        kv.push((k, self.value()?));
                        self.ws();
                        match self.s.get(self.i) {
                            Some(b',') => self.i += 1,
                            Some(b'}') => {
                                self.i += 1;
                                return Ok(Value::Obj(kv));
                            }
                            _ => return Err(format!("bad object at {}", self.i)),
                        }
                    }
                }
                Some(b't') if self.s[self.i..].starts_with(b"true") => {
                    self.i += 4;
                    Ok(Value::Bool(true))
                }
                Some(b'f') if self.s[self.i..].starts_with(b"false") => {
                    self.i += 5;
                    Ok(Value::Bool(false))
                }
                Some(b'n') if self.s[self.i..].starts_with(b"null") => {
                    self.i += 4;
                    Ok(Value::Null)
                }
                Some(_) => {
                    let st = self.i;
                    while self.i < self.s.len()
                        && matches!(
                            self.s[self.i],
                            b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9'
                        )
                    {
                        self.i += 1;
                    }
                    std::str::from_utf8(&self.s[st..self.i])
                        .unwrap()
                        .parse()
                        .map(Value::Num)
                        .map_err(|_| format!("bad value at {st}"))
                }
                None => Err("unexpected end".into()),
            }
        }
        fn string(&mut self) -> Result<String, String> {
            self.eat(b'"')?;
            let mut out = String::new();
            loop {
                let rest = std::str::from_utf8(&self.s[self.i..]).map_err(|e| e.to_string())?;
                let mut chars = rest.char_indices();
                let Some((_, c)) = chars.next() else {
                    return Err("unterminated string".into());
                };
                self.i += c.len_utf8();
                match c {
                    '"' => return Ok(out),
                    '\\' => {
                        let e = *self.s.get(self.i).ok_or("bad escape")?;
                        self.i += 1;
                        match e {
                            b'"' => out.push('"'),
                            b'\\' => out.push('\\'),
                            b'/' => out.push('/'),
                            b'n' => out.push('\n'),
                            b'r' => out.push('\r'),
                            b't' => out.push('\t'),
                            b'b' => out.push('\u{8}'),
                            b'f' => out.push('\u{c}'),
                            b'u' => {
                                let h = std::str::from_utf8(&self.s[self.i..self.i + 4])
                                    .map_err(|e| e.to_string())?;
                                let n = u32::from_str_radix(h, 16).map_err(|e| e.to_string())?;
                                self.i += 4;
                                out.push(char::from_u32(n).unwrap_or('\u{fffd}'));
                            }
                            _ => return Err("bad escape".into()),
                        }
                    }
                    c => out.push(c),
                }
            }
        }
    }
}

/// A next-hop server for delivery tests: a `tern demo` that accepts mail for its local
/// domains (demo.test, localhost) and delivers everything it accepts into
/// `<dir>/maildir`. Other domains get "Relay access denied" (a 5xx).
pub struct Hop {
    pub server: Server,
    _dir: tempfile::TempDir,
}

impl std::ops::Deref for Hop {
    type Target = Server;
    fn deref(&self) -> &Server {
        &self.server
    }
}

/// Starts a next hop on `port` (or an ephemeral one), with `extra` settings.
pub fn next_hop(port: Option<u16>, extra: &[&str]) -> Hop {
    let dir = tempfile::tempdir().expect("tempdir");
    let smtp = match port {
        Some(p) => format!(r#"listeners.smtp=["127.0.0.1:{p}"]"#),
        None => r#"listeners.smtp=["127.0.0.1:0"]"#.to_string(),
    };
    let route = format!(
        r#"queue.routes={{"*"="maildir:{}/maildir"}}"#,
        dir.path().display()
    );
    let mut sets: Vec<&str> = vec![&smtp, &route];
    sets.extend_from_slice(extra);
    let server = Server::start(Some(dir.path()), &sets);
    Hop { server, _dir: dir }
}

/// The messages in `dir/maildir/new`, as (file name, content), sorted by name.
pub fn maildir(dir: &Path) -> Vec<(String, String)> {
    let new = dir.join("maildir").join("new");
    let mut v: Vec<(String, String)> = std::fs::read_dir(&new)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| {
                    (
                        e.file_name().to_string_lossy().into_owned(),
                        String::from_utf8_lossy(&std::fs::read(e.path()).unwrap_or_default())
                            .into_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Polls `f` every 100 ms until it is true; panics naming `what` after `timeout`.
#[track_caller]
pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}");
}

/// A loopback port that is free now and that no other test will be handed by the kernel:
/// picked below the ephemeral range (`ip_local_port_range` starts at 32768), where
/// port-0 binds of parallel tests never land. For a next hop that must be down first and
/// come up later on a port the relay was configured with.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let seed = std::process::id().wrapping_mul(7919);
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 20_000 + (seed.wrapping_add(n.wrapping_mul(131)) % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// The value of one series (`name` with its labels, e.g. `tern_sessions_active{shard="total"}`,
/// or an unlabelled name) on the /metrics endpoint at `addr`; None when the endpoint
/// cannot be read (a server just killed) or has no such series.
pub fn metric_value(addr: std::net::SocketAddr, series: &str) -> Option<f64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    let prefix = format!("{series} ");
    body.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|v| v.trim().parse::<f64>().ok())
}

/// `tern_sessions_active{shard="total"}` from a server's /metrics endpoint: sessions still
/// open (tests that check nothing leaked).
pub fn sessions_active(metrics: std::net::SocketAddr) -> u64 {
    metric_value(metrics, "tern_sessions_active{shard=\"total\"}")
        .expect("tern_sessions_active total") as u64
}

/// `tern dkim keygen --domain example.org --selector S --algorithm A --dir D`: (the key
/// file, the record's name without the final dot, e.g. `S._domainkey.example.org`, and
/// the TXT value with its character-strings joined).
pub fn dkim_keygen(dir: &Path, selector: &str, alg: &str) -> (PathBuf, String, String) {
    let out = Command::new(tern_bin())
        .args(["dkim", "keygen", "--domain", "example.org", "--selector"])
        .arg(selector)
        .args(["--algorithm", alg, "--dir"])
        .arg(dir)
        .output()
        .expect("tern dkim keygen");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8(out.stdout).expect("UTF-8 record");
    let (name, rest) = line.split_once(" IN TXT ").expect("a TXT record line");
    let value: String = rest
        .trim()
        .split('"')
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(_, s)| s)
        .collect();
    (
        dir.join(format!("example.org.{selector}.{alg}.pem")),
        name.trim_end_matches('.').to_string(),
        value,
    )
}

/// HAProxy's runtime API (its stats socket `sock`): one command, its answer.
pub fn haproxy_cmd(sock: &Path, cmd: &str) -> String {
    let mut s = std::os::unix::net::UnixStream::connect(sock).expect("haproxy runtime socket");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(format!("{cmd}\n").as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// `show stat` rows of HAProxy's servers (not the FRONTEND/BACKEND summary rows), each as
/// column name → value (`pxname`, `svname`, `status`, `check_status`, `scur`, `stot`...).
pub fn haproxy_servers(sock: &Path) -> Vec<std::collections::HashMap<String, String>> {
    let out = haproxy_cmd(sock, "show stat");
    let mut lines = out.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or("")
        .trim_start_matches("# ")
        .split(',')
        .collect();
    lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            header
                .iter()
                .zip(l.split(','))
                .map(|(h, v)| (h.to_string(), v.to_string()))
                .collect::<std::collections::HashMap<_, _>>()
        })
        .filter(|row| {
            row.get("svname")
                .is_some_and(|s| s != "FRONTEND" && s != "BACKEND")
        })
        .collect()
}

/// Waits (30 s at most) until server `node` is in `backends` backends and `ok` holds for
/// its status in each (e.g. "UP", "DOWN", "DRAIN", "MAINT"); panics with the table if not.
pub fn haproxy_wait_status(
    sock: &Path,
    node: &str,
    backends: usize,
    what: &str,
    ok: impl Fn(&str) -> bool,
) {
    let statuses = || -> Vec<String> {
        haproxy_servers(sock)
            .into_iter()
            .filter(|r| r.get("svname").is_some_and(|s| s == node))
            .filter_map(|mut r| r.remove("status"))
            .collect()
    };
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        let st = statuses();
        if st.len() == backends && st.iter().all(|s| ok(s)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "HAProxy did not see {node} {what} within 30 s: {:?}",
        statuses()
    );
}

/// The nice value of each thread of process `pid` whose name starts with `prefix`
/// (from /proc: field 19 of the thread's stat, counted after the ")" that ends its name).
pub fn thread_nices(pid: u32, prefix: &str) -> Vec<(String, i32)> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let t = t.path();
        let comm = std::fs::read_to_string(t.join("comm")).unwrap_or_default();
        if !comm.starts_with(prefix) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(t.join("stat")) else {
            continue;
        };
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
            continue;
        };
        if let Some(nice) = rest.split_whitespace().nth(16).and_then(|n| n.parse().ok()) {
            out.push((comm.trim().to_string(), nice));
        }
    }
    out
}

/// Waits until `reloads` configuration reloads have been applied by every one of
/// `shards` shards, as `log` (a server's stderr) says. "configuration reloaded" is said
/// when the shards are told; each applies it on its own a moment later, and a session
/// landing on a shard before that still gets the old settings.
pub fn wait_applied(log: &Mutex<String>, shards: usize, reloads: usize) {
    wait_for(
        "every shard to apply the reload",
        Duration::from_secs(10),
        || {
            log.lock()
                .map(|l| l.matches("configuration applied").count() >= reloads * shards)
                .unwrap_or(false)
        },
    );
}

/// Reads `r` (a child's stderr) to its end on a thread of its own, so a full pipe never
/// blocks the child; the text so far is in the returned buffer.
pub fn drain_text(mut r: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let text = Arc::new(Mutex::new(String::new()));
    let sink = text.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = r.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    text
}
