//! `tern-loadgen merge RUN.json...`: one report from runs made at the same time on
//! several machines.
//!
//! Counts (ops, ok/failed, errors by kind and code, connections, bytes, ...) are summed.
//! Latency percentiles come from the sum of the runs' histograms (the report's
//! `histograms` field), so they are exact, not an average of percentiles. The rate is the
//! total of successful ops over the union wall-clock window (earliest start to latest
//! end, from `started_unix_s` + `elapsed_s`): when the windows coincide this is the sum
//! of the per-run rates, and when they are skewed it never claims a rate the target did
//! not see at once (a sum of rates would, for runs that did not overlap). Runs of
//! different scenarios, mechanisms, TLS modes or loop modes are refused.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use hdrhistogram::Histogram;

use crate::report::{self, Errors, Report};
use crate::stats::{new_hist, Percentiles};

const MAX_SAMPLES: usize = 8;

pub fn load(path: &Path) -> Result<Report, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text)
        .map_err(|e| format!("{}: not a tern-loadgen --json report: {e}", path.display()))
}

/// Merges the reports (with the paths they came from, for the error messages).
pub fn merge(runs: &[(PathBuf, Report)]) -> Result<Report, String> {
    let (first_path, first) = runs.first().ok_or("merge: no reports given")?;
    let name = |p: &PathBuf| p.display().to_string();
    let mut hists: BTreeMap<String, Histogram<u64>> = BTreeMap::new();
    for (path, r) in runs {
        if r.tool != "tern-loadgen" {
            return Err(format!("{}: not a tern-loadgen report", name(path)));
        }
        let same = |what: &str, a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| {
            if format!("{a:?}") == format!("{b:?}") {
                Ok(())
            } else {
                Err(format!(
                    "cannot merge runs of different kinds: {} has {what} {a:?}, {} has {what} {b:?}",
                    name(first_path),
                    name(path)
                ))
            }
        };
        same("scenario", &first.scenario, &r.scenario)?;
        same("mech", &first.mech, &r.mech)?;
        same("tls", &first.tls, &r.tls)?;
        same("mode", &first.mode, &r.mode)?;
        same("latency_basis", &first.latency_basis, &r.latency_basis)?;
        same("unit", &first.unit, &r.unit)?;
        same("headline", &first.headline, &r.headline)?;
        if r.histograms.is_empty() && r.latency_ms.values().any(|p| p.count > 0) {
            return Err(format!(
                "{}: the report has no histograms (written by an older tern-loadgen); \
                 exact percentiles cannot be computed from percentiles",
                name(path)
            ));
        }
        for (k, enc) in &r.histograms {
            let h = report::decode_hist(enc).map_err(|e| format!("{}: {k}: {e}", name(path)))?;
            hists
                .entry(k.clone())
                .or_insert_with(new_hist)
                .add(&h)
                .map_err(|e| format!("{}: {k}: {e:?}", name(path)))?;
        }
    }
    let sum = |f: fn(&Report) -> u64| runs.iter().map(|(_, r)| f(r)).sum::<u64>();
    // The union window; without start times (older reports) assume the windows coincide.
    let (started, elapsed) = if runs.iter().all(|(_, r)| r.started_unix_s.is_some()) {
        let start = runs
            .iter()
            .map(|(_, r)| r.started_unix_s.unwrap())
            .fold(f64::INFINITY, f64::min);
        let end = runs
            .iter()
            .map(|(_, r)| r.started_unix_s.unwrap() + r.elapsed_s)
            .fold(f64::NEG_INFINITY, f64::max);
        (Some(start), (end - start).max(0.0))
    } else {
        (
            None,
            runs.iter().map(|(_, r)| r.elapsed_s).fold(0.0, f64::max),
        )
    };
    let ok = sum(|r| r.ok);
    let failed = sum(|r| r.failed);
    let mut targets: Vec<&str> = Vec::new();
    let mut by_kind: BTreeMap<String, u64> = BTreeMap::new();
    let mut by_code: BTreeMap<String, u64> = BTreeMap::new();
    let mut samples: Vec<String> = Vec::new();
    for (_, r) in runs {
        if !targets.contains(&r.target.as_str()) {
            targets.push(&r.target);
        }
        for (k, v) in &r.errors.by_kind {
            *by_kind.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &r.errors.by_code {
            *by_code.entry(k.clone()).or_default() += v;
        }
        for s in &r.errors.samples {
            if samples.len() < MAX_SAMPLES && !samples.contains(s) {
                samples.push(s.clone());
            }
        }
    }
    let rate = runs.iter().map(|(_, r)| r.rate).sum::<Option<f64>>();
    Ok(Report {
        tool: "tern-loadgen".into(),
        scenario: first.scenario.clone(),
        target: targets.join(","),
        tls: first.tls.clone(),
        mech: first.mech.clone(),
        resume: runs.iter().all(|(_, r)| r.resume),
        cores: runs.iter().map(|(_, r)| r.cores).sum(),
        concurrency: runs.iter().map(|(_, r)| r.concurrency).sum(),
        mode: first.mode.clone(),
        rate,
        warmup_s: runs.iter().map(|(_, r)| r.warmup_s).fold(0.0, f64::max),
        elapsed_s: elapsed,
        attempted: sum(|r| r.attempted),
        ok,
        failed,
        throughput: if elapsed > 0.0 {
            ok as f64 / elapsed
        } else {
            0.0
        },
        unit: first.unit.clone(),
        headline: first.headline.clone(),
        latency_basis: first.latency_basis.clone(),
        latency_ms: hists
            .iter()
            .map(|(k, h)| (k.clone(), Percentiles::of(h)))
            .collect(),
        errors: Errors {
            total: failed,
            by_kind,
            by_code,
            samples,
        },
        warmup_ok: sum(|r| r.warmup_ok),
        warmup_failed: sum(|r| r.warmup_failed),
        tls_full_handshakes: sum(|r| r.tls_full_handshakes),
        tls_resumed_handshakes: sum(|r| r.tls_resumed_handshakes),
        connections: sum(|r| r.connections),
        bytes: sum(|r| r.bytes),
        unstarted: sum(|r| r.unstarted),
        interrupted: runs.iter().any(|(_, r)| r.interrupted),
        started_unix_s: started,
        runs: runs.iter().map(|(_, r)| r.runs.max(1)).sum(),
        histograms: hists
            .iter()
            .map(|(k, h)| (k.clone(), report::encode_hist(h)))
            .collect(),
    })
}

/// The `merge` subcommand: reads the reports, prints the merged one.
pub fn run(files: &[PathBuf], json: bool) -> Result<(), String> {
    let runs = files
        .iter()
        .map(|p| load(p).map(|r| (p.clone(), r)))
        .collect::<Result<Vec<_>, _>>()?;
    let merged = merge(&runs)?;
    // Say so when the windows hardly overlap: the rate is then an average over the union.
    if let Some(start) = merged.started_unix_s {
        let latest_start = runs
            .iter()
            .filter_map(|(_, r)| r.started_unix_s)
            .fold(start, f64::max);
        let earliest_end = runs
            .iter()
            .filter_map(|(_, r)| r.started_unix_s.map(|s| s + r.elapsed_s))
            .fold(f64::INFINITY, f64::min);
        let overlap = (earliest_end - latest_start).max(0.0);
        if merged.elapsed_s > 0.0 && overlap < 0.9 * merged.elapsed_s {
            eprintln!(
                "tern-loadgen merge: the runs overlap for {overlap:.3} s of a {:.3} s union window; \
                 the rate is the average over the union",
                merged.elapsed_s
            );
        }
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&merged).expect("serialisable")
        );
    } else {
        let _ = report::print_human(&merged, &mut std::io::stdout().lock());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::RunInfo;
    use crate::stats::Stats;
    use std::time::{Duration, UNIX_EPOCH};

    fn run_with(samples: &[u64], start_s: u64, scenario: &str) -> Report {
        let mut st = Stats::default();
        for &us in samples {
            st.record("accept", Duration::from_micros(us));
            st.ok += 1;
            st.attempted += 1;
        }
        let info = RunInfo {
            scenario: scenario.into(),
            target: "127.0.0.1:25".into(),
            tls: "none".into(),
            mech: None,
            resume: true,
            cores: 1,
            concurrency: 4,
            rate: None,
            warmup: Duration::ZERO,
            unit: "msg".into(),
            headline: "accept".into(),
        };
        let start = UNIX_EPOCH + Duration::from_secs(start_s);
        report::build(info, &st, start, Duration::from_secs(2), false)
    }

    #[test]
    fn percentiles_come_from_the_summed_histograms() {
        // One run all fast, one all slow: the mean of the p50s (~5 ms) would be nowhere
        // near the true merged median.
        let a: Vec<u64> = (0..300).map(|i| 100 + i).collect();
        let b: Vec<u64> = (0..100).map(|i| 10_000 + i).collect();
        let ra = run_with(&a, 1000, "relay");
        let rb = run_with(&b, 1001, "relay");
        let m = merge(&[("a".into(), ra), ("b".into(), rb)]).unwrap();
        let mut all = new_hist();
        for us in a.iter().chain(&b) {
            all.record(*us).unwrap();
        }
        let want = Percentiles::of(&all);
        let got = &m.latency_ms["accept"];
        assert_eq!(got.count, 400);
        assert_eq!(got.p50, want.p50);
        assert_eq!(got.p99, want.p99);
        assert_eq!(got.max, want.max);
        assert_eq!((m.ok, m.attempted, m.runs), (400, 400, 2));
        // Union window 1000..1003 s.
        assert!((m.elapsed_s - 3.0).abs() < 1e-9, "{}", m.elapsed_s);
        assert!((m.throughput - 400.0 / 3.0).abs() < 1e-9);
    }

    #[test]
    fn refuses_different_scenarios_and_old_reports() {
        let ra = run_with(&[100], 0, "relay");
        let rb = run_with(&[100], 0, "auth");
        let e = merge(&[("a.json".into(), ra), ("b.json".into(), rb)]).unwrap_err();
        assert!(e.contains("scenario") && e.contains("b.json"), "{e}");
        let mut old = run_with(&[100], 0, "relay");
        old.histograms.clear();
        let e = merge(&[("old.json".into(), old)]).unwrap_err();
        assert!(e.contains("no histograms"), "{e}");
    }
}
