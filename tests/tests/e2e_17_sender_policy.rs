//! e2e 17: sender authorization (`auth.sender_policy = "own"`, `auth.sender_map`,
//! `auth.check_header_from`) on a real server: what an authenticated login may use as
//! MAIL FROM and From:, the sender map reloaded when its file changes (a broken map keeps
//! the previous one), SIGHUP, and the refusal's log line and counter.

use std::time::Duration;

use tern_tests::{wait_for, Client, Server, TlsVersion};

/// An authenticated submission session (demo/demo, PLAIN under STARTTLS), EHLO done.
fn authed(s: &Server) -> Client {
    let mut c = Client::connect(s.submission);
    c.expect_greeting();
    c.ehlo("client.test");
    c.starttls(&s.cert(), TlsVersion::Any);
    c.ehlo("client.test");
    c.expect("AUTH PLAIN AGRlbW8AZGVtbw==", 235, "2.7.0");
    c
}

/// The reply to `MAIL FROM:<from>` in a fresh authenticated session.
fn mail_from(s: &Server, from: &str) -> String {
    let mut c = authed(s);
    c.send(format!("MAIL FROM:<{from}>\r\n").as_bytes());
    let r = c.read_reply();
    let line = format!("{} {}", r.code, r.text());
    c.send(b"QUIT\r\n");
    line
}

#[test]
fn own_senders_map_reload_and_header_from() {
    let dir = tempfile::tempdir().expect("tempdir");
    let map = dir.path().join("senders");
    std::fs::write(&map, "shared@example.org demo\n@team.example demo\n").unwrap();
    let s = Server::with(&[
        r#"auth.sender_policy="own""#,
        &format!("auth.sender_map={:?}", map.display().to_string()),
        "auth.check_header_from=true",
        r#"auth.realm="example.org""#,
    ]);
    // login@realm, map entries by address and by domain, and <>.
    for from in [
        "demo@example.org",
        "shared@example.org",
        "anyone@team.example",
        "",
    ] {
        assert_eq!(mail_from(&s, from), "250 2.1.0 Ok", "{from:?}");
    }
    assert_eq!(
        mail_from(&s, "ceo@example.org"),
        "553 5.7.1 <ceo@example.org>: sender address not owned by user demo"
    );
    // Unauthenticated sessions are unaffected (port 25, not relaying).
    let mut c = Client::connect(s.smtp);
    c.expect_greeting();
    c.ehlo("client.test");
    c.expect("MAIL FROM:<ceo@example.org>", 250, "2.1.0");
    c.send(b"QUIT\r\n");

    // The From: header of an authenticated message follows the same rule.
    let mut c = authed(&s);
    c.expect("MAIL FROM:<demo@example.org>", 250, "2.1.0");
    c.expect("RCPT TO:<postmaster@localhost>", 250, "2.1.5");
    c.expect("DATA", 354, "");
    c.send(b"From: \"demo@example.org\" <ceo@example.org>\r\nSubject: x\r\n\r\nhi\r\n.\r\n");
    c.read_reply().check(
        550,
        "5.7.1 <ceo@example.org>: sender address not owned by user demo",
    );
    c.send(b"QUIT\r\n");
    wait_for("the NOQUEUE line", Duration::from_secs(5), || {
        s.stderr_log()
            .contains("NOQUEUE: reject: DATA from [127.0.0.1]")
    });

    // The map is reloaded when its file changes: the grant goes away...
    std::fs::write(&map, "@team.example demo\n").unwrap();
    wait_for("the map reload", Duration::from_secs(10), || {
        mail_from(&s, "shared@example.org").starts_with("553 5.7.1")
    });
    assert_eq!(mail_from(&s, "anyone@team.example"), "250 2.1.0 Ok");
    // ...a map that does not parse is refused and the previous one stays in force...
    std::fs::write(&map, "this line has no login\n").unwrap();
    wait_for("the refusal in the log", Duration::from_secs(10), || {
        s.stderr_log()
            .contains("sender map changed but does not load; keeping the previous one")
    });
    assert_eq!(mail_from(&s, "anyone@team.example"), "250 2.1.0 Ok");
    // ...and a good one takes effect again, also through SIGHUP.
    std::fs::write(&map, "shared@example.org demo\n").unwrap();
    s.sighup();
    wait_for("the new grant", Duration::from_secs(10), || {
        mail_from(&s, "shared@example.org") == "250 2.1.0 Ok"
    });
}

