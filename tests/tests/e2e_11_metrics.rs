//! 11: the metrics endpoint: `/metrics` parsed by a real Prometheus text-format parser
//! (Python's `prometheus_client.parser`), counters moving as mail flows, `/healthz`, and
//! the status page. The demo turns the endpoint on (127.0.0.1:0) and prints
//! `listening: metrics ADDR`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use tern_smtp::sasl::client;
use tern_tests::{ehlo_client, wait_for, Client, Server};

/// One raw HTTP/1.1 GET: (status code, body).
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect to the metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let raw = String::from_utf8(raw).expect("UTF-8 response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("header/body separator");
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status code");
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .and_then(|n| n.trim().parse().ok())
        .expect("Content-Length");
    assert_eq!(body.len(), len, "body length matches Content-Length");
    (code, body.to_string())
}

const PARSER: &str = r#"
import sys
from prometheus_client.parser import text_string_to_metric_families
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
        print(f"{fam.type}\t{s.name}\t{labels}\t{s.value!r}")
"#;

fn have_parser() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import prometheus_client"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    tern_tests::require(ok, "python3 with prometheus_client")
}

/// Samples keyed by (name, "k=v,k=v" sorted labels), parsed by prometheus_client.
struct Metrics {
    samples: BTreeMap<(String, String), f64>,
    types: BTreeMap<String, String>,
}

impl Metrics {
    fn scrape(addr: SocketAddr) -> Metrics {
        let (code, text) = get(addr, "/metrics");
        assert_eq!(code, 200);
        let mut py = Command::new("python3")
            .args(["-c", PARSER])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3");
        py.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        let out = py.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "prometheus_client rejected the exposition: {}\n{text}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut m = Metrics {
            samples: BTreeMap::new(),
            types: BTreeMap::new(),
        };
        for line in String::from_utf8(out.stdout).unwrap().lines() {
            let f: Vec<&str> = line.split('\t').collect();
            let [kind, name, labels, value] = f[..] else {
                panic!("bad parser line {line:?}");
            };
            m.types.insert(name.to_string(), kind.to_string());
            m.samples
                .insert((name.into(), labels.into()), value.parse().unwrap());
        }
        m
    }

    /// The value of `name` with exactly `labels` (sorted "k=v,..."); 0 when absent.
    fn get(&self, name: &str, labels: &str) -> f64 {
        self.samples
            .get(&(name.to_string(), labels.to_string()))
            .copied()
            .unwrap_or(0.0)
    }

    fn total(&self, name: &str) -> f64 {
        self.get(name, "shard=total")
    }
}

