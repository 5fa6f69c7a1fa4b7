//! 05: SMTP AUTH end to end: every reply code of RFC 4954 as tern uses it, relay policy,
//! brute-force defences, nonce replay, the user store and its reload, and independent
//! client implementations (GNU gsasl, swaks, curl, Python's smtplib).
//!
//! The demo user is `demo` / `demo` in realm `localhost`; submission and smtps require
//! AUTH before MAIL.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use tern_smtp::sasl::client;
use tern_tests::{Client, Server, TlsVersion};

fn b64(s: &[u8]) -> String {
    B64.encode(s)
}

fn unb64(s: &str) -> Vec<u8> {
    B64.decode(s.trim()).expect("server sent valid base64")
}

/// A submission client after EHLO (plain connection).
fn submission(s: &Server) -> Client {
    let mut c = Client::connect(s.submission);
    c.expect_greeting();
    c.ehlo("client.test");
    c
}

fn cram(c: &mut Client, user: &str, password: &str) -> tern_tests::Reply {
    let r = c.cmd("AUTH CRAM-MD5");
    r.check(334, "");
    let challenge = unb64(&r.lines[0]);
    c.cmd(&b64(&client::cram_md5(user, password, &challenge)))
}

#[test]
fn ehlo_hides_plaintext_mechanisms_before_tls() {
    let s = Server::with(&[]);
    let mut c = Client::connect(s.submission);
    c.expect_greeting();
    let kw = c.ehlo("client.test");
    let auth = kw
        .iter()
        .find(|l| l.starts_with("AUTH "))
        .expect("AUTH advertised");
    assert!(
        auth.contains("CRAM-MD5") && auth.contains("DIGEST-MD5") && auth.contains("SCRAM-SHA-256")
    );
    assert!(!auth.contains("PLAIN") && !auth.contains("LOGIN"), "{auth}");
    c.expect("AUTH PLAIN AGRlbW8AZGVtbw==", 538, "5.7.11");
    c.expect("AUTH LOGIN", 538, "5.7.11");
    c.starttls(&s.cert(), TlsVersion::Any);
    let kw = c.ehlo("client.test");
    let auth = kw
        .iter()
        .find(|l| l.starts_with("AUTH "))
        .expect("AUTH advertised");
    assert!(auth.contains("PLAIN") && auth.contains("LOGIN"), "{auth}");
    // Implicit TLS offers everything too.
    let mut t = s.smtps();
    let kw = t.ehlo("client.test");
    assert!(kw
        .iter()
        .any(|l| l.starts_with("AUTH ") && l.contains("PLAIN")));
}

#[test]
fn reply_codes() {
    let s = Server::with(&["auth.tarpit=10ms", "auth.max_failures=10"]);
    let mut c = Client::connect(s.submission);
    c.expect_greeting();
    c.expect("AUTH CRAM-MD5", 503, "5.5.1"); // before EHLO
    c.ehlo("client.test");
    c.expect("AUTH BOGUS-MECH", 504, "5.5.4");
    c.expect("AUTH CRAM-MD5 !!!notbase64", 501, "5.5.2");
    // "*" cancels an exchange: 501 5.0.0.
    c.expect("AUTH CRAM-MD5", 334, "");
    c.expect("*", 501, "5.0.0");
    // A bad base64 continuation.
    c.expect("AUTH CRAM-MD5", 334, "");
    c.expect("%%%", 501, "5.5.2");
    // Unknown user and wrong password: the same reply.
    let unknown = cram(&mut c, "nobody", "demo");
    let wrong = cram(&mut c, "demo", "wrong");
    unknown.check(535, "5.7.8");
    wrong.check(535, "5.7.8");
    assert_eq!(unknown.lines, wrong.lines);
    // MAIL without AUTH on submission: 530.
    c.expect("MAIL FROM:<demo@localhost>", 530, "5.7.0");
    cram(&mut c, "demo", "demo").check(235, "2.7.0");
    c.expect("AUTH CRAM-MD5", 503, "5.5.1"); // twice
    c.expect("MAIL FROM:<demo@localhost>", 250, "2.1.0");
    // Authenticated: relaying to any domain is allowed.
    c.expect("RCPT TO:<friend@example.net>", 250, "2.1.5");
    c.expect("RSET", 250, "2.0.0");

    // AUTH during a transaction: 503.
    let mut d = Client::connect(s.smtp);
    d.expect_greeting();
    d.ehlo("client.test");
    d.expect("MAIL FROM:<a@example.com>", 250, "2.1.0");
    d.expect("AUTH CRAM-MD5", 503, "5.5.1");
    // Not authenticated on port 25: relaying is denied, local domains are fine.
    d.expect("RCPT TO:<friend@example.net>", 554, "5.7.1");
    d.expect("RCPT TO:<user@demo.test>", 250, "2.1.5");
}

