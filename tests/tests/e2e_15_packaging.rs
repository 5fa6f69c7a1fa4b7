//! 15: the operations artifacts under `packaging/` checked with the real tools and against
//! a live server:
//!
//! - `prometheus/tern-alerts.yml`: `promtool check rules`, `promtool test rules` with
//!   `tern-alerts.test.yml` (every alert fires in at least one case), and every alert has
//!   `for:`, a severity and a summary and description;
//! - `grafana/tern-dashboard.json`: importable (a Prometheus datasource variable every
//!   panel uses), every query valid PromQL (`promtool check rules` on them as recording
//!   rules);
//! - both: every `tern_*` series a query names, with its `label="value"` matchers, is one a
//!   live tern exports on /metrics (`tern_draining` included: the drain work adds it);
//! - `fail2ban/`: `fail2ban-regex` with the filter on logs a live tern wrote (text and
//!   JSON, IPv4 and IPv6), matching exactly the addresses the client saw refused, and none
//!   an attacker wrote into a login, HELO or address; `fail2ban-client -t` loads the jail.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use tern_smtp::sasl::client;
use tern_tests::json::{self, Value};
use tern_tests::{require, require_tool, wait_for, Client, Reply, Server};

fn packaging(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../packaging")
        .join(rel)
}

fn read(rel: &str) -> String {
    let p = packaging(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

/// Runs a tool; (success, stdout, stderr).
fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

// ------------------------------------------------------------------------------------
// Prometheus rules and the Grafana dashboard.
// ------------------------------------------------------------------------------------

/// The rules of a rules file, as (alert name or None for a recording rule, the lines of
/// its block). A small reader for the layout tern-alerts.yml uses (`- alert:` items).
fn rule_blocks(yaml: &str) -> Vec<(Option<String>, Vec<String>)> {
    // (alert name, lines, is a rule): a group header ends the rule before it.
    let mut out: Vec<(Option<String>, Vec<String>, bool)> = Vec::new();
    for line in yaml.lines() {
        let t = line.trim_start();
        if let Some(name) = t.strip_prefix("- alert:") {
            out.push((Some(name.trim().to_string()), vec![line.to_string()], true));
        } else if t.starts_with("- record:") {
            out.push((None, vec![line.to_string()], true));
        } else if t.starts_with("- name:") {
            out.push((None, Vec::new(), false));
        } else if let Some((_, lines, _)) = out.last_mut() {
            lines.push(line.to_string());
        }
    }
    out.into_iter()
        .filter(|(_, _, rule)| *rule)
        .map(|(n, l, _)| (n, l))
        .collect()
}

/// The PromQL expressions (`expr:` values, plain or `|` blocks) of a rules file.
fn rule_exprs(yaml: &str) -> Vec<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let l = lines[i];
        if let Some(rest) = l.trim_start().strip_prefix("expr:") {
            let rest = rest.trim();
            if rest.starts_with('|') || rest.starts_with('>') {
                let mut e = String::new();
                let ind = indent(l);
                while i + 1 < lines.len()
                    && (lines[i + 1].trim().is_empty() || indent(lines[i + 1]) > ind)
                {
                    i += 1;
                    e.push_str(lines[i].trim());
                    e.push('\n');
                }
                out.push(e);
            } else {
                let unq = rest
                    .strip_prefix('\'')
                    .and_then(|r| r.strip_suffix('\''))
                    .map(|r| r.replace("''", "'"))
                    .unwrap_or_else(|| rest.to_string());
                out.push(unq);
            }
        }
        i += 1;
    }
    out
}

