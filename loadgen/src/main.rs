//! NAME
//!   tern-loadgen - load generator and measuring sink for SMTP servers
//!
//! SUMMARY
//!   tern-loadgen auth    --target 127.0.0.1:587 --mech CRAM-MD5 --user demo --password demo
//!   tern-loadgen relay   --target 127.0.0.1:25 --size 4096 --rcpts 2 --pipeline
//!   tern-loadgen connect --target 127.0.0.1:465 --tls --insecure
//!   tern-loadgen auth    --target 127.0.0.1:587 --proxy-v2 198.51.100.7   (as if behind HAProxy)
//!   tern-loadgen sink    --listen 127.0.0.1:2526 --delay 20
//!   tern-loadgen merge   a.json b.json   (runs made at the same time from several machines)
//!   tern-loadgen fsync-probe --dir /var/spool/tern --rate 500   (the disk's floor, beside a run)
//!   tern-loadgen milter-noop --listen 127.0.0.1:8899 --stages all|eom   (a do-nothing milter)
//!
//! DESCRIPTION
//!   One glommio executor per core (`--cores`, default: every CPU this process may run
//!   on, each executor pinned to one), so the generator is not the bottleneck. Closed loop
//!   (`--concurrency` operations in flight) or open loop (`--rate R`/s, latency from the
//!   intended send time: coordinated-omission corrected as in wrk2). Every run is bounded:
//!   `--warmup` + `--duration` seconds, `--count` measured operations, `--timeout` per op.
//!   A live progress line goes to stderr once per second; the summary (or, with `--json`,
//!   one JSON document) goes to stdout. Errors are counted by kind and reply code and are
//!   never part of the rate.
//!
//!   The map: `runner` (executors, schedule) → `scenario` (connect, auth, relay; session
//!   set-up) → `sasl` (AUTH client) → `conn` (SMTP framing over TCP/TLS); `stats` (per-core
//!   histograms, merged) → `report` (summary, JSON, hlog, SVG); `merge` (reports of several
//!   runs into one); `sink` (the receiving end); `milter_noop` (a milter that accepts
//!   everything, for measuring the protocol's cost to the MTA); `milter_pingpong` (the
//!   floor: CPU per bare round trip to it).
//!
//! SECURITY
//!   Refuses non-loopback targets (and sink listen addresses) unless `--allow-remote`:
//!   it is built to overload what it points at. `--insecure` skips certificate checks.
//!
//! DIAGNOSTICS
//!   Exit 0 after a run (even with errors: they are in the report), 2 on a usage error,
//!   1 when the run could not start (bad address, TLS configuration, executor failure).

mod conn;
mod merge;
mod milter_noop;
mod milter_pingpong;
mod probe;
mod report;
mod runner;
mod sasl;
mod scenario;
mod sink;
mod stats;
mod tls;

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::sasl::{Creds, Mech};
use crate::scenario::{Kind, RelayCfg, ScenarioCfg, TlsMode};

