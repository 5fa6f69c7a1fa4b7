#!/usr/bin/env bash
# bench/run.sh — tern (and, with --with-postfix, Postfix) as an authenticated relay to the
# tern-loadgen measuring sink, on loopback, side by side.
#
#   bench/run.sh [--with-postfix] [--duration S] [--warmup S] [--quick] [--report FILE]
#                [--no-build] [--keep] [--smoke]
#
# Scenarios (each bounded: warm-up + duration seconds, default 1 + 10):
#   auth  CRAM-MD5, DIGEST-MD5, SCRAM-SHA-256, PLAIN after STARTTLS (with TLS
#         session resumption as the client offers it, and with --no-resume)  -c 32
#   relay 2 KiB messages, AUTH CRAM-MD5, 100 msgs/connection, pipelined, -c 64
#   relay 2 KiB, same, open loop at $RATE msgs/s (default 500): latency at equal load
#   relay 100 KiB messages, same, -c 16
#   with --with-postfix (or HIGH_RATE=R): tern alone at 5x Postfix's 2 KiB rate (open loop,
#   64 connections), for the acceptance latency at the issue's 5x load
# Beside every relay run, the disk's floor in the same seconds on the spool's filesystem:
# `tern-loadgen fsync-probe` (4 KiB pwrite + fdatasync at PROBE_RATE/s, default 500; 0 = off),
# its percentiles printed next to the acceptance percentiles.
# For every run: ops/s, latency percentiles (loadgen), end-to-end relay latency at the sink
# (relay runs), and server CPU per op (utime+stime from /proc before/after; for Postfix the
# master, every live child and the master's reaped children (cutime+cstime)). Relay runs
# count CPU until the sink has received every accepted message.
#
# Postfix (--with-postfix, needs root): installed from Debian's packages if missing,
# configured from bench/postfix/ into /etc/postfix (the previous main.cf/master.cf are
# restored at exit), Cyrus SASL with sasldb (user demo/demo, realm localhost), smtpd on
# 127.0.0.1:$PF_PORT (default 10587), STARTTLS with tern demo's certificate, relayhost = the
# sink. Postfix is stopped at exit whatever happens.
#
# Output: one JSON per run and a markdown table in $WORK (printed at the end; --report FILE
# copies it). Everything started here is stopped at exit.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WITH_POSTFIX=0
DURATION=10
WARMUP=1
BUILD=1
KEEP=0
QUICK=0
SMOKE=0   # --smoke: a tiny load (20 ops at concurrency 2 per run) to check the wiring
REPORT=""
PF_PORT=${PF_PORT:-10587}
RATE=${RATE:-500}   # offered load (msgs/s) of the open-loop relay run
while [ $# -gt 0 ]; do
    case "$1" in
        --with-postfix) WITH_POSTFIX=1 ;;
        --duration) DURATION=$2; shift ;;
        --warmup) WARMUP=$2; shift ;;
        --quick) QUICK=1 ;;
        --smoke) SMOKE=1 ;;
        --report) REPORT=$2; shift ;;
        --no-build) BUILD=0 ;;
        --keep) KEEP=1 ;;
        -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done
if awk "BEGIN{exit !($DURATION > 10)}"; then
    echo "--duration is capped at 10 s" >&2; exit 2
fi

BENCH_NAME=tern-bench
LOG_TAG=bench
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

server_start() { if [ "$1" = tern ]; then tern_start "$2" "$3"; else postfix_start "$2" "$3"; fi; }
server_stop() { if [ "$1" = tern ]; then tern_stop; else postfix_stop; fi; }

