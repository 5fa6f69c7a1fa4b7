//! e2e 23: shared counters in Redis (`[cluster] redis`). A real `redis-server` (Debian's
//! package) started by the test on a port of its own, and TWO tern nodes on this machine
//! sharing it:
//! - failed AUTHs from one client address, spread over both nodes, trip the block on both
//!   (each node saw fewer than the limit: its own anvil would not have); another client
//!   address is not blocked; the Redis password never shows (logs, status, check-config,
//!   features) and every `tern_cluster_*` series the alert rules name is exported;
//! - failed AUTHs as one login from two addresses over both nodes block that login on both
//!   (`auth.login_failure_limit`), with the same 454 for a right and a wrong password;
//! - a login's message rate is counted across both nodes: once the first node used the
//!   budget, the second answers 450 4.7.1 without having counted anything itself;
//! - the recipient rate likewise (452 4.5.3 at RCPT on the second node);
//! - Redis stopped mid-test: AUTH still works, each node counts locally (its own limit
//!   blocks again), the metrics say so (`tern_cluster_redis_up 0`, a fallback counted);
//!   Redis back: both nodes recover by themselves and count across the cluster again.

use std::io::{Read, Write};
use std::net::{IpAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tern_tests::{free_port, require_tool, tern_bin, wait_for, Client, Server};

/// A redis-server of the test's own: no persistence, its files in a temporary directory,
/// killed on drop.
struct Redis {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    /// `requirepass`, when the test wants one.
    password: Option<&'static str>,
}

impl Redis {
    fn start() -> Redis {
        Redis::start_with(None)
    }

    fn start_with(password: Option<&'static str>) -> Redis {
        let mut r = Redis {
            child: None,
            port: free_port(),
            dir: tempfile::tempdir().expect("tempdir"),
            password,
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new("redis-server");
        if let Some(p) = self.password {
            cmd.args(["--requirepass", p]);
        }
        let child = cmd
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let port = self.port;
        wait_for(
            "redis-server to answer PING",
            Duration::from_secs(20),
            || ping(port),
        );
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        match self.password {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

fn ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut buf = [0u8; 16];
    // With requirepass, an unauthenticated PING gets -NOAUTH: the server is up all the same.
    s.write_all(b"PING\r\n").is_ok()
        && s.read(&mut buf)
            .is_ok_and(|n| buf[..n].starts_with(b"+PONG") || buf[..n].starts_with(b"-NOAUTH"))
}

/// A node sharing `redis`, with the test's AUTH limits (PLAIN without TLS: the
/// exchange, not TLS, is under test; no tarpit; one failure per session).
fn node(redis: &str, extra: &[&str]) -> Server {
    let url = format!(r#"cluster.redis="{redis}""#);
    let mut sets: Vec<&str> = vec![
        &url,
        r#"metrics.listen="127.0.0.1:0""#,
        "auth.allow_plaintext_without_tls=true",
        r#"auth.tarpit="0s""#,
        "auth.ip_failure_limit=4",
    ];
    sets.extend_from_slice(extra);
    let s = Server::with(&sets);
    assert!(s.metrics.is_some(), "no metrics endpoint printed");
    s
}

const GOOD: &str = "AUTH PLAIN AGRlbW8AZGVtbw=="; // \0demo\0demo
const BAD: &str = "AUTH PLAIN AGRlbW8Ad3Jvbmc="; // \0demo\0wrong

/// One AUTH from `src` to `s`: the reply code.
fn auth_from(s: &Server, src: &str, line: &str) -> u16 {
    let src: IpAddr = src.parse().unwrap();
    let mut c = Client::connect_from(src, s.submission);
    c.expect_greeting();
    c.ehlo("client.test");
    let code = c.cmd(line).code;
    c.send(b"QUIT\r\n");
    code
}

/// The value of an unlabelled series on a node's /metrics.
fn metric(s: &Server, name: &str) -> Option<f64> {
    tern_tests::metric_value(s.metrics?, name)
}

fn ctl(s: &Server, args: &[&str]) -> String {
    let out = Command::new(tern_bin())
        .arg("ctl")
        .args(args)
        .arg("--socket")
        .arg(admin(s.spool()))
        .output()
        .expect("tern ctl");
    assert!(out.status.success(), "tern ctl {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn admin(spool: PathBuf) -> PathBuf {
    spool.join("admin.sock")
}

fn local_block_logged(s: &Server) -> bool {
    s.stderr_log()
        .contains("too many failed AUTH attempts: blocking AUTH from this address")
}

fn skip() -> bool {
    !require_tool("redis-server")
}

#[test]
fn failed_auths_over_two_nodes_block_the_address_on_both() {
    if skip() {
        return;
    }
    // With a password: it never shows (logs, status, check-config, features).
    const PW: &str = "s3cret-Pw";
    let redis = Redis::start_with(Some(PW));
    let (a, b) = (node(&redis.url(), &[]), node(&redis.url(), &[]));
    for s in [&a, &b] {
        wait_for("the node to reach Redis", Duration::from_secs(20), || {
            metric(s, "tern_cluster_redis_up") == Some(1.0)
        });
    }
    // Two failures on each node: 4 for the cluster, 2 for either node (limit 4).
    for s in [&a, &b, &a, &b] {
        assert_eq!(auth_from(s, "127.0.0.3", BAD), 535);
    }
    // The block reaches both nodes (the right password is refused too, and a probe with
    // it counts nothing).
    for s in [&a, &b] {
        wait_for(
            "the cluster block on this node",
            Duration::from_secs(10),
            || auth_from(s, "127.0.0.3", GOOD) == 454,
        );
    }
    // Neither node's own anvil blocked: it was the cluster's count.
    assert!(!local_block_logged(&a) && !local_block_logged(&b));
    let log = format!("{}{}", a.stderr_log(), b.stderr_log());
    assert!(
        log.contains("too many failed AUTH attempts across the cluster"),
        "{log}"
    );
    // Another address is not blocked, on either node.
    assert_eq!(auth_from(&a, "127.0.0.4", GOOD), 235);
    assert_eq!(auth_from(&b, "127.0.0.4", GOOD), 235);
    // Every tern_cluster_* series the alert rules name is one these nodes export.
    let rules = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../packaging/prometheus/tern-alerts.yml"),
    )
    .expect("alert rules");
    let named: Vec<&str> = rules
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("tern_cluster_"))
        .collect();
    assert!(!named.is_empty());
    for n in named {
        assert!(metric(&a, n).is_some(), "{n} is not exported");
    }
    // The state is visible, the password is not.
    let shown = format!("redis://:***@127.0.0.1:{}", redis.port);
    let st = ctl(&a, &["status"]);
    assert!(st.contains(&format!("cluster: redis {shown} up")), "{st}");
    let set = format!(r#"cluster.redis="{}""#, redis.url());
    for cmd in ["check-config", "features"] {
        let out = Command::new(tern_bin())
            .args([cmd, "--set", &set])
            .output()
            .expect("tern");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains(&shown),
            "{cmd}: {out:?}"
        );
        assert!(!text.contains(PW), "{cmd}: {text}");
    }
    for s in [&a, &b] {
        let log = s.stderr_log();
        assert!(log.contains(&shown) && !log.contains(PW), "{log}");
    }
}

/// `auth.login_failure_limit`: failures as one login from two addresses on two nodes
/// block the login everywhere (454 even with the right password, from a third address);
/// another login is unaffected.
#[test]
fn failed_auths_as_one_login_block_it_on_every_node() {
    if skip() {
        return;
    }
    let redis = Redis::start();
    let extra = ["auth.login_failure_limit=4", "auth.ip_failure_limit=100"];
    let (a, b) = (node(&redis.url(), &extra), node(&redis.url(), &extra));
    for s in [&a, &b] {
        wait_for("the node to reach Redis", Duration::from_secs(20), || {
            metric(s, "tern_cluster_redis_up") == Some(1.0)
        });
    }
    for (s, src) in [
        (&a, "127.0.0.7"),
        (&b, "127.0.0.8"),
        (&a, "127.0.0.8"),
        (&b, "127.0.0.7"),
    ] {
        assert_eq!(auth_from(s, src, BAD), 535);
    }
    for s in [&a, &b] {
        wait_for(
            "the login block on this node",
            Duration::from_secs(10),
            || auth_from(s, "127.0.0.9", GOOD) == 454,
        );
    }
    // The reply to a wrong password is the same 454: no oracle.
    assert_eq!(auth_from(&a, "127.0.0.9", BAD), 454);
    // Another login (unknown: 535) is not blocked, and the addresses are not.
    assert_eq!(auth_from(&b, "127.0.0.7", "AUTH PLAIN AGJvYgB4"), 535);
}

#[test]
fn a_login_message_rate_is_counted_across_nodes() {
    if skip() {
        return;
    }
    let redis = Redis::start();
    let rate = r#"auth.user_message_rate="3/1h""#;
    let (a, b) = (node(&redis.url(), &[rate]), node(&redis.url(), &[rate]));
    for s in [&a, &b] {
        wait_for("the node to reach Redis", Duration::from_secs(20), || {
            metric(s, "tern_cluster_redis_up") == Some(1.0)
        });
    }
    let mail = |s: &Server| {
        let mut c = Client::connect(s.submission);
        c.expect_greeting();
        c.ehlo("client.test");
        c.expect(GOOD, 235, "2.7.0");
        let r = c.cmd("MAIL FROM:<demo@example.org>");
        c.send(b"QUIT\r\n");
        format!("{} {}", r.code, r.text())
    };
    for _ in 0..3 {
        assert_eq!(mail(&a), "250 2.1.0 Ok");
    }
    // The budget is used on node a; node b learns it from Redis.
    wait_for(
        "node b to see demo over its message rate",
        Duration::from_secs(10),
        || ctl(&b, &["limits", "demo"]).contains("over message rate"),
    );
    let text = ctl(&b, &["limits", "demo"]);
    let row = text.lines().find(|l| l.starts_with("demo")).unwrap_or("");
    // Node b counted nothing itself; only the cluster says the login is over, and the
    // cluster's count (in Redis) is node a's three.
    assert_eq!(row.split_whitespace().nth(1), Some("0"), "{text}");
    assert_eq!(row.split_whitespace().nth(3), Some("3/0"), "{text}");
    assert!(row.contains("over message rate"), "{text}");
    let r = mail(&b);
    assert!(
        r.starts_with("450 4.7.1 Error: too many messages from user demo"),
        "{r}"
    );
}

/// The recipient rate likewise: node a adds the login's four recipients, node b refuses
/// the fifth at RCPT with 452 4.5.3 (and still takes the MAIL).
#[test]
fn a_login_recipient_rate_is_counted_across_nodes() {
    if skip() {
        return;
    }
    let redis = Redis::start();
    let rate = r#"auth.user_recipient_rate="4/1h""#;
    let (a, b) = (node(&redis.url(), &[rate]), node(&redis.url(), &[rate]));
    for s in [&a, &b] {
        wait_for("the node to reach Redis", Duration::from_secs(20), || {
            metric(s, "tern_cluster_redis_up") == Some(1.0)
        });
    }
    let session = |s: &Server| {
        let mut c = Client::connect(s.submission);
        c.expect_greeting();
        c.ehlo("client.test");
        c.expect(GOOD, 235, "2.7.0");
        c.expect("MAIL FROM:<demo@example.org>", 250, "2.1.0");
        c
    };
    let mut c = session(&a);
    for i in 0..4 {
        c.expect(&format!("RCPT TO:<r{i}@example.net>"), 250, "2.1.5");
    }
    c.send(b"QUIT\r\n");
    wait_for(
        "node b to see demo over its recipient rate",
        Duration::from_secs(10),
        || ctl(&b, &["limits", "demo"]).contains("over recipient rate"),
    );
    let mut c = session(&b);
    c.expect(
        "RCPT TO:<r4@example.net>",
        452,
        "4.5.3 Error: too many recipients from user demo",
    );
    c.send(b"QUIT\r\n");
}

#[test]
fn nodes_fall_back_to_local_counting_and_recover() {
    if skip() {
        return;
    }
    let mut redis = Redis::start();
    let (a, b) = (node(&redis.url(), &[]), node(&redis.url(), &[]));
    for s in [&a, &b] {
        wait_for("the node to reach Redis", Duration::from_secs(20), || {
            metric(s, "tern_cluster_redis_up") == Some(1.0)
        });
    }
    redis.stop();
    for s in [&a, &b] {
        wait_for(
            "the node to notice Redis is gone",
            Duration::from_secs(20),
            || metric(s, "tern_cluster_redis_up") == Some(0.0),
        );
        assert!(metric(s, "tern_cluster_redis_fallback_total").unwrap_or(0.0) >= 1.0);
        // AUTH works without Redis.
        assert_eq!(auth_from(s, "127.0.0.5", GOOD), 235);
        let st = ctl(s, &["status"]);
        assert!(st.contains("DOWN: counting locally"), "{st}");
    }
    let log = a.stderr_log();
    assert_eq!(log.matches("redis unreachable").count(), 1, "{log}");
    // Local counting: node a's own limit (4) blocks the address on node a.
    for _ in 0..4 {
        assert_eq!(auth_from(&a, "127.0.0.5", BAD), 535);
    }
    wait_for("node a's local block", Duration::from_secs(10), || {
        auth_from(&a, "127.0.0.5", GOOD) == 454
    });
    // The harness copies the server's stderr on a thread of its own: wait for the line.
    wait_for(
        "node a's log of its local block",
        Duration::from_secs(10),
        || local_block_logged(&a),
    );
    // Redis back on the same port: both nodes reconnect by themselves.
    redis.spawn();
    for s in [&a, &b] {
        wait_for("the node to reconnect", Duration::from_secs(20), || {
            metric(s, "tern_cluster_redis_up") == Some(1.0)
        });
    }
    wait_for(
        "node a's log of the recovery",
        Duration::from_secs(10),
        || a.stderr_log().contains("redis reachable again"),
    );
    // And counts across the cluster again: 2 + 2 from a new address block it on both.
    for s in [&a, &b, &a, &b] {
        assert_eq!(auth_from(s, "127.0.0.6", BAD), 535);
    }
    for s in [&a, &b] {
        wait_for(
            "the cluster block after recovery",
            Duration::from_secs(10),
            || auth_from(s, "127.0.0.6", GOOD) == 454,
        );
    }
}
