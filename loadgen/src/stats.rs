//! Per-core measurements and their merge.
//!
//! Owns: the HdrHistograms (microseconds, 1 µs .. 100 s, 3 significant figures), the
//! operation counters and the error counts by kind and reply code. Each core records into
//! its own `Stats` with no sharing; the only cross-core state is `Progress`, a handful of
//! relaxed atomics read once per second for the live line. `Stats` are merged after the
//! executors are joined.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;

use crate::conn::OpError;

pub const HIST_MAX_US: u64 = 100_000_000;

pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_US, 3).expect("valid histogram bounds")
}

/// Counters the main thread reads for the live progress line.
#[derive(Default)]
pub struct Progress {
    pub ok: AtomicU64,
    pub err: AtomicU64,
}

impl Progress {
    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }
    pub fn err(&self) -> u64 {
        self.err.load(Ordering::Relaxed)
    }
}

/// One core's (or, after merging, the whole run's) measurements.
#[derive(Default)]
pub struct Stats {
    /// Latency histograms by metric name, in microseconds.
    pub hists: BTreeMap<&'static str, Histogram<u64>>,
    /// Per-second interval histograms of the headline metric (for `--hlog`).
    pub intervals: Vec<Histogram<u64>>,
    /// Operations started inside the measured window.
    pub attempted: u64,
    pub ok: u64,
    pub failed: u64,
    pub errors_by_kind: BTreeMap<String, u64>,
    pub errors_by_code: BTreeMap<u16, u64>,
    /// Up to a few error messages, to say *what* failed.
    pub error_samples: Vec<String>,
    pub warmup_ok: u64,
    pub warmup_failed: u64,
    pub tls_full: u64,
    pub tls_resumed: u64,
    /// Connections opened (relay reuses them).
    pub connections: u64,
    /// Message bytes written (relay).
    pub bytes: u64,
    /// Open loop: slots due before the deadline that were never started because every
    /// worker was still busy when the run ended (a lower bound; only claimed slots count).
    pub unstarted: u64,
    /// `relay --ids`: `(outcome, Message-ID)` of every message whose body was sent,
    /// warm-up included; outcome is the reply code, or 0 when no reply came.
    pub ids: Vec<(u16, String)>,
}

const MAX_SAMPLES: usize = 8;

impl Stats {
    pub fn record(&mut self, metric: &'static str, d: Duration) {
        let us = (d.as_micros() as u64).clamp(1, HIST_MAX_US);
        self.hists
            .entry(metric)
            .or_insert_with(new_hist)
            .saturating_record(us);
    }

    /// Records the headline latency also into the interval `second` (since measuring began).
    pub fn record_interval(&mut self, second: usize, d: Duration) {
        while self.intervals.len() <= second {
            self.intervals.push(new_hist());
        }
        let us = (d.as_micros() as u64).clamp(1, HIST_MAX_US);
        self.intervals[second].saturating_record(us);
    }

    pub fn error(&mut self, e: &OpError) {
        self.failed += 1;
        *self.errors_by_kind.entry(e.kind()).or_default() += 1;
        if let OpError::Reply(code) = e {
            *self.errors_by_code.entry(*code).or_default() += 1;
        }
        if self.error_samples.len() < MAX_SAMPLES {
            let s = e.to_string();
            if !self.error_samples.contains(&s) {
                self.error_samples.push(s);
            }
        }
    }

    pub fn merge(&mut self, other: Stats) {
        for (k, h) in other.hists {
            match self.hists.get_mut(k) {
                Some(mine) => mine.add(&h).expect("same bounds"),
                None => {
                    self.hists.insert(k, h);
                }
            }
        }
        for (i, h) in other.intervals.into_iter().enumerate() {
            if i < self.intervals.len() {
                self.intervals[i].add(&h).expect("same bounds");
            } else {
                self.intervals.push(h);
            }
        }
        self.attempted += other.attempted;
        self.ok += other.ok;
        self.failed += other.failed;
        for (k, v) in other.errors_by_kind {
            *self.errors_by_kind.entry(k).or_default() += v;
        }
        for (k, v) in other.errors_by_code {
            *self.errors_by_code.entry(k).or_default() += v;
        }
        for s in other.error_samples {
            if self.error_samples.len() < MAX_SAMPLES && !self.error_samples.contains(&s) {
                self.error_samples.push(s);
            }
        }
        self.warmup_ok += other.warmup_ok;
        self.warmup_failed += other.warmup_failed;
        self.tls_full += other.tls_full;
        self.tls_resumed += other.tls_resumed;
        self.connections += other.connections;
        self.ids.extend(other.ids);
        self.bytes += other.bytes;
        self.unstarted += other.unstarted;
    }
}

/// The figures reported for one histogram, in milliseconds.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Percentiles {
    pub count: u64,
    pub min: f64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        let ms = |us: u64| us as f64 / 1000.0;
        Percentiles {
            count: h.len(),
            min: ms(h.min()),
            mean: (h.mean() / 1000.0 * 1000.0).round() / 1000.0,
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }
}
