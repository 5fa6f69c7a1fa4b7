//! e2e 16: two tern nodes behind a real HAProxy (Debian's 2.6), started by the test on
//! free loopback ports: `mode tcp`, `send-proxy-v2` toward 587 and 465, `send-proxy` (v1)
//! toward 25, `option httpchk GET /healthz` against each node's metrics port. Clients
//! connect from their own 127.0.0.x addresses to HAProxy's frontends on 127.0.0.1; HAProxy
//! connects to the nodes from 127.0.0.1, the nodes' only `listeners.proxy_from`.
//!
//! One test, in order (the parts share the balancer and the nodes):
//!
//! - (a) `Received:` of mail delivered through the balancer names the real client (swaks
//!   from 127.0.0.11/12/13 on 25, 587 + STARTTLS + AUTH, 465 + AUTH);
//! - (b) the nodes' logs name it: `connect` with `balancer=`, `NOQUEUE: reject: ... from
//!   [client]`;
//! - (c) `relay.trusted_networks` sees the real client: 127.0.0.10 may relay, 127.0.0.30
//!   gets `554 5.7.1`, through the same frontend;
//! - (d) failed AUTHs from 127.0.0.20 block 127.0.0.20 on both nodes (`454 4.7.0`) while
//!   127.0.0.21, through the same balancer, still authenticates;
//! - (e) a rolling restart under `tern-loadgen` relay load (to a `tern-loadgen sink`):
//!   each node in turn is drained with `tern ctl drain` alone (nothing is said to
//!   HAProxy), seen DOWN by HAProxy's health check, left by its last session, stopped
//!   with SIGTERM, started again on its spool; the generator reports no error and every
//!   message that got a 250 reaches the sink (duplicates counted and printed, not treated
//!   as loss).
//!
//! Why no connection is refused: `/healthz` answers 503 from the moment of the drain, but
//! HAProxy notices only at its next check (up to `inter` x `fall` later), so a node that
//! refused at once would answer `421 4.3.2` to what HAProxy routes to it in between. The
//! nodes run with `shutdown.drain_delay = "1s"` (a few check intervals): they keep
//! serving new connections that long, and refuse only after the balancer has taken them
//! out.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use tern_smtp::sasl::client;
use tern_tests::{free_port, json, maildir, require_tool, tern_bin, wait_for, Client, Server};

fn lo(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, n))
}

fn at(port: u16) -> SocketAddr {
    SocketAddr::new(lo(1), port)
}

/// The loadgen binary next to `tern` in the target directory.
fn loadgen_bin() -> PathBuf {
    let bin = tern_bin().with_file_name("tern-loadgen");
    assert!(
        bin.exists(),
        "{} missing: cargo build -p tern-loadgen (same profile and target dir)",
        bin.display()
    );
    bin
}

// ------------------------------------------------------------------------------------
// The nodes.
// ------------------------------------------------------------------------------------

/// One tern node on fixed ports (HAProxy's configuration names them; a restarted node
/// must come back on the same ones) in its own directory.
struct Node {
    name: &'static str,
    smtp: u16,
    submission: u16,
    smtps: u16,
    metrics: u16,
    server: Server,
    dir: tempfile::TempDir,
}

