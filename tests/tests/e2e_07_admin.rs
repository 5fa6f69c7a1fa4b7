//! 07: the queue tools and `tern ctl`: live over the admin socket (list, show, hold,
//! release, flush, delete, stats; status, log-level, stop), offline on the spool after
//! the server is gone (list, show, stats, delete), offline changes refused while a server
//! runs, and a second server refused on a live socket. Mail stays deferred here: the
//! harness's next hop refuses connections.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use tern_tests::json::{self, Value};
use tern_tests::{tern_bin, Server};

fn sock(s: &Server) -> PathBuf {
    s.spool().join("admin.sock")
}

fn tern(args: &[&str]) -> Output {
    Command::new(tern_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running tern")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[track_caller]
fn ok(args: &[&str]) -> String {
    let o = tern(args);
    assert!(
        o.status.success(),
        "tern {args:?}: {}\nstdout: {}\nstderr: {}",
        o.status,
        stdout(&o),
        String::from_utf8_lossy(&o.stderr)
    );
    stdout(&o)
}

/// `tern queue list --json` with `mode` (`--socket P` or `--spool D`) and extra flags.
#[track_caller]
fn list(mode: &[&str], extra: &[&str]) -> Vec<Value> {
    let mut args = vec!["queue", "list", "--json"];
    args.extend_from_slice(mode);
    args.extend_from_slice(extra);
    ok(&args)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| json::parse(l).unwrap_or_else(|e| panic!("bad JSON {l:?}: {e}")))
        .collect()
}

fn ids(v: &[Value]) -> Vec<String> {
    let mut ids: Vec<String> = v
        .iter()
        .map(|i| i.get("id").unwrap().as_str().to_string())
        .collect();
    ids.sort();
    ids
}

fn flag(v: &Value, k: &str) -> bool {
    matches!(v.get(k), Some(Value::Bool(true)))
}

#[track_caller]
fn show(mode: &[&str], id: &str, extra: &[&str]) -> Value {
    let mut args = vec!["queue", "show", id, "--json"];
    args.extend_from_slice(mode);
    args.extend_from_slice(extra);
    json::parse(ok(&args).trim()).unwrap()
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}");
}

