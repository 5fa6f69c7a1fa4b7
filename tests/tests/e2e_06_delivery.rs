//! 06: store and forward: one tern relays to another (the "next hop"), which delivers
//! into a Maildir. Covers per-recipient 2xx/5xx handling, a bounce (RFC 3464) back to the
//! sender, no bounce for a null sender, a retry after the next hop was down, per-route
//! TLS verification, NOTIFY=SUCCESS passed on (and reported by the delivering hop), and
//! `queue.destination_rate` shared among the shards.

use std::time::Duration;

use tern_tests::{maildir, next_hop, wait_for, Server};

/// The relay: trusts loopback clients to relay anywhere, routes every domain to
/// `hop_port` and retries quickly.
fn relay(hop_port: u16) -> Server {
    let route = format!(r#"queue.routes={{"*"="smtp:[127.0.0.1]:{hop_port}"}}"#);
    Server::with(&[
        &route,
        r#"relay.trusted_networks=["127.0.0.0/8"]"#,
        "queue.retry_interval=1s",
        "queue.max_retry_interval=1s",
        "queue.command_timeout=10s",
        "queue.connect_timeout=2s",
    ])
}

#[test]
fn relays_to_next_hop_per_recipient_and_bounces_the_refused_one() {
    let hop = next_hop(None, &[]);
    let relay = relay(hop.smtp.port());
    let mut c = relay.smtp();
    c.ehlo("client.test");
    // Two recipients the next hop accepts, one it refuses (not its domain): the relay
    // accepts all three (its client is trusted), then delivers per recipient.
    let id = c.send_mail(
        "sender@demo.test",
        &["a@demo.test", "b@localhost", "nobody@elsewhere.example"],
        b"Subject: relayed\r\n\r\nline one\r\n.dotted\r\n",
    );
    // a@ and b@ arrive at the next hop's Maildir; the bounce for nobody@ goes back to
    // sender@demo.test, which the next hop also delivers.
    wait_for(
        "3 messages at the next hop",
        Duration::from_secs(20),
        || maildir(hop.dir()).len() >= 3,
    );
    let got = maildir(hop.dir());
    let delivered: Vec<&String> = got
        .iter()
        .map(|(_, c)| c)
        .filter(|c| c.contains("Subject: relayed"))
        .collect();
    assert!(
        delivered
            .iter()
            .any(|c| c.contains("Delivered-To: a@demo.test") && c.contains("\n.dotted\n")),
        "{got:?}"
    );
    assert!(delivered
        .iter()
        .any(|c| c.contains("Delivered-To: b@localhost")));
    // Both Received: headers are there: the relay's and the next hop's.
    assert!(
        delivered[0].matches("Received: from").count() >= 2,
        "{}",
        delivered[0]
    );
    let bounce = got
        .iter()
        .map(|(_, c)| c)
        .find(|c| c.contains("multipart/report"))
        .expect("a DSN for the refused recipient");
    assert!(bounce.contains("Return-Path: <>"), "{bounce}");
    assert!(bounce.contains("Delivered-To: sender@demo.test"));
    assert!(bounce.contains("report-type=delivery-status"));
    assert!(
        bounce.contains("Final-Recipient: rfc822; nobody@elsewhere.example")
            || bounce.contains("Final-Recipient: rfc822;nobody@elsewhere.example"),
        "{bounce}"
    );
    assert!(bounce.contains("Action: failed"));
    assert!(bounce.contains("Status: 5.7.1"), "{bounce}");
    assert!(bounce.contains("Diagnostic-Code: smtp;"));
    assert!(
        bounce.contains("Subject: relayed"),
        "the original is returned (RET default)"
    );
    let _ = id;
    // Nothing is left in the relay's queue.
    wait_for("an empty relay queue", Duration::from_secs(10), || {
        relay.queue_list().is_empty()
    });
}

#[test]
fn null_sender_is_never_bounced() {
    let hop = next_hop(None, &[]);
    let relay = relay(hop.smtp.port());
    let mut c = relay.smtp();
    c.ehlo("client.test");
    let id = c.send_mail(
        "",
        &["nobody@elsewhere.example"],
        b"Subject: dsn\r\n\r\nx\r\n",
    );
    // The runner queues a DSN ("DSN queued") before it logs the recipient's outcome and
    // records it, so once the refusal is logged and the queue is empty, a bounce would
    // have been queued, and delivered, already.
    wait_for("the refusal to be logged", Duration::from_secs(15), || {
        relay
            .stderr_log()
            .lines()
            .any(|l| l.contains(&id) && l.contains("bounced"))
    });
    wait_for("the relay to finish", Duration::from_secs(15), || {
        relay.queue_list().is_empty()
    });
    let log = relay.stderr_log();
    assert!(
        !log.contains("DSN queued"),
        "a bounce to <> was queued:\n{log}"
    );
    assert!(maildir(hop.dir()).is_empty(), "a bounce to <> was sent");
    assert!(hop.queue_list().is_empty(), "a bounce to <> was sent");
}

#[test]
fn deferred_while_next_hop_is_down_then_delivered() {
    // Reserve a port for the next hop, then keep it closed for a while.
    let port = tern_tests::free_port();
    let relay = relay(port);
    let mut c = relay.smtp();
    c.ehlo("client.test");
    let id = c.send_mail(
        "s@demo.test",
        &["a@demo.test"],
        b"Subject: later\r\n\r\nx\r\n",
    );
    wait_for("the deferral to be logged", Duration::from_secs(15), || {
        relay
            .stderr_log()
            .lines()
            .any(|l| l.contains(&id) && l.contains("deferred"))
    });
    let q = relay.queue_list();
    assert!(
        q.iter().any(|e| e.id == id),
        "deferred message stays queued: {q:?}"
    );
    let hop = next_hop(Some(port), &[]);
    wait_for(
        "delivery after the next hop came up",
        Duration::from_secs(20),
        || !maildir(hop.dir()).is_empty(),
    );
    assert!(maildir(hop.dir())[0].1.contains("Subject: later"));
    wait_for("an empty relay queue", Duration::from_secs(10), || {
        relay.queue_list().is_empty()
    });
}

#[test]
fn queued_mail_survives_restart_and_is_delivered() {
    let port = tern_tests::free_port();
    let mut relay = relay(port);
    let mut c = relay.smtp();
    c.ehlo("client.test");
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(c.send_mail(
            "s@demo.test",
            &["a@demo.test"],
            format!("Subject: n{i}\r\n\r\nx\r\n").as_bytes(),
        ));
    }
    drop(c);
    relay.kill9();
    let hop = next_hop(Some(port), &[]);
    relay.restart();
    wait_for(
        "5 deliveries after restart",
        Duration::from_secs(20),
        || maildir(hop.dir()).len() >= 5,
    );
    let got = maildir(hop.dir());
    for i in 0..5 {
        assert!(got
            .iter()
            .any(|(_, c)| c.contains(&format!("Subject: n{i}\n"))));
    }
}

