//! 13: floods and slow clients against a real tern, with one shard so that every hostile
//! client shares it with the well-behaved one that must still be served:
//!
//! - hundreds of idle connections: memory per connection (server VmRSS), and sessions
//!   back to 0 on /metrics once they go;
//! - clients pipelining 1-octet BDAT chunks without ever reading a reply: the server's
//!   memory stays bounded (TCP flow control stops them, not tern's buffers), and the
//!   stalled sessions end at the write timeout;
//! - slowloris: a command trickled a byte every 100 ms, a body trickled the same way, a
//!   NOOP loop trickled: each is cut off (421 4.4.2, 421 4.4.2, 421 4.7.0);
//! - a body sent in tiny TCP segments: stored byte-exact, memory bounded.
//!
//! Asserts are on memory and on what the server answers, never on time. The long
//! versions (10,000 connections, 100 MB pipelined) are `tests/scripts/floods.py`, run on
//! demand; figures in docs/reliability.md.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use tern_tests::{sessions_active, wait_for, Server};

/// Resident memory of `pid` in KiB (VmRSS).
fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("VmRSS line")
}

fn one_shard(extra: &[&str]) -> Server {
    let mut sets = vec!["shards=1", "limits.connections_per_ip=100000"];
    sets.extend_from_slice(extra);
    Server::with(&sets)
}

/// A complete transaction on a fresh connection: the server still serves.
fn served(s: &Server, subject: &str) -> String {
    let mut c = s.smtp();
    c.ehlo("good.test");
    let id = c.send_mail(
        "good@demo.test",
        &["postmaster@localhost"],
        format!("Subject: {subject}\r\n\r\nstill served\r\n").as_bytes(),
    );
    c.quit();
    id
}

#[test]
fn idle_connections_are_small_and_others_are_served() {
    const N: usize = 300;
    let s = one_shard(&[]);
    let metrics = s.metrics.expect("demo serves /metrics");
    // Warm up (first connection allocates the shard's per-connection machinery).
    served(&s, "warm-up");
    let before = rss_kib(s.pid());
    let mut idle = Vec::with_capacity(N);
    for _ in 0..N {
        let mut c = s.smtp();
        c.ehlo("idle.test");
        idle.push(c);
    }
    let after = rss_kib(s.pid());
    let per_conn = (after.saturating_sub(before) * 1024) as f64 / N as f64;
    eprintln!(
        "{N} idle connections: VmRSS {before} -> {after} KiB, {:.1} KiB per connection",
        per_conn / 1024.0
    );
    assert_eq!(sessions_active(metrics), N as u64);
    // The target (measured ~9.6 KiB in a debug build, ~9 KiB in release).
    assert!(
        per_conn < 16.0 * 1024.0,
        "{:.1} KiB per idle connection",
        per_conn / 1024.0
    );
    let id = served(&s, "among idle ones");
    assert_eq!(s.stored_by_id(&id).recipients, ["postmaster@localhost"]);
    // Every idle session is still usable.
    for c in idle.iter_mut().step_by(50) {
        c.expect("NOOP", 250, "2.0.0 Ok");
    }
    drop(idle);
    wait_for("sessions back to 0", Duration::from_secs(20), || {
        sessions_active(metrics) == 0
    });
}

/// Pipelines `BDAT 1` chunks (each earns a reply) without reading anything, until the
/// server has taken no input for a second or `limit` octets went out. Returns the socket
/// (still open) and the octets sent.
fn pipeline_without_reading(addr: SocketAddr, limit: usize) -> (TcpStream, usize) {
    let t = TcpStream::connect(addr).unwrap();
    // A small receive window, so the replies back up quickly.
    let small: libc::c_int = 4096;
    // SAFETY: setsockopt on a socket we own, with a pointer to a live c_int.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&t),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            &small as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0);
    t.set_write_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut w = &t;
    w.write_all(
        b"EHLO flood.test\r\nMAIL FROM:<f@demo.test>\r\nRCPT TO:<postmaster@localhost>\r\n",
    )
    .unwrap();
    let chunk = b"BDAT 1\r\nx".repeat(7282); // ~64 KiB
    let (mut sent, mut pos) = (0, 0);
    let mut stalled_since: Option<Instant> = None;
    while sent < limit {
        match w.write(&chunk[pos..]) {
            Ok(n) => {
                sent += n;
                pos = (pos + n) % chunk.len();
                stalled_since = None;
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if stalled_since.get_or_insert_with(Instant::now).elapsed() > Duration::from_secs(1)
                {
                    break;
                }
            }
            Err(e) => panic!("write: {e}"),
        }
    }
    (t, sent)
}

