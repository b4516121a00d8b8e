#!/usr/bin/env bash
# Benchmark remote-agent's WinRM server (issue 4): run_cmd('true') round trips from 32
# concurrent clients over keep-alive connections, on loopback.
#
# Starts one private remote-agent with only its WinRM listeners, on 127.0.0.1 (HTTP with
# --allow-unencrypted, HTTPS with the certificate it generates; own temp state dir and
# config; an account `bench` with a random password that runs as the OS user remote-bench,
# login shell /bin/sh, when run as root, and as yourself otherwise), and prints one Markdown
# table with the numbers of this one run:
#   A. baseline: how fast this machine spawns /bin/true in a loop, one after another: a bash
#      loop `for i in $(seq N); do /bin/true; done`, and Python loops of os.fork + os.execv +
#      os.waitpid and of os.posix_spawn + os.waitpid. The fastest of the three is "the spawn
#      rate". The fork loop's own CPU per spawn (getrusage RUSAGE_SELF of the loop process:
#      the parent's side of fork + exec + wait; the child's CPU is not in it) is "the
#      reference spawn CPU".
#   1. commands per second: BENCH_CLIENTS clients (threads spread over BENCH_PROCS Python
#      processes, so that one GIL does not limit the load), each on ONE keep-alive
#      connection, loop over pywinrm's Session.run_cmd('true') sequence: Create (cmd shell),
#      Command `true`, Receive until CommandState Done (re-issued after the TimedOut fault
#      2150858793, as pywinrm does), Signal terminate, Delete. Basic auth on every request;
#      envelopes and HTTP headers are byte for byte pywinrm 0.5.0's (string templates, no
#      pywinrm: it would spend more CPU than the agent). After BENCH_WARMUP s, the round
#      trips completed in the next BENCH_SECS s are counted. Target: commands/s >= 0.5 x the
#      spawn rate.
#   2. agent CPU per command: utime+stime of the agent process (all its threads, from
#      /proc/PID/stat) over the window, divided by the round trips completed in it. The
#      commands' own CPU is not in it: a child's CPU, from fork on, is its own (it reaches
#      the agent's cutime/cstime when reaped, and is shown separately in the details). The
#      agent starts each command with a vfork-style clone + exec; `true` is a simple command
#      in a session with no saved state, so it is exec'd directly (other command lines run
#      in /bin/sh inside the commands-session wrapper). The parent's side of that spawn and
#      the wait is in the agent's CPU. What is subtracted is the reference spawn CPU of A:
#      the parent's-side CPU of one fork + execv + waitpid of /bin/true in a minimal
#      (Python) spawner. "agent CPU per command - reference spawn CPU" is what the agent
#      spends beyond that; target < 1 ms. (A vfork-style spawn costs its parent less than
#      that fork does, so the difference flatters the agent by up to the reference; the
#      agent's whole CPU per command, with nothing subtracted, is the row above it.)
#   3. info: client-side latency of one whole round trip (p50/p90), the agent's RSS.
# Rows 1-3 are printed for each scheme in BENCH_SCHEME (default: http, then https).
# Every response is checked (HTTP 200, RelatesTo = the request's MessageID, a ShellId, a
# CommandId, exactly one CommandState Done with ExitCode 0 and no output); a failed round trip
# is not counted, and every failure is reported in the notes. The load generator runs on
# the same machine and takes CPU from the agent: its CPU per command is in the details.
# Numbers are printed as measured; nothing is adjusted.
#
# Usage: tests/bench/winrm.sh    (as root, to run the commands as remote-bench; also works
#                                 as another user, running them as that user; needs python3)
# Build first: cargo build --release -p remote-agent
# Environment:
#   BENCH_AGENT_BIN   agent binary (default <repo>/target/release/remote-agent)
#   BENCH_CLIENTS     concurrent clients, one keep-alive connection each (default 32)
#   BENCH_PROCS       Python processes the clients are spread over (default 4)
#   BENCH_WARMUP      seconds of load before the window (default 2)
#   BENCH_SECS        timed window per scheme, seconds (default 20)
#   BENCH_SCHEME      schemes to measure, in order: "http", "https" or "http https" (default)
#   BENCH_SPAWN_N     spawns per baseline loop (default 3000)
#   BENCH_OS_USER     OS user the account runs as when root (default remote-bench; created if
#                     missing; root: no --run-as, the commands run as root)

