#!/usr/bin/env bash
# bench/dkim.sh — what DKIM signing costs tern, side by side in one run, and the physical
# floor (OpenSSL's signature speed on this machine).
#
#   bench/dkim.sh [--modes "inline thread"] [--duration S] [--rate R] [--signed-rate R]
#                 [--with-postfix] [--no-build] [--smoke] [--report FILE]
#
# For each `dkim.signer` mode (inline: on the shard's thread; thread: a signing thread per
# shard), one tern (release build, `tern demo` with keys for three domains) relaying to the
# tern-loadgen sink over 587 with AUTH CRAM-MD5, 2 KiB messages, 100 per connection,
# pipelined, 64 connections, closed loop:
#   unsigned   From: a domain without keys
#   ed25519    From: ed.bench (one Ed25519 key)
#   rsa        From: rsa.bench (one RSA-2048 key)
#   dual       From: dual.bench (RSA-2048 + Ed25519, the default advice)
# msgs/s, acceptance p50/p99, and server CPU per message (utime+stime of tern until the
# sink has every accepted message). Then the effect on everyone else: unsigned traffic
# open loop at $RATE msgs/s (default 500), alone and while RSA-signed traffic runs open
# loop at $SIGNED_RATE msgs/s (default 300) on the same server; the unsigned sessions'
# acceptance p99 in both.
# Floor: `openssl speed -seconds 5 rsa2048 ed25519` (sign/s of each).
# Anchor (--with-postfix, root): Postfix with OpenDKIM as its milter (Debian packages,
# installed if missing), signing the same mail with the same keys (KeyTable/SigningTable;
# two OpenDKIM instances chained, RSA and Ed25519, since OpenDKIM 2.11 has one signature
# algorithm per instance), the same four closed-loop runs; CPU = Postfix's processes +
# OpenDKIM's. /etc/postfix's files are restored at exit.
#
# Output: JSON per run and a markdown table (printed; --report FILE copies it).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
MODES="inline thread"
DURATION=10
WARMUP=1
RATE=500
SIGNED_RATE=300
BUILD=1
SMOKE=0
WITH_POSTFIX=0
REPORT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --modes) MODES=$2; shift ;;
        --duration) DURATION=$2; shift ;;
        --rate) RATE=$2; shift ;;
        --signed-rate) SIGNED_RATE=$2; shift ;;
        --no-build) BUILD=0 ;;
        --with-postfix) WITH_POSTFIX=1 ;;
        --smoke) SMOKE=1 ;;
        --report) REPORT=$2; shift ;;
        -h|--help) sed -n '2,29p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done

BENCH_NAME=tern-dkim-bench
LOG_TAG=dkim-bench
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

# Keys: one per algorithm domain, two for dual.bench.
KEYS=$WORK/keys
mkdir -p "$KEYS"
"$TERN" dkim keygen --domain ed.bench --selector s1 --algorithm ed25519 --dir "$KEYS" >/dev/null
"$TERN" dkim keygen --domain rsa.bench --selector s1 --algorithm rsa --dir "$KEYS" >/dev/null
"$TERN" dkim keygen --domain dual.bench --selector r1 --algorithm rsa --dir "$KEYS" >/dev/null
"$TERN" dkim keygen --domain dual.bench --selector e1 --algorithm ed25519 --dir "$KEYS" >/dev/null
key() { echo "{domain=\"$1\",selector=\"$2\",algorithm=\"$3\",key=\"$KEYS/$1.$2.$3.pem\"}"; }
DKIM_KEYS="[$(key ed.bench s1 ed25519),$(key rsa.bench s1 rsa),$(key dual.bench r1 rsa),$(key dual.bench e1 ed25519)]"

