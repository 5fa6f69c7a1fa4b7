//! `tern-loadgen sink`: a measuring SMTP sink.
//!
//! Accepts mail on one address (one glommio executor per `--cores`, SO_REUSEPORT), with
//! PIPELINING, CHUNKING/BDAT (RFC 3030), 8BITMIME and optional STARTTLS (RFC 3207), and
//! counts connections, messages and bytes. For every message that carries
//! `X-Tern-Loadgen-Sent: <unix nanos>` it records the relay latency (sent to arrival of
//! the final dot or the last BDAT chunk) in an HdrHistogram.
//!
//! Failure injection: `--tempfail F` / `--permfail F` answer 451 / 554 to that fraction
//! of transactions (decided at the end of the message); `--delay MS` waits before every
//! final 250. Rejected messages are counted separately, never as received.
//!
//! It stops on SIGINT/SIGTERM or after `--duration` and prints its summary (`--json`:
//! one JSON document) on stdout. The listening address goes to stderr as
//! `listening: ADDR` (port 0 picks a free port).
//!
//! SECURITY: a test tool; it accepts any sender and recipient and keeps nothing. With
//! `--starttls` and no `--cert` it uses a freshly generated self-signed certificate.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use glommio::net::TcpListener;
use glommio::{LocalExecutorBuilder, Placement};
use hdrhistogram::Histogram;
use rand::Rng as _;
use serde::{Deserialize, Serialize};

use crate::conn::{trim_eol, OpError, SmtpConn, Stream};
use crate::scenario::relay::{unix_nanos, SENT_HEADER};
use crate::stats::{new_hist, Percentiles, HIST_MAX_US};

