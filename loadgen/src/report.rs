//! What a run reports: the human summary on stdout, the `--json` document, the
//! `--hlog` HdrHistogram log and the `--plot` SVG.
//!
//! Errors are reported next to the rate, by kind and by reply code; the rate counts only
//! successful ops, so an error never looks like throughput.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::stats::{Percentiles, Stats};

#[derive(Debug, Serialize, Deserialize)]
pub struct Errors {
    pub total: u64,
    pub by_kind: BTreeMap<String, u64>,
    pub by_code: BTreeMap<String, u64>,
    pub samples: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Report {
    pub tool: String,
    pub scenario: String,
    pub target: String,
    pub tls: String,
    pub mech: Option<String>,
    pub resume: bool,
    pub cores: usize,
    pub concurrency: usize,
    /// "closed" or "open".
    pub mode: String,
    pub rate: Option<f64>,
    pub warmup_s: f64,
    pub elapsed_s: f64,
    pub attempted: u64,
    pub ok: u64,
    pub failed: u64,
    /// Successful ops per second over the measured window.
    pub throughput: f64,
    pub unit: String,
    /// The headline latency metric's name.
    pub headline: String,
    /// "start" (closed loop) or "intended" (open loop: coordinated-omission corrected).
    pub latency_basis: String,
    pub latency_ms: BTreeMap<String, Percentiles>,
    pub errors: Errors,
    pub warmup_ok: u64,
    pub warmup_failed: u64,
    pub tls_full_handshakes: u64,
    pub tls_resumed_handshakes: u64,
    pub connections: u64,
    pub bytes: u64,
    /// Open loop: intended starts that were still waiting when the run ended.
    pub unstarted: u64,
    pub interrupted: bool,
    /// Start of the measured window, seconds since the Unix epoch (what `merge` uses to
    /// find the union window of runs made on several machines). Absent in older reports.
    #[serde(default)]
    pub started_unix_s: Option<f64>,
    /// How many runs this report covers: 1, or the number of reports `merge` combined.
    #[serde(default = "one")]
    pub runs: usize,
    /// The latency histograms behind `latency_ms`, by metric: HdrHistogram V2
    /// deflate-compressed serialization, base64 (standard alphabet), values in µs. `merge`
    /// adds these to get exact percentiles over all runs. Absent in older reports.
    #[serde(default)]
    pub histograms: BTreeMap<String, String>,
}

fn one() -> usize {
    1
}

/// The V2 deflate serialization of `h`, base64 (the `histograms` field).
pub fn encode_hist(h: &Histogram<u64>) -> String {
    use base64::Engine as _;
    use hdrhistogram::serialization::{Serializer, V2DeflateSerializer};
    let mut buf = Vec::new();
    V2DeflateSerializer::new()
        .serialize(h, &mut buf)
        .expect("serialising into memory");
    base64::engine::general_purpose::STANDARD.encode(buf)
}

/// The inverse of [`encode_hist`].
pub fn decode_hist(s: &str) -> Result<Histogram<u64>, String> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(s.trim())
        .map_err(|e| format!("histogram is not base64: {e}"))?;
    hdrhistogram::serialization::Deserializer::new()
        .deserialize(&mut &bytes[..])
        .map_err(|e| format!("histogram does not decode: {e:?}"))
}

/// The run's parameters that go into the report.
pub struct RunInfo {
    pub scenario: String,
    pub target: String,
    pub tls: String,
    pub mech: Option<String>,
    pub resume: bool,
    pub cores: usize,
    pub concurrency: usize,
    pub rate: Option<f64>,
    pub warmup: Duration,
    pub unit: String,
    pub headline: String,
}

