//! The metrics HTTP endpoint: gathers the shards' `Snapshot`s and shows them.
//!
//! Owns: the `[metrics] listen` HTTP endpoint (one std thread, outside every shard), which
//! asks each shard for its counters over its control channel (`Control::Metrics`):
//!
//! - `/metrics`: Prometheus text exposition format 0.0.4, every series per shard
//!   (`shard="0"`, ...) and summed (`shard="total"`): sum over `shard!="total"` to avoid
//!   counting twice. With `[cluster] redis`, the node's `tern_cluster_redis_*` series
//!   (no shard label: one Redis thread per node) follow.
//! - `/healthz`: 200 "ok" while the node takes mail: every shard answered within a second,
//!   none is draining (`tern ctl drain`) and every spool is under its high-water marks;
//!   else 503 with the reason (a balancer's health check).
//! - `/`: a status page (HTML + a little inline JS polling `/metrics` every second and
//!   drawing the last 5 minutes as inline SVG charts; a Content-Security-Policy header
//!   forbids anything not inline or from this endpoint).
//!
//! SECURITY: no authentication, read-only. One std thread serves one request per
//! connection, requests bounded to 8 KiB, 5 s read/write timeouts; nothing the client sends
//! is echoed back. Bind it to loopback or a management network.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use futures::channel::mpsc::UnboundedSender;
use tern_queue::commit::{
    CountHistogram, Histogram, PhaseHistogram, COUNT_BUCKETS, LATENCY_BUCKETS, PHASES,
    PHASE_BUCKETS,
};

use super::counters::{Reject, Snapshot, RECENT};
use crate::shard::Control;

/// Asks every shard for a snapshot; None if one did not answer within a second.
pub fn gather(controls: &[UnboundedSender<Control>]) -> Option<Vec<Snapshot>> {
    let (tx, rx) = std::sync::mpsc::channel();
    for c in controls {
        c.unbounded_send(Control::Metrics(tx.clone())).ok()?;
    }
    drop(tx);
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    let mut out = Vec::with_capacity(controls.len());
    while out.len() < controls.len() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        out.push(rx.recv_timeout(left).ok()?);
    }
    out.sort_by_key(|s: &Snapshot| s.shard);
    Some(out)
}

