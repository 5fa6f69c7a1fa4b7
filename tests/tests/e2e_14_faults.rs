//! 14: fault injection against a real tern process:
//!
//! - disk full: the spool on a small tmpfs filled up by a ballast file. Segments are
//!   preallocated, so the full disk shows when the next segment cannot be created: new
//!   mail gets `452 4.3.1` (never 451, never 250, no crash), everything acknowledged
//!   before is read back byte-exact, mail flows again once space is freed, and all of
//!   it is delivered when the next hop comes up;
//! - fdatasync failing with EIO ("fsyncgate"): an LD_PRELOAD shim, compiled here with
//!   `cc`, makes fdatasync on the spool's segment files fail while an arm file exists
//!   (the spool's commit path calls libc's fdatasync on a blocking thread, not
//!   io_uring). No 250 while it fails; the failed segment never takes another record;
//!   afterwards mail flows and survives a restart;
//! - the same on the io_uring commit path (`spool.commit = "uring"`), which never calls
//!   libc's fdatasync: the spool sits on a FUSE pass-through file system
//!   (`tests/scripts/faultfs.py`, Python fusepy) whose fsync answers EIO while an arm file
//!   exists, so the failure comes back through the kernel and the shard's own ring;
//! - a next hop that is silent, answers garbage, or never answers the final dot: the
//!   message stays queued (deferred, never bounced) and is delivered once a real next
//!   hop listens on that port;
//! - hostile and truncated TLS handshakes leave no session behind (`tern_sessions_active`
//!   back to 0 on /metrics).
//!
//! Mounting needs root (CAP_SYS_ADMIN); without it the disk-full and io_uring tests say
//! they are skipped. The shim needs a C compiler, the FUSE file system python3 with
//! fusepy and /dev/fuse; all required in CI.

use std::ffi::CString;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tern_tests::{dot_stuff, maildir, next_hop, sessions_active, wait_for, Client, Reply, Server};

/// MAIL/RCPT/DATA/body/dot; returns the reply to the dot (whatever it is). `body` is
/// CRLF-terminated and dot-stuffed here.
fn try_send(c: &mut Client, to: &str, body: &[u8]) -> Reply {
    c.expect("MAIL FROM:<s@demo.test>", 250, "2.1.0");
    c.expect(&format!("RCPT TO:<{to}>"), 250, "2.1.5");
    c.expect("DATA", 354, "End data");
    let mut wire = dot_stuff(body);
    wire.extend_from_slice(b".\r\n");
    c.send(&wire);
    c.read_reply()
}

/// A body of about `size` octets with a unique subject.
fn body(subject: &str, size: usize) -> Vec<u8> {
    let mut b = format!("Subject: {subject}\r\n\r\n").into_bytes();
    let mut i = 0;
    while b.len() < size {
        b.extend_from_slice(format!("{subject} line {i:06} {}\r\n", "z".repeat(50)).as_bytes());
        i += 1;
    }
    b
}

