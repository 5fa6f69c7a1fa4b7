//! 08: crash safety and backpressure.
//!
//! - 1,000 messages are sent by four clients while the relay is killed with SIGKILL at
//!   random moments (three rounds, during accept and during delivery to the next hop)
//!   and restarted on the same spool. Every message that got a 250 must arrive at the
//!   next hop (lost: 0); duplicates (at-least-once delivery) are counted and bounded by
//!   what can be in flight at a kill. The same with two group commits in flight per
//!   shard (issue 17), killed right after the metrics show batches overlapping, on the
//!   syncer threads and on the shards' own io_uring (five rounds, sixteen clients each).
//!   The same on io_uring with SIGTERM instead (graceful stops while batches are in
//!   flight: nothing lost, no torn write left). Every recovery after a kill must find no
//!   corrupt region: a kill -9 can only leave
//!   interrupted writes (records that never got a 250, counted separately, segments
//!   recycled); a "corrupt" one would keep its segment on disk forever.
//! - With the next hop down, the queue's high-water mark turns new mail away with
//!   452 4.3.1; once the queue drains, mail is accepted again.
//! - 20 rounds of SIGKILL and an immediate restart on the same fixed ports and spool (what
//!   systemd's Restart= does): every restart comes up and accepts mail; a second server on
//!   the same spool or the same ports is still refused while the first runs.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tern_tests::{next_hop, wait_for, Server};

fn maildir_subjects(dir: &Path) -> Vec<String> {
    let new = dir.join("maildir").join("new");
    std::fs::read_dir(new)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read(e.path()).ok())
                .filter_map(|b| {
                    let t = String::from_utf8_lossy(&b).into_owned();
                    t.lines()
                        .find(|l| l.starts_with("Subject: "))
                        .map(|l| l["Subject: ".len()..].to_string())
                })
                .collect()
        })
        .unwrap_or_default()
}

/// One transaction over a fresh connection, without panicking on errors: Ok(true) only
/// when the final reply was a 250.
fn send_one(addr: SocketAddr, subject: &str) -> std::io::Result<bool> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    let mut reply = |r: &mut BufReader<TcpStream>| -> std::io::Result<u16> {
        loop {
            line.clear();
            if r.read_line(&mut line)? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            if line.len() >= 4 && line.as_bytes()[3] == b' ' {
                return Ok(line[..3].parse().unwrap_or(0));
            }
        }
    };
    if reply(&mut r)? != 220 {
        return Ok(false);
    }
    // Pipelined: one write for the whole transaction.
    w.write_all(
        format!(
            "EHLO crash.test\r\nMAIL FROM:<s@demo.test>\r\nRCPT TO:<a@demo.test>\r\nDATA\r\nSubject: {subject}\r\n\r\nbody\r\n.\r\nQUIT\r\n"
        )
        .as_bytes(),
    )?;
    for expect in [250u16, 250, 250, 354] {
        if reply(&mut r)? != expect {
            return Ok(false);
        }
    }
    Ok(reply(&mut r)? == 250)
}

#[test]
fn kill9_rounds_lose_nothing_acknowledged() {
    // Three SIGKILL rounds at pseudo-random moments, during accept and delivery.
    let mut seed = 0x1234_5678u64;
    kill9_rounds(
        "crash",
        Rounds {
            messages: 1000,
            senders: 4,
            rounds: 3,
            graceful: false,
        },
        &[],
        |_, _, _| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            std::thread::sleep(Duration::from_millis(200 + (seed >> 33) % 600));
        },
    );
}

/// Two group commits in flight per shard (`spool.commits_in_flight = 2`, issue 17): each
/// kill comes right after the server's metrics show batches overlapping, so commits are
/// in flight on both syncers at the kill.
#[test]
fn kill9_with_overlapped_commits_in_flight_loses_nothing_acknowledged() {
    overlapped_rounds("thread");
}

/// The same on the io_uring commit path (`spool.commit = "uring"`): kill -9 while batches
/// are in flight on the shards' own rings.
#[test]
fn kill9_with_commits_in_flight_on_io_uring_loses_nothing_acknowledged() {
    overlapped_rounds("uring");
}

