#!/usr/bin/env bash
# bench/milter.sh — what a milter costs tern, against the floor and against Postfix: the
# same relay load with no filter, a no-op milter that negotiates every stage, one that
# negotiates only end-of-message (`tern-loadgen milter-noop`), and rspamd (its proxy
# worker in milter mode, scanning itself, as e2e 25 runs it); then Postfix with the same
# filters (`smtpd_milters`) as the anchor; all in one run.
#
#   bench/milter.sh [--duration S] [--rate R] [--no-build] [--no-postfix] [--no-rspamd]
#                   [--smoke] [--report FILE]
#
# Each tern mode: a fresh tern (release build, `tern demo`, `[[milter.filters]]` on the
# filter) relaying to the tern-loadgen sink over 587 with AUTH CRAM-MD5, 2 KiB messages,
# 100 per connection, pipelined, 64 connections: closed loop (msgs/s, acceptance p50/p99,
# server CPU per message until the sink has every message, the filter's CPU per message),
# then open loop at $RATE msgs/s (default 500: acceptance p99 at equal load). Postfix
# (root; Debian's package, bench/postfix/, /etc/postfix restored at exit): the same
# closed loop; its CPU is its processes' (master, smtpd, cleanup, qmgr, smtp...), the
# filter's is counted apart, as for tern.
#
# The floor: `tern-loadgen milter-pingpong` (glommio requester, 64 sockets, 2 executors,
# write a packet / read the 5-byte answer, nothing else) against the same no-op filter,
# over TCP loopback (the socket the runs use) and a unix socket: CPU per round trip. The
# no-op filter counts the answers it sent, so round trips per message are measured, not
# assumed; floor per message = round trips per message x CPU per round trip.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DURATION=10
WARMUP=1
RATE=500
BUILD=1
SMOKE=0
REPORT=""
WITH_POSTFIX=1
WITH_RSPAMD=1
while [ $# -gt 0 ]; do
    case "$1" in
        --duration) DURATION=$2; shift ;;
        --rate) RATE=$2; shift ;;
        --no-build) BUILD=0 ;;
        --smoke) SMOKE=1 ;;
        --no-postfix) WITH_POSTFIX=0 ;;
        --no-rspamd) WITH_RSPAMD=0 ;;
        --report) REPORT=$2; shift ;;
        -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done

BENCH_NAME=tern-milter-bench
LOG_TAG=milter-bench
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