/// The relay the fault tests use: one shard, loopback trusted, every domain routed to
/// 127.0.0.1:`hop_port` (down until a test starts a next hop there).
fn relay_sets(hop_port: u16) -> Vec<String> {
    vec![
        "shards=1".into(),
        format!(r#"queue.routes={{"*"="smtp:[127.0.0.1]:{hop_port}"}}"#),
        r#"relay.trusted_networks=["127.0.0.0/8"]"#.into(),
        "queue.retry_interval=1s".into(),
        "queue.max_retry_interval=1s".into(),
        "queue.connect_timeout=2s".into(),
        "queue.command_timeout=2s".into(),
    ]
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Every message in `dir`'s next-hop Maildir contains exactly one of `bodies`, and each
/// of `bodies` is in one (with LF line ends, as maildir(5) files have them).
fn all_delivered(hop_dir: &Path, bodies: &[Vec<u8>]) -> bool {
    let got = maildir(hop_dir);
    bodies.iter().all(|b| {
        let b = String::from_utf8_lossy(b).replace("\r\n", "\n");
        got.iter().any(|(_, m)| m.ends_with(&*b))
    })
}

// ------------------------------------------------------------------------------------
// Disk full.
// ------------------------------------------------------------------------------------

/// A tmpfs mounted for one test, lazily unmounted on drop.
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    /// None (with the reason) if this process may not mount.
    fn mount(path: &Path, size_kib: u64) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(path).map_err(|e| e.to_string())?;
        let c = |s: &str| CString::new(s).unwrap();
        let target = c(path.to_str().unwrap());
        let opts = c(&format!("size={size_kib}k,mode=0755"));
        // SAFETY: mount(2) with valid NUL-terminated strings that outlive the call.
        let rc = unsafe {
            libc::mount(
                c("tmpfs").as_ptr(),
                target.as_ptr(),
                c("tmpfs").as_ptr(),
                0,
                opts.as_ptr().cast(),
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        Ok(Tmpfs {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let p = CString::new(self.path.to_str().unwrap()).unwrap();
        // SAFETY: umount2 with a valid path; MNT_DETACH so open files do not keep it busy.
        unsafe { libc::umount2(p.as_ptr(), libc::MNT_DETACH) };
    }
}

/// Writes zeros into `path` until the filesystem is full; returns the octets written.
fn fill(path: &Path) -> u64 {
    let mut f = std::fs::File::create(path).unwrap();
    let zeros = vec![0u8; 64 * 1024];
    let mut n = 0u64;
    loop {
        match f.write(&zeros) {
            Ok(0) => break,
            Ok(k) => n += k as u64,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    let _ = f.sync_all();
    n
}

#[test]
fn disk_full_gets_452_keeps_what_was_acknowledged_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    // 6 MiB: the active 1 MiB segment, room for a spare, and a ballast to fill the rest.
    let _fs = match Tmpfs::mount(&spool, 6 * 1024) {
        Ok(m) => m,
        Err(e) => {
            let what = format!("a tmpfs mount for the spool (root with CAP_SYS_ADMIN: {e})");
            tern_tests::require(false, &what);
            return;
        }
    };
    let port = tern_tests::free_port();
    let mut sets = relay_sets(port);
    sets.push("spool.segment_size=1048576".into());
    let mut relay = Server::start(Some(dir.path()), &refs(&sets));
    let ballast = spool.join("ballast");
    let filled = fill(&ballast);
    eprintln!("ballast: {filled} octets; spool filesystem full");

    let mut c = relay.smtp();
    c.ehlo("client.test");
    let mut acked: Vec<(String, Vec<u8>)> = Vec::new();
    let mut full = None;
    for i in 0..64 {
        let b = body(&format!("full-{i:02}"), 60 * 1024);
        let r = try_send(&mut c, "a@demo.test", &b);
        if r.code == 250 {
            acked.push((r.queued_id(), b));
            continue;
        }
        full = Some(r);
        break;
    }
    let full = full.expect("the spool never filled up");
    full.check(452, "4.3.1");
    eprintln!(
        "{} messages acknowledged, then `{full}` once no segment could be created",
        acked.len()
    );
    assert!(
        !acked.is_empty(),
        "nothing was accepted before the disk was full"
    );
    // Still full: still 452 (not 451), and the session goes on.
    let r = try_send(&mut c, "a@demo.test", &body("still-full", 60 * 1024));
    r.check(452, "4.3.1");
    c.expect("NOOP", 250, "2.0.0");
    assert!(relay.running(), "tern died on a full disk");

    // Everything acknowledged is intact, byte-exact.
    for (id, b) in &acked {
        assert_eq!(relay.stored_by_id(id).content(), &b[..], "message {id}");
    }

    // Free space: mail flows again (a new segment can be created).
    std::fs::remove_file(&ballast).unwrap();
    let after = body("after-free", 60 * 1024);
    let r = try_send(&mut c, "a@demo.test", &after);
    assert_eq!(r.code, 250, "no 250 after space was freed: {r}");
    acked.push((r.queued_id(), after));
    c.quit();

    // The next hop comes up: every acknowledged message is delivered, exactly as sent.
    let hop = next_hop(Some(port), &[]);
    let bodies: Vec<Vec<u8>> = acked.iter().map(|(_, b)| b.clone()).collect();
    wait_for(
        "every acknowledged message at the next hop",
        Duration::from_secs(60),
        || all_delivered(hop.dir(), &bodies),
    );
    wait_for("an empty relay queue", Duration::from_secs(30), || {
        relay.queue_list().is_empty()
    });
    relay.kill9();
}

// ------------------------------------------------------------------------------------
// fdatasync failing with EIO.
// ------------------------------------------------------------------------------------

/// The LD_PRELOAD shim: fdatasync/fsync on a file whose path starts with
/// $TERN_FAULT_PREFIX and ends in ".seg" fail with EIO while $TERN_FAULT_ARM exists (if
/// that file says "once", the first failure removes it); each failure appends the file's
/// path to $TERN_FAULT_LOG.
const SHIM: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int fault(int fd) {
    const char *arm = getenv("TERN_FAULT_ARM"), *prefix = getenv("TERN_FAULT_PREFIX");
    const char *log = getenv("TERN_FAULT_LOG");
    if (!arm || !prefix || access(arm, F_OK) != 0) return 0;
    char link[64], path[PATH_MAX];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n < 4) return 0;
    path[n] = 0;
    if (strncmp(path, prefix, strlen(prefix)) != 0 || strcmp(path + n - 4, ".seg") != 0)
        return 0;
    FILE *a = fopen(arm, "r");
    if (a) {
        char mode[8] = {0};
        if (fgets(mode, sizeof mode, a) && strncmp(mode, "once", 4) == 0) unlink(arm);
        fclose(a);
    }
    if (log) {
        FILE *f = fopen(log, "a");
        if (f) { fprintf(f, "%s\n", path); fclose(f); }
    }
    return 1;
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    if (fault(fd)) { errno = EIO; return -1; }
    return real(fd);
}

int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    if (fault(fd)) { errno = EIO; return -1; }
    return real(fd);
}
"#;

/// Compiles the shim into `dir`; None (after saying why) if there is no C compiler.
fn build_shim(dir: &Path) -> Option<PathBuf> {
    let src = dir.join("fault_shim.c");
    let so = dir.join("fault_shim.so");
    std::fs::write(&src, SHIM).unwrap();
    for cc in ["cc", "gcc", "clang"] {
        let st = std::process::Command::new(cc)
            .args(["-shared", "-fPIC", "-O1", "-o"])
            .arg(&so)
            .arg(&src)
            .arg("-ldl")
            .status();
        if st.is_ok_and(|s| s.success()) {
            return Some(so);
        }
    }
    tern_tests::require(
        false,
        "a C compiler (cc, gcc or clang) for the fsync fault shim",
    );
    None
}

/// Segment numbers named in the shim's log.
fn failed_segments(log: &Path) -> Vec<u64> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut v: Vec<u64> = text
        .lines()
        .filter_map(|l| Path::new(l).file_stem()?.to_str()?.parse().ok())
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

#[test]
fn fdatasync_eio_never_gets_a_250_and_retires_the_segment() {
    let work = tempfile::tempdir().unwrap();
    let Some(shim) = build_shim(work.path()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let arm = work.path().join("arm");
    let log = work.path().join("faults.log");
    let env = [
        ("LD_PRELOAD", shim.to_str().unwrap()),
        ("TERN_FAULT_ARM", arm.to_str().unwrap()),
        ("TERN_FAULT_PREFIX", spool.to_str().unwrap()),
        ("TERN_FAULT_LOG", log.to_str().unwrap()),
    ];
    let port = tern_tests::free_port();
    let mut sets = relay_sets(port);
    // Small segments (each failure retires one; a debug build scans them slowly).
    sets.push("spool.segment_size=1048576".into());
    // Deferred once at acceptance, then left alone.
    sets.push("queue.retry_interval=1h".into());
    sets.push("queue.max_retry_interval=1h".into());
    let mut relay = Server::start_with_env(Some(dir.path()), &refs(&sets), &env);

    let send_one = |relay: &Server, subject: &str| -> (Reply, Vec<u8>) {
        let mut c = relay.smtp();
        c.ehlo("client.test");
        let b = body(subject, 2000);
        let r = try_send(&mut c, "a@demo.test", &b);
        c.quit();
        (r, b)
    };
    let mut acked: Vec<(String, Vec<u8>)> = Vec::new();
    for i in 0..3 {
        let (r, b) = send_one(&relay, &format!("before-{i}"));
        acked.push((r.queued_id(), b));
    }

    // Armed: every fdatasync of a segment fails. Four concurrent senders (their records
    // may share a group commit): not one 250.
    std::fs::write(&arm, b"").unwrap();
    let replies: Vec<Reply> = std::thread::scope(|scope| {
        let hs: Vec<_> = (0..4)
            .map(|i| {
                let relay = &relay;
                scope.spawn(move || send_one(relay, &format!("failing-{i}")).0)
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    std::fs::remove_file(&arm).unwrap();
    for r in &replies {
        r.check(451, "4.3.0");
    }

    // One failure only: the refused message's record is withdrawn by a state record
    // that does reach the disk, so a restart will not deliver it behind the client's back.
    std::fs::write(&arm, b"once").unwrap();
    let (r, _) = send_one(&relay, "failing-once");
    r.check(451, "4.3.0");
    assert!(!arm.exists(), "the one-shot fault was not hit");
    // (The log reaches us through a pipe: wait for it.)
    wait_for("the withdrawal in the log", Duration::from_secs(10), || {
        relay
            .stderr_log()
            .contains("record of a refused message withdrawn")
    });
    // The withdrawal finished the record, so its retired segment (holding nothing else)
    // was deleted.
    let once = *failed_segments(&log).last().unwrap();
    let once_file = spool.join("shard-000").join(format!("{once:016}.seg"));
    assert!(!once_file.exists(), "{} still there", once_file.display());
    let failed = failed_segments(&log);
    assert!(!failed.is_empty(), "the shim never made an fdatasync fail");
    assert!(relay
        .stderr_log()
        .contains("fdatasync failed; segment retired"));

    // Disarmed: mail flows again, into a newer segment than any that failed.
    let mut later = Vec::new();
    for i in 0..3 {
        let (r, b) = send_one(&relay, &format!("after-{i}"));
        assert_eq!(r.code, 250, "{r}");
        later.push((r.queued_id(), b));
    }
    let scanned = tern_queue::scan_spool(&spool).unwrap();
    let segment_of = |id: &str| {
        scanned
            .iter()
            .find(|m| m.envelope.id == id)
            .unwrap_or_else(|| panic!("{id} not in the spool"))
            .segment
    };
    let newest_failed = *failed.last().unwrap();
    for (id, _) in &later {
        let seg = segment_of(id);
        assert!(
            seg > newest_failed,
            "{id} went to segment {seg}; segments {failed:?} failed an fdatasync"
        );
    }
    eprintln!(
        "fdatasync failed on segment(s) {failed:?}: 5 x 451 4.3.0, no 250; later mail in segment {}",
        segment_of(&later[0].0)
    );

    // Restart on the same spool: everything acknowledged is there, byte-exact.
    acked.extend(later);
    relay.restart();
    let stored = relay.stored();
    for (id, b) in &acked {
        let m = stored
            .iter()
            .find(|m| &m.id == id)
            .unwrap_or_else(|| panic!("{id} lost"));
        assert_eq!(m.content(), &b[..], "message {id}");
    }
    let queued: Vec<String> = relay.queue_list().into_iter().map(|e| e.id).collect();
    for (id, _) in &acked {
        assert!(
            queued.contains(id),
            "{id} not queued after restart: {queued:?}"
        );
    }
    // Refused records whose withdrawal could not be written while the fault was armed
    // may come back (duplicates of the clients' retries, never losses); the one
    // withdrawn above does not (its segment is gone).
    eprintln!(
        "after restart: {} queued, {} of them acknowledged",
        queued.len(),
        acked.len()
    );
}

// ------------------------------------------------------------------------------------
// fdatasync failing with EIO on the io_uring commit path (through FUSE).
// ------------------------------------------------------------------------------------

/// `tests/scripts/faultfs.py` mounted at `mount` (mirroring `backing`), unmounted and
/// stopped on drop. Declare it before the server using it, so it is dropped after.
struct FaultFs {
    mount: PathBuf,
    daemon: std::process::Child,
}

impl FaultFs {
    /// Err (with the reason) if there is no python3 with fusepy, no /dev/fuse, or this
    /// process may not mount.
    fn mount(backing: &Path, mount: &Path, arm: &Path, log: &Path) -> Result<FaultFs, String> {
        let has_fusepy = std::process::Command::new("python3")
            .args(["-c", "import importlib.util as u, sys; sys.exit(not (u.find_spec('fuse') or u.find_spec('fusepy')))"])
            .status()
            .is_ok_and(|s| s.success());
        if !has_fusepy {
            return Err("python3 with fusepy (pip fusepy, or Debian's python3-fusepy)".into());
        }
        if !Path::new("/dev/fuse").exists() {
            return Err("/dev/fuse".into());
        }
        std::fs::create_dir_all(backing).map_err(|e| e.to_string())?;
        std::fs::create_dir_all(mount).map_err(|e| e.to_string())?;
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/faultfs.py");
        let daemon = std::process::Command::new("python3")
            .arg(&script)
            .args([backing, mount, arm, log])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting {}: {e}", script.display()))?;
        let mut fs = FaultFs {
            mount: mount.to_path_buf(),
            daemon,
        };
        // Mounted once the directory is a FUSE file system.
        let start = std::time::Instant::now();
        loop {
            let st = nix_statfs(mount);
            if st == Some(0x6573_5546) {
                return Ok(fs);
            }
            if let Ok(Some(status)) = fs.daemon.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = fs.daemon.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                return Err(format!("faultfs exited ({status}): {err}"));
            }
            if start.elapsed() > Duration::from_secs(10) {
                return Err("faultfs did not mount within 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The file system type (`f_type`) of `path`.
fn nix_statfs(path: &Path) -> Option<i64> {
    let p = CString::new(path.to_str()?).ok()?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: statfs(2) with a valid NUL-terminated path and a buffer of its type.
    let rc = unsafe { libc::statfs(p.as_ptr(), &mut st) };
    (rc == 0).then_some(st.f_type as i64)
}

impl Drop for FaultFs {
    fn drop(&mut self) {
        let p = CString::new(self.mount.to_str().unwrap()).unwrap();
        // SAFETY: umount2 with a valid path; MNT_DETACH so open files do not keep it busy.
        unsafe { libc::umount2(p.as_ptr(), libc::MNT_DETACH) };
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
    }
}

#[test]
fn fdatasync_eio_on_the_io_uring_path_never_gets_a_250_and_retires_the_segment() {
    let dir = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let arm = work.path().join("arm");
    let log = work.path().join("faults.log");
    // The shard's directory is the mount (the admin socket lives in the spool directory,
    // and a socket on this FUSE file system is not worth the trouble): one shard.
    let shard_dir = spool.join("shard-000");
    let _fs = match FaultFs::mount(&work.path().join("backing"), &shard_dir, &arm, &log) {
        Ok(fs) => fs,
        Err(what) => {
            tern_tests::require(false, &format!("a FUSE mount for the spool: {what}"));
            return;
        }
    };
    let port = tern_tests::free_port();
    let mut sets = relay_sets(port);
    sets.push(r#"spool.commit="uring""#.into());
    sets.push("spool.segment_size=1048576".into());
    sets.push("queue.retry_interval=1h".into());
    sets.push("queue.max_retry_interval=1h".into());
    let mut relay = Server::start(Some(dir.path()), &refs(&sets));
    let send_one = |relay: &Server, subject: &str| -> (Reply, Vec<u8>) {
        let mut c = relay.smtp();
        c.ehlo("client.test");
        let b = body(subject, 2000);
        let r = try_send(&mut c, "a@demo.test", &b);
        c.quit();
        (r, b)
    };
    let mut acked: Vec<(String, Vec<u8>)> = Vec::new();
    for i in 0..2 {
        let (r, b) = send_one(&relay, &format!("before-{i}"));
        assert_eq!(r.code, 250, "{r}");
        acked.push((r.queued_id(), b));
    }

    // Armed: every fsync of a segment fails, whoever asks. Three concurrent senders.
    std::fs::write(&arm, b"").unwrap();
    let replies: Vec<Reply> = std::thread::scope(|scope| {
        let hs: Vec<_> = (0..3)
            .map(|i| {
                let relay = &relay;
                scope.spawn(move || send_one(relay, &format!("failing-{i}")).0)
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    std::fs::remove_file(&arm).unwrap();
    for r in &replies {
        r.check(451, "4.3.0");
    }
    let failed = failed_segments(&log);
    assert!(!failed.is_empty(), "faultfs never failed an fsync");
    wait_for(
        "the io_uring sync failure in the log",
        Duration::from_secs(10),
        || {
            relay
                .stderr_log()
                .contains("fdatasync (io_uring) failed; segment retired")
        },
    );

    // Disarmed: mail flows again, into a newer segment than any that failed.
    let mut later = Vec::new();
    for i in 0..2 {
        let (r, b) = send_one(&relay, &format!("after-{i}"));
        assert_eq!(r.code, 250, "{r}");
        later.push((r.queued_id(), b));
    }
    let scanned = tern_queue::scan_spool(&spool).unwrap();
    let newest_failed = *failed.last().unwrap();
    for (id, _) in &later {
        let seg = scanned
            .iter()
            .find(|m| &m.envelope.id == id)
            .unwrap_or_else(|| panic!("{id} not in the spool"))
            .segment;
        assert!(
            seg > newest_failed,
            "{id} went to segment {seg}; segments {failed:?} failed an fsync"
        );
    }
    eprintln!(
        "io_uring: fsync failed on segment(s) {failed:?}: 3 x 451 4.3.0, no 250; later mail in newer segments"
    );

    // Restart on the same spool: everything acknowledged is there, byte-exact, queued.
    acked.extend(later);
    relay.restart();
    let stored = relay.stored();
    let queued: Vec<String> = relay.queue_list().into_iter().map(|e| e.id).collect();
    for (id, b) in &acked {
        let m = stored
            .iter()
            .find(|m| &m.id == id)
            .unwrap_or_else(|| panic!("{id} lost"));
        assert_eq!(m.content(), &b[..], "message {id}");
        assert!(queued.contains(id), "{id} not queued after restart");
    }
    relay.kill9();
}

// ------------------------------------------------------------------------------------
// A next hop that is slow or answers garbage.
// ------------------------------------------------------------------------------------

/// What the scripted next hop does on its n-th connection.
#[derive(Debug, Clone, Copy)]
enum Misbehave {
    /// Accepts and says nothing (greeting timeout).
    Silent,
    /// Greets, then answers EHLO with binary garbage.
    GarbageAfterEhlo,
    /// Answers like an HTTP server instead of greeting.
    Http,
    /// A normal dialogue up to the end of the body, then no reply to the final dot.
    NoReplyToDot,
}

fn misbehave(mut t: TcpStream, how: Misbehave) {
    t.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut r = BufReader::new(t.try_clone().unwrap());
    let read_line = |r: &mut BufReader<TcpStream>, line: &mut String| {
        line.clear();
        r.read_line(line).unwrap_or(0) > 0
    };
    let mut line = String::new();
    let hold = || std::thread::sleep(Duration::from_secs(4)); // the relay waits 2 s
    match how {
        Misbehave::Silent => hold(),
        Misbehave::GarbageAfterEhlo => {
            let _ = t.write_all(b"220 hop.test ESMTP\r\n");
            read_line(&mut r, &mut line);
            let _ = t.write_all(b"\x16\x03\x01\x00\xff\xfe garbage \x00\x01\r\n");
            hold();
        }
        Misbehave::Http => {
            let _ = t.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
            hold();
        }
        Misbehave::NoReplyToDot => {
            let _ = t.write_all(b"220 hop.test ESMTP\r\n");
            while read_line(&mut r, &mut line) {
                let cmd = line.to_ascii_uppercase();
                let reply: &[u8] = if cmd.starts_with("EHLO") {
                    b"250-hop.test\r\n250 PIPELINING\r\n"
                } else if cmd.starts_with("DATA") {
                    b"354 go ahead\r\n"
                } else if cmd == ".\r\n" {
                    hold(); // the message went through; its reply never comes
                    return;
                } else if cmd.starts_with("MAIL") || cmd.starts_with("RCPT") {
                    b"250 ok\r\n"
                } else {
                    continue; // body lines
                };
                let _ = t.write_all(reply);
            }
        }
    }
}

#[test]
fn misbehaving_next_hop_defers_and_the_message_arrives_once_it_recovers() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let relay = Server::with(&refs(&relay_sets(port)));
    let scripted = std::thread::spawn(move || {
        let modes = [
            Misbehave::Silent,
            Misbehave::GarbageAfterEhlo,
            Misbehave::Http,
            Misbehave::NoReplyToDot,
        ];
        let mut seen = Vec::new();
        let mut conns = Vec::new();
        for how in modes {
            let (t, _) = listener.accept().unwrap();
            seen.push(how);
            // Its own thread, so the next attempt is accepted (and misbehaved at) at once.
            conns.push(std::thread::spawn(move || misbehave(t, how)));
        }
        drop(listener); // the port is free for the real next hop
        for h in conns {
            h.join().unwrap();
        }
        seen
    });
    let mut c = relay.smtp();
    c.ehlo("client.test");
    let b = body("through-a-bad-hop", 3000);
    let id = try_send(&mut c, "a@demo.test", &b).queued_id();
    c.quit();
    let seen = scripted.join().unwrap();
    assert_eq!(seen.len(), 4, "the relay stopped retrying: {seen:?}");
    // Still queued, deferred (never bounced).
    assert!(relay.queue_list().iter().any(|e| e.id == id));
    let log = relay.stderr_log();
    assert!(log.contains("deferred"), "{log}");
    assert!(!log.contains("bounced"), "{log}");

    let hop = next_hop(Some(port), &[]);
    wait_for(
        "delivery once the next hop recovered",
        Duration::from_secs(30),
        || all_delivered(hop.dir(), std::slice::from_ref(&b)),
    );
    wait_for("an empty relay queue", Duration::from_secs(20), || {
        relay.queue_list().is_empty()
    });
    let got = maildir(hop.dir());
    assert_eq!(got.len(), 1, "a bounce or a copy too many: {got:?}");
}

// ------------------------------------------------------------------------------------
// TLS handshakes gone wrong leave nothing behind.
// ------------------------------------------------------------------------------------

#[test]
fn hostile_tls_handshakes_leave_no_session_behind() {
    let s = Server::with(&["limits.idle_timeout=2s"]);
    let metrics = s.metrics.expect("demo serves /metrics");
    let mut hanging = Vec::new();
    for i in 0..20u32 {
        // Plain text on the TLS port.
        let mut t = TcpStream::connect(s.smtps).unwrap();
        let _ = t.write_all(b"EHLO x\r\n");
        // A record header promising more than is sent, then close.
        let mut t2 = TcpStream::connect(s.smtps).unwrap();
        let _ = t2.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc]);
        drop(t2);
        // Truncated handshakes left hanging (the server must time them out).
        let mut t3 = TcpStream::connect(s.smtps).unwrap();
        let _ = t3.write_all(&[0x16, 0x03, 0x01, 0x00, 0x40]);
        hanging.push(t3);
        // STARTTLS, then junk instead of a ClientHello, left open.
        let mut c = s.smtp();
        c.ehlo("client.test");
        c.expect("STARTTLS", 220, "2.0.0");
        c.send(&[i as u8; 64]);
        hanging.push(c.socket().try_clone().unwrap());
        drop(t);
    }
    // They are served meanwhile...
    let mut c = s.smtps();
    c.ehlo("client.test");
    c.quit();
    // ...and every one of them ends (handshake errors at once, hanging ones at the
    // handshake timeout) while the clients still hold their sockets open.
    wait_for("sessions back to 0", Duration::from_secs(30), || {
        sessions_active(metrics) == 0
    });
    drop(hanging);
}