#[test]
fn metrics_move_as_mail_flows() {
    if !have_parser() {
        return;
    }
    let s = Server::with(&[]);
    let addr = s
        .metrics
        .expect("the demo prints `listening: metrics ADDR`");
    let before = Metrics::scrape(addr);

    // Every family the brief lists is there, with the right type.
    for (name, kind) in [
        ("tern_connections_accepted", "counter"),
        ("tern_sessions_active", "gauge"),
        ("tern_tls_handshakes", "counter"),
        ("tern_messages_accepted", "counter"),
        ("tern_messages_rejected", "counter"),
        ("tern_deliveries", "counter"),
        ("tern_queue_messages", "gauge"),
        ("tern_queue_spool_bytes", "gauge"),
        ("tern_queue_oldest_message_age_seconds", "gauge"),
        ("tern_acceptance_latency_seconds", "histogram"),
        ("tern_spool_sync_seconds", "histogram"),
    ] {
        let sample = match kind {
            "counter" => format!("{name}_total"),
            "histogram" => format!("{name}_count"),
            _ => name.to_string(),
        };
        assert_eq!(
            before.types.get(&sample).map(String::as_str),
            Some(kind),
            "{sample} present as {kind}"
        );
        for shard in 0..s.shards {
            assert!(
                before
                    .samples
                    .keys()
                    .any(|(n, l)| *n == sample && l.contains(&format!("shard={shard}"))),
                "{sample} has shard {shard}"
            );
        }
    }

    // Three messages accepted.
    let mut c = ehlo_client(&s);
    for i in 0..3 {
        c.send_mail(
            "sender@example.com",
            &["postmaster@localhost"],
            format!("Subject: m{i}\r\n\r\nhello\r\n").as_bytes(),
        );
    }
    // One relay-denied RCPT.
    c.expect("MAIL FROM:<sender@example.com>", 250, "2.1.0");
    c.expect("RCPT TO:<someone@example.net>", 554, "5.7.1");
    c.expect("RSET", 250, "2.0.0");
    c.quit();

    // One failed AUTH (CRAM-MD5, wrong password) on submission.
    let mut sub = Client::connect(s.submission);
    sub.expect_greeting();
    sub.ehlo("client.test");
    let r = sub.cmd("AUTH CRAM-MD5");
    r.check(334, "");
    let challenge = B64.decode(r.lines[0].trim()).unwrap();
    let resp = client::cram_md5("demo", "wrong-password", &challenge);
    sub.expect(&B64.encode(resp), 535, "5.7.8");
    sub.quit();

    let after = Metrics::scrape(addr);
    let delta = |name: &str, labels: &str| after.get(name, labels) - before.get(name, labels);
    assert_eq!(delta("tern_messages_accepted_total", "shard=total"), 3.0);
    assert_eq!(
        delta("tern_acceptance_latency_seconds_count", "shard=total"),
        3.0
    );
    assert_eq!(
        delta(
            "tern_acceptance_latency_seconds_bucket",
            "le=+Inf,shard=total"
        ),
        3.0
    );
    assert!(delta("tern_acceptance_latency_seconds_sum", "shard=total") > 0.0);
    assert!(delta("tern_spool_sync_seconds_count", "shard=total") >= 1.0);
    assert_eq!(
        delta("tern_messages_rejected_total", "reason=relay,shard=total"),
        1.0
    );
    assert_eq!(
        delta(
            "tern_auth_total",
            "mechanism=CRAM-MD5,result=failure,shard=total"
        ),
        1.0
    );
    assert_eq!(delta("tern_connections_accepted_total", "shard=total"), 2.0);
    // The per-shard series add up to the total.
    for name in [
        "tern_messages_accepted_total",
        "tern_acceptance_latency_seconds_count",
        "tern_connections_accepted_total",
    ] {
        let sum: f64 = (0..s.shards)
            .map(|i| after.get(name, &format!("shard={i}")))
            .sum();
        assert_eq!(sum, after.total(name), "{name}: shards add up");
    }
    // Histogram buckets are cumulative and end at the count.
    let mut buckets: Vec<(f64, f64)> = after
        .samples
        .iter()
        .filter(|((n, l), _)| {
            n == "tern_acceptance_latency_seconds_bucket" && l.ends_with(",shard=total")
        })
        .map(|((_, l), v)| {
            let le = l.trim_start_matches("le=").split(',').next().unwrap();
            (le.parse::<f64>().unwrap_or(f64::INFINITY), *v)
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert!(buckets.len() > 5, "{buckets:?}");
    assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1), "{buckets:?}");
    assert_eq!(
        buckets.last().map(|b| b.1),
        Some(after.total("tern_acceptance_latency_seconds_count"))
    );

    // The queue holds the messages (the next hop is unreachable), and deliveries are tried
    // and deferred.
    wait_for(
        "a deferred delivery counted",
        Duration::from_secs(30),
        || Metrics::scrape(addr).get("tern_deliveries_total", "shard=total,status=deferred") >= 1.0,
    );
    let m = Metrics::scrape(addr);
    assert!(m.total("tern_queue_messages") >= 3.0);
    // Each shard's preallocated segment is on disk: at least 1 MiB per shard.
    assert!(m.total("tern_queue_spool_bytes") >= (1 << 20) as f64);

    // /healthz
    let (code, body) = get(addr, "/healthz");
    assert_eq!((code, body.as_str()), (200, "ok\n"));

    // The status page: HTML with the numbers and the recent errors.
    let (code, page) = get(addr, "/");
    assert_eq!(code, 200);
    assert!(page.starts_with("<!doctype html>"), "{page}");
    let accepted = m.total("tern_messages_accepted_total") as u64;
    assert!(
        page.contains(&format!("<td id=a>{accepted}</td>")),
        "status page shows {accepted} accepted:\n{page}"
    );
    assert!(
        page.contains(&format!(
            "<td id=q>{}</td>",
            m.total("tern_queue_messages") as u64
        )),
        "status page shows the queue depth:\n{page}"
    );
    assert!(
        page.contains("relay: ") && page.contains("someone@example.net"),
        "status page lists the relay refusal:\n{page}"
    );
    assert!(
        !page.contains("src=\"http"),
        "no external assets on the status page"
    );

    // Anything else: 404; a request too large: refused, the endpoint still serves.
    assert_eq!(get(addr, "/nope").0, 404);
    let mut big = TcpStream::connect(addr).unwrap();
    let _ = big.write_all(&vec![b'a'; 20_000]);
    drop(big);
    assert_eq!(get(addr, "/healthz").0, 200);
}