MILTER_PID=""; MILTER_NAME=""; FILTER_PIDS=""
milter_start() {   # milter_start STAGES [NAME]: sets MILTER_PORT
    MILTER_NAME=${2:-$1}
    "$LG" milter-noop --listen 127.0.0.1:0 --stages "$1" >"$WORK/milter-$MILTER_NAME.out" 2>"$WORK/milter-$MILTER_NAME.err" &
    MILTER_PID=$!
    FILTER_PIDS=$MILTER_PID
    PIDS+=("$MILTER_PID")
    local l; l=$(wait_for "$WORK/milter-$MILTER_NAME.err" '^listening: ')
    MILTER_PORT=${l##*:}
}
# milter_stop: the no-op filter's summary ("connections C messages M replies R") is kept
# as $RES/NAME.milter (round trips per message).
milter_stop() {
    kill -TERM "$MILTER_PID" 2>/dev/null || true; wait "$MILTER_PID" 2>/dev/null || true
    forget_pid "$MILTER_PID"
    cp "$WORK/milter-$MILTER_NAME.out" "$RES/$MILTER_NAME.milter" 2>/dev/null || true
    MILTER_PID=""; FILTER_PIDS=""
}
RSPAMD_PID=""; RSPAMD_PORT=""
rspamd_start() {   # rspamd in milter mode (its proxy worker, self_scan), as e2e 25 runs it
    local conf=$WORK/rspamd local
    local=$conf/local.d
    mkdir -p "$local" "$conf/db" "$conf/run" "$conf/log"
    RSPAMD_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    local normal controller
    normal=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    controller=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    printf 'bind_socket = "127.0.0.1:%s";\nmilter = yes;\ntimeout = 120s;\nupstream "local" {\n  default = yes;\n  self_scan = yes;\n}\n' "$RSPAMD_PORT" >"$local/worker-proxy.inc"
    printf 'bind_socket = "127.0.0.1:%s";\n' "$normal" >"$local/worker-normal.inc"
    printf 'bind_socket = "127.0.0.1:%s";\n' "$controller" >"$local/worker-controller.inc"
    printf 'use = ["x-spamd-result"];\nskip_local = false;\nskip_authenticated = false;\n' >"$local/milter_headers.conf"
    # Every message is accepted (the benchmark measures scanning, not refusals).
    printf 'reject = 1000;\nadd_header = 999;\nrewrite_subject = 998;\ngreylist = 997;\n' >"$local/actions.conf"
    printf 'type = "console";\nlevel = "error";\n' >"$local/logging.inc"
    setsid rspamd -f -i -c /etc/rspamd/rspamd.conf --var "LOCAL_CONFDIR=$conf" \
        --var "DBDIR=$conf/db" --var "RUNDIR=$conf/run" --var "LOGDIR=$conf/log" \
        >"$WORK/rspamd.log" 2>&1 &
    RSPAMD_PID=$!
    PIDS+=("$RSPAMD_PID")
    local i
    for i in $(seq 1800); do
        (exec 3<>"/dev/tcp/127.0.0.1/$RSPAMD_PORT") 2>/dev/null && break
        kill -0 "$RSPAMD_PID" 2>/dev/null || { log "rspamd exited"; cat "$WORK/rspamd.log" >&2; return 1; }
        sleep 0.1
    done
    log "rspamd pid $RSPAMD_PID, milter on 127.0.0.1:$RSPAMD_PORT"
}
rspamd_pids() { echo "$RSPAMD_PID $(pgrep -s "$RSPAMD_PID" 2>/dev/null | tr '\n' ' ')"; }
rspamd_stop() {
    [ -n "$RSPAMD_PID" ] || return 0
    kill -TERM -- "-$RSPAMD_PID" 2>/dev/null || true
    wait "$RSPAMD_PID" 2>/dev/null || true
    forget_pid "$RSPAMD_PID"
    RSPAMD_PID=""
}
pid_cpu() {   # seconds of CPU of the PIDs so far (live processes)
    local total=0 t p
    for p in "$@"; do
        read -r -a t <<<"$(ticks "$p")"
        total=$(( total + ${t[0]:-0} + ${t[1]:-0} ))
    done
    awk "BEGIN{printf \"%.3f\", $total / $CLK_TCK}"
}
filter_cpu() {   # the current filter's CPU (the no-op, or every rspamd process)
    if [ -n "$FILTER_PIDS" ]; then
        # shellcheck disable=SC2086
        pid_cpu $FILTER_PIDS
    else
        echo 0
    fi
}

EXTRA=()
[ $SMOKE = 1 ] && EXTRA=(-n 20 --cores 1)
RELAY=(relay --mech CRAM-MD5 --size 2048 --msgs-per-conn 100 --pipeline --to 'user{n}@example.net')
closed() {   # closed NAME
    local name=$1 out=$RES/$1.json c0 c1 m0 m1 n before
    c0=$(server_cpu); m0=$(filter_cpu)
    before=$(sink_total); before=${before:-0}
    "$LG" "${RELAY[@]}" -c 64 "${EXTRA[@]}" -t "$TARGET" --warmup "$WARMUP" -d "$DURATION" --json -q \
        >"$out" 2>"$WORK/$name.err" || { log "$name: loadgen failed"; cat "$WORK/$name.err" >&2; }
    n=$(jq -r '(.ok // 0) + (.warmup_ok // 0)' "$out" 2>/dev/null || echo 0)
    sink_drain $((before + n))
    c1=$(server_cpu); m1=$(filter_cpu)
    echo "$c0 $c1 $n $m0 $m1" >"$RES/$name.cpu"
    log "$name: $(jq -r '"\(.throughput|floor) msgs/s, p99 \(.latency_ms.accept.p99) ms, failed \(.failed)"' "$out")"
}
open_run() {   # open_run NAME
    "$LG" "${RELAY[@]}" -c 64 --rate "$RATE" "${EXTRA[@]}" -t "$TARGET" --warmup "$WARMUP" -d "$DURATION" --json -q \
        >"$RES/$1.json" 2>"$WORK/$1.err" || { log "$1: loadgen failed"; cat "$WORK/$1.err" >&2; }
    log "$1: $(jq -r '"\(.throughput|floor) msgs/s, p99 \(.latency_ms.accept.p99) ms, failed \(.failed)"' "$RES/$1.json")"
}

# The floor first (nothing else running).
milter_start all floor-tcp
"$LG" milter-pingpong --target "inet:127.0.0.1:$MILTER_PORT" --connections 64 --cores 2 \
    --warmup "$WARMUP" --duration "$DURATION" --json >"$RES/floor-tcp.json"
milter_stop
log "floor, TCP loopback: $(jq -r '.cpu_us_per_round_trip' "$RES/floor-tcp.json") µs CPU per round trip"
"$LG" milter-noop --unix "$WORK/noop.sock" --stages all >"$WORK/milter-floor-unix.out" 2>"$WORK/milter-floor-unix.err" &
MILTER_PID=$!; MILTER_NAME=floor-unix; PIDS+=("$MILTER_PID")
wait_for "$WORK/milter-floor-unix.err" '^listening: ' >/dev/null
"$LG" milter-pingpong --target "unix:$WORK/noop.sock" --connections 64 --cores 2 \
    --warmup "$WARMUP" --duration "$DURATION" --json >"$RES/floor-unix.json"
milter_stop
log "floor, unix socket: $(jq -r '.cpu_us_per_round_trip' "$RES/floor-unix.json") µs CPU per round trip"

MODES="none all eom"
if [ $WITH_RSPAMD = 1 ]; then
    if command -v rspamd >/dev/null; then
        rspamd_start && MODES="$MODES rspamd"
    else
        log "rspamd not installed: no rspamd row"
    fi
fi
filter_for() {   # filter_for MODE: starts the mode's filter; sets SOCK (none: empty)
    SOCK=""
    case $1 in
        all|eom) milter_start "$1" "$2"; SOCK=inet:127.0.0.1:$MILTER_PORT ;;
        rspamd) FILTER_PIDS=$(rspamd_pids); SOCK=inet:127.0.0.1:$RSPAMD_PORT ;;
    esac
}
filter_done() {
    case $1 in
        all|eom) milter_stop ;;
        rspamd) FILTER_PIDS="" ;;
    esac
}
for mode in $MODES; do
    sink_start "$mode"
    filter_for "$mode" "$mode"
    if [ -z "$SOCK" ]; then
        tern_start "$mode" "$SINK_PORT"
    else
        tern_start "$mode" "$SINK_PORT" --set "milter.filters=[{name=\"f\",socket=\"$SOCK\",timeouts=\"R:60s;E:60s\"}]"
    fi
    closed "$mode-closed"
    open_run "$mode-open"
    tern_stop
    filter_done "$mode"
    sink_stop
