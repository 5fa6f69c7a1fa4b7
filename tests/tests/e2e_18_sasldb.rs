//! e2e 18: migration from sendmail + Cyrus SASL: `user@realm` logins (Cyrus's first-`@`
//! rule) with real clients (swaks, gsasl), and `tern passwd --import-sasldb` on a
//! sasldb2 made by Debian's `saslpasswd2`, read with `db_dump` (sasl2-bin, db-util),
//! after which every imported user logs in with every mechanism.
//!
//! The demo server's realm is `localhost`.

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use tern_smtp::sasl::client;
use tern_tests::{Client, Server};

fn b64(s: &[u8]) -> String {
    B64.encode(s)
}

fn unb64(s: &str) -> Vec<u8> {
    B64.decode(s.trim()).expect("server sent valid base64")
}

fn run(cmd: &mut Command, stdin: &str) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    child.wait_with_output().expect("wait")
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
}

fn passwd(db: &Path, args: &[&str], stdin: &str) -> Output {
    run(
        Command::new(tern_tests::tern_bin())
            .arg("passwd")
            .arg("-f")
            .arg(db)
            .args(args),
        stdin,
    )
}

/// CRAM-MD5 over a fresh plain submission connection: the reply code.
fn cram_code(s: &Server, user: &str, password: &str) -> u16 {
    let mut c = Client::connect(s.submission);
    c.expect_greeting();
    c.ehlo("client.test");
    let r = c.cmd("AUTH CRAM-MD5");
    r.check(334, "");
    let challenge = unb64(&r.lines[0]);
    c.cmd(&b64(&client::cram_md5(user, password, &challenge)))
        .code
}

/// Log in with `mech` using tern's own client helpers over a real connection (TLS for
/// PLAIN and LOGIN); returns the final reply code. `digest` is the (username, realm)
/// DIGEST-MD5 sends, since that mechanism carries the realm in its own directive.
fn login(s: &Server, mech: &str, login: &str, digest: (&str, &str), password: &str) -> u16 {
    let mut c = if matches!(mech, "PLAIN" | "LOGIN") {
        let mut c = s.smtps();
        c.ehlo("client.test");
        c
    } else {
        let mut c = Client::connect(s.submission);
        c.expect_greeting();
        c.ehlo("client.test");
        c
    };
    match mech {
        "PLAIN" => {
            c.cmd(&format!(
                "AUTH PLAIN {}",
                b64(&client::plain("", login, password))
            ))
            .code
        }
        "LOGIN" => {
            c.cmd(&format!("AUTH LOGIN {}", b64(login.as_bytes())))
                .check(334, "");
            c.cmd(&b64(password.as_bytes())).code
        }
        "CRAM-MD5" => {
            let r = c.cmd("AUTH CRAM-MD5");
            let challenge = unb64(&r.lines[0]);
            c.cmd(&b64(&client::cram_md5(login, password, &challenge)))
                .code
        }
        "DIGEST-MD5" => {
            let r = c.cmd("AUTH DIGEST-MD5");
            let ch = String::from_utf8(unb64(&r.lines[0])).expect("utf8");
            let nonce = ch
                .split("nonce=\"")
                .nth(1)
                .and_then(|v| v.split('"').next())
                .expect("nonce");
            let (resp, rspauth) = client::digest_md5(
                digest.0,
                digest.1,
                password,
                nonce,
                "e2ecnonce",
                "smtp/localhost",
            );
            let r = c.cmd(&b64(&resp));
            if r.code != 334 {
                return r.code;
            }
            assert_eq!(unb64(&r.lines[0]), rspauth.as_bytes(), "rspauth");
            c.cmd("").code
        }
        "SCRAM-SHA-256" => {
            let first = format!("n,,n={login},r=e2eclientnonce");
            let r = c.cmd(&format!("AUTH SCRAM-SHA-256 {}", b64(first.as_bytes())));
            if r.code != 334 {
                return r.code;
            }
            let fin = client::scram_client_final(&first, &unb64(&r.lines[0]), password)
                .expect("server-first parses");
            let r = c.cmd(&b64(&fin));
            if r.code != 334 {
                return r.code;
            }
            c.cmd("").code
        }
        other => panic!("unknown mechanism {other}"),
    }
}

const MECHS: [&str; 5] = ["PLAIN", "LOGIN", "CRAM-MD5", "DIGEST-MD5", "SCRAM-SHA-256"];

/// The identities (envelope AUTH) of every stored message.
fn auth_identities(s: &Server) -> Vec<String> {
    tern_queue::scan_spool(&s.spool())
        .expect("scan_spool")
        .into_iter()
        .filter_map(|m| m.envelope.auth.clone())
        .collect()
}

