#!/usr/bin/env bash
# bench/tail.sh — where tern's acceptance tail comes from (issue 17): open-loop 2 KiB relay
# runs at fixed offered loads, each with the plain fdatasync probe running in the same
# seconds on the spool's filesystem, and tern's commit-phase histograms
# (tern_commit_wait_seconds{phase}, tern_commit_batch_records{kind},
# tern_commit_messages_with_state_total) scraped from /metrics after the warm-up and at the
# end of the run (the difference is the measured window).
#
#   bench/tail.sh [--rates "500 4000"] [--rounds N] [--duration S] [--warmup S] [--no-build]
#                 [--set K=V ...] [--report FILE]
#
# --set passes a configuration override to every tern started (e.g. --set 'spool.commit="uring"').
# Per run: loadgen acceptance p50/p99/p99.9 (client side, from the intended start), the
# probe's fdatasync p50/p99/p99.9, the ratio of the p99s, the per-phase server-side
# p50/p99/p99.9 (interpolated inside the histogram's buckets), records per batch, server
# CPU per message. Everything started here is stopped at exit.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
RATES="500 4000"
ROUNDS=1
DURATION=10
WARMUP=1
BUILD=1
REPORT=""
SETS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --rates) RATES=$2; shift ;;
        --rounds) ROUNDS=$2; shift ;;
        --duration) DURATION=$2; shift ;;
        --warmup) WARMUP=$2; shift ;;
        --no-build) BUILD=0 ;;
        --set) SETS+=(--set "$2"); shift ;;
        --report) REPORT=$2; shift ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done
if awk "BEGIN{exit !($DURATION > 10)}"; then
    echo "--duration is capped at 10 s" >&2; exit 2
fi
command -v curl >/dev/null || { echo "$0 needs curl" >&2; exit 2; }

BENCH_NAME=tern-tail
LOG_TAG=tail
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
TERN=${TERN_BIN:-$TERN}   # TERN_BIN: another tern binary to measure (e.g. a saved build, side by side)

metrics_addr() { awk '$1=="listening:" && $2=="metrics" {print $3; exit}' "$WORK/tern-$1.log"; }

for round in $(seq "$ROUNDS"); do
    for rate in $RATES; do
        name="r$round-rate$rate"
        sink_start "$name"
        tern_start "$name" "$SINK_PORT" --set 'metrics.listen="127.0.0.1:0"' "${SETS[@]}"
        MET=$(metrics_addr "$name")
        c0=$(server_cpu)
        "$LG" fsync-probe --dir "$WORK" --rate "${PROBE_RATE:-500}" \
            -d "$(awk "BEGIN{print $WARMUP + $DURATION}")" --json \
            >"$RES/$name.probe.json" 2>>"$WORK/$name.err" &
        probe=$!
        echo "tern-loadgen relay --mech CRAM-MD5 --size 2048 --msgs-per-conn 100 --pipeline -c 64 --rate $rate --to 'user{n}@example.net' --warmup $WARMUP -d $DURATION --json; tern-loadgen fsync-probe --rate ${PROBE_RATE:-500} beside it" >"$RES/$name.cmd"
        "$LG" relay --mech CRAM-MD5 --size 2048 --msgs-per-conn 100 --pipeline -c 64 \
            --rate "$rate" --to 'user{n}@example.net' -t "$TARGET" --warmup "$WARMUP" \
            -d "$DURATION" --json -q >"$RES/$name.json" 2>"$WORK/$name.err" &
        lg=$!
        sleep "$WARMUP"
        curl -s "http://$MET/metrics" >"$RES/$name.metrics0"
        wait "$lg" || log "$name: loadgen failed"
        curl -s "http://$MET/metrics" >"$RES/$name.metrics1"
        wait "$probe" || true
        n=$(jq -r '(.ok // 0) + (.warmup_ok // 0)' "$RES/$name.json" 2>/dev/null || echo 0)
        sink_drain "$n"
        c1=$(server_cpu)
        echo "$c0 $c1 $n" >"$RES/$name.cpu"
        log "$name: $(jq -r '"\(.throughput|floor) msgs/s, ok \(.ok), failed \(.failed), accept p99 \(.latency_ms.accept.p99) ms"' "$RES/$name.json") probe p99 $(jq -r '.latency_ms.fdatasync.p99' "$RES/$name.probe.json") ms"
        tern_stop
        sink_stop
    done
done

{
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), kernel $(uname -r)"
    echo "tern: $(cd "$ROOT" && git describe --always --dirty 2>/dev/null || echo "?") ${SETS[*]}"
    echo "runs: open loop, 64 connections, 2 KiB, warm-up ${WARMUP} s + ${DURATION} s; fsync probe at ${PROBE_RATE:-500}/s beside each"
} >"$RES/meta.txt"
python3 "$ROOT/bench/tail_report.py" "$RES" >"$RES/report.md"
cat "$RES/report.md"
if [ -n "$REPORT" ]; then cp "$RES/report.md" "$REPORT"; fi
log "results in $RES"
