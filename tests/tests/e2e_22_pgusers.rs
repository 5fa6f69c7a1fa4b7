//! 22: users in PostgreSQL (`auth.users = "postgresql://..."`), two nodes on one database.
//!
//! A real PostgreSQL (Debian's, run as `postgres` in a temporary directory) holds the
//! users; `tern passwd --init` makes the schema and `tern passwd -f URL` manages users;
//! two `tern` processes point at it. Shown: a new user, a password change and a deletion
//! reach both nodes (through LISTEN/NOTIFY, polled for, no fixed sleep); with the
//! database stopped both keep authenticating from their snapshot and say so (`tern ctl
//! status`, `/metrics`, one log line per outage); a node started during the outage
//! answers AUTH with 454 4.7.0 and lets nobody in; changes made while no node could hear
//! them are caught up when the database returns. The URL's password never shows.

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use tern_tests::postgres::{self, Postgres, PASSWORD};
use tern_tests::{require, tern_bin, wait_for, Client, Server};

/// Generous: a loaded CI machine. The measured delays are printed (and benchmarked in
/// docs/benchmarks.md); they are not asserted.
const WAIT: Duration = Duration::from_secs(20);

fn tern(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(tern_bin())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tern");
    if let Some(s) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(format!("{s}\n").as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    child.wait_with_output().unwrap()
}

#[track_caller]
fn ok(args: &[&str], stdin: Option<&str>) -> String {
    let o = tern(args, stdin);
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    );
    assert!(
        o.status.success(),
        "tern {args:?}: {}\n{out}\n{err}",
        o.status
    );
    assert!(
        !out.contains(PASSWORD) && !err.contains(PASSWORD),
        "{out}{err}"
    );
    out
}

/// `tern passwd -f URL ARGS... USER`, password on stdin.
fn passwd(url: &str, args: &[&str], password: Option<&str>) -> String {
    let mut a = vec!["passwd", "-f", url, "-u", "localhost", "-p"];
    a.extend_from_slice(args);
    ok(&a, password)
}

/// The reply code of `AUTH PLAIN` for `user`/`password` on a fresh connection.
fn auth(addr: std::net::SocketAddr, user: &str, password: &str) -> u16 {
    let mut c = Client::connect(addr);
    c.expect_greeting();
    c.ehlo("client.test");
    let token = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"));
    let r = c.cmd(&format!("AUTH PLAIN {token}"));
    c.quit();
    r.code
}

fn node(url: &str) -> Server {
    Server::with(&[
        &format!("auth.users={url}"),
        // The sender map in the same database (issue 15's cluster mode).
        &format!("auth.sender_map={url}"),
        "auth.sender_policy=own",
        // PLAIN on the plaintext port keeps the test's client simple; no tarpit, and no
        // per-address block from the polls' expected failures.
        "auth.allow_plaintext_without_tls=true",
        "auth.tarpit=0s",
        "auth.ip_failure_limit=1000000",
        "auth.realm=localhost",
    ])
}

fn status(s: &Server) -> String {
    let sock = s.spool().join("admin.sock");
    ok(
        &[
            "ctl",
            "status",
            "--json",
            "--socket",
            sock.to_str().unwrap(),
        ],
        None,
    )
}

fn metrics(s: &Server) -> String {
    use std::io::Read;
    let mut c = std::net::TcpStream::connect(s.metrics.expect("metrics endpoint")).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    c.read_to_string(&mut body).unwrap();
    body
}

/// The reply code of `MAIL FROM:<from>` after AUTH PLAIN as user/password.
fn mail_from(addr: std::net::SocketAddr, user: &str, password: &str, from: &str) -> u16 {
    let mut c = Client::connect(addr);
    c.expect_greeting();
    c.ehlo("client.test");
    let token = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"));
    c.expect(&format!("AUTH PLAIN {token}"), 235, "2.7.0");
    let r = c.cmd(&format!("MAIL FROM:<{from}>"));
    c.quit();
    r.code
}