/// Renders `/metrics` (Prometheus text format 0.0.4).
pub fn render(shards: &[Snapshot]) -> String {
    let total = Snapshot::total(shards);
    let rows: Vec<(String, &Snapshot)> = shards
        .iter()
        .map(|s| (s.shard.to_string(), s))
        .chain(std::iter::once(("total".to_string(), &total)))
        .collect();
    let mut o = String::new();
    let mut family =
        |name: &str, kind: &str, help: &str, f: &dyn Fn(&str, &Snapshot, &mut String)| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (id, s) in &rows {
                f(id, s, &mut o);
            }
        };
    let simple = |name: &'static str, v: fn(&Snapshot) -> f64| {
        move |id: &str, s: &Snapshot, o: &mut String| {
            let _ = writeln!(o, "{name}{{shard=\"{id}\"}} {}", v(s));
        }
    };
    family(
        "tern_connections_accepted_total",
        "counter",
        "SMTP connections accepted.",
        &simple("tern_connections_accepted_total", |s| s.connections as f64),
    );
    family(
        "tern_sessions_active",
        "gauge",
        "SMTP sessions being served now.",
        &simple("tern_sessions_active", |s| s.sessions as f64),
    );
    family(
        "tern_user_rate_checks_total",
        "counter",
        "Per-login sending-rate checks (auth.user_message_rate at MAIL, auth.user_recipient_rate at RCPT) by outcome.",
        &|id, s, o| {
            for (k, kind) in ["message", "recipient"].iter().enumerate() {
                for (i, outcome) in ["allowed", "refused"].iter().enumerate() {
                    let _ = writeln!(
                        o,
                        "tern_user_rate_checks_total{{shard=\"{id}\",kind=\"{kind}\",outcome=\"{outcome}\"}} {}",
                        s.user_rate[k][i]
                    );
                }
            }
        },
    );
    family(
        "tern_draining",
        "gauge",
        "1 while the node is draining (tern ctl drain): new connections refused, open sessions finish.",
        &simple("tern_draining", |s| f64::from(u8::from(s.draining))),
    );
    family(
        "tern_tls_handshakes_total",
        "counter",
        "TLS handshakes (STARTTLS and implicit TLS) by result.",
        &|id, s, o| {
            for (r, v) in [("ok", s.tls_ok), ("failed", s.tls_failed)] {
                let _ = writeln!(
                    o,
                    "tern_tls_handshakes_total{{shard=\"{id}\",result=\"{r}\"}} {v}"
                );
            }
        },
    );
    family(
        "tern_auth_total",
        "counter",
        "SMTP AUTH attempts by mechanism and result.",
        &|id, s, o| {
            for (m, (ok, bad)) in &s.auth {
                for (r, v) in [("success", ok), ("failure", bad)] {
                    let _ = writeln!(
                        o,
                        "tern_auth_total{{shard=\"{id}\",mechanism=\"{m}\",result=\"{r}\"}} {v}"
                    );
                }
            }
        },
    );
    family(
        "tern_messages_accepted_total",
        "counter",
        "Messages made durable and answered 250.",
        &simple("tern_messages_accepted_total", |s| s.accepted as f64),
    );
    family(
        "tern_messages_rejected_total",
        "counter",
        "Messages and recipients refused, by reason.",
        &|id, s, o| {
            for (r, v) in Reject::ALL.iter().zip(s.rejected) {
                let _ = writeln!(
                    o,
                    "tern_messages_rejected_total{{shard=\"{id}\",reason=\"{}\"}} {v}",
                    r.label()
                );
            }
        },
    );
    family(
        "tern_deliveries_total",
        "counter",
        "Recipient delivery attempts by outcome.",
        &|id, s, o| {
            for (st, v) in [
                ("sent", s.sent),
                ("deferred", s.deferred),
                ("bounced", s.bounced),
            ] {
                let _ = writeln!(
                    o,
                    "tern_deliveries_total{{shard=\"{id}\",status=\"{st}\"}} {v}"
                );
            }
        },
    );
    family(
        "tern_dkim_signed_total",
        "counter",
        "DKIM-Signature fields added to accepted messages, by key algorithm.",
        &|id, s, o| {
            for a in crate::dkim::Algorithm::ALL {
                let _ = writeln!(
                    o,
                    "tern_dkim_signed_total{{shard=\"{id}\",algorithm=\"{}\"}} {}",
                    a.label(),
                    s.dkim_signed[a.index()]
                );
            }
        },
    );
    family(
        "tern_milter_actions_total",
        "counter",
        "Milter outcomes per filter and action (failed: the filter's default action was taken).",
        &|id, s, o| {
            for ((f, a), n) in &s.milter {
                let _ = writeln!(
                    o,
                    "tern_milter_actions_total{{shard=\"{id}\",filter=\"{}\",action=\"{a}\"}} {n}",
                    f.replace('\\', "\\\\").replace('"', "\\\"")
                );
            }
        },
    );
    family(
        "tern_milter_connections_total",
        "counter",
        "Milter connections per filter: opened (connect and negotiation) or reused (from the shard's idle pool).",
        &|id, s, o| {
            for ((f, h), n) in &s.milter_conns {
                let _ = writeln!(
                    o,
                    "tern_milter_connections_total{{shard=\"{id}\",filter=\"{}\",how=\"{h}\"}} {n}",
                    f.replace('\\', "\\\\").replace('"', "\\\"")
                );
            }
        },
    );
    family(
        "tern_queue_messages",
        "gauge",
        "Messages in the queue.",
        &simple("tern_queue_messages", |s| s.queue as f64),
    );
    family(
        "tern_queue_spool_bytes",
        "gauge",
        "Bytes the queue's spool segment files take on disk.",
        &simple("tern_queue_spool_bytes", |s| s.spool_bytes as f64),
    );
    family(
        "tern_queue_oldest_message_age_seconds",
        "gauge",
        "Age of the oldest queued message (0 when the queue is empty).",
        &simple(
            "tern_queue_oldest_message_age_seconds",
            Snapshot::oldest_age_secs,
        ),
    );
    family(
        "tern_acceptance_latency_seconds",
        "histogram",
        "End of DATA/BDAT LAST to the 250 reply (spool commit).",
        &|id, s, o| histogram(o, "tern_acceptance_latency_seconds", id, &s.accept_latency),
    );
    family(
        "tern_spool_sync_seconds",
        "histogram",
        "Spool group commit: write and fdatasync of one batch.",
        &|id, s, o| histogram(o, "tern_spool_sync_seconds", id, &s.sync_latency),
    );
    family(
        "tern_commit_wait_seconds",
        "histogram",
        "Where a message record's spool commit time goes, per phase: queued (waiting for the batch in flight), to_syncer and from_syncer (hand-offs to and from the syncer thread), disk (its batch's write + fdatasync), resume (the committer's reply until the session runs), total.",
        &|id, s, o| {
            for (phase, h) in PHASES.iter().zip(s.commit.phases.iter()) {
                phase_histogram(o, "tern_commit_wait_seconds", id, phase, h);
            }
        },
    );
    family(
        "tern_commit_batch_records",
        "histogram",
        "Records per spool group commit, by kind (message: accepted messages and bounces; state: delivery state records).",
        &|id, s, o| {
            count_histogram(o, "tern_commit_batch_records", id, "message", &s.commit.batch_messages);
            count_histogram(o, "tern_commit_batch_records", id, "state", &s.commit.batch_states);
        },
    );
    family(
        "tern_commit_messages_with_state_total",
        "counter",
        "Message records whose commit involved state records: shared (state records in the same batch), behind (queued while a batch with state records was in flight), behind_state_only (... a batch of state records only).",
        &|id, s, o| {
            let c = &s.commit;
            for (how, n) in [
                ("shared", c.messages_sharing),
                ("behind", c.messages_behind_state),
                ("behind_state_only", c.messages_behind_state_only),
            ] {
                let _ = writeln!(
                    o,
                    "tern_commit_messages_with_state_total{{shard=\"{id}\",how=\"{how}\"}} {n}"
                );
            }
        },
    );
    family(
        "tern_commit_batches_overlapped_total",
        "counter",
        "Spool group commits started while another batch was still in flight (spool.commits_in_flight = 2).",
        &simple("tern_commit_batches_overlapped_total", |s| {
            s.commit.batches_overlapped as f64
        }),
    );
    o
}

