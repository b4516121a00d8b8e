#!/usr/bin/env bash
# Benchmark remote-agent's persistent sessions and the `remote` client, on loopback.
#
# Starts one private remote-agent on 127.0.0.1 (own temp state dir and config, an account
# with a fresh ed25519 key that runs as the OS user remote-bench, whose login shell is
# /bin/sh), and prints one Markdown table with the numbers of this one run:
#   1. replay rate: a commands session's journal filled with BENCH_REPLAY_BYTES of output
#      (`remote exec --detach S -- 'head -c N /dev/zero'`), then `remote receive S > /dev/null`
#      timed -> MB/s (target >= 500); the agent's RSS with the full journal
#   2. keystroke echo round trip through `remote attach` to a terminal session in a pty,
#      p50/p90 (target p50 <= 1 ms), and the same through OpenSSH's `ssh -tt` shell on the
#      same agent for reference
#   3. fan-out: `remote run --throttle 32` on the same target listed 200 times vs
#      `seq 200 | xargs -P 32 ssh … true`, median wall time of 3 each (target: >= 3x faster)
# Each is printed beside its target with whether it is met. Numbers are printed as
# measured; nothing is adjusted. The order of measurement is 3, 2, 1: the replay leaves the
# agent with a large heap, which makes every later process start slower (see Details).
#
# Usage: tests/bench/sessions.sh     (as root; needs ssh, ssh-keygen, useradd, python3)
# Build first: cargo build --release -p remote-agent -p remote-client
# Environment:
#   BENCH_AGENT_BIN     agent binary (default <repo>/target/release/remote-agent)
#   BENCH_CLIENT_BIN    client binary (default <repo>/target/release/remote)
#   BENCH_REPLAY_BYTES  output replayed (default 1073741824 = 1 GiB)
#   BENCH_REPLAY_RUNS   replay runs (fill + timed receive); the median is reported (default 3)
#   BENCH_KEYS          timed keystrokes per path (default 300; plus 20 warm-up keys)
#   BENCH_KEY_GAP_MS    pause between keystrokes (default 20)
#   BENCH_FANOUT        targets in the fan-out (default 200)
#   BENCH_THROTTLE      parallel connections in the fan-out (default 32)
#   BENCH_FANOUT_RUNS   timed fan-out runs per tool; the median is reported (default 3)
#   BENCH_STALL_SECS    a fill or a receive that makes no progress this long has stalled (default 20)
#   BENCH_OS_USER       OS user the account runs as (default remote-bench; created if missing)

set -uo pipefail
export LC_ALL=C

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
HELPER="$HERE/sessions_helper.py"

AGENT_BIN="${BENCH_AGENT_BIN:-$REPO/target/release/remote-agent}"
CLIENT_BIN="${BENCH_CLIENT_BIN:-$REPO/target/release/remote}"
REPLAY_BYTES="${BENCH_REPLAY_BYTES:-1073741824}"
REPLAY_RUNS="${BENCH_REPLAY_RUNS:-3}"
KEYS="${BENCH_KEYS:-300}"
KEY_GAP_MS="${BENCH_KEY_GAP_MS:-20}"
FANOUT="${BENCH_FANOUT:-200}"
THROTTLE="${BENCH_THROTTLE:-32}"
FANOUT_RUNS="${BENCH_FANOUT_RUNS:-3}"
STALL_SECS="${BENCH_STALL_SECS:-20}"
OS_USER="${BENCH_OS_USER:-remote-bench}"
ACCOUNT="$OS_USER"   # the agent account has the OS user's name and runs as that user
LAT_RUNS=10          # runs of the `remote run TARGET -- true` latency probes (details only)

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf 'sessions.sh: %s\n' "$*" >&2; exit 1; }
# shellcheck source=benchlib.sh
. "$HERE/benchlib.sh"

