//! End-to-end: the generator against its own sink and against `tern demo`.
//!
//! Every test binds ephemeral ports, runs for at most a few seconds, and kills what it
//! starts (the guards' Drop). The `tern` binary is looked up next to `tern-loadgen` in the
//! same target directory (build it with `cargo build -p tern-engine --bin tern`).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const LG: &str = env!("CARGO_BIN_EXE_tern-loadgen");

/// Runs the generator with `--json -q` and returns its report.
fn lg(args: &[&str]) -> Value {
    let t = Instant::now();
    let out = Command::new(LG)
        .args(args)
        .args(["--json", "-q"])
        .output()
        .expect("run tern-loadgen");
    assert!(
        out.status.success(),
        "tern-loadgen {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "run not bounded: {args:?}"
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "--json output does not parse ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn u(v: &Value, path: &[&str]) -> u64 {
    let mut x = v;
    for p in path {
        x = &x[*p];
    }
    x.as_u64()
        .unwrap_or_else(|| panic!("{path:?} not a count in {v:#}"))
}

fn f(v: &Value, path: &[&str]) -> f64 {
    let mut x = v;
    for p in path {
        x = &x[*p];
    }
    x.as_f64()
        .unwrap_or_else(|| panic!("{path:?} not a number in {v:#}"))
}

/// A running sink; killed on drop unless stopped.
struct Sink {
    child: Option<Child>,
    addr: String,
}

impl Sink {
    fn start(extra: &[&str]) -> Sink {
        let mut child = Command::new(LG)
            .args(["sink", "--listen", "127.0.0.1:0", "--json", "-q"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start sink");
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        let addr = loop {
            line.clear();
            if err.read_line(&mut line).unwrap() == 0 {
                let _ = child.kill();
                panic!("sink exited before listening");
            }
            if let Some(a) = line.trim().strip_prefix("listening: ") {
                break a.to_string();
            }
        };
        std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
        Sink {
            child: Some(child),
            addr,
        }
    }

    /// SIGTERM, then the sink's JSON summary.
    fn stop(mut self) -> Value {
        let mut child = self.child.take().unwrap();
        // SAFETY: signalling our own child process by its pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let mut out = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        assert!(child.wait().unwrap().success());
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("sink json ({e}): {out}"))
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn tern_bin() -> PathBuf {
    let dir = Path::new(LG).parent().unwrap();
    let bin = dir.join("tern");
    assert!(
        bin.exists(),
        "{} missing: cargo build -p tern-engine --bin tern (same profile and target dir)",
        bin.display()
    );
    bin
}

/// `tern demo` on ephemeral loopback ports, one shard.
struct Demo {
    child: Child,
    dir: tempfile::TempDir,
    smtp: String,
    submission: String,
    smtps: String,
}

impl Demo {
    fn start() -> Demo {
        Demo::start_with(&[])
    }

    /// [`Demo::start`] with extra `--set key=value` settings.
    fn start_with(sets: &[&str]) -> Demo {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(tern_bin())
            .arg("demo")
            .arg("--dir")
            .arg(dir.path())
            .args([
                "--set",
                "listeners.smtp=[\"127.0.0.1:0\"]",
                "--set",
                "listeners.submission=[\"127.0.0.1:0\"]",
                "--set",
                "listeners.smtps=[\"127.0.0.1:0\"]",
                "--set",
                "shards=1",
            ])
            .args(sets.iter().flat_map(|s| ["--set", s]))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tern demo");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let (mut smtp, mut submission, mut smtps) = (None, None, None);
        let mut line = String::new();
        loop {
            line.clear();
            if out.read_line(&mut line).unwrap() == 0 {
                let _ = child.kill();
                panic!("tern demo exited before ready");
            }
            let l = line.trim();
            if let Some(rest) = l.strip_prefix("listening: ") {
                let (role, addr) = rest.split_once(' ').unwrap();
                let a = Some(addr.to_string());
                match role {
                    "smtp" => smtp = a,
                    "submission" => submission = a,
                    "smtps" => smtps = a,
                    _ => {}
                }
            }
            if l.starts_with("ready:") {
                break;
            }
        }
        std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
        Demo {
            child,
            dir,
            smtp: smtp.unwrap(),
            submission: submission.unwrap(),
            smtps: smtps.unwrap(),
        }
    }

    fn cert(&self) -> String {
        self.dir.path().join("cert.pem").display().to_string()
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---- against the sink ----

#[test]
fn relay_counts_exact_sent_accepted_received() {
    let sink = Sink::start(&[]);
    let r = lg(&[
        "relay",
        "-t",
        &sink.addr,
        "--cores",
        "2",
        "-c",
        "8",
        "-n",
        "300",
        "-d",
        "3",
        "--rcpts",
        "2",
        "--size",
        "2000",
        "--pipeline",
        "--msgs-per-conn",
        "7",
    ]);
    let s = sink.stop();
    assert_eq!(u(&r, &["attempted"]), 300, "{r:#}");
    assert_eq!(u(&r, &["ok"]), 300, "{r:#}");
    assert_eq!(u(&r, &["failed"]), 0, "{r:#}");
    assert_eq!(u(&r, &["latency_ms", "accept", "count"]), 300);
    assert_eq!(u(&s, &["messages"]), 300, "{s:#}");
    assert_eq!(u(&s, &["recipients"]), 600, "{s:#}");
    assert_eq!(
        u(&s, &["bytes"]),
        u(&r, &["bytes"]),
        "sink bytes = sent bytes"
    );
    assert_eq!(u(&s, &["without_sent_header"]), 0);
    assert_eq!(u(&s, &["relay_latency_ms", "count"]), 300);
    // 300 messages, at most 7 per connection, 8 workers each ending with a partial one.
    let conns = u(&s, &["connections"]);
    assert_eq!(conns, u(&r, &["connections"]));
    assert!((43..=43 + 8).contains(&conns), "{conns} connections");
}

#[test]
fn relay_lockstep_bdat_over_starttls() {
    let sink = Sink::start(&["--starttls"]);
    let r = lg(&[
        "relay",
        "-t",
        &sink.addr,
        "--cores",
        "1",
        "-c",
        "4",
        "-n",
        "60",
        "-d",
        "3",
        "--bdat",
        "--starttls",
        "--insecure",
        "--size",
        "10000",
    ]);
    let s = sink.stop();
    assert_eq!(u(&r, &["ok"]), 60, "{r:#}");
    assert_eq!(u(&s, &["messages"]), 60, "{s:#}");
    assert_eq!(u(&s, &["tls_connections"]), 4, "{s:#}");
    assert_eq!(
        u(&s, &["bytes"]),
        60 * 10000,
        "messages are exactly --size bytes"
    );
    assert_eq!(
        u(&r, &["tls_full_handshakes"]) + u(&r, &["tls_resumed_handshakes"]),
        4
    );
}

#[test]
fn sink_delay_shows_in_acceptance_latency() {
    let sink = Sink::start(&["--delay", "20"]);
    let r = lg(&[
        "relay", "-t", &sink.addr, "--cores", "1", "-c", "4", "-n", "40", "-d", "3",
    ]);
    sink.stop();
    assert_eq!(u(&r, &["ok"]), 40);
    let p50 = f(&r, &["latency_ms", "accept", "p50"]);
    assert!(p50 >= 20.0, "p50 {p50} ms < --delay 20");
    assert!(p50 < 200.0, "p50 {p50} ms");
}

#[test]
fn permfail_counts_every_error_as_5xx() {
    let sink = Sink::start(&["--permfail", "1.0"]);
    let r = lg(&[
        "relay", "-t", &sink.addr, "--cores", "2", "-c", "4", "-n", "40", "-d", "3",
    ]);
    let s = sink.stop();
    assert_eq!(u(&r, &["ok"]), 0, "{r:#}");
    assert_eq!(u(&r, &["failed"]), 40);
    assert_eq!(f(&r, &["throughput"]), 0.0, "errors are not throughput");
    assert_eq!(u(&r, &["errors", "total"]), 40);
    assert_eq!(u(&r, &["errors", "by_kind", "5xx"]), 40, "{r:#}");
    assert_eq!(u(&r, &["errors", "by_code", "554"]), 40);
    assert_eq!(u(&s, &["messages"]), 0);
    assert_eq!(u(&s, &["permfailed"]), 40);
}

#[test]
fn tempfail_fraction_counted_as_4xx() {
    let sink = Sink::start(&["--tempfail", "0.5"]);
    let r = lg(&[
        "relay", "-t", &sink.addr, "--cores", "1", "-c", "4", "-n", "200", "-d", "3",
    ]);
    let s = sink.stop();
    let (ok, failed) = (u(&r, &["ok"]), u(&r, &["failed"]));
    assert_eq!(ok + failed, 200);
    assert!((40..=160).contains(&failed), "{failed} of 200 at 0.5");
    assert_eq!(u(&r, &["errors", "by_kind", "4xx"]), failed);
    assert_eq!(u(&s, &["messages"]), ok);
    assert_eq!(u(&s, &["tempfailed"]), failed);
}

/// A sink that needs 40 ms per message on one connection serves < 25/s; offered 100/s,
/// the open loop must show latency growing from the intended start (seconds), while the
/// service time stays ~40 ms: the coordinated-omission correction.
#[test]
fn open_loop_measures_from_intended_time() {
    let sink = Sink::start(&["--delay", "40"]);
    let r = lg(&[
        "relay",
        "-t",
        &sink.addr,
        "--cores",
        "1",
        "-c",
        "1",
        "--rate",
        "100",
        "-d",
        "2",
        "--msgs-per-conn",
        "1000",
    ]);
    sink.stop();
    assert_eq!(r["mode"], "open");
    assert_eq!(r["latency_basis"], "intended");
    let service = f(&r, &["latency_ms", "accept_service", "p50"]);
    let intended = f(&r, &["latency_ms", "accept", "p50"]);
    let p99 = f(&r, &["latency_ms", "accept", "p99"]);
    assert!((40.0..100.0).contains(&service), "service p50 {service}");
    assert!(
        intended > 5.0 * service,
        "intended p50 {intended} vs service {service}"
    );
    assert!(p99 > 700.0, "p99 {p99}: the backlog grows to ~1 s over 2 s");
    assert!(u(&r, &["unstarted"]) > 50, "{r:#}");
}

/// When the target keeps up, the open loop offers exactly the rate.
#[test]
fn open_loop_holds_the_rate() {
    let sink = Sink::start(&[]);
    let r = lg(&[
        "relay", "-t", &sink.addr, "--cores", "2", "-c", "8", "--rate", "200", "-d", "2",
    ]);
    let s = sink.stop();
    let n = u(&r, &["ok"]);
    assert!((390..=401).contains(&n), "{n} messages at 200/s for 2 s");
    assert_eq!(u(&s, &["messages"]), n);
    assert_eq!(u(&r, &["unstarted"]), 0);
    assert!(f(&r, &["latency_ms", "accept", "p50"]) < 20.0);
}

#[test]
fn warmup_is_not_measured_and_duration_bounds_the_run() {
    let sink = Sink::start(&[]);
    let t = Instant::now();
    let r = lg(&[
        "connect", "-t", &sink.addr, "--cores", "1", "-c", "2", "--warmup", "0.5", "-d", "1",
    ]);
    assert!(t.elapsed() < Duration::from_secs(3));
    let s = sink.stop();
    assert!(u(&r, &["warmup_ok"]) > 0);
    assert!(u(&r, &["ok"]) > 0);
    assert_eq!(
        u(&s, &["connections"]),
        u(&r, &["ok"]) + u(&r, &["warmup_ok"])
    );
    let e = f(&r, &["elapsed_s"]);
    assert!((0.9..1.5).contains(&e), "elapsed {e}");
}

#[test]
fn hlog_and_plot_are_written() {
    let sink = Sink::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let hlog = dir.path().join("run.hlog");
    let svg = dir.path().join("run.svg");
    lg(&[
        "relay",
        "-t",
        &sink.addr,
        "--cores",
        "1",
        "-d",
        "1.2",
        "--hlog",
        hlog.to_str().unwrap(),
        "--plot",
        svg.to_str().unwrap(),
    ]);
    sink.stop();
    let h = std::fs::read_to_string(&hlog).unwrap();
    assert!(h.contains("#[StartTime:"), "{h}");
    assert!(
        h.lines().filter(|l| l.starts_with("Tag=accept,")).count() >= 1,
        "{h}"
    );
    let s = std::fs::read_to_string(&svg).unwrap();
    assert!(s.starts_with("<svg") && s.contains("<polyline") && s.trim_end().ends_with("</svg>"));
}

#[test]
fn refuses_remote_targets() {
    let out = Command::new(LG)
        .args(["connect", "-t", "192.0.2.1:25", "-d", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--allow-remote"));
}

#[test]
fn connection_errors_are_counted() {
    // A port nobody listens on: bind, read the port, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let r = lg(&[
        "connect",
        "-t",
        &format!("127.0.0.1:{port}"),
        "--cores",
        "1",
        "-c",
        "2",
        "-d",
        "0.5",
    ]);
    assert_eq!(u(&r, &["ok"]), 0);
    assert!(u(&r, &["errors", "by_kind", "connect"]) > 0, "{r:#}");
    assert_eq!(u(&r, &["errors", "total"]), u(&r, &["failed"]));
}

// ---- against tern demo ----

#[test]
fn tern_demo_auth_every_mechanism() {
    let d = Demo::start();
    let cert = d.cert();
    let cases: Vec<Vec<&str>> = vec![
        vec!["-t", &d.submission, "--mech", "CRAM-MD5"],
        vec!["-t", &d.submission, "--mech", "DIGEST-MD5"],
        vec!["-t", &d.submission, "--mech", "SCRAM-SHA-256"],
        vec![
            "-t",
            &d.submission,
            "--mech",
            "PLAIN",
            "--starttls",
            "--cacert",
            &cert,
        ],
        vec!["-t", &d.smtps, "--mech", "LOGIN", "--tls", "--insecure"],
        vec![
            "-t",
            &d.smtps,
            "--mech",
            "PLAIN",
            "--tls",
            "--insecure",
            "--no-resume",
        ],
    ];
    for case in cases {
        let mut args = vec!["auth", "--cores", "1", "-c", "4", "-n", "40", "-d", "3"];
        args.extend(case.iter().copied());
        let r = lg(&args);
        assert_eq!(u(&r, &["ok"]), 40, "{case:?}: {r:#}");
        assert_eq!(u(&r, &["failed"]), 0, "{case:?}");
        assert_eq!(u(&r, &["latency_ms", "auth", "count"]), 40);
        assert_eq!(u(&r, &["latency_ms", "handshake", "count"]), 40);
        if case.contains(&"--no-resume") {
            assert_eq!(u(&r, &["tls_full_handshakes"]), 40, "{r:#}");
        } else if case.contains(&"--tls") || case.contains(&"--starttls") {
            // One full handshake per worker, then each resumes its own session.
            assert_eq!(u(&r, &["tls_full_handshakes"]), 4, "{r:#}");
            assert_eq!(u(&r, &["tls_resumed_handshakes"]), 36, "{r:#}");
        }
    }
}

#[test]
fn tern_demo_wrong_password_counted_as_535() {
    let d = Demo::start();
    let r = lg(&[
        "auth",
        "-t",
        &d.submission,
        "--cores",
        "1",
        "-c",
        "2",
        "-n",
        "4",
        "-d",
        "3",
        "--mech",
        "CRAM-MD5",
        "--password",
        "wrong",
    ]);
    assert_eq!(u(&r, &["ok"]), 0);
    assert_eq!(u(&r, &["errors", "by_code", "535"]), 4, "{r:#}");
    assert_eq!(u(&r, &["errors", "by_kind", "5xx"]), 4);
}

#[test]
fn tern_demo_relay_and_connect() {
    let d = Demo::start();
    let r = lg(&[
        "relay",
        "-t",
        &d.smtp,
        "--cores",
        "1",
        "-c",
        "4",
        "-n",
        "100",
        "-d",
        "3",
        "--pipeline",
    ]);
    assert_eq!(u(&r, &["ok"]), 100, "{r:#}");
    // Authenticated submission to a remote domain.
    let r = lg(&[
        "relay",
        "-t",
        &d.submission,
        "--cores",
        "1",
        "-c",
        "2",
        "-n",
        "20",
        "-d",
        "3",
        "--mech",
        "CRAM-MD5",
        "--to",
        "friend{n}@example.net",
        "--rcpts",
        "2",
    ]);
    assert_eq!(u(&r, &["ok"]), 20, "{r:#}");
    let r = lg(&[
        "connect",
        "-t",
        &d.smtps,
        "--tls",
        "--insecure",
        "--cores",
        "1",
        "-c",
        "2",
        "-n",
        "30",
        "-d",
        "3",
    ]);
    assert_eq!(u(&r, &["ok"]), 30, "{r:#}");
}

#[test]
fn proxy_v1_and_v2_headers_name_the_claimed_client() {
    // tern takes a PROXY header only from its balancers: here the generator itself.
    let d = Demo::start_with(&[r#"listeners.proxy_from=["127.0.0.1/32"]"#]);
    // Without the header the connection is closed before the banner: every op fails.
    let r = lg(&[
        "connect",
        "-t",
        &d.smtp,
        "--cores",
        "1",
        "-c",
        "1",
        "-n",
        "2",
        "-d",
        "3",
        "--timeout",
        "2",
    ]);
    assert_eq!(u(&r, &["ok"]), 0, "{r:#}");
    assert_eq!(u(&r, &["failed"]), 2, "{r:#}");
    for (flag, client) in [
        ("--proxy-v1", "198.51.100.7"),
        ("--proxy-v2", "203.0.113.9"),
    ] {
        // AUTH on 587 and implicit TLS on 465 (the header comes before the ClientHello).
        let r = lg(&[
            "auth",
            "-t",
            &d.submission,
            "--cores",
            "1",
            "-c",
            "2",
            "-n",
            "10",
            "-d",
            "3",
            "--mech",
            "CRAM-MD5",
            flag,
            client,
        ]);
        assert_eq!(u(&r, &["ok"]), 10, "{flag}: {r:#}");
        let r = lg(&[
            "connect",
            "-t",
            &d.smtps,
            "--tls",
            "--insecure",
            "--cores",
            "1",
            "-c",
            "1",
            "-n",
            "3",
            "-d",
            "3",
            flag,
            client,
        ]);
        assert_eq!(u(&r, &["ok"]), 3, "{flag} 465: {r:#}");
        // Mail for a local domain lands in the demo's maildir; its Received: header
        // names the claimed client, not the generator's 127.0.0.1.
        let r = lg(&[
            "relay",
            "-t",
            &d.smtp,
            "--cores",
            "1",
            "-c",
            "1",
            "-n",
            "1",
            "-d",
            "3",
            "--msgs-per-conn",
            "1",
            flag,
            client,
            "--to",
            "proxied@demo.test",
        ]);
        assert_eq!(u(&r, &["ok"]), 1, "{flag} relay: {r:#}");
        let new = d.dir.path().join("maildir/new");
        let deadline = Instant::now() + Duration::from_secs(10);
        let needle = format!("[{client}]");
        loop {
            let found = std::fs::read_dir(&new)
                .into_iter()
                .flatten()
                .flatten()
                .any(|e| {
                    std::fs::read_to_string(e.path()).is_ok_and(|m| {
                        m.lines()
                            .any(|l| l.starts_with("Received: ") && l.contains(&needle))
                    })
                });
            if found {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no delivered message with Received: from ... {needle}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn sink_dedup_counts_repeated_message_ids() {
    // The same message (one Message-ID) sent three times over one session, plus one other.
    let sink = Sink::start(&["--dedup"]);
    let mut s = std::net::TcpStream::connect(&sink.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut script = String::from("EHLO t\r\n");
    for id in ["<a@x>", "<a@x>", "<b@x>", "<a@x>"] {
        script.push_str(&format!(
            "MAIL FROM:<f@x>\r\nRCPT TO:<t@x>\r\nDATA\r\nMessage-ID: {id}\r\n\r\nhi\r\n.\r\n"
        ));
    }
    script.push_str("QUIT\r\n");
    use std::io::Write;
    s.write_all(script.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert!(out.contains("221"), "{out}");
    let r = sink.stop();
    assert_eq!(u(&r, &["messages"]), 4, "{r:#}");
    assert_eq!(u(&r, &["unique_messages"]), 2, "{r:#}");
    assert_eq!(u(&r, &["duplicates"]), 2, "{r:#}");
}

/// Runs `tern-loadgen merge ARGS...` and returns its (stdout, stderr, success).
fn lg_merge(args: &[&str]) -> (String, String, bool) {
    let out = Command::new(LG)
        .arg("merge")
        .args(args)
        .output()
        .expect("run tern-loadgen merge");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.success(),
    )
}

/// Decodes one of the report's `histograms` (V2 deflate, base64) on its own, with the
/// hdrhistogram crate, independently of the generator's code.
fn hist_of(report: &Value, metric: &str) -> hdrhistogram::Histogram<u64> {
    use base64::Engine as _;
    let b64 = report["histograms"][metric]
        .as_str()
        .unwrap_or_else(|| panic!("no histograms.{metric} in {report:#}"));
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    hdrhistogram::serialization::Deserializer::new()
        .deserialize(&mut &bytes[..])
        .unwrap()
}

#[test]
fn merge_two_simultaneous_runs_sums_counts_and_merges_histograms_exactly() {
    let sink = Sink::start(&["--delay", "1"]);
    let dir = tempfile::tempdir().unwrap();
    // Two generators at the same time against one target, as from two machines.
    let run = |n: &str, c: &str| {
        let addr = sink.addr.clone();
        let (n, c) = (n.to_string(), c.to_string());
        std::thread::spawn(move || {
            lg(&[
                "relay", "-t", &addr, "--cores", "1", "-c", &c, "-n", &n, "-d", "4",
            ])
        })
    };
    let (ta, tb) = (run("250", "4"), run("150", "2"));
    let (a, b) = (ta.join().unwrap(), tb.join().unwrap());
    let s = sink.stop();
    let pa = dir.path().join("a.json");
    let pb = dir.path().join("b.json");
    std::fs::write(&pa, a.to_string()).unwrap();
    std::fs::write(&pb, b.to_string()).unwrap();
    let (out, err, ok) = lg_merge(&[pa.to_str().unwrap(), pb.to_str().unwrap(), "--json"]);
    assert!(ok, "merge failed: {err}");
    let m: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));

    // Counts add up exactly, and match what the target received.
    assert_eq!(u(&a, &["ok"]), 250, "{a:#}");
    assert_eq!(u(&b, &["ok"]), 150, "{b:#}");
    for k in ["attempted", "ok", "failed", "connections", "bytes"] {
        assert_eq!(u(&m, &[k]), u(&a, &[k]) + u(&b, &[k]), "{k}");
    }
    assert_eq!(u(&m, &["ok"]), 400);
    assert_eq!(u(&m, &["runs"]), 2);
    assert_eq!(u(&m, &["cores"]), 2);
    assert_eq!(u(&m, &["concurrency"]), 6);
    assert_eq!(u(&s, &["messages"]), 400, "{s:#}");
    assert_eq!(u(&m, &["latency_ms", "accept", "count"]), 400);

    // Percentiles: those of one histogram of every sample, built here independently.
    let mut all = hist_of(&a, "accept");
    all.add(hist_of(&b, "accept")).unwrap();
    assert_eq!(all.len(), 400);
    let ms = |q: f64| all.value_at_quantile(q) as f64 / 1000.0;
    assert_eq!(f(&m, &["latency_ms", "accept", "p50"]), ms(0.50), "{m:#}");
    assert_eq!(f(&m, &["latency_ms", "accept", "p99"]), ms(0.99), "{m:#}");
    assert_eq!(
        f(&m, &["latency_ms", "accept", "max"]),
        all.max() as f64 / 1000.0
    );
    assert_eq!(
        hist_of(&m, "accept"),
        all,
        "the merged report carries the merged histogram"
    );

    // Rate: ok over the union window, which covers both runs' windows.
    let start = |r: &Value| f(r, &["started_unix_s"]);
    let end = |r: &Value| start(r) + f(r, &["elapsed_s"]);
    let union = end(&a).max(end(&b)) - start(&a).min(start(&b));
    let e = f(&m, &["elapsed_s"]);
    assert!((e - union).abs() < 1e-6, "elapsed {e} union {union}");
    let t = f(&m, &["throughput"]);
    assert!((t - 400.0 / union).abs() < 1e-6, "throughput {t}");

    // The human summary of the merged report.
    let (out, err, ok) = lg_merge(&[pa.to_str().unwrap(), pb.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(
        out.contains("in 2 merged runs") && out.contains("(400 ok, 0 failed of 400"),
        "{out}"
    );
}

#[test]
fn merge_refuses_different_scenarios() {
    let sink = Sink::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let relay = lg(&[
        "relay", "-t", &sink.addr, "--cores", "1", "-n", "5", "-d", "2",
    ]);
    let connect = lg(&[
        "connect", "-t", &sink.addr, "--cores", "1", "-n", "5", "-d", "2",
    ]);
    sink.stop();
    let pa = dir.path().join("relay.json");
    let pb = dir.path().join("connect.json");
    std::fs::write(&pa, relay.to_string()).unwrap();
    std::fs::write(&pb, connect.to_string()).unwrap();
    let (_, err, ok) = lg_merge(&[pa.to_str().unwrap(), pb.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        err.contains("cannot merge runs of different kinds") && err.contains("scenario"),
        "{err}"
    );
}
