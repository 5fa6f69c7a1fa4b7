#!/usr/bin/env bash
# AUTH with the user store in PostgreSQL vs in a file, and the NOTIFY-to-snapshot delay.
#
# Starts a throw-away PostgreSQL (Debian's binaries, as the postgres user, in a temporary
# directory, on PGPORT), two one-shard `tern demo` nodes (one on a user file, one on the
# database, the same users in both: demo/demo and BULK synthetic ones), then alternates
# `tern-loadgen auth` runs against the two (ROUNDS each, interleaved so that a busy machine
# slows both alike), and finally makes CHANGES password changes in the database, reading
# after each the node's tern_userstore_notify_delay_seconds (trigger clock -> snapshot
# handed to the shards). Run as root from the repository root after building tern and
# tern-loadgen (PROFILE=debug or release).
set -euo pipefail
PROFILE=${PROFILE:-debug}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
CHANGES=${CHANGES:-20}
BULK=${BULK:-0}   # extra synthetic users (copies of demo's secrets) in the table
MECH=${MECH:-CRAM-MD5}
PGPORT=${PGPORT:-25432}
BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
T=$PWD/target/$PROFILE
W=$(mktemp -d /tmp/tern-pgbench.XXXXXX)
chmod 755 "$W"
mkdir "$W/data" "$W/sock"
chown postgres:postgres "$W/data" "$W/sock"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  runuser -u postgres -- "$BIN/pg_ctl" -D "$W/data" -m immediate -w stop >/dev/null 2>&1 || true
  rm -rf "$W"
}
trap cleanup EXIT
runuser -u postgres -- "$BIN/initdb" -D "$W/data" -A trust -U postgres --no-sync >/dev/null
runuser -u postgres -- "$BIN/pg_ctl" -D "$W/data" -l "$W/sock/log" -w \
  -o "-p $PGPORT -k $W/sock -c listen_addresses=127.0.0.1" start >/dev/null
URL="postgresql://postgres@127.0.0.1:$PGPORT/postgres"
"$T/tern" passwd --init -f "$URL" >/dev/null
echo demo | "$T/tern" passwd -f "$URL" -u localhost -c -p demo
if [ "$BULK" -gt 0 ]; then
  runuser -u postgres -- "$BIN/psql" -h "$W/sock" -p "$PGPORT" -U postgres -d postgres -q -c \
    "INSERT INTO tern_users (username, realm, cram_md5, digest_md5, scram_sha_256)
     SELECT 'bulk' || g, 'localhost', cram_md5, digest_md5, scram_sha_256
     FROM tern_users, generate_series(1, $BULK) g WHERE username = 'demo'"
fi

start() { # dir, extra --set... ; prints the submission address
  local dir=$1
  shift
  "$T/tern" demo --dir "$dir" --set shards=1 \
    --set 'listeners.smtp=["127.0.0.1:0"]' --set 'listeners.submission=["127.0.0.1:0"]' \
    --set 'listeners.smtps=["127.0.0.1:0"]' --set auth.ip_failure_limit=1000000 "$@" \
    >"$dir.out" 2>"$dir.err" &
  pids+=($!)
  for _ in $(seq 100); do grep -q '^ready:' "$dir.out" 2>/dev/null && break; sleep 0.1; done
}
# The file node gets the same users as the database (the same lines a file holds).
mkdir -p "$W/file"
runuser -u postgres -- "$BIN/psql" -h "$W/sock" -p "$PGPORT" -U postgres -d postgres -At -c \
  "SELECT username || '@' || realm || ' cram-md5=' || cram_md5 || ' digest-md5=' || digest_md5
          || ' scram-sha-256=' || scram_sha_256 FROM tern_users" >"$W/file/users.db"
chmod 600 "$W/file/users.db"
start "$W/file"
start "$W/pg" --set "auth.users=$URL"
addr() { awk '/^listening: submission/ {print $3}' "$1.out"; }
metrics() { awk '/^listening: metrics/ {print $3}' "$1.out"; }
FILE=$(addr "$W/file")
PG=$(addr "$W/pg")
echo "$((BULK + 1)) users; file node $FILE, PostgreSQL node $PG ($(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg))"

run() {
  taskset -c 1 "$T/tern-loadgen" auth --cores 1 -c 32 --warmup 1 -d "$DURATION" -q --json \
    --mech "$MECH" -t "$1" | python3 -c '
import json, sys
r = json.load(sys.stdin)
p = r["latency_ms"][r["headline"]]
print("%.0f/s ok %d failed %d p50 %.2f ms p99 %.2f ms" % (r["throughput"], r["ok"], r["failed"], p["p50"], p["p99"]))'
}
for i in $(seq "$ROUNDS"); do
  echo "round $i: file       $(run "$FILE")"
  echo "round $i: postgresql $(run "$PG")"
done

M=$(metrics "$W/pg")
reloads() { curl -s "http://$M/metrics" | awk '/^tern_userstore_reloads_total/ {print $2}'; }
delays=()
for i in $(seq "$CHANGES"); do
  before=$(reloads)
  echo "pw$i" | "$T/tern" passwd -f "$URL" -u localhost -p demo
  for _ in $(seq 200); do [ "$(reloads)" != "$before" ] && break; sleep 0.01; done
  delays+=("$(curl -s "http://$M/metrics" | awk '/^tern_userstore_notify_delay_seconds/ {print $2*1000}')")
done
printf '%s\n' "${delays[@]}" | sort -n | awk '{a[NR]=$1} END {printf "NOTIFY-to-snapshot delay over %d changes: min %.2f ms, median %.2f ms, max %.2f ms\n", NR, a[1], a[int((NR+1)/2)], a[NR]}'
if [ -n "${VERBOSE:-}" ]; then grep -E "new snapshot|user store loaded" "$W/pg.err" | tail -n "$((CHANGES + 2))"; fi