#[test]
fn never_reading_pipeliners_are_bounded_and_do_not_block_the_shard() {
    const CLIENTS: usize = 4;
    let s = one_shard(&["limits.idle_timeout=4s"]);
    let metrics = s.metrics.expect("demo serves /metrics");
    served(&s, "warm-up");
    let before = rss_kib(s.pid());
    let mut stalled = Vec::new();
    let mut total = 0;
    for _ in 0..CLIENTS {
        let (t, sent) = pipeline_without_reading(s.smtp, 32 << 20);
        total += sent;
        stalled.push(t);
    }
    let after = rss_kib(s.pid());
    eprintln!(
        "{CLIENTS} never-reading pipeliners sent {:.1} MB before stalling; VmRSS {before} -> {after} KiB",
        total as f64 / 1e6
    );
    // Each one stalled (TCP flow control) rather than being read into memory.
    assert!(total < CLIENTS * (32 << 20), "a pipeliner never stalled");
    // Measured 2026-11-29: +0.7 MB; before output backpressure and body coalescing,
    // +14 MB (and +114 MB for 20 such clients).
    assert!(
        after.saturating_sub(before) < 4 * 1024,
        "VmRSS grew by {} KiB",
        after - before
    );
    // The shard they share still serves others.
    let id = served(&s, "past the pipeliners");
    assert!(s.stored_by_id(&id).content().ends_with(b"still served\r\n"));
    // The stalled sessions end at the write timeout; nothing is left behind.
    wait_for(
        "stalled sessions to be closed",
        Duration::from_secs(30),
        || sessions_active(metrics) == 0,
    );
    drop(stalled);
}

/// Sends `bytes` one at a time every `gap` until the server says something (returned
/// with how many were sent), or all are sent (None).
fn trickle(t: &mut TcpStream, bytes: &[u8], gap: Duration) -> Option<(String, usize)> {
    t.set_nonblocking(true).unwrap();
    let mut got = Vec::new();
    let said = |got: &[u8], n| Some((String::from_utf8_lossy(got).into_owned(), n));
    for (i, b) in bytes.iter().enumerate() {
        if t.write_all(std::slice::from_ref(b)).is_err() {
            return said(&got, i);
        }
        std::thread::sleep(gap);
        let mut buf = [0u8; 512];
        loop {
            match t.read(&mut buf) {
                Ok(0) => return said(&got, i + 1),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => return said(&got, i + 1),
            }
        }
        if got.ends_with(b"\r\n") {
            return said(&got, i + 1);
        }
    }
    None
}