/// A relay trusting loopback (any domain is accepted and stays deferred), with two
/// messages queued: (id of alice → bob@localhost, id of carol → dan@other.test).
fn server_with_two() -> (Server, String, String) {
    let s = Server::with(&[r#"relay.trusted_networks=["127.0.0.0/8"]"#]);
    let mut c = s.smtp();
    c.ehlo("client.test");
    let a = c.send_mail(
        "alice@example.org",
        &["bob@localhost"],
        b"Subject: one\r\n\r\nfirst body\r\n",
    );
    let b = c.send_mail(
        "carol@example.net",
        &["dan@other.test", "erin@Other.Test"],
        b"Subject: two\r\n\r\nsecond body\r\n",
    );
    c.quit();
    (s, a, b)
}

#[test]
fn live_queue_tools() {
    let (s, a, b) = server_with_two();
    let path = sock(&s);
    let p = path.to_str().unwrap();
    let live = ["--socket", p];

    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "admin socket mode");

    // list and its filters
    let all = list(&live, &[]);
    assert_eq!(ids(&all), {
        let mut v = vec![a.clone(), b.clone()];
        v.sort();
        v
    });
    assert_eq!(ids(&list(&live, &["--from", "ALICE@"])), vec![a.clone()]);
    assert_eq!(
        ids(&list(&live, &["--from", "nobody"])),
        Vec::<String>::new()
    );
    assert_eq!(
        ids(&list(&live, &["--to-domain", "other.test"])),
        vec![b.clone()]
    );
    assert!(list(&live, &["--older-than", "1h"]).is_empty());
    assert_eq!(list(&live, &["--older-than", "0s"]).len(), 2);
    assert!(list(&live, &["--state", "held"]).is_empty());
    let bi = all
        .iter()
        .find(|i| i.get("id").unwrap().as_str() == b)
        .unwrap();
    assert_eq!(bi.get("sender").unwrap().as_str(), "carol@example.net");
    assert_eq!(bi.get("recipients").unwrap().as_array().len(), 2);

    // people's columns
    let cols = ok(&["queue", "list", "--socket", p]);
    assert!(
        cols.contains(&a) && cols.contains("-- 2 message(s)"),
        "{cols}"
    );

    // hold / show / release (the CLI retries while a message is being tried)
    ok(&["queue", "hold", &a, "--socket", p]);
    assert_eq!(ids(&list(&live, &["--state", "held"])), vec![a.clone()]);
    let sh = show(&live, &a, &["--body"]);
    assert!(flag(&sh, "held"));
    assert_eq!(sh.get("state").unwrap().as_str(), "held");
    assert_eq!(sh.get("sender").unwrap().as_str(), "alice@example.org");
    assert!(sh.get("body").unwrap().as_str().contains("first body"));
    let rc = sh.get("all_recipients").unwrap().as_array();
    assert_eq!(rc[0].get("addr").unwrap().as_str(), "bob@localhost");
    assert_eq!(rc[0].get("state").unwrap().as_str(), "pending");
    assert!(ok(&["queue", "show", &a, "--socket", p]).contains("state:        held"));
    ok(&["queue", "release", &a, "--socket", p]);
    assert!(!flag(&show(&live, &a, &[]), "held"));
    assert!(list(&live, &["--state", "held"]).is_empty());

    // flush (all, and by domain)
    assert!(ok(&["queue", "flush", "--socket", p]).contains("to be tried now"));
    ok(&["queue", "flush", "other.test", "--socket", p]);

    // stats
    let st = json::parse(ok(&["queue", "stats", "--json", "--socket", p]).trim()).unwrap();
    assert_eq!(st.get("messages").unwrap().as_u64(), 2);
    assert_eq!(st.get("recipients").unwrap().as_u64(), 3);
    assert!(st.get("bytes").unwrap().as_u64() > 0);
    let d = st.get("domains").unwrap();
    assert_eq!(d.get("other.test").unwrap().as_u64(), 2);
    assert_eq!(d.get("localhost").unwrap().as_u64(), 1);

    // delete by domain, then by id; no bounce is queued for either
    ok(&[
        "queue",
        "delete",
        "--to-domain",
        "other.test",
        "--socket",
        p,
    ]);
    assert_eq!(ids(&list(&live, &[])), vec![a.clone()]);
    ok(&["queue", "delete", &a, "--socket", p]);
    // The answer comes after the shards recorded (and logged) the deletions: a DSN for
    // them would have been queued by then.
    // (The log reaches us through a pipe: wait for those lines.)
    wait_for("both deletions in the log", || {
        let log = s.stderr_log();
        [&a, &b].iter().all(|id| {
            log.lines().any(|l| {
                l.contains("changed by the administrator")
                    && l.contains("Delete")
                    && l.contains(id.as_str())
            })
        })
    });
    let log = s.stderr_log();
    assert!(!log.contains("DSN queued"), "{log}");
    assert!(list(&live, &[]).is_empty(), "deleted without bounces");
    assert!(list(&["--spool", s.spool().to_str().unwrap()], &[]).is_empty());

    // unknown id
    let o = tern(&["queue", "show", "NOSUCHID", "--socket", p]);
    assert_eq!(o.status.code(), Some(66), "show of a missing id");
    let o = tern(&["queue", "hold", "NOSUCHID", "--socket", p]);
    assert_eq!(o.status.code(), Some(66), "hold of a missing id");
}

#[test]
fn offline_tools_and_the_lock() {
    let (mut s, a, b) = server_with_two();
    let spool = s.spool();
    let d = spool.to_str().unwrap().to_string();
    let p = sock(&s).to_str().unwrap().to_string();
    ok(&["queue", "hold", &b, "--socket", &p]);

    // While the server runs, offline changes are refused (the shard lock) ...
    let o = tern(&["queue", "delete", &a, "--spool", &d]);
    assert_eq!(o.status.code(), Some(75));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("running server"), "{err}");
    // ... and offline reading works, held flag included.
    let off = ["--spool", d.as_str()];
    assert_eq!(ids(&list(&off, &["--state", "held"])), vec![b.clone()]);
    // flush has nothing to do offline
    let o = tern(&["queue", "flush", "--spool", &d]);
    assert_eq!(o.status.code(), Some(69));

    s.kill9();
    // The server is gone: offline reading still shows every message, held flag included.
    let all = list(&off, &[]);
    assert_eq!(all.len(), 2);
    let sh = show(&off, &b, &["--body"]);
    assert!(flag(&sh, "held"));
    assert!(sh.get("body").unwrap().as_str().contains("second body"));
    let st = json::parse(ok(&["queue", "stats", "--json", "--spool", &d]).trim()).unwrap();
    assert_eq!(st.get("messages").unwrap().as_u64(), 2);
    assert_eq!(st.get("held").unwrap().as_u64(), 1);

    // Offline changes work once the server is gone.
    ok(&["queue", "delete", &a, "--spool", &d]);
    ok(&["queue", "release", &b, "--spool", &d]);
    assert_eq!(ids(&list(&off, &[])), vec![b.clone()]);
    assert!(list(&off, &["--state", "held"]).is_empty());
    let o = tern(&["queue", "delete", "NOSUCHID", "--spool", &d]);
    assert_eq!(o.status.code(), Some(66));

    // The restarted server (stale socket removed) agrees.
    s.restart();
    let p = sock(&s).to_str().unwrap().to_string();
    let live = list(&["--socket", &p], &[]);
    assert_eq!(ids(&live), vec![b.clone()]);
    assert!(!flag(&live[0], "held"));
}

