//! 09: privilege drop. Started as root with `user = "tern-e2e"`, tern binds its ports and
//! then runs every thread as that user, owns its spool, and still accepts mail. Started as
//! root without `user`, `tern serve` refuses to run (unless `allow_root`).
//!
//! Needs root (skipped otherwise, but CI runs as root).

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tern_tests::{tern_bin, Client};

const USER: &str = "tern-e2e";

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// Whether this (test) process has capability `bit` in its effective set.
fn has_cap(bit: u32) -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap()
        .trim();
    u64::from_str_radix(eff, 16).unwrap() & (1 << bit) != 0
}

fn ensure_user() -> (u32, u32) {
    let _ = Command::new("useradd")
        .args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            USER,
        ])
        .stderr(Stdio::null())
        .status();
    let id = |flag: &str| -> u32 {
        let out = Command::new("id").args([flag, USER]).output().expect("id");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("numeric id")
    };
    (id("-u"), id("-g"))
}

fn config(dir: &std::path::Path, user: &str) -> std::path::PathBuf {
    let cfg = dir.join("tern.toml");
    let user_line = if user.is_empty() {
        String::new()
    } else {
        format!("user = \"{user}\"\n")
    };
    std::fs::write(
        &cfg,
        format!(
            "hostname = \"localhost\"\n{user_line}\
             [listeners]\nsmtp = [\"127.0.0.1:0\"]\nsubmission = [\"127.0.0.1:0\"]\nsmtps = [\"127.0.0.1:0\"]\n\
             [spool]\ndir = \"{d}/spool\"\n[auth]\nusers = \"{d}/users.db\"\n\
             [relay]\nlocal_domains = [\"localhost\"]\n\
             [queue.routes]\n\"*\" = \"smtp:[127.0.0.1]:9\"\n\
             [executor]\nring_depth = 64\n",
            d = dir.display()
        ),
    )
    .unwrap();
    cfg
}

#[test]
fn drops_to_the_configured_user_on_every_thread() {
    if !tern_tests::require(is_root(), "root") {
        return;
    }
    let (uid, gid) = ensure_user();
    let dir = tempfile::tempdir().unwrap();
    // The service user must be able to reach its spool below the test directory.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let cfg = config(dir.path(), USER);
    let mut child = Command::new(tern_bin())
        .args(["serve", "--config"])
        .arg(&cfg)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut smtp = None;
    let start = Instant::now();
    let mut line = String::new();
    loop {
        line.clear();
        if out.read_line(&mut line).unwrap() == 0 {
            let mut err = String::new();
            let _ = std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err);
            panic!("tern exited before ready: {err}");
        }
        if let Some(a) = line.trim().strip_prefix("listening: smtp ") {
            smtp = Some(a.parse::<std::net::SocketAddr>().unwrap());
        }
        if line.starts_with("ready:") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30));
    }
    // Every thread: real, effective, saved and filesystem ids are the service user's.
    let mut threads = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let status = std::fs::read_to_string(t.unwrap().path().join("status")).unwrap();
        for (key, want) in [("Uid:", uid), ("Gid:", gid)] {
            let l = status.lines().find(|l| l.starts_with(key)).unwrap();
            let ids: Vec<u32> = l[key.len()..]
                .split_whitespace()
                .map(|x| x.parse().unwrap())
                .collect();
            assert!(ids.iter().all(|&i| i == want), "{key} {ids:?}, want {want}");
        }
        let groups = status.lines().find(|l| l.starts_with("Groups:")).unwrap();
        assert!(
            groups["Groups:".len()..]
                .split_whitespace()
                .all(|g| g == gid.to_string()),
            "supplementary groups not cleared: {groups}"
        );
        threads += 1;
    }
    assert!(threads >= 3, "expected shard threads, saw {threads}");
    // The spool syncer threads run at spool.syncer_nice (-10 by default) although the
    // process dropped root before they started: RLIMIT_NICE was raised for them. Raising
    // a hard limit needs CAP_SYS_RESOURCE, which some containers' root lacks: there tern
    // keeps nice 0 and says so.
    let mut nice_limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only the struct passed.
    unsafe { libc::getrlimit(libc::RLIMIT_NICE, &mut nice_limit) };
    // CAP_SYS_RESOURCE, or a hard limit already high enough (then only the soft one moves).
    let can_raise = has_cap(24) || nice_limit.rlim_max >= 30;
    let want_nice = if can_raise { -10 } else { 0 };
    let syncers = tern_tests::thread_nices(pid, "tern-sync-");
    for (name, nice) in &syncers {
        assert_eq!(*nice, want_nice, "{name}");
    }
    assert!(!syncers.is_empty(), "no tern-sync-* thread found");
    // It still works as that user: a message is accepted and its spool is the user's.
    let mut c = Client::connect(smtp.unwrap());
    c.expect_greeting();
    c.ehlo("client.test");
    c.send_mail(
        "a@example.com",
        &["x@localhost"],
        b"Subject: priv\r\n\r\nx\r\n",
    );
    let spool = dir.path().join("spool");
    let meta = std::fs::metadata(&spool).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (uid, gid));
    assert_eq!(meta.permissions().mode() & 0o777, 0o700);
    for shard in std::fs::read_dir(&spool).unwrap().flatten() {
        if shard.path().is_dir() {
            for f in std::fs::read_dir(shard.path()).unwrap().flatten() {
                assert_eq!(f.metadata().unwrap().uid(), uid, "{}", f.path().display());
            }
        }
    }
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let _ = child.wait();
    if !can_raise {
        let mut err = String::new();
        child.stderr.take().unwrap().read_to_string(&mut err).ok();
        assert!(err.contains("cannot raise RLIMIT_NICE"), "{err}");
    }
}

#[test]
fn refuses_root_without_a_user() {
    if !tern_tests::require(is_root(), "root") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "");
    let out = Command::new(tern_bin())
        .args(["serve", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("running as root"), "{err}");
}
