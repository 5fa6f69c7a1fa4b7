#!/usr/bin/env bash
# bench/backlog.sh — memory of a large backlog: accept N small messages (default
# 1,000,000) into `tern demo` while the next hop is down, then report resident memory per
# queued message. Every message is acknowledged only after fdatasync, tried once, refused
# by the dead next hop and deferred (a state record), so the whole backlog sits in the
# queue runner's index.
#
#   bench/backlog.sh [-n MESSAGES] [--size BYTES] [--no-build] [--keep]
#
# Prints: accept rate and latency (tern-loadgen), `tern queue stats`, and VmRSS / RssAnon /
# RssFile of the server before and after. RssFile is the segments' page cache mapped for
# zero-copy reads (reclaimable); RssAnon is what the backlog costs in memory.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
N=1000000
SIZE=256
BUILD=1
KEEP=0
while [ $# -gt 0 ]; do
    case "$1" in
        -n) N=$2; shift ;;
        --size) SIZE=$2; shift ;;
        --no-build) BUILD=0 ;;
        --keep) KEEP=1 ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done

TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
TERN=$TARGET_DIR/release/tern
LOADGEN=$TARGET_DIR/release/tern-loadgen
if [ "$BUILD" = 1 ]; then
    (cd "$ROOT" && cargo build --release -q -p tern-engine --bin tern -p tern-loadgen --bin tern-loadgen)
fi

WORK=$(mktemp -d /var/tmp/tern-backlog.XXXXXX)
PID=""
cleanup() {
    [ -n "$PID" ] && kill -9 "$PID" 2>/dev/null || true
    wait 2>/dev/null || true
    if [ "$KEEP" = 1 ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

"$TERN" demo --dir "$WORK/demo" \
    --set 'listeners.smtp=["127.0.0.1:0"]' --set 'listeners.submission=[]' --set 'listeners.smtps=[]' \
    --set 'queue.routes={"*"="smtp:[127.0.0.1]:9"}' \
    --set queue.retry_interval=2h --set queue.connect_timeout=1s \
    --set spool.segment_size=268435456 --set "queue.high_water_messages=$((N * 2))" \
    >"$WORK/demo.out" 2>"$WORK/demo.err" &
PID=$!
PORT=""
for _ in $(seq 1 100); do
    PORT=$(grep -oE 'listening: smtp 127\.0\.0\.1:[0-9]+' "$WORK/demo.out" 2>/dev/null | head -1 | grep -oE '[0-9]+$' || true)
    [ -n "$PORT" ] && break
    sleep 0.1
done
[ -n "$PORT" ] || { echo "tern demo did not start"; cat "$WORK/demo.err"; exit 1; }

mem() { grep -E '^(VmRSS|RssAnon|RssFile)' "/proc/$PID/status" | tr -s ' ' | tr '\n' ' '; echo; }
anon_kb() { awk '/^RssAnon/{print $2}' "/proc/$PID/status"; }

echo "== $(date -u '+%F %T UTC'), $(nproc) cores, commit $(cd "$ROOT" && git rev-parse --short HEAD)"
echo "before: $(mem)"
A0=$(anon_kb)
"$LOADGEN" relay -t "127.0.0.1:$PORT" --size "$SIZE" --msgs-per-conn 1000 --pipeline -c 32 \
    -n "$N" -d 900 --to 'user{n}@demo.test' -q --json >"$WORK/loadgen.json"
python3 - "$WORK/loadgen.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
acc = r["latency_ms"]["accept"]
print(f"accepted {r['ok']} in {r['elapsed_s']:.1f} s = {r['throughput']:,.0f} msgs/s, "
      f"errors {r['errors']['total']}; accept latency ms: {acc}")
PY
# Let the runner finish the first (failing) attempt of every message.
for _ in $(seq 1 600); do
    ACTIVE=$("$TERN" queue stats --socket "$WORK/demo/spool/admin.sock" --json 2>/dev/null |
        python3 -c 'import json,sys; print(json.load(sys.stdin).get("active", 0))' 2>/dev/null || echo "?")
    [ "$ACTIVE" = 0 ] && break
    sleep 1
done
"$TERN" queue stats --socket "$WORK/demo/spool/admin.sock" || true
echo "after:  $(mem)"
A1=$(anon_kb)
echo "RssAnon grew by $(( (A1 - A0) / 1024 )) MiB: $(( (A1 - A0) * 1024 / N )) bytes per queued message"
# The server keeps accepting on top of the backlog.
"$LOADGEN" relay -t "127.0.0.1:$PORT" --size "$SIZE" --msgs-per-conn 100 --pipeline -c 4 \
    -n 1000 -d 60 --to 'user{n}@demo.test' -q --json >"$WORK/after.json"
python3 - "$WORK/after.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"then accepted {r['ok']} more, errors {r['errors']['total']}, accept p99 {r['latency_ms']['accept']['p99']} ms")
PY
echo "final:  $(mem)"
