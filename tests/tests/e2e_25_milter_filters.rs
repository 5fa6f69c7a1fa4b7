//! 25: tern's milter client against real filters from Debian's packages, each started by
//! the test on ephemeral ports with its own temporary configuration, and stopped (its
//! process group) when the test ends.
//!
//! - rspamd 3.x in milter mode (its proxy worker with `milter = yes`, scanning itself;
//!   no Redis: the Bayes and fuzzy modules just stay off): a GTUBE message is refused
//!   with rspamd's own reply, a clean one is accepted with rspamd's headers added
//!   (`X-Spamd-Result`, and `X-Rspamd-Queue-Id` carrying the queue id tern told it in
//!   macro `i`).
//! - OpenDKIM 2.11 twice: a signer (mode s) on tern A, and a verifier (mode v, public
//!   keys from a `TestPublicKeys` file: no DNS) on tern B. Mail goes client → A (signed
//!   by OpenDKIM through the milter, then by tern's own `[dkim]` key) → B, whose
//!   verifier must add `Authentication-Results: ... dkim=pass` for both signatures.
//! - Connection reuse (`SMFIC_QUIT_NC`): rspamd's connection carries every session on
//!   the shard; OpenDKIM's is not reused (libmilter would ignore QUIT_NC where it is left).
//! - clamav-milter 1.x with clamd, both on a one-line signature database the test writes
//!   (the EICAR string as an extended signature: no freshclam, no network): EICAR is
//!   refused with clamav-milter's 550, a clean message is accepted with its
//!   `X-Virus-Scanned`/`X-Virus-Status` headers.

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tern_tests::{require_tool, wait_for, Server};

/// A filter process in its own process group, stopped (group-wide, by its id) on drop.
struct Filter {
    child: Child,
    name: &'static str,
}

impl Filter {
    fn spawn(name: &'static str, cmd: &mut Command) -> Filter {
        let child = cmd
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Filter { child, name }
    }