done

if [ $WITH_POSTFIX = 1 ]; then
    if [ "$(id -u)" != 0 ]; then
        log "not root: no Postfix anchor (--no-postfix to silence)"
    else
        postfix_install
        for mode in $MODES; do
            sink_start "pf-$mode"
            filter_for "$mode" "pf-$mode"
            PF_EXTRA_MAIN_CF=""
            if [ -n "$SOCK" ]; then
                PF_EXTRA_MAIN_CF="# bench/milter.sh: the filter under test.
smtpd_milters = $SOCK
milter_default_action = tempfail
milter_protocol = 6
milter_command_timeout = 60s
milter_content_timeout = 60s"
            fi
            # Postfix's CPU is its own processes'; the filter is counted apart.
            EXTRA_CPU_PIDS=""
            postfix_start "pf-$mode" "$SINK_PORT"
            closed "pf-$mode-closed"
            postfix_stop
            filter_done "$mode"
            sink_stop
        done
    fi
fi
rspamd_stop

{
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), kernel $(uname -r)"
    echo "tern: $(cd "$ROOT" && git describe --always --dirty 2>/dev/null || echo "?")"
    echo "runs: warm-up ${WARMUP} s + ${DURATION} s each; 2 KiB, 64 connections, AUTH CRAM-MD5, pipelined, 100 msgs/connection"
    command -v rspamd >/dev/null && echo "rspamd: $(rspamd --version 2>/dev/null | head -1)"
    command -v postfix >/dev/null && echo "postfix: $(postconf -d mail_version 2>/dev/null)"
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
def rts(name):
    # "connections C messages M replies R" from the no-op filter: round trips per message.
    try:
        w = open(os.path.join(res, name + ".milter")).read().split()
        return int(w[5]) / int(w[3])
    except Exception:
        return None
