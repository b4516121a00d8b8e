#!/usr/bin/env bash
# Benchmark remote-relay (issue 5, "Scale and speed") on loopback.
#
# Starts private `remote-relay run` processes on 127.0.0.1 (one temp data dir), drives them
# with the load tool relay-load (tests/src/bin/relay_load.rs: simulated agents, each its own
# TCP + TLS tunnel connection, remote_proto::tunnel), and prints one Markdown table
# with the numbers of this one run:
#   1. relay RSS per idle tunnel at BENCH_TUNNELS simulated agents (target <= 20 KiB): the
#      agents enrol (join token made in the relay's store, then the Enrol RPC) against a
#      first relay process; a second, fresh process on the same data dir is measured: VmRSS
#      (/proc/PID/status) with BENCH_WARMUP tunnels up, then with all of them up and idle for
#      BENCH_IDLE_SECS; (after - before) / (tunnels - warm-up). Also how long enrolment and
#      connecting took. Why two processes: argon2 (one hash or check per enrolment) leaves
#      glibc's heap fragmented, and those resident holes would be reused by the tunnels and
#      hide their cost. The run is repeated on a third process started with
#      MALLOC_MMAP_THRESHOLD_=1048576 (diagnosis, info only; BENCH_MALLOC_DIAG=0 skips it):
#      the difference is what argon2's 4 MiB buffers cost (one check per connecting agent).
#   2. journal persistence with spill: one simulated agent reports one commands session in
#      its AgentHello and spills BENCH_SPILL_BYTES of output records for it (64 KiB each,
#      4 per SpillBatch, 8 batches in flight), each batch acknowledged (SpillAck) once durable
#      in the relay's store (payloads in segment files, index in SQLite) -> MB/s (10^6 bytes)
#      of acknowledged payload (target
#      >= 200); the store is checked to hold every record afterwards. For reference, the
#      data dir's file system: `dd bs=1M conv=fdatasync` of the same size.
#   3. keystroke echo round trip added by the relay (target <= 1 ms at p50): one real
#      remote-agent dials out to the relay (--relay, --join-token, --name bench1) and also
#      listens for SSH on 127.0.0.1; a terminal session opened with
#      `remote session new relay://bench1 --terminal` is attached in a pty
#      (sessions_helper.py echo) through the relay (`REMOTE_RELAY=… REMOTE_TOKEN=… remote
#      attach ID`) and directly (`remote attach ACCOUNT@127.0.0.1:PORT/ID`), alternating,
#      BENCH_ECHO_ROUNDS rounds of BENCH_KEYS keys each way; p50 relay - p50 direct.
# Numbers are printed as measured; nothing is adjusted.
#
# Usage: tests/bench/relay.sh   (part 3 needs root: the agent account runs as OS user
#                                BENCH_OS_USER; without root it is skipped)
# Build first: cargo build --release -p remote-relay -p remote-tests --bin remote-relay --bin relay-load
#              cargo build --release -p remote-agent -p remote-client        (part 3)
# Environment:
#   BENCH_RELAY_BIN     relay binary (default <repo>/target/release/remote-relay)
#   BENCH_LOAD_BIN      load tool (default <repo>/target/release/relay-load)
#   BENCH_AGENT_BIN     agent binary (default <repo>/target/release/remote-agent)
#   BENCH_CLIENT_BIN    client binary (default <repo>/target/release/remote)
#   BENCH_TUNNELS       simulated agents / idle tunnels (default 10000)
#   BENCH_WARMUP        tunnels up before the baseline RSS reading (default 10)
#   BENCH_IDLE_SECS     seconds all tunnels stay idle before the final reading (default 5)
#   BENCH_CONCURRENCY   enrolments and connection set-ups at once (default 64)
#   BENCH_MALLOC_DIAG   1: repeat part 1 with MALLOC_MMAP_THRESHOLD_=1048576 (default 1)
#   BENCH_SPILL_BYTES   payload spilled (default 1073741824 = 1 GiB; whole 64 KiB records)
#   BENCH_SPILL_IN_FLIGHT  spill batches unacknowledged at most (default 8)
#   BENCH_KEYS          timed keystrokes per round and path (default 300; plus 20 warm-up keys)
#   BENCH_KEY_GAP_MS    pause between keystrokes (default 20)
#   BENCH_ECHO_ROUNDS   rounds of (direct, relay) echo measurements, order alternating (default 2)
#   BENCH_OS_USER       OS user the agent account runs as (default remote-bench; created if missing)
#   BENCH_PARTS         which parts to run, e.g. "1 2" (default "1 2 3")
#   BENCH_KEEP          1: keep the temp dir (logs, data dir) and print where it is (default 0)