# --- runs ------------------------------------------------------------------------------
# run SERVER NAME DRAIN(0|1) loadgen-args...: one loadgen run; writes $RES/SERVER-NAME.json
# and $RES/SERVER-NAME.cpu ("cpu_s ops").
run() {
    local server=$1 name=$2 drain=$3; shift 3
    local out=$RES/$server-$name.json c0 c1 n
    log "$server $name: tern-loadgen $* -t $TARGET"
    echo "tern-loadgen $* --warmup $WARMUP -d $DURATION --json -t <$server>" >"$RES/$server-$name.cmd"
    c0=$(server_cpu)
    local t0 t1
    t0=$(date +%s.%N)
    local extra=()
    if [ $SMOKE = 1 ]; then extra=(-n 20 --cores 1); fi
    # Relay runs: the disk's floor measured in the same seconds, on the same filesystem
    # as the spool ($WORK): 4 KiB pwrite + fdatasync at $PROBE_RATE/s.
    local probe=""
    if [[ $name == relay-* ]] && [ "${PROBE_RATE:-500}" != 0 ]; then
        "$LG" fsync-probe --dir "$WORK" --rate "${PROBE_RATE:-500}" \
            -d "$(awk "BEGIN{print $WARMUP + $DURATION}")" --json \
            >"$RES/$server-$name.probe.json" 2>>"$WORK/$server-$name.err" &
        probe=$!
    fi
    "$LG" "$@" "${extra[@]}" -t "$TARGET" --warmup "$WARMUP" -d "$DURATION" --json -q >"$out" 2>"$WORK/$server-$name.err" || {
        log "$server $name: loadgen failed"; cat "$WORK/$server-$name.err" >&2; }
    [ -n "$probe" ] && wait "$probe"
    n=$(jq -r '(.ok // 0) + (.warmup_ok // 0)' "$out" 2>/dev/null || echo 0)
    if [ "$drain" = 1 ]; then sink_drain "$n"; fi
    c1=$(server_cpu)
    t1=$(date +%s.%N)
    # cpu before, cpu after, messages/ops (warm-up included), wall time from the start of
    # the run to the last message at the sink (relay runs).
    echo "$c0 $c1 $n $(awk "BEGIN{print $t1 - $t0}")" >"$RES/$server-$name.cpu"
    log "$server $name: $(jq -r '"\(.throughput|floor) \(.unit)/s, ok \(.ok), failed \(.failed) \(.errors.by_kind)"' "$out" 2>/dev/null)"
}

SERVERS=(tern)
if [ $WITH_POSTFIX = 1 ]; then
    [ "$(id -u)" = 0 ] || { echo "--with-postfix needs root" >&2; exit 2; }
    postfix_install
    SERVERS+=(postfix)
fi

# tern demo creates the certificate once; Postfix uses the same one.
for server in "${SERVERS[@]}"; do
    # AUTH handshakes.
    sink_start "$server-auth"
    server_start "$server" auth "$SINK_PORT"
    AUTHC=(-c 32); [ $SMOKE = 1 ] && AUTHC=(-c 2)
    run "$server" auth-cram-md5 0 auth --mech CRAM-MD5 "${AUTHC[@]}"
    run "$server" auth-digest-md5 0 auth --mech DIGEST-MD5 "${AUTHC[@]}"
    run "$server" auth-scram-sha-256 0 auth --mech SCRAM-SHA-256 "${AUTHC[@]}"
    run "$server" auth-plain-starttls 0 auth --mech PLAIN --starttls --cacert "$TERN_DIR/cert.pem" "${AUTHC[@]}"
    if [ $QUICK = 0 ]; then
        run "$server" auth-plain-starttls-full 0 auth --mech PLAIN --starttls --no-resume --cacert "$TERN_DIR/cert.pem" "${AUTHC[@]}"
    fi
    server_stop "$server"
    sink_stop

    # Durable relay: fresh server and sink per size.
    # "rate" = open loop at a fixed offered load (coordinated-omission corrected latency),
    # below both servers' saturation, so that acceptance latency is compared at equal load.
    RELAYS=("2k 2048 64 -")
    [ $QUICK = 0 ] && RELAYS+=("2k-rate$RATE 2048 64 $RATE" "100k 102400 16 -")
    for r in "${RELAYS[@]}"; do
        read -r tag size conc rate <<<"$r"
        [ $SMOKE = 1 ] && conc=2
        local_rate=()
        [ "$rate" != - ] && local_rate=(--rate "$rate")
        sink_start "$server-relay-$tag"
        server_start "$server" "relay-$tag" "$SINK_PORT"
        run "$server" "relay-$tag" 1 relay --mech CRAM-MD5 --size "$size" --msgs-per-conn 100 \
            --pipeline -c "$conc" "${local_rate[@]}" --to 'user{n}@example.net'
        server_stop "$server"
        sink_stop
        cp "$RES/sink-$server-relay-$tag.json" "$RES/$server-relay-$tag.sink.json"
    done
done

# tern at five times Postfix's saturated 2 KiB rate, open loop, 64 connections: the
# acceptance latency tern offers while carrying the issue's 5x load (HIGH_RATE overrides
# the rate; without Postfix and without HIGH_RATE this run is skipped).
if [ -z "${HIGH_RATE:-}" ] && [ -f "$RES/postfix-relay-2k.json" ]; then
    HIGH_RATE=$(jq -r '((.throughput * 5 / 100) | ceil) * 100' "$RES/postfix-relay-2k.json" 2>/dev/null || echo "")
