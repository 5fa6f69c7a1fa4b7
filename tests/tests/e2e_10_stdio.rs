//! 10: local submission without a socket. `tern stdio` runs one SMTP session on pipes
//! (sendmail -bs) and `tern sendmail` reads a message on stdin; both queue the message
//! through a running server (admin `submit`) or, with no server, straight into the spool,
//! where the next server start finds it.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use tern_tests::{find, tern_bin, Server};

/// The harness's shard count, so that a direct spool write lands where the server looks.
const SETS: &[&str] = &["--set", "shards=2"];

fn run(dir: &Path, args: &[&str], input: &[u8]) -> Output {
    // The subcommand, then tern's options, then the subcommand's own (sendmail's).
    let mut child = Command::new(tern_bin())
        .arg(args[0])
        .arg("--demo-dir")
        .arg(dir)
        .args(SETS)
        .args(&args[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning tern");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input)
        .expect("writing stdin");
    child.wait_with_output().expect("waiting for tern")
}

/// A full transaction on `tern stdio`; returns the queue id from the 250 reply.
fn stdio_transaction(dir: &Path, rcpt: &str) -> String {
    let input = format!(
        "EHLO client.test\r\nMAIL FROM:<a@client.test>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n\
         Subject: via stdio\r\n\r\nhello over pipes\r\n..dot\r\n.\r\nQUIT\r\n"
    );
    let out = run(dir, &["stdio"], input.as_bytes());
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "tern stdio: {}\nstdout:\n{text}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let codes: Vec<&str> = text
        .lines()
        .filter(|l| l.as_bytes().get(3) == Some(&b' '))
        .map(|l| &l[..3])
        .collect();
    // Greeting, EHLO, MAIL, RCPT, DATA, end of data, QUIT.
    assert_eq!(
        codes,
        ["220", "250", "250", "250", "354", "250", "221"],
        "{text}"
    );
    assert!(
        !text.contains("STARTTLS"),
        "STARTTLS offered on stdio: {text}"
    );
    text.lines()
        .find_map(|l| l.split("queued as ").nth(1))
        .map(|id| id.trim().to_string())
        .unwrap_or_else(|| panic!("no queue id in {text}"))
}

#[test]
fn stdio_with_a_running_server_submits_live() {
    let s = Server::with(&[]);
    let id = stdio_transaction(s.dir(), "u@demo.test");
    let q = s.queue_list();
    let e = q
        .iter()
        .find(|e| e.id == id)
        .unwrap_or_else(|| panic!("{id} not queued: {q:?}"));
    assert_eq!(e.sender, "a@client.test");
    assert_eq!(e.recipients, ["u@demo.test"]);
    let m = s.stored_by_id(&id);
    let (received, content) = m.split_received();
    assert!(received.contains(&format!("id {id}")), "{received}");
    assert!(received.contains("from client.test"), "{received}");
    assert_eq!(
        content,
        b"Subject: via stdio\r\n\r\nhello over pipes\r\n.dot\r\n"
    );
    // The server took it (its log), not a direct spool write.
    assert!(
        s.stderr_log().contains("submitted on the admin socket"),
        "{}",
        s.stderr_log()
    );
}

#[test]
fn stdio_without_a_server_writes_the_spool_and_the_server_recovers_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let id = stdio_transaction(tmp.path(), "u@demo.test");
    let s = Server::start(Some(tmp.path()), &[]);
    let q = s.queue_list();
    assert!(q.iter().any(|e| e.id == id), "{id} not listed: {q:?}");
    // The running server recovered it into its runner: it lists it live.
    let live = Command::new(tern_bin())
        .args(["queue", "list", "--json", "--socket"])
        .arg(s.spool().join("admin.sock"))
        .output()
        .expect("tern queue list --socket");
    let live = String::from_utf8_lossy(&live.stdout);
    assert!(live.contains(&id), "{id} not in the live listing: {live}");
    let m = s.stored_by_id(&id);
    assert_eq!(m.recipients, ["u@demo.test"]);
}

#[test]
fn sendmail_t_takes_header_recipients_and_drops_bcc() {
    let s = Server::with(&[]);
    let msg = b"To: Ann <ann@demo.test>\nBcc: hidden@demo.test\nSubject: cron\n\nline 1\n.\nnot part of it\n";
    let out = run(s.dir(), &["sendmail", "-t", "-f", "cron@demo.test"], msg);
    assert!(
        out.status.success(),
        "tern sendmail -t: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let m = s
        .stored()
        .into_iter()
        .find(|m| m.sender == "cron@demo.test")
        .expect("the message is queued");
    let mut r = m.recipients.clone();
    r.sort();
    assert_eq!(r, ["ann@demo.test", "hidden@demo.test"]);
    let c = m.content();
    assert!(find(c, b"Bcc").is_none(), "{}", String::from_utf8_lossy(c));
    assert!(
        find(c, b"hidden").is_none(),
        "{}",
        String::from_utf8_lossy(c)
    );
    assert!(find(c, b"not part of it").is_none());
    for h in [
        &b"\r\nDate: "[..],
        b"\r\nMessage-ID: <",
        b"\r\nFrom: cron@demo.test\r\n",
    ] {
        assert!(find(c, h).is_some(), "{}", String::from_utf8_lossy(c));
    }
    assert!(c.ends_with(b"\r\n\r\nline 1\r\n"));
}

#[test]
fn sendmail_without_recipients_exits_65() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = run(
        tmp.path(),
        &["sendmail", "-t"],
        b"Subject: nobody\n\nbody\n",
    );
    assert_eq!(out.status.code(), Some(65), "{:?}", out);
    let out = run(tmp.path(), &["sendmail", "-q"], b"");
    assert_eq!(out.status.code(), Some(64), "{:?}", out);
}

#[test]
fn installed_as_sendmail_it_behaves_as_tern_sendmail() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let link = tmp.path().join("sendmail");
    std::os::unix::fs::symlink(tern_bin(), &link).expect("symlink");
    let spool = tmp.path().join("spool");
    let conf = tmp.path().join("tern.toml");
    std::fs::write(
        &conf,
        format!(
            "hostname = \"box.test\"\nshards = 2\n[spool]\ndir = \"{}\"\n",
            spool.display()
        ),
    )
    .expect("config");
    let mut child = Command::new(&link)
        .args(["-oi", "-F", "Cron Daemon", "root@example.net"])
        .env("TERN_CONFIG", &conf)
        .env("USER", "cronuser")
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning sendmail");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"Subject: nightly\n\n.\nstill the body\n")
        .expect("writing stdin");
    let out = child.wait_with_output().expect("sendmail");
    assert!(out.status.success(), "{out:?}");
    let msgs = tern_queue::scan_spool(&spool).expect("scan_spool");
    assert_eq!(msgs.len(), 1);
    let e = &msgs[0].envelope;
    assert_eq!(e.sender, "cronuser@box.test");
    assert_eq!(e.recipients[0].addr, "root@example.net");
    let body = tern_queue::read_body(&spool, msgs[0].shard, msgs[0].segment, msgs[0].offset)
        .expect("body");
    // -oi: the lone "." is text (dot-stuffed on the way in, unstuffed by the session).
    assert!(find(&body, b"\r\n\r\n.\r\nstill the body\r\n").is_some());
    assert!(find(&body, b"From: \"Cron Daemon\" <cronuser@box.test>\r\n").is_none());
    assert!(find(&body, b"From: Cron Daemon <cronuser@box.test>\r\n").is_some());
}