fn overlapped_rounds(commit: &str) {
    overlapped(commit, false);
}

/// Review finding F6: a graceful stop (SIGTERM) while batches are in flight on the
/// io_uring path, where they are tasks of the shard's executor. The shard awaits
/// `GroupCommit::close` before its executor ends: every 250 is on disk, and no write is
/// abandoned half-way (no torn tail, no interrupted write found by the next start).
#[test]
fn sigterm_with_commits_in_flight_on_io_uring_loses_nothing_and_abandons_no_write() {
    overlapped("uring", true);
}

fn overlapped(commit: &str, graceful: bool) {
    let stop = if graceful { "sigterm" } else { "overlap" };
    let mut overlapping_rounds = 0;
    kill9_rounds(
        &format!("{stop}-{commit}"),
        Rounds {
            messages: 1200,
            senders: 16,
            rounds: if graceful { 3 } else { 5 },
            graceful,
        },
        &[
            "spool.commits_in_flight=2",
            &format!("spool.commit=\"{commit}\""),
        ],
        |_, relay, load_done| {
            // The load can end before the last round (a fast relay): those rounds stop a
            // relay that only delivers, which is fine, but some must overlap.
            let metrics = relay.metrics.expect("the demo prints its metrics address");
            let overlapped = || metric_total(metrics, "tern_commit_batches_overlapped_total") >= 3;
            wait_for(
                "overlapped group commits (or the end of the load)",
                Duration::from_secs(30),
                || overlapped() || load_done(),
            );
            if overlapped() {
                overlapping_rounds += 1;
            }
        },
    );
    assert!(
        overlapping_rounds >= 1,
        "no round saw group commits overlap before its stop"
    );
}

/// The size of a crash run.
struct Rounds {
    messages: u32,
    senders: u32,
    rounds: u32,
    /// Stop with SIGTERM (and wait for the exit) instead of SIGKILL.
    graceful: bool,
}