/// Every query string of a Grafana dashboard: targets' `expr`, and the templating
/// queries (`label_values(SELECTOR, label)` reduced to the selector).
fn dashboard_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Obj(kv) => {
            for (k, v) in kv {
                match (k.as_str(), v) {
                    ("expr", Value::Str(e)) => out.push(e.clone()),
                    ("query" | "definition", Value::Str(q)) => {
                        if let Some(inner) = q
                            .strip_prefix("label_values(")
                            .and_then(|r| r.strip_suffix(')'))
                        {
                            let sel = inner.rsplit_once(',').map_or(inner, |(s, _)| s);
                            out.push(sel.trim().to_string());
                        } else if q.contains('(') || q.contains("tern_") {
                            out.push(q.clone());
                        }
                    }
                    _ => dashboard_exprs(v, out),
                }
            }
        }
        Value::Arr(a) => a.iter().for_each(|v| dashboard_exprs(v, out)),
        _ => {}
    }
}

/// A metric selector in PromQL: the metric name and its equality matchers.
#[derive(Debug, Clone, PartialEq)]
struct Selector {
    name: String,
    eq: Vec<(String, String)>,
}

/// Reads a quoted PromQL string starting at `b[*i]` (the quote); returns its value.
fn quoted(b: &[char], i: &mut usize) -> String {
    let q = b[*i];
    *i += 1;
    let mut s = String::new();
    while *i < b.len() && b[*i] != q {
        if b[*i] == '\\' && q != '`' && *i + 1 < b.len() {
            *i += 1;
        }
        s.push(b[*i]);
        *i += 1;
    }
    *i += 1;
    s
}

/// The `tern_*` selectors of a PromQL expression: identifiers starting with `tern_`
/// outside string literals, with their `{label="value"}` equality matchers (`!=`, `=~`
/// and `!~` are not checked).
fn tern_selectors(expr: &str) -> Vec<Selector> {
    let b: Vec<char> = expr.chars().collect();
    let ident_start = |c: char| c.is_ascii_alphabetic() || c == '_' || c == ':';
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let skip_ws = |i: &mut usize| {
        while *i < b.len() && b[*i].is_whitespace() {
            *i += 1;
        }
    };
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == '"' || c == '\'' || c == '`' {
            quoted(&b, &mut i);
        } else if ident_start(c) && (i == 0 || !(ident(b[i - 1]) || b[i - 1] == '$')) {
            let st = i;
            while i < b.len() && ident(b[i]) {
                i += 1;
            }
            let name: String = b[st..i].iter().collect();
            if !name.starts_with("tern_") {
                continue;
            }
            let mut sel = Selector {
                name,
                eq: Vec::new(),
            };
            let mut j = i;
            skip_ws(&mut j);
            if j < b.len() && b[j] == '{' {
                j += 1;
                loop {
                    skip_ws(&mut j);
                    if j >= b.len() || b[j] == '}' {
                        j += 1;
                        break;
                    }
                    let ls = j;
                    while j < b.len() && ident(b[j]) {
                        j += 1;
                    }
                    let label: String = b[ls..j].iter().collect();
                    skip_ws(&mut j);
                    let os = j;
                    while j < b.len() && matches!(b[j], '=' | '!' | '~') {
                        j += 1;
                    }
                    let op: String = b[os..j].iter().collect();
                    skip_ws(&mut j);
                    assert!(
                        j < b.len() && matches!(b[j], '"' | '\'' | '`'),
                        "cannot read the matchers of {expr:?}"
                    );
                    let value = quoted(&b, &mut j);
                    if op == "=" {
                        sel.eq.push((label, value));
                    }
                    skip_ws(&mut j);
                    if j < b.len() && b[j] == ',' {
                        j += 1;
                    }
                }
                i = j;
            }
            out.push(sel);
        } else if ident(c) {
            // The tail of a number or duration (5m) or of a $variable.
            while i < b.len() && ident(b[i]) {
                i += 1;
            }
        } else {
            i += 1;
        }
    }
    out
}

