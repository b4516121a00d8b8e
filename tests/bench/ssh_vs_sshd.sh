#!/usr/bin/env bash
# Benchmark remote-agent's SSH server against OpenSSH's sshd, side by side, on loopback.
#
# Starts a private sshd (own temp dir, host key, sshd_config, authorized_keys) and a private
# remote-agent (own state dir and config) on 127.0.0.1, logs in to both as root with the
# same client key, and prints one Markdown table with the numbers of this one run:
#   1. exec latency (`ssh … true`, curve25519-sha256 key exchange): p50 over N runs
#   2. download and upload throughput of BENCH_BYTES with aes128-gcm@openssh.com
#   3. memory (PSS) per idle authenticated connection, BENCH_CONNS connections open
#   4. idle RSS right after startup (agent; sshd's listener for reference)
# Each ratio is agent/sshd and is printed beside its target with whether it is met.
# Numbers are printed as measured; nothing is adjusted.
#
# Usage: tests/bench/ssh_vs_sshd.sh            (as root; needs sshd, ssh, ssh-keygen, ss, python3)
# Environment:
#   BENCH_AGENT_BIN   agent binary (default: <repo>/target/release/remote-agent;
#                     build it with `cargo build --release -p remote-agent`)
#   BENCH_EXEC_RUNS   exec-latency runs per server (default 30)
#   BENCH_BYTES       bytes per transfer (default 1073741824 = 1 GiB)
#   BENCH_XFER_RUNS   timed transfers per direction and server; the median is reported (default 3)
#   BENCH_CONNS       idle connections for the memory measurement (default 200)
#   BENCH_CONN_TIMEOUT seconds to wait for those connections to authenticate (default 180)

set -uo pipefail
export LC_ALL=C

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
HELPER="$HERE/bench_helper.py"

AGENT_BIN="${BENCH_AGENT_BIN:-$REPO/target/release/remote-agent}"
EXEC_RUNS="${BENCH_EXEC_RUNS:-30}"
BYTES="${BENCH_BYTES:-1073741824}"
XFER_RUNS="${BENCH_XFER_RUNS:-3}"
CONNS="${BENCH_CONNS:-200}"
CONN_TIMEOUT="${BENCH_CONN_TIMEOUT:-180}"
SSHD=/usr/sbin/sshd   # sshd insists on being started by absolute path (it re-execs itself)

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf 'ssh_vs_sshd.sh: %s\n' "$*" >&2; exit 1; }