#[test]
fn plain_initial_response_equals_sign_and_authzid() {
    let s = Server::with(&[]);
    let mut c = s.smtps();
    c.ehlo("client.test");
    // "=" is an empty initial response, which is not a valid PLAIN message.
    c.expect("AUTH PLAIN =", 501, "5.5.2");
    c.expect("AUTH PLAIN", 334, "");
    // authzid different from authcid is refused by default.
    c.expect(&b64(b"other\0demo\0demo"), 535, "5.7.8");
    c.expect(
        &format!("AUTH PLAIN {}", b64(b"demo\0demo\0demo")),
        235,
        "2.7.0",
    );
}

#[test]
fn login_flow_under_tls() {
    let s = Server::with(&[]);
    let mut c = s.smtps();
    c.ehlo("client.test");
    let r = c.cmd("AUTH LOGIN");
    r.check(334, "");
    assert_eq!(unb64(&r.lines[0]), b"Username:");
    let r = c.cmd(&b64(b"demo"));
    assert_eq!(unb64(&r.lines[0]), b"Password:");
    c.expect(&b64(b"demo"), 235, "2.7.0");
    let id = c.send_mail(
        "demo@localhost",
        &["friend@example.net"],
        b"Subject: t\r\n\r\nhi\r\n",
    );
    let stored = s.stored_by_id(&id);
    let (received, _) = stored.split_received();
    assert!(received.contains("ESMTPSA"), "{received}");
}

#[test]
fn digest_md5_rspauth_and_replay_refused() {
    let s = Server::with(&[]);
    let mut c = submission(&s);
    let r = c.cmd("AUTH DIGEST-MD5");
    r.check(334, "");
    let challenge = String::from_utf8(unb64(&r.lines[0])).unwrap();
    let nonce = challenge
        .split(',')
        .find_map(|d| d.strip_prefix("nonce=\""))
        .and_then(|n| n.strip_suffix('"'))
        .expect("nonce in challenge")
        .to_string();
    let (resp, rspauth) = client::digest_md5(
        "demo",
        "localhost",
        "demo",
        &nonce,
        "0a4f113b",
        "smtp/localhost",
    );
    let r = c.cmd(&b64(&resp));
    r.check(334, "");
    let rsp = if rspauth.starts_with("rspauth=") {
        rspauth.clone()
    } else {
        format!("rspauth={rspauth}")
    };
    assert_eq!(unb64(&r.lines[0]), rsp.as_bytes());
    c.expect("", 235, "2.7.0");

    // Replaying the very same response on a new connection must fail: the nonce is spent.
    let mut d = submission(&s);
    d.expect("AUTH DIGEST-MD5", 334, "");
    d.expect(&b64(&resp), 535, "5.7.8");
}