/// Polls until `code` is what every node answers for user/password; returns how long.
fn until_all(nodes: &[&Server], user: &str, password: &str, code: u16) -> Duration {
    let start = Instant::now();
    wait_for(&format!("{user}: AUTH {code} on every node"), WAIT, || {
        nodes
            .iter()
            .all(|n| auth(n.submission, user, password) == code)
    });
    start.elapsed()
}

#[test]
fn users_in_postgresql_reach_every_node_and_survive_an_outage() {
    if !require(
        postgres::available(),
        "PostgreSQL server binaries, the postgres user, runuser and root",
    ) {
        return;
    }
    let mut pg = Postgres::start();
    let url = pg.url();

    // The schema, twice (idempotent), then users as for a file.
    assert!(ok(&["passwd", "--init", "-f", &url], None).contains("user store ready"));
    let shown = ok(&["passwd", "--init", "-f", &url], None);
    assert!(shown.contains("postgresql://tern:***@127.0.0.1"), "{shown}");
    passwd(
        &url,
        &["-c", "--message-rate", "500/1m", "alice"],
        Some("alice-pw1"),
    );
    let list = ok(&["passwd", "--list", "-f", &url], None);
    assert_eq!(list, "alice@localhost: userPassword\n");
    // The row holds derived secrets and the rate, never the password.
    let row = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(postgres::bin_dir().unwrap().join("psql"))
        .args(["-h", pg.sock.to_str().unwrap(), "-p", &pg.port.to_string()])
        .args(["-U", "postgres", "-d", "tern", "-At", "-c"])
        .arg("SELECT username, realm, message_rate, cram_md5, scram_sha_256 FROM tern_users")
        .output()
        .unwrap();
    let row = String::from_utf8_lossy(&row.stdout);
    assert!(row.starts_with("alice|localhost|500/1m|"), "{row}");
    assert!(!row.contains("alice-pw1"), "{row}");
    // A missing user without -c: 67, as for the file.
    let o = tern(
        &["passwd", "-f", &url, "-u", "localhost", "-p", "nobody"],
        Some("x"),
    );
    assert_eq!(o.status.code(), Some(67), "{o:?}");

    // Two nodes on the same database.
    let a = node(&url);
    let b = node(&url);
    let nodes = [&a, &b];
    for n in nodes {
        assert_eq!(auth(n.submission, "alice@localhost", "alice-pw1"), 235);
        assert_eq!(auth(n.submission, "alice", "alice-pw1"), 235);
        assert_eq!(auth(n.submission, "alice", "wrong"), 535);
    }

    // The sender map lives in the same database: a grant reaches both nodes.
    for n in nodes {
        assert_eq!(
            mail_from(n.submission, "alice", "alice-pw1", "boss@example.org"),
            553
        );
    }
    pg.psql_in(
        "tern",
        "INSERT INTO tern_sender_map VALUES ('boss@example.org', 'alice')",
    );
    wait_for("the grant on both nodes", WAIT, || {
        nodes
            .iter()
            .all(|n| mail_from(n.submission, "alice", "alice-pw1", "boss@example.org") == 250)
    });

    // A new user reaches both nodes.
    passwd(&url, &["-c", "bob"], Some("bob-pw1"));
    let t = until_all(&nodes, "bob", "bob-pw1", 235);
    eprintln!("new user on both nodes after {t:?}");
    // A password change reaches both: the new one works, the old one no longer does.
    passwd(&url, &["bob"], Some("bob-pw2"));
    let t = until_all(&nodes, "bob", "bob-pw2", 235);
    eprintln!("password change on both nodes after {t:?}");
    for n in nodes {
        assert_eq!(auth(n.submission, "bob", "bob-pw1"), 535);
    }
    // A deletion reaches both.
    ok(
        &["passwd", "-f", &url, "-u", "localhost", "-d", "bob"],
        None,
    );
    let t = until_all(&nodes, "bob", "bob-pw2", 535);
    eprintln!("deletion on both nodes after {t:?}");
    for n in nodes {
        let m = metrics(n);
        assert!(m.contains("tern_userstore_up 1\n"), "{m}");
        assert!(m.contains("tern_userstore_fallback 0\n"), "{m}");
        let delay = m
            .lines()
            .find_map(|l| l.strip_prefix("tern_userstore_notify_delay_seconds "))
            .and_then(|v| v.parse::<f64>().ok())
            .expect("notify delay metric");
        eprintln!("node NOTIFY-to-snapshot delay (last change): {delay:.4} s");
        assert!(delay > 0.0, "{m}");
    }

    // SIGHUP / `tern ctl reload` on a database store: a full reload by the watcher.
    let reload = ok(
        &[
            "ctl",
            "reload",
            "--socket",
            a.spool().join("admin.sock").to_str().unwrap(),
        ],
        None,
    );
    assert!(
        reload.contains("user store reloaded: 1 user(s)"),
        "{reload}"
    );

    // A Cyrus sasldb2 imported straight into the database reaches both nodes.
    if tern_tests::require_tool("saslpasswd2") && tern_tests::require_tool("db_dump") {
        let dir = tempfile::tempdir().unwrap();
        let sasldb = dir.path().join("sasldb2");
        let mut child = Command::new("saslpasswd2")
            .args(["-c", "-p", "-f"])
            .arg(&sasldb)
            .args(["-u", "example.org", "dora"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(b"dora-pw\n").unwrap();
        assert!(child.wait_with_output().unwrap().status.success());
        let out = ok(
            &[
                "passwd",
                "-f",
                &url,
                "--import-sasldb",
                sasldb.to_str().unwrap(),
            ],
            None,
        );
        assert!(
            out.contains("imported 1 users") && out.contains("into postgresql://tern:***@"),
            "{out}"
        );
        until_all(&nodes, "dora@example.org", "dora-pw", 235);
    }

    // The database goes away: both nodes keep authenticating from their snapshots and
    // say they are on fallback.
    pg.stop();
    for n in nodes {
        wait_for("fallback in tern ctl status", WAIT, || {
            status(n).contains("\"fallback\":true")
        });
        assert!(metrics(n).contains("tern_userstore_fallback 1\n"));
        assert_eq!(auth(n.submission, "alice", "alice-pw1"), 235);
        assert_eq!(auth(n.submission, "alice", "wrong"), 535);
    }
    let text = ok(
        &[
            "ctl",
            "status",
            "--socket",
            a.spool().join("admin.sock").to_str().unwrap(),
        ],
        None,
    );
    assert!(
        text.contains("user store postgresql://tern:***@127.0.0.1")
            && text.contains("FALLBACK: database unreachable, AUTH from the last snapshot"),
        "{text}"
    );
    // A node started now has no snapshot: AUTH is a temporary failure, nobody gets in.
    let c = node(&url);
    assert!(
        c.stderr_log()
            .contains("user database unreachable at start"),
        "{}",
        c.stderr_log()
    );
    let mut cl = Client::connect(c.submission);
    cl.expect_greeting();
    cl.ehlo("client.test");
    let token = base64::engine::general_purpose::STANDARD.encode("\0alice\0alice-pw1");
    cl.expect(&format!("AUTH PLAIN {token}"), 454, "4.7.0");
    cl.quit();
    assert!(status(&c).contains("\"loaded\":false"));
    assert!(metrics(&c).contains("tern_userstore_snapshot_age_seconds -1"));

    // Changes while no node can hear them: the database up on its Unix socket only.
    pg.start_socket_only();
    let local = pg.socket_url();
    passwd(&local, &["-c", "carol"], Some("carol-pw"));
    passwd(&local, &["alice"], Some("alice-pw2"));
    pg.stop();
    // Several reconnection attempts have failed by now on A and B (backoff ≤ 5 s).
    pg.start_again();
    let all = [&a, &b, &c];
    let t = until_all(&all, "carol", "carol-pw", 235);
    eprintln!("caught up after the outage in {t:?}");
    until_all(&all, "alice", "alice-pw2", 235);
    for n in all {
        assert_eq!(auth(n.submission, "alice", "alice-pw1"), 535);
        wait_for("user store up again", WAIT, || {
            status(n).contains("\"fallback\":false")
        });
        assert!(metrics(n).contains("tern_userstore_up 1\n"));
        let log = n.stderr_log();
        assert!(!log.contains(PASSWORD), "the URL's password in the log");
    }
    // One log line per outage, not one per retry.
    for n in [&a, &b] {
        let log = n.stderr_log();
        assert_eq!(log.matches("user database lost").count(), 1, "{log}");
        assert!(
            log.contains("user database reached: snapshot caught up"),
            "{log}"
        );
    }

    // A TRUNCATE (no rows to name: the statement trigger) empties every node.
    pg.psql_in("tern", "TRUNCATE tern_users");
    until_all(&all, "carol", "carol-pw", 535);

    // check-config and features show the URL without its password.
    for cmd in ["check-config", "features"] {
        let out = ok(&[cmd, "--set", &format!("auth.users={url}")], None);
        assert!(
            out.contains("postgresql://tern:***@127.0.0.1"),
            "{cmd}: {out}"
        );
    }
    drop(pg);
}

/// TLS to the database as the URL's libpq-style `sslmode`/`sslrootcert` say: a node on
/// `verify-full` with the server's CA connects over TLS (PostgreSQL's pg_stat_ssl says
/// so) and authenticates its users; a CA that did not sign the server's certificate is
/// refused (exit 69, "unavailable"), and `require` without a CA encrypts unverified.
#[test]
fn tls_to_the_database_follows_sslmode() {
    if !require(
        postgres::available(),
        "PostgreSQL server binaries, the postgres user, runuser and root",
    ) || !tern_tests::require_tool("openssl")
    {
        return;
    }
    let mut pg = Postgres::start();
    let ca = pg.enable_tls();
    let verified = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        pg.url(),
        ca.display()
    );
    ok(&["passwd", "--init", "-f", &verified], None);
    passwd(&verified, &["-c", "erin"], Some("erin-pw"));
    let n = node(&verified);
    assert_eq!(auth(n.submission, "erin", "erin-pw"), 235);
    // The node's two LISTEN connections (the user store's and the sender map's
    // threads) are both on TLS.
    wait_for("the node's connections on TLS", WAIT, || {
        pg.psql(
            "SELECT count(*) FILTER (WHERE NOT s.ssl) || ' ' || count(*) \
             FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.application_name = 'tern'",
        )
        .trim()
            == "0 2"
    });
    // A new user still arrives over the TLS connection.
    passwd(&verified, &["-c", "fred"], Some("fred-pw"));
    until_all(&[&n], "fred", "fred-pw", 235);

    // Another CA: the server's certificate does not verify.
    let dir = tempfile::tempdir().unwrap();
    let (other, _, _) = postgres::ca_and_cert(dir.path(), "other");
    let wrong = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        pg.url(),
        other.display()
    );
    let o = tern(&["passwd", "--list", "-f", &wrong], None);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(69), "{err}");
    assert!(
        err.contains("cannot connect") && !err.contains(PASSWORD),
        "{err}"
    );
    // require without a CA: encrypted, not verified (libpq's meaning).
    let list = ok(
        &[
            "passwd",
            "--list",
            "-f",
            &format!("{}?sslmode=require", pg.url()),
        ],
        None,
    );
    assert!(
        list.contains("erin@localhost") && list.contains("fred@localhost"),
        "{list}"
    );
}