for v in EXEC_RUNS BYTES XFER_RUNS CONNS CONN_TIMEOUT; do
    [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer (got '${!v}')"
done

# ---------------------------------------------------------------- prerequisites
[[ $(id -u) -eq 0 ]] || die "run as root: sshd must run as root, and both servers log in the same OS user (root)"
if [[ ! -x $SSHD ]] || ! command -v ssh >/dev/null || ! command -v ssh-keygen >/dev/null; then
    die "OpenSSH server/client not found ($SSHD, ssh, ssh-keygen). Install them: apt-get install openssh-server openssh-client"
fi
command -v ss >/dev/null || die "'ss' not found. Install it: apt-get install iproute2"
command -v python3 >/dev/null || die "python3 not found (needed for $HELPER)"
[[ -x $AGENT_BIN ]] || die "agent binary $AGENT_BIN not found. Build it: (cd $REPO && cargo build --release -p remote-agent)"
[[ -r /proc/self/smaps_rollup ]] || die "/proc/PID/smaps_rollup is not available (Linux ≥ 4.14 needed for PSS)"

# ---------------------------------------------------------------- state and teardown
T="$(mktemp -d /tmp/ssh_vs_sshd.XXXXXX)"
AGENT_PID=""
SSHD_PID=""
CLIENT_PIDS=()
RES="$T/results"
NOTES=()
: >"$RES"

kill_clients() {
    local p
    for p in "${CLIENT_PIDS[@]}"; do kill "$p" 2>/dev/null; done
    for p in "${CLIENT_PIDS[@]}"; do wait "$p" 2>/dev/null; done
    CLIENT_PIDS=()
}

cleanup() {
    set +e
    kill_clients
    if [[ -n $AGENT_PID ]] && kill -0 "$AGENT_PID" 2>/dev/null; then
        kill -TERM "$AGENT_PID"
        for _ in $(seq 50); do kill -0 "$AGENT_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$AGENT_PID" 2>/dev/null
        wait "$AGENT_PID" 2>/dev/null
    fi
    if [[ -n $SSHD_PID ]] && kill -0 "$SSHD_PID" 2>/dev/null; then
        # The listener and the per-connection processes it forked (found by parent pid).
        local pids
        pids="$(python3 "$HELPER" tree "$SSHD_PID" 2>/dev/null)"
        kill -TERM $pids 2>/dev/null
        wait "$SSHD_PID" 2>/dev/null
    fi
    rm -rf "$T"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

put() { printf '%s=%s\n' "$1" "$2" >>"$RES"; }
note() { NOTES+=("$*"); log "NOTE: $*"; }

LOAD_START="$(cut -d' ' -f1-3 /proc/loadavg)"

# ---------------------------------------------------------------- keys
ssh-keygen -q -t ed25519 -N '' -C bench-client -f "$T/client_key" || die "ssh-keygen failed"
ssh-keygen -q -t ed25519 -N '' -C bench-sshd-host -f "$T/sshd_host_ed25519_key" || die "ssh-keygen failed"
cp "$T/client_key.pub" "$T/authorized_keys"

# The same client options for both servers; -F /dev/null: no user or system ssh_config.
SSH_OPTS=(
    -F /dev/null
    -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null
    -o BatchMode=yes -o LogLevel=ERROR
    -i "$T/client_key" -o IdentitiesOnly=yes -o IdentityAgent=none
    -l root
)

# ---------------------------------------------------------------- sshd
mkdir -p /run/sshd   # sshd's privilege-separation chroot directory
start_sshd() {
    local port="$1"
    cat >"$T/sshd_config" <<EOF
Port $port
ListenAddress 127.0.0.1
HostKey $T/sshd_host_ed25519_key
PidFile $T/sshd.pid
UsePAM no
StrictModes no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AuthorizedKeysFile $T/authorized_keys
MaxStartups 300:30:400
MaxSessions 10
X11Forwarding no
PrintMotd no
EOF
    "$SSHD" -t -f "$T/sshd_config" || die "sshd rejects the generated config $T/sshd_config"
    "$SSHD" -D -f "$T/sshd_config" -e 2>"$T/sshd.log" &
    SSHD_PID=$!
    local i
    for i in $(seq 100); do
        grep -q "Server listening on 127.0.0.1 port $port" "$T/sshd.log" 2>/dev/null && return 0
        kill -0 "$SSHD_PID" 2>/dev/null || break
        sleep 0.1
    done
    kill "$SSHD_PID" 2>/dev/null
    wait "$SSHD_PID" 2>/dev/null
    SSHD_PID=""
    return 1
}
SSHD_PORT=""
for attempt in 1 2 3; do
    p="$(python3 "$HELPER" free-port)" || die "cannot find a free port"
    if start_sshd "$p"; then SSHD_PORT="$p"; break; fi
done
[[ -n $SSHD_PORT ]] || { cat "$T/sshd.log" >&2; die "sshd did not start (log above)"; }
log "sshd listening on 127.0.0.1:$SSHD_PORT (pid $SSHD_PID)"

# ---------------------------------------------------------------- agent
# max_startups: sshd above is configured with MaxStartups 300:30:400 (random refusals from
# 300 unauthenticated connections). The agent gets the same start value so that the burst of
# BENCH_CONNS parallel logins in the memory test meets the same limit on both servers.
cat >"$T/agent.toml" <<EOF
[ssh]
max_startups = 300
max_connections = 1024
EOF
mkdir -m 700 "$T/agent-state"
"$AGENT_BIN" user add root --admin --authorized-key "$T/client_key.pub" \
    --config "$T/agent.toml" --state-dir "$T/agent-state" </dev/null >"$T/useradd.log" 2>&1 \
    || { cat "$T/useradd.log" >&2; die "remote-agent user add failed"; }
# SSH only, as sshd: the WinRM listeners (on by default) are measured apart below.
"$AGENT_BIN" run --config "$T/agent.toml" --state-dir "$T/agent-state" --ssh 127.0.0.1:0 \
    --winrm-http off --winrm-https off </dev/null 2>"$T/agent.log" &
AGENT_PID=$!
AGENT_PORT=""
for _ in $(seq 100); do
    line="$(grep -m1 'remote-agent: ssh listening on 127.0.0.1:' "$T/agent.log" 2>/dev/null)"
    if [[ -n $line ]]; then
        AGENT_PORT="$(sed -E 's/.*listening on 127\.0\.0\.1:([0-9]+).*/\1/' <<<"$line")"
        break
    fi
    kill -0 "$AGENT_PID" 2>/dev/null || break
    sleep 0.1
done
[[ -n $AGENT_PORT ]] || { cat "$T/agent.log" >&2; die "remote-agent did not start (log above)"; }
log "remote-agent listening on 127.0.0.1:$AGENT_PORT (pid $AGENT_PID)"

port_of() { if [[ $1 == agent ]]; then echo "$AGENT_PORT"; else echo "$SSHD_PORT"; fi; }
pid_of() { if [[ $1 == agent ]]; then echo "$AGENT_PID"; else echo "$SSHD_PID"; fi; }
to() { local srv="$1"; shift; ssh "${SSH_OPTS[@]}" -p "$(port_of "$srv")" "$@"; }
now_us() { local t="$EPOCHREALTIME"; echo "${t/./}"; }

HOST=127.0.0.1

# ---------------------------------------------------------------- 4. idle RSS
# Measured before any connection has been made to either server.
sleep 1
a_rss="$(python3 "$HELPER" rss "$AGENT_PID")" && put agent_idle_rss_mib "$(awk -v k="$a_rss" 'BEGIN{printf "%.2f", k/1024}')"
s_rss="$(python3 "$HELPER" rss "$SSHD_PID")" && put sshd_idle_rss_mib "$(awk -v k="$s_rss" 'BEGIN{printf "%.2f", k/1024}')"
log "idle RSS: agent ${a_rss:-?} KiB, sshd listener ${s_rss:-?} KiB"
# For information: a second agent as `run` starts by default, with the WinRM HTTP and HTTPS
# listeners too (here on loopback ports of its own), measured the same way and stopped.
mkdir -m 700 "$T/agent-full-state"
cp "$T/agent-state/accounts.toml" "$T/agent-full-state/" 2>/dev/null || true
"$AGENT_BIN" run --config "$T/agent.toml" --state-dir "$T/agent-full-state" --ssh 127.0.0.1:0 \
    --winrm-http 127.0.0.1:0 --winrm-https 127.0.0.1:0 --socket off </dev/null 2>"$T/agent-full.log" &
FULL_PID=$!
for _ in $(seq 100); do
    grep -q 'winrm https listening' "$T/agent-full.log" 2>/dev/null && break
    kill -0 "$FULL_PID" 2>/dev/null || break
    sleep 0.1
done
sleep 1
f_rss="$(python3 "$HELPER" rss "$FULL_PID")" && put agent_full_idle_rss_mib "$(awk -v k="$f_rss" 'BEGIN{printf "%.2f", k/1024}')"
kill "$FULL_PID" 2>/dev/null; wait "$FULL_PID" 2>/dev/null
log "idle RSS with the WinRM listeners too: agent ${f_rss:-?} KiB"

# Both servers must accept the key before anything else is measured.
for srv in agent sshd; do
    out="$(to "$srv" "$HOST" 'echo ok' </dev/null 2>"$T/check.err")"
    if [[ $out != ok ]]; then
        cat "$T/check.err" >&2
        tail -20 "$T/$srv.log" >&2
        die "cannot log in to $srv with the client key (see above)"
    fi
done

# ---------------------------------------------------------------- 3. memory per idle connection
# Client: `ssh -N`, i.e. an authenticated connection with no channel and no remote command.
# That is the fair "idle authenticated connection": with `ssh … sleep 3600` each connection
# would also hold a shell/sleep process, which is a child of the per-connection sshd
# processes (and counted in sshd's tree) but, for the agent, a child it spawned too — and
# what would be compared is then mostly the cost of the user's processes, the same for both.
# `-N` leaves exactly what the server itself keeps per connection: for sshd the privsep
# monitor plus the post-auth child (2 processes); for the agent, the connection's state
# inside its single process.
# Authentication is detected without server-specific knowledge: ssh runs LocalCommand only
# after the user has been authenticated, and it touches a marker file.
# Server memory = sum of PSS over the server's process tree (the listener and all its
# descendants, found through parent pids) with the connections open, minus the listener's
# PSS (the agent's: the tree's, i.e. the agent process) before. PSS divides shared pages
# among the processes sharing them, so summing it over a tree does not double-count.
measure_conns() {
    local srv="$1" port pid before after n_after dir i up alive settled est est2 deadline
    port="$(port_of "$srv")"; pid="$(pid_of "$srv")"
    dir="$T/up-$srv"; mkdir -p "$dir"
    read -r before _ < <(python3 "$HELPER" pss-tree "$pid")
    log "$srv: PSS of server tree before: $before KiB; opening $CONNS idle connections"
    CLIENT_PIDS=()
    for ((i = 0; i < CONNS; i++)); do
        ssh "${SSH_OPTS[@]}" -p "$port" -n -N \
            -o PermitLocalCommand=yes -o "LocalCommand=touch $dir/$i" \
            "$HOST" 2>>"$T/clients-$srv.err" &
        CLIENT_PIDS+=($!)
    done
    deadline=$((SECONDS + CONN_TIMEOUT))
    while :; do
        settled=0; up=0
        for ((i = 0; i < CONNS; i++)); do
            if [[ -e $dir/$i ]]; then
                kill -0 "${CLIENT_PIDS[i]}" 2>/dev/null && up=$((up + 1))
                settled=$((settled + 1))
            elif ! kill -0 "${CLIENT_PIDS[i]}" 2>/dev/null; then
                settled=$((settled + 1))
            fi
        done
        ((settled == CONNS)) && break
        if ((SECONDS >= deadline)); then
            note "$srv: after ${CONN_TIMEOUT}s only $up of $CONNS connections authenticated; $((CONNS - settled)) still pending"
            break
        fi
        sleep 0.5
    done
    sleep 3   # let the servers finish post-auth work
    alive=0
    for ((i = 0; i < CONNS; i++)); do
        [[ -e $dir/$i ]] && kill -0 "${CLIENT_PIDS[i]}" 2>/dev/null && alive=$((alive + 1))
    done
    est="$(ss -Htn state established "( sport = :$port )" | wc -l)"
    read -r after n_after < <(python3 "$HELPER" pss-tree "$pid")
    est2="$(ss -Htn state established "( sport = :$port )" | wc -l)"
    log "$srv: $alive authenticated and alive clients, $est/$est2 ESTABLISHED server sockets, $n_after server processes, PSS after $after KiB"
    put "${srv}_conns_ok" "$alive"
    put "${srv}_procs" "$n_after"
    put "${srv}_pss_before" "$before"
    put "${srv}_pss_after" "$after"
    if ((alive != CONNS)); then
        local errs
        errs="$(sort "$T/clients-$srv.err" 2>/dev/null | uniq -c | sort -rn | head -3 | sed 's/^ *//' | tr '\n' ';')"
        note "$srv: only $alive of $CONNS idle connections were up (client errors: ${errs:-none})"
    fi
    if ((est != alive || est2 != alive)); then
        note "$srv: ESTABLISHED server-side sockets ($est, then $est2) differ from authenticated clients ($alive)"
    fi
    if ((alive > 0)); then
        put "${srv}_kib_per_conn" "$(awk -v a="$after" -v b="$before" -v n="$alive" 'BEGIN{printf "%.1f", (a-b)/n}')"
    else
        put "${srv}_kib_per_conn_err" "FAILED (no connection)"
    fi
    kill_clients
    # Wait for the server to notice, then record what stays allocated (leak check, info only).
    for _ in $(seq 50); do
        [[ $(ss -Htn state established "( sport = :$port )" | wc -l) -eq 0 ]] && break
        sleep 0.2
    done
    sleep 2
    read -r after _ < <(python3 "$HELPER" pss-tree "$pid")
    put "${srv}_pss_closed" "$after"
    log "$srv: PSS after closing the connections: $after KiB"
}
put conns "$CONNS"
measure_conns agent
measure_conns sshd

# ---------------------------------------------------------------- 1. exec latency
# Alternating servers (and which one goes first) so drift on the machine hits both alike.
log "exec latency: $EXEC_RUNS runs per server"
: >"$T/lat-agent"; : >"$T/lat-sshd"
fail_agent=0; fail_sshd=0
one_exec() {
    local srv="$1" t0 t1 rc
    t0="$(now_us)"
    to "$srv" -o KexAlgorithms=curve25519-sha256 "$HOST" true </dev/null >/dev/null 2>>"$T/exec-$srv.err"
    rc=$?
    t1="$(now_us)"
    if ((rc == 0)); then
        awk -v d=$((t1 - t0)) 'BEGIN{printf "%.3f\n", d/1000}' >>"$T/lat-$srv"
    else
        eval "fail_$srv=\$((fail_$srv + 1))"
    fi
}
one_exec agent; one_exec sshd   # warm-up (page cache, first fork), not counted
: >"$T/lat-agent"; : >"$T/lat-sshd"; fail_agent=0; fail_sshd=0
for ((i = 0; i < EXEC_RUNS; i++)); do
    if ((i % 2 == 0)); then one_exec agent; one_exec sshd; else one_exec sshd; one_exec agent; fi
done
put exec_runs "$EXEC_RUNS"
# Both servers run the command through root's login shell. Bash started by an SSH server
# (SSH_CLIENT set) reads ~/.bashrc, so its cost is part of both latencies; measure it
# locally so the report can say how much of each number is the shell and not the server.
ROOT_HOME="$(getent passwd root | cut -d: -f6)"; ROOT_SHELL="$(getent passwd root | cut -d: -f7)"
: >"$T/lat-shell"
for ((i = 0; i < 10; i++)); do
    t0="$(now_us)"
    (cd "$ROOT_HOME" && env -i HOME="$ROOT_HOME" USER=root LOGNAME=root SHELL="$ROOT_SHELL" \
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        SSH_CLIENT="127.0.0.1 1 2" SSH_CONNECTION="127.0.0.1 1 127.0.0.1 2" \
        "$ROOT_SHELL" -c true </dev/null >/dev/null 2>&1)
    t1="$(now_us)"
    awk -v d=$((t1 - t0)) 'BEGIN{printf "%.3f\n", d/1000}' >>"$T/lat-shell"
done
read -r shell_p50 _ < <(python3 "$HELPER" stats <"$T/lat-shell")
put shell_p50 "$shell_p50"
for srv in agent sshd; do
    read -r p50 mn p90 mx n < <(python3 "$HELPER" stats <"$T/lat-$srv")
    fails=$((fail_$srv))
    log "$srv exec latency ms: p50 $p50 min $mn p90 $p90 max $mx (ok $n, failed $fails)"
    put "${srv}_exec_min" "$mn"; put "${srv}_exec_p90" "$p90"; put "${srv}_exec_max" "$mx"
    if ((fails == 0)); then
        put "${srv}_exec_p50" "$p50"
    else
        put "${srv}_exec_p50_err" "FAILED ($fails/$EXEC_RUNS runs)"
        note "$srv: $fails of $EXEC_RUNS exec runs failed (p50 of the others: $p50 ms); first error: $(head -1 "$T/exec-$srv.err")"
    fi
done

# ---------------------------------------------------------------- 2. throughput
# One connection per transfer; the time includes connection setup (tens of ms, the same for
# both), which matters little next to seconds of transfer. MB = 10^6 bytes.
# The timed transfers go to/come from /dev/null exactly; the byte counts are checked in a
# separate, untimed transfer of each kind afterwards (counting would cost CPU in the timed one).
# Before timing, each server is asked whether it negotiates the cipher at all. When the
# specified cipher (aes128-gcm@openssh.com) does not work on a server, its rows say FAILED
# with the reason, and the transfers are measured again with BENCH_FALLBACK_CIPHER (on both
# servers) as extra, clearly labelled information rows — not as a replacement.
xfer() {   # xfer SRV CIPHER down|up -> prints seconds, or nothing on failure
    local srv="$1" cipher="$2" dir="$3" t0 t1 rc
    t0="$(now_us)"
    if [[ $dir == down ]]; then
        to "$srv" -c "$cipher" "$HOST" "head -c $BYTES /dev/zero" </dev/null >/dev/null 2>>"$T/xfer-$srv.err"
        rc=$?
    else
        head -c "$BYTES" /dev/zero | to "$srv" -c "$cipher" "$HOST" 'cat > /dev/null' >/dev/null 2>>"$T/xfer-$srv.err"
        rc=$?
    fi
    t1="$(now_us)"
    ((rc == 0)) && awk -v d=$((t1 - t0)) 'BEGIN{printf "%.6f\n", d/1e6}'
}
cipher_works() {   # cipher_works SRV CIPHER; on failure prints ssh's reason (LogLevel INFO)
    local srv="$1" cipher="$2" out
    to "$srv" -c "$cipher" "$HOST" true </dev/null >/dev/null 2>&1 && return 0
    out="$(ssh "${SSH_OPTS[@]/LogLevel=ERROR/LogLevel=INFO}" -p "$(port_of "$srv")" -c "$cipher" "$HOST" true </dev/null 2>&1 | tr '\n' ' ')"
    echo "${out:-ssh failed without a message}"
    return 1
}
# throughput PREFIX CIPHER: results go to PREFIX{agent,sshd}_{down,up}_mbs
throughput() {
    local pre="$1" cipher="$2" dir i srv secs order fails_a fails_s fails med mn mx n why
    local -A ok=()
    for srv in agent sshd; do
        if why="$(cipher_works "$srv" "$cipher")"; then
            ok[$srv]=1
        else
            ok[$srv]=0
            note "$srv: cannot use cipher $cipher: $why"
            put "${pre}${srv}_down_mbs_err" "FAILED (cipher $cipher not negotiated)"
            put "${pre}${srv}_up_mbs_err" "FAILED (cipher $cipher not negotiated)"
        fi
    done
    log "throughput with $cipher: $XFER_RUNS × $BYTES bytes per direction and server"
    for dir in down up; do
        : >"$T/mbs-$pre-agent-$dir"; : >"$T/mbs-$pre-sshd-$dir"
        fails_a=0; fails_s=0
        for ((i = 0; i < XFER_RUNS; i++)); do
            if ((i % 2 == 0)); then order=(agent sshd); else order=(sshd agent); fi
            for srv in "${order[@]}"; do
                ((ok[$srv])) || continue
                secs="$(xfer "$srv" "$cipher" "$dir")"
                if [[ -n $secs ]]; then
                    awk -v b="$BYTES" -v s="$secs" 'BEGIN{printf "%.2f\n", b/1e6/s}' >>"$T/mbs-$pre-$srv-$dir"
                    log "$srv $dir ($cipher): ${secs}s"
                else
                    log "$srv $dir ($cipher): FAILED"
                    if [[ $srv == agent ]]; then fails_a=$((fails_a + 1)); else fails_s=$((fails_s + 1)); fi
                fi
            done
        done
        for srv in agent sshd; do
            ((ok[$srv])) || continue
            if [[ $srv == agent ]]; then fails=$fails_a; else fails=$fails_s; fi
            read -r med mn _ mx n < <(python3 "$HELPER" stats <"$T/mbs-$pre-$srv-$dir")
            put "${pre}${srv}_${dir}_min" "$mn"; put "${pre}${srv}_${dir}_max" "$mx"
            if ((fails == 0)); then
                put "${pre}${srv}_${dir}_mbs" "$med"
            else
                put "${pre}${srv}_${dir}_mbs_err" "FAILED ($fails/$XFER_RUNS runs)"
                note "$srv $dir ($cipher): $fails of $XFER_RUNS transfers failed; ssh said: $(grep -v '^$' "$T/xfer-$srv.err" | head -1)"
            fi
        done
    done
    # Untimed check that every byte arrives.
    local got
    for srv in agent sshd; do
        ((ok[$srv])) || continue
        got="$(to "$srv" -c "$cipher" "$HOST" "head -c $BYTES /dev/zero" </dev/null 2>/dev/null | wc -c)"
        [[ $got == "$BYTES" ]] || note "$srv download check ($cipher): received $got of $BYTES bytes"
        got="$(head -c "$BYTES" /dev/zero | to "$srv" -c "$cipher" "$HOST" 'wc -c' 2>/dev/null | tr -d ' ')"
        [[ $got == "$BYTES" ]] || note "$srv upload check ($cipher): the remote side counted ${got:-nothing} of $BYTES bytes"
    done
    ((ok[agent] && ok[sshd]))
}
CIPHER=aes128-gcm@openssh.com
FALLBACK_CIPHER="${BENCH_FALLBACK_CIPHER:-aes256-gcm@openssh.com}"
put bytes "$BYTES"; put xfer_runs "$XFER_RUNS"
if ! throughput "" "$CIPHER"; then
    put fallback_cipher "$FALLBACK_CIPHER"
    throughput "fb_" "$FALLBACK_CIPHER" || note "the fallback cipher $FALLBACK_CIPHER does not work on both servers either"
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
for srv in agent sshd; do
    warn="$(grep -ciE 'panic|error' "$T/$srv.log")"
    ((warn == 0)) || note "$srv log has $warn line(s) with 'error'/'panic', e.g.: $(grep -iE 'panic|error' "$T/$srv.log" | head -1 | cut -c1-200)"
done

# ---------------------------------------------------------------- report
get() { sed -n "s/^$1=//p" "$RES" | tail -1; }
bin_sha="$(sha256sum "$AGENT_BIN" | cut -c1-16)"
bin_mtime="$(date -r "$AGENT_BIN" '+%Y-%m-%d %H:%M:%S %Z')"
sshd_pkg="$(dpkg-query -W -f '${Version}' openssh-server 2>/dev/null || echo unknown)"
echo
echo "## remote-agent vs OpenSSH sshd (loopback, one run)"
echo
echo "Measured binary: \`$AGENT_BIN\` ($("$AGENT_BIN" --version 2>&1), sha256 $bin_sha…, built $bin_mtime)"
echo
echo "- date: $(date '+%Y-%m-%d %H:%M:%S %Z')"
echo "- ssh -V: $(ssh -V 2>&1); sshd: $SSHD (openssh-server $sshd_pkg)"
echo "- agent --version: $("$AGENT_BIN" --version 2>&1)"
echo "- nproc: $(nproc); kernel $(uname -r); load average (1/5/15 min) at start $LOAD_START, at end $(cut -d' ' -f1-3 /proc/loadavg)"
echo "  (other work on the machine during the run makes the timings noisier; both servers are measured interleaved)"
echo "- both servers on 127.0.0.1, same ed25519 client key, same OS user (root), ed25519 host keys;"
echo "  sshd: UsePAM no, MaxStartups 300:30:400, MaxSessions 10; agent: max_startups 300"
echo
python3 "$HELPER" table "$RES"
echo
echo "Details:"
echo "- exec latency ms (min / p50 / p90 / max): agent $(get agent_exec_min) / $(get agent_exec_p50) / $(get agent_exec_p90) / $(get agent_exec_max); sshd $(get sshd_exec_min) / $(get sshd_exec_p50) / $(get sshd_exec_p90) / $(get sshd_exec_max)"
for pre in "" fb_; do
    [[ $pre == fb_ && -z $(get fallback_cipher) ]] && continue
    c="aes128-gcm@openssh.com"; [[ $pre == fb_ ]] && c="$(get fallback_cipher) (substitute)"
    for d in down up; do
        echo "- $d MB/s with $c (min / median / max): agent $(get ${pre}agent_${d}_min) / $(get ${pre}agent_${d}_mbs) / $(get ${pre}agent_${d}_max); sshd $(get ${pre}sshd_${d}_min) / $(get ${pre}sshd_${d}_mbs) / $(get ${pre}sshd_${d}_max)"
    done
done
echo "- each transfer time covers the whole \`ssh\` command: connection setup and shell start (about the exec latency above) plus the data"
echo "- idle connections: agent $(get agent_conns_ok)/$CONNS up, PSS $(get agent_pss_before) → $(get agent_pss_after) KiB ($(get agent_procs) process(es)), $(get agent_pss_closed) KiB after they closed;" \
     "sshd $(get sshd_conns_ok)/$CONNS up, PSS listener $(get sshd_pss_before) → tree $(get sshd_pss_after) KiB ($(get sshd_procs) processes), $(get sshd_pss_closed) KiB after they closed"
echo "- exec latency includes starting root's shell ($ROOT_SHELL, which reads ~/.bashrc when started over SSH): $(get shell_p50) ms p50 measured locally, in both servers' numbers alike"
echo "- sshd runs a root login without its post-auth privilege-separation child (OpenSSH skips it for uid 0), so it holds 1 process per connection here; for a non-root user it would hold 2, i.e. more memory per connection than measured"
echo "- agent exit status after SIGTERM: ${agent_rc:-still running}"
if ((${#NOTES[@]})); then
    echo
    echo "Notes (anomalies seen in this run):"
    for n in "${NOTES[@]}"; do echo "- $n"; done
fi
