//! e2e 04: real clients against a live tern — Python's smtplib, curl, swaks.
//!
//! Each test drives one external tool. When the tool is not installed the test prints
//! `skipped: <tool> not installed` to stderr and passes, so a developer machine without it
//! still runs the suite; with `CI=true` a missing tool fails the test, so CI notices when
//! its image loses one.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tern_tests::{require_tool, Server};

#[track_caller]
fn run_ok(what: &str, out: Output) -> String {
    let so = String::from_utf8_lossy(&out.stdout).into_owned();
    let se = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout:\n{so}\nstderr:\n{se}",
        out.status
    );
    so
}

fn interop_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("interop")
}

/// The senders in the queue, sorted.
fn senders(s: &Server) -> Vec<String> {
    let mut v: Vec<String> = s.queue_list().into_iter().map(|e| e.sender).collect();
    v.sort();
    v
}

#[test]
fn python_smtplib() {
    if !require_tool("python3") {
        return;
    }
    let s = Server::with(&[]);
    let out = Command::new("python3")
        .arg(interop_dir().join("smtplib_client.py"))
        .arg("127.0.0.1")
        .arg(s.smtp.port().to_string())
        .arg(s.smtps.port().to_string())
        .arg(s.cert())
        .output()
        .expect("running python3");
    let so = run_ok("smtplib_client.py", out);
    for case in ["plain", "starttls", "smtps", "eightbit", "smtputf8"] {
        assert!(so.contains(&format!("ok {case}\n")), "case {case}: {so}");
    }
    assert_eq!(
        senders(&s),
        [
            "eightbit@example.com",
            "plain@example.com",
            "starttls@example.com",
            "utf8@example.com"
        ]
    );
    let stored = s.stored();
    let find = |from: &str| stored.iter().find(|m| m.sender == from).unwrap();
    assert_eq!(
        find("plain@example.com").content(),
        b"Subject: plain\r\n\r\nhello from smtplib\r\n.dot line\r\n"
    );
    assert_eq!(find("plain@example.com").recipients, ["ok@demo.test"]);
    let eight = find("eightbit@example.com").content();
    assert!(
        tern_tests::find(eight, "Grüße aus Zürich — żółw".as_bytes()).is_some(),
        "8-bit text not stored verbatim: {}",
        String::from_utf8_lossy(eight)
    );
    assert_eq!(find("utf8@example.com").recipients, ["jösé@demo.test"]);
    assert!(find("starttls@example.com")
        .split_received()
        .0
        .contains("ESMTPS"));
}

fn curl(args: &[&str]) -> Output {
    Command::new("curl")
        .args(["-sS", "--max-time", "20"])
        .args(args)
        .output()
        .expect("running curl")
}

#[test]
fn curl_smtp_smtps_starttls() {
    if !require_tool("curl") {
        return;
    }
    let s = Server::with(&[r#"auth.require_on=["submission"]"#]);
    let file = s.dir().join("mail.txt");
    let body: &[u8] = b"Subject: curl\r\n\r\nhello from curl\r\n.dot line\r\n";
    std::fs::write(&file, body).unwrap();
    let f = file.to_str().unwrap();
    let cert = s.cert();
    let ca = cert.to_str().unwrap();

    let plain = format!("smtp://127.0.0.1:{}/client.test", s.smtp.port());
    let o = curl(&[
        "--url",
        &plain,
        "--mail-from",
        "curl-plain@example.com",
        "--mail-rcpt",
        "x@demo.test",
        "--upload-file",
        f,
    ]);
    run_ok("curl smtp://", o);

    let o = curl(&[
        "--url",
        &plain,
        "--ssl-reqd",
        "--cacert",
        ca,
        "--mail-from",
        "curl-starttls@example.com",
        "--mail-rcpt",
        "x@demo.test",
        "--upload-file",
        f,
    ]);
    run_ok("curl smtp:// --ssl-reqd", o);

    let smtps = format!("smtps://localhost:{}/client.test", s.smtps.port());
    let resolve = format!("localhost:{}:127.0.0.1", s.smtps.port());
    let o = curl(&[
        "--url",
        &smtps,
        "--resolve",
        &resolve,
        "--cacert",
        ca,
        "--mail-from",
        "curl-smtps@example.com",
        "--mail-rcpt",
        "x@demo.test",
        "--upload-file",
        f,
    ]);
    run_ok("curl smtps://", o);

    // Relaying is refused: curl must fail.
    let o = curl(&[
        "--url",
        &plain,
        "--mail-from",
        "curl-relay@example.com",
        "--mail-rcpt",
        "x@example.org",
        "--upload-file",
        f,
    ]);
    assert!(!o.status.success(), "relay through curl was accepted");

    assert_eq!(
        senders(&s),
        [
            "curl-plain@example.com",
            "curl-smtps@example.com",
            "curl-starttls@example.com"
        ]
    );
    for m in s.stored() {
        assert_eq!(m.content(), body, "{}", m.sender);
        assert_eq!(m.recipients, ["x@demo.test"]);
    }
}

#[test]
fn swaks() {
    if !require_tool("swaks") {
        return;
    }
    let s = Server::with(&[r#"auth.require_on=["submission"]"#]);
    let smtp = s.smtp.to_string();
    let smtps = s.smtps.to_string();
    let base = |from: &str, server: &str| {
        let mut c = Command::new("swaks");
        c.args([
            "--server",
            server,
            "--to",
            "x@demo.test",
            "--from",
            from,
            "--helo",
            "client.test",
            "--timeout",
            "20",
        ]);
        c
    };
    run_ok(
        "swaks plain",
        base("swaks-plain@example.com", &smtp).output().unwrap(),
    );
    run_ok(
        "swaks --tls",
        base("swaks-tls@example.com", &smtp)
            .arg("--tls")
            .output()
            .unwrap(),
    );
    run_ok(
        "swaks --tls-on-connect",
        base("swaks-tlsc@example.com", &smtps)
            .arg("--tls-on-connect")
            .output()
            .unwrap(),
    );
    run_ok(
        "swaks --pipeline",
        base("swaks-pipe@example.com", &smtp)
            .arg("--pipeline")
            .output()
            .unwrap(),
    );
    // Relay refused: swaks exits non-zero.
    let o = Command::new("swaks")
        .args([
            "--server",
            &smtp,
            "--to",
            "x@example.org",
            "--from",
            "swaks-relay@example.com",
            "--timeout",
            "20",
        ])
        .output()
        .unwrap();
    assert!(!o.status.success(), "relay through swaks was accepted");
    assert_eq!(
        senders(&s),
        [
            "swaks-pipe@example.com",
            "swaks-plain@example.com",
            "swaks-tls@example.com",
            "swaks-tlsc@example.com"
        ]
    );
}
