//! 18: DKIM signing (RFC 6376, RFC 8463), checked by an independent verifier: Python's
//! dkimpy, given the public keys from the records `tern dkim keygen` printed (through its
//! DNS hook, no DNS involved).
//!
//! Keys for example.org, one RSA and one Ed25519, made with `tern dkim keygen`. Messages
//! from a trusted client with From: @example.org, sent with DATA and BDAT, with bodies
//! that stress canonicalisation, are delivered into the Maildir; each must carry both
//! signatures and both must verify. A message changed after signing must fail (the
//! verifier can fail). Mail from another From: domain, and mail from a client that is
//! neither authenticated nor (with `dkim.sign = ["authenticated"]`) counted, is unsigned.
//!
//! The Maildir writer turns CRLF into LF. tern refuses bare CR and LF in DATA and in
//! non-BINARYMIME BDAT, and these messages have none (asserted), so every LF of a
//! delivered file was a CRLF: the verifier is given the file with CRLF restored, and the
//! restored text is checked to end with the exact message that was sent.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tern_tests::{require, tern_bin, wait_for, Server};

const VERIFY_PY: &str = r#"
import sys, dkim
records = dict(l.rstrip('\n').split('\t', 1) for l in open(sys.argv[1]) if l.strip())
def dns(name, timeout=5):
    n = name.decode() if isinstance(name, bytes) else name
    v = records.get(n.rstrip('.').lower())
    return v.encode() if v is not None else None
for path in sys.argv[2:]:
    msg = open(path, 'rb').read()
    n = sum(1 for l in msg.split(b'\r\n') if l.lower().startswith(b'dkim-signature:'))
    results = []
    for i in range(n):
        d = dkim.DKIM(msg)
        try:
            ok = d.verify(idx=i, dnsfunc=dns)
        except Exception as e:
            print('error:', repr(e), file=sys.stderr)
            ok = False
        results.append('%s=%s' % (d.signature_fields.get(b'a', b'?').decode(), 'pass' if ok else 'fail'))
    print(path, n, ' '.join(results))
"#;

fn dkimpy_available() -> bool {
    Command::new("python3")
        .args(["-c", "import dkim, nacl"])
        .status()
        .is_ok_and(|s| s.success())
}