# --- Postfix + OpenDKIM (the anchor) -----------------------------------------------------
# OpenDKIM 2.11 signs with one algorithm per instance (SignatureAlgorithm is global), so
# dual signing takes two instances in a milter chain, as sites running it do: one RSA, one
# Ed25519. Every message goes through both.
ODKIM_PIDS=()
ODKIM_SOCKETS=()
opendkim_start() {   # opendkim_start NAME ALGORITHM KEYTABLE-LINES SIGNINGTABLE-LINES
    local d=$WORK/opendkim-$1 port
    mkdir -p "$d"
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    printf '%s\n' "$3" >"$d/keytable"
    printf '%s\n' "$4" >"$d/signingtable"
    cat >"$d/opendkim.conf" <<CF
Syslog no
Mode s
SignatureAlgorithm $2
Canonicalization relaxed/relaxed
KeyTable file:$d/keytable
SigningTable refile:$d/signingtable
OversignHeaders From
InternalHosts 127.0.0.1
RequireSafeKeys false
Socket inet:$port@127.0.0.1
CF
    opendkim -f -x "$d/opendkim.conf" >"$WORK/opendkim-$1.log" 2>&1 &
    ODKIM_PIDS+=($!)
    PIDS+=($!)
    local i
    for i in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1
    done
    ODKIM_SOCKETS+=("inet:127.0.0.1:$port")
    log "opendkim ($1, $2) pid $! on 127.0.0.1:$port"
}
opendkim_start_all() {
    opendkim_start rsa rsa-sha256 \
        "rsa rsa.bench:s1:$KEYS/rsa.bench.s1.rsa.pem
dualr dual.bench:r1:$KEYS/dual.bench.r1.rsa.pem" \
        "*@rsa.bench rsa
*@dual.bench dualr"
    opendkim_start ed ed25519-sha256 \
        "ed ed.bench:s1:$KEYS/ed.bench.s1.ed25519.pem
duale dual.bench:e1:$KEYS/dual.bench.e1.ed25519.pem" \
        "*@ed.bench ed
*@dual.bench duale"
    EXTRA_CPU_PIDS="${ODKIM_PIDS[*]}"
    PF_EXTRA_MAIN_CF="# OpenDKIM signs as a milter (bench/dkim.sh).
smtpd_milters = ${ODKIM_SOCKETS[*]}
non_smtpd_milters = \$smtpd_milters
milter_default_action = tempfail
milter_protocol = 6"
}
EXTRA=()
[ $SMOKE = 1 ] && EXTRA=(-n 20 --cores 1)
RELAY=(relay --mech CRAM-MD5 --size 2048 --msgs-per-conn 100 --pipeline --to 'user{n}@example.net')

# closed NAME FROM: closed-loop run, CPU per message until the sink has them all.
closed() {
    local name=$1 from=$2 out=$RES/$1.json c0 c1 n
    c0=$(server_cpu)
    local before; before=$(sink_total); before=${before:-0}
    "$LG" "${RELAY[@]}" --from "$from" -c 64 "${EXTRA[@]}" -t "$TARGET" --warmup "$WARMUP" \
        -d "$DURATION" --json -q >"$out" 2>"$WORK/$name.err" || { log "$name: loadgen failed"; cat "$WORK/$name.err" >&2; }
    n=$(jq -r '(.ok // 0) + (.warmup_ok // 0)' "$out" 2>/dev/null || echo 0)
    sink_drain $((before + n))
    c1=$(server_cpu)
    echo "$c0 $c1 $n" >"$RES/$name.cpu"
    log "$name: $(jq -r '"\(.throughput|floor) msgs/s, p99 \(.latency_ms.accept.p99) ms, failed \(.failed)"' "$out")"
}
# open NAME FROM RATE: open-loop run (latency from the intended start).
open_run() {
    "$LG" "${RELAY[@]}" --from "$2" -c 64 --rate "$3" "${EXTRA[@]}" -t "$TARGET" --warmup "$WARMUP" \
        -d "$DURATION" --json -q >"$RES/$1.json" 2>"$WORK/$1.err" || { log "$1: loadgen failed"; cat "$WORK/$1.err" >&2; }
    log "$1: $(jq -r '"\(.throughput|floor) msgs/s, p99 \(.latency_ms.accept.p99) ms, failed \(.failed)"' "$RES/$1.json")"
}

for mode in $MODES; do
    sink_start "$mode"
    tern_start "$mode" "$SINK_PORT" --set "dkim.keys=$DKIM_KEYS" --set "dkim.signer=\"$mode\""
    closed "$mode-unsigned" loadgen@plain.bench
    closed "$mode-ed25519" loadgen@ed.bench
    closed "$mode-rsa" loadgen@rsa.bench
    closed "$mode-dual" loadgen@dual.bench
    open_run "$mode-unsigned-alone" loadgen@plain.bench "$RATE"
    # The same unsigned load, with RSA-signed traffic beside it on the same shards.
    open_run "$mode-signed-beside" loadgen@rsa.bench "$SIGNED_RATE" &
    bg=$!
    open_run "$mode-unsigned-mixed" loadgen@plain.bench "$RATE"
    wait "$bg"
    tern_stop
    sink_stop
done

if [ $WITH_POSTFIX = 1 ]; then
    [ "$(id -u)" = 0 ] || { echo "--with-postfix needs root" >&2; exit 2; }
    PF_EXTRA_PACKAGES=opendkim
    postfix_install
    sink_start postfix
    opendkim_start_all
    postfix_start postfix "$SINK_PORT"
    closed "postfix-unsigned" loadgen@plain.bench
    closed "postfix-ed25519" loadgen@ed.bench
    closed "postfix-rsa" loadgen@rsa.bench
    closed "postfix-dual" loadgen@dual.bench
    postfix_stop
    sink_stop
fi

