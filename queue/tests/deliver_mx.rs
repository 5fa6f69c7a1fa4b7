//! MX routing (RFC 5321 §5.1, RFC 7505) against a tiny authoritative DNS server in the
//! test: a std thread answering UDP on 127.0.0.1:0 from a fixed zone, messages encoded
//! with hickory-proto. The resolver level (`Dns::mx_hosts`, `Dns::resolve`) runs on any
//! executor (`futures::executor::block_on`); the last test runs a `Runner` in a glommio
//! executor that delivers through MX to a scripted SMTP server on `mx_port`.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::str::FromStr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::executor::block_on;
use hickory_resolver::proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_resolver::proto::rr::rdata::{A, MX};
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};
use tern_queue::client::StarttlsPolicy;
use tern_queue::route::{Dns, DnsConfig, MxAnswer, RouteError, Router};

// ------------------------------------------------------------------ the DNS server

/// What the zone says about one name.
enum Node {
    /// MX records (preference, exchange; "." = the root) and A records.
    Host {
        mx: &'static [(u16, &'static str)],
        a: &'static [Ipv4Addr],
    },
    ServFail,
}

fn zone(name: &str) -> Option<Node> {
    const LO: Ipv4Addr = Ipv4Addr::LOCALHOST;
    const LO2: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
    let host = |mx, a| Some(Node::Host { mx, a });
    match name {
        // Listed worst first: the order must come from the preference.
        "two.test" => host(&[(20, "mx2.two.test"), (10, "mx1.two.test")], &[]),
        "mx1.two.test" => host(&[], &[LO]),
        "mx2.two.test" => host(&[], &[LO2]),
        "eq.test" => host(
            &[
                (10, "a.eq.test"),
                (10, "b.eq.test"),
                (5, "first.eq.test"),
                (10, "c.eq.test"),
            ],
            &[],
        ),
        "implicit.test" => host(&[], &[LO]),
        "noaddr.test" => host(&[], &[]),
        "null.test" => host(&[(0, ".")], &[]),
        "servfail.test" => Some(Node::ServFail),
        "e2e.test" => host(&[(10, "mx.e2e.test")], &[]),
        "mx.e2e.test" => host(&[], &[LO]),
        "tls.test" => host(&[(10, "mx.tls.test")], &[]),
        "mx.tls.test" => host(&[], &[LO]),
        _ => None,
    }
}

fn answer(req: &Message) -> Message {
    let mut m = Message::new();
    m.set_id(req.id())
        .set_message_type(MessageType::Response)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(req.recursion_desired())
        .set_recursion_available(true)
        .set_authoritative(true);
    let Some(q) = req.queries().first().cloned() else {
        m.set_response_code(ResponseCode::FormErr);
        return m;
    };
    m.add_query(q.clone());
    let qname = q.name().clone();
    let key = qname.to_ascii().trim_end_matches('.').to_ascii_lowercase();
    match zone(&key) {
        None => {
            m.set_response_code(ResponseCode::NXDomain);
        }
        Some(Node::ServFail) => {
            m.set_response_code(ResponseCode::ServFail);
        }
        Some(Node::Host { mx, a }) => match q.query_type() {
            RecordType::MX => {
                for (pref, x) in mx {
                    let exchange = if *x == "." {
                        Name::root()
                    } else {
                        Name::from_str(&format!("{x}.")).unwrap()
                    };
                    m.add_answer(Record::from_rdata(
                        qname.clone(),
                        60,
                        RData::MX(MX::new(*pref, exchange)),
                    ));
                }
            }
            RecordType::A => {
                for ip in a {
                    m.add_answer(Record::from_rdata(qname.clone(), 60, RData::A(A(*ip))));
                }
            }
            _ => {} // NODATA (AAAA and the rest)
        },
    }
    m
}

/// Starts the DNS server; it lives as long as the test process.
fn dns_server() -> SocketAddr {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = sock.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            let Ok((n, from)) = sock.recv_from(&mut buf) else {
                continue;
            };
            let Ok(req) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let _ = sock.send_to(&answer(&req).to_vec().unwrap(), from);
        }
    });
    addr
}

