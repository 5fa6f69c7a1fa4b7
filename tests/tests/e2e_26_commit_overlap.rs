//! 26: crash safety of overlapped group commits (issue 17).
//!
//! With `spool.commits_in_flight = 2` a shard writes and fdatasyncs a second batch while
//! the first is still in flight, and releases the 250s in the order the batches started.
//! Sixteen clients send 1,200 messages through a relay that is killed with SIGKILL five
//! times, each time right after its metrics show batches overlapping (so commits are in
//! flight on both syncers at the kill), and restarted on the same spool. Every message
//! that got a 250 must arrive at the next hop (lost: 0), and duplicates are bounded by
//! what can be in flight at a kill. Once on the syncer threads (`spool.commit = "thread"`)
//! and once on the shards' own io_uring (`"uring"`).

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
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

/// `name{shard="total"}` from the server's /metrics (0 when the endpoint cannot be read,
/// e.g. the server was just killed).
fn metric_total(addr: SocketAddr, name: &str) -> u64 {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return 0;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return 0;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    let prefix = format!("{name}{{shard=\"total\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

/// One pipelined transaction on a fresh connection: Ok(true) only for a final 250.
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
    w.write_all(
        format!(
            "EHLO overlap.test\r\nMAIL FROM:<s@demo.test>\r\nRCPT TO:<a@demo.test>\r\nDATA\r\nSubject: {subject}\r\n\r\nbody\r\n.\r\nQUIT\r\n"
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
fn kill9_with_overlapped_commits_in_flight_loses_nothing_acknowledged() {
    kill9_rounds("thread");
}

/// The same on the io_uring commit path (`spool.commit = "uring"`): kill -9 while batches
/// are in flight on the shards' own rings.
#[test]
fn kill9_with_commits_in_flight_on_io_uring_loses_nothing_acknowledged() {
    kill9_rounds("uring");
}

fn kill9_rounds(commit: &str) {
    const N: u32 = 1200;
    const SENDERS: u32 = 16;
    const ROUNDS: u32 = 5;
    const DEST_CONCURRENCY: u32 = 20;
    let hop = next_hop(None, &["limits.connections_per_ip=1000"]);
    let route = format!(
        r#"queue.routes={{"*"="smtp:[127.0.0.1]:{}"}}"#,
        hop.server.smtp.port()
    );
    let mut relay = Server::with(&[
        &route,
        r#"relay.trusted_networks=["127.0.0.0/8"]"#,
        "spool.commits_in_flight=2",
        &format!("spool.commit=\"{commit}\""),
        "queue.retry_interval=1s",
        "queue.max_retry_interval=2s",
        "queue.connect_timeout=2s",
        "limits.connections_per_ip=1000",
        &format!("queue.destination_concurrency={DEST_CONCURRENCY}"),
    ]);
    let addr = Arc::new(Mutex::new(relay.smtp));
    let next = Arc::new(AtomicU32::new(0));
    let acked = Arc::new(Mutex::new(HashSet::new()));
    let senders: Vec<_> = (0..SENDERS)
        .map(|_| {
            let (addr, next, acked) = (addr.clone(), next.clone(), acked.clone());
            std::thread::spawn(move || loop {
                let n = next.fetch_add(1, Ordering::SeqCst);
                if n >= N {
                    return;
                }
                for _ in 0..100 {
                    let a = *addr.lock().unwrap();
                    match send_one(a, &format!("overlap-{n}")) {
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
    for round in 0..ROUNDS {
        // Kill only once this process has had two batches in flight at once, and a few
        // more since: the senders keep both syncers busy, so commits are in flight.
        let metrics = relay.metrics.expect("the demo prints its metrics address");
        wait_for("overlapped group commits", Duration::from_secs(30), || {
            metric_total(metrics, "tern_commit_batches_overlapped_total") >= 3
        });
        relay.kill9();
        relay.restart();
        *addr.lock().unwrap() = relay.smtp;
        eprintln!("round {round}: killed with overlapped commits in flight and restarted");
    }
    for s in senders {
        s.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() as u32 > N / 2,
        "too few messages acknowledged: {}",
        acked.len()
    );
    let start = Instant::now();
    loop {
        let got = maildir_subjects(hop.server.dir());
        let have: HashSet<u32> = got
            .iter()
            .filter_map(|s| s.strip_prefix("overlap-")?.parse().ok())
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
        "overlap crash rounds ({commit}): {ROUNDS}, acknowledged: {}, delivered: {}, lost: 0, duplicates: {duplicates}",
        acked.len(),
        counts.len()
    );
    // In flight at a kill: one transaction per sender on the accepting side, and the
    // deliveries the next hop took but the relay had not recorded yet.
    let bound = ROUNDS * (SENDERS + relay.shards as u32 * DEST_CONCURRENCY);
    assert!(
        duplicates <= bound,
        "{duplicates} duplicates after {ROUNDS} kills: more than the {bound} that can be in flight"
    );
}