    /// Waits until `port` accepts connections (rspamd compiles its rules first: up to a
    /// minute on a cold machine).
    fn wait_listening(&mut self, port: u16, timeout: Duration) {
        let start = Instant::now();
        loop {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                panic!("{} exited ({status}) before listening: {err}", self.name);
            }
            assert!(
                start.elapsed() < timeout,
                "{} not listening on {port} after {timeout:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Filter {
    fn drop(&mut self) {
        let pgid = self.child.id() as i32;
        unsafe { libc::kill(-pgid, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.child.try_wait() {
                // Workers of the group may outlive the main process for a moment.
                unsafe { libc::kill(-pgid, libc::SIGKILL) };
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Files in `dir/maildir/new`, waiting until there are `n`.
fn maildir(dir: &Path, n: usize) -> Vec<String> {
    let new = dir.join("maildir/new");
    wait_for("delivery into the maildir", Duration::from_secs(30), || {
        std::fs::read_dir(&new).map(|d| d.count()).unwrap_or(0) >= n
    });
    let mut v: Vec<PathBuf> = std::fs::read_dir(&new)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    v.sort();
    v.iter()
        .map(|p| String::from_utf8_lossy(&std::fs::read(p).unwrap()).into_owned())
        .collect()
}

fn send(smtp: SocketAddr, from: &str, to: &str, body: &str) -> tern_tests::Reply {
    let mut c = tern_tests::Client::connect(smtp);
    c.expect_greeting();
    c.ehlo("client.example.org");
    c.expect(&format!("MAIL FROM:<{from}>"), 250, "2.1.0");
    c.expect(&format!("RCPT TO:<{to}>"), 250, "2.1.5");
    c.expect("DATA", 354, "");
    let mut wire = tern_tests::dot_stuff(body.as_bytes());
    wire.extend_from_slice(b".\r\n");
    c.send(&wire);
    c.read_reply()
}

/// `tern_milter_connections_total{shard="total",filter=NAME,how=HOW}` from /metrics.
fn conns(metrics: SocketAddr, name: &str, how: &str) -> u64 {
    use std::io::Write;
    let mut s = TcpStream::connect(metrics).expect("connect to the metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw);
    let key = format!(
        "tern_milter_connections_total{{shard=\"total\",filter=\"{name}\",how=\"{how}\"}} "
    );
    text.lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// Waits until the server has ended `n` sessions (their filter connections are back in
/// the shard's pool before the next session starts).
fn ended(s: &Server, n: usize) {
    wait_for("the session's end", Duration::from_secs(10), || {
        s.stderr_log().matches(" disconnect").count() >= n
    });
}

const GTUBE: &str = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X";

#[test]
fn rspamd_rejects_gtube_and_tags_clean_mail() {
    if !require_tool("rspamd") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let conf = tmp.path().join("conf");
    let local = conf.join("local.d");
    for d in ["db", "run", "log"] {
        std::fs::create_dir_all(conf.join(d)).unwrap();
    }
    std::fs::create_dir_all(&local).unwrap();
    let (proxy, normal, controller) = (free_port(), free_port(), free_port());
    std::fs::write(
        local.join("worker-proxy.inc"),
        format!(
            "bind_socket = \"127.0.0.1:{proxy}\";\nmilter = yes;\ntimeout = 120s;\n\
             upstream \"local\" {{\n  default = yes;\n  self_scan = yes;\n}}\n"
        ),
    )
    .unwrap();
    std::fs::write(
        local.join("worker-normal.inc"),
        format!("bind_socket = \"127.0.0.1:{normal}\";\n"),
    )
    .unwrap();
    std::fs::write(
        local.join("worker-controller.inc"),
        format!("bind_socket = \"127.0.0.1:{controller}\";\n"),
    )
    .unwrap();
    // Headers on every message, local clients included (the test's client is local).
    std::fs::write(
        local.join("milter_headers.conf"),
        "use = [\"x-spamd-result\", \"x-rspamd-queue-id\", \"x-spam-status\"];\n\
         extended_spam_headers = true;\nskip_local = false;\nskip_authenticated = false;\n",
    )
    .unwrap();
    std::fs::write(
        local.join("logging.inc"),
        "type = \"console\";\nlevel = \"error\";\n",
    )
    .unwrap();
    let var = |k: &str, v: &Path| format!("{k}={}", v.display());
    let mut rspamd = Filter::spawn(
        "rspamd",
        Command::new("rspamd").args([
            "-f",
            "-i",
            "-c",
            "/etc/rspamd/rspamd.conf",
            "--var",
            &var("LOCAL_CONFDIR", &conf),
            "--var",
            &var("DBDIR", &conf.join("db")),
            "--var",
            &var("RUNDIR", &conf.join("run")),
            "--var",
            &var("LOGDIR", &conf.join("log")),
        ]),
    );
    rspamd.wait_listening(proxy, Duration::from_secs(180));

    let dir = tmp.path().join("tern");
    std::fs::create_dir(&dir).unwrap();
    let route = format!(
        r#"queue.routes={{"*"="maildir:{}/maildir"}}"#,
        dir.display()
    );
    let filters = format!(
        r#"milter.filters=[{{name="rspamd",socket="inet:127.0.0.1:{proxy}",timeouts="R:60s;E:60s"}}]"#
    );
    // One shard: every session meets the connection the previous one left, if any.
    let s = Server::start(
        Some(&dir),
        &[
            &route,
            r#"relay.trusted_networks=["127.0.0.0/8"]"#,
            &filters,
            "shards=1",
        ],
    );
    let spam = format!(
        "From: a@example.org\r\nTo: b@example.net\r\nSubject: gtube\r\nMessage-ID: <1@example.org>\r\n\r\n{GTUBE}\r\n"
    );
    send(s.smtp, "a@example.org", "b@example.net", &spam).check(554, "5.7.1 Gtube pattern");
    ended(&s, 1);
    let clean = "From: a@example.org\r\nTo: b@example.net\r\nSubject: hello\r\nMessage-ID: <2@example.org>\r\nDate: Thu, 3 Dec 2026 10:00:00 +0000\r\n\r\nJust a normal note.\r\n";
    let r = send(s.smtp, "a@example.org", "b@example.net", clean);
    r.check(250, "2.0.0");
    let id = r.queued_id();
    let got = maildir(&dir, 1);
    assert_eq!(got.len(), 1, "the GTUBE message was delivered too");
    let m = &got[0];
    assert!(m.contains("X-Spamd-Result: default: False"), "{m}");
    assert!(m.contains(&format!("X-Rspamd-Queue-Id: {id}")), "{m}");
    assert!(m.ends_with("\nJust a normal note.\n"), "{m}");

    // More sessions: each message scanned on its own (rspamd's headers carry each one's
    // own queue id), whether the connection was reused or not.
    ended(&s, 2);
    let mut ids = vec![id];
    for n in 3..=4 {
        let r = send(s.smtp, "a@example.org", "b@example.net", clean);
        r.check(250, "2.0.0");
        ids.push(r.queued_id());
        ended(&s, n);
    }
    let got = maildir(&dir, 3);
    for id in &ids {
        assert_eq!(
            got.iter()
                .filter(|m| m.contains(&format!("X-Rspamd-Queue-Id: {id}")))
                .count(),
            1,
            "{got:?}"
        );
    }
    // rspamd negotiates SMFIP_NR_UNKN: every session after the first (the GTUBE reject,
    // the accepts) reuses the one connection, walked to QUIT_NC through SMFIC_UNKNOWN.
    let metrics = s.metrics.expect("metrics endpoint");
    assert_eq!(conns(metrics, "rspamd", "opened"), 1);
    assert_eq!(conns(metrics, "rspamd", "reused"), 3);
}

/// `tern dkim keygen` (RSA): (key file, "selector._domainkey.example.org", TXT value).
fn keygen(dir: &Path, selector: &str) -> (PathBuf, String, String) {
    tern_tests::dkim_keygen(dir, selector, "rsa")
}

fn opendkim(dir: &Path, name: &'static str, port: u16, lines: &str) -> Filter {
    let conf = dir.join(format!("{name}.conf"));
    std::fs::write(
        &conf,
        format!(
            "Syslog no\nSocket inet:{port}@127.0.0.1\nPidFile {}/{name}.pid\n\
             Canonicalization relaxed/relaxed\nRequireSafeKeys no\n{lines}",
            dir.display()
        ),
    )
    .unwrap();
    let mut f = Filter::spawn(name, Command::new("opendkim").args(["-f", "-x"]).arg(&conf));
    f.wait_listening(port, Duration::from_secs(30));
    f
}

#[test]
fn opendkim_signs_and_a_second_opendkim_verifies_both_signatures() {
    if !require_tool("opendkim") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let keys = tmp.path().join("keys");
    std::fs::create_dir(&keys).unwrap();
    let (od_key, od_name, od_txt) = keygen(&keys, "od1");
    let (tern_key, tern_name, tern_txt) = keygen(&keys, "tern1");
    let public = tmp.path().join("public-keys");
    std::fs::write(
        &public,
        format!("{od_name} {od_txt}\n{tern_name} {tern_txt}\n"),
    )
    .unwrap();
    let (sign_port, verify_port) = (free_port(), free_port());
    let _signer = opendkim(
        tmp.path(),
        "signer",
        sign_port,
        &format!(
            "Mode s\nDomain example.org\nSelector od1\nKeyFile {}\n",
            od_key.display()
        ),
    );
    // Mail from 127.0.0.1 would be "internal" (signed, not verified): no internal hosts.
    let _verifier = opendkim(
        tmp.path(),
        "verifier",
        verify_port,
        &format!(
            "Mode v\nInternalHosts 192.0.2.1\nAuthservID verifier.test\nAlwaysAddARHeader yes\nTestPublicKeys {}\n",
            public.display()
        ),
    );

    // B: verifies, delivers into its maildir.
    let b_dir = tmp.path().join("b");
    std::fs::create_dir(&b_dir).unwrap();
    let b_route = format!(
        r#"queue.routes={{"*"="maildir:{}/maildir"}}"#,
        b_dir.display()
    );
    let b_milter = format!(r#"milter.filters=[{{socket="inet:127.0.0.1:{verify_port}"}}]"#);
    let b = Server::start(
        Some(&b_dir),
        &[
            &b_route,
            r#"relay.trusted_networks=["127.0.0.0/8"]"#,
            &b_milter,
        ],
    );
    // A: OpenDKIM signs through the milter, tern signs with its own key, relays to B.
    let a_route = format!(
        r#"queue.routes={{"*"="smtp:[127.0.0.1]:{}"}}"#,
        b.smtp.port()
    );
    let a_milter = format!(r#"milter.filters=[{{socket="inet:127.0.0.1:{sign_port}"}}]"#);
    let a_dkim = format!(
        r#"dkim.keys=[{{domain="example.org",selector="tern1",algorithm="rsa",key="{}"}}]"#,
        tern_key.display()
    );
    let a = Server::with(&[
        &a_route,
        r#"relay.trusted_networks=["127.0.0.0/8"]"#,
        &a_milter,
        &a_dkim,
        "shards=1",
    ]);
    let msg = "From: Sender <sender@example.org>\r\nTo: rcpt@example.net\r\nSubject: signed twice\r\nDate: Thu, 3 Dec 2026 10:00:00 +0000\r\nMessage-ID: <dkim@example.org>\r\n\r\nHello,\r\n  with   some  spacing\t\r\n\r\n";
    send(a.smtp, "sender@example.org", "rcpt@example.net", msg).check(250, "2.0.0");
    ended(&a, 1);
    send(a.smtp, "sender@example.org", "rcpt@example.net", msg).check(250, "2.0.0");
    ended(&a, 2);
    // OpenDKIM (libmilter, no unknown-command callback) answers end-of-message with
    // "accept": libmilter is then where it ignores QUIT_NC, so each session opens its own
    // connection, and both messages are signed.
    let metrics = a.metrics.expect("metrics endpoint");
    let name = format!("inet:127.0.0.1:{sign_port}");
    assert_eq!(conns(metrics, &name, "opened"), 2);
    assert_eq!(conns(metrics, &name, "reused"), 0);
    let got = maildir(&b_dir, 2);
    assert!(
        got[1].contains("s=od1"),
        "no OpenDKIM signature: {}",
        got[1]
    );
    let m = &got[0];
    assert!(m.contains("s=od1"), "no OpenDKIM signature: {m}");
    assert!(m.contains("s=tern1"), "no tern signature: {m}");
    let ar: Vec<&str> = m
        .lines()
        .skip_while(|l| !l.starts_with("Authentication-Results: verifier.test"))
        .take_while(|l| !l.is_empty())
        .collect();
    let ar = ar.join("\n");
    assert!(
        ar.starts_with("Authentication-Results: verifier.test"),
        "{m}"
    );
    assert_eq!(ar.matches("dkim=pass").count(), 2, "{ar}");
    assert!(!ar.contains("dkim=fail"), "{ar}");
}

/// The EICAR test string (the anti-virus industry's harmless test file).
const EICAR: &str = r"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*";

#[test]
fn clamav_milter_rejects_eicar_with_an_offline_signature() {
    // No freshclam, no network: clamd loads a one-line database this test writes (an
    // extended body signature of the EICAR string), which is all it needs to start.
    if !require_tool("clamd") || !require_tool("clamav-milter") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::create_dir(d.join("db")).unwrap();
    let hex: String = EICAR.bytes().map(|b| format!("{b:02x}")).collect();
    std::fs::write(
        d.join("db/tern-test.ndb"),
        format!("Tern-Test.EICAR:0:*:{hex}\n"),
    )
    .unwrap();
    let sock = d.join("clamd.sock");
    std::fs::write(
        d.join("clamd.conf"),
        format!(
            "LocalSocket {s}\nDatabaseDirectory {d}/db\nForeground yes\nLogFile {d}/clamd.log\n\
             PidFile {d}/clamd.pid\nTemporaryDirectory {d}\n",
            s = sock.display(),
            d = d.display()
        ),
    )
    .unwrap();
    let mut clamd = Filter::spawn(
        "clamd",
        Command::new("clamd").arg("-c").arg(d.join("clamd.conf")),
    );
    let start = Instant::now();
    while !sock.exists() {
        if let Ok(Some(status)) = clamd.child.try_wait() {
            let log = std::fs::read_to_string(d.join("clamd.log")).unwrap_or_default();
            panic!("clamd exited ({status}): {log}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "clamd did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let port = free_port();
    std::fs::write(
        d.join("milter.conf"),
        format!(
            "MilterSocket inet:{port}@127.0.0.1\nClamdSocket unix:{s}\nForeground yes\n\
             LogFile {d}/milter.log\nPidFile {d}/milter.pid\nOnInfected Reject\nUser root\n\
             AddHeader Replace\n",
            s = sock.display(),
            d = d.display()
        ),
    )
    .unwrap();
    let mut milter = Filter::spawn(
        "clamav-milter",
        Command::new("clamav-milter")
            .arg("-c")
            .arg(d.join("milter.conf")),
    );
    milter.wait_listening(port, Duration::from_secs(30));

    let dir = d.join("tern");
    std::fs::create_dir(&dir).unwrap();
    let route = format!(
        r#"queue.routes={{"*"="maildir:{}/maildir"}}"#,
        dir.display()
    );
    let filters = format!(r#"milter.filters=[{{name="clamav",socket="inet:127.0.0.1:{port}"}}]"#);
    let s = Server::start(
        Some(&dir),
        &[
            &route,
            r#"relay.trusted_networks=["127.0.0.0/8"]"#,
            &filters,
        ],
    );
    let virus = format!(
        "From: a@example.org\r\nTo: b@example.net\r\nSubject: eicar\r\nMessage-ID: <v@example.org>\r\n\r\n{EICAR}\r\n"
    );
    let r = send(s.smtp, "a@example.org", "b@example.net", &virus);
    r.check(550, "5.7.1");
    let clean = "From: a@example.org\r\nTo: b@example.net\r\nSubject: clean\r\nMessage-ID: <c@example.org>\r\n\r\nNothing to see.\r\n";
    send(s.smtp, "a@example.org", "b@example.net", clean).check(250, "2.0.0");
    let got = maildir(&dir, 1);
    assert_eq!(got.len(), 1, "the infected message was delivered: {got:?}");
    assert!(
        got[0].contains("X-Virus-Scanned: clamav-milter"),
        "{}",
        got[0]
    );
    assert!(got[0].contains("X-Virus-Status: Clean"), "{}", got[0]);
}
