//! e2e 24: the reference cluster of docs/cluster.md, built for real on this machine from
//! the files under `packaging/cluster/` (so they cannot rot):
//!
//! - a test network 10.231.N.0/24 of its own (N from the pid): a bridge in the root
//!   namespace holding the "services" addresses (.1 the test itself, the sinks; .5
//!   PostgreSQL; .6 Redis; .31-.34 and .40-.99 the test's clients), and a network namespace per
//!   machine, each on a veth into the bridge: `lb` (.2, HAProxy), `n1`..`n3` (.11-.13,
//!   the tern nodes on the real ports 25, 587, 465 and 9725), `g1`, `g2` (.21, .22, the
//!   two load generators). Everything is removed on drop, panics included;
//! - HAProxy (`haproxy/haproxy.cfg`: TCP mode, `send-proxy-v2` to 587 and 465, /healthz
//!   checks), Redis (`redis/redis.conf`), PostgreSQL (`postgresql/*`, as the postgres
//!   user in a temporary data directory) and the nodes (`tern/tern.toml`, started the
//!   way `systemd/tern-cluster.conf` + `packaging/tern.service` say) — each file with the
//!   reference addresses `10.0.0.x` rewritten to the test network.
//!
//! One test, in order (the parts share the cluster), every client through HAProxy:
//! (a) a user created with `tern passwd` against PostgreSQL authenticates on all three
//! nodes (the time it took is printed); a password change and a deletion reach all
//! three; (b) failed AUTHs from one client address, spread over the three nodes, trip
//! the cluster-wide block on all of them while another address is not blocked; (c) Redis
//! stopped: AUTH goes on, every node says it counts locally; back: every node recovers
//! and counts across the cluster again; (d) PostgreSQL unreachable: AUTH goes on from
//! the snapshots while a password is changed behind the nodes' back; back: every node
//! catches up; (e) users imported from a sasldb2 made by `saslpasswd2` authenticate with
//! every mechanism; (f) `kill -9` of a node under load from two generators (two
//! namespaces, reports merged with `tern-loadgen merge`): HAProxy fails over, the node
//! restarts on its spool, and every message that got a 250 reaches the sink (0 lost;
//! duplicates reported); (g) a node dies for good with undelivered mail: another adopts
//! its spool (`tern queue adopt`) and every message is delivered once; (h) a new node
//! on a fresh disk takes its place: HAProxy's checks bring it in, and it has the users
//! and the cluster's blocks at once (a block made before Redis restarted included: the
//! reference redis.conf keeps an append-only file for that reason).
//!
//! With `TERN_E2E24_SCALE=SECS` it also measures, for docs/scaling.md, AUTH handshakes/s
//! and relay msgs/s through HAProxy with 1, 2 and 3 nodes (the others in MAINT), with
//! the CPU each node used per operation.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use tern_smtp::sasl::client;
use tern_tests::postgres::Postgres;
use tern_tests::{
    json, require, require_tool, tern_bin, wait_for, Client, Reply, Server, TlsVersion,
};

/// The reference deployment's files.
fn packaging(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../packaging")
        .join(rel)
}