#[test]
fn off_by_default_in_config() {
    // `serve` without [metrics] prints no metrics line: the default is empty (off).
    let c = tern_engine::config::Config::default();
    assert!(c.metrics.listen.is_empty());
}

/// The status page in a real browser (headless Chromium): after its script has polled
/// `/metrics`, the numbers it shows match `/metrics`; a screenshot is kept as a test
/// artifact (`target/tmp/status-page.png`). Skipped, with a message, where Chromium is not
/// installed, except under CI (`.ci/run` installs it).
#[test]
fn status_page_in_headless_chromium() {
    let browser = ["chromium", "chromium-browser"]
        .into_iter()
        .find(|b| tern_tests::tool_found(b));
    let Some(browser) = browser else {
        tern_tests::require(false, "chromium (apt-get install chromium)");
        return;
    };
    let s = Server::with(&[]);
    let metrics = s.metrics.expect("the demo serves metrics");
    let mut c = s.smtp();
    c.ehlo("client.test");
    for i in 0..2 {
        c.send_mail(
            "a@example.com",
            &["x@localhost"],
            format!("Subject: {i}\r\n\r\nx\r\n").as_bytes(),
        );
    }
    let (_, text) = get(metrics, "/metrics");
    let accepted = text
        .lines()
        .find(|l| l.starts_with("tern_messages_accepted_total{shard=\"total\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .map(str::to_string)
        .expect("accepted total in /metrics");
    assert_eq!(accepted, "2");
    let profile = tempfile::tempdir().unwrap();
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    let url = format!("http://{metrics}/");
    let common = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--virtual-time-budget=3000",
    ];
    let dom = std::process::Command::new(browser)
        .args(common)
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("--dump-dom")
        .arg(&url)
        .output()
        .expect("run chromium");
    let dom = String::from_utf8_lossy(&dom.stdout).to_string();
    assert!(
        dom.contains("tern status") || dom.contains("<h1>tern</h1>"),
        "{dom}"
    );
    // The "messages accepted" cell after the page's script has run.
    let cell = dom
        .split("id=\"a\">")
        .nth(1)
        .and_then(|rest| rest.split('<').next())
        .map(str::trim)
        .expect("the accepted cell")
        .to_string();
    assert_eq!(
        cell, accepted,
        "page shows {cell}, /metrics says {accepted}"
    );
    let out = std::process::Command::new(browser)
        .args(common)
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("--window-size=1200,900")
        .arg(format!("--screenshot={}", shot.display()))
        .arg(&url)
        .output()
        .expect("run chromium");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    eprintln!("status page screenshot: {}", shot.display());
}
