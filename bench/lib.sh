# bench/lib.sh — what the benchmark scripts share (sourced by run.sh, dkim.sh, milter.sh):
# the work directory and its cleanup, logging, waiting, CPU accounting (tern, or Postfix's
# processes plus EXTRA_CPU_PIDS), the tern-loadgen sink, a `tern demo` server under test,
# and Postfix from bench/postfix/ (PF_EXTRA_PACKAGES, PF_EXTRA_MAIN_CF for additions).
# Expects ROOT; optional BUILD (1: build the release binaries first), BENCH_NAME, LOG_TAG,
# KEEP, PF_PORT. Sets TERN and LG.
# shellcheck shell=bash
PF_PORT=${PF_PORT:-10587}

TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
TERN=$TARGET_DIR/release/tern
LG=$TARGET_DIR/release/tern-loadgen
if [ "${BUILD:-1}" = 1 ]; then
    (cd "$ROOT" && cargo build --release -p tern-engine --bin tern && cargo build --release -p tern-loadgen)
fi
command -v jq >/dev/null || { echo "$0 needs jq" >&2; exit 2; }

WORK=$(mktemp -d "/tmp/${BENCH_NAME:-tern-bench}.XXXXXX")
RES=$WORK/results
mkdir -p "$RES"
CLK_TCK=$(getconf CLK_TCK)
PIDS=()
PF_STARTED=0
PF_BACKUP=""

log() { echo "[${LOG_TAG:-bench} $(date +%H:%M:%S)] $*" >&2; }