fn dns_config(server: SocketAddr) -> DnsConfig {
    DnsConfig {
        server: Some(server),
        timeout: Duration::from_millis(500),
        attempts: 1,
    }
}

fn dns() -> Dns {
    Dns::new(dns_config(dns_server())).unwrap()
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn mx(d: &Dns, domain: &str) -> Result<MxAnswer, RouteError> {
    block_on(d.mx_hosts(domain))
}

// ------------------------------------------------------------------ resolver level

#[test]
fn mx_records_are_sorted_by_preference_and_their_hosts_resolve() {
    let d = dns();
    let a = mx(&d, "two.test").unwrap();
    assert_eq!(a.hosts, vec!["mx1.two.test", "mx2.two.test"]);
    assert!(!a.implicit);
    // Case and a trailing dot do not matter.
    assert_eq!(mx(&d, "TWO.test.").unwrap().hosts, a.hosts);
    let addrs: Vec<Vec<SocketAddr>> = a
        .hosts
        .iter()
        .map(|h| block_on(d.resolve(h, 25)).unwrap())
        .collect();
    assert_eq!(addrs[0], vec![sa("127.0.0.1:25")]);
    assert_eq!(addrs[1], vec![sa("127.0.0.2:25")]);
    // A name without addresses is an error for that host only (not permanent).
    let e = block_on(d.resolve("nowhere.two.test", 25)).unwrap_err();
    assert!(matches!(e, RouteError::Resolve { .. }), "{e:?}");
    assert_eq!(e.permanent(), None);
    // IP literals need no DNS.
    assert_eq!(
        block_on(d.resolve("192.0.2.7", 587)).unwrap(),
        vec![sa("192.0.2.7:587")]
    );
}

#[test]
fn equal_preferences_come_in_random_order_after_the_best() {
    let d = dns();
    let mut orders = std::collections::HashSet::new();
    for _ in 0..60 {
        let h = mx(&d, "eq.test").unwrap().hosts;
        assert_eq!(h[0], "first.eq.test");
        let mut rest = h[1..].to_vec();
        orders.insert(rest.clone());
        rest.sort();
        assert_eq!(rest, vec!["a.eq.test", "b.eq.test", "c.eq.test"]);
    }
    // 6 possible orders; 60 draws all equal has probability 6^-59.
    assert!(orders.len() > 1, "equal preferences are never shuffled");
}

#[test]
fn no_mx_but_an_address_is_the_implicit_mx() {
    let d = dns();
    let a = mx(&d, "implicit.test").unwrap();
    assert_eq!(a.hosts, vec!["implicit.test"]);
    assert!(a.implicit);
    // Neither MX nor A/AAAA: permanent, 550 5.4.4.
    let e = mx(&d, "noaddr.test").unwrap_err();
    assert_eq!(e, RouteError::NoMailHost("noaddr.test".into()));
    assert_eq!(e.permanent(), Some((550, (5, 4, 4))));
    // Address literals need no DNS.
    let lit = mx(&d, "[192.0.2.1]").unwrap();
    assert_eq!(lit.hosts, vec!["192.0.2.1"]);
    assert_eq!(
        mx(&d, "[IPv6:2001:db8::1]").unwrap().hosts,
        vec!["2001:db8::1"]
    );
}

#[test]
fn null_mx_is_a_permanent_556_5_1_10() {
    let d = dns();
    let e = mx(&d, "null.test").unwrap_err();
    assert_eq!(e, RouteError::NullMx("null.test".into()));
    assert_eq!(e.permanent(), Some((556, (5, 1, 10))));
}

#[test]
fn nxdomain_is_a_permanent_550_5_1_2() {
    let d = dns();
    let e = mx(&d, "no-such-domain.test").unwrap_err();
    assert_eq!(e, RouteError::NoSuchDomain("no-such-domain.test".into()));
    assert_eq!(e.permanent(), Some((550, (5, 1, 2))));
}

#[test]
fn servfail_is_temporary() {
    let d = dns();
    let e = mx(&d, "servfail.test").unwrap_err();
    assert!(matches!(e, RouteError::Dns { .. }), "{e:?}");
    assert_eq!(e.permanent(), None);
}

#[test]
fn a_dead_resolver_is_temporary_and_bounded_in_time() {
    // A UDP socket that never answers (so no ICMP "port unreachable" either).
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let d = Dns::new(DnsConfig {
        server: Some(silent.local_addr().unwrap()),
        timeout: Duration::from_millis(300),
        attempts: 1,
    })
    .unwrap();
    let t = Instant::now();
    let e = mx(&d, "two.test").unwrap_err();
    let took = t.elapsed();
    assert!(matches!(e, RouteError::Dns { .. }), "{e:?}");
    assert_eq!(e.permanent(), None);
    assert!(took < Duration::from_secs(5), "took {took:?}");
    let e = block_on(d.resolve("mx1.two.test", 25)).unwrap_err();
    assert!(matches!(e, RouteError::Resolve { .. }), "{e:?}");
}

#[test]
fn resolver_setting_parses_and_same_config_shares_one_resolver() {
    assert_eq!(DnsConfig::parse("").unwrap().server, None);
    assert_eq!(
        DnsConfig::parse("127.0.0.1:5353").unwrap().server,
        Some(sa("127.0.0.1:5353"))
    );
    assert_eq!(
        DnsConfig::parse("::1").unwrap().server,
        Some(SocketAddr::new(IpAddr::from_str("::1").unwrap(), 53))
    );
    assert!(DnsConfig::parse("dns.example:53").is_err());
    let cfg = dns_config(dns_server());
    let a = Dns::shared(cfg.clone()).unwrap();
    let b = Dns::shared(cfg).unwrap();
    assert_eq!(mx(&b, "two.test").unwrap().hosts.len(), 2);
    drop(a);
    assert_eq!(
        mx(&b, "implicit.test").unwrap().hosts,
        vec!["implicit.test"]
    );
}

// ------------------------------------------------------------------ through the runner

/// Accepts one SMTP connection, takes one message (no extensions), returns the RCPT TO
/// arguments it saw.
fn smtp_sink(listener: TcpListener) -> std::thread::JoinHandle<Vec<String>> {
    std::thread::spawn(move || {
        let (tcp, _) = listener.accept().unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut w = tcp.try_clone().unwrap();
        let mut r = BufReader::new(tcp);
        let mut say = |s: &str| w.write_all(s.as_bytes()).unwrap();
        say("220 sink.test ESMTP\r\n");
        let mut rcpts = Vec::new();
        let mut line = String::new();
        loop {
            line.clear();
            if r.read_line(&mut line).unwrap() == 0 {
                break;
            }
            let up = line.to_ascii_uppercase();
            if up.starts_with("EHLO") || up.starts_with("HELO") {
                say("250 sink.test\r\n");
            } else if up.starts_with("MAIL") {
                say("250 2.1.0 ok\r\n");
            } else if up.starts_with("RCPT") {
                rcpts.push(line.trim_end().to_string());
                say("250 2.1.5 ok\r\n");
            } else if up.starts_with("DATA") {
                say("354 go\r\n");
                loop {
                    line.clear();
                    assert!(r.read_line(&mut line).unwrap() > 0, "eof in DATA");
                    if line == ".\r\n" {
                        break;
                    }
                }
                say("250 2.0.0 queued\r\n");
            } else if up.starts_with("QUIT") {
                say("221 bye\r\n");
                break;
            } else {
                say("502 5.5.2 what\r\n");
            }
        }
        rcpts
    })
}

#[test]
fn runner_delivers_via_mx_and_fails_a_null_mx_recipient() {
    use common::{config, empty, envelope, run};
    let dns_addr = dns_server();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let smtp_port = listener.local_addr().unwrap().port();
    let sink = smtp_sink(listener);

    let mut cfg = config(Router::new(None, []).unwrap());
    cfg.client.starttls = StarttlsPolicy::Never;
    cfg.dns = Dns::new(dns_config(dns_addr)).unwrap();
    cfg.mx_port = smtp_port;
    // Null sender: the null MX failure must not queue a bounce.
    let env = envelope("", &[("a@e2e.test", 0, None), ("b@null.test", 0, None)]);
    let body = Bytes::from_static(b"Subject: mx\r\n\r\nhello\r\n");
    let r = run(cfg, vec![(env, body)], empty, Duration::from_secs(15));
    // Both recipients are done: one delivered through the MX host, one failed (null MX);
    // a deferral would have left the message queued.
    assert_eq!(r.left, 0, "message still queued");
    assert_eq!(sink.join().unwrap(), vec!["RCPT TO:<a@e2e.test>"]);
}

/// `queue.tls_policy` applies to MX deliveries by recipient domain: `verify` checks the
/// certificate against the CA file *and the MX host name* (mx.tls.test), while another
/// domain on the same MX address keeps the global policy (here: no TLS at all).
#[test]
fn mx_tls_policy_table_verifies_the_mx_host_name() {
    use common::{body, config, envelope, run, tls_pair, Sink, SinkOpts};
    let dns_addr = dns_server();
    let dir = tempfile::tempdir().unwrap();
    let attempt = |cert_names: &[&str], policy_ca_names: Option<&[&str]>| {
        let (server, pem) = tls_pair(cert_names);
        let sink = Sink::start(SinkOpts::starttls(&["PIPELINING"], server));
        let ca = dir.path().join(format!("ca-{}.pem", sink.addr.port()));
        std::fs::write(
            &ca,
            match policy_ca_names {
                Some(names) => tls_pair(names).1,
                None => pem,
            },
        )
        .unwrap();
        let policy = format!("verify ca={}", ca.display());
        let router = Router::new(None, [])
            .unwrap()
            .with_mx_tls_policies([("tls.test", policy.as_str())])
            .unwrap();
        let mut cfg = config(router);
        cfg.dns = Dns::new(dns_config(dns_addr)).unwrap();
        cfg.mx_port = sink.addr.port();
        cfg.client.starttls = StarttlsPolicy::Never;
        let msgs = vec![
            (envelope("", &[("a@tls.test", 0, None)]), body("tls")),
            (envelope("", &[("b@e2e.test", 0, None)]), body("plain")),
        ];
        // Done when both were tried and the delivered ones have left the queue.
        let r = run(
            cfg,
            msgs,
            |r| {
                let c = r.delivery_counts();
                c.sent + c.deferred >= 2 && r.len() as u64 == c.deferred
            },
            Duration::from_secs(20),
        );
        (r, sink.txns())
    };

    // The certificate names the MX host and the CA file is its own: delivered in TLS.
    let (r, txns) = attempt(&["mx.tls.test"], None);
    assert_eq!((r.counts.sent, r.counts.deferred), (2, 0), "{r:?}");
    let tls_of = |rcpt: &str| txns.iter().find(|t| t.rcpts[0].contains(rcpt)).unwrap().tls;
    assert!(tls_of("a@tls.test"), "the table's policy");
    assert!(!tls_of("b@e2e.test"), "the global policy (never)");

    // A valid chain for another name: the MX host name does not match, deferred.
    let (r, txns) = attempt(&["mx.other.test"], None);
    assert_eq!(
        (r.counts.sent, r.counts.deferred, r.counts.bounced),
        (1, 1, 0),
        "{r:?}"
    );
    assert_eq!(r.left, 1);
    let why = &r.counts.recent.back().unwrap().1;
    assert!(why.contains("a@tls.test") && why.contains("TLS"), "{why}");
    assert!(txns.iter().all(|t| !t.rcpts[0].contains("a@tls.test")));

    // The right name, a CA that did not sign it: deferred too.
    let (r, _) = attempt(&["mx.tls.test"], Some(&["mx.tls.test"]));
    assert_eq!((r.counts.sent, r.counts.deferred), (1, 1), "{r:?}");
}