pub fn build(
    info: RunInfo,
    stats: &Stats,
    started: std::time::SystemTime,
    elapsed: Duration,
    interrupted: bool,
) -> Report {
    let secs = elapsed.as_secs_f64();
    Report {
        tool: "tern-loadgen".into(),
        scenario: info.scenario,
        target: info.target,
        tls: info.tls,
        mech: info.mech,
        resume: info.resume,
        cores: info.cores,
        concurrency: info.concurrency,
        mode: if info.rate.is_some() {
            "open"
        } else {
            "closed"
        }
        .into(),
        rate: info.rate,
        warmup_s: info.warmup.as_secs_f64(),
        elapsed_s: secs,
        attempted: stats.attempted,
        ok: stats.ok,
        failed: stats.failed,
        throughput: if secs > 0.0 {
            stats.ok as f64 / secs
        } else {
            0.0
        },
        unit: info.unit,
        headline: info.headline,
        latency_basis: if info.rate.is_some() {
            "intended"
        } else {
            "start"
        }
        .into(),
        latency_ms: stats
            .hists
            .iter()
            .map(|(k, h)| (k.to_string(), Percentiles::of(h)))
            .collect(),
        errors: Errors {
            total: stats.failed,
            by_kind: stats.errors_by_kind.clone(),
            by_code: stats
                .errors_by_code
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            samples: stats.error_samples.clone(),
        },
        warmup_ok: stats.warmup_ok,
        warmup_failed: stats.warmup_failed,
        tls_full_handshakes: stats.tls_full,
        tls_resumed_handshakes: stats.tls_resumed,
        connections: stats.connections,
        bytes: stats.bytes,
        unstarted: stats.unstarted,
        interrupted,
        started_unix_s: started
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
            .map(|d| d.as_secs_f64()),
        runs: 1,
        histograms: stats
            .hists
            .iter()
            .map(|(k, h)| (k.to_string(), encode_hist(h)))
            .collect(),
    }
}

pub fn print_human(r: &Report, out: &mut impl Write) -> std::io::Result<()> {
    writeln!(
        out,
        "tern-loadgen {} -> {} (tls: {}{}{}), {} core(s){}, {} {}",
        r.scenario,
        r.target,
        r.tls,
        r.mech
            .as_deref()
            .map(|m| format!(", mech: {m}"))
            .unwrap_or_default(),
        if r.tls != "none" && !r.resume {
            ", no resumption"
        } else {
            ""
        },
        r.cores,
        if r.runs > 1 {
            format!(" in {} merged runs", r.runs)
        } else {
            String::new()
        },
        match r.rate {
            Some(rate) => format!("open loop at {rate}/s,"),
            None => "closed loop,".into(),
        },
        format_args!("concurrency {}", r.concurrency),
    )?;
    writeln!(
        out,
        "  {:.0} {}/s   ({} ok, {} failed of {} in {:.3} s{})",
        r.throughput,
        r.unit,
        r.ok,
        r.failed,
        r.attempted,
        r.elapsed_s,
        if r.interrupted { ", interrupted" } else { "" }
    )?;
    writeln!(
        out,
        "  latency (ms, from the {} time)   min      p50      p90      p99    p99.9      max    count",
        if r.latency_basis == "intended" { "intended" } else { "start" }
    )?;
    for (k, p) in &r.latency_ms {
        writeln!(
            out,
            "  {:<30} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8}",
            k, p.min, p.p50, p.p90, p.p99, p.p999, p.max, p.count
        )?;
    }
    if r.tls_full_handshakes + r.tls_resumed_handshakes > 0 {
        writeln!(
            out,
            "  TLS handshakes: {} full, {} resumed",
            r.tls_full_handshakes, r.tls_resumed_handshakes
        )?;
    }
    if r.bytes > 0 {
        writeln!(
            out,
            "  message bytes sent: {}, connections: {}",
            r.bytes, r.connections
        )?;
    }
    if r.unstarted > 0 {
        writeln!(
            out,
            "  open loop: {} intended starts still waiting at the end (the target fell behind the rate)",
            r.unstarted
        )?;
    }
    if r.errors.total == 0 {
        writeln!(out, "  errors: none")?;
    } else {
        let kinds: Vec<String> = r
            .errors
            .by_kind
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let codes: Vec<String> = r
            .errors
            .by_code
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        writeln!(
            out,
            "  errors: {} ({}){}",
            r.errors.total,
            kinds.join(" "),
            if codes.is_empty() {
                String::new()
            } else {
                format!(" codes: {}", codes.join(" "))
            }
        )?;
        for s in &r.errors.samples {
            writeln!(out, "    e.g. {s}")?;
        }
    }
    if r.warmup_ok + r.warmup_failed > 0 {
        writeln!(
            out,
            "  warm-up: {} ok, {} failed (not counted)",
            r.warmup_ok, r.warmup_failed
        )?;
    }
    Ok(())
}