/// Per-login sending rates, counted across shards: connections that land on different
/// shards (SO_REUSEPORT spreads them) share one count; over it MAIL gets 450 4.7.1 and RCPT
/// 452 4.5.3 (never a 5xx); `tern ctl limits` shows the count.
#[test]
fn user_rates_are_shared_by_all_shards() {
    let s = Server::with(&[
        r#"auth.user_message_rate="4/1h""#,
        r#"auth.user_recipient_rate="6/1h""#,
    ]);
    assert_eq!(s.shards, 2);
    // Recipients: 6 in the window, the 7th is a temporary refusal.
    let mut c = authed(&s);
    c.expect("MAIL FROM:<demo@example.org>", 250, "2.1.0");
    for i in 0..6 {
        c.expect(&format!("RCPT TO:<r{i}@example.net>"), 250, "2.1.5");
    }
    c.expect(
        "RCPT TO:<r6@example.net>",
        452,
        "4.5.3 Error: too many recipients from user demo",
    );
    c.send(b"QUIT\r\n");
    // Messages: 4 in the window (one used above), whichever shard a session lands on.
    let mut replies = Vec::new();
    for _ in 0..12 {
        replies.push(mail_from(&s, "demo@example.org"));
    }
    let ok = replies.iter().filter(|r| *r == "250 2.1.0 Ok").count();
    let limited = replies
        .iter()
        .filter(|r| r.starts_with("450 4.7.1 Error: too many messages from user demo"))
        .count();
    assert_eq!((ok, limited), (3, 9), "{replies:?}");
    // The sessions were served by both shards (else this proves nothing about sharing).
    let log = s.stderr_log();
    let shards: std::collections::BTreeSet<&str> = log
        .lines()
        .filter(|l| l.contains("auth ok:"))
        .filter_map(|l| l.split("shard=").nth(1))
        .map(|t| t.split_whitespace().next().unwrap_or(""))
        .collect();
    assert!(shards.len() == 2, "all sessions on one shard: {shards:?}");
    let out = std::process::Command::new(tern_tests::tern_bin())
        .args(["ctl", "limits", "demo", "--socket"])
        .arg(s.spool().join("admin.sock"))
        .output()
        .expect("tern ctl limits");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("message rate 4/1h"), "{text}");
    let row = text.lines().find(|l| l.starts_with("demo")).unwrap_or("");
    assert_eq!(row.split_whitespace().nth(1), Some("4"), "{text}");
}

/// A user's own rate in the user store (`tern passwd --message-rate`) overrides the global
/// one, and takes effect when the running server reloads the store.
#[test]
fn a_users_own_rate_overrides_the_global_one() {
    let s = Server::with(&[r#"auth.user_message_rate="1/1h""#]);
    let users = s.dir().join("users.db");
    let text = std::fs::read_to_string(&users).expect("users.db");
    let id = text
        .lines()
        .find(|l| l.starts_with("demo@"))
        .and_then(|l| l.split(' ').next())
        .expect("the demo user")
        .to_string();
    let out = std::process::Command::new(tern_tests::tern_bin())
        .args(["passwd", "-f"])
        .arg(&users)
        .args([id.as_str(), "--message-rate", "4/1h"])
        .output()
        .expect("tern passwd");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // `ctl reload` hands the new store to every shard before it answers, and `ctl status`
    // travels the same per-shard channels after it: once both answered, every shard has
    // the override (no waiting on a log line that precedes the hand-over).
    let ctl = |cmd: &str| {
        let out = std::process::Command::new(tern_tests::tern_bin())
            .args(["ctl", cmd, "--socket"])
            .arg(s.spool().join("admin.sock"))
            .output()
            .expect("tern ctl");
        assert!(
            out.status.success(),
            "ctl {cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ctl("reload");
    ctl("status");
    let replies: Vec<String> = (0..6).map(|_| mail_from(&s, "demo@example.org")).collect();
    let ok = replies.iter().filter(|r| *r == "250 2.1.0 Ok").count();
    assert_eq!(ok, 4, "{replies:?}");
}