#[test]
fn ctl_status_log_level_stop() {
    let mut s = Server::with(&[]);
    let p = sock(&s).to_str().unwrap().to_string();

    let st = json::parse(ok(&["ctl", "status", "--json", "--socket", &p]).trim()).unwrap();
    assert_eq!(st.get("shards").unwrap().as_array().len(), s.shards);
    let text = ok(&["ctl", "status", "--socket", &p]);
    assert!(text.contains(&format!("{} shards", s.shards)), "{text}");

    // A second server on the same directory is refused: the socket answers.
    let mut second = Command::new(tern_bin())
        .args(["demo", "--dir"])
        .arg(s.dir())
        .args([
            "--set",
            "shards=1",
            "--set",
            "executor.ring_depth=64",
            "--set",
            r#"listeners.smtp=["127.0.0.1:0"]"#,
            "--set",
            r#"listeners.submission=["127.0.0.1:0"]"#,
            "--set",
            r#"listeners.smtps=["127.0.0.1:0"]"#,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(st) = second.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > Duration::from_secs(30) {
            let _ = second.kill();
            panic!("a second server on the same admin socket started");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success());
    let mut err = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut err).unwrap();
    assert!(err.contains("another server answers"), "{err}");
    // ... and the first one's socket is intact.
    ok(&["ctl", "status", "--socket", &p]);

    assert!(!s.stderr_log().contains("DEBUG"));
    ok(&["ctl", "log-level", "debug", "--socket", &p]);
    ok(&["ctl", "status", "--socket", &p]);
    wait_for("debug lines in the log", || {
        s.stderr_log().contains("DEBUG")
    });
    let o = tern(&["ctl", "log-level", "no=such=level", "--socket", &p]);
    assert!(!o.status.success());

    ok(&["ctl", "reload", "--socket", &p]);
    ok(&["ctl", "stop", "--socket", &p]);
    let st = s.wait(Duration::from_secs(30));
    assert!(st.success(), "server exit status after ctl stop: {st}");
    assert!(!sock(&s).exists(), "socket removed at exit");
    let o = tern(&["ctl", "status", "--socket", &p]);
    assert_eq!(o.status.code(), Some(69), "no server");
}