#[derive(clap::Args, Debug, Clone)]
pub struct SinkArgs {
    /// Address to listen on (port 0: any free port; see the `listening:` line on stderr).
    #[arg(long, default_value = "127.0.0.1:2526")]
    pub listen: SocketAddr,
    /// Executors (one per core, SO_REUSEPORT on the same port).
    #[arg(long, default_value_t = 1)]
    pub cores: usize,
    /// Offer STARTTLS.
    #[arg(long)]
    pub starttls: bool,
    /// PEM certificate chain for STARTTLS (default: a generated self-signed one).
    #[arg(long, requires = "key")]
    pub cert: Option<PathBuf>,
    /// PEM private key for STARTTLS.
    #[arg(long, requires = "cert")]
    pub key: Option<PathBuf>,
    /// Fraction of transactions answered 451 4.3.0 at the end of the message.
    #[arg(long, default_value_t = 0.0)]
    pub tempfail: f64,
    /// Fraction of transactions answered 554 5.7.1 at the end of the message.
    #[arg(long, default_value_t = 0.0)]
    pub permfail: f64,
    /// Milliseconds to wait before every final 250.
    #[arg(long, default_value_t = 0)]
    pub delay: u64,
    /// Stop after this many seconds (default: on SIGINT/SIGTERM).
    #[arg(long)]
    pub duration: Option<f64>,
    /// Print the summary as one JSON document.
    #[arg(long)]
    pub json: bool,
    /// No progress line on stderr.
    #[arg(long, short)]
    pub quiet: bool,
    /// Count distinct Message-IDs: the report gains `unique_messages` and `duplicates`
    /// (a message delivered twice, e.g. across a restart, is counted, never hidden).
    #[arg(long)]
    pub dedup: bool,
    /// Write every distinct Message-ID received, one per line with how many times it
    /// arrived (`1 <id>`); implies `--dedup`. Diffed against the generator's
    /// `relay --ids`, it names a lost or duplicated message.
    #[arg(long, value_name = "FILE")]
    pub ids: Option<std::path::PathBuf>,
    /// Refuse to listen on a non-loopback address unless given.
    #[arg(long)]
    pub allow_remote: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct SinkReport {
    pub tool: String,
    pub listen: String,
    pub elapsed_s: f64,
    pub connections: u64,
    pub tls_connections: u64,
    /// Messages accepted (answered 250).
    pub messages: u64,
    /// Message bytes accepted (after dot-unstuffing).
    pub bytes: u64,
    pub recipients: u64,
    pub tempfailed: u64,
    pub permfailed: u64,
    /// Accepted messages without a parseable X-Tern-Loadgen-Sent header.
    pub without_sent_header: u64,
    pub messages_per_s: f64,
    pub relay_latency_ms: Option<Percentiles>,
    /// With `--dedup`: distinct Message-IDs among the accepted messages (a message
    /// without one counts as distinct).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unique_messages: Option<u64>,
    /// With `--dedup`: accepted messages whose Message-ID was seen before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duplicates: Option<u64>,
}

#[derive(Default)]
struct CoreStats {
    connections: u64,
    tls_connections: u64,
    messages: u64,
    bytes: u64,
    recipients: u64,
    tempfailed: u64,
    permfailed: u64,
    without_sent_header: u64,
    latency: Option<Histogram<u64>>,
}

impl CoreStats {
    fn merge(&mut self, o: CoreStats) {
        self.connections += o.connections;
        self.tls_connections += o.tls_connections;
        self.messages += o.messages;
        self.bytes += o.bytes;
        self.recipients += o.recipients;
        self.tempfailed += o.tempfailed;
        self.permfailed += o.permfailed;
        self.without_sent_header += o.without_sent_header;
        match (&mut self.latency, o.latency) {
            (Some(a), Some(b)) => a.add(&b).expect("same bounds"),
            (a @ None, b) => *a = b,
            _ => {}
        }
    }
}

struct Ctx {
    args: SinkArgs,
    tls: Option<Arc<rustls::ServerConfig>>,
    stats: std::cell::RefCell<CoreStats>,
    messages: Arc<AtomicU64>,
    /// `--dedup`: Message-IDs seen (all cores) and how many repeated one.
    seen: Option<Arc<std::sync::Mutex<Seen>>>,
}

/// `--dedup`: the Message-IDs seen so far (with how many times each arrived) and how
/// many arrivals repeated one.
type Seen = (HashMap<Vec<u8>, u32>, u64);

pub fn run(args: SinkArgs, stop: Arc<AtomicBool>) -> Result<(), String> {
    if !args.allow_remote && !args.listen.ip().is_loopback() {
        return Err(format!(
            "refusing to listen on non-loopback {} without --allow-remote",
            args.listen
        ));
    }
    for (name, f) in [("--tempfail", args.tempfail), ("--permfail", args.permfail)] {
        if !(0.0..=1.0).contains(&f) {
            return Err(format!("{name} must be a fraction between 0 and 1"));
        }
    }
    let tls = if args.starttls {
        let files = args.cert.as_deref().zip(args.key.as_deref());
        Some(crate::tls::sink_server_config(files)?)
    } else {
        None
    };
    let cores = args.cores.max(1);
    let messages = Arc::new(AtomicU64::new(0));
    let seen = (args.dedup || args.ids.is_some()).then(Default::default);
    let core_stop = Arc::new(AtomicBool::new(false));
    let (addr_tx, addr_rx) = std::sync::mpsc::channel::<Result<SocketAddr, String>>();
    let mut handles = Vec::new();
    let mut addr = args.listen;
    for i in 0..cores {
        let seen = seen.clone();
        let (args2, tls, messages, core_stop2, addr_tx) = (
            args.clone(),
            tls.clone(),
            messages.clone(),
            core_stop.clone(),
            addr_tx.clone(),
        );
        let bind = addr;
        let h = LocalExecutorBuilder::new(Placement::Unbound)
            .name(&format!("sink-{i}"))
            .io_memory(512 * 1024)
            .ring_depth(256)
            .spawn(move || async move {
                let listener = match TcpListener::bind(bind) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = addr_tx.send(Err(format!("cannot listen on {bind}: {e}")));
                        return CoreStats::default();
                    }
                };
                let _ = addr_tx.send(listener.local_addr().map_err(|e| e.to_string()));
                let ctx = std::rc::Rc::new(Ctx {
                    args: args2,
                    tls,
                    stats: Default::default(),
                    messages,
                    seen,
                });
                let c2 = ctx.clone();
                // The accept loop is a task of its own, dropped with the executor at stop.
                glommio::spawn_local(async move {
                    while let Ok(stream) = listener.accept().await {
                        let _ = stream.set_nodelay(true);
                        let c = c2.clone();
                        glommio::spawn_local(async move {
                            c.stats.borrow_mut().connections += 1;
                            let _ = session(&c, SmtpConn::new(Stream::Plain(stream))).await;
                        })
                        .detach();
                    }
                })
                .detach();
                while !core_stop2.load(Ordering::Relaxed) {
                    glommio::timer::sleep(Duration::from_millis(50)).await;
                }
                ctx.stats.take()
            })
            .map_err(|e| format!("cannot start sink executor {i}: {e}"))?;
        handles.push(h);
        // Shard 0 picks the port (maybe 0 -> ephemeral); the others bind the same one.
        match addr_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(a)) => addr = a,
            Ok(Err(e)) => {
                core_stop.store(true, Ordering::Relaxed);
                return Err(e);
            }
            Err(_) => {
                core_stop.store(true, Ordering::Relaxed);
                let why = handles
                    .pop()
                    .and_then(|h| h.join().err())
                    .map(|e| e.to_string())
                    .unwrap_or_else(|| "no answer".into());
                return Err(format!("sink executor {i} did not start: {why}"));
            }
        }
    }
    eprintln!("listening: {addr}");
    let start = Instant::now();
    let end = args.duration.map(|d| start + Duration::from_secs_f64(d));
    let mut last = 0;
    let mut tick = start + Duration::from_secs(1);
    while !stop.load(Ordering::Relaxed) && end.is_none_or(|e| Instant::now() < e) {
        std::thread::sleep(Duration::from_millis(20));
        if Instant::now() >= tick {
            let m = messages.load(Ordering::Relaxed);
            if !args.quiet {
                eprintln!(
                    "[{:>4}s] sink {:>9} msgs/s   total {m}",
                    start.elapsed().as_secs(),
                    m - last
                );
            }
            last = m;
            tick += Duration::from_secs(1);
        }
    }
    let elapsed = start.elapsed();
    core_stop.store(true, Ordering::Relaxed);
    let mut total = CoreStats::default();
    for h in handles {
        total.merge(h.join().map_err(|e| format!("sink executor failed: {e}"))?);
    }
    let mut report = SinkReport {
        tool: "tern-loadgen sink".into(),
        listen: addr.to_string(),
        elapsed_s: elapsed.as_secs_f64(),
        connections: total.connections,
        tls_connections: total.tls_connections,
        messages: total.messages,
        bytes: total.bytes,
        recipients: total.recipients,
        tempfailed: total.tempfailed,
        permfailed: total.permfailed,
        without_sent_header: total.without_sent_header,
        messages_per_s: total.messages as f64 / elapsed.as_secs_f64().max(1e-9),
        relay_latency_ms: total.latency.as_ref().map(Percentiles::of),
        unique_messages: None,
        duplicates: None,
    };
    if let Some(seen) = &seen {
        let dups = seen.lock().map(|g| g.1).unwrap_or(0);
        report.duplicates = Some(dups);
        report.unique_messages = Some(total.messages - dups);
        if let Some(p) = &args.ids {
            let g = seen.lock().unwrap_or_else(|e| e.into_inner());
            let mut text = String::with_capacity(g.0.len() * 64);
            for (id, n) in &g.0 {
                text.push_str(&format!("{n} {}\n", String::from_utf8_lossy(id)));
            }
            std::fs::write(p, text).map_err(|e| format!("--ids {}: {e}", p.display()))?;
        }
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("serialisable")
        );
    } else {
        println!(
            "tern-loadgen sink on {}: {} messages ({} bytes) in {:.3} s = {:.0} msgs/s; \
             {} connections ({} TLS); rejected {} tempfail, {} permfail; {} without {SENT_HEADER}",
            report.listen,
            report.messages,
            report.bytes,
            report.elapsed_s,
            report.messages_per_s,
            report.connections,
            report.tls_connections,
            report.tempfailed,
            report.permfailed,
            report.without_sent_header
        );
        if let Some(p) = &report.relay_latency_ms {
            println!(
                "  relay latency (ms): min {:.3} p50 {:.3} p90 {:.3} p99 {:.3} p99.9 {:.3} max {:.3} ({} messages)",
                p.min, p.p50, p.p90, p.p99, p.p999, p.max, p.count
            );
        }
    }
    Ok(())
}

