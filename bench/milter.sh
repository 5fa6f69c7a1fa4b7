#!/usr/bin/env bash
# bench/milter.sh — what a milter costs tern: the same relay load with no filter, with a
# no-op milter that negotiates every stage, and with one that negotiates only
# end-of-message (`tern-loadgen milter-noop`), side by side in one run.
#
#   bench/milter.sh [--duration S] [--rate R] [--no-build] [--smoke] [--report FILE]
#
# Each mode: a fresh tern (release build, `tern demo`, `[[milter.filters]]` on the no-op
# filter) relaying to the tern-loadgen sink over 587 with AUTH CRAM-MD5, 2 KiB messages,
# 100 per connection, pipelined, 64 connections: closed loop (msgs/s, acceptance p50/p99,
# tern's CPU per message until the sink has every message, and the filter's CPU per
# message), then open loop at $RATE msgs/s (default 500: acceptance p99 at equal load).
# tern keeps one filter connection per SMTP session (Postfix's model), so with 100
# messages per connection the connect + negotiation is spread over 100 messages.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DURATION=10
WARMUP=1
RATE=500
BUILD=1
SMOKE=0
REPORT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --duration) DURATION=$2; shift ;;
        --rate) RATE=$2; shift ;;
        --no-build) BUILD=0 ;;
        --smoke) SMOKE=1 ;;
        --report) REPORT=$2; shift ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done

BENCH_NAME=tern-milter-bench
LOG_TAG=milter-bench
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

MILTER_PID=""
milter_start() {   # milter_start STAGES: sets MILTER_PORT
    "$LG" milter-noop --listen 127.0.0.1:0 --stages "$1" >"$WORK/milter-$1.out" 2>"$WORK/milter-$1.err" &
    MILTER_PID=$!
    PIDS+=("$MILTER_PID")
    local l; l=$(wait_for "$WORK/milter-$1.err" '^listening: ')
    MILTER_PORT=${l##*:}
}
milter_stop() { kill -TERM "$MILTER_PID" 2>/dev/null || true; wait "$MILTER_PID" 2>/dev/null || true; forget_pid "$MILTER_PID"; MILTER_PID=""; }
pid_cpu() {   # seconds of CPU of PID so far
    local t; read -r -a t <<<"$(ticks "$1")"
    awk "BEGIN{printf \"%.3f\", (${t[0]} + ${t[1]}) / $CLK_TCK}"
}

EXTRA=()
[ $SMOKE = 1 ] && EXTRA=(-n 20 --cores 1)
RELAY=(relay --mech CRAM-MD5 --size 2048 --msgs-per-conn 100 --pipeline --to 'user{n}@example.net')
closed() {   # closed NAME
    local name=$1 out=$RES/$1.json c0 c1 m0=0 m1=0 n before
    c0=$(server_cpu); [ -n "$MILTER_PID" ] && m0=$(pid_cpu "$MILTER_PID")
    before=$(sink_total); before=${before:-0}
    "$LG" "${RELAY[@]}" -c 64 "${EXTRA[@]}" -t "$TARGET" --warmup "$WARMUP" -d "$DURATION" --json -q \
        >"$out" 2>"$WORK/$name.err" || { log "$name: loadgen failed"; cat "$WORK/$name.err" >&2; }
    n=$(jq -r '(.ok // 0) + (.warmup_ok // 0)' "$out" 2>/dev/null || echo 0)
    sink_drain $((before + n))
    c1=$(server_cpu); [ -n "$MILTER_PID" ] && m1=$(pid_cpu "$MILTER_PID")
    echo "$c0 $c1 $n $m0 $m1" >"$RES/$name.cpu"
    log "$name: $(jq -r '"\(.throughput|floor) msgs/s, p99 \(.latency_ms.accept.p99) ms, failed \(.failed)"' "$out")"
}
open_run() {   # open_run NAME
    "$LG" "${RELAY[@]}" -c 64 --rate "$RATE" "${EXTRA[@]}" -t "$TARGET" --warmup "$WARMUP" -d "$DURATION" --json -q \
        >"$RES/$1.json" 2>"$WORK/$1.err" || { log "$1: loadgen failed"; cat "$WORK/$1.err" >&2; }
    log "$1: $(jq -r '"\(.throughput|floor) msgs/s, p99 \(.latency_ms.accept.p99) ms, failed \(.failed)"' "$RES/$1.json")"
}

for mode in none all eom; do
    sink_start "$mode"
    if [ "$mode" = none ]; then
        tern_start none "$SINK_PORT"
    else
        milter_start "$mode"
        tern_start "$mode" "$SINK_PORT" --set "milter.filters=[{name=\"noop\",socket=\"inet:127.0.0.1:$MILTER_PORT\"}]"
    fi
    closed "$mode-closed"
    open_run "$mode-open"
    tern_stop
    [ -n "$MILTER_PID" ] && milter_stop
    sink_stop
done

{
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), kernel $(uname -r)"
    echo "tern: $(cd "$ROOT" && git describe --always --dirty 2>/dev/null || echo "?")"
    echo "runs: warm-up ${WARMUP} s + ${DURATION} s each; 2 KiB, 64 connections, AUTH CRAM-MD5, pipelined, 100 msgs/connection"
} >"$RES/meta.txt"
RATE=$RATE python3 - "$RES" >"$RES/report.md" <<'PYEOF'
import json, os, sys
res = sys.argv[1]
def load(n):
    try:
        return json.load(open(os.path.join(res, n + ".json")))
    except Exception:
        return None
def cpu(n):
    try:
        c0, c1, k, m0, m1 = open(os.path.join(res, n + ".cpu")).read().split()
        k = int(k)
        return ((float(c1) - float(c0)) / k * 1e6, (float(m1) - float(m0)) / k * 1e6) if k else (None, None)
    except Exception:
        return (None, None)
def p(n, pct):
    try:
        return load(n)["latency_ms"]["accept"][pct]
    except Exception:
        return None
def f(v, nd=0):
    return "n/a" if v is None else f"{v:,.{nd}f}"
print(open(os.path.join(res, "meta.txt")).read())
label = {"none": "no filter", "all": "no-op milter, every stage", "eom": "no-op milter, end-of-message only"}
base = cpu("none-closed")[0]
print(f"| filter | msgs/s | accept p50 ms | accept p99 ms | tern CPU µs/msg | tern's added CPU µs/msg | filter CPU µs/msg | @{os.environ['RATE']}/s accept p99 ms |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for m in ["none", "all", "eom"]:
    r = load(f"{m}-closed")
    t, fc = cpu(f"{m}-closed")
    added = None if (t is None or base is None or m == "none") else t - base
    print(f"| {label[m]} | {f(r and r.get('throughput'))} | {f(p(m+'-closed','p50'),2)} | {f(p(m+'-closed','p99'),2)} | {f(t)} | {f(added)} | {f(fc) if m != 'none' else ''} | {f(p(m+'-open','p99'),2)} |")
PYEOF
cat "$RES/report.md"
[ -n "$REPORT" ] && cp "$RES/report.md" "$REPORT"
log "results in $RES"