fn read_packaging(rel: &str) -> String {
    let p = packaging(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

/// `text` with each `from` replaced by `to`; every `from` must occur (the reference file
/// and the test cannot drift apart silently).
fn template(name: &str, text: &str, subs: &[(&str, &str)]) -> String {
    let mut out = text.to_string();
    for (from, to) in subs {
        assert!(out.contains(from), "{name} no longer contains {from:?}");
        out = out.replace(from, to);
    }
    out
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

#[track_caller]
fn ok(what: &str, o: Output) -> String {
    assert!(
        o.status.success(),
        "{what}: {}\n{}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn ip(args: &[&str]) -> Output {
    run(Command::new("ip").args(args))
}

// ------------------------------------------------------------------------------------
// The test network.
// ------------------------------------------------------------------------------------

/// The bridge, the namespaces and their veths; removed on drop.
struct Net {
    /// "10.231.N."
    prefix: String,
    id: u32,
    bridge: String,
    namespaces: Vec<String>,
}

/// The machines: (namespace suffix, host number).
const MACHINES: [(&str, u8); 6] = [
    ("lb", 2),
    ("n1", 11),
    ("n2", 12),
    ("n3", 13),
    ("g1", 21),
    ("g2", 22),
];

/// Addresses of the root namespace's bridge besides .1: PostgreSQL, Redis, clients.
const ROOT_HOSTS: [u8; 6] = [5, 6, 31, 32, 33, 34];

/// Client addresses for polls that may fail while a change propagates (a wrong password
/// until the new one arrives): a fresh one per poll, so that no poll trips a block.
const POLL_HOSTS: std::ops::Range<u8> = 40..100;

impl Net {
    fn new() -> Net {
        let id = std::process::id() % 250 + 1;
        let mut net = Net {
            prefix: format!("10.231.{id}."),
            id,
            bridge: format!("t24b{id}"),
            namespaces: Vec::new(),
        };
        // Leftovers of a run with the same number that could not clean up (SIGKILL).
        net.remove();
        ok(
            "ip link add (bridge)",
            ip(&["link", "add", &net.bridge, "type", "bridge"]),
        );
        let addr = format!("{}1/24", net.prefix);
        ok(
            "ip addr add",
            ip(&["addr", "add", &addr, "dev", &net.bridge]),
        );
        for h in ROOT_HOSTS.into_iter().chain(POLL_HOSTS) {
            let a = format!("{}{h}/32", net.prefix);
            ok("ip addr add", ip(&["addr", "add", &a, "dev", &net.bridge]));
        }
        ok("ip link set up", ip(&["link", "set", &net.bridge, "up"]));
        for (name, host) in MACHINES {
            let ns = net.ns(name);
            ok("ip netns add", ip(&["netns", "add", &ns]));
            net.namespaces.push(ns.clone());
            let (v, p) = (format!("t24v{id}{name}"), format!("t24p{id}{name}"));
            ok(
                "ip link add (veth)",
                ip(&["link", "add", &v, "type", "veth", "peer", "name", &p]),
            );
            ok("ip link set netns", ip(&["link", "set", &p, "netns", &ns]));
            ok(
                "rename",
                ip(&["-n", &ns, "link", "set", &p, "name", "eth0"]),
            );
            let a = format!("{}{host}/24", net.prefix);
            ok(
                "ip addr add",
                ip(&["-n", &ns, "addr", "add", &a, "dev", "eth0"]),
            );
            ok("eth0 up", ip(&["-n", &ns, "link", "set", "eth0", "up"]));
            ok("lo up", ip(&["-n", &ns, "link", "set", "lo", "up"]));
            ok("master", ip(&["link", "set", &v, "master", &net.bridge]));
            ok("veth up", ip(&["link", "set", &v, "up"]));
        }
        net
    }

    fn ns(&self, machine: &str) -> String {
        format!("t24-{}-{machine}", self.id)
    }

    fn addr(&self, host: u8) -> IpAddr {
        format!("{}{host}", self.prefix).parse().unwrap()
    }

    /// The next of [`POLL_HOSTS`] (round robin).
    fn poller(&self) -> IpAddr {
        use std::sync::atomic::{AtomicU8, Ordering};
        static NEXT: AtomicU8 = AtomicU8::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed) % POLL_HOSTS.len() as u8;
        self.addr(POLL_HOSTS.start + n)
    }

    /// `ip netns exec NS` for `machine`.
    fn exec(&self, machine: &str) -> Vec<String> {
        vec!["ip".into(), "netns".into(), "exec".into(), self.ns(machine)]
    }

    fn remove(&self) {
        for (name, _) in MACHINES {
            let _ = ip(&["netns", "del", &self.ns(name)]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of each veth, which deletes the other.
        self.remove();
    }
}

/// A child process killed on drop.
struct Proc(Option<Child>);

impl Proc {
    fn spawn(cmd: &mut Command) -> Proc {
        Proc(Some(cmd.spawn().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))))
    }

    /// SIGTERM (the sink and the generator print their report on it), then the output.
    fn stop(mut self) -> Output {
        let child = self.0.take().unwrap();
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        child.wait_with_output().unwrap()
    }

    /// Waits for it to exit by itself; its output.
    fn wait_output(mut self) -> Output {
        self.0.take().unwrap().wait_with_output().unwrap()
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn loadgen_bin() -> PathBuf {
    let bin = tern_bin().with_file_name("tern-loadgen");
    assert!(
        bin.exists(),
        "{} missing: cargo build -p tern-loadgen",
        bin.display()
    );
    bin
}

/// A `tern-loadgen sink --dedup` on `addr`, writing the Message-IDs it received to
/// `ids` when given.
fn sink(addr: SocketAddr, ids: Option<&Path>) -> Proc {
    let mut c = Command::new(loadgen_bin());
    c.args(["sink", "--listen", &addr.to_string()])
        .args(["--dedup", "--allow-remote", "--json", "-q"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(p) = ids {
        c.arg("--ids").arg(p);
    }
    Proc::spawn(&mut c)
}

/// `(outcome, Message-ID)` lines of a `tern-loadgen relay --ids` or `sink --ids` file.
fn id_lines(p: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

/// Where `needle` occurs in the files under `dir` (spool segments hold each message's
/// bytes), as `file@offset`: says whether a missing message ever reached a disk.
fn find_in_files(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(data) = std::fs::read(&p) {
                for (i, w) in data.windows(needle.len()).enumerate() {
                    if w == needle {
                        hits.push(format!("{}@{i}", p.display()));
                    }
                }
            }
        }
    }
    hits
}

fn report(out: &Output, what: &str) -> json::Value {
    let text = String::from_utf8_lossy(&out.stdout);
    json::parse(text.trim()).unwrap_or_else(|e| {
        panic!(
            "{what}: no JSON report ({e}): {text}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn num(v: &json::Value, k: &str) -> u64 {
    v.get(k)
        .unwrap_or_else(|| panic!("no {k} in report"))
        .as_u64()
}

fn fnum(v: &json::Value, k: &str) -> f64 {
    match v.get(k) {
        Some(json::Value::Num(n)) => *n,
        other => panic!("no number {k} in report: {other:?}"),
    }
}

/// A percentile (ms) of a loadgen report's headline latency.
fn latency(v: &json::Value, p: &str) -> f64 {
    let head = v
        .get("headline")
        .map(|h| h.as_str().to_string())
        .unwrap_or_default();
    v.get("latency_ms")
        .and_then(|l| l.get(&head))
        .map(|x| fnum(x, p))
        .unwrap_or(f64::NAN)
}

/// utime + stime of a process, in clock ticks (100 per second).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

// ------------------------------------------------------------------------------------
// The services: PostgreSQL, Redis, HAProxy.
// ------------------------------------------------------------------------------------

const ADMIN_PW: &str = "admin-Pw-e2e24";
const NODE_PW: &str = "node-Pw-e2e24";

/// The users database as docs/cluster.md sets it up: setup.sql, pg_hba.conf's lines,
/// `tern passwd --init` as tern_admin, grants.sql.
fn users_db(net: &Net) -> Postgres {
    let pg = Postgres::start_on(&net.addr(5).to_string(), 5432);
    let setup = template(
        "postgresql/setup.sql",
        &read_packaging("cluster/postgresql/setup.sql"),
        &[("admin-CHANGE-ME", ADMIN_PW), ("node-CHANGE-ME", NODE_PW)],
    );
    // psql -c runs a multi-statement string as one transaction; CREATE DATABASE may not
    // run in one: one statement at a time.
    for stmt in sql_statements(&setup) {
        pg.psql(&stmt);
    }
    let hba = template(
        "postgresql/pg_hba.conf",
        &read_packaging("cluster/postgresql/pg_hba.conf"),
        &[("10.0.0.", &net.prefix)],
    );
    pg.prepend_hba(&hba);
    let url = admin_url(net);
    // The reload of pg_hba.conf is asynchronous: the first try may still be refused.
    let mut last = None;
    wait_for(
        "tern passwd --init as tern_admin",
        Duration::from_secs(20),
        || {
            let o = run(Command::new(tern_bin()).args(["passwd", "--init", "-f", &url]));
            let done = o.status.success();
            last = Some(o);
            done
        },
    );
    drop(last);
    let grants = read_packaging("cluster/postgresql/grants.sql");
    for stmt in sql_statements(&grants) {
        pg.psql_as("mail", "tern_admin", &stmt);
    }
    pg
}

/// The statements of a SQL file (comments dropped; no `;` inside literals there).
fn sql_statements(sql: &str) -> Vec<String> {
    let body: String = sql
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n");
    body.split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

fn admin_url(net: &Net) -> String {
    format!(
        "postgresql://tern_admin:{ADMIN_PW}@{}:5432/mail",
        net.addr(5)
    )
}

/// redis-server on redis/redis.conf; killed on drop.
struct Redis {
    proc: Option<Proc>,
    conf: PathBuf,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Redis {
    fn start(net: &Net) -> Redis {
        let dir = tempfile::Builder::new()
            .prefix("tern-e2e24-redis-")
            .tempdir()
            .unwrap();
        let conf = template(
            "redis/redis.conf",
            &read_packaging("cluster/redis/redis.conf"),
            &[
                ("10.0.0.", &net.prefix),
                ("/var/lib/redis", dir.path().to_str().unwrap()),
            ],
        );
        let path = dir.path().join("redis.conf");
        std::fs::write(&path, conf).unwrap();
        let mut r = Redis {
            proc: None,
            conf: path,
            addr: SocketAddr::new(net.addr(6), 6379),
            _dir: dir,
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        self.proc = Some(Proc::spawn(
            Command::new("redis-server")
                .arg(&self.conf)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        ));
        let addr = self.addr;
        wait_for(
            "redis-server to answer PING",
            Duration::from_secs(20),
            || {
                let Ok(mut s) = TcpStream::connect(addr) else {
                    return false;
                };
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let mut buf = [0u8; 16];
                s.write_all(b"PING\r\n").is_ok()
                    && s.read(&mut buf)
                        .is_ok_and(|n| buf[..n].starts_with(b"+PONG"))
            },
        );
    }

    fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// Removes what a stopped Redis persisted (its append-only files): a Redis that
    /// comes back empty, as one without persistence, a new instance, or one killed
    /// inside its fsync interval on a busy disk does.
    fn lose_data(&self) {
        assert!(self.proc.is_none(), "stop Redis first");
        for e in std::fs::read_dir(self._dir.path()).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                std::fs::remove_dir_all(&p).unwrap();
            } else if p.extension().is_some_and(|x| x == "rdb" || x == "aof") {
                std::fs::remove_file(&p).unwrap();
            }
        }
    }

    /// Whether `member` is in the cluster's set of blocks (ZSCORE over a raw socket).
    fn blocked(&self, member: &str) -> bool {
        let Ok(mut s) = TcpStream::connect(self.addr) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let cmd = format!("ZSCORE tern:blocks {member}\r\n");
        let mut buf = [0u8; 64];
        s.write_all(cmd.as_bytes()).is_ok()
            && s.read(&mut buf)
                .is_ok_and(|n| n > 0 && buf[0] == b'$' && buf[1] != b'-')
    }
}

/// HAProxy on haproxy/haproxy.cfg in the `lb` namespace; killed on drop.
struct HaProxy {
    proc: Proc,
    sock: PathBuf,
    addr: IpAddr,
    _dir: tempfile::TempDir,
}

impl HaProxy {
    fn start(net: &Net) -> HaProxy {
        let dir = tempfile::Builder::new()
            .prefix("tern-e2e24-haproxy-")
            .tempdir()
            .unwrap();
        let sock = dir.path().join("admin.sock");
        let cfg = template(
            "haproxy/haproxy.cfg",
            &read_packaging("cluster/haproxy/haproxy.cfg"),
            &[
                ("10.0.0.", &net.prefix),
                ("/run/haproxy/admin.sock", sock.to_str().unwrap()),
            ],
        );
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, &cfg).unwrap();
        ok(
            "haproxy -c",
            run(Command::new("haproxy").arg("-c").arg("-f").arg(&path)),
        );
        let proc = Proc::spawn(
            Command::new("ip")
                .args(["netns", "exec", &net.ns("lb"), "haproxy", "-db", "-f"])
                .arg(&path)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped()),
        );
        let mut h = HaProxy {
            proc,
            sock,
            addr: net.addr(2),
            _dir: dir,
        };
        let start = Instant::now();
        while UnixStream::connect(&h.sock).is_err() {
            let exited = h.proc.0.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || start.elapsed() > Duration::from_secs(20) {
                let mut err = String::new();
                if let Some(e) = h.proc.0.as_mut().and_then(|c| c.stderr.as_mut()) {
                    let _ = e.read_to_string(&mut err);
                }
                panic!("haproxy did not start ({exited:?}): {err}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        h
    }

    fn at(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.addr, port)
    }

    fn cmd(&self, cmd: &str) -> String {
        tern_tests::haproxy_cmd(&self.sock, cmd)
    }

    /// `show stat` rows of the servers: (backend, server, status, total sessions).
    fn servers(&self) -> Vec<(String, String, String, u64)> {
        tern_tests::haproxy_servers(&self.sock)
            .into_iter()
            .map(|mut r| {
                let mut take = |k: &str| r.remove(k).unwrap_or_default();
                let (px, sv, st) = (take("pxname"), take("svname"), take("status"));
                (px, sv, st, take("stot").parse().unwrap_or(0))
            })
            .collect()
    }

    fn wait_status(&self, node: &str, what: &str, ok: impl Fn(&str) -> bool) {
        tern_tests::haproxy_wait_status(&self.sock, node, 3, what, ok)
    }

    /// Sessions HAProxy sent to `node` on 587 so far.
    fn submission_sessions(&self, node: &str) -> u64 {
        self.servers()
            .into_iter()
            .find(|s| s.0 == "submission" && s.1 == node)
            .map(|s| s.3)
            .unwrap_or(0)
    }
}

// ------------------------------------------------------------------------------------
// The nodes.
// ------------------------------------------------------------------------------------

struct Node {
    name: String,
    ip: IpAddr,
    server: Server,
    dir: tempfile::TempDir,
}

/// The cert every node presents (CN and SAN localhost: the harness's TLS client checks
/// that name against this very certificate).
fn make_cert(dir: &Path) {
    ok(
        "openssl req",
        run(Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ])
            .args(["-nodes", "-days", "2", "-subj", "/CN=localhost"])
            .args(["-addext", "subjectAltName=DNS:localhost"])
            .args(["-addext", "basicConstraints=critical,CA:FALSE"])
            .arg("-keyout")
            .arg(dir.join("key.pem"))
            .arg("-out")
            .arg(dir.join("cert.pem"))),
    );
}

/// What the unit and its drop-in run: ExecStartPre's check-config, ExecStart's command.
fn unit_commands() -> (String, String) {
    let unit = read_packaging("tern.service");
    let dropin = read_packaging("cluster/systemd/tern-cluster.conf");
    let line = |text: &str, key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} line"))
            .trim()
            .to_string()
    };
    (line(&dropin, "ExecStartPre="), line(&unit, "ExecStart="))
}

impl Node {
    fn start(net: &Net, k: u8, extra: &[String]) -> Node {
        let name = format!("node{k}");
        let dir = tempfile::Builder::new()
            .prefix(&format!("tern-e2e24-{name}-"))
            .tempdir()
            .unwrap();
        make_cert(dir.path());
        let d = dir.path().to_str().unwrap().to_string();
        let spool = format!("{d}/spool");
        let cfg = template(
            "tern/tern.toml",
            &read_packaging("cluster/tern/tern.toml"),
            &[
                ("10.0.0.", &net.prefix),
                ("node1", &name),
                ("/etc/tern", &d),
                ("/var/spool/tern", &spool),
                ("node-CHANGE-ME", NODE_PW),
            ],
        );
        let file = dir.path().join("tern.toml");
        std::fs::write(&file, cfg).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let (pre, start) = unit_commands();
        assert_eq!(
            start, "/usr/local/bin/tern serve --config /etc/tern/tern.toml",
            "packaging/tern.service's ExecStart: the harness runs exactly this"
        );
        // ExecStartPre, as systemd would run it (with the test's binary and file).
        let pre = pre
            .replace("/usr/local/bin/tern", tern_bin().to_str().unwrap())
            .replace("/etc/tern/tern.toml", file.to_str().unwrap());
        let mut words = pre.split_whitespace();
        let bin = words.next().unwrap();
        let sets = node_sets(extra);
        let mut check = Command::new(bin);
        check.args(words);
        for s in &sets {
            check.arg("--set").arg(s);
        }
        let shown = ok("ExecStartPre (check-config)", run(&mut check));
        assert!(!shown.contains(NODE_PW), "check-config shows the password");
        let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
        let wrapper = net.exec(&format!("n{k}"));
        let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
        let server = Server::serve(&wrapper, dir.path(), &file, &sets);
        Node {
            name,
            ip: net.addr(10 + k),
            server,
            dir,
        }
    }

    fn sock(&self) -> PathBuf {
        self.server.spool().join("admin.sock")
    }

    fn ctl(&self, args: &[&str]) -> String {
        ok(
            &format!("tern ctl {args:?} on {}", self.name),
            run(Command::new(tern_bin())
                .arg("ctl")
                .args(args)
                .arg("--socket")
                .arg(self.sock())),
        )
    }

    /// queued + in-flight messages.
    fn queued(&self) -> u64 {
        let v = json::parse(self.ctl(&["status", "--json"]).trim()).unwrap();
        v.get("shards")
            .unwrap()
            .as_array()
            .iter()
            .map(|s| {
                s.get("queued").map(|x| x.as_u64()).unwrap_or(0)
                    + s.get("in_flight").map(|x| x.as_u64()).unwrap_or(0)
            })
            .sum()
    }

    /// An unlabelled series of the node's /metrics.
    fn metric(&self, name: &str) -> Option<f64> {
        tern_tests::metric_value(SocketAddr::new(self.ip, 9725), name)
    }
}

/// What the test adds to the reference configuration (see tern/tern.toml's header).
fn node_sets(extra: &[String]) -> Vec<String> {
    let mut v: Vec<String> = [
        "allow_root=true",
        "shards=1",
        "executor.ring_depth=64",
        "executor.io_memory=1048576",
        r#"auth.tarpit="0s""#,
        "auth.ip_failure_limit=4",
        // Polls that fail while a change propagates must not block the login itself.
        "auth.login_failure_limit=1000",
        r#"queue.retry_interval="1s""#,
        r#"queue.max_retry_interval="2s""#,
        r#"queue.connect_timeout="2s""#,
        r#"log.level="info""#,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend_from_slice(extra);
    v
}

// ------------------------------------------------------------------------------------
// Clients (through HAProxy, from the test's own addresses).
// ------------------------------------------------------------------------------------

/// Connected and greeted: the client and the node that answered (from the greeting).
fn greeted(src: IpAddr, to: SocketAddr, tls: bool, cert: &Path) -> (Client, String) {
    let mut c = Client::connect_from(src, to);
    if tls {
        c.upgrade(cert, TlsVersion::Any);
    }
    let r = c.read_reply();
    assert_eq!(r.code, 220, "greeting: {r}");
    let node = r.text().split('.').next().unwrap_or("").to_string();
    let e = c.cmd("EHLO client.test");
    assert_eq!(e.code, 250, "EHLO: {e}");
    (c, node)
}

/// One AUTH with `mech` through the balancer from `src`: (node, final code). PLAIN and
/// LOGIN over 465 (implicit TLS), the others over 587 in the clear (the exchange is what
/// is tested; the reference config allows no plaintext password without TLS).
fn auth(cl: &Cluster, src: IpAddr, mech: &str, login: &str, password: &str) -> (String, u16) {
    let tls = matches!(mech, "PLAIN" | "LOGIN");
    let to = cl.hap.at(if tls { 465 } else { 587 });
    let (mut c, node) = greeted(src, to, tls, &cl.cert);
    let code = auth_on(&mut c, mech, login, password).code;
    c.send(b"QUIT\r\n");
    (node, code)
}

fn auth_on(c: &mut Client, mech: &str, login: &str, password: &str) -> Reply {
    let unb64 = |s: &str| B64.decode(s.trim()).expect("base64 from the server");
    match mech {
        "PLAIN" => c.cmd(&format!(
            "AUTH PLAIN {}",
            B64.encode(client::plain("", login, password))
        )),
        "LOGIN" => {
            c.cmd(&format!("AUTH LOGIN {}", B64.encode(login)))
                .check(334, "");
            c.cmd(&B64.encode(password))
        }
        "CRAM-MD5" => {
            let r = c.cmd("AUTH CRAM-MD5");
            if r.code != 334 {
                return r;
            }
            let ch = unb64(&r.lines[0]);
            c.cmd(&B64.encode(client::cram_md5(login, password, &ch)))
        }
        "DIGEST-MD5" => {
            let r = c.cmd("AUTH DIGEST-MD5");
            if r.code != 334 {
                return r;
            }
            let ch = String::from_utf8(unb64(&r.lines[0])).expect("utf8");
            let nonce = ch
                .split("nonce=\"")
                .nth(1)
                .and_then(|v| v.split('"').next())
                .expect("nonce");
            // DIGEST-MD5 carries the realm in its own directive.
            let (user, realm) = login.split_once('@').unwrap_or((login, "example.org"));
            let (resp, rspauth) = client::digest_md5(
                user,
                realm,
                password,
                nonce,
                "e2e24cn",
                "smtp/mail.example.org",
            );
            let r = c.cmd(&B64.encode(&resp));
            if r.code != 334 {
                return r;
            }
            assert_eq!(unb64(&r.lines[0]), rspauth.as_bytes(), "rspauth");
            c.cmd("")
        }
        "SCRAM-SHA-256" => {
            let first = format!("n,,n={login},r=e2e24clientnonce");
            let r = c.cmd(&format!("AUTH SCRAM-SHA-256 {}", B64.encode(&first)));
            if r.code != 334 {
                return r;
            }
            let fin = client::scram_client_final(&first, &unb64(&r.lines[0]), password)
                .expect("server-first parses");
            let r = c.cmd(&B64.encode(&fin));
            if r.code != 334 {
                return r;
            }
            c.cmd("")
        }
        other => panic!("unknown mechanism {other}"),
    }
}

const MECHS: [&str; 5] = ["PLAIN", "LOGIN", "CRAM-MD5", "DIGEST-MD5", "SCRAM-SHA-256"];

/// Three AUTHs in a row (round robin: one per node, when nothing else is connecting):
/// the codes per node, sorted by node name.
fn on_each_node(cl: &Cluster, src: IpAddr, login: &str, password: &str) -> Vec<(String, u16)> {
    let mut v: Vec<(String, u16)> = (0..3)
        .map(|_| auth(cl, src, "CRAM-MD5", login, password))
        .collect();
    v.sort();
    v
}

fn all(code: u16, live: &[&str]) -> Vec<(String, u16)> {
    live.iter().map(|n| (n.to_string(), code)).collect()
}

fn passwd(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(tern_bin())
        .arg("passwd")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tern passwd");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

struct Cluster {
    hap: HaProxy,
    cert: PathBuf,
}

// ------------------------------------------------------------------------------------
// The test.
// ------------------------------------------------------------------------------------

#[test]
fn three_nodes_behind_haproxy_with_postgresql_and_redis() {
    // SAFETY: geteuid(2) cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if !require(root, "root (network namespaces)")
        || !require_tool("ip")
        || !require_tool("haproxy")
        || !require_tool("redis-server")
        || !require_tool("openssl")
        || !require_tool("swaks")
        || !require_tool("saslpasswd2")
        || !require_tool("db_dump")
        || !require(
            tern_tests::postgres::available(),
            "PostgreSQL server binaries and the postgres user",
        )
    {
        return;
    }
    let t0 = Instant::now();
    let net = Net::new();
    let lap = |what: &str| eprintln!("[{:5.1} s] {what}", t0.elapsed().as_secs_f64());

    // The services and the sinks (in the root namespace, on the bridge).
    let mut pg = users_db(&net);
    let mut redis = Redis::start(&net);
    let (sink_addr, held_addr) = (
        SocketAddr::new(net.addr(1), tern_tests::free_port()),
        SocketAddr::new(net.addr(1), tern_tests::free_port()),
    );
    let ids_dir = tempfile::tempdir().unwrap();
    let sink_ids = ids_dir.path().join("sink.ids");
    let sink_proc = sink(sink_addr, Some(&sink_ids));
    // held.test goes to a next hop that is down until part (g).
    let routes = format!(
        r#"queue.routes={{"held.test"="smtp:[{}]:{}","*"="smtp:[{}]:{}"}}"#,
        held_addr.ip(),
        held_addr.port(),
        sink_addr.ip(),
        sink_addr.port()
    );
    let url = admin_url(&net);
    // The user for the load generators, before the nodes start.
    ok(
        "tern passwd -c load",
        passwd(&["-c", "-p", "-f", &url, "load@example.org"], "load-pw\n"),
    );
    lap("network, PostgreSQL, Redis, sink");

    let mut nodes: Vec<Node> = (1..=3)
        .map(|k| Node::start(&net, k, std::slice::from_ref(&routes)))
        .collect();
    let hap = HaProxy::start(&net);
    for n in &nodes {
        hap.wait_status(&n.name, "UP", |s| s == "UP");
        wait_for("the node to reach Redis", Duration::from_secs(20), || {
            n.metric("tern_cluster_redis_up") == Some(1.0)
        });
    }
    let cl = Cluster {
        cert: nodes[0].dir.path().join("cert.pem"),
        hap,
    };
    // Every node presents its own certificate; the harness trusts one file: give the
    // others the same.
    for n in &nodes[1..] {
        for f in ["cert.pem", "key.pem"] {
            std::fs::copy(nodes[0].dir.path().join(f), n.dir.path().join(f)).unwrap();
        }
        n.ctl(&["reload"]);
    }
    let live = ["node1", "node2", "node3"];
    let (c31, c32, c33, c34) = (net.addr(31), net.addr(32), net.addr(33), net.addr(34));
    lap("three nodes up behind HAProxy");

    // (a) A user created with tern passwd against PostgreSQL: on all three nodes.
    let created = Instant::now();
    ok(
        "tern passwd -c alice",
        passwd(
            &["-c", "-p", "-f", &url, "alice@example.org"],
            "Wonder land\n",
        ),
    );
    let mut first_seen = Vec::new();
    wait_for("alice on every node", Duration::from_secs(10), || {
        let v = on_each_node(&cl, net.poller(), "alice@example.org", "Wonder land");
        for (n, code) in &v {
            if *code == 235 && !first_seen.iter().any(|(m, _): &(String, f64)| m == n) {
                first_seen.push((n.clone(), created.elapsed().as_secs_f64()));
            }
        }
        v == all(235, &live)
    });
    eprintln!("(a) alice usable: {first_seen:?} s after tern passwd returned");
    let delays: Vec<String> = nodes
        .iter()
        .map(|n| {
            assert_eq!(n.metric("tern_userstore_up"), Some(1.0), "{}", n.name);
            let d = n
                .metric("tern_userstore_notify_delay_seconds")
                .unwrap_or(f64::NAN);
            format!("{} {:.1} ms", n.name, d * 1000.0)
        })
        .collect();
    eprintln!("(a) NOTIFY-to-snapshot delay (each node's own gauge): {delays:?}");
    // A password change, then a deletion, reach every node.
    ok(
        "tern passwd (change)",
        passwd(&["-p", "-f", &url, "alice@example.org"], "Looking glass\n"),
    );
    wait_for(
        "the new password on every node",
        Duration::from_secs(10),
        || on_each_node(&cl, net.poller(), "alice@example.org", "Looking glass") == all(235, &live),
    );
    assert_eq!(
        on_each_node(&cl, net.poller(), "alice@example.org", "Wonder land"),
        all(535, &live)
    );
    ok(
        "tern passwd -d",
        passwd(&["-d", "-f", &url, "alice@example.org"], ""),
    );
    wait_for(
        "the deletion on every node",
        Duration::from_secs(10),
        || on_each_node(&cl, net.poller(), "alice@example.org", "Looking glass") == all(535, &live),
    );
    lap("(a) create, change, delete: every node");

    // (b) Failed AUTHs from .31 spread over the three nodes: 4 in all (limit 4 per node:
    // no node alone reaches it) block .31 on every node; .32 is not blocked.
    ok(
        "tern passwd -c bob",
        passwd(&["-c", "-p", "-f", &url, "bob@example.org"], "bob-pw\n"),
    );
    wait_for("bob on every node", Duration::from_secs(10), || {
        on_each_node(&cl, net.poller(), "bob@example.org", "bob-pw") == all(235, &live)
    });
    let mut failed_on = Vec::new();
    for _ in 0..4 {
        let (n, code) = auth(&cl, c31, "CRAM-MD5", "bob@example.org", "wrong");
        assert_eq!(code, 535);
        failed_on.push(n);
    }
    failed_on.sort();
    failed_on.dedup();
    assert_eq!(
        failed_on.len(),
        3,
        "failures not spread over the nodes: {failed_on:?}"
    );
    wait_for(
        "the cluster-wide block of .31",
        Duration::from_secs(10),
        || on_each_node(&cl, c31, "bob@example.org", "bob-pw") == all(454, &live),
    );
    assert_eq!(
        on_each_node(&cl, c32, "bob@example.org", "bob-pw"),
        all(235, &live),
        "another client address through the same balancer is blocked"
    );
    let logs: String = nodes.iter().map(|n| n.server.stderr_log()).collect();
    assert!(
        logs.contains("too many failed AUTH attempts across the cluster"),
        "no node logged the cluster block"
    );
    // The nodes saw the real client (PROXY v2 from HAProxy), never the balancer as one.
    let (peer, lb) = (format!("peer={c31}:"), format!("balancer={}:", net.addr(2)));
    for n in &nodes {
        let log = n.server.stderr_log();
        assert!(
            log.lines()
                .any(|l| l.contains(" connect") && l.contains(&peer) && l.contains(&lb)),
            "{} has no connect line from {c31} through {}",
            n.name,
            net.addr(2)
        );
        assert!(
            !log.contains(&format!("peer={}:", net.addr(2))),
            "{}",
            n.name
        );
    }
    lap("(b) cluster-wide block of one client address");

    // (c) Redis stopped: AUTH goes on, every node counts locally; back: recovers. It
    // comes back having lost its data: the nodes write the blocks they know back (the
    // block of .31 must still reach a node that starts later, in (h)).
    redis.stop();
    redis.lose_data();
    for n in &nodes {
        wait_for(
            "the node to see Redis gone",
            Duration::from_secs(20),
            || n.metric("tern_cluster_redis_up") == Some(0.0),
        );
        assert!(n.ctl(&["status"]).contains("DOWN: counting locally"));
    }
    assert_eq!(
        on_each_node(&cl, c32, "bob@example.org", "bob-pw"),
        all(235, &live)
    );
    redis.spawn();
    for n in &nodes {
        wait_for(
            "the node to reach Redis again",
            Duration::from_secs(20),
            || n.metric("tern_cluster_redis_up") == Some(1.0),
        );
    }
    wait_for(
        "the nodes to write the block of .31 back into the empty Redis",
        Duration::from_secs(10),
        || redis.blocked(&format!("ip:{c31}")),
    );
    for _ in 0..4 {
        assert_eq!(
            auth(&cl, c33, "CRAM-MD5", "bob@example.org", "wrong").1,
            535
        );
    }
    wait_for(
        "a cluster block after Redis came back",
        Duration::from_secs(10),
        || on_each_node(&cl, c33, "bob@example.org", "bob-pw") == all(454, &live),
    );
    lap("(c) Redis away and back");

    // (d) PostgreSQL unreachable for the nodes (its Unix socket only, for the
    // administrator): AUTH goes on from the snapshots while bob's password changes;
    // reachable again: every node catches up.
    pg.stop();
    pg.start_socket_only();
    for n in &nodes {
        wait_for(
            "the node to see the database gone",
            Duration::from_secs(20),
            || n.metric("tern_userstore_up") == Some(0.0),
        );
        assert!(
            n.ctl(&["status"]).contains("FALLBACK"),
            "{}",
            n.ctl(&["status"])
        );
    }
    let local = pg.socket_url_as("mail", "tern_admin");
    ok(
        "tern passwd (change, over the socket)",
        passwd(&["-p", "-f", &local, "bob@example.org"], "bob-pw2\n"),
    );
    assert_eq!(
        on_each_node(&cl, c32, "bob@example.org", "bob-pw"),
        all(235, &live),
        "AUTH from the snapshot while the database is away"
    );
    pg.stop();
    pg.start_again();
    for n in &nodes {
        wait_for(
            "the node to reach the database again",
            Duration::from_secs(30),
            || n.metric("tern_userstore_up") == Some(1.0),
        );
    }
    wait_for("every node to catch up", Duration::from_secs(10), || {
        on_each_node(&cl, net.poller(), "bob@example.org", "bob-pw2") == all(235, &live)
    });
    for n in &nodes {
        assert!(n.server.stderr_log().contains("snapshot caught up"));
    }
    lap("(d) PostgreSQL away and back");

    // (e) sasldb2 users (saslpasswd2) imported into PostgreSQL: every mechanism, every
    // node, through the balancer.
    let sdir = tempfile::tempdir().unwrap();
    let sasldb = sdir.path().join("sasldb2");
    let users = [
        ("carol", "example.org", "c@rol pass"),
        ("dave", "example.org", "d\\ave-é"),
    ];
    for (u, r, p) in users {
        let o = passwd_sasl(&sasldb, u, r, p);
        ok("saslpasswd2", o);
    }
    let imp = ok(
        "tern passwd --import-sasldb",
        passwd(
            &["--import-sasldb", sasldb.to_str().unwrap(), "-f", &url],
            "",
        ),
    );
    assert!(imp.contains("imported 2 users"), "{imp}");
    for (u, r, p) in users {
        let login = format!("{u}@{r}");
        for mech in MECHS {
            wait_for(
                &format!("{login} with {mech} on every node"),
                Duration::from_secs(10),
                || {
                    let mut seen: Vec<String> = (0..3)
                        .map(|_| {
                            let (n, code) = auth(&cl, net.poller(), mech, &login, p);
                            if code == 235 {
                                n
                            } else {
                                format!("{n}:{code}")
                            }
                        })
                        .collect();
                    seen.sort();
                    seen == live
                },
            );
        }
        // A bare name is in auth.realm (example.org).
        assert_eq!(auth(&cl, c34, "PLAIN", u, p).1, 235);
        // And a real client: swaks, on 465 and on 587 with STARTTLS, stopping after AUTH.
        for (mech, tls, port) in [
            ("PLAIN", "--tls-on-connect", 465),
            ("LOGIN", "--tls", 587),
            ("CRAM-MD5", "--tls", 587),
        ] {
            let out = run(Command::new("swaks")
                .args(["--server", &cl.hap.at(port).to_string()])
                .args(["--local-interface", &c34.to_string()])
                .args(["--helo", "client.test", "--timeout", "20", tls])
                .args(["--auth", mech, "--auth-user", &login, "--auth-password", p])
                .args(["--quit-after", "AUTH"]));
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && text.contains("235 2.7.0"),
                "swaks {mech} as {login}: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    lap("(e) sasldb2 users, every mechanism");

    // (f) kill -9 of a node under load from two generators; merged reports.
    let gdir = tempfile::tempdir().unwrap();
    let gen = |g: &str| {
        let w = net.exec(g);
        Proc::spawn(
            Command::new(&w[0])
                .args(&w[1..])
                .arg(loadgen_bin())
                .args(["relay", "-t", &cl.hap.at(587).to_string(), "--allow-remote"])
                .args([
                    "--mech",
                    "CRAM-MD5",
                    "--user",
                    "load@example.org",
                    "--password",
                    "load-pw",
                ])
                .args(["--to", "user{n}@example.net", "--size", "1024"])
                .args(["--cores", "1", "--no-pin", "-c", "3", "--rate", "30"])
                .args([
                    "--msgs-per-conn",
                    "5",
                    "-d",
                    "120",
                    "-n",
                    "3000",
                    "--timeout",
                    "10",
                ])
                .arg("--hlog")
                .arg(gdir.path().join(format!("{g}.hlog")))
                .arg("--ids")
                .arg(gdir.path().join(format!("{g}.ids")))
                .args(["--json", "-q"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        )
    };
    let (g1, g2) = (gen("g1"), gen("g2"));
    std::thread::sleep(Duration::from_secs(2));
    nodes[1].server.kill9();
    cl.hap
        .wait_status("node2", "DOWN", |s| s.starts_with("DOWN"));
    let before: u64 = ["node1", "node3"]
        .iter()
        .map(|n| cl.hap.submission_sessions(n))
        .sum();
    wait_for(
        "HAProxy to send the load to node1 and node3",
        Duration::from_secs(10),
        || {
            ["node1", "node3"]
                .iter()
                .map(|n| cl.hap.submission_sessions(n))
                .sum::<u64>()
                >= before + 4
        },
    );
    nodes[1].server.restart();
    cl.hap.wait_status("node2", "UP", |s| s == "UP");
    std::thread::sleep(Duration::from_secs(1));
    let mut runs = Vec::new();
    let (mut ok_total, mut failed_total, mut ok_measured) = (0, 0, 0);
    for (g, p) in [("g1", g1), ("g2", g2)] {
        let out = p.stop();
        let r = report(&out, g);
        ok_measured += num(&r, "ok");
        ok_total += num(&r, "ok") + num(&r, "warmup_ok");
        failed_total += num(&r, "failed");
        let f = gdir.path().join(format!("{g}.json"));
        std::fs::write(&f, &out.stdout).unwrap();
        runs.push(f);
    }
    let merged = ok(
        "tern-loadgen merge",
        run(Command::new(loadgen_bin())
            .arg("merge")
            .args(&runs)
            .arg("--json")),
    );
    let m = json::parse(merged.trim()).expect("merged report");
    assert_eq!(num(&m, "ok"), ok_measured, "merge sums the generators");
    assert_eq!(num(&m, "runs"), 2, "{merged}");
    eprintln!(
        "(f) generators merged: {} ok, {} failed, {:.1} msg/s, p50 {:.1} ms, p99 {:.1} ms",
        num(&m, "ok"),
        num(&m, "failed"),
        fnum(&m, "throughput"),
        latency(&m, "p50"),
        latency(&m, "p99")
    );
    assert!(ok_total >= 100, "too little load: {ok_total}");
    // Everything accepted is delivered: every queue empty, then count at the sink.
    let emptied = (0..600).any(|_| {
        let done = nodes.iter().all(|n| n.queued() == 0);
        if !done {
            std::thread::sleep(Duration::from_millis(100));
        }
        done
    });
    if !emptied {
        for n in &nodes {
            let log = n.server.stderr_log();
            let tail: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("defer") || l.contains("recover") || l.contains("ERROR"))
                .collect();
            eprintln!(
                "{}: {}\n{}",
                n.name,
                n.ctl(&["status"]),
                tail[tail.len().saturating_sub(10)..].join("\n")
            );
        }
        panic!("timed out waiting for every queue to empty");
    }
    let s = report(&sink_proc.stop(), "sink");
    let (got, unique, dups) = (
        num(&s, "messages"),
        num(&s, "unique_messages"),
        num(&s, "duplicates"),
    );
    eprintln!(
        "(f) kill -9 under load: {ok_total} answered 250, {failed_total} failed at the client; \
         sink {got} received, {unique} distinct, {dups} duplicate(s)"
    );
    // Message by message: every Message-ID answered 250 arrived. A missing one is looked
    // for in every node's spool, so a failure says whether it ever reached a disk.
    let arrived: std::collections::HashMap<String, u32> = id_lines(&sink_ids)
        .into_iter()
        .map(|(n, id)| (id, n.parse().unwrap_or(0)))
        .collect();
    let mut sent = Vec::new();
    for g in ["g1", "g2"] {
        sent.extend(id_lines(&gdir.path().join(format!("{g}.ids"))));
    }
    let acked: Vec<&String> = sent
        .iter()
        .filter(|(o, _)| o == "250")
        .map(|(_, id)| id)
        .collect();
    assert_eq!(acked.len() as u64, ok_total, "--ids lists every 250");
    let missing: Vec<&String> = acked
        .iter()
        .copied()
        .filter(|id| !arrived.contains_key(*id))
        .collect();
    for id in &missing {
        let on_disk: Vec<String> = nodes
            .iter()
            .flat_map(|n| find_in_files(&n.server.spool(), id.as_bytes()))
            .collect();
        eprintln!("(f) answered 250, never arrived: {id}; in spools: {on_disk:?}");
    }
    let unsure: Vec<&(String, String)> = sent.iter().filter(|(o, _)| o != "250").collect();
    for (o, id) in unsure.iter().take(20) {
        eprintln!(
            "(f) outcome {o} at the client, {} at the sink: {id}",
            arrived.get(id).copied().unwrap_or(0)
        );
    }
    assert!(missing.is_empty(), "lost mail: {missing:?}");
    assert!(
        unique >= ok_total,
        "lost mail: {ok_total} got a 250, {unique} arrived"
    );
    // A message may be durable on the node without its 250 reaching the client (the
    // kill came in between): at most the failed ones arrive beyond the 250s.
    assert!(
        unique <= ok_total + failed_total,
        "{unique} > {ok_total} + {failed_total}"
    );
    lap("(f) kill -9 under load");

    // (g) node3 dies for good with undelivered mail (held.test's next hop is down);
    // node1 adopts its spool; everything is delivered once.
    let mut on = Vec::new();
    for i in 0..6 {
        let (mut c, n) = greeted(c34, cl.hap.at(587), false, &cl.cert);
        auth_on(&mut c, "CRAM-MD5", "bob@example.org", "bob-pw2").check(235, "2.7.0");
        let body = format!("Subject: held {i}\r\nMessage-ID: <held{i}@e2e24>\r\n\r\nheld\r\n");
        c.send_mail(
            "bob@example.org",
            &[&format!("h{i}@held.test")],
            body.as_bytes(),
        );
        c.send(b"QUIT\r\n");
        on.push(n);
    }
    let on3 = on.iter().filter(|n| *n == "node3").count() as u64;
    assert!(on3 >= 1, "no held mail on node3: {on:?}");
    wait_for("node3's held mail queued", Duration::from_secs(10), || {
        nodes[2].queued() == on3
    });
    nodes[2].server.kill9();
    cl.hap
        .wait_status("node3", "DOWN", |s| s.starts_with("DOWN"));
    let o = ok(
        "tern queue adopt",
        run(Command::new(tern_bin())
            .args(["queue", "adopt"])
            .arg(nodes[2].server.spool())
            .arg("--socket")
            .arg(nodes[0].sock())),
    );
    assert!(o.contains(&format!("adopted {on3} message(s)")), "{o}");
    let again = ok(
        "tern queue adopt (again)",
        run(Command::new(tern_bin())
            .args(["queue", "adopt"])
            .arg(nodes[2].server.spool())
            .arg("--socket")
            .arg(nodes[0].sock())),
    );
    assert!(again.contains("adopted already"), "{again}");
    let held = sink(held_addr, None);
    for n in &nodes[..2] {
        n.ctl(&["status"]);
        ok(
            "tern queue flush",
            run(Command::new(tern_bin())
                .args(["queue", "flush", "--socket"])
                .arg(n.sock())),
        );
    }
    wait_for(
        "node1 and node2 to deliver the held mail",
        Duration::from_secs(30),
        || nodes[..2].iter().all(|n| n.queued() == 0),
    );
    let h = report(&held.stop(), "held sink");
    assert_eq!(
        (num(&h, "unique_messages"), num(&h, "duplicates")),
        (6, 0),
        "every held message exactly once"
    );
    lap("(g) spool adopted");

    // (h) A new node3 on a fresh disk takes the dead one's place (docs/cluster.md, "Adding
    // a node"): nothing to tell the others; HAProxy's checks bring it in, and it has the
    // users and the blocks of the cluster at once.
    let spool3 = nodes[2].server.spool();
    nodes[2] = Node::start(&net, 3, std::slice::from_ref(&routes));
    assert_ne!(spool3, nodes[2].server.spool());
    for f in ["cert.pem", "key.pem"] {
        std::fs::copy(cl.cert.with_file_name(f), nodes[2].dir.path().join(f)).unwrap();
    }
    nodes[2].ctl(&["reload"]);
    cl.hap.wait_status("node3", "UP", |s| s == "UP");
    wait_for("the new node3 in service", Duration::from_secs(10), || {
        on_each_node(&cl, c32, "bob@example.org", "bob-pw2") == all(235, &live)
    });
    assert_eq!(
        on_each_node(&cl, c31, "bob@example.org", "bob-pw2"),
        all(454, &live),
        "the new node does not know the cluster's block"
    );
    lap("(h) a new node3 joined");

    if let Some(secs) = std::env::var("TERN_E2E24_SCALE")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
    {
        let _sink = sink(sink_addr, None);
        scale(&net, &cl, &mut nodes, &routes, secs);
    }
    drop(cl);
    drop(nodes);
    drop(redis);
    drop(pg);
    lap("done");
}

fn passwd_sasl(db: &Path, user: &str, realm: &str, pw: &str) -> Output {
    let mut child = Command::new("saslpasswd2")
        .args(["-c", "-p", "-f"])
        .arg(db)
        .args(["-u", realm, user])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("saslpasswd2");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{pw}\n").as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// One measured round for docs/scaling.md: `tern-loadgen SCENARIO` from both generator
/// namespaces at once through HAProxy's 587, the two reports merged.
fn load_round(
    net: &Net,
    cl: &Cluster,
    scenario: &str,
    extra: &[&str],
    secs: f64,
    tag: &str,
) -> json::Value {
    let dir = tempfile::tempdir().unwrap();
    let runs: Vec<(String, Proc)> = ["g1", "g2"]
        .iter()
        .map(|g| {
            let w = net.exec(g);
            let p = Proc::spawn(
                Command::new(&w[0])
                    .args(&w[1..])
                    .arg(loadgen_bin())
                    .arg(scenario)
                    .args(["-t", &cl.hap.at(587).to_string(), "--allow-remote"])
                    .args(["--user", "load@example.org", "--password", "load-pw"])
                    .args(extra)
                    .args(["--cores", "1", "--no-pin", "-c", "16", "--warmup", "1"])
                    .args(["-d", &secs.to_string(), "--json", "-q"])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped()),
            );
            (g.to_string(), p)
        })
        .collect();
    let mut files = Vec::new();
    for (g, p) in runs {
        let out = p.wait_output();
        report(&out, &g);
        let f = dir.path().join(format!("{tag}-{g}.json"));
        std::fs::write(&f, &out.stdout).unwrap();
        files.push(f);
    }
    let merged = ok(
        "tern-loadgen merge",
        run(Command::new(loadgen_bin())
            .arg("merge")
            .args(&files)
            .arg("--json")),
    );
    json::parse(merged.trim()).unwrap()
}

fn hap_ticks(cl: &Cluster) -> u64 {
    cl.hap
        .proc
        .0
        .as_ref()
        .map(|c| cpu_ticks(c.id()))
        .unwrap_or(0)
}

/// docs/scaling.md's figures (not assertions): AUTH handshakes/s and relay msgs/s through
/// HAProxy with 1, 2 and 3 nodes in service, and each node's CPU per operation; then AUTH
/// with the users in PostgreSQL and in a file, three nodes each, interleaved (the nodes
/// restarted on the other store between rounds).
fn scale(net: &Net, cl: &Cluster, nodes: &mut Vec<Node>, routes: &str, secs: f64) {
    let backends = ["smtp", "submission", "smtps"];
    eprintln!("scale: nodes | scenario | ops/s (merged, 2 generators) | p50 / p99 ms | node CPU ms per op (each node in service) | HAProxy CPU ms per op");
    let relay = [
        "--mech",
        "CRAM-MD5",
        "--to",
        "user{n}@example.net",
        "--msgs-per-conn",
        "50",
        "--size",
        "1024",
    ];
    for k in 1..=3usize {
        for (i, n) in nodes.iter().enumerate() {
            let state = if i < k { "ready" } else { "maint" };
            for be in backends {
                cl.hap
                    .cmd(&format!("set server {be}/{} state {state}", n.name));
            }
        }
        for n in &nodes[..k] {
            cl.hap.wait_status(&n.name, "UP", |s| s == "UP");
        }
        for (scenario, extra) in [("auth", &["--mech", "CRAM-MD5"][..]), ("relay", &relay[..])] {
            let cpu0: Vec<u64> = nodes.iter().map(|n| cpu_ticks(n.server.pid())).collect();
            let hap0 = hap_ticks(cl);
            let m = load_round(net, cl, scenario, extra, secs, &format!("{scenario}-{k}"));
            let ops = (num(&m, "ok") + num(&m, "warmup_ok")).max(1) as f64;
            let per_node: Vec<String> = nodes[..k]
                .iter()
                .zip(&cpu0)
                .map(|(n, c0)| {
                    let ms = (cpu_ticks(n.server.pid()) - c0) as f64 * 10.0;
                    format!("{} {:.2}", n.name, ms / ops)
                })
                .collect();
            let hap = hap_ticks(cl) - hap0;
            eprintln!(
                "scale: {k} | {scenario} | {:.0} ({} failed) | {:.1} / {:.1} | {} | {:.3}",
                fnum(&m, "throughput"),
                num(&m, "failed"),
                latency(&m, "p50"),
                latency(&m, "p99"),
                per_node.join(", "),
                hap as f64 * 10.0 / ops
            );
        }
        // Let the relay round's mail leave before the next round.
        wait_for("the queues to empty", Duration::from_secs(120), || {
            nodes.iter().all(|n| n.queued() == 0)
        });
    }

    // The same user in a file, for the nodes restarted on it.
    let fdir = tempfile::tempdir().unwrap();
    let file = fdir.path().join("users.db");
    let f = file.to_str().unwrap();
    ok(
        "tern passwd -c (file)",
        passwd(&["-c", "-p", "-f", f, "load@example.org"], "load-pw\n"),
    );
    let file_set = format!(r#"auth.users="{f}""#);
    for round in 1..=2 {
        for store in ["postgresql", "file"] {
            let mut extra = vec![routes.to_string()];
            if store == "file" {
                extra.push(file_set.clone());
            }
            for n in nodes.iter_mut() {
                n.server.kill9();
            }
            let fresh: Vec<Node> = (1..=3u8).map(|k| Node::start(net, k, &extra)).collect();
            *nodes = fresh;
            for n in nodes.iter() {
                cl.hap.wait_status(&n.name, "UP", |s| s == "UP");
            }
            let m = load_round(net, cl, "auth", &["--mech", "CRAM-MD5"], secs, store);
            eprintln!(
                "store: round {round} | {store} | {:.0} AUTH/s ({} failed) | p50 {:.1} / p99 {:.1} ms",
                fnum(&m, "throughput"),
                num(&m, "failed"),
                latency(&m, "p50"),
                latency(&m, "p99"),
            );
        }
    }
}