cleanup() {
    set +e
    for p in "${PIDS[@]}"; do
        kill -TERM "$p" 2>/dev/null
    done
    for p in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$p" 2>/dev/null
    done
    if [ $PF_STARTED = 1 ]; then postfix_stop; fi
    if [ -n "$PF_BACKUP" ]; then
        for f in main.cf master.cf sasl/smtpd.conf; do
            if [ -e "$PF_BACKUP/$f" ]; then cp -p "$PF_BACKUP/$f" "/etc/postfix/$f"
            else rm -f "/etc/postfix/$f"; fi
        done
    fi
    if [ "${KEEP:-0}" = 0 ]; then
        find "$WORK" -mindepth 1 -maxdepth 1 ! -name results -exec rm -rf {} +
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

forget_pid() {
    local keep=() p
    for p in "${PIDS[@]}"; do [ "$p" != "$1" ] && keep+=("$p"); done
    PIDS=("${keep[@]}")
}

# wait_for FILE REGEX [SECONDS]: until a line of FILE matches; prints the line.
wait_for() {
    local i
    for i in $(seq $(( ${3:-20} * 10 ))); do
        if grep -Eq "$2" "$1" 2>/dev/null; then grep -E "$2" "$1" | head -1; return 0; fi
        sleep 0.1
    done
    echo "timed out waiting for /$2/ in $1" >&2
    cat "$1" >&2 || true
    return 1
}

# --- CPU accounting -------------------------------------------------------------------
# ticks PID: utime+stime (+cutime+cstime with a 2nd arg) of one process, in clock ticks.
ticks() {
    local s
    s=$(cat "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }
    s=${s##*) }   # fields from 3 (state) on: utime = 12th, stime 13th, cutime 14th, cstime 15th
    # shellcheck disable=SC2086
    set -- $s
    echo "${12} ${13} ${14} ${15}"
}
# server_cpu: seconds of CPU used so far by the server under test (SERVER_KIND, SERVER_PID).
server_cpu() {
    local total=0 t pid
    if [ "$SERVER_KIND" = tern ]; then
        read -r -a t <<<"$(ticks "$SERVER_PID")"
        total=$(( ${t[0]:-0} + ${t[1]:-0} ))
    else
        # Postfix: the master (and, via cutime/cstime, every child it has reaped) plus
        # every live child of the master.
        read -r -a t <<<"$(ticks "$SERVER_PID")"
        total=$(( ${t[0]:-0} + ${t[1]:-0} + ${t[2]:-0} + ${t[3]:-0} ))
        # EXTRA_CPU_PIDS: processes serving Postfix from outside (e.g. its milters).
        for pid in $(ps -o pid= --ppid "$SERVER_PID") ${EXTRA_CPU_PIDS:-}; do
            read -r -a t <<<"$(ticks "$pid")"
            total=$(( total + ${t[0]:-0} + ${t[1]:-0} ))
        done
    fi
    awk "BEGIN{printf \"%.3f\", $total / $CLK_TCK}"
}

# --- sink ----------------------------------------------------------------------------
SINK_PID=""; SINK_PORT=""; SINK_NAME=""
sink_start() {
    SINK_NAME=$1
    "$LG" sink --listen 127.0.0.1:0 --json >"$RES/sink-$1.json" 2>"$WORK/sink-$1.err" &
    SINK_PID=$!
    PIDS+=("$SINK_PID")
    local l
    l=$(wait_for "$WORK/sink-$1.err" '^listening: ')
    SINK_PORT=${l##*:}
    log "sink $1 on 127.0.0.1:$SINK_PORT"
}
sink_total() {
    local l
    l=$(grep -E 'total [0-9]+' "$WORK/sink-$SINK_NAME.err" 2>/dev/null | tail -1)
    echo "${l##*total }" | tr -dc 0-9
}
# sink_drain N: wait (up to 60 s) until the sink has received N messages.
sink_drain() {
    local i n
    for i in $(seq 600); do
        n=$(sink_total); n=${n:-0}
        [ "$n" -ge "$1" ] && return 0
        sleep 0.1
    done
    log "sink $SINK_NAME: only ${n:-0} of $1 messages arrived within 60 s"
}
sink_stop() {
    kill -TERM "$SINK_PID" 2>/dev/null || true
    wait "$SINK_PID" 2>/dev/null || true
    forget_pid "$SINK_PID"
}

# --- tern ------------------------------------------------------------------------------
TERN_DIR=$WORK/tern
tern_start() {   # tern_start NAME SINKPORT [--set K=V ...]
    local name=$1 port=$2
    shift 2
    mkdir -p "$TERN_DIR"
    "$TERN" demo --dir "$TERN_DIR" \
        --set "spool.dir=\"$WORK/spool-$name\"" \
        --set 'listeners.smtp=["127.0.0.1:0"]' \
        --set 'listeners.submission=["127.0.0.1:0"]' \
        --set 'listeners.smtps=["127.0.0.1:0"]' \
        --set "queue.routes={\"*\"=\"smtp:[127.0.0.1]:$port\"}" \
        --set 'queue.starttls="never"' \
        "$@" \
        >"$WORK/tern-$name.log" 2>&1 &
    SERVER_PID=$!
    SERVER_KIND=tern
    PIDS+=("$SERVER_PID")
    wait_for "$WORK/tern-$name.log" '^ready: ' >/dev/null
    local l
    l=$(wait_for "$WORK/tern-$name.log" '^listening: submission ')
    TARGET=${l##* }
    log "tern ($name) pid $SERVER_PID, submission on $TARGET"
}
tern_stop() {
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    forget_pid "$SERVER_PID"
}

# --- Postfix ---------------------------------------------------------------------------
postfix_install() {
    if command -v postfix >/dev/null && command -v saslpasswd2 >/dev/null \
        && ls /usr/lib/*/sasl2/libcrammd5.so >/dev/null 2>&1 \
        && { [ -z "${PF_EXTRA_PACKAGES:-}" ] || dpkg -s ${PF_EXTRA_PACKAGES:-} >/dev/null 2>&1; }; then
        return 0
    fi
    log "installing postfix, sasl2-bin, libsasl2-modules (Debian packages)"
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    echo "postfix postfix/mailname string localhost" | debconf-set-selections
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q postfix sasl2-bin libsasl2-modules ${PF_EXTRA_PACKAGES:-} >/dev/null
}
postfix_configure() {   # postfix_configure SINKPORT
    local cert=$TERN_DIR/cert.pem key=$TERN_DIR/key.pem
    if [ -z "$PF_BACKUP" ]; then
        PF_BACKUP=$WORK/postfix-backup
        mkdir -p "$PF_BACKUP/sasl"
        for f in main.cf master.cf sasl/smtpd.conf; do
            [ -e "/etc/postfix/$f" ] && cp -p "/etc/postfix/$f" "$PF_BACKUP/$f"
        done
    fi
    sed -e "s|@SINKPORT@|$1|g" -e "s|@CERT@|$cert|g" -e "s|@KEY@|$key|g" \
        -e "s|@MAILLOG@|/var/log/postfix-bench.log|g" \
        "$ROOT/bench/postfix/main.cf.in" >/etc/postfix/main.cf
    # PF_EXTRA_MAIN_CF: lines a script adds (e.g. smtpd_milters).
    [ -n "${PF_EXTRA_MAIN_CF:-}" ] && printf '%s\n' "$PF_EXTRA_MAIN_CF" >>/etc/postfix/main.cf
    sed -e "s|@LISTEN@|127.0.0.1:$PF_PORT|g" "$ROOT/bench/postfix/master.cf.in" >/etc/postfix/master.cf
    mkdir -p /etc/postfix/sasl
    cp "$ROOT/bench/postfix/smtpd.conf" /etc/postfix/sasl/smtpd.conf
    echo demo | saslpasswd2 -c -p -u localhost demo
    chown root:sasl /etc/sasldb2 && chmod 640 /etc/sasldb2
    id -nG postfix | grep -qw sasl || usermod -a -G sasl postfix
    postfix check
}
postfix_start() {   # postfix_start NAME SINKPORT
    postfix_configure "$2"
    postsuper -d ALL >/dev/null 2>&1 || true
    postfix start >/dev/null 2>&1
    PF_STARTED=1
    local i
    for i in $(seq 100); do
        [ -s /var/spool/postfix/pid/master.pid ] && break; sleep 0.1
    done
    SERVER_PID=$(tr -dc 0-9 </var/spool/postfix/pid/master.pid)
    SERVER_KIND=postfix
    for i in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$PF_PORT") 2>/dev/null && break; sleep 0.1
    done
    TARGET=127.0.0.1:$PF_PORT
    log "postfix ($1) master pid $SERVER_PID on $TARGET, relayhost [127.0.0.1]:$2"
}
postfix_stop() {
    local i mp
    mp=$(tr -dc 0-9 </var/spool/postfix/pid/master.pid 2>/dev/null || true)
    postfix stop >/dev/null 2>&1 || true
    for i in $(seq 100); do   # until the master and all its children are gone
        [ -n "$mp" ] || break
        kill -0 "$mp" 2>/dev/null || [ -n "$(ps -o pid= --ppid "$mp")" ] || break
        sleep 0.1
    done
    postsuper -d ALL >/dev/null 2>&1 || true
    PF_STARTED=0
}