#[derive(Parser)]
#[command(
    name = "tern-loadgen",
    version,
    about = "SMTP load generator and measuring sink"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Connection rate: connect (and TLS) to the greeting, then QUIT.
    Connect(Common),
    /// AUTH handshakes: connect, EHLO, [STARTTLS, EHLO], AUTH, QUIT.
    Auth {
        #[command(flatten)]
        common: Common,
        /// SASL mechanism.
        #[arg(long, value_enum, default_value = "CRAM-MD5")]
        mech: Mech,
    },
    /// Messages over kept-alive sessions; rate of accepted messages and acceptance latency.
    Relay {
        #[command(flatten)]
        common: Common,
        /// Authenticate each session with this mechanism first.
        #[arg(long, value_enum)]
        mech: Option<Mech>,
        /// Message size in bytes (headers included).
        #[arg(long, default_value_t = 1024)]
        size: usize,
        /// Recipients per message.
        #[arg(long, default_value_t = 1)]
        rcpts: usize,
        /// Messages per connection before QUIT and a new connection.
        #[arg(long, default_value_t = 100)]
        msgs_per_conn: u32,
        /// Pipeline MAIL, RCPT... and DATA in one write (RFC 2920); default lock-step.
        #[arg(long)]
        pipeline: bool,
        /// Send the message with BDAT ... LAST (RFC 3030) instead of DATA.
        #[arg(long)]
        bdat: bool,
        /// Envelope sender.
        #[arg(long, default_value = "loadgen@example.com")]
        from: String,
        /// Recipient template; {n} becomes the recipient's number.
        #[arg(long, default_value = "user{n}@demo.test")]
        to: String,
        /// Write the Message-ID of every message whose body was sent, one per line with
        /// its outcome: `250 <id>`, the reply code, or `-` when no reply came (the
        /// connection died or timed out after the final dot: the server may have it).
        /// Diffed against `sink --ids`, it names a lost or duplicated message.
        #[arg(long, value_name = "FILE")]
        ids: Option<PathBuf>,
    },
    /// Receive, count and time messages (see `sink --help`).
    Sink(sink::SinkArgs),
    /// A milter (protocol 6, filter side) that accepts everything: every stage answered
    /// (`--stages all`) or end-of-message only (`--stages eom`).
    MilterNoop(milter_noop::MilterNoopArgs),
    /// The floor under a milter conversation: CPU per bare request/response round trip
    /// to a `milter-noop` over TCP loopback or a unix socket.
    MilterPingpong(milter_pingpong::PingPongArgs),
    /// Combine `--json` reports of runs made at the same time (e.g. from several
    /// machines): counts summed, exact percentiles from the summed histograms, rate over
    /// the union window.
    /// The disk's floor beside a run: pwrite + fdatasync at a fixed rate, percentiles.
    FsyncProbe(probe::ProbeArgs),
    Merge {
        /// The `--json` reports, one per run.
        #[arg(required = true, num_args = 1..)]
        reports: Vec<PathBuf>,
        /// Print one JSON document instead of the summary.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Clone)]
struct Common {
    /// Server address, host:port.
    #[arg(long, short)]
    target: String,
    /// Executors, one pinned per core (default: every CPU this process may use).
    #[arg(long)]
    cores: Option<usize>,
    /// Do not pin executors to CPUs.
    #[arg(long)]
    no_pin: bool,
    /// Operations in flight (closed loop), or the most in flight (open loop).
    #[arg(long, short, default_value_t = 32)]
    concurrency: usize,
    /// Open loop: start this many operations per second (over all cores).
    #[arg(long)]
    rate: Option<f64>,
    /// Seconds of warm-up (not measured).
    #[arg(long, default_value_t = 0.0)]
    warmup: f64,
    /// Seconds measured after warm-up.
    #[arg(long, short, default_value_t = 10.0)]
    duration: f64,
    /// Stop after this many measured operations (the duration still bounds the run).
    #[arg(long, short = 'n')]
    count: Option<u64>,
    /// Seconds an operation may take before it counts as a timeout.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Implicit TLS (RFC 8314, port 465 style).
    #[arg(long, conflicts_with = "starttls")]
    tls: bool,
    /// STARTTLS after the first EHLO (RFC 3207).
    #[arg(long)]
    starttls: bool,
    /// Accept any server certificate.
    #[arg(long)]
    insecure: bool,
    /// Trust the CA certificates in this PEM file.
    #[arg(long, conflicts_with = "insecure")]
    cacert: Option<PathBuf>,
    /// Disable TLS session resumption (every handshake is a full one).
    #[arg(long)]
    no_resume: bool,
    /// TLS server name (SNI and certificate name).
    #[arg(long, default_value = "localhost")]
    sni: String,
    /// EHLO name.
    #[arg(long, default_value = "loadgen.test")]
    ehlo: String,
    /// SASL user.
    #[arg(long, default_value = "demo")]
    user: String,
    /// SASL password.
    #[arg(long, default_value = "demo")]
    password: String,
    /// DIGEST-MD5 realm when the server offers none.
    #[arg(long)]
    realm: Option<String>,
    /// Print one JSON document on stdout instead of the summary.
    #[arg(long)]
    json: bool,
    /// No progress line on stderr.
    #[arg(long, short)]
    quiet: bool,
    /// Write the headline latency as an HdrHistogram interval log (1 s intervals, µs).
    #[arg(long)]
    hlog: Option<PathBuf>,
    /// Write the latency percentile distribution as an SVG plot.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Allow a target that is not a loopback address.
    #[arg(long)]
    allow_remote: bool,
    /// Begin each connection with a PROXY protocol v1 header (HAProxy's `send-proxy`)
    /// claiming this client address: the target must list us in `listeners.proxy_from`.
    #[arg(long, value_name = "CLIENT_IP", conflicts_with = "proxy_v2")]
    proxy_v1: Option<std::net::IpAddr>,
    /// Begin each connection with a PROXY protocol v2 header (`send-proxy-v2`) claiming
    /// this client address.
    #[arg(long, value_name = "CLIENT_IP")]
    proxy_v2: Option<std::net::IpAddr>,
}

/// The CPUs this process may run on (sched_getaffinity), in order.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity fills it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

fn resolve(target: &str, allow_remote: bool) -> Result<SocketAddr, String> {
    let addr = target
        .to_socket_addrs()
        .map_err(|e| format!("bad --target {target:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("--target {target:?} resolves to nothing"))?;
    if !allow_remote && !addr.ip().is_loopback() {
        return Err(format!(
            "refusing non-loopback target {addr} without --allow-remote"
        ));
    }
    Ok(addr)
}

fn secs(name: &str, v: f64) -> Result<Duration, String> {
    Duration::try_from_secs_f64(v)
        .map_err(|_| format!("{name} must be a non-negative number of seconds"))
}

fn generate(
    kind: Kind,
    c: Common,
    mech: Option<Mech>,
    relay: RelayCfg,
    stop: Arc<AtomicBool>,
) -> Result<(), String> {
    let ids_file = relay.ids.clone();
    let target = resolve(&c.target, c.allow_remote)?;
    let tls = if c.tls {
        TlsMode::Implicit
    } else if c.starttls {
        TlsMode::Starttls
    } else {
        TlsMode::None
    };
    let trust = match (&c.cacert, c.insecure) {
        (Some(p), _) => tls::Trust::CaFile(p.clone()),
        (None, true) => tls::Trust::Insecure,
        (None, false) if tls != TlsMode::None => {
            return Err("TLS needs --cacert FILE or --insecure".into())
        }
        (None, false) => tls::Trust::Insecure, // unused without TLS
    };
    if tls != TlsMode::None {
        tls::client_config(&trust, !c.no_resume)?;
    }
    tls::server_name(&c.sni)?;
    if let Some(r) = c.rate {
        if !(r > 0.0 && r.is_finite()) {
            return Err("--rate must be a positive number".into());
        }
    }
    if c.concurrency == 0 {
        return Err("--concurrency must be at least 1".into());
    }
    if kind == Kind::Relay && (relay.rcpts == 0 || relay.msgs_per_conn == 0) {
        return Err("--rcpts and --msgs-per-conn must be at least 1".into());
    }
    let proxy = match (c.proxy_v1, c.proxy_v2) {
        (Some(ip), _) => Some((conn::ProxyVersion::V1, ip)),
        (None, Some(ip)) => Some((conn::ProxyVersion::V2, ip)),
        (None, None) => None,
    };
    if let Some((v, ip)) = proxy {
        if v == conn::ProxyVersion::V1 && ip.is_ipv4() != target.is_ipv4() {
            return Err(
                "--proxy-v1: the client and the target must be of one address family".into(),
            );
        }
    }
    let cpus = allowed_cpus();
    let cores = c.cores.unwrap_or(cpus.len().max(1)).max(1);
    // Pin only when there is a distinct allowed CPU for every executor.
    let pin = !c.no_pin && cores <= cpus.len();
    let cfg = Arc::new(ScenarioCfg {
        kind,
        target,
        tls,
        trust,
        resume: !c.no_resume,
        sni: c.sni.clone(),
        ehlo: c.ehlo.clone(),
        mech,
        creds: Creds {
            user: c.user.clone(),
            password: c.password.clone(),
            realm: c.realm.clone(),
        },
        relay,
        open_loop: c.rate.is_some(),
        proxy,
    });
    let plan = runner::Plan {
        cfg,
        cores,
        cpus: pin.then(|| cpus[..cores].to_vec()),
        concurrency: c.concurrency,
        rate: c.rate,
        warmup: secs("--warmup", c.warmup)?,
        duration: secs("--duration", c.duration)?,
        count: c.count,
        timeout: secs("--timeout", c.timeout)?,
        progress: !c.quiet,
    };
    let used_cores = cores.min(c.concurrency);
    let out = runner::run(plan, stop)?;
    let headline = kind.headline();
    let info = report::RunInfo {
        scenario: format!("{kind:?}").to_lowercase(),
        target: target.to_string(),
        tls: format!("{tls:?}").to_lowercase(),
        mech: mech.map(|m| m.name().to_string()),
        resume: !c.no_resume,
        cores: used_cores,
        concurrency: c.concurrency,
        rate: c.rate,
        warmup: secs("--warmup", c.warmup)?,
        unit: kind.unit().to_string(),
        headline: headline.to_string(),
    };
    // The measured window began `elapsed` (plus the shutdown) ago.
    let start = std::time::SystemTime::now() - out.elapsed;
    let rep = report::build(info, &out.stats, start, out.elapsed, out.interrupted);
    if let Some(p) = &c.hlog {
        report::write_hlog(p, &out.stats, headline, start)?;
    }
    if let Some(p) = &ids_file {
        let mut text = String::with_capacity(out.stats.ids.len() * 64);
        for (code, id) in &out.stats.ids {
            match code {
                0 => text.push('-'),
                c => text.push_str(&c.to_string()),
            }
            text.push(' ');
            text.push_str(id);
            text.push('\n');
        }
        std::fs::write(p, text).map_err(|e| format!("--ids {}: {e}", p.display()))?;
    }
    if let Some(p) = &c.plot {
        let hists: Vec<(&str, &hdrhistogram::Histogram<u64>)> =
            out.stats.hists.iter().map(|(k, h)| (*k, h)).collect();
        let title = format!(
            "tern-loadgen {} {}: {:.0}/s, {}",
            rep.scenario,
            rep.mech.as_deref().unwrap_or(""),
            rep.throughput,
            if rep.mode == "open" {
                "latency from intended start"
            } else {
                "closed loop"
            }
        );
        report::write_svg(p, &hists, &title)?;
    }
    if c.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&rep).expect("serialisable")
        );
    } else {
        let _ = report::print_human(&rep, &mut std::io::stdout().lock());
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        if let Err(e) = signal_hook::flag::register(sig, stop.clone()) {
            eprintln!("tern-loadgen: cannot install signal handler: {e}");
            return ExitCode::FAILURE;
        }
    }
    let no_relay = || RelayCfg {
        size: 0,
        rcpts: 1,
        msgs_per_conn: 1,
        pipeline: false,
        bdat: false,
        from: String::new(),
        to: String::new(),
        ids: None,
    };
    let res = match cli.cmd {
        Cmd::Connect(c) => generate(Kind::Connect, c, None, no_relay(), stop),
        Cmd::Auth { common, mech } => generate(Kind::Auth, common, Some(mech), no_relay(), stop),
        Cmd::Relay {
            common,
            mech,
            size,
            rcpts,
            msgs_per_conn,
            pipeline,
            bdat,
            from,
            to,
            ids,
        } => generate(
            Kind::Relay,
            common,
            mech,
            RelayCfg {
                size,
                rcpts,
                msgs_per_conn,
                pipeline,
                bdat,
                from,
                to,
                ids,
            },
            stop,
        ),
        Cmd::Sink(a) => sink::run(a, stop),
        Cmd::MilterNoop(a) => milter_noop::run(a, stop),
        Cmd::MilterPingpong(a) => milter_pingpong::run(a, stop),
        Cmd::Merge { reports, json } => merge::run(&reports, json),
        Cmd::FsyncProbe(a) => probe::run(a, stop),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tern-loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}