fn phase_histogram(o: &mut String, name: &str, id: &str, phase: &str, h: &PhaseHistogram) {
    let mut cum = 0;
    for (b, c) in PHASE_BUCKETS.iter().zip(h.counts.iter()) {
        cum += c;
        let _ = writeln!(
            o,
            "{name}_bucket{{shard=\"{id}\",phase=\"{phase}\",le=\"{b}\"}} {cum}"
        );
    }
    let _ = writeln!(
        o,
        "{name}_bucket{{shard=\"{id}\",phase=\"{phase}\",le=\"+Inf\"}} {}",
        h.count
    );
    let _ = writeln!(
        o,
        "{name}_sum{{shard=\"{id}\",phase=\"{phase}\"}} {}",
        h.sum
    );
    let _ = writeln!(
        o,
        "{name}_count{{shard=\"{id}\",phase=\"{phase}\"}} {}",
        h.count
    );
}

fn count_histogram(o: &mut String, name: &str, id: &str, kind: &str, h: &CountHistogram) {
    let mut cum = 0;
    for (b, c) in COUNT_BUCKETS.iter().zip(h.counts.iter()) {
        cum += c;
        let _ = writeln!(
            o,
            "{name}_bucket{{shard=\"{id}\",kind=\"{kind}\",le=\"{b}\"}} {cum}"
        );
    }
    let _ = writeln!(
        o,
        "{name}_bucket{{shard=\"{id}\",kind=\"{kind}\",le=\"+Inf\"}} {}",
        h.count
    );
    let _ = writeln!(o, "{name}_sum{{shard=\"{id}\",kind=\"{kind}\"}} {}", h.sum);
    let _ = writeln!(
        o,
        "{name}_count{{shard=\"{id}\",kind=\"{kind}\"}} {}",
        h.count
    );
}