/// Writes the per-second interval histograms of the headline metric as an HdrHistogram
/// interval log (V2, deflate-compressed; readable by HistogramLogAnalyzer and
/// `hdrhistogram`'s `IntervalLogIterator`). Values are microseconds.
pub fn write_hlog(
    path: &Path,
    stats: &Stats,
    tag: &str,
    start: std::time::SystemTime,
) -> Result<(), String> {
    use hdrhistogram::serialization::interval_log::{IntervalLogWriterBuilder, Tag};
    use hdrhistogram::serialization::V2DeflateSerializer;
    let err = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    let mut file = std::fs::File::create(path).map_err(|e| err(&e))?;
    let mut ser = V2DeflateSerializer::new();
    let mut w = IntervalLogWriterBuilder::new()
        .add_comment("tern-loadgen: latency in microseconds")
        .with_start_time(start)
        .with_base_time(start)
        .with_max_value_divisor(1000.0)
        .begin_log_with(&mut file, &mut ser)
        .map_err(|e| err(&e))?;
    let tag = Tag::new(tag);
    for (i, h) in stats.intervals.iter().enumerate() {
        w.write_histogram(
            h,
            Duration::from_secs(i as u64),
            Duration::from_secs(1),
            tag,
        )
        .map_err(|e| err(&e))?;
    }
    Ok(())
}

/// A latency-by-percentile plot (x: percentile on the usual 1/(1-q) log scale, y: ms),
/// one line per histogram, as a small hand-written SVG.
pub fn write_svg(
    path: &Path,
    hists: &[(&str, &Histogram<u64>)],
    title: &str,
) -> Result<(), String> {
    const W: f64 = 800.0;
    const H: f64 = 480.0;
    const L: f64 = 70.0; // left margin
    const B: f64 = 50.0; // bottom margin
    const T: f64 = 40.0; // top margin
    const R: f64 = 160.0; // right margin (legend)
    let colours = [
        "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
    ];
    // x = log10(1/(1-q)), q from 0 to 0.99999 (x 0..5).
    let max_x = 5.0;
    let quantiles: Vec<f64> = (0..=500)
        .map(|i| 1.0 - 10f64.powf(-(i as f64) / 100.0))
        .collect();
    let max_ms = hists
        .iter()
        .map(|(_, h)| h.max() as f64 / 1000.0)
        .fold(0.0, f64::max)
        .max(0.001);
    let y_top = nice_ceiling(max_ms);
    let px = |x: f64| L + x / max_x * (W - L - R);
    let py = |ms: f64| H - B - ms / y_top * (H - B - T);
    let mut s = String::new();
    s.push_str(&format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"22\" font-size=\"15\">{}</text>\n",
        L,
        xml_escape(title)
    ));
    // Axes, grid and labels.
    for (i, label) in ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%"]
        .iter()
        .enumerate()
    {
        let x = px(i as f64);
        s.push_str(&format!(
            "<line x1=\"{x:.1}\" y1=\"{T}\" x2=\"{x:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{label}</text>\n",
            H - B,
            H - B + 18.0
        ));
    }
    for i in 0..=5 {
        let ms = y_top * i as f64 / 5.0;
        let y = py(ms);
        s.push_str(&format!(
            "<line x1=\"{L}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n",
            W - R,
            L - 6.0,
            y + 4.0,
            trim_float(ms)
        ));
    }
    s.push_str(&format!(
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">percentile</text>\n\
         <text x=\"16\" y=\"{:.1}\" transform=\"rotate(-90 16 {:.1})\" text-anchor=\"middle\">latency (ms)</text>\n",
        (L + W - R) / 2.0,
        H - 10.0,
        (T + H - B) / 2.0,
        (T + H - B) / 2.0
    ));
    for (i, (name, h)) in hists.iter().enumerate() {
        let colour = colours[i % colours.len()];
        let points: Vec<String> = quantiles
            .iter()
            .map(|&q| {
                let x = (1.0 / (1.0 - q)).log10().min(max_x);
                let ms = h.value_at_quantile(q) as f64 / 1000.0;
                format!("{:.1},{:.1}", px(x), py(ms))
            })
            .collect();
        s.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>\n\
             <rect x=\"{:.1}\" y=\"{:.1}\" width=\"12\" height=\"4\" fill=\"{colour}\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\">{}</text>\n",
            points.join(" "),
            W - R + 12.0,
            T + 10.0 + 20.0 * i as f64,
            W - R + 30.0,
            T + 15.0 + 20.0 * i as f64,
            xml_escape(name)
        ));
    }
    s.push_str("</svg>\n");
    std::fs::write(path, s).map_err(|e| format!("{}: {e}", path.display()))
}

fn nice_ceiling(v: f64) -> f64 {
    let mag = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if v <= m * mag {
            return m * mag;
        }
    }
    10.0 * mag
}

fn trim_float(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
