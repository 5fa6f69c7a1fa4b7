#!/usr/bin/env bash
# Cost of the PROXY protocol: tern's CPU per CRAM-MD5 handshake direct, with a PROXY v2
# header sent by the generator itself (tern-loadgen --proxy-v2: tern's parse cost alone)
# and through a real HAProxy (send-proxy-v2), plus HAProxy's own CPU per connection in
# that run. ROUNDS rounds (default 3), each running the three cases back to back; CPU
# from /proc/PID/stat (utime+stime) before/after each run, divided by the handshakes
# (warm-up included). Release builds: cargo build --release -p tern-engine -p tern-loadgen.
#
#   bench/proxy.sh [ROUNDS] [DURATION_S]      (prints one line per run and a summary)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TERN=${TERN:-$ROOT/target/release/tern}
LG=${LG:-$ROOT/target/release/tern-loadgen}
ROUNDS=${1:-3}
DUR=${2:-10}
CONC=${CONC:-32}
WORK=$(mktemp -d /tmp/tern-proxy-bench.XXXXXX)
CLK_TCK=$(getconf CLK_TCK)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
command -v haproxy >/dev/null || { echo "haproxy not installed" >&2; exit 2; }

ticks() { awk '{ s = $0; sub(/.*\) /, "", s); split(s, f, " "); print f[12] + f[13] }' "/proc/$1/stat"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

TERN_PID=""; SUB=""
tern_start() {   # tern_start PROXY_FROM_JSON
    rm -rf "$WORK/spool"; mkdir -p "$WORK/demo"
    "$TERN" demo --dir "$WORK/demo" --set "spool.dir=\"$WORK/spool\"" \
        --set 'listeners.smtp=["127.0.0.1:0"]' --set 'listeners.submission=["127.0.0.1:0"]' \
        --set 'listeners.smtps=["127.0.0.1:0"]' --set "listeners.proxy_from=$1" \
        >"$WORK/tern.log" 2>&1 &
    TERN_PID=$!; PIDS+=("$TERN_PID")
    for _ in $(seq 600); do grep -q '^ready: ' "$WORK/tern.log" && break; sleep 0.1; done
    SUB=$(awk '/^listening: submission /{print $3; exit}' "$WORK/tern.log")
}
tern_stop() { kill -TERM "$TERN_PID"; wait "$TERN_PID" 2>/dev/null || true; }

HAP_PID=""; HAP_PORT=""
hap_start() {    # in front of $SUB, send-proxy-v2
    HAP_PORT=$(free_port)
    cat >"$WORK/haproxy.cfg" <<CFG
global
    maxconn 4000
defaults
    mode tcp
    timeout connect 2s
    timeout client 30s
    timeout server 30s
frontend fe
    bind 127.0.0.1:$HAP_PORT
    default_backend be
backend be
    server t $SUB send-proxy-v2
CFG
    haproxy -db -f "$WORK/haproxy.cfg" >/dev/null 2>&1 &
    HAP_PID=$!; PIDS+=("$HAP_PID")
    for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$HAP_PORT) 2>/dev/null && break; sleep 0.1; done
}
hap_stop() { kill "$HAP_PID"; wait "$HAP_PID" 2>/dev/null || true; }

# run CASE TARGET [loadgen args]: prints "CASE tern_us_per_hs haproxy_us_per_conn hs/s failed"
run() {
    local case=$1 target=$2; shift 2
    local t0 h0 t1 h1 n
    t0=$(ticks "$TERN_PID"); h0=0; [ -n "$HAP_PID" ] && h0=$(ticks "$HAP_PID")
    "$LG" auth --mech CRAM-MD5 -c "$CONC" -d "$DUR" -t "$target" --json -q "$@" >"$WORK/$case.json"
    t1=$(ticks "$TERN_PID"); h1=0; [ -n "$HAP_PID" ] && h1=$(ticks "$HAP_PID")
    n=$(jq -r '.ok + .warmup_ok' "$WORK/$case.json")
    awk -v c="$case" -v t=$((t1 - t0)) -v h=$((h1 - h0)) -v n="$n" -v k="$CLK_TCK" \
        -v r="$(jq -r .throughput "$WORK/$case.json")" -v f="$(jq -r .failed "$WORK/$case.json")" \
        'BEGIN { printf "%s %.2f %.2f %.0f %d %d\n", c, t / k / n * 1e6, h / k / n * 1e6, r, f, n }'
}

echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), kernel $(uname -r)"
echo "tern: $(cd "$ROOT" && git describe --always --dirty 2>/dev/null), $(haproxy -v | head -1 | cut -d' ' -f1-3)"
echo "auth --mech CRAM-MD5 -c $CONC -d $DUR, $ROUNDS rounds"
echo "case tern_cpu_us_per_handshake haproxy_cpu_us_per_conn handshakes_per_s failed handshakes"
: >"$WORK/all"
for r in $(seq "$ROUNDS"); do
    tern_start '[]'
    HAP_PID=""; run direct "$SUB" | tee -a "$WORK/all"
    tern_stop
    tern_start '["127.0.0.1/32"]'
    run proxy-v2-loadgen "$SUB" --proxy-v2 198.51.100.7 | tee -a "$WORK/all"
    hap_start
    run proxy-v2-haproxy "127.0.0.1:$HAP_PORT" | tee -a "$WORK/all"
    hap_stop; HAP_PID=""
    tern_stop
done
echo "--- medians (min-max) over $ROUNDS rounds"
python3 - "$WORK/all" <<'PY'
import sys, statistics as st
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
by = {}
for c, t, h, r, f, n in rows:
    by.setdefault(c, []).append((float(t), float(h), float(r), int(f)))
for c, v in by.items():
    t = [x[0] for x in v]; h = [x[1] for x in v]; r = [x[2] for x in v]
    print(f"{c}: tern {st.median(t):.1f} us/handshake ({min(t):.1f}-{max(t):.1f}); "
          f"haproxy {st.median(h):.1f} us/conn ({min(h):.1f}-{max(h):.1f}); "
          f"{st.median(r):.0f} handshakes/s ({min(r):.0f}-{max(r):.0f}); failed {sum(x[3] for x in v)}")
d = st.median([x[0] for x in by["direct"]])
for c in ("proxy-v2-loadgen", "proxy-v2-haproxy"):
    m = st.median([x[0] for x in by[c]])
    print(f"{c} vs direct: {m - d:+.1f} us/handshake ({(m - d) / d * 100:+.1f}%)")
PY