/// The transaction in progress.
#[derive(Default)]
struct Tx {
    mail: bool,
    rcpts: u64,
    /// BDAT chunks so far.
    data: Vec<u8>,
    bdat_failed: bool,
}

async fn session(ctx: &Ctx, mut c: SmtpConn) -> Result<(), OpError> {
    let mut out: Vec<u8> = Vec::with_capacity(512);
    c.write_all(b"220 tern-loadgen-sink ESMTP ready\r\n")
        .await?;
    let mut tx = Tx::default();
    let mut ehlo_done = false;
    loop {
        if !out.is_empty() && c.buffered() == 0 {
            // Nothing pipelined is waiting: send the replies we owe (RFC 2920 §3.2).
            c.write_all(&out).await?;
            out.clear();
        }
        let line = trim_eol(c.read_line().await?).to_vec();
        let upper = line.to_ascii_uppercase();
        let verb = upper.split(|b| *b == b' ').next().unwrap_or(&[]);
        match verb {
            b"EHLO" | b"HELO" => {
                tx = Tx::default();
                ehlo_done = true;
                if verb == b"HELO" {
                    out.extend_from_slice(b"250 tern-loadgen-sink\r\n");
                } else {
                    out.extend_from_slice(
                        b"250-tern-loadgen-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-CHUNKING\r\n",
                    );
                    if ctx.tls.is_some() && !c.is_tls() {
                        out.extend_from_slice(b"250-STARTTLS\r\n");
                    }
                    out.extend_from_slice(b"250 SIZE 0\r\n");
                }
            }
            b"STARTTLS" if ctx.tls.is_some() && !c.is_tls() => {
                out.extend_from_slice(b"220 2.0.0 go ahead\r\n");
                c.write_all(&out).await?;
                out.clear();
                // Plaintext pipelined after STARTTLS is refused by server_tls (RFC 3207).
                c.server_tls(ctx.tls.as_ref().expect("checked")).await?;
                ctx.stats.borrow_mut().tls_connections += 1;
                tx = Tx::default();
                ehlo_done = false;
            }
            b"MAIL" if !ehlo_done => out.extend_from_slice(b"503 5.5.1 EHLO first\r\n"),
            b"MAIL" if tx.mail => out.extend_from_slice(b"503 5.5.1 nested MAIL\r\n"),
            b"MAIL" => {
                tx = Tx {
                    mail: true,
                    ..Tx::default()
                };
                out.extend_from_slice(b"250 2.1.0 ok\r\n");
            }
            b"RCPT" if !tx.mail => out.extend_from_slice(b"503 5.5.1 MAIL first\r\n"),
            b"RCPT" => {
                tx.rcpts += 1;
                out.extend_from_slice(b"250 2.1.5 ok\r\n");
            }
            b"DATA" if tx.rcpts == 0 => out.extend_from_slice(b"554 5.5.1 no valid recipients\r\n"),
            b"DATA" => {
                out.extend_from_slice(b"354 end with <CRLF>.<CRLF>\r\n");
                c.write_all(&out).await?;
                out.clear();
                let (bytes, sent, id) = read_data(&mut c).await?;
                let reply = finish(ctx, &tx, bytes, sent, id).await;
                out.extend_from_slice(reply);
                tx = Tx::default();
            }
            b"BDAT" => {
                let mut args = upper
                    .split(|b| *b == b' ')
                    .skip(1)
                    .filter(|a| !a.is_empty());
                let size = args
                    .next()
                    .and_then(|s| std::str::from_utf8(s).ok())
                    .and_then(|s| s.parse::<usize>().ok());
                let last = args.next() == Some(&b"LAST"[..]);
                let Some(size) = size else {
                    // Cannot know how much to skip: the session cannot be resynchronised.
                    c.write_all(b"501 5.5.4 bad BDAT size\r\n").await?;
                    return Ok(());
                };
                let mut chunk = std::mem::take(&mut tx.data);
                c.read_exact_into(size, &mut chunk).await?;
                tx.data = chunk;
                if !tx.mail || tx.rcpts == 0 {
                    tx.bdat_failed = true;
                }
                if !last {
                    out.extend_from_slice(b"250 2.0.0 chunk ok\r\n");
                } else if tx.bdat_failed {
                    out.extend_from_slice(b"554 5.5.1 no valid transaction\r\n");
                    tx = Tx::default();
                } else {
                    let (sent, id) = find_sent(&tx.data);
                    let reply = finish(ctx, &tx, tx.data.len() as u64, sent, id).await;
                    out.extend_from_slice(reply);
                    tx = Tx::default();
                }
            }
            b"RSET" => {
                tx = Tx::default();
                out.extend_from_slice(b"250 2.0.0 ok\r\n");
            }
            b"NOOP" => out.extend_from_slice(b"250 2.0.0 ok\r\n"),
            b"QUIT" => {
                out.extend_from_slice(b"221 2.0.0 bye\r\n");
                c.write_all(&out).await?;
                c.close().await;
                return Ok(());
            }
            _ => out.extend_from_slice(b"502 5.5.2 not implemented\r\n"),
        }
    }
}

