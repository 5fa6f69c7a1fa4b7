//! e2e 03: what survives, and how tern stops.
//!
//! - A 250 after the final dot is a promise: after `kill -9` and a restart on the same
//!   directory every acknowledged message is in the queue with its envelope and its exact
//!   bytes (chasquid's t-03-queue_persistency, with SIGKILL instead of a clean stop).
//! - SIGTERM stops gracefully: idle sessions get 421 4.3.2, a session inside DATA may
//!   finish and gets its 250 before the 421, new connections are not served.
//! - 1000 concurrent connections are all served.

use std::sync::{Arc, Barrier};
use std::time::Duration;

use tern_tests::{ehlo_client, Client, Server};

struct Sent {
    id: String,
    from: String,
    to: Vec<String>,
    body: Vec<u8>,
}

#[test]
fn kill9_after_250_loses_nothing() {
    let mut s = Server::with(&[]);
    let mut sent: Vec<Sent> = Vec::new();
    // A few sessions, several messages each, DATA and BDAT, then SIGKILL with the last
    // 250 just read (sessions still open).
    let mut open = Vec::new();
    for conn in 0..4 {
        let mut c = ehlo_client(&s);
        for i in 0..5 {
            let from = format!("s{conn}m{i}@example.com");
            let to: Vec<String> = (0..=i).map(|r| format!("r{r}@demo.test")).collect();
            let tor: Vec<&str> = to.iter().map(String::as_str).collect();
            let mut body = format!("Subject: {conn}/{i}\r\n\r\n").into_bytes();
            for l in 0..(i * 40 + conn * 3) {
                body.extend_from_slice(format!("line {l} of {conn}/{i}\r\n").as_bytes());
            }
            body.extend_from_slice(b"\r\n.leading dot\r\nend\r\n");
            let id = if i % 2 == 0 {
                c.send_mail(&from, &tor, &body)
            } else {
                c.expect(&format!("MAIL FROM:<{from}>"), 250, "2.1.0");
                for t in &tor {
                    c.expect(&format!("RCPT TO:<{t}>"), 250, "2.1.5");
                }
                let mut wire = format!("BDAT {} LAST\r\n", body.len()).into_bytes();
                wire.extend_from_slice(&body);
                c.send(&wire);
                c.read_reply().queued_id()
            };
            sent.push(Sent { id, from, to, body });
        }
        open.push(c);
    }
    s.kill9();
    drop(open);

    // Offline, before the restart: the queue tool sees them.
    let q = s.queue_list();
    assert_eq!(q.len(), sent.len(), "queue after SIGKILL: {q:?}");

    s.restart();
    let q = s.queue_list();
    for m in &sent {
        let e = q
            .iter()
            .find(|e| e.id == m.id)
            .unwrap_or_else(|| panic!("acknowledged message {} lost; queue: {q:?}", m.id));
        assert_eq!(e.sender, m.from, "{}", m.id);
        assert_eq!(e.recipients, m.to, "{}", m.id);
    }
    assert_eq!(q.len(), sent.len(), "unexpected extra messages: {q:?}");
    let stored = s.stored();
    for m in &sent {
        let st = stored.iter().find(|x| x.id == m.id).expect("stored");
        assert_eq!(st.content(), &m.body[..], "body of {} not byte-exact", m.id);
    }

    // The restarted server accepts more, with ids that do not collide.
    let mut c = ehlo_client(&s);
    let id = c.send_mail(
        "after@example.com",
        &["b@demo.test"],
        b"Subject: after\r\n\r\nx\r\n",
    );
    c.quit();
    assert!(sent.iter().all(|m| m.id != id), "queue id {id} reused");
    assert_eq!(s.queue_list().len(), sent.len() + 1);
}

/// SIGKILL while several clients are sending: every message whose 250 reached a client
/// is in the queue after the restart, and every record in the spool is readable.
#[test]
fn kill9_under_concurrent_load() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;
    let mut s = Server::with(&[]);
    let acked: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let addr = s.smtp;
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let acked = acked.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                // Panics here are the expected connection errors once the server is gone.
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let mut c = Client::connect(addr);
                    c.expect_greeting();
                    c.ehlo("client.test");
                    let mut i = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let from = format!("t{t}n{i}@example.com");
                        let id = c.send_mail(&from, &["b@demo.test"], b"Subject: l\r\n\r\nx\r\n");
                        acked.lock().unwrap().push((id, from));
                        i += 1;
                    }
                }));
            })
        })
        .collect();
    // Let some messages through, then pull the plug mid-stream.
    let t0 = std::time::Instant::now();
    while acked.lock().unwrap().len() < 20 && t0.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(10));
    }
    s.kill9();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() >= 20,
        "only {} messages acknowledged",
        acked.len()
    );
    s.restart();
    let q = s.queue_list();
    for (id, from) in &acked {
        let e = q
            .iter()
            .find(|e| &e.id == id)
            .unwrap_or_else(|| panic!("acknowledged {id} lost after SIGKILL"));
        assert_eq!(&e.sender, from);
    }
    // Every record is readable (read_body verifies checksums).
    for m in s.stored() {
        assert_eq!(m.content(), b"Subject: l\r\n\r\nx\r\n", "{}", m.id);
    }
}