set -uo pipefail
export LC_ALL=C

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
HELPER="$HERE/relay_helper.py"
SESSIONS_HELPER="$HERE/sessions_helper.py"

RELAY_BIN="${BENCH_RELAY_BIN:-$REPO/target/release/remote-relay}"
LOAD_BIN="${BENCH_LOAD_BIN:-$REPO/target/release/relay-load}"
AGENT_BIN="${BENCH_AGENT_BIN:-$REPO/target/release/remote-agent}"
CLIENT_BIN="${BENCH_CLIENT_BIN:-$REPO/target/release/remote}"
TUNNELS="${BENCH_TUNNELS:-10000}"
WARMUP="${BENCH_WARMUP:-10}"
IDLE_SECS="${BENCH_IDLE_SECS:-5}"
CONCURRENCY="${BENCH_CONCURRENCY:-64}"
MALLOC_DIAG="${BENCH_MALLOC_DIAG:-1}"
SPILL_BYTES="${BENCH_SPILL_BYTES:-1073741824}"
SPILL_IN_FLIGHT="${BENCH_SPILL_IN_FLIGHT:-8}"
KEYS="${BENCH_KEYS:-300}"
KEY_GAP_MS="${BENCH_KEY_GAP_MS:-20}"
ECHO_ROUNDS="${BENCH_ECHO_ROUNDS:-2}"
OS_USER="${BENCH_OS_USER:-remote-bench}"
PARTS="${BENCH_PARTS:-1 2 3}"
KEEP="${BENCH_KEEP:-0}"
ACCOUNT="$OS_USER"   # agent account, relay user and OS user share the name
RECORD_BYTES=65536
DIAG_ENV="MALLOC_MMAP_THRESHOLD_=1048576"

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf 'relay.sh: %s\n' "$*" >&2; exit 1; }
# shellcheck source=benchlib.sh
. "$HERE/benchlib.sh"
part() { [[ " $PARTS " == *" $1 "* ]]; }

