#!/usr/bin/env bash
# bench/milter-counters.sh — what one milter round trip costs tern in kernel events, where
# CPU time is too noisy to compare (shared cores) and there are no hardware counters.
#
#   bench/milter-counters.sh MODE [SECS] [stat|record FILE]
#
# MODE: none, all (a no-op filter answering every stage) or eom (end-of-message only);
# the filter is `tern-loadgen milter-noop`. The load is bench/milter.sh's closed loop (2 KiB,
# 64 connections, AUTH CRAM-MD5, pipelined, 100 messages per connection) after a 1 s
# warm-up. Prints tern's CPU per message (utime+stime until the sink has every message);
# with `stat`, per message: system calls, io_uring requests, context switches of tern's
# threads (perf tracepoints) and malloc calls (a perf uprobe on libc's malloc, added if
# missing; needs root); with `record FILE`, a perf profile (999 Hz, call graphs).
# TERN and LG override the release binaries of this tree.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
MODE=${1:?MODE: none, all or eom}; SECS=${2:-10}; PERF=${3:-}; PERF_OUT=${4:-}
TERN=${TERN:-$ROOT/target/release/tern}
LG=${LG:-$ROOT/target/release/tern-loadgen}
W=$(mktemp -d /tmp/tern-milter-counters.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
listening() {   # listening FILE: the port of its `listening:` line
    local i l
    for i in $(seq 600); do
        l=$(grep -m1 '^listening: ' "$1" 2>/dev/null) && { echo "${l##*[: ]}"; return; }
        sleep 0.1
    done
    echo "no listening line in $1" >&2; cat "$1" >&2; exit 1
}
"$LG" sink --listen 127.0.0.1:0 >/dev/null 2>"$W/sink.err" & PIDS+=($!)
SP=$(listening "$W/sink.err")
SET=()
if [ "$MODE" != none ]; then
    "$LG" milter-noop --listen 127.0.0.1:0 --stages "$MODE" >/dev/null 2>"$W/milter.err" & PIDS+=($!)
    MP=$(listening "$W/milter.err")
    SET=(--set "milter.filters=[{name=\"f\",socket=\"inet:127.0.0.1:$MP\",timeouts=\"R:60s;E:60s\"}]")
fi
"$TERN" demo --dir "$W/tern" --set "spool.dir=\"$W/spool\"" \
    --set 'listeners.smtp=["127.0.0.1:0"]' --set 'listeners.submission=["127.0.0.1:0"]' \
    --set 'listeners.smtps=["127.0.0.1:0"]' --set "queue.routes={\"*\"=\"smtp:[127.0.0.1]:$SP\"}" \
    --set 'queue.starttls="never"' "${SET[@]}" >"$W/tern.log" 2>&1 &
TP=$!; PIDS+=($TP)
for _ in $(seq 600); do grep -q '^listening: submission ' "$W/tern.log" && break; sleep 0.1; done
T=$(grep -m1 '^listening: submission ' "$W/tern.log"); T=${T##* }
ticks() { local s; s=$(cat "/proc/$1/stat"); s=${s##*) }; set -- $s; echo $(( ${12} + ${13} )); }
sunk() { local n; n=$(grep -oE 'total [0-9]+' "$W/sink.err" | tail -1 | tr -dc 0-9); echo "${n:-0}"; }
drain() { for _ in $(seq 600); do [ "$(sunk)" -ge "$1" ] && return; sleep 0.1; done; echo "sink: only $(sunk) of $1" >&2; }
RELAY=(relay --mech CRAM-MD5 --size 2048 --msgs-per-conn 100 --pipeline --to 'user{n}@example.net' -c 64 -t "$T" --json -q)
"$LG" "${RELAY[@]}" -d 1 >"$W/warm.json" 2>/dev/null
drain "$(jq '.ok' "$W/warm.json")"
before=$(sunk); c0=$(ticks $TP); PP=""
case $PERF in
    stat)
        perf probe -l 2>/dev/null | grep -q 'probe_libc:malloc' \
            || perf probe -q -x "$(ldd "$TERN" | awk '/libc.so/{print $3}')" malloc >/dev/null 2>&1 || true
        EV=raw_syscalls:sys_enter,io_uring:io_uring_submit_req,sched:sched_switch
        perf probe -l 2>/dev/null | grep -q 'probe_libc:malloc' && EV=$EV,probe_libc:malloc
        perf stat -x, -e "$EV" -p $TP -o "$W/stat" -- sleep "$SECS" >/dev/null 2>&1 & PP=$! ;;
    record) perf record -F 999 -g -p $TP -o "${PERF_OUT:?record FILE}" -- sleep "$SECS" >/dev/null 2>&1 & PP=$! ;;
    "") ;;
    *) echo "unknown: $PERF (stat or record FILE)" >&2; exit 2 ;;
esac
"$LG" "${RELAY[@]}" -d "$SECS" >"$W/relay.json" 2>"$W/relay.err"
ok=$(jq '.ok' "$W/relay.json")
drain $((before + ok))
c1=$(ticks $TP)
[ -n "$PP" ] && wait "$PP"
awk -v m="$MODE" -v ok="$ok" -v c0="$c0" -v c1="$c1" -v t="$(getconf CLK_TCK)" -v s="$SECS" \
    'BEGIN{printf "%s: %d msgs, %.0f msgs/s, tern CPU %.1f µs/msg\n", m, ok, ok/s, (c1-c0)/t/ok*1e6}'
if [ "$PERF" = stat ]; then
    awk -F, -v ok="$ok" '/^[0-9.]/{printf "  %s per message: %.2f\n", $3, $1/ok}' "$W/stat"
fi