log "openssl speed -seconds 5 rsa2048 ed25519"
OSSL_SECS=5; [ $SMOKE = 1 ] && OSSL_SECS=1
openssl speed -seconds "$OSSL_SECS" rsa2048 ed25519 >"$RES/openssl.txt" 2>/dev/null

{
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), kernel $(uname -r)"
    echo "tern: $(cd "$ROOT" && git describe --always --dirty 2>/dev/null || echo "?"), $(openssl version)"
    echo "runs: warm-up ${WARMUP} s + ${DURATION} s each; 2 KiB, 64 connections, AUTH CRAM-MD5, pipelined"
} >"$RES/meta.txt"
MODES=$MODES RATE=$RATE SIGNED_RATE=$SIGNED_RATE python3 - "$RES" >"$RES/report.md" <<'PYEOF'
import json, os, re, sys
res = sys.argv[1]
modes = os.environ["MODES"].split()
def load(n):
    try:
        return json.load(open(os.path.join(res, n + ".json")))
    except Exception:
        return None
def cpu(n):
    try:
        c0, c1, k = open(os.path.join(res, n + ".cpu")).read().split()
        return (float(c1) - float(c0)) / int(k) * 1e6 if int(k) else None
    except Exception:
        return None
def p(n, pct):
    r = load(n)
    try:
        return r["latency_ms"]["accept"][pct]
    except Exception:
        return None
def f(v, nd=0):
    return "n/a" if v is None else f"{v:,.{nd}f}"
# openssl speed: "rsa 2048 bits 0.000735s 0.000021s 1360.5 47619.0" and
# "253 bits EdDSA (Ed25519)   0.0000s   0.0001s  24000.0   8000.0"
ossl = open(os.path.join(res, "openssl.txt")).read()
rsa_us = ed_us = None
m = re.search(r"^rsa\s+2048 bits\s+([\d.]+)s", ossl, re.M)
if m:
    rsa_us = float(m.group(1)) * 1e6
m = re.search(r"EdDSA \(Ed25519\)\s+[\d.]+s\s+[\d.]+s\s+([\d.]+)", ossl)
if m:
    ed_us = 1e6 / float(m.group(1))
print(open(os.path.join(res, "meta.txt")).read())
print("| dkim.signer | signing | msgs/s | accept p50 ms | accept p99 ms | CPU µs/msg | added CPU µs/msg |")
print("|---|---|---:|---:|---:|---:|---:|")
rows = modes + (["postfix"] if load("postfix-unsigned") else [])
for mode in rows:
    base = cpu(f"{mode}-unsigned")
    for kind in ["unsigned", "ed25519", "rsa", "dual"]:
        n = f"{mode}-{kind}"
        r = load(n)
        c = cpu(n)
        added = None if (c is None or base is None or kind == "unsigned") else c - base
        label = "Postfix + OpenDKIM" if mode == "postfix" else mode
        print(f"| {label} | {kind} | {f(r and r.get('throughput'))} | {f(p(n,'p50'),2)} | {f(p(n,'p99'),2)} | {f(c)} | {f(added)} |")
print()
print(f"openssl speed (one signature, this machine): RSA-2048 {f(rsa_us)} µs, Ed25519 {f(ed_us,1)} µs; both {f((rsa_us or 0)+(ed_us or 0))} µs")
print()
for mode in rows:
    base = cpu(f"{mode}-unsigned")
    ed, dual = cpu(f"{mode}-ed25519"), cpu(f"{mode}-dual")
    if base and ed:
        print(f"- {mode}: Ed25519 adds {100*(ed-base)/base:.1f}% to the unsigned CPU per message (goal < 15%)")
    if base and dual and rsa_us and ed_us:
        print(f"- {mode}: dual signing adds {dual-base:,.0f} µs = {(dual-base)/(rsa_us+ed_us):.2f}x openssl's two signatures (goal <= 1.15x)")
print()
print(f"Unsigned sessions at {os.environ['RATE']} msgs/s open loop, acceptance latency (ms, from the intended start):")
print()
print("| dkim.signer | unsigned alone p50 / p99 / p99.9 | with RSA-signed beside p50 / p99 / p99.9 | signed beside p99 |")
print("|---|---|---|---:|")
for mode in modes:
    a, m_ = f"{mode}-unsigned-alone", f"{mode}-unsigned-mixed"
    print(f"| {mode} | {f(p(a,'p50'),2)} / {f(p(a,'p99'),2)} / {f(p(a,'p999'),2)} | {f(p(m_,'p50'),2)} / {f(p(m_,'p99'),2)} / {f(p(m_,'p999'),2)} | {f(p(mode+'-signed-beside','p99'),2)} |")
PYEOF
cat "$RES/report.md"
[ -n "$REPORT" ] && cp "$RES/report.md" "$REPORT"
log "results in $RES"