#[test]
fn promql_tokenizer() {
    let s = tern_selectors(
        r#"sum by (le) (rate(tern_x_bucket{shard="total", a!="b",job=~"$job"}[$__rate_interval])) / tern_y or up{q="tern_z"} + $tern_var"#,
    );
    assert_eq!(
        s,
        vec![
            Selector {
                name: "tern_x_bucket".into(),
                eq: vec![("shard".into(), "total".into())]
            },
            Selector {
                name: "tern_y".into(),
                eq: vec![]
            },
        ]
    );
}

#[test]
fn alert_rules_pass_promtool_and_their_unit_tests() {
    if !require_tool("promtool") {
        return;
    }
    let rules = packaging("prometheus/tern-alerts.yml");
    let (ok, out, err) = run(Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(&rules));
    assert!(ok, "promtool check rules:\n{out}{err}");
    let yaml = read("prometheus/tern-alerts.yml");
    let blocks = rule_blocks(&yaml);
    assert!(
        out.contains(&format!("SUCCESS: {} rules found", blocks.len())),
        "promtool and this test count the rules alike: {out}"
    );

    // The unit tests (synthetic series, expected alerts), run from their directory so
    // that rule_files resolves.
    let (ok, out, err) = run(Command::new("promtool")
        .args(["test", "rules", "tern-alerts.test.yml"])
        .current_dir(packaging("prometheus")));
    assert!(ok, "promtool test rules:\n{out}{err}");
    assert!(out.contains("SUCCESS"), "{out}{err}");

    // Every alert: for:, a severity, a summary and a description; and it fires in at
    // least one unit test case (an alertname with a non-empty exp_alerts).
    let tests = read("prometheus/tern-alerts.test.yml");
    let mut fired = BTreeSet::new();
    let tl: Vec<&str> = tests.lines().collect();
    for (i, l) in tl.iter().enumerate() {
        if let Some(name) = l.trim().strip_prefix("alertname:") {
            let next = tl.get(i + 1).map_or("", |n| n.trim());
            if next == "exp_alerts:" {
                fired.insert(name.trim().to_string());
            }
        }
    }
    let mut names = BTreeSet::new();
    for (name, lines) in &blocks {
        let name = name
            .as_ref()
            .expect("only alerting rules in tern-alerts.yml");
        let body = lines.join("\n");
        for key in ["for:", "severity:", "summary:", "description:"] {
            assert!(body.contains(key), "alert {name} has no {key}\n{body}");
        }
        assert!(
            fired.contains(name),
            "alert {name} never fires in tern-alerts.test.yml (fired there: {fired:?})"
        );
        names.insert(name.clone());
    }
    // The alerts the brief asks for.
    for want in [
        "TernDown",
        "TernNodeDraining",
        "TernQueueDepthHigh",
        "TernQueueOldestMessageOld",
        "TernDeferralRateHigh",
        "TernBounceRateHigh",
        "TernAuthFailureSpike",
        "TernRejectionsHigh",
    ] {
        assert!(names.contains(want), "no alert {want} in {names:?}");
    }
}

fn dashboard() -> Value {
    json::parse(&read("grafana/tern-dashboard.json")).expect("the dashboard is valid JSON")
}