fn histogram(o: &mut String, name: &str, id: &str, h: &Histogram) {
    let mut cum = 0;
    for (b, c) in LATENCY_BUCKETS.iter().zip(h.counts.iter()) {
        cum += c;
        let _ = writeln!(o, "{name}_bucket{{shard=\"{id}\",le=\"{b}\"}} {cum}");
    }
    let _ = writeln!(o, "{name}_bucket{{shard=\"{id}\",le=\"+Inf\"}} {}", h.count);
    let _ = writeln!(o, "{name}_sum{{shard=\"{id}\"}} {}", h.sum);
    let _ = writeln!(o, "{name}_count{{shard=\"{id}\"}} {}", h.count);
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Renders the status page: the numbers now (so it reads without JS), then JS polls
/// `/metrics` every second for rates and live numbers, and reloads the error list.
pub fn status_page(shards: &[Snapshot]) -> String {
    let t = Snapshot::total(shards);
    let rejected: u64 = t.rejected.iter().sum();
    let mut o = String::new();
    let _ = write!(
        o,
        r#"<!doctype html><html><head><meta charset="utf-8"><title>tern status</title>
<style>body{{font:14px sans-serif;margin:1em 2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}.l{{text-align:left}}
.charts svg{{border:1px solid #ddd;margin:0 8px 8px 0}}.charts text{{font:10px sans-serif;fill:#555}}</style></head>
<body><h1>tern</h1>
<table><tr><th class=l>what</th><th>total</th><th>per second</th></tr>
<tr><td class=l>connections accepted</td><td id=c>{}</td><td id=cr>-</td></tr>
<tr><td class=l>messages accepted</td><td id=a>{}</td><td id=ar>-</td></tr>
<tr><td class=l>messages rejected</td><td id=r>{}</td><td id=rr>-</td></tr>
<tr><td class=l>deliveries sent</td><td id=s>{}</td><td id=sr>-</td></tr>
<tr><td class=l>deliveries deferred</td><td id=d>{}</td><td id=dr>-</td></tr>
<tr><td class=l>deliveries bounced</td><td id=b>{}</td><td id=br>-</td></tr>
<tr><td class=l>queue depth (messages)</td><td id=q>{}</td><td></td></tr>
<tr><td class=l>oldest queued (s)</td><td id=o>{:.0}</td><td></td></tr>
</table>
<h2>Last 5 minutes</h2><div class=charts>{CHARTS}</div>
<h2>Shards</h2><table id=sh><tr><th>shard</th><th>sessions</th><th>messages accepted</th><th>queue</th></tr>
"#,
        t.connections,
        t.accepted,
        rejected,
        t.sent,
        t.deferred,
        t.bounced,
        t.queue,
        t.oldest_age_secs(),
        CHARTS = CHARTS,
    );
    for s in shards {
        let _ = writeln!(
            o,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            s.shard, s.sessions, s.accepted, s.queue
        );
    }
    // Submission policy at a glance: signatures per algorithm, refusals per reason (the
    // same counters as tern_dkim_signed_total and tern_messages_rejected_total).
    o.push_str("</table>\n<h2>DKIM signatures</h2><table id=dkim><tr><th class=l>algorithm</th><th>messages signed</th></tr>\n");
    for a in crate::dkim::Algorithm::ALL {
        let _ = writeln!(
            o,
            "<tr><td class=l>{}</td><td>{}</td></tr>",
            a.label(),
            t.dkim_signed[a.index()]
        );
    }
    o.push_str("</table>\n<h2>Refusals by reason</h2><table id=rej><tr><th class=l>reason</th><th>refused</th></tr>\n");
    for (r, v) in Reject::ALL.iter().zip(t.rejected) {
        let _ = writeln!(o, "<tr><td class=l>{}</td><td>{v}</td></tr>", r.label());
    }
    o.push_str("</table>\n<h2>Recent errors</h2><table id=err><tr><th class=l>time (UTC)</th><th class=l>what</th></tr>\n");
    let mut recent: Vec<&(u64, String)> = shards.iter().flat_map(|s| s.recent.iter()).collect();
    recent.sort_by_key(|(t, _)| std::cmp::Reverse(*t));
    for (when, text) in recent.into_iter().take(RECENT) {
        let _ = writeln!(
            o,
            "<tr><td class=l>{}</td><td class=l>{}</td></tr>",
            httpdate(*when),
            html_escape(text)
        );
    }
    o.push_str(STATUS_JS);
    o
}

/// `YYYY-MM-DD HH:MM:SS` of a Unix time (UTC).
fn httpdate(t: u64) -> String {
    let (days, secs) = (t / 86400, t % 86400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// The four charts the page's script draws into (empty until it has polled).
const CHARTS: &str = r#"<svg id=ch-a width=270 height=130 viewBox="0 0 270 130"></svg>
<svg id=ch-s width=270 height=130 viewBox="0 0 270 130"></svg>
<svg id=ch-q width=270 height=130 viewBox="0 0 270 130"></svg>
<svg id=ch-l width=270 height=130 viewBox="0 0 270 130"></svg>"#;

/// The page's script: every second, `/metrics` into the table and the shard rows, and one
/// sample into a 5-minute ring (rates from counter deltas, the queue gauge, latency
/// quantiles from the histogram buckets' delta) that the charts are redrawn from. A failed
/// scrape is a gap in the charts.
const STATUS_JS: &str = r##"</table>
<p><small>live: <span id=live>-</span></small></p>
<script>
let prev = null, tick = 0, prevB = null, ring = [];
const SPAN = 300e3, X0 = 44, X1 = 264, Y0 = 20, Y1 = 110;
const CHARTS = [
  ['ch-a', 'messages accepted / s', [['a', '#07c']], x => x.toFixed(1)],
  ['ch-s', 'deliveries sent / s', [['s', '#090']], x => x.toFixed(1)],
  ['ch-q', 'queue depth (messages)', [['q', '#c60']], x => x.toFixed(0)],
  ['ch-l', 'acceptance latency (ms)', [['p50', '#07c'], ['p99', '#c00']], x => x.toPrecision(3)],
];
// The acceptance latency histogram of shard="total": [[le, cumulative count], ...].
function buckets(m) {
  const re = /^tern_acceptance_latency_seconds_bucket\{shard="total",le="([^"]+)"\} (\S+)/;
  let b = [];
  for (const l of m) {
    const x = l.match(re);
    if (x) b.push([x[1] == '+Inf' ? Infinity : parseFloat(x[1]), parseFloat(x[2])]);
  }
  return b;
}
// Quantile q of cumulative buckets b, interpolated within its bucket (as Prometheus'
// histogram_quantile does); null without observations.
function quantile(q, b) {
  const n = b.length ? b[b.length - 1][1] : 0;
  if (!(n > 0)) return null;
  const rank = q * n;
  for (let i = 0; i < b.length; i++) {
    if (b[i][1] < rank) continue;
    const [lo, c] = i ? b[i - 1] : [0, 0];
    if (b[i][0] == Infinity) return lo;
    return lo + (b[i][0] - lo) * (rank - c) / (b[i][1] - c);
  }
  return null;
}
// p50 and p99 (ms) of the acceptances since the last poll, or of all when none came.
function latency(m) {
  const b = buckets(m);
  let d = b;
  if (prevB && prevB.length == b.length) {
    const dd = b.map((x, i) => [x[0], x[1] - prevB[i][1]]);
    if (dd.length && dd[dd.length - 1][1] > 0) d = dd;
  }
  prevB = b;
  return [0.5, 0.99].map(q => { const v = quantile(q, d); return v == null ? null : v * 1000; });
}
// One sample (null: the scrape failed) into the ring, and redraw.
function record(t, v) {
  ring.push({ t, v });
  while (ring[0].t < t - SPAN) ring.shift();
  for (const c of CHARTS) draw(t, c);
}
function draw(now, [id, title, series, fmt]) {
  let max = 0;
  for (const r of ring) for (const [k] of series) if (r.v && r.v[k] != null) max = Math.max(max, r.v[k]);
  const top = max || 1;
  const x = t => (X1 - (X1 - X0) * (now - t) / SPAN).toFixed(1);
  const y = v => (Y1 - (Y1 - Y0) * v / top).toFixed(1);
  let s = `<text x=4 y=12 style="font-weight:bold">${title}</text>` +
    `<rect x=${X0} y=${Y0} width=${X1 - X0} height=${Y1 - Y0} fill=none stroke="#eee"/>` +
    `<text class=max x=${X0 - 3} y=${Y0 + 4} text-anchor=end>${fmt(max)}</text>` +
    `<text x=${X0 - 3} y=${Y1} text-anchor=end>0</text>` +
    `<text x=${X0} y=${Y1 + 13}>-5 min</text><text x=${X1} y=${Y1 + 13} text-anchor=end>now</text>`;
  series.forEach(([k, color], i) => {
    if (series.length > 1) s += `<text x=${X1 - 30 * (series.length - 1 - i)} y=12 text-anchor=end style="fill:${color}">${k}</text>`;
    let pts = [], last = -Infinity;
    const flush = () => {
      if (pts.length == 1) pts.push(pts[0]);
      if (pts.length) s += `<polyline fill=none stroke="${color}" stroke-width=1.5 stroke-linecap=round points="${pts.join(' ')}"/>`;
      pts = [];
    };
    for (const r of ring) {
      const v = r.v && r.v[k];
      if (v == null || r.t - last > 5000) flush();
      if (v != null) pts.push(x(r.t) + ',' + y(v));
      last = r.t;
    }
    flush();
  });
  document.getElementById(id).innerHTML = s;
}
function sum(m, name, lab) {
  let re = new RegExp('^' + name + '\\{shard="total"' + (lab ? ',' + lab : '') + '[,}]', '');
  let t = 0;
  for (const l of m) if (re.test(l)) t += parseFloat(l.split(' ').pop());
  return t;
}
function per(m, name) {
  let out = {};
  let re = new RegExp('^' + name + '\\{shard="(\\d+)"\\} (\\S+)');
  for (const l of m) { let x = l.match(re); if (x) out[x[1]] = x[2]; }
  return out;
}
async function poll() {
  try {
    const res = await fetch('/metrics');
    if (!res.ok) throw new Error('HTTP ' + res.status);
    const m = (await res.text()).split('\n');
    const v = {
      c: sum(m, 'tern_connections_accepted_total'),
      a: sum(m, 'tern_messages_accepted_total'),
      r: sum(m, 'tern_messages_rejected_total', 'reason'),
      s: sum(m, 'tern_deliveries_total', 'status="sent"'),
      d: sum(m, 'tern_deliveries_total', 'status="deferred"'),
      b: sum(m, 'tern_deliveries_total', 'status="bounced"'),
      q: sum(m, 'tern_queue_messages'),
      o: sum(m, 'tern_queue_oldest_message_age_seconds'),
    };
    const now = Date.now();
    for (const k in v) {
      document.getElementById(k).textContent = Math.round(v[k]);
      const r = document.getElementById(k + 'r');
      if (r && prev) r.textContent = ((v[k] - prev.v[k]) * 1000 / (now - prev.t)).toFixed(1);
    }
    const rate = k => prev && v[k] >= prev.v[k] ? (v[k] - prev.v[k]) * 1000 / (now - prev.t) : null;
    const [p50, p99] = latency(m);
    record(now, { a: rate('a'), s: rate('s'), q: v.q, p50, p99 });
    prev = { v, t: now };
    const ses = per(m, 'tern_sessions_active'), acc = per(m, 'tern_messages_accepted_total'),
      q = per(m, 'tern_queue_messages');
    let rows = '<tr><th>shard</th><th>sessions</th><th>messages accepted</th><th>queue</th></tr>';
    for (const id in ses) rows += `<tr><td>${id}</td><td>${ses[id]}</td><td>${acc[id]}</td><td>${q[id]}</td></tr>`;
    document.getElementById('sh').innerHTML = rows;
    if (++tick % 5 == 0) {
      const doc = new DOMParser().parseFromString(await (await fetch('/')).text(), 'text/html');
      document.getElementById('err').innerHTML = doc.getElementById('err').innerHTML;
    }
    document.getElementById('live').textContent = new Date().toISOString();
  } catch (e) {
    document.getElementById('live').textContent = 'unreachable: ' + e;
    record(Date.now(), null);
  }
}
setInterval(poll, 1000); poll();
</script></body></html>
"##;

/// Largest request accepted (request line + headers).
const MAX_REQUEST: usize = 8192;

/// Serves the endpoint on its own thread until the process exits.
pub fn spawn_http(
    listener: TcpListener,
    controls: Vec<UnboundedSender<Control>>,
    cluster: Option<Arc<crate::cluster::Status>>,
    userstore: Arc<crate::pgusers::Status>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("tern-metrics".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                };
                if let Err(e) = serve_one(conn, &controls, cluster.as_deref(), &userstore) {
                    tracing::debug!(error = %e, "metrics request failed");
                }
            }
        })
        .map(|_| ())
}

fn serve_one(
    mut conn: TcpStream,
    controls: &[UnboundedSender<Control>],
    cluster: Option<&crate::cluster::Status>,
    userstore: &crate::pgusers::Status,
) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        if buf.len() > MAX_REQUEST {
            return respond(
                &mut conn,
                "431 Request Header Fields Too Large",
                "text/plain",
                "too large\n",
            );
        }
        let n = conn.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = buf.split(|&b| b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "GET" && method != "HEAD" {
        return respond(
            &mut conn,
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n",
        );
    }
    let path = target.split('?').next().unwrap_or("");
    match path {
        "/metrics" | "/healthz" | "/" => {}
        _ => return respond(&mut conn, "404 Not Found", "text/plain", "not found\n"),
    }
    let Some(snaps) = gather(controls) else {
        return respond(
            &mut conn,
            "503 Service Unavailable",
            "text/plain",
            "a shard did not answer\n",
        );
    };
    match path {
        "/metrics" => respond(
            &mut conn,
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            &(render(&snaps)
                + &cluster.map(|c| c.render()).unwrap_or_default()
                + &userstore.metrics()),
        ),
        "/healthz" => {
            // A balancer sends new connections here only while this answers 200.
            let t = Snapshot::total(&snaps);
            if t.draining {
                respond(
                    &mut conn,
                    "503 Service Unavailable",
                    "text/plain",
                    "draining\n",
                )
            } else if !t.accepting {
                respond(
                    &mut conn,
                    "503 Service Unavailable",
                    "text/plain",
                    "not accepting mail (queue above its high-water mark)\n",
                )
            } else {
                respond(&mut conn, "200 OK", "text/plain", "ok\n")
            }
        }
        _ => respond(
            &mut conn,
            "200 OK",
            "text/html; charset=utf-8",
            &status_page(&snaps),
        ),
    }
}

/// The status page loads nothing from anywhere: its script and style are inline, and it
/// fetches only from this endpoint.
const CSP: &str = "Content-Security-Policy: default-src 'none'; script-src 'unsafe-inline'; \
    style-src 'unsafe-inline'; connect-src 'self'; base-uri 'none'; form-action 'none'\r\n";

fn respond(conn: &mut TcpStream, status: &str, ctype: &str, body: &str) -> std::io::Result<()> {
    let csp = if ctype.starts_with("text/html") {
        CSP
    } else {
        ""
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nCache-Control: no-store\r\n{csp}Connection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes())?;
    conn.write_all(body.as_bytes())?;
    conn.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(httpdate(0), "1970-01-01 00:00:00");
        assert_eq!(httpdate(1_700_000_000), "2023-11-14 22:13:20");
    }

    #[test]
    fn totals_and_histograms() {
        let mut a = Snapshot {
            shard: 0,
            accepted: 2,
            ..Default::default()
        };
        a.accept_latency.observe(Duration::from_millis(3));
        a.commit.phases[2].observe(Duration::from_micros(400));
        a.commit.batch_states.observe(3);
        a.commit.messages_sharing = 2;
        let mut b = Snapshot {
            shard: 1,
            accepted: 1,
            ..Default::default()
        };
        b.commit.phases[2].observe(Duration::from_micros(40));
        b.commit.messages_sharing = 1;
        let text = render(&[a, b]);
        // The commit phases: fine buckets, one series per phase, summed over shards.
        assert!(text.contains(
            "tern_commit_wait_seconds_bucket{shard=\"total\",phase=\"disk\",le=\"0.00005\"} 1\n"
        ));
        assert!(text.contains(
            "tern_commit_wait_seconds_bucket{shard=\"total\",phase=\"disk\",le=\"0.0005\"} 2\n"
        ));
        assert!(text.contains("tern_commit_wait_seconds_count{shard=\"0\",phase=\"queued\"} 0\n"));
        assert!(text
            .contains("tern_commit_batch_records_bucket{shard=\"0\",kind=\"state\",le=\"2\"} 0\n"));
        assert!(text
            .contains("tern_commit_batch_records_bucket{shard=\"0\",kind=\"state\",le=\"4\"} 1\n"));
        assert!(text
            .contains("tern_commit_messages_with_state_total{shard=\"total\",how=\"shared\"} 3\n"));
        assert!(text.contains("tern_messages_accepted_total{shard=\"total\"} 3\n"));
        assert!(
            text.contains("tern_acceptance_latency_seconds_bucket{shard=\"0\",le=\"0.005\"} 1\n")
        );
        assert!(
            text.contains("tern_acceptance_latency_seconds_bucket{shard=\"0\",le=\"0.0025\"} 0\n")
        );
        assert!(text.contains("tern_acceptance_latency_seconds_count{shard=\"total\"} 1\n"));
    }
}