fi
if [ -n "${HIGH_RATE:-}" ] && [ "$HIGH_RATE" != 0 ] && [ $QUICK = 0 ]; then
    conc=64; [ $SMOKE = 1 ] && conc=2
    sink_start "tern-relay-2k-x5"
    server_start tern "relay-2k-x5" "$SINK_PORT"
    run tern "relay-2k-x5" 1 relay --mech CRAM-MD5 --size 2048 --msgs-per-conn 100 \
        --pipeline -c "$conc" --rate "$HIGH_RATE" --to 'user{n}@example.net'
    server_stop tern
    sink_stop
    cp "$RES/sink-tern-relay-2k-x5.json" "$RES/tern-relay-2k-x5.sink.json"
fi

# --- report ----------------------------------------------------------------------------
{
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), kernel $(uname -r)"
    echo "tern: $(cd "$ROOT" && git describe --always --dirty 2>/dev/null || echo "?")"
    if [ $WITH_POSTFIX = 1 ]; then
        echo "postfix: $(postconf -h mail_version 2>/dev/null), Cyrus SASL $(dpkg-query -W -f '${Version}' libsasl2-2 2>/dev/null), OpenSSL $(openssl version 2>/dev/null | cut -d' ' -f2)"
    fi
    echo "runs: warm-up ${WARMUP} s + ${DURATION} s each"
} >"$RES/meta.txt"
RATE=$RATE HIGH_RATE=${HIGH_RATE:-} python3 - "$RES" >"$RES/report.md" <<'PYEOF'
import json, os, sys
res = sys.argv[1]
def load(name):
    try:
        with open(os.path.join(res, name)) as f:
            return json.load(f)
    except Exception:
        return None
def cpu(server, name):
    try:
        c0, c1, n = open(os.path.join(res, f"{server}-{name}.cpu")).read().split()[:3]
        c0, c1, n = float(c0), float(c1), int(n)
        return (c1 - c0) / n * 1e6 if n else None
    except Exception:
        return None
servers = ["tern"] + (["postfix"] if os.path.exists(os.path.join(res, "postfix-auth-cram-md5.json")) else [])
rows = []
def fmt(v, nd=0):
    if v is None:
        return "n/a"
    if isinstance(v, str):
        return v
    return f"{v:,.{nd}f}"
def ratio(a, b, higher_better=True):
    if a is None or b is None or a == 0 or b == 0:
        return "n/a"
    r = a / b if higher_better else b / a
    return f"{r:.1f}x"
def row(label, key, name, field, nd=0, higher=True, target=None):
    vals = []
    for s in servers:
        r = load(f"{s}-{name}.json")
        v = None
        if r is not None and r.get("ok", 0) > 0:
            if field == "throughput":
                v = r["throughput"]
            elif field.startswith("lat:"):
                _, metric, pct = field.split(":")
                v = r["latency_ms"].get(metric, {}).get(pct)
            elif field == "cpu":
                v = cpu(s, name)
            elif field == "delivered":
                try:
                    f = open(os.path.join(res, f"{s}-{name}.cpu")).read().split()
                    sk = load(f"{s}-{name}.sink.json")
                    v = sk["messages"] / float(f[3])
                except Exception:
                    v = None
            elif field.startswith("probe:"):
                pr = load(f"{s}-{name}.probe.json")
                v = ((pr or {}).get("latency_ms", {}).get("fdatasync") or {}).get(field.split(":")[1])
            elif field.startswith("sink:"):
                sk = load(f"{s}-{name}.sink.json")
                v = (sk or {}).get("relay_latency_ms", {}) or {}
                v = v.get(field.split(":")[1])
        vals.append(v)
    cells = [label] + [fmt(v, nd) for v in vals]
    if len(servers) == 2:
        cells.append(ratio(vals[0], vals[1], higher))
    if target is not None:
        cells.append(target(vals))
    else:
        cells.append("")
    rows.append(cells)
def tgt_ratio(x):
    def f(vals):
        if len(vals) < 2 or not vals[0] or not vals[1]:
            return f">= {x}x: not measured"
        r = vals[0] / vals[1]
        return f">= {x}x: {'met' if r >= x else 'NOT met'}"
    return f
def tgt_p99(vals):
    if vals[0] is None:
        return "< 5 ms: not measured"
    return f"< 5 ms: {'met' if vals[0] < 5 else 'NOT met'}"
