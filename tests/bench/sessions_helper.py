#!/usr/bin/env python3
"""Helper for sessions.sh (standard library only).

Subcommands:
  rss PID                   print VmRSS of PID in KiB
  stats                     read numbers (one per line) on stdin, print "p50 min p90 max n"
  timed --stall S [--stderr FILE] -- CMD...
                            run CMD with stdout to /dev/null, stdin from /dev/null; print
                            "rc seconds wchar stalled user sys": exit status (-N: killed by signal N),
                            wall time from fork to exit (pidfd, no polling delay), bytes CMD
                            wrote (/proc/PID/io wchar, read before it is reaped) and 1 when
                            it was killed because wchar did not move for S seconds, and CMD's
                            user and system CPU seconds
  cpu PID                   print user+system CPU seconds PID used so far
  echo --keys N --warmup W --gap MS --samples FILE [--quit remote|ssh] -- CMD...
                            keystroke echo round trip through a terminal: CMD runs on a fresh
                            pty (controlling terminal, 200x50); once its shell prompt is there
                            and the pty is in raw mode (CMD's local echo off), type W warm-up
                            letters, ^U, then N letters one at a time (^U every 50), each
                            timed from write() on the pty master to reading its echo back.
                            Samples (ms) go to FILE; prints "p50 p90 min max n failed".
  table RESULTS             render the results file (key=value lines) as a Markdown table
"""

import os
import select
import signal
import struct
import subprocess
import sys
import time

from benchlib import num, print_table, read_results, split_cmd, stats, stats_of, status_field  # noqa: F401




