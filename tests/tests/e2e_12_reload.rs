//! 12: SIGHUP reloads the configuration file: new sessions get the new limits while an
//! open session keeps its own, and settings that need a restart are reported as such.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tern_tests::{tern_bin, Client};

fn write_config(path: &std::path::Path, dir: &std::path::Path, recipients: u32, smtp: &str) {
    std::fs::write(
        path,
        format!(
            "hostname = \"localhost\"\nallow_root = true\n\
             [listeners]\nsmtp = [\"{smtp}\"]\nsubmission = []\nsmtps = []\n\
             [limits]\nrecipients = {recipients}\n\
             [spool]\ndir = \"{d}/spool\"\n[auth]\nusers = \"{d}/users.db\"\n\
             [relay]\nlocal_domains = [\"localhost\"]\n\
             [queue.routes]\n\"*\" = \"smtp:[127.0.0.1]:9\"\n\
             [executor]\nring_depth = 64\n",
            d = dir.display()
        ),
    )
    .unwrap();
}

#[test]
fn sighup_applies_new_limits_to_new_sessions_only() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("tern.toml");
    write_config(&cfg, dir.path(), 3, "127.0.0.1:0");
    let mut child = Command::new(tern_bin())
        .args(["serve", "--config"])
        .arg(&cfg)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = tern_tests::drain_text(child.stderr.take().unwrap());
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut smtp = None;
    let start = Instant::now();
    let mut line = String::new();
    let shards: usize = loop {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "exited: {}",
            log.lock().unwrap()
        );
        if let Some(a) = line.trim().strip_prefix("listening: smtp ") {
            smtp = Some(a.parse::<std::net::SocketAddr>().unwrap());
        }
        if let Some(n) = line.strip_prefix("ready: ") {
            break n.split_whitespace().next().unwrap().parse().unwrap();
        }
        assert!(start.elapsed() < Duration::from_secs(30));
    };
    let smtp = smtp.unwrap();

    // A session opened before the reload.
    let mut before = Client::connect(smtp);
    before.expect_greeting();
    before.ehlo("client.test");
    before.expect("MAIL FROM:<a@example.com>", 250, "2.1.0");

    // New limit, and a listener change that cannot apply without a restart.
    write_config(&cfg, dir.path(), 1, "127.0.0.1:1");
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    tern_tests::wait_applied(&log, shards, 1);
    let text = log.lock().unwrap().clone();
    assert!(
        text.contains("takes effect after a restart") && text.contains("listeners"),
        "{text}"
    );

    // A new session gets the new limit of one recipient.
    let mut after = Client::connect(smtp);
    after.expect_greeting();
    after.ehlo("client.test");
    after.expect("MAIL FROM:<a@example.com>", 250, "2.1.0");
    after.expect("RCPT TO:<x@localhost>", 250, "2.1.5");
    after.expect("RCPT TO:<y@localhost>", 452, "4.5.3");

    // The session opened before keeps its limit of three.
    for r in ["x", "y", "z"] {
        before.expect(&format!("RCPT TO:<{r}@localhost>"), 250, "2.1.5");
    }
    before.expect("RCPT TO:<w@localhost>", 452, "4.5.3");

    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    let _ = child.wait();
}