row("AUTH CRAM-MD5, handshakes/s (c=32)", None, "auth-cram-md5", "throughput", target=tgt_ratio(10))
row("  handshake p50 / p99, ms", None, "auth-cram-md5", "lat:handshake:p50", 2, False)
rows[-1][0] = "  CRAM-MD5 handshake p50, ms"
row("  CRAM-MD5 handshake p99, ms", None, "auth-cram-md5", "lat:handshake:p99", 2, False)
row("  CRAM-MD5 server CPU per handshake, µs", None, "auth-cram-md5", "cpu", 0, False)
row("AUTH DIGEST-MD5, handshakes/s (c=32)", None, "auth-digest-md5", "throughput")
row("  DIGEST-MD5 handshake p99, ms", None, "auth-digest-md5", "lat:handshake:p99", 2, False)
row("  DIGEST-MD5 server CPU per handshake, µs", None, "auth-digest-md5", "cpu", 0, False)
row("AUTH SCRAM-SHA-256, handshakes/s (c=32)", None, "auth-scram-sha-256", "throughput")
row("  SCRAM-SHA-256 server CPU per handshake, µs", None, "auth-scram-sha-256", "cpu", 0, False)
row("STARTTLS + AUTH PLAIN, handshakes/s (c=32, resumption offered)", None, "auth-plain-starttls", "throughput", target=tgt_ratio(3))
row("  STARTTLS+PLAIN handshake p99, ms", None, "auth-plain-starttls", "lat:handshake:p99", 2, False)
row("  STARTTLS+PLAIN server CPU per handshake, µs", None, "auth-plain-starttls", "cpu", 0, False)
row("STARTTLS + AUTH PLAIN, full TLS handshakes/s (--no-resume)", None, "auth-plain-starttls-full", "throughput")
row("  full-handshake server CPU per handshake, µs", None, "auth-plain-starttls-full", "cpu", 0, False)
row("Relay 2 KiB, msgs/s accepted (c=64, pipelined, 100/conn)", None, "relay-2k", "throughput", target=tgt_ratio(5))
row("  2 KiB acceptance p50, ms", None, "relay-2k", "lat:accept:p50", 2, False)
row("  2 KiB acceptance p99, ms", None, "relay-2k", "lat:accept:p99", 2, False, target=tgt_p99)
row(f"  fdatasync probe beside it (4 KiB, same disk, same seconds) p50, ms", None, "relay-2k", "probe:p50", 2, False)
row(f"  fdatasync probe p99, ms", None, "relay-2k", "probe:p99", 2, False)
row(f"  fdatasync probe p99.9, ms", None, "relay-2k", "probe:p999", 2, False)
row("  2 KiB accepted and delivered to the sink, msgs/s (run start to last arrival)", None, "relay-2k", "delivered")
row("  2 KiB end-to-end (sink) p50, ms", None, "relay-2k", "sink:p50", 1, False)
row("  2 KiB end-to-end (sink) p99, ms", None, "relay-2k", "sink:p99", 1, False)
row("  2 KiB server CPU per message (accept + relay), µs", None, "relay-2k", "cpu", 0, False)
rate = os.environ.get("RATE", "500")
row(f"Relay 2 KiB, open loop at {rate} msgs/s offered: msgs/s accepted", None, f"relay-2k-rate{rate}", "throughput")
row(f"  2 KiB @ {rate}/s acceptance p50, ms (from intended start)", None, f"relay-2k-rate{rate}", "lat:accept:p50", 2, False)
row(f"  2 KiB @ {rate}/s acceptance p99, ms (from intended start)", None, f"relay-2k-rate{rate}", "lat:accept:p99", 2, False, target=tgt_p99)
row(f"  fdatasync probe beside it (4 KiB, same disk, same seconds) p50, ms", None, f"relay-2k-rate{rate}", "probe:p50", 2, False)
row(f"  fdatasync probe p99, ms", None, f"relay-2k-rate{rate}", "probe:p99", 2, False)
row(f"  fdatasync probe p99.9, ms", None, f"relay-2k-rate{rate}", "probe:p999", 2, False)
row(f"  2 KiB @ {rate}/s end-to-end (sink) p50, ms", None, f"relay-2k-rate{rate}", "sink:p50", 1, False)
row(f"  2 KiB @ {rate}/s end-to-end (sink) p99, ms", None, f"relay-2k-rate{rate}", "sink:p99", 1, False)
row(f"  2 KiB @ {rate}/s server CPU per message (accept + relay), µs", None, f"relay-2k-rate{rate}", "cpu", 0, False)
high = os.environ.get("HIGH_RATE", "")
if high and load("tern-relay-2k-x5.json"):
    row(f"Relay 2 KiB, open loop at {high} msgs/s offered (5x Postfix's c=64 rate; tern only): msgs/s accepted", None, "relay-2k-x5", "throughput")
    row(f"  2 KiB @ {high}/s acceptance p50, ms (from intended start)", None, "relay-2k-x5", "lat:accept:p50", 2, False)
    row(f"  2 KiB @ {high}/s acceptance p99, ms (from intended start), 64 connections", None, "relay-2k-x5", "lat:accept:p99", 2, False, target=tgt_p99)
    row(f"  fdatasync probe beside it (4 KiB, same disk, same seconds) p50, ms", None, "relay-2k-x5", "probe:p50", 2, False)
    row(f"  fdatasync probe p99, ms", None, "relay-2k-x5", "probe:p99", 2, False)
    row(f"  fdatasync probe p99.9, ms", None, "relay-2k-x5", "probe:p999", 2, False)
    row(f"  2 KiB @ {high}/s end-to-end (sink) p50, ms", None, "relay-2k-x5", "sink:p50", 1, False)
    row(f"  2 KiB @ {high}/s end-to-end (sink) p99, ms", None, "relay-2k-x5", "sink:p99", 1, False)
    row(f"  2 KiB @ {high}/s server CPU per message (accept + relay), µs", None, "relay-2k-x5", "cpu", 0, False)