/// Reads one reply line (blocking, with the harness' timeout).
fn read_line(t: &mut TcpStream) -> String {
    t.set_nonblocking(false).unwrap();
    t.set_read_timeout(Some(tern_tests::IO_TIMEOUT)).unwrap();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while !line.ends_with(b"\r\n") {
        match t.read(&mut b) {
            Ok(1) => line.push(b[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&line).into_owned()
}

/// A connection past the greeting and EHLO, as a raw socket (the clone keeps the
/// connection open when the client goes).
fn raw_after_ehlo(s: &Server) -> TcpStream {
    let mut c = s.smtp();
    c.ehlo("slow.test");
    assert!(c.pending().is_empty());
    c.socket().try_clone().unwrap()
}

#[test]
fn slowloris_trickles_are_cut_off_while_others_are_served() {
    let s = one_shard(&["limits.idle_timeout=2s"]);
    let metrics = s.metrics.expect("demo serves /metrics");
    std::thread::scope(|scope| {
        // 1. A command that never ends, a byte every 100 ms (each earns 2 ms at the
        //    default 500 octets/s): the request deadline is not reset by the bytes.
        let cmd = scope.spawn(|| {
            let mut t = raw_after_ehlo(&s);
            trickle(&mut t, &[b'x'; 400], Duration::from_millis(100))
        });
        // 2. A body, a byte every 100 ms.
        let body = scope.spawn(|| {
            let mut c = s.smtp();
            c.ehlo("slow.test");
            c.expect("MAIL FROM:<s@demo.test>", 250, "2.1.0");
            c.expect("RCPT TO:<postmaster@localhost>", 250, "2.1.5");
            c.expect("DATA", 354, "End data");
            let mut t = c.socket().try_clone().unwrap();
            drop(c);
            trickle(
                &mut t,
                &b"Subject: slow\r\n\r\n".repeat(30),
                Duration::from_millis(100),
            )
        });
        // 3. Complete NOOPs, each trickled a byte every 3 ms (well within every
        //    deadline), each reply read before the next.
        let noops = scope.spawn(|| {
            let mut t = raw_after_ehlo(&s);
            let mut replies = String::new();
            for sent in 1..=150 {
                for b in b"NOOP\r\n" {
                    if t.write_all(std::slice::from_ref(b)).is_err() {
                        return (replies, sent);
                    }
                    std::thread::sleep(Duration::from_millis(3));
                }
                let r = read_line(&mut t);
                replies.push_str(&r);
                if !r.starts_with("250") {
                    return (replies, sent);
                }
            }
            (replies, 150)
        });
        // Meanwhile the shard serves a real client.
        let id = served(&s, "during slowloris");
        assert!(!id.is_empty());

        let (reply, sent) = cmd
            .join()
            .unwrap()
            .expect("command trickle was never cut off");
        assert!(
            reply.starts_with("421 4.4.2"),
            "after {sent} bytes: {reply:?}"
        );
        let (reply, sent) = body
            .join()
            .unwrap()
            .expect("body trickle was never cut off");
        assert!(
            reply.starts_with("421 4.4.2"),
            "after {sent} bytes: {reply:?}"
        );
        let (replies, sent) = noops.join().unwrap();
        assert!(
            replies.ends_with("421 4.7.0 localhost Error: too many commands without a message\r\n"),
            "{replies:?}"
        );
        // The one EHLO plus 99 NOOPs were answered; the 101st junk command was not.
        assert_eq!(
            replies.matches("250 2.0.0 Ok\r\n").count(),
            99,
            "{sent} NOOPs sent"
        );
    });
    wait_for("sessions back to 0", Duration::from_secs(20), || {
        sessions_active(metrics) == 0
    });
}

#[test]
fn body_in_tiny_segments_is_stored_exactly_with_bounded_memory() {
    let s = one_shard(&[]);
    served(&s, "warm-up");
    let before = rss_kib(s.pid());
    let mut c = s.smtp();
    c.ehlo("tiny.test");
    c.expect("MAIL FROM:<t@demo.test>", 250, "2.1.0");
    c.expect("RCPT TO:<postmaster@localhost>", 250, "2.1.5");
    c.expect("DATA", 354, "End data");
    // 60 KB of 60-octet lines, some starting with a stuffed dot, written in 1..=13
    // octet pieces with TCP_NODELAY, pausing now and then so most reads are tiny.
    let mut body = Vec::new();
    for i in 0..1000 {
        if i % 3 == 0 {
            body.extend_from_slice(b".");
        }
        body.extend_from_slice(format!("line {i:04} {}\r\n", "y".repeat(48)).as_bytes());
    }
    let wire = tern_tests::dot_stuff(&body);
    let mut t = c.socket().try_clone().unwrap();
    let mut off = 0;
    let mut k = 0usize;
    while off < wire.len() {
        let n = (k % 13 + 1).min(wire.len() - off);
        t.write_all(&wire[off..off + n]).unwrap();
        off += n;
        k += 1;
        if k.is_multiple_of(8) {
            std::thread::sleep(Duration::from_micros(300));
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    let during = rss_kib(s.pid());
    c.send(b".\r\n");
    let id = c.read_reply().queued_id();
    eprintln!(
        "{} octets in {k} writes: VmRSS {before} -> {during} KiB while the body was held",
        wire.len()
    );
    assert_eq!(s.stored_by_id(&id).content(), &body[..]);
    // Measured 2026-11-29: +0.2 MB; before body reads reused their buffer and small
    // pieces were coalesced, +19 MB for these 60 KB.
    assert!(
        during.saturating_sub(before) < 4 * 1024,
        "VmRSS grew by {} KiB",
        during - before
    );
}