#[test]
fn user_at_realm_logins_with_swaks_and_gsasl() {
    let swaks_ok = tern_tests::require_tool("swaks");
    let gsasl_ok = tern_tests::require_tool("gsasl");
    let s = Server::with(&[]);
    let db = s.dir().join("users.db");
    // alice exists only in realm example.org (not in the server's realm, localhost).
    let out = passwd(
        &db,
        &["-c", "-p", "-u", "example.org", "alice"],
        "Wonder land\n",
    );
    assert!(out.status.success(), "{}", text(&out));
    tern_tests::wait_for("the new user", Duration::from_secs(10), || {
        cram_code(&s, "alice@example.org", "Wonder land") == 235
    });
    // A bare `alice` is in the default realm, where she does not exist.
    assert_eq!(cram_code(&s, "alice", "Wonder land"), 535);
    assert_eq!(cram_code(&s, "alice@example.org", "wrong"), 535);

    if swaks_ok {
        for (mech, tls) in [("PLAIN", true), ("LOGIN", true), ("CRAM-MD5", false)] {
            let mut cmd = Command::new("swaks");
            cmd.arg("--server")
                .arg(format!("127.0.0.1:{}", s.submission.port()))
                .args(["--from", "alice@example.org", "--to", "friend@example.net"])
                .args(["--auth", mech, "--auth-user", "alice@example.org"])
                .args(["--auth-password", "Wonder land"]);
            if tls {
                cmd.arg("--tls");
            }
            let out = text(&run(&mut cmd, ""));
            assert!(out.contains("235 2.7.0"), "swaks {mech}: {out}");
            assert!(
                out.contains("250 2.0.0 Ok: queued as"),
                "swaks {mech}: {out}"
            );
        }
        // The identity recorded for the relay is the full login.
        let ids = auth_identities(&s);
        assert_eq!(ids.len(), 3, "{ids:?}");
        assert!(ids.iter().all(|i| i == "alice@example.org"), "{ids:?}");
    }

    if gsasl_ok {
        // DIGEST-MD5 names the realm in its own directive (username alice, realm
        // example.org); SCRAM carries the login alice@example.org.
        for (mech, authid, realm) in [
            ("DIGEST-MD5", "alice", "example.org"),
            ("SCRAM-SHA-256", "alice@example.org", "example.org"),
            ("CRAM-MD5", "alice@example.org", "example.org"),
        ] {
            let mut cmd = Command::new("gsasl");
            cmd.args(["--client", "--smtp", "--no-starttls", "--connect"])
                .arg(format!("127.0.0.1:{}", s.submission.port()))
                .args(["--mechanism", mech, "--authentication-id", authid])
                .args(["--password", "Wonder land", "--realm", realm])
                .args(["--service", "smtp", "--hostname", "localhost"]);
            let out = run(&mut cmd, "");
            let t = text(&out);
            assert!(out.status.success(), "gsasl {mech}: {t}");
            assert!(t.contains("235 2.7.0"), "gsasl {mech}: {t}");
        }
    }
}