row("Relay 100 KiB, msgs/s accepted (c=16)", None, "relay-100k", "throughput")
row("  100 KiB acceptance p50, ms", None, "relay-100k", "lat:accept:p50", 2, False)
row("  100 KiB acceptance p99, ms", None, "relay-100k", "lat:accept:p99", 2, False)
row("  100 KiB accepted and delivered to the sink, msgs/s (run start to last arrival)", None, "relay-100k", "delivered")
row("  100 KiB end-to-end (sink) p50, ms", None, "relay-100k", "sink:p50", 1, False)
row("  100 KiB end-to-end (sink) p99, ms", None, "relay-100k", "sink:p99", 1, False)
row("  100 KiB server CPU per message (accept + relay), µs", None, "relay-100k", "cpu", 0, False)
hdr = ["metric"] + servers + (["tern / Postfix"] if len(servers) == 2 else []) + ["issue target"]
print(open(os.path.join(res, "meta.txt")).read().rstrip().replace("\n", "  \n"))
print()
print("| " + " | ".join(hdr) + " |")
print("|" + "|".join(["---"] + ["---:"] * (len(hdr) - 2) + ["---"]) + "|")
for r in rows:
    print("| " + " | ".join(r) + " |")
print()
print("Errors and TLS handshakes per run:")
print()
for s in servers:
    for name in ["auth-cram-md5", "auth-digest-md5", "auth-scram-sha-256", "auth-plain-starttls",
                 "auth-plain-starttls-full", "relay-2k", f"relay-2k-rate{rate}", "relay-2k-x5", "relay-100k"]:
        r = load(f"{s}-{name}.json")
        if r is None:
            continue
        sk = load(f"{s}-{name}.sink.json")
        extra = f", sink received {sk['messages']}" if sk else ""
        tls = (f", TLS full {r['tls_full_handshakes']} resumed {r['tls_resumed_handshakes']}"
               if r["tls_full_handshakes"] or r["tls_resumed_handshakes"] else "")
        err = f", errors {r['errors']['by_kind']} {r['errors']['by_code']}" if r["failed"] else ""
        print(f"- {s} {name}: ok {r['ok']} (+{r['warmup_ok']} warm-up), failed {r['failed']}{tls}{extra}{err}"
              + (f", open loop: {r['unstarted']} intended starts never started" if r.get("mode") == "open" else ""))
print()
print("Commands (target = tern's submission listener or Postfix's 127.0.0.1 smtpd):")
print()
print("```")
for s in servers:
    for name in ["auth-cram-md5", "auth-digest-md5", "auth-scram-sha-256", "auth-plain-starttls",
                 "auth-plain-starttls-full", "relay-2k", f"relay-2k-rate{rate}", "relay-2k-x5", "relay-100k"]:
        p = os.path.join(res, f"{s}-{name}.cmd")
        if os.path.exists(p):
            print(open(p).read().strip())
    break
print("```")
PYEOF
cat "$RES/report.md"
if [ -n "$REPORT" ]; then cp "$RES/report.md" "$REPORT"; fi
log "results in $RES"