#[test]
fn dashboard_is_importable_and_its_queries_are_promql() {
    let d = dashboard();
    for key in ["title", "uid", "panels", "templating", "schemaVersion"] {
        assert!(d.get(key).is_some(), "dashboard without {key}");
    }
    // A Prometheus datasource variable, and every panel and target uses it.
    let vars = d.get("templating").and_then(|t| t.get("list")).unwrap();
    let ds_var = vars
        .as_array()
        .iter()
        .find(|v| v.get("type").map(Value::as_str) == Some("datasource"))
        .expect("a datasource template variable");
    assert_eq!(ds_var.get("query").map(Value::as_str), Some("prometheus"));
    let ds_ref = format!("${{{}}}", ds_var.get("name").unwrap().as_str());
    let mut panels = 0;
    for p in d.get("panels").unwrap().as_array() {
        if p.get("type").map(Value::as_str) == Some("row") {
            continue;
        }
        panels += 1;
        let title = p.get("title").unwrap().as_str();
        let uid = |v: &Value| {
            v.get("datasource")
                .and_then(|d| d.get("uid"))
                .map(|u| u.as_str().to_string())
        };
        assert_eq!(uid(p).as_deref(), Some(&*ds_ref), "panel {title}");
        let targets = p.get("targets").expect("panel targets").as_array();
        assert!(!targets.is_empty(), "panel {title} has no query");
        for t in targets {
            assert_eq!(uid(t).as_deref(), Some(&*ds_ref), "a target of {title}");
            assert!(
                !t.get("expr").unwrap().as_str().trim().is_empty(),
                "empty query in {title}"
            );
        }
    }
    assert!(panels >= 10, "only {panels} panels");
    // The panels the brief lists, by the series they read.
    let mut exprs = Vec::new();
    dashboard_exprs(&d, &mut exprs);
    let all = exprs.join("\n");
    for series in [
        "tern_messages_accepted_total",
        "tern_messages_rejected_total",
        "tern_deliveries_total",
        "tern_auth_total",
        "tern_queue_messages",
        "tern_queue_oldest_message_age_seconds",
        "tern_acceptance_latency_seconds_bucket",
        "tern_spool_sync_seconds_bucket",
        "tern_sessions_active",
        "tern_tls_handshakes_total",
        "tern_draining",
    ] {
        assert!(all.contains(series), "no panel reads {series}");
    }

    // Every query parses as PromQL: promtool checks them as recording rules (Grafana's
    // variables replaced by values).
    if !require_tool("promtool") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut y = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, e) in exprs.iter().enumerate() {
        let e = e
            .replace("$__rate_interval", "5m")
            .replace("$job", ".+")
            .replace("$instance", ".+");
        y.push_str(&format!(
            "      - record: dashboard:q{i}\n        expr: '{}'\n",
            e.replace('\'', "''")
        ));
    }
    let f = dir.path().join("dashboard-queries.yml");
    std::fs::write(&f, &y).unwrap();
    let (ok, out, err) = run(Command::new("promtool").arg("check").arg("rules").arg(&f));
    assert!(
        ok,
        "a dashboard query is not valid PromQL:\n{out}{err}\n{y}"
    );
    assert!(
        out.contains(&format!("SUCCESS: {} rules found", exprs.len())),
        "{out}"
    );
}

/// One raw GET of /metrics.
fn scrape(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).expect("connect to /metrics");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_string()
}

/// An exposition: family name -> type, and sample name -> the label sets of its samples.
struct Exposition {
    families: BTreeMap<String, String>,
    samples: BTreeMap<String, Vec<BTreeMap<String, String>>>,
}

fn parse_exposition(text: &str) -> Exposition {
    let mut e = Exposition {
        families: BTreeMap::new(),
        samples: BTreeMap::new(),
    };
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
            e.families.insert(name.to_string(), kind.trim().to_string());
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let end = line.find(['{', ' ']).expect("a sample line");
        let name = &line[..end];
        let mut labels = BTreeMap::new();
        if line[end..].starts_with('{') {
            let close = line.rfind('}').expect("closing brace");
            let chars: Vec<char> = line[end + 1..close].chars().collect();
            let mut i = 0;
            while i < chars.len() {
                let ls = i;
                while chars[i] != '=' {
                    i += 1;
                }
                let label: String = chars[ls..i].iter().collect();
                i += 1;
                let v = quoted(&chars, &mut i);
                labels.insert(label.trim().to_string(), v);
                if i < chars.len() && chars[i] == ',' {
                    i += 1;
                }
            }
        }
        e.samples.entry(name.to_string()).or_default().push(labels);
    }
    e
}

impl Exposition {
    /// The family a sample name belongs to (histograms: `_bucket`, `_sum`, `_count`).
    fn family_of(&self, name: &str) -> Option<&str> {
        if let Some((f, _)) = self.families.get_key_value(name) {
            return Some(f);
        }
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix) {
                if let Some((f, kind)) = self.families.get_key_value(base) {
                    if kind == "histogram" || kind == "summary" {
                        return Some(f);
                    }
                }
            }
        }
        None
    }
}