#[test]
fn etrn_starts_a_queue_run() {
    let port = tern_tests::free_port();
    // A long retry interval: only ETRN can make the second attempt happen in time.
    let route = format!(r#"queue.routes={{"*"="smtp:[127.0.0.1]:{port}"}}"#);
    let relay = Server::with(&[
        &route,
        r#"relay.trusted_networks=["127.0.0.0/8"]"#,
        "queue.retry_interval=1h",
        "queue.connect_timeout=2s",
    ]);
    let mut c = relay.smtp();
    c.ehlo("client.test");
    c.send_mail(
        "s@demo.test",
        &["a@demo.test"],
        b"Subject: etrn\r\n\r\nx\r\n",
    );
    wait_for(
        "the first attempt to be deferred",
        Duration::from_secs(10),
        || relay.stderr_log().contains("deferred"),
    );
    let hop = next_hop(Some(port), &[]);
    c.expect(
        "ETRN demo.test",
        250,
        "2.0.0 Queuing for node demo.test started",
    );
    wait_for("delivery after ETRN", Duration::from_secs(15), || {
        !maildir(hop.dir()).is_empty()
    });
    // Nothing left: a second ETRN says so.
    wait_for("an empty relay queue", Duration::from_secs(10), || {
        relay.queue_list().is_empty()
    });
    // The spool records a delivery just before the runner's index forgets it: until then
    // ETRN may still count the message (250), never anything else.
    wait_for(
        "ETRN to find nothing waiting",
        Duration::from_secs(10),
        || {
            let r = c.cmd("ETRN demo.test");
            if r.code == 250 {
                return false;
            }
            r.check(251, "2.0.0 OK, no messages waiting for node demo.test");
            true
        },
    );
}

#[test]
fn deliverby_return_mode_bounces_at_the_deadline() {
    let down = tern_tests::free_port();
    // The relay delivers its own bounces (to demo.test) into its Maildir; everything else
    // goes to a next hop that is down.
    let dir = tempfile::tempdir().unwrap();
    let routes = format!(
        r#"queue.routes={{"demo.test"="maildir:{}/maildir","*"="smtp:[127.0.0.1]:{down}"}}"#,
        dir.path().display()
    );
    let relay = Server::start(
        Some(dir.path()),
        &[
            &routes,
            r#"relay.trusted_networks=["127.0.0.0/8"]"#,
            "queue.retry_interval=1h",
            "queue.connect_timeout=1s",
        ],
    );
    let mut c = relay.smtp();
    c.ehlo("client.test");
    c.expect("MAIL FROM:<s@demo.test> BY=2;R", 250, "2.1.0");
    c.expect("RCPT TO:<far@elsewhere.example>", 250, "2.1.5");
    c.expect("DATA", 354, "");
    c.send(b"Subject: by\r\n\r\nx\r\n.\r\n");
    c.read_reply().check(250, "2.0.0");
    // The first attempt fails (next hop down); the runner comes back at the deadline,
    // although the retry interval is an hour, and returns the message.
    wait_for("the DELIVERBY bounce", Duration::from_secs(15), || {
        maildir(dir.path())
            .iter()
            .any(|(_, c)| c.contains("multipart/report"))
    });
    let got = maildir(dir.path());
    let dsn = &got
        .iter()
        .find(|(_, c)| c.contains("multipart/report"))
        .unwrap()
        .1;
    assert!(dsn.contains("Status: 5.4.7"), "{dsn}");
    assert!(dsn.contains("far@elsewhere.example"));
}

/// Delivery to tern-loadgen's measuring sink, which answers 4xx to half of the
/// transactions: every message arrives in the end (retries after 4xx), and the relay
/// reuses its outbound connections (the sink counts fewer connections than transactions).
#[test]
fn retries_after_4xx_and_reuses_connections() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let sink_bin = tern_tests::tern_bin().with_file_name("tern-loadgen");
    let what = format!("{} (cargo build -p tern-loadgen)", sink_bin.display());
    if !tern_tests::require(sink_bin.exists(), &what) {
        return;
    }
    let mut sink = Command::new(&sink_bin)
        .args([
            "sink",
            "--listen",
            "127.0.0.1:0",
            "--cores",
            "1",
            "--tempfail",
            "0.5",
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(sink.stderr.take().unwrap());
    let mut line = String::new();
    let addr = loop {
        line.clear();
        assert!(err.read_line(&mut line).unwrap() > 0, "sink exited");
        if let Some(a) = line.trim().strip_prefix("listening: ") {
            break a.to_string();
        }
    };
    std::thread::spawn(move || for _ in err.lines() {});
    let route = {
        let (ip, port) = addr.rsplit_once(':').unwrap();
        format!(r#"queue.routes={{"*"="smtp:[{ip}]:{port}"}}"#)
    };
    let relay = Server::with(&[
        &route,
        r#"relay.trusted_networks=["127.0.0.0/8"]"#,
        "queue.retry_interval=1s",
        "queue.max_retry_interval=1s",
        "shards=1",
    ]);
    let mut c = relay.smtp();
    c.ehlo("client.test");
    for i in 0..20 {
        c.send_mail(
            "s@demo.test",
            &["a@example.net"],
            format!("Subject: s{i}\r\n\r\nx\r\n").as_bytes(),
        );
    }
    wait_for(
        "the relay to deliver all 20",
        Duration::from_secs(45),
        || relay.queue_list().is_empty(),
    );
    unsafe { libc::kill(sink.id() as i32, libc::SIGTERM) };
    let out = sink.wait_with_output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout).to_string();
    let num = |key: &str| -> u64 {
        let i = report
            .find(&format!("\"{key}\":"))
            .unwrap_or_else(|| panic!("{key} in {report}"));
        report[i + key.len() + 3..]
            .trim_start()
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect::<String>()
            .parse()
            .unwrap()
    };
    let (messages, tempfailed, connections) =
        (num("messages"), num("tempfailed"), num("connections"));
    assert_eq!(messages, 20, "{report}");
    assert!(tempfailed >= 1, "{report}");
    assert!(
        connections < messages + tempfailed,
        "connections were not reused: {connections} connections for {} transactions",
        messages + tempfailed
    );
    eprintln!("sink: {messages} messages, {tempfailed} 4xx, {connections} connections");
}

#[test]
fn relayhost_with_auth() {
    // The next hop's submission port requires AUTH (demo/demo); the relay authenticates
    // with the credentials file (after STARTTLS, so PLAIN may be used).
    let hop = next_hop(None, &[]);
    let dir = tempfile::tempdir().unwrap();
    let auth = dir.path().join("relay-auth");
    std::fs::write(&auth, "demo demo\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&auth, std::fs::Permissions::from_mode(0o600)).unwrap();
    let relayhost = format!("queue.relayhost=[127.0.0.1]:{}", hop.submission.port());
    let auth_set = format!("queue.relayhost_auth_file={}", auth.display());
    let relay = Server::with(&[
        &relayhost,
        &auth_set,
        "queue.routes={}",
        r#"relay.trusted_networks=["127.0.0.0/8"]"#,
    ]);
    let mut c = relay.smtp();
    c.ehlo("client.test");
    c.send_mail(
        "s@demo.test",
        &["far@example.net"],
        b"Subject: via relayhost\r\n\r\nx\r\n",
    );
    wait_for(
        "delivery through the relayhost",
        Duration::from_secs(20),
        || {
            maildir(hop.dir())
                .iter()
                .any(|(_, c)| c.contains("Subject: via relayhost"))
        },
    );
    let got = maildir(hop.dir());
    let m = &got
        .iter()
        .find(|(_, c)| c.contains("Subject: via relayhost"))
        .unwrap()
        .1;
    assert!(
        m.contains("ESMTPSA"),
        "authenticated and encrypted at the hop: {m}"
    );
}

/// Per-route TLS verification against a real tern next hop (self-signed demo
/// certificate): `tls=verify` with the hop's certificate as `ca=` delivers in TLS; plain
/// `tls=verify` (system roots, which do not include it) defers and keeps the mail.
#[test]
fn route_tls_verify_with_and_without_the_hops_ca() {
    let hop = next_hop(None, &[]);
    let port = hop.smtp.port();
    let routes = format!(
        r#"queue.routes={{"demo.test"="smtp:[127.0.0.1]:{port} tls=verify ca={}","localhost"="smtp:[127.0.0.1]:{port} tls=verify"}}"#,
        hop.cert().display()
    );
    let relay = Server::with(&[
        &routes,
        r#"relay.trusted_networks=["127.0.0.0/8"]"#,
        "queue.retry_interval=1h",
        "queue.command_timeout=10s",
        "queue.connect_timeout=2s",
    ]);
    let mut c = relay.smtp();
    c.ehlo("client.test");
    c.send_mail(
        "s@demo.test",
        &["a@demo.test"],
        b"Subject: verified\r\n\r\nx\r\n",
    );
    let unverified = c.send_mail(
        "s@demo.test",
        &["b@localhost"],
        b"Subject: unverified\r\n\r\nx\r\n",
    );
    wait_for("the verified delivery", Duration::from_secs(20), || {
        !maildir(hop.dir()).is_empty()
    });
    wait_for("the other to be deferred", Duration::from_secs(20), || {
        relay.stderr_log().contains("deferred")
    });
    let got = maildir(hop.dir());
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(got[0].1.contains("Subject: verified"));
    assert!(got[0].1.contains("ESMTPS"), "TLS at the hop: {}", got[0].1);
    let log = relay.stderr_log();
    assert!(
        log.lines()
            .any(|l| l.contains("deferred") && l.contains("b@localhost") && l.contains("TLS")),
        "{log}"
    );
    let q = relay.queue_list();
    assert!(q.iter().any(|e| e.id == unverified), "still queued: {q:?}");
    assert!(!log.contains("bounced"), "{log}");
}

/// NOTIFY=SUCCESS through a relay to a next hop that offers DSN: the relay passes NOTIFY
/// on and sends nothing itself; the next hop, delivering into its maildir, reports
/// "delivered" (RFC 3461). Both sides are tern.
#[test]
fn notify_success_is_passed_on_and_reported_by_the_delivering_hop() {
    let hop = next_hop(None, &[]);
    let relay = relay(hop.smtp.port());
    let mut c = relay.smtp();
    c.ehlo("client.test");
    c.expect("MAIL FROM:<s@demo.test> ENVID=e2e-7", 250, "2.1.0");
    c.expect(
        "RCPT TO:<a@demo.test> NOTIFY=SUCCESS ORCPT=rfc822;A@demo.test",
        250,
        "2.1.5",
    );
    c.expect("DATA", 354, "");
    c.send(b"Subject: success please\r\n\r\nx\r\n.\r\n");
    c.read_reply().check(250, "2.0.0");
    wait_for("the message and one DSN", Duration::from_secs(20), || {
        maildir(hop.dir()).len() >= 2
    });
    // Both queues empty: every DSN either side would send was queued before the message
    // it reports on was finished, and has been delivered since.
    wait_for("an empty relay queue", Duration::from_secs(10), || {
        relay.queue_list().is_empty()
    });
    wait_for("an empty next-hop queue", Duration::from_secs(10), || {
        hop.queue_list().is_empty()
    });
    let got = maildir(hop.dir());
    assert_eq!(got.len(), 2, "{got:?}");
    let dsn = &got
        .iter()
        .find(|(_, m)| m.contains("multipart/report"))
        .expect("a DSN")
        .1;
    assert!(dsn.contains("Action: delivered"), "{dsn}");
    assert!(!dsn.contains("Action: relayed"), "{dsn}");
    assert!(
        dsn.contains("Original-Recipient: rfc822; A@demo.test"),
        "{dsn}"
    );
    assert!(dsn.contains("Original-Envelope-Id: e2e-7"), "{dsn}");
    assert!(dsn.contains("Delivered-To: s@demo.test"), "{dsn}");
}

/// `queue.destination_rate` is for the whole server; each of the two shards enforces
/// half. One client connection lands on one shard, so six messages to one destination
/// at rate 2/s, burst 2, arrive at most 1/s + 1 per second. The arrival times are the
/// hop's maildir file names (seconds and microseconds of delivery).
#[test]
fn destination_rate_is_shared_among_shards() {
    let hop = next_hop(None, &[]);
    let route = format!(
        r#"queue.routes={{"*"="smtp:[127.0.0.1]:{}"}}"#,
        hop.smtp.port()
    );
    let relay = Server::with(&[
        &route,
        r#"relay.trusted_networks=["127.0.0.0/8"]"#,
        "shards=2",
        "queue.destination_rate=2",
        "queue.destination_burst=2",
        "queue.retry_interval=1h",
    ]);
    let mut c = relay.smtp();
    c.ehlo("client.test");
    for i in 0..6 {
        c.send_mail(
            "s@demo.test",
            &["a@demo.test"],
            format!("Subject: paced {i}\r\n\r\nx\r\n").as_bytes(),
        );
    }
    wait_for("six deliveries", Duration::from_secs(30), || {
        maildir(hop.dir()).len() >= 6
    });
    let mut at: Vec<u64> = maildir(hop.dir())
        .iter()
        .map(|(name, _)| {
            let (secs, rest) = name.split_once(".M").unwrap();
            let micros: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
            secs.parse::<u64>().unwrap() * 1_000_000 + micros.parse::<u64>().unwrap()
        })
        .collect();
    at.sort();
    let most = (0..at.len())
        .map(|i| {
            at[i..]
                .iter()
                .take_while(|&&t| t < at[i] + 1_000_000)
                .count()
        })
        .max()
        .unwrap();
    assert!(most <= 2, "{most} deliveries within a second: {at:?}");
    assert!(
        !relay.stderr_log().contains("status=\"deferred\""),
        "waiting for the rate is not a deferral"
    );
}