impl Node {
    fn start(name: &'static str, sink: u16) -> Node {
        let dir = tempfile::Builder::new()
            .prefix("tern-e2e16-")
            .tempdir()
            .unwrap();
        let (smtp, submission, smtps, metrics) =
            (free_port(), free_port(), free_port(), free_port());
        let d = dir.path().display();
        let sets = [
            "shards=1".to_string(),
            format!(r#"listeners.smtp=["127.0.0.1:{smtp}"]"#),
            format!(r#"listeners.submission=["127.0.0.1:{submission}"]"#),
            format!(r#"listeners.smtps=["127.0.0.1:{smtps}"]"#),
            format!(r#"metrics.listen="127.0.0.1:{metrics}""#),
            // HAProxy connects from 127.0.0.1; clients use other 127.0.0.x addresses.
            r#"listeners.proxy_from=["127.0.0.1/32"]"#.to_string(),
            // Longer than HAProxy needs to see the 503 (inter 200ms x fall 2, see below).
            r#"shutdown.drain_delay="1s""#.to_string(),
            r#"relay.trusted_networks=["127.0.0.10/32"]"#.to_string(),
            "auth.ip_failure_limit=3".to_string(),
            "auth.tarpit=10ms".to_string(),
            // Local mail and relay.test into the node's maildir (read by the test);
            // everything else (the generator's example.net) to the sink.
            format!(
                r#"queue.routes={{"demo.test"="maildir:{d}/maildir","relay.test"="maildir:{d}/maildir","*"="smtp:[127.0.0.1]:{sink}"}}"#
            ),
            "queue.retry_interval=1s".to_string(),
        ];
        let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
        let server = Server::start(Some(dir.path()), &sets);
        Node {
            name,
            smtp,
            submission,
            smtps,
            metrics,
            server,
            dir,
        }
    }

    fn maildir(&self) -> Vec<(String, String)> {
        maildir(self.dir.path())
    }

    fn ctl(&self, args: &[&str]) -> String {
        let sock = self.server.spool().join("admin.sock");
        let out = Command::new(tern_bin())
            .arg("ctl")
            .args(args)
            .arg("--socket")
            .arg(&sock)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tern ctl {args:?} on node {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// (open sessions, queued + in-flight messages) from `tern ctl status --json`.
    fn status(&self) -> (u64, u64) {
        let v = json::parse(self.ctl(&["status", "--json"]).trim()).unwrap();
        let shards = v.get("shards").unwrap().as_array();
        let sum = |k: &str| -> u64 {
            shards
                .iter()
                .map(|s| s.get(k).map(|x| x.as_u64()).unwrap_or(0))
                .sum()
        };
        (sum("connections"), sum("queued") + sum("in_flight"))
    }
}

// ------------------------------------------------------------------------------------
// HAProxy.
// ------------------------------------------------------------------------------------

/// HAProxy in the foreground (`-db`) with its configuration and runtime socket in a
/// temporary directory; killed on drop whatever happens.
struct HaProxy {
    child: Child,
    sock: PathBuf,
    _dir: tempfile::TempDir,
    smtp: u16,
    submission: u16,
    smtps: u16,
}

const BACKENDS: [&str; 3] = ["smtp", "submission", "smtps"];

impl HaProxy {
    fn start(nodes: &[&Node]) -> HaProxy {
        let dir = tempfile::Builder::new()
            .prefix("tern-e2e16-haproxy-")
            .tempdir()
            .unwrap();
        let sock = dir.path().join("admin.sock");
        let (smtp, submission, smtps) = (free_port(), free_port(), free_port());
        let mut cfg = format!(
            "\
global
    maxconn 2000
    stats socket {sock} mode 600 level admin

defaults
    mode tcp
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout check 1s
    # A connect refused by a node that is going away is retried on the other one.
    retries 3
    option redispatch
    # Health checks: /healthz on the node's metrics port answers 503 while it is
    # draining. Checked every 200 ms, DOWN after 2 failures, UP after 2 successes: a
    # drained node is out within ~0.5 s and back ~0.5 s after it answers again (the
    # 2 s default would only make the test slower).
    option httpchk GET /healthz
    http-check expect status 200
    default-server inter 200ms fastinter 100ms downinter 200ms fall 2 rise 2
",
            sock = sock.display()
        );
        for (be, port, proxy) in [
            ("smtp", smtp, "send-proxy"),
            ("submission", submission, "send-proxy-v2"),
            ("smtps", smtps, "send-proxy-v2"),
        ] {
            cfg += &format!(
                "\nfrontend fe_{be}\n    bind 127.0.0.1:{port}\n    default_backend {be}\n\nbackend {be}\n    balance roundrobin\n"
            );
            for n in nodes {
                let p = match be {
                    "smtp" => n.smtp,
                    "submission" => n.submission,
                    _ => n.smtps,
                };
                cfg += &format!(
                    "    server {} 127.0.0.1:{p} {proxy} check port {}\n",
                    n.name, n.metrics
                );
            }
        }
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, &cfg).unwrap();
        let check = Command::new("haproxy")
            .arg("-c")
            .arg("-f")
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "haproxy -c refused the configuration:\n{cfg}\n{}",
            String::from_utf8_lossy(&check.stderr)
        );
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start haproxy");
        let h = HaProxy {
            child,
            sock,
            _dir: dir,
            smtp,
            submission,
            smtps,
        };
        wait_for("haproxy's runtime socket", Duration::from_secs(20), || {
            UnixStream::connect(&h.sock).is_ok()
        });
        h
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn wait_status(&self, node: &str, what: &str, ok: impl Fn(&str) -> bool) {
        tern_tests::haproxy_wait_status(&self.sock, node, BACKENDS.len(), what, ok)
    }

    /// utime + stime of the HAProxy process, in clock ticks.
    fn cpu_ticks(&self) -> u64 {
        cpu_ticks(self.pid())
    }
}

impl Drop for HaProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the ")" of comm: state is field 3; utime 14, stime 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

// ------------------------------------------------------------------------------------
// The sink and the generator.
// ------------------------------------------------------------------------------------

struct Proc(Option<Child>);

impl Proc {
    /// SIGTERM (the sink and the generator print their report on it), then the output.
    fn stop(mut self) -> Output {
        let child = self.0.take().unwrap();
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        child.wait_with_output().unwrap()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
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

// ------------------------------------------------------------------------------------
// Clients.
// ------------------------------------------------------------------------------------

fn swaks(src: IpAddr, port: u16, to: &str, extra: &[&str]) {
    let out = Command::new("swaks")
        .args(["--server", &format!("127.0.0.1:{port}")])
        .args(["--local-interface", &src.to_string()])
        .args(["--from", "sender@example.com", "--to", to])
        .args(["--helo", "client.test", "--timeout", "20"])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "swaks from {src} to port {port} {extra:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

const AUTH: &[&str] = &[
    "--auth",
    "CRAM-MD5",
    "--auth-user",
    "demo",
    "--auth-password",
    "demo",
];

fn greeted_from(src: IpAddr, port: u16) -> Client {
    let mut c = Client::connect_from(src, at(port));
    c.expect_greeting();
    c.ehlo("client.test");
    c
}

fn cram(c: &mut Client, password: &str) -> tern_tests::Reply {
    let r = c.cmd("AUTH CRAM-MD5");
    if r.code != 334 {
        return r;
    }
    let challenge = B64.decode(r.lines[0].trim()).unwrap();
    c.cmd(&B64.encode(client::cram_md5("demo", password, &challenge)))
}

/// The delivered message (in either node's maildir) whose recipient is `to`: (node, its
/// first Received: header, unfolded).
fn delivered(nodes: &[&Node], to: &str) -> (String, String) {
    let mut found = None;
    wait_for(
        &format!("delivery to {to}"),
        Duration::from_secs(30),
        || {
            for n in nodes {
                for (_, m) in n.maildir() {
                    if m.contains(&format!("To: {to}")) || m.contains(&format!("<{to}>")) {
                        let start = m.find("Received: ").expect("a Received: header");
                        let mut hdr = String::new();
                        for (i, l) in m[start..].split("\r\n").enumerate() {
                            let l = l.strip_suffix('\n').unwrap_or(l);
                            if i > 0 && !l.starts_with([' ', '\t']) {
                                break;
                            }
                            hdr.push_str(l.trim_start());
                            hdr.push(' ');
                        }
                        found = Some((n.name.to_string(), hdr));
                        return true;
                    }
                }
            }
            false
        },
    );
    found.unwrap()
}

// ------------------------------------------------------------------------------------
// The test.
// ------------------------------------------------------------------------------------

#[test]
fn two_nodes_behind_haproxy() {
    if !require_tool("haproxy") || !require_tool("swaks") {
        return;
    }
    let t0 = Instant::now();
    let sink_port = free_port();
    let sink = Proc(Some(
        Command::new(loadgen_bin())
            .args(["sink", "--listen", &format!("127.0.0.1:{sink_port}")])
            .args(["--dedup", "--json", "-q"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the sink"),
    ));
    let mut a = Node::start("a", sink_port);
    let mut b = Node::start("b", sink_port);
    let hap = HaProxy::start(&[&a, &b]);
    hap.wait_status("a", "UP", |s| s == "UP");
    hap.wait_status("b", "UP", |s| s == "UP");

    // (a) Received: names the real client on 25, 587 + STARTTLS and 465.
    swaks(lo(11), hap.smtp, "via25@demo.test", &[]);
    swaks(
        lo(12),
        hap.submission,
        "via587@demo.test",
        &[&["--tls"], AUTH].concat(),
    );
    swaks(
        lo(13),
        hap.submission,
        "via587b@demo.test",
        &[&["--tls"], AUTH].concat(),
    );
    swaks(
        lo(14),
        hap.smtps,
        "via465@demo.test",
        &[&["--tls-on-connect"], AUTH].concat(),
    );
    let mut seen_nodes = Vec::new();
    for (to, ip) in [
        ("via25@demo.test", "127.0.0.11"),
        ("via587@demo.test", "127.0.0.12"),
        ("via587b@demo.test", "127.0.0.13"),
        ("via465@demo.test", "127.0.0.14"),
    ] {
        let (node, hdr) = delivered(&[&a, &b], to);
        assert!(
            hdr.starts_with(&format!("Received: from client.test ([{ip}])")),
            "{to} on node {node}: {hdr}"
        );
        assert!(!hdr.contains("[127.0.0.1]"), "balancer in {hdr}");
        seen_nodes.push(node);
    }
    // Round robin over two nodes: the two 587 messages went one to each.
    assert_ne!(
        seen_nodes[1], seen_nodes[2],
        "587 not balanced: {seen_nodes:?}"
    );

    // (c) trusted_networks sees the real client, through the same frontend.
    let mut c = greeted_from(lo(10), hap.smtp);
    let id = c.send_mail(
        "in@example.com",
        &["x@relay.test"],
        b"Subject: trusted\r\n\r\nhi\r\n",
    );
    assert!(!id.is_empty());
    c.quit();
    let (_, hdr) = delivered(&[&a, &b], "x@relay.test");
    assert!(hdr.contains("([127.0.0.10])"), "{hdr}");
    for _ in 0..2 {
        // Twice: once on each node.
        let mut c = greeted_from(lo(30), hap.smtp);
        c.expect("MAIL FROM:<out@example.com>", 250, "2.1.0");
        c.expect("RCPT TO:<y@relay.test>", 554, "5.7.1");
        c.quit();
    }

    // (b) The logs name the real client, and the balancer beside it.
    for n in [&a, &b] {
        // The harness copies the server's stderr on a thread of its own: wait for the
        // last of the lines this checks before reading the log.
        wait_for("the NOQUEUE line", Duration::from_secs(10), || {
            n.server
                .stderr_log()
                .contains("NOQUEUE: reject: RCPT from [127.0.0.30]")
        });
        let log = n.server.stderr_log();
        let connect = log
            .lines()
            .find(|l| l.contains("connect") && l.contains("peer=127.0.0.30:"))
            .unwrap_or_else(|| panic!("no connect line for 127.0.0.30 on {}:\n{log}", n.name));
        assert!(connect.contains("balancer=127.0.0.1:"), "{connect}");
        assert!(
            log.lines()
                .any(|l| l.contains("NOQUEUE: reject: RCPT from [127.0.0.30]")
                    && l.contains("5.7.1")),
            "no NOQUEUE line naming 127.0.0.30 on {}:\n{log}",
            n.name
        );
        assert!(
            !log.contains("from [127.0.0.1]"),
            "a reject names the balancer on {}:\n{log}",
            n.name
        );
    }

    // (d) Failed AUTHs from 127.0.0.20 block 127.0.0.20 on both nodes (limit 3 each);
    // 127.0.0.21 through the same balancer is not affected.
    let mut blocked_in_a_row = 0;
    for _ in 0..20 {
        let mut c = greeted_from(lo(20), hap.submission);
        let r = cram(&mut c, "wrong");
        if r.code == 454 {
            r.check(454, "4.7.0");
            blocked_in_a_row += 1;
            if blocked_in_a_row == 4 {
                break;
            }
        } else {
            r.check(535, "5.7.8");
            blocked_in_a_row = 0;
        }
    }
    assert_eq!(blocked_in_a_row, 4, "127.0.0.20 not blocked on both nodes");
    for _ in 0..4 {
        let mut c = greeted_from(lo(21), hap.submission);
        cram(&mut c, "demo").check(235, "2.7.0");
        c.quit();
    }
    // Even the right password from the blocked address is refused, on both nodes.
    for _ in 0..2 {
        let mut c = greeted_from(lo(20), hap.submission);
        c.cmd("AUTH CRAM-MD5").check(454, "4.7.0");
    }
    eprintln!("parts a-d: {:.1} s", t0.elapsed().as_secs_f64());

    // (e) Rolling restart under load.
    let t_e = Instant::now();
    let hap_cpu0 = hap.cpu_ticks();
    let gen = Proc(Some(
        Command::new(loadgen_bin())
            .args(["relay", "-t", &format!("127.0.0.1:{}", hap.submission)])
            .args(["--mech", "CRAM-MD5", "--to", "user{n}@example.net"])
            .args(["--cores", "1", "--no-pin", "-c", "4", "--rate", "25"])
            .args(["--msgs-per-conn", "5", "--size", "1024"])
            // Bounded: SIGTERM after the restarts, else 120 s / 3000 messages.
            .args(["-d", "120", "-n", "3000", "--timeout", "20", "--json", "-q"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tern-loadgen"),
    ));
    std::thread::sleep(Duration::from_secs(2));
    for n in [&mut a, &mut b] {
        let name = n.name;
        // Drain the node: /healthz answers 503 at once, the health check takes it out,
        // and only after shutdown.drain_delay does it refuse new connections.
        let said = n.ctl(&["drain"]);
        assert!(said.contains("draining"), "{said}");
        hap.wait_status(name, "DOWN", |s| s.starts_with("DOWN"));
        // Its last session (the generator's, at most 5 messages long) ends.
        wait_for(
            &format!("node {name}'s sessions to end"),
            Duration::from_secs(30),
            || n.status().0 == 0,
        );
        assert!(n.ctl(&["status"]).contains("DRAINING"));
        n.server.sigterm();
        let st = n.server.wait(Duration::from_secs(30));
        assert!(st.success(), "node {name} exited with {st}");
        n.server.restart();
        n.ctl(&["undrain"]);
        hap.wait_status(name, "UP", |s| s == "UP");
        eprintln!(
            "node {name} restarted at {:.1} s",
            t_e.elapsed().as_secs_f64()
        );
        // The balancer sends the generator's sessions to the restarted node again.
        wait_for(
            &format!("a generator session on the restarted node {name}"),
            Duration::from_secs(30),
            || n.status().0 > 0,
        );
    }
    std::thread::sleep(Duration::from_secs(1));
    let out = gen.stop();
    let r = report(&out, "tern-loadgen");
    let hap_cpu = hap.cpu_ticks() - hap_cpu0;
    let ok = num(&r, "ok") + num(&r, "warmup_ok");
    let failed = num(&r, "failed");
    assert_eq!(
        failed,
        0,
        "client errors during the rolling restart: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Load ran before, during and after both restarts (each restarted node was seen
    // serving a generator session); the count only says the generator did its part.
    assert!(ok >= 20, "too little load: {ok} messages");
    // Everything accepted is delivered: both queues empty, then count at the sink.
    let emptied = (0..600).any(|_| {
        let done = a.status().1 == 0 && b.status().1 == 0;
        if !done {
            std::thread::sleep(Duration::from_millis(100));
        }
        done
    });
    if !emptied {
        for n in [&a, &b] {
            let log = n.server.stderr_log();
            let tail: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("deliver") || l.contains("defer") || l.contains("recovered"))
                .collect();
            eprintln!(
                "node {}: {}\n{}",
                n.name,
                n.ctl(&["status"]),
                tail[tail.len().saturating_sub(15)..].join("\n")
            );
        }
        let out = sink.stop();
        panic!(
            "timed out waiting for both queues to empty; the sink ({}) said: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let s = report(&sink.stop(), "sink");
    let (got, unique, dups) = (
        num(&s, "messages"),
        num(&s, "unique_messages"),
        num(&s, "duplicates"),
    );
    eprintln!(
        "rolling restart: generator {ok} accepted, 0 failed; sink {got} received, {unique} \
         distinct, {dups} duplicate(s); HAProxy CPU {hap_cpu} ticks; part e {:.1} s, total {:.1} s",
        t_e.elapsed().as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(
        unique, ok,
        "every message answered 250 arrives once at least, and nothing else does"
    );
    drop(hap);
}