for v in TUNNELS WARMUP IDLE_SECS CONCURRENCY SPILL_BYTES SPILL_IN_FLIGHT KEYS KEY_GAP_MS ECHO_ROUNDS; do
    [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer (got '${!v}')"
done
((SPILL_BYTES % RECORD_BYTES == 0)) || die "BENCH_SPILL_BYTES must be a whole number of 64 KiB records"
((WARMUP < TUNNELS)) || die "BENCH_WARMUP ($WARMUP) must be below BENCH_TUNNELS ($TUNNELS)"

# ---------------------------------------------------------------- prerequisites
if [[ -x /usr/bin/python3 ]]; then PY=/usr/bin/python3; else PY="$(command -v python3)" || die "python3 not found (needed for $HELPER)"; fi
build_hint="(cd $REPO && cargo build --release -p remote-relay -p remote-tests --bin remote-relay --bin relay-load)"
[[ -x $RELAY_BIN ]] || die "relay binary $RELAY_BIN not found. Build it: $build_hint"
[[ -x $LOAD_BIN ]] || die "load tool $LOAD_BIN not found. Build it: $build_hint"
# One file descriptor per tunnel in each process, plus the store, logs and listeners.
need_fds=$((TUNNELS + 512))
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null
FDS="$(ulimit -n)"
[[ $FDS == unlimited ]] || ((FDS >= need_fds)) \
    || die "open file limit is $FDS (hard limit $(ulimit -Hn)); $TUNNELS tunnels need $need_fds per process: raise it (ulimit -Hn, /etc/security/limits.conf, or the container's nofile limit) or lower BENCH_TUNNELS"
read -r port_lo port_hi </proc/sys/net/ipv4/ip_local_port_range
((port_hi - port_lo > TUNNELS + 1000)) \
    || die "local port range $port_lo-$port_hi is too small for $TUNNELS connections from one address"
if part 3; then
    if [[ $(id -u) -ne 0 ]]; then
        log "not root: skipping part 3 (the agent account runs as OS user $OS_USER; run_as needs root)"
        PARTS="${PARTS//3/}"
    else
        command -v ssh-keygen >/dev/null || die "ssh-keygen not found (part 3). Install it: apt-get install openssh-client"
        "$PY" -c 'import os; os.pidfd_open' 2>/dev/null || die "$PY lacks os.pidfd_open (Python >= 3.9 on Linux >= 5.3 needed)"
        [[ -x $AGENT_BIN ]] || die "agent binary $AGENT_BIN not found. Build it: (cd $REPO && cargo build --release -p remote-agent -p remote-client)"
        [[ -x $CLIENT_BIN ]] || die "client binary $CLIENT_BIN not found. Build it: (cd $REPO && cargo build --release -p remote-agent -p remote-client)"
        ensure_os_user "$OS_USER"
        OS_SHELL="$(getent passwd "$OS_USER" | cut -d: -f7)"
    fi
fi

# ---------------------------------------------------------------- state and teardown
T="$(mktemp -d /tmp/bench-relay.XXXXXX)"
chmod 700 "$T"
DATA="$T/relay-data"
RES="$T/results"
RELAY_PID=""
RELAY_ADDR=""
RELAY_N=0
LOAD_PID=""
AGENT_PID=""
NOTES=()
: >"$RES"

# Stop one process we started: SIGTERM, up to 15 s, then SIGKILL.
stop_pid() {
    local pid="$1" rc
    [[ -n $pid ]] || return 0
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null
        for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null
    fi
    wait "$pid" 2>/dev/null; rc=$?
    return "$rc"
}
cleanup() {
    set +e
    stop_pid "$LOAD_PID"
    stop_pid "$AGENT_PID"
    stop_pid "$RELAY_PID"
    if [[ $KEEP == 1 ]]; then log "kept $T (logs, results, relay data dir)"; else rm -rf "$T"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

put() { printf '%s=%s\n' "$1" "$2" >>"$RES"; }
get() { sed -n "s/^$1=//p" "$RES" | tail -1; }
note() { NOTES+=("$*"); log "NOTE: $*"; }
# absorb PREFIX FILE: the tool's key=value lines into the results, keys prefixed.
absorb() { sed -n "s/^\([a-z_0-9]*\)=/$1\1=/p" "$2" >>"$RES"; }
rss_kib() { "$PY" "$HELPER" rss "$1" 2>/dev/null; }
cpu_secs() { "$PY" "$SESSIONS_HELPER" cpu "$1" 2>/dev/null; }

# start_relay [VAR=VALUE ...]: a relay on 127.0.0.1:<free port> with the data dir; sets
# RELAY_PID, RELAY_ADDR and RELAY_LOG.
start_relay() {
    RELAY_N=$((RELAY_N + 1))
    RELAY_LOG="$T/relay-$RELAY_N.log"
    local max=$((TUNNELS + 1000)); ((max > 20000)) || max=20000
    env "$@" "$RELAY_BIN" run --listen 127.0.0.1:0 --data-dir "$DATA" --max-connections "$max" \
        </dev/null 2>"$RELAY_LOG" &
    RELAY_PID=$!
    RELAY_ADDR=""
    local line
    for _ in $(seq 100); do
        line="$(grep -m1 'remote-relay: listening on ' "$RELAY_LOG" 2>/dev/null)"
        if [[ -n $line ]]; then
            RELAY_ADDR="$(sed -E 's/.*listening on ([^ ]+) .*/\1/' <<<"$line")"
            break
        fi
        kill -0 "$RELAY_PID" 2>/dev/null || break
        sleep 0.1
    done
    [[ -n $RELAY_ADDR ]] || { cat "$RELAY_LOG" >&2; die "remote-relay did not start (log above)"; }
    log "remote-relay #$RELAY_N listening on $RELAY_ADDR (pid $RELAY_PID${1:+; $*})"
}
stop_relay() {
    local rc
    if ! kill -0 "$RELAY_PID" 2>/dev/null; then
        wait "$RELAY_PID" 2>/dev/null; rc=$?
        note "relay #$RELAY_N (pid $RELAY_PID) had already exited (status $rc) before this script stopped it; its log ends: $(tail -2 "$RELAY_LOG" | cut -c1-160 | tr '\n' ' ')"
    else
        stop_pid "$RELAY_PID"; rc=$?
        ((rc == 0)) || note "relay #$RELAY_N: exit status $rc after SIGTERM (expected 0)"
    fi
    # Warnings and errors the relay logged (a tunnel the tool drops on exit is logged at INFO).
    local bad
    bad="$(grep -cE ' (WARN|ERROR) |panicked' "$RELAY_LOG")"
    ((bad == 0)) || note "relay #$RELAY_N logged $bad warning/error line(s), e.g.: $(grep -E ' (WARN|ERROR) |panicked' "$RELAY_LOG" | head -1 | cut -c1-240)"
    RELAY_PID=""
}

# load SUBCOMMAND ARGS...: run the load tool against the current relay; its results go to
# $T/load.out, its progress to our stderr.
load() {
    "$LOAD_BIN" "$1" --relay "$RELAY_ADDR" --data-dir "$DATA" --enrol-concurrency "$CONCURRENCY" "${@:2}" \
        </dev/null >"$T/load.out" &
    LOAD_PID=$!
    wait "$LOAD_PID"; local rc=$?
    LOAD_PID=""
    return "$rc"
}

LOAD_START="$(cut -d' ' -f1-3 /proc/loadavg)"
DATE_START="$(date '+%Y-%m-%d %H:%M:%S %Z')"
mkdir -m 700 "$DATA"
put concurrency "$CONCURRENCY"

# ---------------------------------------------------------------- 1. idle tunnels
if part 1; then
    start_relay
    log "part 1: enrolling $TUNNELS agents ($CONCURRENCY at once)"
    if load enrol --count "$TUNNELS"; then
        absorb e_ "$T/load.out"
        put enrol_rss_mib "$(awk -v k="$(rss_kib "$RELAY_PID")" 'BEGIN{printf "%.0f", k/1024}')"
    else
        note "enrolment of $TUNNELS agents failed (relay-load exit status $?)"
    fi
    stop_relay

    # tunnels PREFIX [VAR=VALUE]: one measured run on a fresh relay process.
    tunnels() {
        local prefix="$1"; shift
        start_relay "$@"
        log "part 1 ($prefix): $TUNNELS tunnels, $WARMUP of them before the baseline, then idle ${IDLE_SECS}s"
        if load tunnels --count "$TUNNELS" --warmup "$WARMUP" --concurrency "$CONCURRENCY" \
            --relay-pid "$RELAY_PID" --idle-secs "$IDLE_SECS"; then
            absorb "$prefix" "$T/load.out"
        else
            absorb "$prefix" "$T/load.out"
            note "part 1 ($prefix): relay-load tunnels failed (see its messages above)"
        fi
        stop_relay
    }
    if [[ -n $(get e_enrolled) ]]; then
        tunnels t_
        if [[ $MALLOC_DIAG == 1 ]]; then tunnels d_ "$DIAG_ENV"; fi
    fi
fi

# ---------------------------------------------------------------- 2. spill persistence
if part 2 || part 3; then
    start_relay
fi
if part 2; then
    log "part 2: spilling $((SPILL_BYTES >> 20)) MiB in 64 KiB records, 4 per batch, $SPILL_IN_FLIGHT batches in flight"
    cpu0="$(cpu_secs "$RELAY_PID")"
    if load spill --bytes "$SPILL_BYTES" --record-bytes "$RECORD_BYTES" --batch-records 4 \
        --in-flight "$SPILL_IN_FLIGHT"; then
        absorb s_ "$T/load.out"
        put spill_relay_cpu "$(awk -v a="$cpu0" -v b="$(cpu_secs "$RELAY_PID")" 'BEGIN{printf "%.2f", b-a}')"
        put spill_relay_rss_mib "$(awk -v k="$(rss_kib "$RELAY_PID")" 'BEGIN{printf "%.0f", k/1024}')"
        put spill_db_mib "$(du -sm "$DATA" | cut -f1)"
    else
        absorb s_ "$T/load.out"
        note "part 2: relay-load spill failed (see its messages above)"
    fi
    # Reference: the file system under the store, written sequentially and synced.
    dd_out="$(dd if=/dev/zero of="$DATA/dd.tmp" bs=1M count=$((SPILL_BYTES >> 20)) conv=fdatasync 2>&1 | tail -1)"
    rm -f "$DATA/dd.tmp"
    dd_bytes="$(awk '{print $1}' <<<"$dd_out")"
    dd_secs="$(sed -E 's/.*copied, ([0-9.]+) s.*/\1/' <<<"$dd_out")"
    put dd_mbs "$(awk -v b="$dd_bytes" -v s="$dd_secs" 'BEGIN{ if (s > 0) printf "%.0f", b/1e6/s; else print "nan" }')"
fi

# ---------------------------------------------------------------- 3. attach latency
if part 3; then
    ssh-keygen -q -t ed25519 -N '' -C bench-relay -f "$T/client_key" || die "ssh-keygen failed"
    KEY="$T/client_key"
    mkdir -m 700 "$T/agent-state"
    "$AGENT_BIN" user add "$ACCOUNT" --admin --authorized-key "$KEY.pub" --run-as "$OS_USER" \
        --state-dir "$T/agent-state" </dev/null >"$T/useradd.log" 2>&1 \
        || { cat "$T/useradd.log" >&2; die "remote-agent user add failed"; }
    JOIN="$("$RELAY_BIN" token create --agent --data-dir "$DATA" </dev/null 2>"$T/token.err" | tail -1)"
    [[ $JOIN == rj_* ]] || { cat "$T/token.err" >&2; die "remote-relay token create failed"; }
    UTOKEN="$("$RELAY_BIN" user add "$ACCOUNT" --data-dir "$DATA" </dev/null 2>"$T/user.err" | tail -1)"
    [[ $UTOKEN == ru_* ]] || { cat "$T/user.err" >&2; die "remote-relay user add $ACCOUNT failed"; }
    "$AGENT_BIN" run --state-dir "$T/agent-state" --ssh 127.0.0.1:0 --socket off \
        --winrm-http off --winrm-https off --relay "$RELAY_ADDR" --join-token "$JOIN" --name bench1 \
        </dev/null 2>"$T/agent.log" &
    AGENT_PID=$!
    SSH_PORT=""
    for _ in $(seq 100); do
        if [[ -z $SSH_PORT ]]; then
            SSH_PORT="$(sed -nE 's/.*ssh listening on 127\.0\.0\.1:([0-9]+).*/\1/p' "$T/agent.log" | head -1)"
        fi
        [[ -n $SSH_PORT ]] && grep -q 'tunnel up' "$T/agent.log" && break
        kill -0 "$AGENT_PID" 2>/dev/null || break
        sleep 0.1
    done
    grep -q 'tunnel up' "$T/agent.log" && [[ -n $SSH_PORT ]] \
        || { cat "$T/agent.log" >&2; die "remote-agent did not start or did not reach the relay (log above)"; }
    log "remote-agent bench1: ssh on 127.0.0.1:$SSH_PORT, tunnel up to $RELAY_ADDR (pid $AGENT_PID)"

    export XDG_CONFIG_HOME="$T/client-config"
    unset SSH_AUTH_SOCK REMOTE_RELAY REMOTE_TOKEN
    # The relay's self-signed certificate is trusted on first contact only for listed hosts.
    mkdir -p "$XDG_CONFIG_HOME/remote" && echo 127.0.0.1 >"$XDG_CONFIG_HOME/remote/trusted_hosts"
    via_relay() { REMOTE_RELAY="$RELAY_ADDR" REMOTE_TOKEN="$UTOKEN" "$@"; }
    direct_target="$ACCOUNT@127.0.0.1:$SSH_PORT"
    : >"$T/echo-relay"; : >"$T/echo-direct"
    echo_fail=0
    # echo_one PATH SID: one round of keys on one path; samples appended to $T/echo-PATH.
    echo_one() {
        local path="$1" sid="$2" cmd out p50 p90 mn mx n failed rest
        if [[ $path == relay ]]; then
            cmd=(env REMOTE_RELAY="$RELAY_ADDR" REMOTE_TOKEN="$UTOKEN" "$CLIENT_BIN" --batch attach "$sid")
        else
            cmd=("$CLIENT_BIN" --batch --identity "$KEY" attach "$direct_target/$sid")
        fi
        read -r p50 p90 mn mx n failed rest < <("$PY" "$SESSIONS_HELPER" echo --keys "$KEYS" --warmup 20 \
            --gap "$KEY_GAP_MS" --samples "$T/echo-round" --log "$T/echo-$path.log" --quit remote -- "${cmd[@]}")
        log "echo via $path (session $sid): p50 $p50 p90 $p90 min $mn max $mx ms (n $n, failed $failed) $rest"
        cat "$T/echo-round" >>"$T/echo-$path" 2>/dev/null
        if [[ $n != "$KEYS" || $failed != 0 ]]; then
            echo_fail=$((echo_fail + 1))
            note "echo via $path: $n of $KEYS keys echoed, $failed timed out: $rest"
        fi
        [[ $rest == "exit=0" ]] || note "remote attach ($path) did not end cleanly after Enter ~ . ($rest)"
    }
    for ((round = 1; round <= ECHO_ROUNDS; round++)); do
        SID="$(TERM=xterm via_relay "$CLIENT_BIN" --batch session new relay://bench1 --terminal </dev/null 2>"$T/term-new.err" | tail -1)"
        if [[ ! $SID =~ ^[0-9a-f]{16}$ ]]; then
            note "\`remote session new relay://bench1 --terminal\` failed: $(tail -1 "$T/term-new.err")"
            echo_fail=$((echo_fail + 1))
            break
        fi
        if ((round % 2 == 1)); then echo_one direct "$SID"; echo_one relay "$SID"
        else echo_one relay "$SID"; echo_one direct "$SID"; fi
        via_relay "$CLIENT_BIN" --batch session rm "$SID" </dev/null >/dev/null 2>>"$T/term-new.err" \
            || note "remote session rm $SID (through the relay) failed: $(tail -1 "$T/term-new.err")"
    done
    for path in relay direct; do
        read -r p50 mn p90 mx n < <("$PY" "$SESSIONS_HELPER" stats <"$T/echo-$path")
        put "echo_${path}_p50" "$p50"; put "echo_${path}_p90" "$p90"
        put "echo_${path}_min" "$mn"; put "echo_${path}_max" "$mx"; put "echo_${path}_n" "$n"
    done
    put echo_keys "$((KEYS * ECHO_ROUNDS))"; put echo_ok "$((echo_fail == 0))"
    stop_pid "$AGENT_PID" || note "agent: non-zero exit status after SIGTERM"
    AGENT_PID=""
fi
if part 2 || part 3; then
    stop_relay
fi

# ---------------------------------------------------------------- report
bin_info() { echo "\`$1\` ($("$1" --version 2>&1 | head -1), sha256 $(sha256sum "$1" | cut -c1-16)…, built $(date -r "$1" '+%Y-%m-%d %H:%M:%S %Z'))"; }
echo
echo "## remote-relay benchmark (loopback, one run)"
echo
echo "- date: $DATE_START"
echo "- relay: $(bin_info "$RELAY_BIN")"
echo "- load tool: $(bin_info "$LOAD_BIN")"
if part 3; then
    echo "- agent: $(bin_info "$AGENT_BIN")"
    echo "- client: $(bin_info "$CLIENT_BIN")"
fi
echo "- nproc: $(nproc); $(awk '/MemTotal/{printf "%.1f GiB RAM", $2/1048576}' /proc/meminfo); kernel $(uname -r); glibc $(ldd --version 2>&1 | head -1 | awk '{print $NF}'); load average (1/5/15 min) at start $LOAD_START, at end $(cut -d' ' -f1-3 /proc/loadavg)"
echo "- data dir on $(df -T "$T" | awk 'NR==2{print $2" ("$1")"}'); open file limit $FDS per process"
echo
"$PY" "$HELPER" table "$RES"
echo
echo "Details:"
if part 1 && [[ -n $(get t_count) ]]; then
    echo "- part 1: $(get t_count) simulated agents, each its own TCP + TLS tunnel connection (TunnelOpen, AgentHello, RelayHello, then idle; the tool sends a Keepalive every 30 s and the relay echoes it); $CONCURRENCY connection set-ups at once; the first $(get t_warmup) before the baseline reading"
    echo "- relay VmRSS in KiB: fresh process $(get t_relay_rss_start_kib), with $(get t_warmup) tunnels $(get t_relay_rss_before_kib), with $(get t_up_after_idle) tunnels idle ${IDLE_SECS} s $(get t_relay_rss_after_kib); tunnels up $(get t_connected), failed $(get t_failed), dropped while idle $(get t_dropped)"
    echo "- the enrolling relay process (argon2 check of the join token and hash of the new credential per agent) ended at $(get enrol_rss_mib) MiB RSS"
    if [[ -n $(get d_count) ]]; then
        echo "- diagnosis run ($DIAG_ENV): relay VmRSS in KiB: fresh $(get d_relay_rss_start_kib), with $(get d_warmup) tunnels $(get d_relay_rss_before_kib), with $(get d_up_after_idle) tunnels $(get d_relay_rss_after_kib); connecting took $(get d_connect_secs) s"
    fi
    echo "- relay-load's own RSS with every tunnel up: $(get t_tool_rss_kib) KiB ($(get t_tool_kib_per_tunnel) KiB per tunnel)"
fi
if part 2 && [[ -n $(get s_spill_secs) ]]; then
    echo "- part 2: session $(get s_spill_session): $(get s_spill_records) records of $(get s_spill_record_bytes) bytes in $(get s_spill_batches) SpillBatch messages, $(get s_spill_in_flight) in flight, in $(get s_spill_secs) s; the store holds every record afterwards (stored_seq $(get s_spill_stored_seq)); relay CPU $(get spill_relay_cpu) s (user+sys), relay RSS after $(get spill_relay_rss_mib) MiB, data dir $(get spill_db_mib) MiB"
fi
if part 3 && [[ -n $(get echo_keys) ]]; then
    echo "- part 3: one remote-agent (--relay $RELAY_ADDR, --name bench1; SSH on 127.0.0.1:$SSH_PORT); account $ACCOUNT runs as OS user $OS_USER (login shell $OS_SHELL); relay user $ACCOUNT; $ECHO_ROUNDS rounds, each on a new terminal session opened through the relay, attached directly then through the relay (order alternating by round)"
    echo "- keystroke echo in ms (min / p50 / p90 / max, $(get echo_keys) keys each): through the relay $(get echo_relay_min) / $(get echo_relay_p50) / $(get echo_relay_p90) / $(get echo_relay_max); direct $(get echo_direct_min) / $(get echo_direct_p50) / $(get echo_direct_p90) / $(get echo_direct_max)"
    echo "  (letters typed one at a time ${KEY_GAP_MS} ms apart into the shell at its prompt, ^U every 50; each timed from write() on the pty master to reading the echo back)"
fi
if ((${#NOTES[@]})); then
    echo
    echo "Notes (anomalies seen in this run):"
    for n in "${NOTES[@]}"; do echo "- $n"; done
fi
