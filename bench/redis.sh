#!/usr/bin/env bash
# AUTH handshakes/s with and without [cluster] redis, and Redis round trips per AUTH
# failure (docs/benchmarks.md, "Cluster counters in Redis").
#
# Usage: bench/redis.sh [ROUNDS] [BUILD]   (BUILD: debug (default) or release)
# Needs redis-server on PATH. Alternates the two configurations ROUNDS times (default 3)
# so that a noisy machine affects both alike; prints one line per run.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
BUILD=${2:-debug}
TERN=target/$BUILD/tern
LG=target/$BUILD/tern-loadgen
WORK=$(mktemp -d /tmp/tern-redis-bench.XXXXXX)
PORT=$((21000 + RANDOM % 5000))
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

redis-server --port "$PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$WORK" >/dev/null &
pids+=($!)
for _ in $(seq 50); do redis-cli -p "$PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done

# Starts a demo node in $WORK/$1 with extra --set args; sets SUB and MET.
start() {
  local dir=$WORK/$1; shift
  mkdir -p "$dir"
  "$TERN" demo --dir "$dir" --set 'listeners.smtp=["127.0.0.1:0"]' \
    --set 'listeners.submission=["127.0.0.1:0"]' --set 'listeners.smtps=["127.0.0.1:0"]' \
    --set 'metrics.listen="127.0.0.1:0"' --set 'auth.tarpit="0s"' \
    --set auth.ip_failure_limit=100000000 "$@" >"$dir/out" 2>"$dir/err" &
  NODE=$!
  pids+=($NODE)
  for _ in $(seq 200); do grep -q '^ready:' "$dir/out" 2>/dev/null && break; sleep 0.05; done
  SUB=$(awk '$1=="listening:" && $2=="submission" {print $3}' "$dir/out")
  MET=$(awk '$1=="listening:" && $2=="metrics" {print $3}' "$dir/out")
}
stop() { kill "$NODE"; wait "$NODE" 2>/dev/null || true; }
metric() { curl -s "http://$MET/metrics" | awk -v n="$1" '$1==n {print $2}'; }
rate() { python3 -c 'import json,sys; d=json.load(sys.stdin); print(round(d["throughput"]), "errors", d["errors"]["total"], "p50/p99 ms", round(d["latency_ms"][d["headline"]]["p50"], 2), round(d["latency_ms"][d["headline"]]["p99"], 2))'; }

echo "# $(date -u +%FT%TZ) $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), build $BUILD"
for r in $(seq "$ROUNDS"); do
  for mode in local redis; do
    extra=()
    [ "$mode" = redis ] && extra=(--set "cluster.redis=\"redis://127.0.0.1:$PORT\"")
    start "$mode-$r" "${extra[@]}"
    out=$("$LG" auth -t "$SUB" --mech CRAM-MD5 -c 32 --warmup 1 -d 10 --json -q)
    echo "round $r $mode: successful CRAM-MD5 AUTH handshakes/s: $(echo "$out" | rate)"
    stop
  done
done

# Failures: every AUTH fails (wrong password), closed loop as fast as it goes, then an
# open loop at 50/s; Redis round trips (pipelines, the 4/s polls included) and
# operations from the node's own counters, INCRBY calls from Redis' INFO commandstats.
for load in "-c 32" "--rate 50 -c 32"; do
  start "fail-${load// /}" --set "cluster.redis=\"redis://127.0.0.1:$PORT\""
  for _ in $(seq 100); do [ "$(metric tern_cluster_redis_up)" = 1 ] && break; sleep 0.1; done
  redis-cli -p "$PORT" config resetstat >/dev/null
  rt0=$(metric tern_cluster_redis_round_trips_total); ops0=$(metric tern_cluster_redis_ops_total)
  out=$("$LG" auth -t "$SUB" --mech CRAM-MD5 --password wrong $load -d 10 --json -q || true)
  sleep 1
  rt1=$(metric tern_cluster_redis_round_trips_total); ops1=$(metric tern_cluster_redis_ops_total)
  incr=$(redis-cli -p "$PORT" info commandstats | awk -F'[:=,]' '/cmdstat_incrby/ {print $3}')
  fails=$(echo "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["failed"])')
  echo "failures ($load): $fails failed AUTHs seen by the generator; node: $((ops1 - ops0)) ops, $((rt1 - rt0)) round trips ($(python3 -c "print(round(($rt1-$rt0)/max(1,$ops1-$ops0), 3))") per failure); redis: ${incr:-0} INCRBY calls"
  stop
done