#[test]
fn import_sasldb_then_every_user_logs_in_with_every_mechanism() {
    if !tern_tests::require_tool("saslpasswd2")
        || !tern_tests::require_tool("sasldblistusers2")
        || !tern_tests::require_tool("db_dump")
    {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let sasldb = dir.path().join("sasldb2");
    // (user, realm, password): one in the server's realm, two in others; passwords
    // with a space, a backslash and non-ASCII (db_dump escapes them).
    let users = [
        ("ann", "localhost", "ann pass"),
        ("bob", "example.org", "b\\ob-é"),
        ("carol", "other.test", "c@rol:1"),
    ];
    for (u, r, p) in users {
        let out = run(
            Command::new("saslpasswd2")
                .args(["-c", "-p", "-f"])
                .arg(&sasldb)
                .args(["-u", r, u]),
            &format!("{p}\n"),
        );
        assert!(out.status.success(), "saslpasswd2 {u}: {}", text(&out));
    }
    let listed = text(&run(
        Command::new("sasldblistusers2").arg("-f").arg(&sasldb),
        "",
    ));
    assert!(listed.contains("bob@example.org: userPassword"), "{listed}");

    // Import into the store a demo server will use (the demo user is then not created).
    let server_dir = tempfile::tempdir().expect("tempdir");
    let store = server_dir.path().join("users.db");
    let imp = passwd(
        &store,
        &["--import-sasldb", sasldb.to_str().expect("utf8")],
        "",
    );
    let out = text(&imp);
    assert_eq!(imp.status.code(), Some(0), "{out}");
    assert!(
        out.contains("imported 3 users") && out.contains("0 skipped"),
        "{out}"
    );
    for (_, _, p) in users {
        assert!(!out.contains(p), "a password was printed: {out}");
    }
    let stored = std::fs::read_to_string(&store).expect("store");
    for (_, _, p) in users {
        assert!(!stored.contains(p), "a password is in the store");
    }
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&store)
            .expect("store")
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    let list = text(&passwd(&store, &["--list"], ""));
    assert_eq!(
        list,
        "bob@example.org: userPassword\nann@localhost: userPassword\ncarol@other.test: userPassword\n"
    );

    // Importing again keeps the present users (exit 0), --overwrite replaces them.
    let again = passwd(
        &store,
        &["--import-sasldb", sasldb.to_str().expect("utf8")],
        "",
    );
    assert_eq!(again.status.code(), Some(0), "{}", text(&again));
    assert!(
        text(&again).contains("imported 0 users") && text(&again).contains("3 already present"),
        "{}",
        text(&again)
    );
    let over = passwd(
        &store,
        &[
            "--import-sasldb",
            sasldb.to_str().expect("utf8"),
            "--overwrite",
        ],
        "",
    );
    assert!(
        text(&over).contains("imported 3 users") && text(&over).contains("3 replaced"),
        "{}",
        text(&over)
    );

    let s = Server::start(Some(server_dir.path()), &[]);
    for (user, realm, password) in users {
        let full = format!("{user}@{realm}");
        let mut logins = vec![full.as_str()];
        if realm == "localhost" {
            logins.push(user); // bare name: the server's realm
        }
        for l in logins {
            for mech in MECHS {
                let code = login(&s, mech, l, (user, realm), password);
                assert_eq!(code, 235, "{mech} as {l}");
            }
        }
        // A wrong password fails every mechanism.
        for mech in MECHS {
            assert_eq!(
                login(&s, mech, &full, (user, realm), "wrong"),
                535,
                "{mech} as {full} with a wrong password"
            );
        }
    }
    // A user in another realm is not reachable by the bare name.
    assert_eq!(
        login(&s, "PLAIN", "bob", ("bob", "localhost"), "b\\ob-é"),
        535
    );
}

#[test]
fn import_sasldb_reports_skips_and_a_missing_db_dump() {
    if !tern_tests::require_tool("saslpasswd2") || !tern_tests::require_tool("db_dump") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let sasldb = dir.path().join("sasldb2");
    let store = dir.path().join("users.db");
    // A realm tern cannot store (`@` in it): saslpasswd2 splits `u@a@b` at the
    // first '@' into user u, realm a@b.
    for (u, p) in [("ok", "pw"), ("u@a@b", "pw2")] {
        let out = run(
            Command::new("saslpasswd2")
                .args(["-c", "-p", "-f"])
                .arg(&sasldb)
                .args(["-u", "example.org", u]),
            &format!("{p}\n"),
        );
        assert!(out.status.success(), "{}", text(&out));
    }
    let sasldb_arg = sasldb.to_str().expect("utf8");
    let out = passwd(&store, &["--import-sasldb", sasldb_arg], "");
    let t = text(&out);
    assert_eq!(out.status.code(), Some(65), "{t}");
    assert!(
        t.contains("skipped u@a@b") && t.contains("imported 1 users") && t.contains("1 skipped"),
        "{t}"
    );
    assert!(!t.contains("pw2"), "{t}");
    assert!(text(&passwd(&store, &["--list"], "")).contains("ok@example.org"));

    // Without db_dump on PATH: a clear message and EX_UNAVAILABLE.
    let out = run(
        Command::new(tern_tests::tern_bin())
            .env("PATH", "/nonexistent")
            .args(["passwd", "--import-sasldb", sasldb_arg, "-f"])
            .arg(&store),
        "",
    );
    assert_eq!(out.status.code(), Some(69), "{}", text(&out));
    assert!(text(&out).contains("db-util"), "{}", text(&out));

    // Not a Berkeley DB: db_dump's own error, exit 65; a missing file: 66.
    let junk = dir.path().join("junk");
    std::fs::write(&junk, "not a database\n").expect("write");
    let out = passwd(
        &store,
        &["--import-sasldb", junk.to_str().expect("utf8")],
        "",
    );
    assert_eq!(out.status.code(), Some(65), "{}", text(&out));
    assert!(text(&out).contains("db_dump failed"), "{}", text(&out));
    let out = passwd(&store, &["--import-sasldb", "/nonexistent/sasldb2"], "");
    assert_eq!(out.status.code(), Some(66), "{}", text(&out));
}