#[test]
fn sigterm_idle_session_gets_421() {
    let mut s = Server::with(&["shutdown.grace=5s"]);
    let mut greeted = s.smtp();
    let mut idle = ehlo_client(&s);
    let mut in_tx = ehlo_client(&s);
    // Inside a transaction but not in DATA: that is not "finishing a message".
    in_tx.expect("MAIL FROM:<a@example.com>", 250, "2.1.0");
    s.sigterm();
    for c in [&mut greeted, &mut idle] {
        c.read_reply().check(
            421,
            "4.3.2 localhost Service shutting down, closing channel",
        );
        assert!(c.closed(), "still open after 421");
    }
    // The transaction session is closed at the latest when the grace period ends.
    let r = in_tx.read_reply();
    r.check(421, "4.3.2");
    let st = s.wait(Duration::from_secs(15));
    assert!(st.success(), "exit status after SIGTERM: {st}");
}

#[test]
fn sigterm_mid_data_may_finish() {
    // One shard, so that the idle session's 421 below proves the only shard is stopping.
    let mut s = Server::with(&["shutdown.grace=10s", "shards=1"]);
    let mut c = ehlo_client(&s);
    let mut idle = ehlo_client(&s);
    c.expect("MAIL FROM:<late@example.com>", 250, "2.1.0");
    c.expect("RCPT TO:<b@demo.test>", 250, "2.1.5");
    c.expect("DATA", 354, "End data");
    c.send(b"Subject: late\r\n\r\nfirst half\r\n");
    s.sigterm();
    // The shard has stopped accepting once it told its idle session; then a new client
    // must not be served.
    idle.read_reply().check(421, "4.3.2");
    assert!(idle.closed(), "still open after 421");
    if let Ok(mut t) = std::net::TcpStream::connect(s.smtp) {
        use std::io::Read;
        t.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 512];
        let n = t.read(&mut buf).unwrap_or(0);
        assert!(
            !buf[..n].starts_with(b"220"),
            "new connection greeted during shutdown: {:?}",
            String::from_utf8_lossy(&buf[..n])
        );
    }
    // The message in progress finishes and is acknowledged, then the session is closed.
    c.send(b"second half\r\n.\r\n");
    let id = c.read_reply().queued_id();
    c.read_reply().check(421, "4.3.2");
    assert!(c.closed());
    let st = s.wait(Duration::from_secs(15));
    assert!(st.success(), "exit status after SIGTERM: {st}");
    let q = s.queue_list();
    assert_eq!(q.len(), 1, "{q:?}");
    assert_eq!(q[0].id, id);
    assert_eq!(
        s.stored_by_id(&id).content(),
        b"Subject: late\r\n\r\nfirst half\r\nsecond half\r\n"
    );
}

/// Raises RLIMIT_NOFILE's soft limit to `want` (or the hard limit).
fn raise_nofile(want: u64) {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl), 0);
        if rl.rlim_cur < want {
            rl.rlim_cur = want.min(rl.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &rl);
        }
    }
}

#[test]
fn thousand_concurrent_connections() {
    const N: usize = 1000;
    const THREADS: usize = 10;
    // The child inherits the raised limit too.
    raise_nofile(4 * N as u64 + 256);
    let s = Server::with(&[
        "limits.connections_per_ip=100000",
        "limits.connections_per_shard=100000",
    ]);
    let addr = s.smtp;
    let barrier = Arc::new(Barrier::new(THREADS));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                // Open and greet all of this thread's connections...
                let mut cs: Vec<Client> = (0..N / THREADS)
                    .map(|_| {
                        let mut c = Client::connect(addr);
                        c.expect_greeting();
                        c
                    })
                    .collect();
                // ...wait until all 1000 are open at once...
                barrier.wait();
                let mut ids = Vec::new();
                for (i, c) in cs.iter_mut().enumerate() {
                    c.ehlo("client.test");
                    if i % 10 == 0 {
                        ids.push(c.send_mail(
                            &format!("t{t}c{i}@example.com"),
                            &["b@demo.test"],
                            b"Subject: many\r\n\r\nhello\r\n",
                        ));
                    }
                }
                for c in cs {
                    c.quit();
                }
                ids
            })
        })
        .collect();
    let mut ids = Vec::new();
    for h in handles {
        ids.extend(h.join().expect("client thread failed"));
    }
    assert_eq!(ids.len(), N / 10);
    let mut uniq = ids.clone();
    uniq.sort();
    uniq.dedup();
    assert_eq!(uniq.len(), ids.len(), "duplicate queue ids");
    assert_eq!(s.queue_list().len(), N / 10);
}

/// The spool syncer threads (which every 250 waits on) run at `spool.syncer_nice`, so a
/// waking one preempts the busy shard instead of queueing behind it for a CPU.
#[test]
fn spool_syncer_threads_run_at_the_configured_nice_value() {
    // A negative nice value needs root (CAP_SYS_NICE) when nothing raised RLIMIT_NICE.
    if !tern_tests::require(unsafe { libc::geteuid() } == 0, "root") {
        return;
    }
    let s = Server::start(None, &["spool.syncer_nice=-7"]);
    let nices = tern_tests::thread_nices(s.pid(), "tern-sync-");
    assert!(!nices.is_empty(), "no tern-sync-* thread");
    assert!(nices.iter().all(|(_, n)| *n == -7), "{nices:?}");
}