#[test]
fn failure_limit_closes_session_and_ip_block_spans_shards() {
    let s = Server::with(&[
        "auth.max_failures=2",
        "auth.tarpit=10ms",
        "auth.ip_failure_limit=5",
        "shards=2",
    ]);
    let mut c = submission(&s);
    cram(&mut c, "demo", "bad").check(535, "5.7.8");
    let r = cram(&mut c, "demo", "bad");
    r.check(535, "5.7.8");
    c.read_reply().check(421, "4.7.0");
    assert!(c.closed());
    // Three more failures from new connections (spread over both shards by the kernel)
    // reach the per-IP limit of 5; after that even the right password gets 454.
    for _ in 0..3 {
        let mut c = submission(&s);
        cram(&mut c, "demo", "bad").check(535, "5.7.8");
    }
    let mut blocked = 0;
    for _ in 0..6 {
        let mut c = submission(&s);
        if c.cmd("AUTH CRAM-MD5").code == 454 {
            blocked += 1;
        }
    }
    assert_eq!(blocked, 6, "every new connection, on any shard, is refused");
}

#[test]
fn user_store_cli_and_reload() {
    let s = Server::with(&[]);
    let db = s.dir().join("users.db");
    let tern = tern_tests::tern_bin();
    let passwd = |args: &[&str], stdin: &str| {
        let mut child = Command::new(tern)
            .arg("passwd")
            .arg("-f")
            .arg(&db)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let out = passwd(&["-u", "localhost", "-c", "-p", "alice"], "s3cret\n");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list = passwd(&["--list"], "");
    let list = String::from_utf8_lossy(&list.stdout).to_string();
    assert!(
        list.contains("alice@localhost: userPassword") && list.contains("demo@localhost"),
        "{list}"
    );
    assert!(!list.contains("s3cret"));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&db).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let text = std::fs::read_to_string(&db).unwrap();
    assert!(
        !text.contains("s3cret"),
        "the password itself is never stored"
    );

    // The running server picks the new user up (file watch / SIGHUP) without a restart,
    // and an open session keeps working meanwhile.
    let mut open = submission(&s);
    let mut ok = false;
    for _ in 0..50 {
        let mut c = submission(&s);
        if cram(&mut c, "alice", "s3cret").code == 235 {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(ok, "new user never accepted");
    open.expect("NOOP", 250, "2.0.0");

    // Delete: the user is gone from the list and, after reload, cannot log in.
    let out = passwd(&["-u", "localhost", "-d", "alice"], "");
    assert!(out.status.success());
    unsafe { libc::kill(s.pid() as i32, libc::SIGHUP) };
    let mut refused = false;
    for _ in 0..50 {
        let mut c = submission(&s);
        if cram(&mut c, "alice", "s3cret").code == 535 {
            refused = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(refused, "deleted user still accepted");

    // A group-readable store is refused by the CLI with a clear error.
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = passwd(&["--list"], "");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("0644") || err.to_lowercase().contains("readable") || err.contains("mode"),
        "{err}"
    );
}

// ---- independent client implementations ----

#[test]
fn gsasl_digest_md5_scram_cram_and_plain() {
    if !tern_tests::require_tool("gsasl") {
        return;
    }
    let s = Server::with(&[]);
    let port = s.submission.port().to_string();
    for (mech, tls) in [
        ("DIGEST-MD5", false),
        ("SCRAM-SHA-256", false),
        ("CRAM-MD5", false),
        ("PLAIN", true),
    ] {
        let mut cmd = Command::new("gsasl");
        cmd.args(["--client", "--smtp", "--connect"])
            .arg(format!("127.0.0.1:{port}"))
            .args([
                "--mechanism",
                mech,
                "--authentication-id",
                "demo",
                "--password",
                "demo",
            ])
            .args([
                "--realm",
                "localhost",
                "--service",
                "smtp",
                "--hostname",
                "localhost",
            ]);
        if tls {
            cmd.arg("--starttls").arg("--x509-ca-file").arg(s.cert());
        } else {
            cmd.arg("--no-starttls");
        }
        let out = cmd.stdin(Stdio::null()).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "gsasl {mech}: {text}");
        assert!(text.contains("235 2.7.0"), "gsasl {mech}: {text}");
    }
}

fn swaks(s: &Server, extra: &[&str]) -> String {
    let out = Command::new("swaks")
        .arg("--server")
        .arg(format!("127.0.0.1:{}", s.submission.port()))
        .args(["--from", "demo@localhost", "--to", "friend@example.net"])
        .args(["--auth-user", "demo", "--auth-password", "demo"])
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
}

#[test]
fn swaks_every_mechanism_it_knows() {
    if !tern_tests::require_tool("swaks") {
        return;
    }
    let s = Server::with(&[]);
    for (mech, tls) in [
        ("CRAM-MD5", false),
        ("DIGEST-MD5", false),
        ("PLAIN", true),
        ("LOGIN", true),
    ] {
        let mut extra = vec!["--auth", mech];
        if tls {
            extra.push("--tls");
        }
        let out = swaks(&s, &extra);
        assert!(out.contains("235 2.7.0"), "swaks {mech}: {out}");
        assert!(
            out.contains("250 2.0.0 Ok: queued as"),
            "swaks {mech}: {out}"
        );
    }
    let out = swaks(&s, &["--auth", "CRAM-MD5", "--auth-password", "wrong"]);
    assert!(out.contains("535 5.7.8"), "{out}");
}

#[test]
fn curl_login_options() {
    if !tern_tests::require_tool("curl") {
        return;
    }
    let s = Server::with(&[]);
    for mech in ["CRAM-MD5", "DIGEST-MD5", "PLAIN", "LOGIN"] {
        let out = Command::new("curl")
            .args(["-sS", "--ssl-reqd", "--cacert"])
            .arg(s.cert())
            .arg("--url")
            .arg(format!("smtp://localhost:{}", s.submission.port()))
            .args(["--user", "demo:demo", "--login-options"])
            .arg(format!("AUTH={mech}"))
            .args([
                "--mail-from",
                "demo@localhost",
                "--mail-rcpt",
                "friend@example.net",
            ])
            .args(["--upload-file", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .and_then(|mut ch| {
                use std::io::Write;
                ch.stdin
                    .take()
                    .unwrap()
                    .write_all(b"Subject: curl\r\n\r\nhi\r\n")?;
                ch.wait_with_output()
            })
            .unwrap();
        assert!(
            out.status.success(),
            "curl AUTH={mech}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(
        s.queue_list()
            .iter()
            .filter(|e| e.sender == "demo@localhost")
            .count(),
        4
    );
}

#[test]
fn python_smtplib_cram_plain_login() {
    if !tern_tests::require_tool("python3") {
        return;
    }
    let s = Server::with(&[]);
    let script = r#"
import smtplib, ssl, sys
port, cafile = int(sys.argv[1]), sys.argv[2]
ctx = ssl.create_default_context(cafile=cafile)
s = smtplib.SMTP('localhost', port); s.ehlo()
s.login('demo', 'demo')              # picks CRAM-MD5 before TLS
s.sendmail('demo@localhost', ['friend@example.net'], 'Subject: py\r\n\r\nhi\r\n'); s.quit()
for mech in ('PLAIN', 'LOGIN'):
    s = smtplib.SMTP('localhost', port); s.starttls(context=ctx); s.ehlo()
    s.user, s.password = 'demo', 'demo'
    code, _ = s.auth(mech, getattr(s, 'auth_' + mech.lower()))
    assert code == 235, (mech, code)
    s.sendmail('demo@localhost', ['friend@example.net'], 'Subject: py\r\n\r\nhi\r\n'); s.quit()
try:
    s = smtplib.SMTP('localhost', port); s.login('demo', 'wrong'); sys.exit('wrong password accepted')
except smtplib.SMTPAuthenticationError as e:
    assert e.smtp_code == 535, e
print('ok')
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(s.submission.port().to_string())
        .arg(s.cert())
        .output()
        .unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("ok"),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = Path::new("");
}