def wchar(pid):
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                if line.startswith("wchar:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None




def cpu(pid):
    """utime + stime of PID (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read().decode("utf-8", "replace")
    rest = stat[stat.rfind(")") + 2:].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(rest[11]) + int(rest[12])) / ticks




def timed(args):
    opts, cmd = split_cmd(args)
    stall = float(opts.get("stall", "30"))
    err = open(opts.get("stderr", "/dev/null"), "ab")
    out = open("/dev/null", "wb")
    import resource
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
    pfd = os.pidfd_open(p.pid)
    last_w, last_change, stalled = -1, t0, 0
    while True:
        ready, _, _ = select.select([pfd], [], [], 0.05)
        if ready:
            t1 = time.perf_counter()
            w = wchar(p.pid)  # a zombie's counters are still readable
            rc = p.wait()
            break
        now = time.perf_counter()
        w = wchar(p.pid)
        if w is not None and w != last_w:
            last_w, last_change = w, now
        elif now - last_change > stall:
            t1 = now
            p.kill()
            rc = p.wait()
            stalled = 1
            break
    if w is None:
        w = last_w
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_user, cpu_sys = ru1.ru_utime - ru0.ru_utime, ru1.ru_stime - ru0.ru_stime
    print(f"{rc} {t1 - t0:.6f} {w} {stalled} {cpu_user:.3f} {cpu_sys:.3f}")


# ------------------------------------------------------------------ keystroke echo

LETTERS = b"abcdefghijklmnopqrstuvwxyz"


class Pty:
    def __init__(self, cmd, log):
        import fcntl
        import termios

        self.termios = termios
        master, slave = os.openpty()
        # 50 rows x 200 columns, set before the program starts so it reads this size.
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))

        def child_setup():
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        env = dict(os.environ, TERM="xterm")
        self.proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave,
                                     preexec_fn=child_setup, env=env, close_fds=True)
        os.close(slave)
        self.fd = master
        self.log = log
        self.eof = False

    def read(self, timeout):
        """Read what is there within timeout; b'' if nothing (or EOF)."""
        if self.eof:
            return b""
        ready, _, _ = select.select([self.fd], [], [], max(0.0, timeout))
        if not ready:
            return b""
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: every slave fd closed
            data = b""
        if not data:
            self.eof = True
            return b""
        self.log.write(data)
        return data

    def quiet(self, secs, limit):
        """Read until nothing arrives for secs (at most limit seconds); return what came."""
        got = bytearray()
        end = time.monotonic() + limit
        while time.monotonic() < end and not self.eof:
            d = self.read(min(secs, end - time.monotonic()))
            if not d:
                break
            got += d
        return bytes(got)

    def local_echo_off(self):
        # On Linux tcgetattr on the master returns the slave's settings: the program on the
        # pty (remote attach / ssh -tt) must have put it in raw mode, otherwise the kernel
        # would echo our keys locally and we would time nothing.
        attrs = self.termios.tcgetattr(self.fd)
        lflag = attrs[3]
        return not (lflag & self.termios.ECHO) and not (lflag & self.termios.ICANON)


def echo(args):
    opts, cmd = split_cmd(args)
    keys = int(opts.get("keys", "300"))
    warmup = int(opts.get("warmup", "20"))
    gap = float(opts.get("gap", "20")) / 1000
    samples_path = opts["samples"]
    quit_mode = opts.get("quit", "remote")
    log = open(opts.get("log", "/dev/null"), "ab")
    p = Pty(cmd, log)

    def fail(msg):
        tail = open(opts["log"], "rb").read()[-300:] if "log" in opts else b""
        print(f"nan nan nan nan 0 0 {msg}: output ends with {tail!r}")
        try:
            p.proc.kill()
        except OSError:
            pass
        p.proc.wait()
        sys.exit(0)

    # 1. The shell prompt ("$ " for /bin/sh, "# " for root), then raw mode on our pty.
    seen = bytearray()
    end = time.monotonic() + 30
    while time.monotonic() < end:
        d = p.read(0.2)
        seen += d
        if p.eof:
            fail("the program exited before a prompt")
        if seen.endswith((b"$ ", b"# ")) and not d:
            break
    else:
        fail("no shell prompt within 30 s")
    end = time.monotonic() + 10
    while not p.local_echo_off():
        if time.monotonic() > end:
            fail("the pty was never put in raw mode (local echo still on)")
        p.read(0.05)
    p.quiet(0.3, 3)

    def kill_line():
        os.write(p.fd, b"\x15")
        p.quiet(0.15, 3)

    def one(c):
        # Anything left over (there should be nothing) must not be taken for the echo.
        while p.read(0):
            pass
        t0 = time.perf_counter_ns()
        os.write(p.fd, bytes([c]))
        got = bytearray()
        deadline = time.monotonic() + 5
        while True:
            d = p.read(deadline - time.monotonic())
            if not d:
                return None
            got += d
            if c in got:
                return (time.perf_counter_ns() - t0) / 1e6

    for i in range(warmup):
        one(LETTERS[i % 26])
    kill_line()
    samples, failed = [], 0
    for i in range(keys):
        if i and i % 50 == 0:
            kill_line()
        ms = one(LETTERS[i % 26])
        if ms is None:
            failed += 1
            if p.eof:
                break
        else:
            samples.append(ms)
        time.sleep(gap)
    kill_line()
    # 2. Leave: detach (Enter ~ .) from remote attach; log out of the ssh shell.
    os.write(p.fd, b"\r~." if quit_mode == "remote" else b"exit\r")
    try:
        p.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        p.proc.send_signal(signal.SIGTERM)
        try:
            p.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.proc.kill()
            p.proc.wait()
    with open(samples_path, "w") as f:
        for ms in samples:
            f.write(f"{ms:.4f}\n")
    s = stats_of(samples)
    if s is None:
        print(f"nan nan nan nan 0 {failed} no echo received")
        return
    p50, mn, p90, mx, n = s
    print(f"{p50:.4f} {p90:.4f} {mn:.4f} {mx:.4f} {n} {failed} exit={p.proc.returncode}")


# ------------------------------------------------------------------ report



def table(path):
    r = read_results(path)

    def cell(key, fmt):
        x = num(r.get(key))
        if x is None:
            return r.get(key + "_err", "FAILED")
        return fmt.format(x)

    def met(key, op, target):
        x = num(r.get(key))
        if x is None:
            return "no (measurement failed)"
        return "yes" if (x <= target if op == "<=" else x >= target) else "no"

    rows = []
    # 1. replay
    mib = r.get("replay_mib", "?")
    jmb = r.get("replay_journal_mb", "?")
    runs = r.get("replay_runs", "?")
    stalled = int(r.get("replay_stalled", "0") or 0)
    m = met("replay_mbs", ">=", 500)
    if "replay_mbs" not in r and stalled:
        m = f"no ({stalled} of {runs} runs stalled: `remote receive` stopped making progress)"
    rows.append((
        f"1. replay rate: `remote receive SESSION > /dev/null` of {mib} MiB of output "
        f"(`head -c {r.get('replay_bytes', '?')} /dev/zero`) from a {jmb} MiB journal, median of {runs} runs [MB/s]",
        cell("replay_mbs", "{:.0f}"), "≥ 500", m))
    rows.append((
        "1. agent RSS with that journal full (info) [MiB]",
        cell("replay_rss_full_mib", "{:.0f}"), "— (info)", "—"))
    # 2. keystroke echo
    keys = r.get("echo_keys", "?")
    rows.append((
        f"2. keystroke echo round trip p50, `remote attach` to a terminal session ({keys} keys) [ms]",
        cell("echo_remote_p50", "{:.3f}"), "≤ 1", met("echo_remote_p50", "<=", 1.0)))
    rows.append((
        "2. keystroke echo round trip p90, `remote attach` (info) [ms]",
        cell("echo_remote_p90", "{:.3f}"), "— (info)", "—"))
    rows.append((
        f"2. reference: OpenSSH `ssh -tt` shell on the same agent, p50 / p90 ({keys} keys) [ms]",
        cell("echo_ssh_p50", "{:.3f}") + " / " + cell("echo_ssh_p90", "{:.3f}"), "— (reference)", "—"))
    # 3. fan-out
    n = r.get("fan_n", "?")
    th = r.get("fan_throttle", "?")
    runs = r.get("fan_runs", "?")
    rows.append((
        f"3. fan-out wall time, `remote run --throttle {th}` × {n} targets `-- true` (median of {runs}) [s]",
        cell("fan_remote_s", "{:.3f}"), "— (see ratio)", "—"))
    rows.append((
        f"3. fan-out wall time, `seq {n} \\| xargs -P {th} … ssh … true` (median of {runs}) [s]",
        cell("fan_ssh_s", "{:.3f}"), "— (see ratio)", "—"))
    a, s = num(r.get("fan_remote_s")), num(r.get("fan_ssh_s"))
    ok = r.get("fan_all_ok") == "1"
    if a and s:
        q = s / a
        m = ("yes" if q >= 3 else "no") if ok else "no (not every run succeeded)"
        rows.append(("3. fan-out speed-up, ssh time / remote run time", f"{q:.2f}×", "≥ 3×", m))
    else:
        rows.append(("3. fan-out speed-up, ssh time / remote run time", "n/a", "≥ 3×",
                     "no (measurement failed)"))

    print_table(["metric", "value", "target", "met"], ["---", "---:", "---", "---"], rows)


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "rss":
        print(status_field(int(args[0]), "VmRSS"))
    elif cmd == "cpu":
        print(f"{cpu(int(args[0])):.2f}")
    elif cmd == "stats":
        stats()
    elif cmd == "timed":
        timed(args)
    elif cmd == "echo":
        echo(args)
    elif cmd == "table":
        table(args[0])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