set -uo pipefail
export LC_ALL=C

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
HELPER="$HERE/winrm_helper.py"

AGENT_BIN="${BENCH_AGENT_BIN:-$REPO/target/release/remote-agent}"
CLIENTS="${BENCH_CLIENTS:-32}"
PROCS="${BENCH_PROCS:-4}"
WARMUP="${BENCH_WARMUP:-2}"
SECS="${BENCH_SECS:-20}"
SCHEMES="${BENCH_SCHEME:-http https}"
SPAWN_N="${BENCH_SPAWN_N:-3000}"
OS_USER="${BENCH_OS_USER:-remote-bench}"
ACCOUNT=bench

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf 'winrm.sh: %s\n' "$*" >&2; exit 1; }
# shellcheck source=benchlib.sh
. "$HERE/benchlib.sh"

for v in CLIENTS PROCS WARMUP SECS SPAWN_N; do
    [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer (got '${!v}')"
done
SCHEMES="$(echo $SCHEMES)"   # normalise white space
[[ -n $SCHEMES ]] || die "BENCH_SCHEME is empty: give http, https or \"http https\""
for s in $SCHEMES; do
    [[ $s == http || $s == https ]] || die "BENCH_SCHEME: unknown scheme '$s' (use http, https or \"http https\")"
done

# ---------------------------------------------------------------- prerequisites
# The system python, not a pyenv shim (which costs ~100 ms per start and may be another version).
if [[ -x /usr/bin/python3 ]]; then PY=/usr/bin/python3; else PY="$(command -v python3)" || die "python3 not found (needed for $HELPER)"; fi
"$PY" -c 'import os, ssl; os.posix_spawn' 2>/dev/null || die "$PY lacks os.posix_spawn or the ssl module (Python >= 3.8 with ssl needed)"
[[ -r /proc/self/stat && -r /proc/self/status ]] || die "/proc is not mounted (needed for the agent's CPU time and RSS)"
[[ -x /bin/true ]] || die "/bin/true not found (the spawn baseline runs it)"
[[ -x $AGENT_BIN ]] || die "agent binary $AGENT_BIN not found. Build it: (cd $REPO && cargo build --release -p remote-agent)"
if [[ $(id -u) -eq 0 && $OS_USER == root ]]; then
    RUN_AS=()
    log "BENCH_OS_USER=root: the account has no --run-as, the commands run as root"
elif [[ $(id -u) -eq 0 ]]; then
    ensure_os_user "$OS_USER"
    RUN_AS=(--run-as "$OS_USER")
else
    OS_USER="$(id -un)"
    RUN_AS=()
    log "not root: the commands run as you ($OS_USER)"
fi
OS_SHELL="$(getent passwd "$OS_USER" | cut -d: -f7)"
[[ -n $OS_SHELL ]] || OS_SHELL=/bin/sh

# ---------------------------------------------------------------- state and teardown
T="$(mktemp -d /tmp/bench-winrm.XXXXXX)"
chmod 700 "$T"
AGENT_PID=""
RES="$T/results"
NOTES=()
: >"$RES"

cleanup() {
    set +e
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
agent_children() {   # "<children> <of them zombies>" of the agent, from /proc/*/status
    local f n=0 z=0
    for f in /proc/[0-9]*/status; do
        if grep -qs "^PPid:[[:space:]]*$AGENT_PID\$" "$f"; then
            n=$((n + 1))
            grep -qs '^State:[[:space:]]*Z' "$f" && z=$((z + 1))
        fi
    done
    echo "$n $z"
}

LOAD_START="$(cut -d' ' -f1-3 /proc/loadavg)"
DATE_START="$(date '+%Y-%m-%d %H:%M:%S %Z')"
put schemes "$SCHEMES"; put spawn_n "$SPAWN_N"

# ---------------------------------------------------------------- A. spawn baselines
# Before the agent starts, so that nothing else of ours runs. Each loop is run once after a
# short warm-up (page cache, first faults).
log "spawn baseline: $SPAWN_N × /bin/true per loop"
for i in $(seq 100); do /bin/true; done
t0="$(now_us)"
for i in $(seq "$SPAWN_N"); do /bin/true; done
t1="$(now_us)"
put spawn_shell_rate "$(awk -v n="$SPAWN_N" -v d=$((t1 - t0)) 'BEGIN{printf "%.1f", n/(d/1e6)}')"
log "bash loop: $(get spawn_shell_rate)/s"
spawn_py() {   # spawn_py KEY MODE PROCS PROG ARGS...: rate, own and children's CPU per spawn
    local key="$1" mode="$2" procs="$3" rate cpu kids failed
    shift 3
    read -r rate cpu kids failed < <("$PY" "$HELPER" spawn --mode "$mode" --n "$SPAWN_N" --procs "$procs" -- "$@" 2>"$T/spawn.err")
    if [[ -z $rate ]]; then
        note "spawn baseline $key ($mode, $*): the helper failed: $(head -2 "$T/spawn.err" | tr '\n' ' ')"
        put "${key}_rate_err" "FAILED"
        return
    fi
    put "${key}_rate" "$rate"; put "${key}_cpu_ms" "$cpu"; put "${key}_kids_cpu_ms" "$kids"
    ((failed == 0)) || note "spawn baseline $key ($mode, $*): $failed of $((SPAWN_N * procs)) spawns did not exit 0"
    log "$key ($mode × $procs, $*): $rate/s; loop CPU $cpu ms/spawn, children $kids ms/spawn"
}
spawn_py spawn_fork fork 1 /bin/true
spawn_py spawn_posix posix_spawn 1 /bin/true
# Info only: one loop per CPU at once; and the shell the agent starts for each command.
spawn_py spawn_par posix_spawn "$(nproc)" /bin/true
spawn_py spawn_sh fork 1 /bin/sh -c true
best=""
for k in spawn_shell_rate spawn_fork_rate spawn_posix_rate; do
    v="$(get $k)"
    [[ -n $v ]] || continue
    if [[ -z $best ]] || awk -v a="$v" -v b="$best" 'BEGIN{exit !(a > b)}'; then best="$v"; fi
done
[[ -n $best ]] && put spawn_rate "$best"
[[ -n $(get spawn_fork_cpu_ms) ]] && put spawn_ref_cpu_ms "$(get spawn_fork_cpu_ms)"
log "spawn rate (fastest loop): ${best:-?}/s; reference spawn CPU $(get spawn_ref_cpu_ms) ms"

# ---------------------------------------------------------------- agent and account
# 32 clients hold up to 32 shells (and so 32 sessions) at once: the defaults (30 shells,
# 64 sessions per user) must not refuse them.
cat >"$T/agent.toml" <<EOF
[winrm]
max_shells_per_user = 100

[sessions]
max_sessions_per_user = 200
EOF
mkdir -m 700 "$T/agent-state"
head -c 18 /dev/urandom | base64 | tr '+/' 'xy' >"$T/password"
chmod 600 "$T/password"
"$AGENT_BIN" user add "$ACCOUNT" --admin --password-stdin "${RUN_AS[@]}" \
    --config "$T/agent.toml" --state-dir "$T/agent-state" <"$T/password" >"$T/useradd.log" 2>&1 \
    || { cat "$T/useradd.log" >&2; die "remote-agent user add failed"; }
HTTP_LISTEN=off; HTTPS_LISTEN=off
[[ " $SCHEMES " == *" http "* ]] && HTTP_LISTEN=127.0.0.1:0
[[ " $SCHEMES " == *" https "* ]] && HTTPS_LISTEN=127.0.0.1:0
"$AGENT_BIN" run --config "$T/agent.toml" --state-dir "$T/agent-state" --ssh off --socket off \
    --winrm-http "$HTTP_LISTEN" --winrm-https "$HTTPS_LISTEN" --allow-unencrypted \
    </dev/null 2>"$T/agent.log" &
AGENT_PID=$!
declare -A PORT=()
for _ in $(seq 150); do
    for s in $SCHEMES; do
        [[ -n ${PORT[$s]:-} ]] && continue
        line="$(grep -m1 "remote-agent: winrm $s listening on 127.0.0.1:" "$T/agent.log" 2>/dev/null)"
        [[ -n $line ]] && PORT[$s]="$(sed -E 's/.*listening on 127\.0\.0\.1:([0-9]+).*/\1/' <<<"$line")"
    done
    ((${#PORT[@]} == $(wc -w <<<"$SCHEMES"))) && break
    kill -0 "$AGENT_PID" 2>/dev/null || break
    sleep 0.1
done
for s in $SCHEMES; do
    [[ -n ${PORT[$s]:-} ]] || { cat "$T/agent.log" >&2; die "remote-agent did not start its winrm $s listener (log above)"; }
done
CERT_FP="$(sed -n 's/.*winrm https listening on .*(certificate \(.*\))$/\1/p' "$T/agent.log" | head -1)"
log "remote-agent (pid $AGENT_PID) listening: $(for s in $SCHEMES; do printf '%s 127.0.0.1:%s ' "$s" "${PORT[$s]}"; done)"
url() { echo "$1://127.0.0.1:${PORT[$1]}/wsman"; }

# One round trip per scheme before anything is timed: the account logs in with Basic, and
# its commands run as the OS user with its login shell.
# The load counts a round trip only when `true` reports exit code 0: check that first.
expect="$OS_USER $OS_SHELL "
for s in $SCHEMES; do
    got="$("$PY" "$HELPER" probe --url "$(url "$s")" --user "$ACCOUNT" --password-file "$T/password" \
        -- 'id -un; echo "$SHELL"' 2>"$T/probe.err" | tr '\n' ' ')"
    code="${got%% *}"; out="${got#* }"
    if [[ ! $code =~ ^-?[0-9]+$ || $out != "$expect" ]]; then
        cat "$T/probe.err" >&2; tail -20 "$T/agent.log" >&2
        die "cannot run a command as $OS_USER over WinRM $s (got '$got', expected exit code 0 and output '$expect')"
    fi
    if [[ $code != 0 ]]; then
        tail -5 "$T/agent.log" >&2
        die "over WinRM $s, \`id -un; echo \"\$SHELL\"\` printed the right output ('$out') but the agent reported exit code $code, not 0;" \
            "every run_cmd('true') would count as failed. Agent problem (check that the OS user can write its session directory, STATE_DIR/sessions/ID);" \
            "to measure with the commands running as root instead: BENCH_OS_USER=root"
    fi
done

# ---------------------------------------------------------------- 1-3. the load, per scheme
for s in $SCHEMES; do
    log "$s: $CLIENTS clients in $PROCS processes, ${WARMUP} s warm-up + ${SECS} s window"
    created0="$(grep -c 'session opened' "$T/agent.log")"
    deleted0="$(grep -c 'session closed' "$T/agent.log")"
    "$PY" "$HELPER" load --url "$(url "$s")" --user "$ACCOUNT" --password-file "$T/password" \
        --clients "$CLIENTS" --procs "$PROCS" --warmup "$WARMUP" --secs "$SECS" \
        --agent-pid "$AGENT_PID" --agent-log "$T/agent.log" --prefix "$s" >"$T/load-$s" 2>"$T/load-$s.err"
    rc=$?
    cat "$T/load-$s" >>"$RES"
    if ((rc != 0)) || [[ -z $(get "${s}_cmds") ]]; then
        note "$s: the load generator failed (exit $rc): $(tail -3 "$T/load-$s.err" | tr '\n' ' ')"
        put "${s}_rate_err" "FAILED"
        kill -0 "$AGENT_PID" 2>/dev/null || { note "the agent is no longer running: $(tail -3 "$T/agent.log" | tr '\n' ' ')"; break; }
        continue
    fi
    log "$s: $(get "${s}_cmds") round trips in $(get "${s}_window_s") s = $(get "${s}_rate")/s;" \
        "agent CPU $(get "${s}_agent_cpu_ms") ms/command; p50 $(get "${s}_lat_p50") ms;" \
        "failed $(get "${s}_fail_window") in the window, $(get "${s}_fail_total") in all"
    sleep 1
    read -r kids zombies < <(agent_children)
    put "${s}_children_after" "$kids"; put "${s}_zombies_after" "$zombies"
    put "${s}_created" "$(( $(grep -c 'session opened' "$T/agent.log") - created0 ))"
    put "${s}_deleted" "$(( $(grep -c 'session closed' "$T/agent.log") - deleted0 ))"
    put "${s}_session_files" "$(find "$T/agent-state/sessions" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)"
    # Anomalies.
    fw="$(get "${s}_fail_window")"; ft="$(get "${s}_fail_total")"
    ((ft == 0)) || note "$s: $ft round trips failed ($fw of them in the timed window); first errors: $(get "${s}_fail_first")"
    (($(get "${s}_stuck") == 0)) || note "$s: $(get "${s}_stuck") of $PROCS load processes were still inside a request 40 s after the window (killed): the agent did not answer"
    (($(get "${s}_timeouts") == 0)) || note "$s: $(get "${s}_timeouts") Receive requests ended in the TimedOut fault (the operation timeout is 20 s; \`true\` should be Done long before)"
    conns="$(get "${s}_connects")"
    ((conns <= CLIENTS)) || note "$s: the clients opened $conns TCP connections for $CLIENTS clients: $((conns - CLIENTS)) reconnects (keep-alive connections closed by the agent, or after failures)"
    awk -v g="$(get "${s}_max_gap_s")" 'BEGIN{exit !(g > 1)}' \
        && note "$s: no round trip completed for $(get "${s}_max_gap_s") s at one point of the window (a stall)"
    ((kids == 0)) || note "$s: 1 s after the load the agent still has $kids child process(es) ($zombies zombie(s))"
    created="$(get "${s}_created")"; deleted="$(get "${s}_deleted")"
    ((created == deleted)) || note "$s: the agent logged $created shells created but $deleted deleted during the load"
done

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
warn="$(grep -cE ' (WARN|ERROR) |panic' "$T/agent.log")"
((warn == 0)) || note "agent log has $warn WARN/ERROR/panic line(s), e.g.: $(grep -E ' (WARN|ERROR) |panic' "$T/agent.log" | head -1 | cut -c1-240)"

# ---------------------------------------------------------------- report
bin_info() { echo "\`$1\` ($("$1" --version 2>&1 | head -1), sha256 $(sha256sum "$1" | cut -c1-16)…, built $(date -r "$1" '+%Y-%m-%d %H:%M:%S %Z'))"; }
echo
echo "## remote-agent WinRM: run_cmd('true') round trips, $CLIENTS clients (loopback, one run)"
echo
echo "- date: $DATE_START"
echo "- agent: $(bin_info "$AGENT_BIN")"
echo "- python: $PY ($("$PY" --version 2>&1)), the load generator and the spawn loops"
echo "- nproc: $(nproc); kernel $(uname -r); load average (1/5/15 min) at start $LOAD_START, at end $(cut -d' ' -f1-3 /proc/loadavg)"
echo "  (other work on the machine during the run lowers the rates and raises the latencies; CPU per command is less affected)"
echo "- one agent, WinRM only: $(for s in $SCHEMES; do printf '%s on 127.0.0.1:%s, ' "$s" "${PORT[$s]}"; done)--allow-unencrypted; [winrm] max_shells_per_user 100, [sessions] max_sessions_per_user 200;" \
     "account $ACCOUNT (Basic, password) runs as OS user $OS_USER${CERT_FP:+; HTTPS certificate $CERT_FP (not verified by the clients)}"
echo "- load: $CLIENTS clients = threads in $PROCS Python processes, one keep-alive connection each; ${WARMUP} s warm-up, then a ${SECS} s window per scheme"
echo
"$PY" "$HELPER" table "$RES"
echo
echo "Details:"
echo "- spawn baselines, CPU per spawn (ms, user+sys): fork loop own $(get spawn_fork_cpu_ms), its children $(get spawn_fork_kids_cpu_ms);" \
     "posix_spawn loop own $(get spawn_posix_cpu_ms), its children $(get spawn_posix_kids_cpu_ms)"
echo "- info: $(nproc) posix_spawn loops at once (one per CPU): $(get spawn_par_rate) spawns/s in all;" \
     "one fork+exec loop of \`/bin/sh -c true\` (what a command line that is not simple costs: the agent runs those in /bin/sh): $(get spawn_sh_rate)/s, own CPU $(get spawn_sh_cpu_ms) ms, children $(get spawn_sh_kids_cpu_ms) ms per spawn"
for s in $SCHEMES; do
    p="${s}_"
    [[ -n $(get "${p}cmds") ]] || { echo "- $s: no measurement (see notes)"; continue; }
    echo "- $s: $(get "${p}cmds") round trips in the $(get "${p}window_s") s window ($(get "${p}cmds_total") in all, warm-up and the in-flight ones included);" \
         "failed: $(get "${p}fail_window") in the window, $(get "${p}fail_total") in all"
    echo "  - agent CPU $(get "${p}agent_cpu_s") s in the window = $(get "${p}agent_cpu_pct") % of one CPU;" \
         "the commands' own CPU (the agent's reaped children) $(get "${p}agent_children_cpu_ms") ms per command;" \
         "the load generator's CPU $(get "${p}gen_cpu_ms") ms per command"
    echo "  - round trip ms: min $(get "${p}lat_min"), p50 $(get "${p}lat_p50"), p90 $(get "${p}lat_p90"), max $(get "${p}lat_max");" \
         "p50 per step: Create $(get "${p}op_create_p50"), Command $(get "${p}op_command_p50"), Receive $(get "${p}op_receive_p50")," \
         "Signal $(get "${p}op_signal_p50"), Delete $(get "${p}op_delete_p50")"
    echo "  - Receive requests per round trip $(get "${p}receives_per_cmd"), TimedOut faults $(get "${p}timeouts");" \
         "TCP connections opened $(get "${p}connects") for $CLIENTS clients; longest time without a completed round trip $(get "${p}max_gap_s") s"
    echo "  - agent RSS $(get "${p}rss_start_mib") MiB before the load, $(get "${p}rss_end_mib") MiB after the window, peak $(get "${p}hwm_mib") MiB;" \
         "agent log $(get "${p}log_lines") lines ($(get "${p}log_bytes") bytes) in the window (default level info);" \
         "shells created/deleted $(get "${p}created")/$(get "${p}deleted"); entries in the sessions dir afterwards $(get "${p}session_files");" \
         "agent children 1 s later $(get "${p}children_after")"
done
echo "- agent exit status after SIGTERM: ${agent_rc:-still running}"
if ((${#NOTES[@]})); then
    echo
    echo "Notes (anomalies seen in this run):"
    for n in "${NOTES[@]}"; do echo "- $n"; done
fi
