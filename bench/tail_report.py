#!/usr/bin/env python3
"""bench/tail_report.py RESULTS_DIR: the report of bench/tail.sh (markdown on stdout).

Reads, per run NAME: NAME.json (loadgen), NAME.probe.json (fsync probe), NAME.cpu,
NAME.metrics0 / NAME.metrics1 (tern's /metrics after the warm-up and at the end; their
difference is the measured window). Percentiles of tern's histograms are interpolated
linearly inside a bucket, so they are as coarse as the buckets (PHASE_BUCKETS in
queue/src/commit.rs)."""
import json, os, re, sys

res = sys.argv[1]
PHASES = ["queued", "to_syncer", "disk", "in_order", "from_syncer", "resume", "total"]
LINE = re.compile(r'^(\w+)\{([^}]*)\} (\S+)$')


def parse(path):
    out = {}
    try:
        for line in open(path):
            m = LINE.match(line.strip())
            if not m:
                continue
            labels = dict(kv.split("=", 1) for kv in m.group(2).split(","))
            labels = {k: v.strip('"') for k, v in labels.items()}
            if labels.get("shard") != "total":
                continue
            key = (m.group(1),) + tuple(sorted((k, v) for k, v in labels.items() if k != "shard"))
            out[key] = float(m.group(3))
    except OSError:
        pass
    return out


def diff(a, b):
    return {k: v - a.get(k, 0.0) for k, v in b.items()}


def buckets(m, name, **sel):
    """[(upper bound, cumulative count)] of histogram `name` with labels `sel`."""
    rows = []
    for k, v in m.items():
        if k[0] != name + "_bucket":
            continue
        d = dict(k[1:])
        if any(d.get(x) != y for x, y in sel.items()):
            continue
        le = d["le"]
        rows.append((float("inf") if le == "+Inf" else float(le), v))
    rows.sort()
    return rows


def quantile(rows, q):
    if not rows or rows[-1][1] <= 0:
        return None
    total = rows[-1][1]
    target = q * total
    lo, prev = 0.0, 0.0
    for ub, cum in rows:
        if cum >= target:
            if ub == float("inf"):
                return lo
            inb = cum - prev
            frac = (target - prev) / inb if inb else 1.0
            return lo + (ub - lo) * frac
        lo, prev = ub, cum
    return lo


def load(p):
    try:
        return json.load(open(os.path.join(res, p)))
    except Exception:
        return None


def f(v, nd=2):
    return "n/a" if v is None else f"{v:,.{nd}f}"


names = sorted({n[:-5] for n in os.listdir(res) if n.endswith(".json") and not n.endswith(".probe.json") and not n.startswith("sink-")},
               key=lambda n: (int(re.search(r"rate(\d+)", n).group(1)), n))
print(open(os.path.join(res, "meta.txt")).read().rstrip().replace("\n", "  \n"))
print()
print("| run | accepted msgs/s | accept p50 / p99 / p99.9 ms | probe fdatasync p50 / p99 / p99.9 ms | p99 ratio (goal <= 2x) | CPU µs/msg |")
print("|---|---:|---:|---:|---:|---:|")
for n in names:
    r = load(n + ".json") or {}
    pr = (load(n + ".probe.json") or {}).get("latency_ms", {}).get("fdatasync", {})
    a = r.get("latency_ms", {}).get("accept", {})
    ratio = (a.get("p99") / pr.get("p99")) if a.get("p99") and pr.get("p99") else None
    try:
        c0, c1, cnt = open(os.path.join(res, n + ".cpu")).read().split()[:3]
        cpu = (float(c1) - float(c0)) / int(cnt) * 1e6
    except Exception:
        cpu = None
    print(f"| {n} | {f(r.get('throughput'), 0)} | {f(a.get('p50'))} / {f(a.get('p99'))} / {f(a.get('p999'))} "
          f"| {f(pr.get('p50'))} / {f(pr.get('p99'))} / {f(pr.get('p999'))} | {f(ratio, 1)}x | {f(cpu, 0)} |")
print()
print("Server side, per message record, measured window (ms, p50 / p99 / p99.9, interpolated in the buckets):")
print()
print("| run | " + " | ".join(PHASES) + " | msgs/batch mean | state recs/batch mean | msgs sharing a batch with state | msgs queued behind a batch with state (state only) |")
print("|---|" + "---:|" * (len(PHASES) + 4))
for n in names:
    m = diff(parse(os.path.join(res, n + ".metrics0")), parse(os.path.join(res, n + ".metrics1")))
    cells = []
    for p in PHASES:
        rows = buckets(m, "tern_commit_wait_seconds", phase=p)
        qs = [quantile(rows, q) for q in (0.5, 0.99, 0.999)]
        cells.append(" / ".join(f(None if x is None else x * 1000, 3) for x in qs))
    def mean(kind):
        s = m.get(("tern_commit_batch_records_sum", ("kind", kind)))
        c = m.get(("tern_commit_batch_records_count", ("kind", kind)))
        return s / c if s is not None and c else None
    msgs = m.get(("tern_commit_wait_seconds_count", ("phase", "total")), 0)
    def cnt(how):
        v = m.get(("tern_commit_messages_with_state_total", ("how", how)), 0)
        return f"{int(v)} ({v / msgs * 100:.0f}%)" if msgs else "n/a"
    print(f"| {n} | " + " | ".join(cells) + f" | {f(mean('message'), 1)} | {f(mean('state'), 1)} | {cnt('shared')} | {cnt('behind')} ({cnt('behind_state_only')}) |")
print()
print("Commands:")
print()
print("```")
for n in names:
    p = os.path.join(res, n + ".cmd")
    if os.path.exists(p):
        print(open(p).read().strip())
        break
print("```")
