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

/// The `<svg id=ID>` element of a dumped DOM (up to its `</svg>`).
fn svg<'a>(dom: &'a str, id: &str) -> &'a str {
    let start = dom
        .find(&format!("<svg id=\"{id}\""))
        .unwrap_or_else(|| panic!("chart {id} in the page:\n{dom}"));
    let rest = &dom[start..];
    &rest[..rest.find("</svg>").expect("</svg>")]
}

/// The number of points of each `<polyline>` in `svg`.
fn polylines(svg: &str) -> Vec<usize> {
    svg.split("<polyline")
        .skip(1)
        .map(|p| {
            let pts = p.split("points=\"").nth(1).expect("points");
            pts[..pts.find('"').unwrap()].split_whitespace().count()
        })
        .collect()
}

/// The chart's y-axis maximum label (`<text class="max" ...>N</text>`).
fn max_label(svg: &str) -> f64 {
    let t = svg.split("class=\"max\"").nth(1).expect("a max label");
    let t = &t[t.find('>').unwrap() + 1..];
    t[..t.find('<').unwrap()].parse().expect("a number")
}

/// The status page in a real browser (headless Chromium): after its script has polled
/// `/metrics`, the numbers it shows match `/metrics`; with mail flowing while it polls,
/// it draws the four charts (accepted/s, sent/s, queue depth, latency p50/p99). A
/// screenshot is kept as a test artifact (`target/tmp/status-page.png`). Skipped, with a
/// message, where Chromium is not installed, except under CI (`.ci/run` installs it).
#[test]
fn status_page_in_headless_chromium() {
    let browser = ["chromium", "chromium-browser"]
        .into_iter()
        .find(|b| tern_tests::tool_found(b));
    let Some(browser) = browser else {
        tern_tests::require(false, "chromium (apt-get install chromium)");
        return;
    };
    // Mail is delivered (into a Maildir) so that the deliveries chart moves too.
    let dir = tempfile::tempdir().unwrap();
    let route = format!(
        r#"queue.routes={{"*"="maildir:{}/maildir"}}"#,
        dir.path().display()
    );
    let s = Server::with(&[&route]);
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
    // The page may load nothing that is not inline or from the endpoint itself (the browser
    // runs below prove the page's script works under that policy).
    let mut raw = TcpStream::connect(metrics).unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    let mut head = String::new();
    raw.read_to_string(&mut head).unwrap();
    let head = head.split("\r\n\r\n").next().unwrap();
    assert!(
        head.contains(
            "\r\nContent-Security-Policy: default-src 'none'; script-src 'unsafe-inline'"
        ),
        "{head}"
    );
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
    ];
    // Virtual time: the page's 1 s timer fires as soon as the browser is idle, so a budget
    // of N ms is N/1000 polls, each taking only as long as its real request.
    let chromium = |budget: u32, args: &[String]| {
        let out = std::process::Command::new(browser)
            .args(common)
            .arg(format!("--virtual-time-budget={budget}"))
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(args)
            .arg(&url)
            .output()
            .expect("run chromium");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let dom = chromium(3000, &["--dump-dom".into()]);
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

    // Mail flowing while the page polls 60 times: every chart has a line.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                c.send_mail(
                    "a@example.com",
                    &["x@localhost"],
                    format!("Subject: flow {n}\r\n\r\nx\r\n").as_bytes(),
                );
                n += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            c.quit();
            n
        })
    };
    tern_tests::wait_for("deliveries", Duration::from_secs(30), || {
        let sent = "tern_deliveries_total{shard=\"total\",status=\"sent\"} ";
        get(metrics, "/metrics")
            .1
            .lines()
            .find_map(|l| l.strip_prefix(sent))
            .is_some_and(|v| v != "0")
    });
    let dom = chromium(60_000, &["--dump-dom".into()]);
    for (id, lines) in [("ch-a", 1), ("ch-s", 1), ("ch-q", 1), ("ch-l", 2)] {
        let chart = svg(&dom, id);
        let points = polylines(chart);
        assert!(
            points.len() >= lines && points.iter().sum::<usize>() >= 30 * lines,
            "{id}: {lines} line(s) of 30 points or more expected, got {points:?}:\n{chart}"
        );
        assert!(
            chart.contains(">now</text>") && chart.contains(">-5 min</text>"),
            "{chart}"
        );
    }
    assert!(max_label(svg(&dom, "ch-a")) > 0.0, "{}", svg(&dom, "ch-a"));
    assert!(max_label(svg(&dom, "ch-s")) > 0.0, "{}", svg(&dom, "ch-s"));
    assert!(max_label(svg(&dom, "ch-l")) > 0.0, "{}", svg(&dom, "ch-l"));
    let p50_p99 = svg(&dom, "ch-l");
    assert!(p50_p99.contains(">p50</text>") && p50_p99.contains(">p99</text>"));

    chromium(
        60_000,
        &[
            "--window-size=1200,900".into(),
            format!("--screenshot={}", shot.display()),
        ],
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = sender.join().expect("the sender");
    assert!(sent > 0);
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG");
    // IHDR: width and height (big-endian) right after the signature and chunk header.
    let be = |i: usize| u32::from_be_bytes(png[i..i + 4].try_into().unwrap());
    assert_eq!(&png[12..16], b"IHDR");
    assert_eq!((be(16), be(20)), (1200, 900), "the window size");
    // A blank page compresses to a few KB; tables, text and four charts do not.
    assert!(png.len() > 20_000, "screenshot only {} bytes", png.len());
    eprintln!("status page screenshot: {}", shot.display());
}