/// Reads DATA content to the final dot. Returns (unstuffed bytes, sent header value,
/// Message-ID).
async fn read_data(c: &mut SmtpConn) -> Result<(u64, Option<u128>, Option<Vec<u8>>), OpError> {
    let mut bytes = 0u64;
    let mut sent = None;
    let mut id = None;
    let mut in_header = true;
    loop {
        let line = c.read_line().await?;
        if line == b".\r\n" || line == b".\n" {
            return Ok((bytes, sent, id));
        }
        let line = line.strip_prefix(b".").unwrap_or(line);
        bytes += line.len() as u64;
        if in_header {
            let t = trim_eol(line);
            if t.is_empty() {
                in_header = false;
            } else {
                if sent.is_none() {
                    sent = parse_sent(t);
                }
                if id.is_none() {
                    id = parse_message_id(t);
                }
            }
        }
    }
}

fn parse_sent(line: &[u8]) -> Option<u128> {
    let n = SENT_HEADER.len();
    if line.len() > n + 1
        && line[..n].eq_ignore_ascii_case(SENT_HEADER.as_bytes())
        && line[n] == b':'
    {
        std::str::from_utf8(&line[n + 1..])
            .ok()?
            .trim()
            .parse()
            .ok()
    } else {
        None
    }
}

