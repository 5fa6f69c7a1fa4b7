#!/bin/bash
# Runs the given fuzz targets one after another, each until it has used CPU_SECS seconds
# of CPU (default 600), then stops it with SIGINT (libFuzzer prints its final stats).
# libFuzzer's -max_total_time counts wall time, which on a shared, niced machine is much
# less CPU. Build first: RUSTC_BOOTSTRAP=1 cargo fuzz build -O
# Usage: fuzz/cpu_budget.sh TARGET...   (at most two of these at once on 2 cores)
# Corpora, artifacts and logs go under $CARGO_TARGET_DIR (default fuzz/target), never git.
set -u
cd "$(dirname "$0")"
CPU_SECS=${CPU_SECS:-600}
T=$(realpath "${CARGO_TARGET_DIR:-target}")
BIN=$T/x86_64-unknown-linux-gnu/release
OUT=$T/fuzz-runs
TCK=$(getconf CLK_TCK)
for t in "$@"; do
  mkdir -p "$OUT" "$T/corpus/$t" "$T/artifacts/$t"
  echo "start $t $(date -u +%FT%TZ)" >> "$OUT/times.log"
  nice -n 19 "$BIN/$t" -artifact_prefix="$T/artifacts/$t/" -max_total_time=7200 \
    -timeout=10 -print_final_stats=1 "$T/corpus/$t" "seeds/$t" > "$OUT/$t.log" 2>&1 &
  pid=$!
  cpu=0
  while kill -0 $pid 2>/dev/null; do
    sleep 5
    ticks=$(awk '{print $14+$15}' /proc/$pid/stat 2>/dev/null) || break
    [ -n "$ticks" ] || break
    cpu=$((ticks / TCK))
    if [ $cpu -ge "$CPU_SECS" ]; then kill -INT $pid; fi
  done
  wait $pid
  rc=$?
  # 72: stopped by SIGINT (budget reached); anything else is a finding, see the log.
  echo "end $t rc=$rc cpu_s=$cpu $(date -u +%FT%TZ)" >> "$OUT/times.log"
done