fn cram(c: &mut Client, user: &str, password: &str) -> Reply {
    let r = c.cmd("AUTH CRAM-MD5");
    r.check(334, "");
    let challenge = B64.decode(r.lines[0].trim()).expect("base64 challenge");
    c.cmd(&B64.encode(client::cram_md5(user, password, &challenge)))
}

/// Series a node exports only when configured for them (this test's demo node is not):
/// `tern_cluster_redis_up` with `[cluster] redis` (e2e_23_redis checks every
/// `tern_cluster_*` series the rules name on such a node). `tern_userstore_up` is
/// exported by every node, a file store included.
const ONLY_WHEN_CONFIGURED: &[&str] = &["tern_cluster_redis_up"];

#[test]
fn dashboard_and_alerts_name_only_series_tern_exports() {
    let s = Server::with(&["auth.tarpit=10ms"]);
    let addr = s.metrics.expect("the demo serves /metrics");
    // A little traffic, so that the labelled series exist: a message, a failed AUTH and
    // a successful one, a refused relay.
    let mut c = s.smtp();
    c.ehlo("client.example");
    cram(&mut c, "demo", "wrong").check(535, "5.7.8");
    cram(&mut c, "demo", "demo").check(235, "2.7.0");
    c.send_mail(
        "demo@localhost",
        &["user@demo.test"],
        b"Subject: hi\r\n\r\nhi\r\n",
    );
    c.quit();
    let mut c = s.smtp();
    c.ehlo("client.example");
    c.expect("MAIL FROM:<a@example.org>", 250, "2.1.0");
    c.expect("RCPT TO:<x@example.net>", 554, "5.7.1");
    c.quit();
    let mut text = String::new();
    wait_for("the traffic in /metrics", Duration::from_secs(20), || {
        text = scrape(addr);
        text.contains("tern_messages_accepted_total{shard=\"total\"} 1\n")
            && text.contains(
                "tern_auth_total{shard=\"total\",mechanism=\"CRAM-MD5\",result=\"failure\"} 1\n",
            )
    });
    let exp = parse_exposition(&text);

    let mut sources: Vec<(String, String)> = Vec::new();
    for e in rule_exprs(&read("prometheus/tern-alerts.yml")) {
        sources.push(("prometheus/tern-alerts.yml".into(), e));
    }
    let n_rules = rule_blocks(&read("prometheus/tern-alerts.yml")).len();
    assert_eq!(sources.len(), n_rules, "one expr read per rule");
    let mut dash = Vec::new();
    dashboard_exprs(&dashboard(), &mut dash);
    assert!(!dash.is_empty());
    for e in dash {
        sources.push(("grafana/tern-dashboard.json".into(), e));
    }

    let mut problems = Vec::new();
    let mut named = BTreeSet::new();
    for (file, e) in &sources {
        for sel in tern_selectors(e) {
            named.insert(sel.name.clone());
            if ONLY_WHEN_CONFIGURED.contains(&sel.name.as_str()) {
                continue;
            }
            if exp.family_of(&sel.name).is_none() {
                problems.push(format!("{file}: {} is not exported (in {e:?})", sel.name));
                continue;
            }
            // Prometheus adds job and instance at scrape time.
            let want: Vec<&(String, String)> = sel
                .eq
                .iter()
                .filter(|(l, _)| l != "job" && l != "instance")
                .collect();
            let found = exp.samples.get(&sel.name).is_some_and(|all| {
                all.iter()
                    .any(|ls| want.iter().all(|(l, v)| ls.get(l) == Some(v)))
            });
            if !found {
                problems.push(format!(
                    "{file}: no exported {} sample has {want:?} (in {e:?})",
                    sel.name
                ));
            }
        }
    }
    assert!(
        named.len() >= 10,
        "the tokenizer found too few series: {named:?}"
    );
    assert!(
        problems.is_empty(),
        "queries name series tern does not export:\n{}\n\nexported families: {:?}",
        problems.join("\n"),
        exp.families.keys().collect::<Vec<_>>()
    );
}