/// `r.senders` clients send `r.messages` messages (subject `{tag}-{n}`) through a relay
/// with `extra` settings to a next hop; `r.rounds` times, once `before_kill` returns, the
/// relay is killed with SIGKILL (with `r.graceful`: stopped with SIGTERM, which must then
/// leave no write half-done) and restarted on the same spool. Every message that got
/// a 250 must arrive at the next hop (lost: 0); duplicates are counted and bounded by
/// what can be in flight at a kill.
/// `before_kill` gets the round, the relay and whether every sender is done.
fn kill9_rounds(
    tag: &str,
    r: Rounds,
    extra: &[&str],
    mut before_kill: impl FnMut(u32, &Server, &dyn Fn() -> bool),
) {
    // Deliveries in flight to the one destination, per shard (set below, the default).
    const DEST_CONCURRENCY: u32 = 20;
    let hop = next_hop(None, &["limits.connections_per_ip=1000"]);
    let route = format!(
        r#"queue.routes={{"*"="smtp:[127.0.0.1]:{}"}}"#,
        hop.server.smtp.port()
    );
    let dest = format!("queue.destination_concurrency={DEST_CONCURRENCY}");
    let mut sets = vec![
        route.as_str(),
        r#"relay.trusted_networks=["127.0.0.0/8"]"#,
        "queue.retry_interval=1s",
        "queue.max_retry_interval=2s",
        "queue.connect_timeout=2s",
        "limits.connections_per_ip=1000",
        dest.as_str(),
    ];
    sets.extend_from_slice(extra);
    let mut relay = Server::with(&sets);
    let addr = Arc::new(Mutex::new(relay.smtp));
    let next = Arc::new(AtomicU32::new(0));
    let acked = Arc::new(Mutex::new(HashSet::new()));
    let n_messages = r.messages;
    let finished = Arc::new(AtomicU32::new(0));
    let senders: Vec<_> = (0..r.senders)
        .map(|_| {
            let (addr, next, acked) = (addr.clone(), next.clone(), acked.clone());
            let finished = finished.clone();
            let tag = tag.to_string();
            std::thread::spawn(move || loop {
                let n = next.fetch_add(1, Ordering::SeqCst);
                if n >= n_messages {
                    finished.fetch_add(1, Ordering::SeqCst);
                    return;
                }
                for _ in 0..100 {
                    let a = *addr.lock().unwrap();
                    match send_one(a, &format!("{tag}-{n}")) {
                        Ok(true) => {
                            acked.lock().unwrap().insert(n);
                            break;
                        }
                        _ => std::thread::sleep(Duration::from_millis(30)),
                    }
                }
            })
        })
        .collect();
    let mut interrupted = 0;
    let load_done = || finished.load(Ordering::SeqCst) == r.senders;
    for round in 0..r.rounds {
        before_kill(round, &relay, &load_done);
        if r.graceful {
            relay.sigterm();
            let st = relay.wait(Duration::from_secs(60));
            assert!(st.success(), "{tag} round {round}: graceful stop: {st}");
        }
        relay.restart();
        *addr.lock().unwrap() = relay.smtp;
        // (The log reaches us through a pipe: wait for every shard's recovery line.)
        wait_for(
            "every shard's recovery line",
            Duration::from_secs(10),
            || relay.stderr_log().matches("spool recovered").count() >= relay.shards,
        );
        let log = relay.stderr_log();
        let (corrupt, cut) = (
            recovery_field(&log, "corrupt_skipped"),
            recovery_field(&log, "interrupted_skipped"),
        );
        assert_eq!(
            corrupt, 0,
            "{tag} round {round}: a kill -9 left a region recovery calls corrupt (its segment is never recycled)"
        );
        interrupted += cut;
        if r.graceful {
            assert_eq!(
                (recovery_field(&log, "torn_tails_cut"), cut),
                (0, 0),
                "{tag} round {round}: a graceful stop left a write half-done"
            );
        }
        eprintln!(
            "{tag} round {round}: stopped and restarted; interrupted writes skipped mid-segment: {cut}"
        );
    }
    for s in senders {
        s.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() as u32 > r.messages / 2,
        "too few messages acknowledged: {}",
        acked.len()
    );
    // Everything drains to the next hop.
    let prefix = format!("{tag}-");
    let start = Instant::now();
    loop {
        let got = maildir_subjects(hop.server.dir());
        let have: HashSet<u32> = got
            .iter()
            .filter_map(|s| s.strip_prefix(prefix.as_str())?.parse().ok())
            .collect();
        if acked.is_subset(&have) && relay.queue_list().is_empty() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "lost: {} of {} acknowledged messages never arrived",
            acked.difference(&have).count(),
            acked.len()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let got = maildir_subjects(hop.server.dir());
    let mut counts: HashMap<&str, u32> = HashMap::new();
    for s in &got {
        *counts.entry(s.as_str()).or_default() += 1;
    }
    let duplicates: u32 = counts.values().map(|c| c - 1).sum();
    eprintln!(
        "{tag}: {} kill rounds, acknowledged: {}, delivered: {}, lost: 0, duplicates: {duplicates}, interrupted writes mid-segment: {interrupted}",
        r.rounds,
        acked.len(),
        counts.len()
    );
    // A kill can duplicate only what is in flight at that moment: on the accepting side,
    // one transaction per sender (stored, its 250 lost, sent again); on the delivering
    // side, the deliveries the next hop took but the relay had not recorded yet, at most
    // the destination's concurrency on every shard. The next hop itself is never killed.
    let bound = r.rounds * (r.senders + relay.shards as u32 * DEST_CONCURRENCY);
    // A graceful stop lets the deliveries in flight finish and record themselves, and
    // answers every stored message before it closes: nothing is sent twice.
    assert!(
        !r.graceful || duplicates == 0,
        "{duplicates} duplicates after {} graceful stops",
        r.rounds
    );
    assert!(
        duplicates <= bound,
        "{duplicates} duplicates after {} kills: more than the {bound} that can be in flight",
        r.rounds
    );
}

/// The sum of `field=N` over the "spool recovered" lines of a log (one per shard).
fn recovery_field(log: &str, field: &str) -> usize {
    let key = format!("{field}=");
    log.lines()
        .filter(|l| l.contains("spool recovered"))
        .filter_map(|l| {
            let v = &l[l.find(&key)? + key.len()..];
            v.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse::<usize>()
                .ok()
        })
        .sum()
}

/// `name{shard="total"}` from the server's /metrics (0 when the endpoint cannot be read,
/// e.g. the server was just killed).
fn metric_total(addr: SocketAddr, name: &str) -> u64 {
    tern_tests::metric_value(addr, &format!("{name}{{shard=\"total\"}}")).unwrap_or(0.0) as u64
}

#[test]
fn high_water_mark_defers_new_mail_until_the_queue_drains() {
    let port = tern_tests::free_port();
    let route = format!(r#"queue.routes={{"*"="smtp:[127.0.0.1]:{port}"}}"#);
    // One shard so the mark (per shard) is exact: 4 queued messages.
    let relay = Server::with(&[
        &route,
        "shards=1",
        "queue.high_water_messages=4",
        "queue.retry_interval=1h",
        "queue.connect_timeout=1s",
    ]);
    let mut c = relay.smtp();
    c.ehlo("client.test");
    for i in 0..4 {
        c.send_mail(
            "s@demo.test",
            &["a@demo.test"],
            format!("Subject: q{i}\r\n\r\nx\r\n").as_bytes(),
        );
    }
    c.expect("MAIL FROM:<s@demo.test>", 250, "2.1.0");
    c.expect("RCPT TO:<a@demo.test>", 250, "2.1.5");
    c.expect("DATA", 354, "");
    c.send(b"Subject: over\r\n\r\nx\r\n.\r\n");
    c.read_reply().check(452, "4.3.1");
    // The session goes on; bring the next hop up and run the queue.
    let hop = next_hop(Some(port), &[]);
    c.expect("ETRN demo.test", 250, "2.0.0");
    wait_for("the queue to drain", Duration::from_secs(20), || {
        relay.queue_list().is_empty()
    });
    let id = c.send_mail(
        "s@demo.test",
        &["a@demo.test"],
        b"Subject: after\r\n\r\nx\r\n",
    );
    assert!(!id.is_empty());
    let _ = hop;
}

#[test]
fn high_water_bytes_defers_new_mail_until_segments_are_recycled() {
    let port = tern_tests::free_port();
    let route = format!(r#"queue.routes={{"*"="smtp:[127.0.0.1]:{port}"}}"#);
    // One shard with 1 MiB segments and a 2 MiB mark: the mark is passed when a second
    // segment has to be created for the messages that no longer fit the first.
    let relay = Server::with(&[
        &route,
        "shards=1",
        "spool.segment_size=1048576",
        "queue.high_water_bytes=2097152",
        "queue.retry_interval=1h",
        "queue.connect_timeout=1s",
    ]);
    let line = "x".repeat(76);
    let mut big = String::from("Subject: big\r\n\r\n");
    while big.len() < 400 * 1024 {
        big.push_str(&line);
        big.push_str("\r\n");
    }
    let mut c = relay.smtp();
    c.ehlo("client.test");
    // Three 400 KiB messages: the third needs the second segment (2 MiB on disk).
    for _ in 0..3 {
        c.send_mail("s@demo.test", &["a@demo.test"], big.as_bytes());
    }
    c.expect("MAIL FROM:<s@demo.test>", 250, "2.1.0");
    c.expect("RCPT TO:<a@demo.test>", 250, "2.1.5");
    c.expect("DATA", 354, "");
    c.send(b"Subject: over\r\n\r\nx\r\n.\r\n");
    c.read_reply().check(452, "4.3.1");
    // Deliver everything: the first segment is finished and deleted, the spool is back
    // under the mark's low water and mail is accepted again.
    let hop = next_hop(Some(port), &[]);
    c.expect("ETRN demo.test", 250, "2.0.0");
    wait_for("the queue to drain", Duration::from_secs(20), || {
        relay.queue_list().is_empty()
    });
    let start = Instant::now();
    loop {
        c.expect("MAIL FROM:<s@demo.test>", 250, "2.1.0");
        c.expect("RCPT TO:<a@demo.test>", 250, "2.1.5");
        c.expect("DATA", 354, "");
        c.send(b"Subject: after\r\n\r\nx\r\n.\r\n");
        let r = c.read_reply();
        if r.code == 250 {
            break;
        }
        r.check(452, "4.3.1");
        // Segment recycling runs after the last message of a segment is finished.
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "still refusing after the queue drained"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = hop;
}

/// `listeners.*` settings on fixed loopback ports (restarts keep them).
fn fixed_ports() -> Vec<String> {
    ["smtp", "submission", "smtps"]
        .iter()
        .map(|k| format!(r#"listeners.{k}=["127.0.0.1:{}"]"#, tern_tests::free_port()))
        .collect()
}

#[test]
fn kill9_and_immediate_restart_on_the_same_ports_comes_up_every_round() {
    // What systemd's Restart= does: the new process starts while the kernel may still be
    // tearing down the dead one's io_uring and listening sockets (see engine/src/bind.rs).
    let ports = fixed_ports();
    let sets: Vec<&str> = ports.iter().map(String::as_str).collect();
    let mut relay = Server::with(&sets);
    let port = relay.smtp.port();
    let mut ids = Vec::new();
    for round in 0..20 {
        assert_eq!(relay.smtp.port(), port, "round {round}: the port changed");
        let mut c = relay.smtp();
        c.ehlo("restart.test");
        let id = c.send_mail(
            "s@demo.test",
            &["a@demo.test"],
            format!("Subject: round {round}\r\n\r\nx\r\n").as_bytes(),
        );
        assert!(!id.is_empty(), "round {round}: no queue id in the 250");
        ids.push(id);
        // Killed with a client still connected, as a busy server would be.
        relay.kill9();
        drop(c);
        // Panics with the server's stderr unless it prints `ready:`.
        relay.restart();
    }
    // The last restart serves too, and every acknowledged message survived the rounds.
    let mut c = relay.smtp();
    c.ehlo("restart.test");
    ids.push(c.send_mail(
        "s@demo.test",
        &["a@demo.test"],
        b"Subject: last\r\n\r\nx\r\n",
    ));
    c.quit();
    let queued: HashSet<String> = relay.queue_list().into_iter().map(|e| e.id).collect();
    for id in &ids {
        assert!(queued.contains(id), "{id} is not in the queue: {queued:?}");
    }
}

#[test]
fn a_second_server_on_the_same_spool_or_ports_is_refused() {
    let ports = fixed_ports();
    let sets: Vec<&str> = ports.iter().map(String::as_str).collect();
    let relay = Server::with(&sets);
    // Same directory (spool, admin socket, ports).
    let log = tern_tests::start_refused(relay.dir(), &sets);
    assert!(log.contains("is tern already running?"), "{log}");
    // Same spool and ports, another admin socket: the spool lock refuses it.
    let other = tempfile::tempdir().unwrap();
    let admin = format!("admin.socket={:?}", other.path().join("admin.sock"));
    let mut with_admin = sets.clone();
    with_admin.push(&admin);
    let log = tern_tests::start_refused(relay.dir(), &with_admin);
    assert!(
        log.contains("spool") && log.contains("is in use by another server"),
        "{log}"
    );
    // Same ports, its own spool: the port probe refuses it (after its patience).
    let log = tern_tests::start_refused(other.path(), &sets);
    assert!(
        log.contains(&format!("cannot listen on {}", relay.smtp)) && log.contains("in use"),
        "{log}"
    );
    // The first server kept all its traffic.
    let mut c = relay.smtp();
    c.ehlo("first.test");
    let id = c.send_mail(
        "s@demo.test",
        &["a@demo.test"],
        b"Subject: first\r\n\r\nx\r\n",
    );
    c.quit();
    assert!(relay.queue_list().iter().any(|e| e.id == id));
}
