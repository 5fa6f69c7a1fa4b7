//! `tern-loadgen milter-pingpong`: the floor under a milter conversation, the CPU an MTA
//! must spend per socket round trip to a filter, measured the way `bench/milter.sh`
//! measures tern.
//!
//! The requester is what tern is: glommio executors (`--cores`, io_uring, the same ring
//! settings as the load generator), `--connections` sockets (TCP loopback or unix),
//! each doing, for the whole run, write one milter packet (an `SMFIC_HEADER` of a typical
//! size) then read the 5-byte answer — nothing else: no encoding beyond a fixed buffer,
//! no timers, no parsing. The answerer is `tern-loadgen milter-noop` (after one option
//! negotiation it answers every such packet "continue"), the same filter the benchmark
//! runs. The result, CPU of this process per round trip (getrusage, user + system, after
//! a warm-up), multiplied by the round trips a conversation needs per message, is the
//! floor the goal compares tern's added CPU with.
//!
//! Must never: do more per round trip than a write and a read (the floor would rise).
//! SECURITY: a test tool; it refuses a non-loopback target unless `--allow-remote`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_lite::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use glommio::{LocalExecutorBuilder, Placement};

#[derive(clap::Args, Debug, Clone)]
pub struct PingPongArgs {
    /// The answering filter: `inet:127.0.0.1:PORT` or `unix:/path` (a `milter-noop`).
    #[arg(long)]
    target: String,
    /// Sockets, spread over the executors.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Executors (threads), as tern's shards.
    #[arg(long, default_value_t = 2)]
    cores: usize,
    /// Measured seconds (after the warm-up).
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Seconds run before measuring.
    #[arg(long, default_value_t = 1)]
    warmup: u64,
    /// Print one JSON document.
    #[arg(long)]
    json: bool,
    /// Allow a non-loopback target.
    #[arg(long)]
    allow_remote: bool,
}

#[derive(Clone, Debug)]
enum Target {
    Inet(SocketAddr),
    Unix(PathBuf),
}

fn parse_target(s: &str, allow_remote: bool) -> Result<Target, String> {
    if let Some(p) = s.strip_prefix("unix:") {
        return Ok(Target::Unix(PathBuf::from(p)));
    }
    let a = s.strip_prefix("inet:").unwrap_or(s);
    let a: SocketAddr = a
        .parse()
        .map_err(|e| format!("--target {s:?}: {e} (inet:IP:PORT or unix:/path)"))?;
    if !a.ip().is_loopback() && !allow_remote {
        return Err(format!("{a}: not a loopback address (use --allow-remote)"));
    }
    Ok(Target::Inet(a))
}

fn packet(code: u8, data: &[u8]) -> Vec<u8> {
    let mut p = ((data.len() + 1) as u32).to_be_bytes().to_vec();
    p.push(code);
    p.extend_from_slice(data);
    p
}

/// CPU seconds (user + system) of this process so far.
fn cpu_secs() -> f64 {
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct it is given.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

async fn converse<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    stop: &AtomicBool,
    count: &AtomicU64,
) -> std::io::Result<()> {
    // Option negotiation: version 6, no actions, every step offered.
    let mut neg = 6u32.to_be_bytes().to_vec();
    neg.extend_from_slice(&0u32.to_be_bytes());
    neg.extend_from_slice(&0u32.to_be_bytes());
    s.write_all(&packet(b'O', &neg)).await?;
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await?;
    let mut rest = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut rest).await?;
    // A header field of a typical size, as one packet.
    let ping = packet(b'L', b"Subject\0a typical subject line of a message\0");
    let mut pong = [0u8; 5];
    while !stop.load(Ordering::Relaxed) {
        s.write_all(&ping).await?;
        s.read_exact(&mut pong).await?;
        count.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

pub fn run(a: PingPongArgs, stop_all: Arc<AtomicBool>) -> Result<(), String> {
    let target = parse_target(&a.target, a.allow_remote)?;
    let cores = a.cores.max(1);
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    for core in 0..cores {
        let n = a.connections / cores + usize::from(core < a.connections % cores);
        let (target, stop, count, errors) =
            (target.clone(), stop.clone(), count.clone(), errors.clone());
        let h = LocalExecutorBuilder::new(Placement::Unbound)
            .name(&format!("pingpong-{core}"))
            .io_memory(512 * 1024)
            .ring_depth(256)
            .spawn(move || async move {
                let mut tasks = Vec::new();
                for _ in 0..n {
                    let (target, stop, count, errors) =
                        (target.clone(), stop.clone(), count.clone(), errors.clone());
                    tasks.push(glommio::spawn_local(async move {
                        let r = match &target {
                            Target::Inet(addr) => {
                                match glommio::net::TcpStream::connect(*addr).await {
                                    Ok(s) => {
                                        let _ = s.set_nodelay(true);
                                        converse(s, &stop, &count).await
                                    }
                                    Err(e) => Err(std::io::Error::other(e.to_string())),
                                }
                            }
                            Target::Unix(p) => match glommio::net::UnixStream::connect(p).await {
                                Ok(s) => converse(s, &stop, &count).await,
                                Err(e) => Err(std::io::Error::other(e.to_string())),
                            },
                        };
                        if r.is_err() {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }));
                }
                for t in tasks {
                    t.await;
                }
            })
            .map_err(|e| format!("executor: {e}"))?;
        handles.push(h);
    }
    let wait = |secs: u64| {
        let end = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < end && !stop_all.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait(a.warmup);
    let (c0, n0, t0) = (cpu_secs(), count.load(Ordering::Relaxed), Instant::now());
    wait(a.duration);
    let (c1, n1, secs) = (
        cpu_secs(),
        count.load(Ordering::Relaxed),
        t0.elapsed().as_secs_f64(),
    );
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        let _ = h.join();
    }
    let rts = n1 - n0;
    let errs = errors.load(Ordering::Relaxed);
    if rts == 0 {
        return Err(format!(
            "no round trip completed ({errs} connections failed): is a milter-noop at {}?",
            a.target
        ));
    }
    let cpu_us = (c1 - c0) / rts as f64 * 1e6;
    let rate = rts as f64 / secs;
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "target": a.target,
                "connections": a.connections,
                "cores": cores,
                "round_trips": rts,
                "secs": secs,
                "round_trips_per_s": rate,
                "cpu_us_per_round_trip": cpu_us,
                "failed_connections": errs,
            })
        );
    } else {
        println!(
            "{} round trips in {secs:.1} s ({rate:.0}/s) over {} connections, {cores} executors: {cpu_us:.2} µs CPU per round trip{}",
            rts,
            a.connections,
            if errs > 0 {
                format!(" ({errs} connections failed)")
            } else {
                String::new()
            }
        );
    }
    Ok(())
}
