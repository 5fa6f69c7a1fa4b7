#!/usr/bin/env bash
# bench/cpu.sh — where tern's CPU per relayed message goes (issue 17): 2 KiB relay to the
# tern-loadgen sink at fixed offered rates (open loop) and closed loop ("max"), server CPU
# per message (utime+stime until the sink has every accepted message), and with
# --syscalls the system calls, context switches and executor sleeps per message counted
# by `perf stat` over the middle of each run (needs linux-perf).
#
#   bench/cpu.sh [--rates "500 4000 max"] [--duration S] [--syscalls] [--no-build]
#                [--set K=V ...]
#
# TERN_BIN=/path/to/tern measures another binary (e.g. a saved build, side by side).
# Executor sleeps are counted as membarrier(2) calls: glommio issues one each time a shard
# is about to park.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
RATES="500 4000 max"
DURATION=10
BUILD=1
SYSCALLS=0
SETS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --rates) RATES=$2; shift ;;
        --duration) DURATION=$2; shift ;;
        --syscalls) SYSCALLS=1 ;;
        --no-build) BUILD=0 ;;
        --set) SETS+=(--set "$2"); shift ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done
if [ "$DURATION" -lt 5 ]; then echo "--duration must be at least 5 s" >&2; exit 2; fi
if [ $SYSCALLS = 1 ] && ! command -v perf >/dev/null; then
    echo "--syscalls needs perf (apt-get install linux-perf)" >&2; exit 2
fi

BENCH_NAME=tern-cpu
LOG_TAG=cpu
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
TERN=${TERN_BIN:-$TERN}
EVENTS=syscalls:sys_enter_membarrier,syscalls:sys_enter_io_uring_enter,syscalls:sys_enter_sendto,syscalls:sys_enter_recvfrom,syscalls:sys_enter_write,syscalls:sys_enter_fdatasync,syscalls:sys_enter_futex,syscalls:sys_enter_sched_yield,context-switches

printf '%-6s | %9s | %9s | %8s' rate "msgs/s" "p99 ms" "µs/msg"
[ $SYSCALLS = 1 ] && printf ' | per message: sleeps io_uring_enter sendto recvfrom write fdatasync futex sched_yield ctx-switches'
echo
for rate in $RATES; do
    name="rate-$rate"
    sink_start "$name"
    tern_start "$name" "$SINK_PORT" "${SETS[@]}"
    rate_arg=(--rate "$rate")
    [ "$rate" = max ] && rate_arg=()
    c0=$(server_cpu)
    "$LG" relay --mech CRAM-MD5 --size 2048 --msgs-per-conn 100 --pipeline -c 64 "${rate_arg[@]}" \
        --to 'user{n}@example.net' -t "$TARGET" --warmup 1 -d "$DURATION" --json -q \
        >"$RES/$name.json" 2>"$WORK/$name.err" &
    lg=$!
    window=$((DURATION - 3))
    if [ $SYSCALLS = 1 ]; then
        sleep 2
        perf stat -x, -e "$EVENTS" -p "$SERVER_PID" -o "$RES/$name.perf" -- sleep "$window" >/dev/null 2>&1 || true
    fi
    wait "$lg" || log "$name: loadgen failed"
    n=$(jq -r '(.ok // 0) + (.warmup_ok // 0)' "$RES/$name.json")
    sink_drain "$n"
    c1=$(server_cpu)
    tput=$(jq -r '.throughput' "$RES/$name.json")
    printf '%-6s | %9.0f | %9s | %8.0f' "$rate" "$tput" "$(jq -r '.latency_ms.accept.p99' "$RES/$name.json")" \
        "$(awk "BEGIN{print ($c1 - $c0) / $n * 1e6}")"
    if [ $SYSCALLS = 1 ]; then
        # Messages in the counted window: the run's rate times the window.
        awk -F, -v m="$(awk "BEGIN{print $tput * $window}")" \
            '$1 ~ /^[0-9]+$/ {printf " %.2f", $1 / m}' "$RES/$name.perf"
    fi
    echo
    tern_stop
    sink_stop
done
log "results in $RES"