def p(n, pct):
    try:
        return load(n)["latency_ms"]["accept"][pct]
    except Exception:
        return None
def f(v, nd=0):
    return "n/a" if v is None else f"{v:,.{nd}f}"
print(open(os.path.join(res, "meta.txt")).read())
ft, fu = load("floor-tcp"), load("floor-unix")
rt_tcp = ft and ft["cpu_us_per_round_trip"]
rt_unix = fu and fu["cpu_us_per_round_trip"]
print(f"Floor (tern-loadgen milter-pingpong, 64 sockets, 2 glommio executors): TCP loopback {f(rt_tcp, 2)} µs CPU per round trip ({f(ft and ft['round_trips_per_s'])}/s); unix socket {f(rt_unix, 2)} µs ({f(fu and fu['round_trips_per_s'])}/s).")
print()
label = {"none": "no filter", "all": "no-op milter, every stage", "eom": "no-op milter, end-of-message only", "rspamd": "rspamd (proxy worker, milter mode)"}
print(f"| server | filter | msgs/s | accept p50 ms | accept p99 ms | server CPU µs/msg | added CPU µs/msg | filter CPU µs/msg | round trips/msg | floor µs/msg | added / floor | @{os.environ['RATE']}/s accept p99 ms |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for server, prefix in [("tern", ""), ("Postfix", "pf-")]:
    base = cpu(f"{prefix}none-closed")[0]
    for m in ["none", "all", "eom", "rspamd"]:
        r = load(f"{prefix}{m}-closed")
        if r is None:
            continue
        t, fc = cpu(f"{prefix}{m}-closed")
        added = None if (t is None or base is None or m == "none") else t - base
        n = rts(prefix + m) if m in ("all", "eom") else None
        floor = n * rt_tcp if (n is not None and rt_tcp) else None
        ratio = f"{added / floor:.2f}x" if (added is not None and floor) else ""
        op = f(p(m + '-open', 'p99'), 2) if server == "tern" else ""
        print(f"| {server} | {label[m]} | {f(r.get('throughput'))} | {f(p(prefix+m+'-closed','p50'),2)} | {f(p(prefix+m+'-closed','p99'),2)} | {f(t)} | {f(added) if m != 'none' else ''} | {f(fc) if m != 'none' else ''} | {f(n, 2) if n else ''} | {f(floor) if floor else ''} | {ratio} | {op} |")
PYEOF
cat "$RES/report.md"
[ -n "$REPORT" ] && cp "$RES/report.md" "$REPORT"
log "results in $RES"
