//! `tern-loadgen fsync-probe`: the physical floor of a durable 250 on this disk, measured
//! beside a run. A plain loop of one `pwrite` of `--size` bytes (appended) and one
//! `fdatasync`, started `--rate` times a second (open loop: a late start counts from its
//! intended time too), into a file of its own in `--dir` (put it on the spool's
//! filesystem). Reports the latency percentiles of write + fdatasync as `fdatasync` in
//! the same JSON shape as the other scenarios, so scripts read them side by side.
//!
//! Must never: write outside its own file (created new, removed at the end), or run
//! unbounded (`--duration`, SIGINT/SIGTERM).

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use clap::Args;
use hdrhistogram::Histogram;

use crate::stats::Percentiles;

#[derive(Args, Clone)]
pub struct ProbeArgs {
    /// Directory for the probe's file (the filesystem under test, e.g. the spool's).
    #[arg(long)]
    pub dir: PathBuf,
    /// Write + fdatasync starts per second.
    #[arg(long, default_value_t = 500.0)]
    pub rate: f64,
    /// Bytes per write.
    #[arg(long, default_value_t = 4096)]
    pub size: usize,
    /// Seconds to run.
    #[arg(long, short, default_value_t = 10.0)]
    pub duration: f64,
    /// Print one JSON document instead of the summary.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: ProbeArgs, stop: Arc<AtomicBool>) -> Result<(), String> {
    if !(a.rate > 0.0 && a.rate.is_finite()) || a.size == 0 || a.duration <= 0.0 {
        return Err("--rate, --size and --duration must be positive".into());
    }
    let path = a.dir.join(format!(".tern-fsync-probe-{}", std::process::id()));
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let res = probe(&a, &f, &stop);
    drop(f);
    let _ = std::fs::remove_file(&path);
    let (h, intended, elapsed, started) = res?;
    let p = Percentiles::of(&h);
    let pi = Percentiles::of(&intended);
    if a.json {
        let doc = serde_json::json!({
            "tool": "tern-loadgen",
            "scenario": "fsync-probe",
            "dir": a.dir.display().to_string(),
            "rate": a.rate,
            "size": a.size,
            "elapsed_s": elapsed,
            "ok": h.len(),
            "throughput": h.len() as f64 / elapsed,
            "started_unix_s": started,
            "latency_ms": { "fdatasync": p, "fdatasync_intended": pi },
        });
        println!("{doc}");
    } else {
        println!(
            "fsync-probe {} B at {}/s on {} for {:.1} s: {} writes",
            a.size,
            a.rate,
            a.dir.display(),
            elapsed,
            h.len()
        );
        println!("  latency (ms)          min      p50      p90      p99    p99.9      max");
        for (k, p) in [("write+fdatasync", &p), ("from intended", &pi)] {
            println!(
                "  {k:16} {:8.3} {:8.3} {:8.3} {:8.3} {:8.3} {:8.3}",
                p.min, p.p50, p.p90, p.p99, p.p999, p.max
            );
        }
    }
    Ok(())
}

type Probed = (Histogram<u64>, Histogram<u64>, f64, f64);

fn probe(a: &ProbeArgs, f: &std::fs::File, stop: &AtomicBool) -> Result<Probed, String> {
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).map_err(|e| e.to_string())?;
    let mut intended = h.clone();
    let buf = vec![0x5au8; a.size];
    let period = Duration::from_secs_f64(1.0 / a.rate);
    let started = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(a.duration);
    let mut next = t0;
    let mut off = 0u64;
    while !stop.load(Ordering::Relaxed) && next < end {
        let now = Instant::now();
        if now < next {
            std::thread::sleep(next - now);
        }
        let s = Instant::now();
        f.write_all_at(&buf, off).map_err(|e| format!("pwrite: {e}"))?;
        f.sync_data().map_err(|e| format!("fdatasync: {e}"))?;
        let done = Instant::now();
        off += a.size as u64;
        // Keep the file small: wrap after 64 MiB (the blocks are then overwrites, as a
        // reused spool segment's are not; appends are what the spool does).
        if off >= 64 << 20 {
            off = 0;
        }
        let us = |d: Duration| (d.as_micros() as u64).max(1);
        let _ = h.record(us(done - s));
        let _ = intended.record(us(done - next));
        next += period;
    }
    Ok((h, intended, t0.elapsed().as_secs_f64(), started))
}
