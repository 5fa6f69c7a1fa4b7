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

TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
TERN=$TARGET_DIR/release/tern
LG=$TARGET_DIR/release/tern-loadgen
if [ $BUILD = 1 ]; then
    (cd "$ROOT" && cargo build --release -p tern-engine --bin tern && cargo build --release -p tern-loadgen)
fi
command -v jq >/dev/null || { echo "bench/milter.sh needs jq" >&2; exit 2; }

WORK=$(mktemp -d /tmp/tern-milter-bench.XXXXXX)
RES=$WORK/results
mkdir -p "$RES"
CLK_TCK=$(getconf CLK_TCK)
PIDS=()
log() { echo "[milter-bench $(date +%H:%M:%S)] $*" >&2; }
cleanup() {
    set +e
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done
    for p in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$p" 2>/dev/null
    done
    find "$WORK" -mindepth 1 -maxdepth 1 ! -name results -exec rm -rf {} +
}
trap cleanup EXIT
trap 'exit 130' INT TERM
forget_pid() {
    local keep=() p
    for p in "${PIDS[@]}"; do [ "$p" != "$1" ] && keep+=("$p"); done
    PIDS=("${keep[@]}")
}
wait_for() {   # wait_for FILE REGEX: until a line of FILE matches; prints it
    local i
    for i in $(seq 200); do
        if grep -Eq "$2" "$1" 2>/dev/null; then grep -E "$2" "$1" | head -1; return 0; fi
        sleep 0.1
    done
    echo "timed out waiting for /$2/ in $1" >&2; cat "$1" >&2 || true; return 1
}
ticks() {   # ticks PID: utime stime cutime cstime
    local s
    s=$(cat "/proc/$1/stat" 2>/dev/null) || { echo "0 0 0 0"; return; }
    s=${s##*) }
    # shellcheck disable=SC2086
    set -- $s
    echo "${12} ${13} ${14} ${15}"
}
SERVER_KIND=tern
ODKIM_PID=""
server_cpu() {   # seconds of CPU used so far by the server under test
    local t total pid
    read -r -a t <<<"$(ticks "$SERVER_PID")"
    if [ "$SERVER_KIND" = tern ]; then
        total=$(( t[0] + t[1] ))
    else
        # Postfix: the master with its reaped children, every live child, and OpenDKIM.
        total=$(( t[0] + t[1] + t[2] + t[3] ))
        for pid in $(ps -o pid= --ppid "$SERVER_PID") $ODKIM_PID; do
            read -r -a t <<<"$(ticks "$pid")"
            total=$(( total + t[0] + t[1] ))
        done
    fi
    awk "BEGIN{printf \"%.3f\", $total / $CLK_TCK}"
}

SINK_PID=""; SINK_PORT=""
sink_start() {
    "$LG" sink --listen 127.0.0.1:0 --json >"$RES/sink-$1.json" 2>"$WORK/sink-$1.err" &
    SINK_PID=$!; SINK_NAME=$1
    PIDS+=("$SINK_PID")
    local l; l=$(wait_for "$WORK/sink-$1.err" '^listening: ')
    SINK_PORT=${l##*:}
}
sink_total() {
    local l; l=$(grep -E 'total [0-9]+' "$WORK/sink-$SINK_NAME.err" 2>/dev/null | tail -1)
    echo "${l##*total }" | tr -dc 0-9
}
sink_drain() {
    local i n
    for i in $(seq 600); do
        n=$(sink_total); n=${n:-0}
        [ "$n" -ge "$1" ] && return 0
        sleep 0.1
    done
    log "sink: only ${n:-0} of $1 messages arrived within 60 s"
}
sink_stop() { kill -TERM "$SINK_PID" 2>/dev/null || true; wait "$SINK_PID" 2>/dev/null || true; forget_pid "$SINK_PID"; }

tern_start() {   # tern_start MODE [MILTER_PORT]
    local extra=()
    [ -n "${2:-}" ] && extra=(--set "milter.filters=[{name=\"noop\",socket=\"inet:127.0.0.1:$2\"}]")
    mkdir -p "$WORK/tern"
    "$TERN" demo --dir "$WORK/tern" \
        --set "spool.dir=\"$WORK/spool-$1\"" \
        --set 'listeners.smtp=["127.0.0.1:0"]' \
        --set 'listeners.submission=["127.0.0.1:0"]' \
        --set 'listeners.smtps=["127.0.0.1:0"]' \
        --set "queue.routes={\"*\"=\"smtp:[127.0.0.1]:$SINK_PORT\"}" \
        --set 'queue.starttls="never"' \
        "${extra[@]}" \
        >"$WORK/tern-$1.log" 2>&1 &
    SERVER_PID=$!
    PIDS+=("$SERVER_PID")
    wait_for "$WORK/tern-$1.log" '^ready: ' >/dev/null
    local l; l=$(wait_for "$WORK/tern-$1.log" '^listening: submission ')
    TARGET=${l##* }
    log "tern ($1) pid $SERVER_PID on $TARGET"
}
tern_stop() { kill -TERM "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; forget_pid "$SERVER_PID"; }
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
    if [ "$mode" = none ]; then tern_start none; else milter_start "$mode"; tern_start "$mode" "$MILTER_PORT"; fi
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