// ------------------------------------------------------------------------------------
// fail2ban.
// ------------------------------------------------------------------------------------

fn lo(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, n))
}

/// A client from `src` to `addr`, greeted and EHLO'd as `helo`.
fn client_from(src: IpAddr, addr: SocketAddr, helo: &str) -> Client {
    let mut c = Client::connect_from(src, addr);
    c.expect_greeting();
    c.ehlo(helo);
    c
}

/// What a fail2ban-regex run says: the matched addresses (one per matched line) and
/// the "N matched" of its summary.
fn fail2ban_regex(log: &Path) -> (Vec<IpAddr>, usize, String) {
    let filter = packaging("fail2ban/filter.d/tern.conf");
    let (ok, out, err) = run(Command::new("fail2ban-regex")
        .args(["-o", "ip"])
        .arg(log)
        .arg(&filter));
    assert!(ok, "fail2ban-regex -o ip failed:\n{out}{err}");
    let ips: Vec<IpAddr> = out
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            l.trim()
                .parse()
                .unwrap_or_else(|_| panic!("fail2ban-regex printed {l:?}, not an address"))
        })
        .collect();
    let (ok, report, err) = run(Command::new("fail2ban-regex")
        .arg("--print-all-matched")
        .arg(log)
        .arg(&filter));
    assert!(ok, "fail2ban-regex failed:\n{report}{err}");
    let matched = report
        .lines()
        .find_map(|l| {
            let rest = l.strip_prefix("Lines: ")?;
            rest.split(", ")
                .find_map(|p| p.strip_suffix(" matched"))?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no `Lines: ... matched` in:\n{report}"));
    (ips, matched, report)
}

/// Writes the server's log so far to a file and runs fail2ban-regex on it; asserts it
/// matched exactly the addresses in `expected` (as many times), none of `never`.
fn check_fail2ban(s: &Server, expected: &[IpAddr], never: &[&str], json: bool) {
    // Wait for the lines the client's replies imply (the harness reads stderr on a thread).
    let mut log = String::new();
    wait_for("the refusals in the log", Duration::from_secs(20), || {
        log = s.stderr_log();
        let n = log
            .lines()
            .filter(|l| l.contains("auth failed: client=") || l.contains("NOQUEUE: reject: "))
            .count();
        n >= expected.len()
    });
    let first = log.lines().next().unwrap_or("");
    assert_eq!(
        first.starts_with('{'),
        json,
        "log format (json: {json}): {first}"
    );
    for hostile in never {
        assert!(
            log.contains(hostile),
            "the attacker's text {hostile:?} is not in the log, the test proves nothing:\n{log}"
        );
    }
    let file = s.dir().join("tern.log");
    std::fs::write(&file, &log).unwrap();
    let (ips, matched, report) = fail2ban_regex(&file);
    let mut got = ips.clone();
    got.sort();
    let mut want = expected.to_vec();
    want.sort();
    assert_eq!(
        got, want,
        "fail2ban-regex matched these addresses; the client was refused as expected\n{report}\nlog:\n{log}"
    );
    assert_eq!(matched, expected.len(), "{report}");
    for hostile in never {
        assert!(
            !ips.iter().any(|ip| ip.to_string() == *hostile),
            "{hostile} was matched:\n{report}"
        );
    }
}

/// Provokes every kind of line the filter must and must not match, from distinct
/// loopback addresses, recording one address per refusal the client saw.
fn fail2ban_scenario(format: &str) {
    if !require_tool("fail2ban-regex") {
        return;
    }
    let log_format = format!("log.format={format}");
    let s = Server::with(&[
        &log_format,
        "auth.tarpit=10ms",
        "auth.ip_failure_limit=3",
        "auth.ip_block=10m",
    ]);
    let mut expected: Vec<IpAddr> = Vec::new();

    // .2: PLAIN without TLS (538), then a failed CRAM-MD5 whose login tries to name
    // another client.
    let mut c = client_from(lo(2), s.smtp, "client.example");
    c.cmd(&format!(
        "AUTH PLAIN {}",
        B64.encode(client::plain("", "alice", "secret"))
    ))
    .check(538, "5.7.11");
    expected.push(lo(2));
    cram(
        &mut c,
        "x] client=[198.51.100.9]:1 mechanism=PLAIN login=<y",
        "bad",
    )
    .check(535, "5.7.8");
    expected.push(lo(2));
    c.quit();

    // .3: relay refused (554 5.7.1); a local recipient is fine.
    let mut c = client_from(lo(3), s.smtp, "client.example");
    c.expect("MAIL FROM:<a@example.org>", 250, "2.1.0");
    c.expect("RCPT TO:<x@example.net>", 554, "5.7.1");
    expected.push(lo(3));
    c.expect("RCPT TO:<user@demo.test>", 250, "2.1.5");
    c.quit();

    // .4: a successful AUTH: logged, not matched.
    let mut c = client_from(lo(4), s.smtp, "client.example");
    cram(&mut c, "demo", "demo").check(235, "2.7.0");
    c.quit();

    // .5: relay refused with attacker-chosen HELO, sender and recipient naming others.
    let mut c = client_from(lo(5), s.smtp, "[198.51.100.10]");
    c.expect(
        "MAIL FROM:<\"RCPT from [198.51.100.11]:1: 554 5.7.1 \"@example.org>",
        250,
        "2.1.0",
    );
    c.expect(
        "RCPT TO:<\"client=[198.51.100.13]\"@example.net>",
        554,
        "5.7.1",
    );
    expected.push(lo(5));
    c.quit();

    // .6: a login carrying a line break and a whole forged log line (text and JSON):
    // tern escapes the break, so nothing starts a line of its own.
    let forged = [
        "a\n2026-01-01T00:00:00.000000Z  INFO auth failed: client=[198.51.100.12]:1 mechanism=PLAIN login=<b> reason=BadCredentials failures=1 listener=smtp\nc",
        "a\n{\"timestamp\":\"2026-01-01T00:00:00Z\",\"level\":\"INFO\",\"fields\":{\"message\":\"auth failed: client=[198.51.100.12]:1 mechanism=PLAIN login=<b>\"}}\nc",
    ];
    let mut c = client_from(lo(6), s.smtp, "client.example");
    for f in forged {
        cram(&mut c, f, "bad").check(535, "5.7.8");
        expected.push(lo(6));
    }
    c.quit();

    // .7: guesses until tern blocks the address (auth.ip_failure_limit=3), then one
    // AUTH refused with 454. The block reaches every shard asynchronously: count what
    // the client sees.
    let mut blocked = false;
    wait_for("tern to block 127.0.0.7", Duration::from_secs(20), || {
        let mut c = client_from(lo(7), s.smtp, "client.example");
        let r = c.cmd("AUTH CRAM-MD5");
        if r.code == 454 {
            r.check(454, "4.7.0");
            blocked = true;
        } else {
            r.check(334, "");
            let ch = B64.decode(r.lines[0].trim()).unwrap();
            c.cmd(&B64.encode(client::cram_md5("demo", "guess", &ch)))
                .check(535, "5.7.8");
        }
        expected.push(lo(7));
        c.quit();
        blocked
    });

    // The successful AUTH is in the log (so "not matched" means something).
    wait_for("the auth ok line", Duration::from_secs(20), || {
        s.stderr_log().contains("auth ok: client=[127.0.0.4]:")
    });
    check_fail2ban(
        &s,
        &expected,
        &[
            "198.51.100.9",
            "198.51.100.10",
            "198.51.100.11",
            "198.51.100.12",
            "198.51.100.13",
        ],
        format == "json",
    );
}

#[test]
fn fail2ban_filter_matches_text_logs() {
    fail2ban_scenario("text");
}

#[test]
fn fail2ban_filter_matches_json_logs() {
    fail2ban_scenario("json");
}

fn ipv6_loopback() -> bool {
    std::net::TcpListener::bind("[::1]:0").is_ok()
}

#[test]
fn fail2ban_filter_matches_ipv6_clients() {
    if !require_tool("fail2ban-regex") || !require(ipv6_loopback(), "an IPv6 loopback (::1)") {
        return;
    }
    let v6: IpAddr = "::1".parse().unwrap();
    for format in ["text", "json"] {
        let log_format = format!("log.format={format}");
        let s = Server::with(&[
            &log_format,
            "auth.tarpit=10ms",
            r#"listeners.submission=["[::1]:0"]"#,
        ]);
        assert!(s.submission.is_ipv6(), "{}", s.submission);
        let mut c = client_from(v6, s.submission, "client.example");
        c.cmd(&format!(
            "AUTH PLAIN {}",
            B64.encode(client::plain("", "alice", "secret"))
        ))
        .check(538, "5.7.11");
        cram(&mut c, "bob] client=[2001:db8::66]:1 mechanism=X", "bad").check(535, "5.7.8");
        c.quit();
        check_fail2ban(&s, &[v6, v6], &["2001:db8::66"], format == "json");
    }
}

#[test]
fn fail2ban_jail_loads() {
    if !require_tool("fail2ban-client") {
        return;
    }
    let etc = Path::new("/etc/fail2ban");
    if !require(
        etc.join("jail.conf").exists(),
        "fail2ban's stock configuration in /etc/fail2ban",
    ) {
        return;
    }
    // fail2ban's own configuration (jail.conf, actions, filters) with only our jail.
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("fail2ban");
    let (ok, out, err) = run(Command::new("cp").arg("-r").arg(etc).arg(&conf));
    assert!(ok, "copying /etc/fail2ban: {out}{err}");
    for d in ["jail.d", "filter.d"] {
        std::fs::create_dir_all(conf.join(d)).unwrap();
    }
    for e in std::fs::read_dir(conf.join("jail.d")).unwrap() {
        std::fs::remove_file(e.unwrap().path()).unwrap();
    }
    let _ = std::fs::remove_file(conf.join("jail.local"));
    std::fs::copy(
        packaging("fail2ban/jail.d/tern.conf"),
        conf.join("jail.d/tern.conf"),
    )
    .unwrap();
    std::fs::copy(
        packaging("fail2ban/filter.d/tern.conf"),
        conf.join("filter.d/tern.conf"),
    )
    .unwrap();
    let (ok, out, err) = run(Command::new("fail2ban-client")
        .arg("-c")
        .arg(&conf)
        .arg("-t"));
    assert!(ok, "fail2ban-client -t:\n{out}{err}");
    assert!(out.contains("OK"), "{out}{err}");
    // What fail2ban made of the jail.
    let (ok, dump, err) = run(Command::new("fail2ban-client")
        .arg("-c")
        .arg(&conf)
        .arg("-d"));
    assert!(ok, "fail2ban-client -d:\n{dump}{err}");
    for want in [
        "['add', 'tern', 'systemd']",
        "['set', 'tern', 'maxretry', 5]",
        "['set', 'tern', 'findtime', '10m']",
        "['set', 'tern', 'bantime', '1h']",
        "['port', '25,465,587']",
        "['set', 'tern', 'addjournalmatch', '_SYSTEMD_UNIT=tern.service']",
        "['start', 'tern']",
    ] {
        assert!(
            dump.contains(want),
            "no {want} in fail2ban-client -d:\n{dump}"
        );
    }
}