/// `tern dkim keygen`: (key path, "name" -> TXT value joined).
fn keygen(dir: &Path, selector: &str, alg: &str) -> (PathBuf, String, String) {
    let (key, name, value) = tern_tests::dkim_keygen(dir, selector, alg);
    assert_eq!(name, format!("{selector}._domainkey.example.org"));
    assert!(
        value.starts_with(&format!("v=DKIM1; k={alg}; p=")),
        "{value}"
    );
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    // Other DKIM software (OpenDKIM, anything on OpenSSL) can read the key file too.
    if require(tern_tests::tool_found("openssl"), "openssl") {
        let o = Command::new("openssl")
            .args(["pkey", "-noout", "-in"])
            .arg(&key)
            .output()
            .expect("openssl pkey");
        assert!(
            o.status.success(),
            "openssl cannot read the {alg} key: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    (key, name, value)
}

/// The Maildir's files, raw.
fn delivered(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(dir.join("maildir/new"))
        .map(|rd| {
            rd.flatten()
                .map(|e| (e.path(), std::fs::read(e.path()).unwrap()))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn crlf(lf: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(lf.len() + lf.len() / 20);
    for &b in lf {
        if b == b'\n' {
            out.push(b'\r');
        }
        out.push(b);
    }
    out
}

fn no_bare_newlines(m: &[u8]) -> bool {
    m.iter().enumerate().all(|(i, &b)| match b {
        b'\n' => i > 0 && m[i - 1] == b'\r',
        b'\r' => m.get(i + 1) == Some(&b'\n'),
        _ => true,
    })
}

fn run_verifier(records: &[(String, String)], files: &[PathBuf], tmp: &Path) -> Vec<String> {
    let rec = tmp.join("records.txt");
    let text: String = records.iter().map(|(k, v)| format!("{k}\t{v}\n")).collect();
    std::fs::write(&rec, text).unwrap();
    let script = tmp.join("verify.py");
    std::fs::write(&script, VERIFY_PY).unwrap();
    let out = Command::new("python3")
        .arg(&script)
        .arg(&rec)
        .args(files)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.stderr.is_empty() {
        eprintln!("verifier: {}", String::from_utf8_lossy(&out.stderr));
    }
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn signed_mail_verifies_with_dkimpy_and_tampered_mail_fails() {
    signed_mail_verifies("inline");
}

/// The same messages, signed on each shard's signing thread (`dkim.signer = "thread"`).
#[test]
fn signed_on_the_signing_thread_verifies_too() {
    signed_mail_verifies("thread");
}

/// The same messages with `dkim.signer = "auto"` (RSA on the thread while it keeps up).
#[test]
fn signed_in_auto_mode_verifies_too() {
    signed_mail_verifies("auto");
}

/// `GET path` on the metrics endpoint: the body.
fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    raw.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

fn signed_mail_verifies(mode: &str) {
    if !require(dkimpy_available(), "python3 with dkimpy and PyNaCl") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let keys = tmp.path().join("keys");
    std::fs::create_dir(&keys).unwrap();
    let (rsa, rsa_name, rsa_txt) = keygen(&keys, "rsa1", "rsa");
    let (ed, ed_name, ed_txt) = keygen(&keys, "ed1", "ed25519");
    let records = vec![(rsa_name, rsa_txt), (ed_name, ed_txt)];

    let dir = tmp.path().join("server");
    std::fs::create_dir(&dir).unwrap();
    let route = format!(
        r#"queue.routes={{"*"="maildir:{}/maildir"}}"#,
        dir.display()
    );
    let dkim_keys = format!(
        r#"dkim.keys=[{{domain="example.org",selector="rsa1",algorithm="rsa",key="{}"}},{{domain="example.org",selector="ed1",algorithm="ed25519",key="{}"}}]"#,
        rsa.display(),
        ed.display()
    );
    let s = Server::start(
        Some(&dir),
        &[
            &route,
            r#"relay.trusted_networks=["127.0.0.0/8"]"#,
            &dkim_keys,
            &format!(r#"dkim.signer="{mode}""#),
            r#"metrics.listen="127.0.0.1:0""#,
        ],
    );

    let long = "x".repeat(990);
    let messages: Vec<(&str, Vec<u8>)> = vec![
        (
            "whitespace",
            b"From: Sender <sender@example.org>\r\nTo: a@demo.test\r\nSubject:   spaced \t out  \r\n  and folded\r\nDate: Thu, 1 Jan 2026 00:00:00 +0000\r\nMessage-ID: <1@example.org>\r\n\r\ntrailing spaces   \r\ntrailing tab\t\r\n  inner   runs\t\tof   blanks\r\n\r\n\r\n\r\n"
                .to_vec(),
        ),
        (
            "long",
            format!("from: sender@EXAMPLE.org\r\nsubject: long\r\n\r\n{long}\r\n{long} \r\n").into_bytes(),
        ),
        (
            "eightbit",
            "From: sender@example.org\r\nSubject: 8bit\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\nGrüße aus Köln, ½ €\r\n"
                .as_bytes()
                .to_vec(),
        ),
        (
            "dots",
            b"From: sender@example.org\r\nSubject: dots\r\n\r\n.leading dot\r\n..two dots\r\n.\r\n. \r\nend\r\n".to_vec(),
        ),
        ("empty body", b"From: sender@example.org\r\nSubject: empty\r\n\r\n".to_vec()),
    ];
    let mut sent: Vec<Vec<u8>> = Vec::new();
    let mut c = s.smtp();
    c.ehlo("client.test");
    for (what, body) in &messages {
        assert!(no_bare_newlines(body), "{what}");
        let from = "sender@example.org";
        if *what == "eightbit" {
            c.expect(&format!("MAIL FROM:<{from}> BODY=8BITMIME"), 250, "2.1.0");
            c.expect("RCPT TO:<a@demo.test>", 250, "2.1.5");
            c.expect("DATA", 354, "");
            let mut wire = tern_tests::dot_stuff(body);
            wire.extend_from_slice(b".\r\n");
            c.send(&wire);
            c.read_reply().queued_id();
        } else {
            c.send_mail(from, &["a@demo.test"], body);
        }
        sent.push(body.clone());
    }
    // SMTPUTF8: a UTF-8 display name and subject.
    let utf8 = "From: \"Jörg Müller\" <sender@example.org>\r\nTo: a@demo.test\r\nSubject: Grüße ✓\r\n\r\nÜbermorgen.\r\n"
        .as_bytes()
        .to_vec();
    c.expect("MAIL FROM:<sender@example.org> SMTPUTF8", 250, "2.1.0");
    c.expect("RCPT TO:<a@demo.test>", 250, "2.1.5");
    c.expect("DATA", 354, "");
    let mut wire = utf8.clone();
    wire.extend_from_slice(b".\r\n");
    c.send(&wire);
    c.read_reply().queued_id();
    sent.push(utf8);
    // BDAT, in chunks that split the header section and the body mid-line.
    let bdat: &[u8] = b"From: sender@example.org\r\nSubj";
    let bdat2: &[u8] = b"ect: chunked\r\n\r\nfirst half of a li";
    let bdat3: &[u8] = b"ne   \r\n\r\n\r\n";
    c.expect("MAIL FROM:<sender@example.org>", 250, "2.1.0");
    c.expect("RCPT TO:<a@demo.test>", 250, "2.1.5");
    for (i, ch) in [bdat, bdat2, bdat3].iter().enumerate() {
        let last = if i == 2 { " LAST" } else { "" };
        let mut w = format!("BDAT {}{last}\r\n", ch.len()).into_bytes();
        w.extend_from_slice(ch);
        c.send(&w);
        c.read_reply().check(250, "2.0.0");
    }
    sent.push([bdat, bdat2, bdat3].concat());
    // Another From: domain: not signed.
    c.send_mail(
        "x@other.example",
        &["a@demo.test"],
        b"From: x@other.example\r\nSubject: unsigned\r\n\r\nhi\r\n",
    );
    c.quit();

    let n = sent.len() + 1;
    wait_for(
        "every message in the Maildir",
        Duration::from_secs(20),
        || delivered(&dir).len() >= n,
    );
    let files = delivered(&dir);
    let mut restored = Vec::new();
    for (path, lf) in &files {
        let m = crlf(lf);
        let p = tmp.path().join(format!(
            "{}.eml",
            path.file_name().unwrap().to_string_lossy()
        ));
        std::fs::write(&p, &m).unwrap();
        restored.push((p, m));
    }
    // Every message sent is, byte for byte, the end of one restored file.
    for body in &sent {
        assert!(
            restored.iter().any(|(_, m)| m.ends_with(body)),
            "not delivered verbatim: {}",
            String::from_utf8_lossy(body)
        );
    }
    let unsigned: Vec<_> = restored
        .iter()
        .filter(|(_, m)| tern_tests::find(m, b"Subject: unsigned").is_some())
        .collect();
    assert_eq!(unsigned.len(), 1);
    assert!(tern_tests::find(&unsigned[0].1, b"DKIM-Signature:").is_none());
    let signed: Vec<PathBuf> = restored
        .iter()
        .filter(|(_, m)| tern_tests::find(m, b"Subject: unsigned").is_none())
        .map(|(p, _)| p.clone())
        .collect();
    assert_eq!(signed.len(), sent.len());

    // Counted per algorithm, in the metrics and on the status page.
    let metrics = s.metrics.expect("metrics endpoint");
    let m = http_get(metrics, "/metrics");
    let total = |alg: &str| -> u64 {
        m.lines()
            .filter(|l| {
                l.starts_with("tern_dkim_signed_total{shard=\"total\"")
                    && l.contains(&format!("algorithm=\"{alg}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    assert_eq!(total("rsa"), sent.len() as u64, "{m}");
    assert_eq!(total("ed25519"), sent.len() as u64, "{m}");
    let page = http_get(metrics, "/");
    let row = format!("<tr><td class=l>rsa</td><td>{}</td></tr>", sent.len());
    assert!(page.contains(&row), "status page shows {row}: {page}");

    let lines = run_verifier(&records, &signed, tmp.path());
    assert_eq!(lines.len(), signed.len(), "{lines:?}");
    for l in &lines {
        let mut parts = l.split(' ');
        let _path = parts.next();
        assert_eq!(parts.next(), Some("2"), "two signatures: {l}");
        let mut res: Vec<&str> = parts.collect();
        res.sort();
        assert_eq!(res, ["ed25519-sha256=pass", "rsa-sha256=pass"], "{l}");
    }

    // Changed after signing: a word of the body, then a signed header. Both fail.
    let (_, m) = restored
        .iter()
        .find(|(_, m)| tern_tests::find(m, b"trailing spaces").is_some())
        .unwrap();
    let text = String::from_utf8(m.clone()).unwrap();
    let body_changed = tmp.path().join("tampered-body.eml");
    std::fs::write(
        &body_changed,
        text.replace("trailing spaces", "trailing spices"),
    )
    .unwrap();
    let subject_changed = tmp.path().join("tampered-subject.eml");
    std::fs::write(&subject_changed, text.replace("spaced", "spiced")).unwrap();
    let lines = run_verifier(&records, &[body_changed, subject_changed], tmp.path());
    for l in &lines {
        assert!(
            l.contains("rsa-sha256=fail") && l.contains("ed25519-sha256=fail"),
            "{l}"
        );
    }
    drop(s);
}

#[test]
fn only_the_configured_clients_are_signed_and_bad_keys_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (ed, _, _) = keygen(tmp.path(), "ed1", "ed25519");
    let dir = tmp.path().join("server");
    std::fs::create_dir(&dir).unwrap();
    let route = format!(
        r#"queue.routes={{"*"="maildir:{}/maildir"}}"#,
        dir.display()
    );
    let key = format!(
        r#"dkim.keys=[{{domain="example.org",selector="ed1",algorithm="ed25519",key="{}"}}]"#,
        ed.display()
    );
    // Trusted, but only authenticated mail is to be signed.
    let s = Server::start(
        Some(&dir),
        &[
            &route,
            r#"relay.trusted_networks=["127.0.0.0/8"]"#,
            &key,
            r#"dkim.sign=["authenticated"]"#,
        ],
    );
    let mut c = s.smtp();
    c.ehlo("client.test");
    c.send_mail(
        "sender@example.org",
        &["a@demo.test"],
        b"From: sender@example.org\r\nSubject: x\r\n\r\nx\r\n",
    );
    c.quit();
    wait_for("delivery", Duration::from_secs(20), || {
        !delivered(&dir).is_empty()
    });
    let (_, m) = &delivered(&dir)[0];
    assert!(tern_tests::find(m, b"DKIM-Signature:").is_none());
    drop(s);

    // check-config refuses a group-readable key, an unknown algorithm, a missing file.
    let check = |sets: &[String]| {
        let mut cmd = Command::new(tern_bin());
        cmd.arg("check-config");
        for s in sets {
            cmd.arg("--set").arg(s);
        }
        cmd.output().unwrap()
    };
    let ok = check(std::slice::from_ref(&key));
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    std::fs::set_permissions(&ed, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let bad = check(std::slice::from_ref(&key));
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("readable by group or others"));
    std::fs::set_permissions(&ed, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let bad = check(&[key.replace("ed25519\"", "dsa\"")]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("dsa"));
    let bad = check(&[key.replace(".pem", ".missing")]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains(".missing"));
}