/// The value of a `Message-ID:` header line (unfolded lines only, as the generator
/// writes them).
fn parse_message_id(line: &[u8]) -> Option<Vec<u8>> {
    const H: &[u8] = b"Message-ID:";
    (line.len() > H.len() && line[..H.len()].eq_ignore_ascii_case(H))
        .then(|| line[H.len()..].trim_ascii().to_vec())
}

/// The sent header and the Message-ID in a complete message (BDAT): scans the header
/// section.
fn find_sent(msg: &[u8]) -> (Option<u128>, Option<Vec<u8>>) {
    let (mut sent, mut id) = (None, None);
    for line in msg.split(|b| *b == b'\n') {
        let t = trim_eol(line);
        if t.is_empty() {
            break;
        }
        if sent.is_none() {
            sent = parse_sent(t);
        }
        if id.is_none() {
            id = parse_message_id(t);
        }
    }
    (sent, id)
}

/// Decides the transaction's fate and counts it. Returns the final reply.
async fn finish(
    ctx: &Ctx,
    tx: &Tx,
    bytes: u64,
    sent: Option<u128>,
    id: Option<Vec<u8>>,
) -> &'static [u8] {
    let arrived = unix_nanos();
    let r: f64 = rand::rng().random();
    let a = &ctx.args;
    if r < a.permfail {
        ctx.stats.borrow_mut().permfailed += 1;
        return b"554 5.7.1 rejected by tern-loadgen sink (--permfail)\r\n";
    }
    if r < a.permfail + a.tempfail {
        ctx.stats.borrow_mut().tempfailed += 1;
        return b"451 4.3.0 try again later (tern-loadgen sink --tempfail)\r\n";
    }
    if a.delay > 0 {
        glommio::timer::sleep(Duration::from_millis(a.delay)).await;
    }
    let mut s = ctx.stats.borrow_mut();
    s.messages += 1;
    s.bytes += bytes;
    s.recipients += tx.rcpts;
    match sent {
        Some(t) => {
            let us = (arrived.saturating_sub(t) / 1000).clamp(1, HIST_MAX_US as u128) as u64;
            s.latency.get_or_insert_with(new_hist).saturating_record(us);
        }
        None => s.without_sent_header += 1,
    }
    if let (Some(seen), Some(id)) = (&ctx.seen, id) {
        let mut g = seen.lock().unwrap_or_else(|e| e.into_inner());
        let n = g.0.entry(id).or_insert(0);
        *n += 1;
        if *n > 1 {
            g.1 += 1;
        }
    }
    ctx.messages.fetch_add(1, Ordering::Relaxed);
    b"250 2.0.0 ok: queued by tern-loadgen sink\r\n"
}