for v in REPLAY_BYTES REPLAY_RUNS KEYS KEY_GAP_MS FANOUT THROTTLE FANOUT_RUNS STALL_SECS; do
    [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer (got '${!v}')"
done
((REPLAY_BYTES % 1048576 == 0)) || die "BENCH_REPLAY_BYTES must be a whole number of MiB"

# ---------------------------------------------------------------- prerequisites
[[ $(id -u) -eq 0 ]] || die "run as root: the agent account runs as OS user $OS_USER (run_as needs root)"
command -v ssh >/dev/null && command -v ssh-keygen >/dev/null \
    || die "OpenSSH client not found (ssh, ssh-keygen). Install it: apt-get install openssh-client"
command -v xargs >/dev/null || die "xargs not found. Install it: apt-get install findutils"
# The system python, not a pyenv shim (which costs ~100 ms per start and may be another version).
if [[ -x /usr/bin/python3 ]]; then PY=/usr/bin/python3; else PY="$(command -v python3)" || die "python3 not found (needed for $HELPER)"; fi
"$PY" -c 'import os; os.pidfd_open' 2>/dev/null || die "$PY lacks os.pidfd_open (Python >= 3.9 on Linux >= 5.3 needed)"
[[ -x $AGENT_BIN ]] || die "agent binary $AGENT_BIN not found. Build it: (cd $REPO && cargo build --release -p remote-agent -p remote-client)"
[[ -x $CLIENT_BIN ]] || die "client binary $CLIENT_BIN not found. Build it: (cd $REPO && cargo build --release -p remote-agent -p remote-client)"
ensure_os_user "$OS_USER"
OS_SHELL="$(getent passwd "$OS_USER" | cut -d: -f7)"

# ---------------------------------------------------------------- state and teardown
T="$(mktemp -d /tmp/bench-sessions.XXXXXX)"
chmod 700 "$T"
AGENT_PID=""
BG_PIDS=()
RES="$T/results"
NOTES=()
: >"$RES"

cleanup() {
    set +e
    local p
    for p in "${BG_PIDS[@]}"; do kill "$p" 2>/dev/null; done
    for p in "${BG_PIDS[@]}"; do wait "$p" 2>/dev/null; done
    if [[ -n $AGENT_PID ]] && kill -0 "$AGENT_PID" 2>/dev/null; then
        kill -TERM "$AGENT_PID"
        for _ in $(seq 100); do kill -0 "$AGENT_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$AGENT_PID" 2>/dev/null
        wait "$AGENT_PID" 2>/dev/null
    fi
    rm -rf "$T"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

put() { printf '%s=%s\n' "$1" "$2" >>"$RES"; }
get() { sed -n "s/^$1=//p" "$RES" | tail -1; }
note() { NOTES+=("$*"); log "NOTE: $*"; }
now_us() { local t="$EPOCHREALTIME"; echo "${t/./}"; }
secs_since() { awk -v a="$1" -v b="$(now_us)" 'BEGIN{printf "%.3f", (b-a)/1e6}'; }
agent_rss() { "$PY" "$HELPER" rss "$AGENT_PID" 2>/dev/null; }
kib_to_mib() { awk -v k="$1" 'BEGIN{printf "%.1f", k/1024}'; }

LOAD_START="$(cut -d' ' -f1-3 /proc/loadavg)"
DATE_START="$(date '+%Y-%m-%d %H:%M:%S %Z')"

# ---------------------------------------------------------------- key, agent, account
ssh-keygen -q -t ed25519 -N '' -C bench-sessions -f "$T/client_key" || die "ssh-keygen failed"
KEY="$T/client_key"

# max_startups 300: the fan-out opens up to 32 (BENCH_THROTTLE) connections at once from
# either tool; neither may be refused. journal_mb stays the default; the replay session asks
# for its own size with --journal-mb. The default endpoint (admins) lets a command print
# 2 GiB instead of its default 50 MB, or the replay's 1 GiB command would be stopped at 50 MB.
cat >"$T/agent.toml" <<EOF
[ssh]
max_startups = 300
max_connections = 4096

[endpoints.default]
groups = ["admins"]
max_received_mb_per_command = 2048
EOF
mkdir -m 700 "$T/agent-state"
"$AGENT_BIN" user add "$ACCOUNT" --admin --authorized-key "$KEY.pub" --run-as "$OS_USER" \
    --config "$T/agent.toml" --state-dir "$T/agent-state" </dev/null >"$T/useradd.log" 2>&1 \
    || { cat "$T/useradd.log" >&2; die "remote-agent user add failed"; }
"$AGENT_BIN" run --config "$T/agent.toml" --state-dir "$T/agent-state" --ssh 127.0.0.1:0 \
    --socket "$T/agent-state/agent.sock" </dev/null 2>"$T/agent.log" &
AGENT_PID=$!
PORT=""
for _ in $(seq 100); do
    line="$(grep -m1 'remote-agent: ssh listening on 127.0.0.1:' "$T/agent.log" 2>/dev/null)"
    if [[ -n $line ]]; then
        PORT="$(sed -E 's/.*listening on 127\.0\.0\.1:([0-9]+).*/\1/' <<<"$line")"
        break
    fi
    kill -0 "$AGENT_PID" 2>/dev/null || break
    sleep 0.1
done
[[ -n $PORT ]] || { cat "$T/agent.log" >&2; die "remote-agent did not start (log above)"; }
TARGET="$ACCOUNT@127.0.0.1:$PORT"
log "remote-agent listening on 127.0.0.1:$PORT (pid $AGENT_PID); target $TARGET"
put agent_rss_start_mib "$(kib_to_mib "$(agent_rss)")"

# The client: its own config dir (host keys learned on first contact, session records), only
# our key (no ssh-agent), never a prompt.
export XDG_CONFIG_HOME="$T/client-config"
unset SSH_AUTH_SOCK
remote() { "$CLIENT_BIN" --batch --identity "$KEY" "$@"; }
SSH=(ssh -F /dev/null -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null
     -o BatchMode=yes -o LogLevel=ERROR -i "$KEY" -p "$PORT")

# First contact (records the host key), and both tools reach the account as the OS user.
who_remote="$(remote run "$TARGET" -- 'id -un; echo "$SHELL"' </dev/null 2>"$T/check.err" | tr '\n' ' ')"
who_ssh="$("${SSH[@]}" "$ACCOUNT@127.0.0.1" 'id -un; echo "$SHELL"' </dev/null 2>>"$T/check.err" | tr '\n' ' ')"
expect="$OS_USER $OS_SHELL "
if [[ $who_remote != "$expect" || $who_ssh != "$expect" ]]; then
    cat "$T/check.err" >&2; tail -20 "$T/agent.log" >&2
    die "cannot run commands as $OS_USER through the agent (remote: '$who_remote', ssh: '$who_ssh', expected '$expect')"
fi
[[ $OS_SHELL == /bin/sh ]] || note "OS user $OS_USER has login shell $OS_SHELL, not /bin/sh: shell start-up is part of every number"

# Exec latency probe (details only): `remote run TARGET -- true`, LAT_RUNS times.
exec_probe() {   # exec_probe KEY
    local i t0 f="$T/lat-$1" fails=0
    : >"$f"
    for ((i = 0; i < LAT_RUNS; i++)); do
        t0="$(now_us)"
        if remote run "$TARGET" -- true </dev/null >/dev/null 2>>"$T/lat.err"; then
            awk -v a="$t0" -v b="$(now_us)" 'BEGIN{printf "%.3f\n", (b-a)/1e3}' >>"$f"
        else
            fails=$((fails + 1))
        fi
    done
    read -r p50 _ < <("$PY" "$HELPER" stats <"$f")
    put "lat_$1_ms" "$p50"
    ((fails == 0)) || note "exec probe '$1': $fails of $LAT_RUNS runs of \`remote run TARGET -- true\` failed"
    log "exec probe $1: \`remote run TARGET -- true\` p50 $p50 ms (agent RSS $(kib_to_mib "$(agent_rss)") MiB)"
}
remote run "$TARGET" -- true </dev/null >/dev/null 2>&1   # warm-up (page cache)
exec_probe fresh
put agent_rss_fresh_mib "$(kib_to_mib "$(agent_rss)")"

# ---------------------------------------------------------------- 3. fan-out
# The same target FANOUT times: one agent listens on one address. Interleaved runs, tool
# order alternating. A run counts only if every target succeeded: `remote run` exits 0 and
# reports "exit 0" for every target; xargs exits 0 only if every ssh exited 0.
TARGETS="$(printf "$TARGET,%.0s" $(seq "$FANOUT"))"; TARGETS="${TARGETS%,}"
log "fan-out: $FANOUT targets, throttle $THROTTLE, $FANOUT_RUNS runs per tool"
: >"$T/fan-remote"; : >"$T/fan-ssh"
fan_fail=0
fan_remote() {
    local t0 rc secs ok
    t0="$(now_us)"
    remote run --throttle "$THROTTLE" "$TARGETS" -- true </dev/null >"$T/fan-remote.out" 2>"$T/fan-remote.err"
    rc=$?
    secs="$(secs_since "$t0")"
    ok="$(grep -c ': exit 0$' "$T/fan-remote.err")"
    log "fan-out remote run: ${secs}s, exit $rc, $ok/$FANOUT targets 'exit 0'"
    if ((rc == 0 && ok == FANOUT)); then
        echo "$secs" >>"$T/fan-remote"
    else
        fan_fail=$((fan_fail + 1))
        note "fan-out remote run: exit $rc, $ok of $FANOUT targets reported exit 0; stderr: $(grep -v ': exit 0$' "$T/fan-remote.err" | sort | uniq -c | sort -rn | head -3 | tr '\n' ';')"
    fi
}
fan_ssh() {
    local t0 rc secs
    t0="$(now_us)"
    # GNU xargs gives each ssh /dev/null as stdin.
    seq "$FANOUT" | xargs -P "$THROTTLE" -I{} "${SSH[@]}" "$ACCOUNT@127.0.0.1" true >"$T/fan-ssh.out" 2>"$T/fan-ssh.err"
    rc=$?
    secs="$(secs_since "$t0")"
    log "fan-out ssh/xargs: ${secs}s, xargs exit $rc"
    if ((rc == 0)); then
        echo "$secs" >>"$T/fan-ssh"
    else
        fan_fail=$((fan_fail + 1))
        note "fan-out ssh/xargs: xargs exit $rc (123: some ssh failed); stderr: $(sort "$T/fan-ssh.err" | uniq -c | sort -rn | head -3 | tr '\n' ';')"
    fi
}
refused_before="$(grep -ciE 'refus|max_startups|too many' "$T/agent.log")"
for ((i = 0; i < FANOUT_RUNS; i++)); do
    if ((i % 2 == 0)); then fan_remote; fan_ssh; else fan_ssh; fan_remote; fi
done
refused="$(( $(grep -ciE 'refus|max_startups|too many' "$T/agent.log") - refused_before ))"
((refused == 0)) || note "agent log: $refused line(s) about refused connections during the fan-out, e.g. $(grep -iE 'refus|max_startups|too many' "$T/agent.log" | tail -1 | cut -c1-200)"
read -r med mn _ mx n < <("$PY" "$HELPER" stats <"$T/fan-remote")
put fan_remote_s "$med"; put fan_remote_min "$mn"; put fan_remote_max "$mx"; put fan_remote_ok "$n"
read -r med mn _ mx n < <("$PY" "$HELPER" stats <"$T/fan-ssh")
put fan_ssh_s "$med"; put fan_ssh_min "$mn"; put fan_ssh_max "$mx"; put fan_ssh_ok "$n"
put fan_n "$FANOUT"; put fan_throttle "$THROTTLE"; put fan_runs "$FANOUT_RUNS"; put fan_refused "$refused"
((fan_fail == 0 && refused == 0)) && put fan_all_ok 1 || put fan_all_ok 0

# ---------------------------------------------------------------- 2. keystroke echo
# `remote attach` to a terminal session, inside a pty the helper owns; then the reference:
# OpenSSH's `ssh -tt` interactive shell on the same agent, same account, same login shell.
log "keystroke echo: $KEYS keys per path (after 20 warm-up keys), ${KEY_GAP_MS} ms apart"
TERM_SID="$(TERM=xterm remote session new "$TARGET" --terminal </dev/null 2>"$T/term-new.err" | tail -1)"
if [[ -z $TERM_SID ]]; then
    note "remote session new --terminal failed: $(head -1 "$T/term-new.err")"
    put echo_remote_p50_err "FAILED (no terminal session)"; put echo_remote_p90_err "FAILED"
else
    read -r p50 p90 mn mx n failed rest < <("$PY" "$HELPER" echo --keys "$KEYS" --warmup 20 \
        --gap "$KEY_GAP_MS" --samples "$T/echo-remote" --log "$T/echo-remote.log" --quit remote \
        -- "$CLIENT_BIN" --batch --identity "$KEY" attach "$TARGET/$TERM_SID")
    log "echo via remote attach: p50 $p50 p90 $p90 min $mn max $mx ms (n $n, failed $failed) $rest"
    put echo_remote_min "$mn"; put echo_remote_max "$mx"; put echo_remote_n "$n"
    if [[ $n == "$KEYS" && $failed == 0 ]]; then
        put echo_remote_p50 "$p50"; put echo_remote_p90 "$p90"
    else
        put echo_remote_p50_err "FAILED ($n of $KEYS echoed)"; put echo_remote_p90_err "FAILED"
        note "echo via remote attach: $n of $KEYS keys echoed, $failed timed out: $rest"
    fi
    [[ $rest == "exit=0" ]] || note "remote attach did not end cleanly after Enter ~ . ($rest)"
    remote session rm "$TARGET/$TERM_SID" </dev/null >/dev/null 2>>"$T/term-new.err" \
        || note "remote session rm of the terminal session failed"
fi
read -r p50 p90 mn mx n failed rest < <("$PY" "$HELPER" echo --keys "$KEYS" --warmup 20 \
    --gap "$KEY_GAP_MS" --samples "$T/echo-ssh" --log "$T/echo-ssh.log" --quit ssh \
    -- "${SSH[@]}" -tt "$ACCOUNT@127.0.0.1")
log "echo via ssh -tt: p50 $p50 p90 $p90 min $mn max $mx ms (n $n, failed $failed) $rest"
put echo_ssh_min "$mn"; put echo_ssh_max "$mx"; put echo_keys "$KEYS"
if [[ $n == "$KEYS" && $failed == 0 ]]; then
    put echo_ssh_p50 "$p50"; put echo_ssh_p90 "$p90"
else
    put echo_ssh_p50_err "FAILED ($n of $KEYS echoed)"; put echo_ssh_p90_err "FAILED"
    note "echo via ssh -tt: $n of $KEYS keys echoed, $failed timed out: $rest"
fi

# ---------------------------------------------------------------- 1. replay
# fill BYTES JOURNAL_MB: a commands session with that journal, filled by one detached command,
# polled with `remote session list` until its COMMANDS column is 0. A fill whose command is
# still running while the agent's RSS has not grown for STALL_SECS is stalled: the journal is
# full (block mode), i.e. the agent granted less than was asked.
# Sets SID, FILL_SECS; returns 0 (done), 1 (stalled), 2 (error).
fill() {
    local bytes="$1" jmb="$2" t0 cmds rss last_rss last_change
    SID="$(remote session new "$TARGET" --journal-mb "$jmb" </dev/null 2>"$T/fill.err" | tail -1)"
    [[ -n $SID ]] || { note "remote session new --journal-mb $jmb failed: $(head -1 "$T/fill.err")"; return 2; }
    t0="$(now_us)"
    if ! remote exec --detach "$TARGET/$SID" -- "head -c $bytes /dev/zero" </dev/null >/dev/null 2>>"$T/fill.err"; then
        note "remote exec --detach failed: $(tail -1 "$T/fill.err")"; return 2
    fi
    last_rss="$(agent_rss)"; last_change="$SECONDS"
    while :; do
        cmds="$(remote session list "$TARGET" </dev/null 2>>"$T/fill.err" | awk -v id="$SID" '$1 == id {print $6}')"
        if [[ $cmds == 0 ]]; then FILL_SECS="$(secs_since "$t0")"; return 0; fi
        [[ -n $cmds ]] || { note "session $SID is not in \`remote session list\`: $(tail -1 "$T/fill.err")"; return 2; }
        rss="$(agent_rss)"
        if ((rss > last_rss + 1024)); then last_rss="$rss"; last_change="$SECONDS"; fi
        if ((SECONDS - last_change >= STALL_SECS)); then FILL_SECS="$(secs_since "$t0")"; return 1; fi
        sleep 0.2
    done
}
mib=$((REPLAY_BYTES / 1048576))
# Room for the journal's per-record accounting (64 bytes per record of up to 64 KiB: < 1 %).
jmb=$((mib + mib / 32 + 16))
put replay_rss_before_mib "$(kib_to_mib "$(agent_rss)")"
: >"$T/replay-mbs"; : >"$T/replay-runs"
replay_stalled=0; replay_failed=0
for ((run = 1; run <= REPLAY_RUNS; run++)); do
    log "replay run $run/$REPLAY_RUNS: filling a commands session with $mib MiB of output in a $jmb MiB journal"
    fill "$REPLAY_BYTES" "$jmb"; frc=$?
    if ((frc == 1 && run == 1 && jmb > 1024)); then
        note "replay: the fill of $mib MiB into a session opened with --journal-mb $jmb stalled at agent RSS $(kib_to_mib "$(agent_rss)") MiB after ${FILL_SECS}s: the agent caps journals below that; falling back to 1000 MiB of output in a 1024 MiB journal"
        remote session rm "$TARGET/$SID" </dev/null >/dev/null 2>&1
        REPLAY_BYTES=$((1000 * 1048576)); mib=1000; jmb=1024
        fill "$REPLAY_BYTES" "$jmb"; frc=$?
    fi
    if ((frc != 0)); then
        ((frc == 1)) && note "replay run $run: the fill ($mib MiB in a $jmb MiB journal) stalled after ${FILL_SECS}s"
        replay_failed=$((replay_failed + 1))
        [[ -n $SID ]] && remote session rm "$TARGET/$SID" </dev/null >/dev/null 2>&1
        break
    fi
    sleep 1   # let the allocator settle before reading RSS
    rss_full="$(agent_rss)"
    log "replay run $run: filled in ${FILL_SECS}s (polling every 0.2 s); agent RSS $(kib_to_mib "$rss_full") MiB"
    if ((run == 1)); then
        put replay_fill_s "$FILL_SECS"; put replay_rss_full_mib "$(kib_to_mib "$rss_full")"
        exec_probe full
    fi
    # The timed replay. The helper forks the client (stdout /dev/null), takes the time at its
    # exit through a pidfd, and reads how much it wrote from /proc/PID/io before reaping it.
    acpu0="$("$PY" "$HELPER" cpu "$AGENT_PID")"
    read -r rc secs wrote stalled cu cs < <("$PY" "$HELPER" timed --stall "$STALL_SECS" --stderr "$T/receive.err" \
        -- "$CLIENT_BIN" --batch --identity "$KEY" receive "$TARGET/$SID")
    acpu="$(awk -v a="$acpu0" -v b="$("$PY" "$HELPER" cpu "$AGENT_PID")" 'BEGIN{printf "%.2f", b-a}')"
    rc="${rc:-255}"; secs="${secs:-nan}"; wrote="${wrote:-0}"; stalled="${stalled:-0}"
    cpu_note="CPU: client ${cu}s user + ${cs}s sys, agent ${acpu}s (user+sys)"
    log "replay run $run: remote receive exit $rc in ${secs}s, wrote $wrote bytes, stalled=$stalled; $cpu_note"
    if ((stalled)); then
        replay_stalled=$((replay_stalled + 1))
        echo "run $run: STALLED: no progress for ${STALL_SECS} s after writing $wrote of $REPLAY_BYTES bytes (killed after $secs s); $cpu_note" >>"$T/replay-runs"
        note "replay run $run: \`remote receive\` stopped making progress after writing $wrote of $REPLAY_BYTES bytes; killed after $secs s (the last ${STALL_SECS} s without progress). stderr: $(tail -2 "$T/receive.err" | tr '\n' ' ')"
    elif ((rc != 0)) || ((wrote < REPLAY_BYTES || wrote >= REPLAY_BYTES + 65536)); then
        # A short (or long) output is a failed run, never a rate: the rate is of all the bytes.
        replay_failed=$((replay_failed + 1))
        echo "run $run: FAILED: exit $rc after writing $wrote of $REPLAY_BYTES bytes in $secs s" >>"$T/replay-runs"
        note "replay run $run: \`remote receive\` exited $rc after writing $wrote of $REPLAY_BYTES bytes: $(tail -2 "$T/receive.err" | tr '\n' ' ')"
    else
        mbs="$(awk -v b="$REPLAY_BYTES" -v s="$secs" 'BEGIN{printf "%.1f", b/1e6/s}')"
        echo "$mbs" >>"$T/replay-mbs"
        echo "run $run: ${secs} s, $mbs MB/s, $wrote bytes written; $cpu_note" >>"$T/replay-runs"
        if [[ -z $(get replay_empty_s) ]]; then
            # A second receive has nothing left to print: the fixed cost (connect, log in, attach).
            read -r rc2 secs2 _ _ < <("$PY" "$HELPER" timed --stall "$STALL_SECS" --stderr "$T/receive.err" \
                -- "$CLIENT_BIN" --batch --identity "$KEY" receive "$TARGET/$SID")
            put replay_empty_s "$secs2"; put replay_empty_rc "$rc2"
        fi
    fi
    remote session rm "$TARGET/$SID" </dev/null >/dev/null 2>>"$T/fill.err" || note "remote session rm of replay session $SID failed"
done
put replay_bytes "$REPLAY_BYTES"; put replay_mib "$mib"; put replay_journal_mb "$jmb"; put replay_runs "$REPLAY_RUNS"
read -r med mn _ mx n < <("$PY" "$HELPER" stats <"$T/replay-mbs")
put replay_ok "$n"; put replay_stalled "$replay_stalled"; put replay_min "$mn"; put replay_max "$mx"
if ((n > 0)); then put replay_mbs_any "$med"; fi
if ((replay_stalled == 0 && replay_failed == 0 && n == REPLAY_RUNS)); then
    put replay_mbs "$med"
elif ((n > 0)); then
    put replay_mbs_err "$(printf '%.0f' "$med") (median of the $n successful runs); $replay_stalled of $REPLAY_RUNS runs stalled"
else
    put replay_mbs_err "FAILED ($replay_stalled of $REPLAY_RUNS runs stalled, $replay_failed failed)"
fi
sleep 2
put replay_rss_after_rm_mib "$(kib_to_mib "$(agent_rss)")"
[[ -n $(get replay_fill_s) ]] && exec_probe after_rm

# ---------------------------------------------------------------- info: fan-out again
# The agent keeps the heap the journals used (freed, not returned to the system); every
# process it starts now forks a large process. One more `remote run` fan-out shows the effect.
if [[ -n $(get replay_fill_s) ]]; then
    log "fan-out once more after the replay (agent RSS $(kib_to_mib "$(agent_rss)") MiB)"
    t0="$(now_us)"
    remote run --throttle "$THROTTLE" "$TARGETS" -- true </dev/null >/dev/null 2>"$T/fan-after.err"; rc=$?
    put fan_after_s "$(secs_since "$t0")"; put fan_after_rc "$rc"
    put fan_after_ok "$(grep -c ': exit 0$' "$T/fan-after.err")"
    put fan_after_rss_mib "$(kib_to_mib "$(agent_rss)")"
    log "fan-out after the replay: $(get fan_after_s)s, exit $rc"
fi

# ---------------------------------------------------------------- stop the agent
kill -TERM "$AGENT_PID"
agent_rc=""
for _ in $(seq 150); do kill -0 "$AGENT_PID" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$AGENT_PID" 2>/dev/null; then
    note "agent: still running 15 s after SIGTERM"
else
    wait "$AGENT_PID"; agent_rc=$?
    AGENT_PID=""
    ((agent_rc == 0)) || note "agent: exit status $agent_rc after SIGTERM (expected 0)"
fi
warn="$(grep -ciE 'panic|error' "$T/agent.log")"
((warn == 0)) || note "agent log has $warn line(s) with 'error'/'panic', e.g.: $(grep -iE 'panic|error' "$T/agent.log" | head -1 | cut -c1-200)"

# ---------------------------------------------------------------- report
bin_info() { echo "\`$1\` ($("$1" --version 2>&1 | head -1), sha256 $(sha256sum "$1" | cut -c1-16)…, built $(date -r "$1" '+%Y-%m-%d %H:%M:%S %Z'))"; }
echo
echo "## remote sessions benchmark (loopback, one run)"
echo
echo "- date: $DATE_START"
echo "- agent: $(bin_info "$AGENT_BIN")"
echo "- client: $(bin_info "$CLIENT_BIN")"
echo "- ssh -V: $(ssh -V 2>&1)"
echo "- nproc: $(nproc); kernel $(uname -r); load average (1/5/15 min) at start $LOAD_START, at end $(cut -d' ' -f1-3 /proc/loadavg)"
echo "- one agent on 127.0.0.1:$PORT (max_startups 300, max_connections 4096); account $ACCOUNT runs as OS user $OS_USER (login shell $OS_SHELL); fresh ed25519 client key"
echo "- measured in the order 3, 2, 1 (the replay leaves the agent with a large heap)"
echo
"$PY" "$HELPER" table "$RES"
echo
echo "Details:"
if [[ -n $(get replay_fill_s) ]]; then
    echo "- replay: each run opens a commands session with \`--journal-mb $(get replay_journal_mb)\`, runs \`remote exec --detach S -- 'head -c $(get replay_bytes) /dev/zero'\` ($(get replay_mib) MiB),"
    echo "  waits for COMMANDS 0 in \`remote session list\` (first run: $(get replay_fill_s) s), times \`remote receive S > /dev/null\`, and removes the session; MB = 10^6 bytes:"
    sed 's/^/  - /' "$T/replay-runs"
    echo "- a second, empty \`remote receive\` (connect, log in, attach, nothing to send) took $(get replay_empty_s) s (exit $(get replay_empty_rc))"
    echo "- agent RSS: $(get agent_rss_start_mib) MiB at start, $(get replay_rss_before_mib) MiB before the replay, $(get replay_rss_full_mib) MiB with the first journal full, $(get replay_rss_after_rm_mib) MiB 2 s after the last replay session was removed"
fi
echo "- \`remote run TARGET -- true\` p50 of $LAT_RUNS: $(get lat_fresh_ms) ms on the fresh agent (RSS $(get agent_rss_fresh_mib) MiB)$( [[ -n $(get lat_full_ms) ]] && echo ", $(get lat_full_ms) ms with the first replay journal full, $(get lat_after_rm_ms) ms after the replay sessions were removed")"
[[ -n $(get fan_after_s) ]] && echo "- info: the same \`remote run\` fan-out after the replay (agent RSS $(get fan_after_rss_mib) MiB): $(get fan_after_s) s (exit $(get fan_after_rc), $(get fan_after_ok)/$FANOUT targets exit 0), vs $(get fan_remote_s) s before"
echo "- fan-out wall times in s (min / median / max, successful runs): remote run $(get fan_remote_min) / $(get fan_remote_s) / $(get fan_remote_max) ($(get fan_remote_ok)/$FANOUT_RUNS runs ok);" \
     "ssh/xargs $(get fan_ssh_min) / $(get fan_ssh_s) / $(get fan_ssh_max) ($(get fan_ssh_ok)/$FANOUT_RUNS runs ok)"
if [[ $(get fan_all_ok) == 1 ]]; then
    echo "- fan-out: every run succeeded: \`remote run\` exited 0 with \"exit 0\" for all $FANOUT targets, xargs exited 0 (every ssh exited 0); the agent logged no refused connection"
else
    echo "- fan-out: NOT every run succeeded (see the notes)"
fi
echo "- keystroke echo in ms (min / p50 / p90 / max): remote attach $(get echo_remote_min) / $(get echo_remote_p50) / $(get echo_remote_p90) / $(get echo_remote_max); ssh -tt $(get echo_ssh_min) / $(get echo_ssh_p50) / $(get echo_ssh_p90) / $(get echo_ssh_max)"
echo "  (letters typed one at a time ${KEY_GAP_MS} ms apart into $OS_SHELL at its prompt, ^U every 50; each timed from write() on the pty master to reading the echo back; the remote pty's line discipline echoes)"
echo "- agent exit status after SIGTERM: ${agent_rc:-still running}"
if ((${#NOTES[@]})); then
    echo
    echo "Notes (anomalies seen in this run):"
    for n in "${NOTES[@]}"; do echo "- $n"; done
fi
