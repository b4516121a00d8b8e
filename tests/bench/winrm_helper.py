#!/usr/bin/env python3
"""Helper for winrm.sh (standard library only; no pywinrm: it would spend more CPU than the
agent it measures).

Subcommands:
  spawn --mode fork|posix_spawn --n N [--procs P] -- PROG [ARG...]
                            start PROG N times in a loop, each waited for before the next
                            (fork: os.fork + os.execv in the child + os.waitpid; posix_spawn:
                            os.posix_spawn + os.waitpid), in each of P processes at once
                            (default 1). Prints "rate cpu_ms child_cpu_ms failed": spawns per
                            second over all loops, the loop processes' own CPU (user+sys,
                            getrusage RUSAGE_SELF, i.e. not their children) per spawn, the
                            children's CPU per spawn, and spawns that did not exit 0
  probe --url URL --user U --password-file F -- COMMAND
                            one run_cmd round trip (Create, Command, Receive until Done,
                            Signal terminate, Delete); prints the exit code, then stdout
  load --url URL --user U --password-file F --clients N --procs P --warmup S --secs S
       --agent-pid PID --agent-log FILE --prefix PFX
                            the timed load: N clients in P worker processes, each on one
                            keep-alive connection, doing run_cmd('true') round trips in a loop
                            for S(warmup) + S(secs) seconds. Prints PFX_KEY=VALUE result lines
                            for the timed window (see load() for the keys)
  table RESULTS             render the results file (key=value lines) as a Markdown table

URLs are http://HOST:PORT/wsman or https://HOST:PORT/wsman (certificate not verified).
"""

import base64
import http.client
import multiprocessing
import os
import re
import resource
import socket
import ssl
import sys
import threading
import time
import uuid

from benchlib import num, parse_opts, print_table, read_results, split_cmd, status_field

# ------------------------------------------------------------------ WinRM envelopes
# Byte for byte what pywinrm 0.5.0 sends for Session.run_cmd (xmltodict.unparse of its
# dicts), with the MessageID, ShellId and CommandId filled in.

_HEAD = (
    '<?xml version="1.0" encoding="utf-8"?>\n'
    '<env:Envelope xmlns:xsd="http://www.w3.org/2001/XMLSchema" '
    'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
    'xmlns:env="http://www.w3.org/2003/05/soap-envelope" '
    'xmlns:a="http://schemas.xmlsoap.org/ws/2004/08/addressing" '
    'xmlns:b="http://schemas.dmtf.org/wbem/wsman/1/cimbinding.xsd" '
    'xmlns:n="http://schemas.xmlsoap.org/ws/2004/09/enumeration" '
    'xmlns:x="http://schemas.xmlsoap.org/ws/2004/09/transfer" '
    'xmlns:w="http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd" '
    'xmlns:p="http://schemas.microsoft.com/wbem/wsman/1/wsman.xsd" '
    'xmlns:rsp="http://schemas.microsoft.com/wbem/wsman/1/windows/shell" '
    'xmlns:cfg="http://schemas.microsoft.com/wbem/wsman/1/config">'
    "<env:Header><a:To>http://windows-host:5985/wsman</a:To>"
    '<a:ReplyTo><a:Address mustUnderstand="true">'
    "http://schemas.xmlsoap.org/ws/2004/08/addressing/role/anonymous</a:Address></a:ReplyTo>"
    '<w:MaxEnvelopeSize mustUnderstand="true">153600</w:MaxEnvelopeSize>'
    "<a:MessageID>uuid:"
)
_HEAD2 = (
    "</a:MessageID>"
    '<w:Locale mustUnderstand="false" xml:lang="en-US"></w:Locale>'
    '<p:DataLocale mustUnderstand="false" xml:lang="en-US"></p:DataLocale>'
    "<w:OperationTimeout>PT20S</w:OperationTimeout>"
    '<w:ResourceURI mustUnderstand="true">'
    "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/cmd</w:ResourceURI>"
    '<a:Action mustUnderstand="true">'
)
_SHELL_NS = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell"
_SEL = '<w:SelectorSet><w:Selector Name="ShellId">'
_SEL2 = "</w:Selector></w:SelectorSet>"


def _env(mid, action, shell=None, options="", body=""):
    sel = _SEL + shell + _SEL2 if shell else ""
    return (_HEAD + mid + _HEAD2 + action + "</a:Action>" + sel + options
            + "</env:Header><env:Body>" + body + "</env:Body></env:Envelope>").encode()


def env_create(mid):
    return _env(
        mid, "http://schemas.xmlsoap.org/ws/2004/09/transfer/Create",
        options='<w:OptionSet><w:Option Name="WINRS_NOPROFILE">FALSE</w:Option>'
                '<w:Option Name="WINRS_CODEPAGE">437</w:Option></w:OptionSet>',
        body="<rsp:Shell><rsp:InputStreams>stdin</rsp:InputStreams>"
             "<rsp:OutputStreams>stdout stderr</rsp:OutputStreams></rsp:Shell>")


def env_command(mid, shell, command):
    return _env(
        mid, _SHELL_NS + "/Command", shell,
        options='<w:OptionSet><w:Option Name="WINRS_CONSOLEMODE_STDIN">TRUE</w:Option>'
                '<w:Option Name="WINRS_SKIP_CMD_SHELL">FALSE</w:Option></w:OptionSet>',
        body="<rsp:CommandLine><rsp:Command>" + command + "</rsp:Command></rsp:CommandLine>")


def env_receive(mid, shell, cid):
    return _env(
        mid, _SHELL_NS + "/Receive", shell,
        body='<rsp:Receive><rsp:DesiredStream CommandId="' + cid
             + '">stdout stderr</rsp:DesiredStream></rsp:Receive>')


def env_signal(mid, shell, cid):
    return _env(
        mid, _SHELL_NS + "/Signal", shell,
        body='<rsp:Signal CommandId="' + cid + '"><rsp:Code>' + _SHELL_NS
             + "/signal/terminate</rsp:Code></rsp:Signal>")


def env_delete(mid, shell):
    return _env(mid, "http://schemas.xmlsoap.org/ws/2004/09/transfer/Delete", shell)


RE_SHELLID = re.compile(rb'Name="ShellId"[^>]*>([^<]+)<')
RE_CMDID = re.compile(rb"CommandId>([^<]+)<")
RE_DONE = re.compile(rb'State="[^"]*CommandState/Done"')
RE_EXIT = re.compile(rb"ExitCode>\s*(-?\d+)\s*<")
RE_STREAM = re.compile(rb'<(?:\w+:)?Stream\b([^>]*)>([^<]+)<')
RE_RELATES = re.compile(rb"RelatesTo>([^<]*)<")
RE_FAULTCODE = re.compile(rb'WSManFault\b[^>]*\bCode="(\d+)"')
RE_REASON = re.compile(rb"<(?:\w+:)?Text\b[^>]*>([^<]*)<")
TIMED_OUT = b"2150858793"


class Failure(Exception):
    """A round trip that did not go as pywinrm's run_cmd expects."""


class Counting:
    """Counts TCP connections opened (http.client reconnects silently when the server
    closes a keep-alive connection)."""

    def connect(self):
        self.connects = getattr(self, "connects", 0) + 1
        super().connect()


class HTTPConn(Counting, http.client.HTTPConnection):
    pass


class HTTPSConn(Counting, http.client.HTTPSConnection):
    pass


def parse_url(url):
    m = re.match(r"^(https?)://([^/:]+):(\d+)(/.*)$", url)
    if not m:
        sys.exit(f"bad url {url!r}: want http(s)://HOST:PORT/wsman")
    return m.group(1), m.group(2), int(m.group(3)), m.group(4)


class Client:
    """One keep-alive connection and pywinrm's request headers; call() is one POST."""

    def __init__(self, url, user, password, timeout=30.0):
        scheme, self.host, self.port, self.path = parse_url(url)
        self.timeout = timeout
        self.tls = scheme == "https"
        self.headers = {
            "User-Agent": "Python WinRM client",
            "Accept-Encoding": "gzip, deflate",
            "Accept": "*/*",
            "Connection": "keep-alive",
            "Content-Type": "application/soap+xml;charset=UTF-8",
            "Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode(),
        }
        if self.tls:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            self.conn = HTTPSConn(self.host, self.port, timeout=timeout, context=ctx)
        else:
            self.conn = HTTPConn(self.host, self.port, timeout=timeout)

    def connects(self):
        return getattr(self.conn, "connects", 0)

    def call(self, op, body, mid):
        """POST body; (status, response body). Raises Failure on transport errors."""
        try:
            self.conn.request("POST", self.path, body, self.headers)
            r = self.conn.getresponse()
            data = r.read()
        except (OSError, http.client.HTTPException) as e:
            self.conn.close()
            kind = "timed out" if isinstance(e, socket.timeout) else type(e).__name__
            raise Failure(f"{op}: {kind}: {e}"[:300]) from None
        if r.status == 200 and mid.encode() not in data:
            raise Failure(f"{op}: HTTP 200 without RelatesTo uuid:{mid}")
        return r.status, data

    def expect_200(self, op, status, data):
        if status != 200:
            raise Failure(f"{op}: HTTP {status}{describe_fault(data)}")

    def run_cmd(self, command, times=None):
        """pywinrm's Session.run_cmd: (exit code, stdout bytes, receives, timeouts).
        times, when a list, gets the seconds each of the five steps took."""
        pc = time.perf_counter
        shell = None
        try:
            t = pc()
            mid = str(uuid.uuid4())
            status, data = self.call("Create", env_create(mid), mid)
            self.expect_200("Create", status, data)
            m = RE_SHELLID.search(data)
            if not m:
                raise Failure("Create: no ShellId in the response")
            shell = m.group(1).decode()
            t1 = pc()
            mid = str(uuid.uuid4())
            status, data = self.call("Command", env_command(mid, shell, command), mid)
            self.expect_200("Command", status, data)
            m = RE_CMDID.search(data)
            if not m:
                raise Failure("Command: no CommandId in the response")
            cid = m.group(1).decode()
            t2 = pc()
            out, receives, timeouts = [], 0, 0
            while True:
                mid = str(uuid.uuid4())
                status, data = self.call("Receive", env_receive(mid, shell, cid), mid)
                receives += 1
                if status == 500 and TIMED_OUT in data:
                    timeouts += 1  # pywinrm: WinRMOperationTimeoutError, re-issued silently
                    continue
                self.expect_200("Receive", status, data)
                for attrs, text in RE_STREAM.findall(data):
                    if b'Name="stdout"' in attrs:
                        out.append(base64.b64decode(text))
                done = len(RE_DONE.findall(data))
                if done == 1:
                    m = RE_EXIT.search(data)
                    if not m:
                        raise Failure("Receive: CommandState Done without ExitCode")
                    code = int(m.group(1))
                    break
                if done > 1:
                    raise Failure("Receive: more than one CommandState Done")
            t3 = pc()
            mid = str(uuid.uuid4())
            status, data = self.call("Signal", env_signal(mid, shell, cid), mid)
            self.expect_200("Signal", status, data)
            t4 = pc()
            mid = str(uuid.uuid4())
            status, data = self.call("Delete", env_delete(mid, shell), mid)
            shell = None
            self.expect_200("Delete", status, data)
            t5 = pc()
            if times is not None:
                times.extend((t1 - t, t2 - t1, t3 - t2, t4 - t3, t5 - t4))
            return code, b"".join(out), receives, timeouts
        except Failure:
            if shell is not None:
                self.cleanup(shell)
            raise

    def cleanup(self, shell):
        """Best effort: delete a shell a failed round trip left behind (quota)."""
        try:
            mid = str(uuid.uuid4())
            self.call("Delete (cleanup)", env_delete(mid, shell), mid)
        except Failure:
            pass


def describe_fault(data):
    if not data:
        return " (empty body)"
    code = RE_FAULTCODE.search(data)
    reason = RE_REASON.search(data)
    parts = []
    if code:
        parts.append(f"WSManFault {code.group(1).decode()}")
    if reason:
        parts.append(reason.group(1).decode("utf-8", "replace").strip()[:160])
    return " (" + ": ".join(parts) + ")" if parts else f" ({data[:120]!r})"


# ------------------------------------------------------------------ /proc readings

def cpu_of(pid):
    """(utime+stime, cutime+cstime) of PID in seconds: all its threads, and its reaped
    children."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read().decode("utf-8", "replace")
    rest = stat[stat.rfind(")") + 2:].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(rest[11]) + int(rest[12])) / ticks, (int(rest[13]) + int(rest[14])) / ticks


def file_size(path):
    try:
        return os.path.getsize(path)
    except OSError:
        return None


# ------------------------------------------------------------------ spawn baselines

def spawn_loop(mode, n, argv):
    """n spawns of argv one after another; (seconds, own CPU s, children CPU s, failed)."""
    prog = argv[0]
    env = dict(os.environ)
    failed = 0
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    rc0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    if mode == "fork":
        for _ in range(n):
            pid = os.fork()
            if pid == 0:
                try:
                    os.execv(prog, argv)
                finally:
                    os._exit(127)
            _, st = os.waitpid(pid, 0)
            if st:
                failed += 1
    else:
        spawn = os.posix_spawn
        for _ in range(n):
            pid = spawn(prog, argv, env)
            _, st = os.waitpid(pid, 0)
            if st:
                failed += 1
    secs = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    rc1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    kids = (rc1.ru_utime - rc0.ru_utime) + (rc1.ru_stime - rc0.ru_stime)
    return secs, own, kids, failed


def spawn(args):
    opts, cmd = split_cmd(args)
    mode = opts.get("mode", "fork")
    if mode not in ("fork", "posix_spawn"):
        sys.exit("--mode is fork or posix_spawn")
    n = int(opts.get("n", "2000"))
    procs = int(opts.get("procs", "1"))
    spawn_loop(mode, max(1, n // 20), cmd)  # warm-up: page cache, first faults
    if procs == 1:
        secs, own, kids, failed = spawn_loop(mode, n, cmd)
    else:
        # P loops at once; each reports through a pipe. Rate = all spawns / longest loop.
        kids_pids = []
        for _ in range(procs):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(r)
                res = spawn_loop(mode, n, cmd)
                os.write(w, (" ".join(repr(x) for x in res)).encode())
                os._exit(0)
            os.close(w)
            kids_pids.append((pid, r))
        secs = own = kids = 0.0
        failed = 0
        for pid, r in kids_pids:
            data = b""
            while True:
                chunk = os.read(r, 4096)
                if not chunk:
                    break
                data += chunk
            os.close(r)
            os.waitpid(pid, 0)
            s, o, k, f = (float(x) for x in data.split())
            secs, own, kids, failed = max(secs, s), own + o, kids + k, failed + int(f)
    total = n * procs
    print(f"{total / secs:.1f} {own / total * 1e3:.4f} {kids / total * 1e3:.4f} {failed}")


def read_password(path):
    with open(path) as f:
        return f.readline().rstrip("\n")


# ------------------------------------------------------------------ probe

def probe(args):
    opts, cmd = split_cmd(args)
    c = Client(opts["url"], opts["user"], read_password(opts["password-file"]))
    try:
        code, out, _, _ = c.run_cmd(" ".join(cmd))
    except Failure as e:
        print(f"FAILED {e}")
        return
    print(code)
    sys.stdout.write(out.decode("utf-8", "replace"))


# ------------------------------------------------------------------ load

def client_thread(cfg, t1, done, fails, counters, lock):
    c = Client(cfg["url"], cfg["user"], cfg["password"])
    mine_done, mine_fail = [], []
    receives = timeouts = 0
    pc, mono = time.perf_counter, time.monotonic
    while mono() < t1:
        times = []
        start = pc()
        try:
            code, out, r, to = c.run_cmd("true", times)
            receives += r
            timeouts += to
            if code != 0:
                raise Failure(f"exit code {code} (expected 0)")
            if out:
                raise Failure(f"unexpected stdout {out[:60]!r}")
        except Failure as e:
            mine_fail.append((mono(), str(e)))
            continue
        end = pc()
        # (completion time, round trip, Create, Command, Receive(s), Signal, Delete)
        mine_done.append((mono(), end - start, *times))
    with lock:
        done.extend(mine_done)
        fails.extend(mine_fail)
        counters["receives"] += receives
        counters["timeouts"] += timeouts
        counters["connects"] += c.connects()


def worker(pipe, nclients, cfg, t1):
    done, fails = [], []
    counters = {"receives": 0, "timeouts": 0, "connects": 0}
    lock = threading.Lock()
    threads = [threading.Thread(target=client_thread, args=(cfg, t1, done, fails, counters, lock))
               for _ in range(nclients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pipe.send((done, fails, counters))
    pipe.close()


def sleep_until(t):
    while True:
        d = t - time.monotonic()
        if d <= 0:
            return
        time.sleep(min(d, 0.5))


def pct(xs, q):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def load(args):
    """Prints, with PFX_ before each key:
      clients procs warmup_s window_s  the set-up (window_s as measured)
      cmds rate                     round trips completed in the window, per second
      agent_cpu_s agent_cpu_ms      agent utime+stime over the window; per command in ms
      agent_children_cpu_ms         the agent's reaped children (the commands), per command
      agent_cpu_pct                 agent CPU over the window, % of one CPU
      gen_cpu_ms                    the load generator's own CPU per command
      lat_p50 lat_p90 lat_min lat_max   one round trip, ms, over the window's commands
      op_{create,command,receive,signal,delete}_p50   each step, ms
      receives_per_cmd timeouts     Receive requests per command; TimedOut faults (retried)
      connects                      TCP connections opened by all clients (clients = ideal)
      fail_window fail_total fail_first   failed round trips; the first messages
      max_gap_s                     longest time in the window with no round trip completed
      rss_start_mib rss_end_mib hwm_mib   agent VmRSS before the load / after the window; VmHWM
      log_lines log_bytes           agent log written during the window
      stuck                         worker processes still busy 40 s after the window
    """
    o = parse_opts(args)
    clients, procs = int(o["clients"]), int(o["procs"])
    warmup, secs = float(o["warmup"]), float(o["secs"])
    agent = int(o["agent-pid"])
    pfx = o["prefix"]
    cfg = {"url": o["url"], "user": o["user"], "password": read_password(o["password-file"])}
    procs = max(1, min(procs, clients))
    per = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    rss_start = status_field(agent, "VmRSS")
    mp = multiprocessing.get_context("fork")
    start = time.monotonic()
    t0 = start + warmup
    t1 = t0 + secs
    workers = []
    for n in per:
        r, w = mp.Pipe(duplex=False)
        p = mp.Process(target=worker, args=(w, n, cfg, t1), daemon=True)
        p.start()
        w.close()
        workers.append((p, r))
    sleep_until(t0)
    w0 = time.monotonic()
    a0, c0 = cpu_of(agent)
    g0 = sum(cpu_of(p.pid)[0] for p, _ in workers)
    log0 = file_size(o.get("agent-log", ""))
    sleep_until(t1)
    w1 = time.monotonic()
    a1, c1 = cpu_of(agent)
    g1 = sum(cpu_of(p.pid)[0] for p, _ in workers)
    log1 = file_size(o.get("agent-log", ""))
    rss_end = status_field(agent, "VmRSS")
    hwm = status_field(agent, "VmHWM")
    print(f"[winrm_helper] {pfx}: window over, waiting for in-flight round trips", file=sys.stderr)
    done, fails = [], []
    counters = {"receives": 0, "timeouts": 0, "connects": 0}
    stuck = 0
    deadline = time.monotonic() + 40  # the clients' read timeout is 30 s
    for p, r in workers:
        if r.poll(max(0.0, deadline - time.monotonic())):
            d, f, c = r.recv()
            done.extend(d)
            fails.extend(f)
            for k in counters:
                counters[k] += c[k]
            p.join(5)
        else:
            stuck += 1
            p.kill()
            p.join()
    win = [d for d in done if w0 <= d[0] <= w1]
    n = len(win)
    fail_win = [f for f in fails if w0 <= f[0] <= w1]
    window = w1 - w0
    res = {
        "clients": clients, "procs": procs, "warmup_s": f"{warmup:g}", "window_s": f"{window:.3f}",
        "cmds": n, "rate": f"{n / window:.1f}",
        "agent_cpu_s": f"{a1 - a0:.3f}",
        "agent_cpu_pct": f"{(a1 - a0) / window * 100:.1f}",
        "rss_start_mib": f"{rss_start / 1024:.1f}", "rss_end_mib": f"{rss_end / 1024:.1f}",
        "hwm_mib": f"{hwm / 1024:.1f}",
        "timeouts": counters["timeouts"], "connects": counters["connects"],
        "fail_window": len(fail_win), "fail_total": len(fails), "stuck": stuck,
        "cmds_total": len(done),
    }
    if n:
        res["agent_cpu_ms"] = f"{(a1 - a0) / n * 1e3:.4f}"
        res["agent_children_cpu_ms"] = f"{(c1 - c0) / n * 1e3:.4f}"
        res["gen_cpu_ms"] = f"{(g1 - g0) / n * 1e3:.4f}"
        lat = [d[1] * 1e3 for d in win]
        res["lat_p50"] = f"{pct(lat, 0.5):.3f}"
        res["lat_p90"] = f"{pct(lat, 0.9):.3f}"
        res["lat_min"] = f"{min(lat):.3f}"
        res["lat_max"] = f"{max(lat):.3f}"
        for i, name in enumerate(("create", "command", "receive", "signal", "delete")):
            res[f"op_{name}_p50"] = f"{pct([d[2 + i] * 1e3 for d in win], 0.5):.3f}"
        total_cmds = len(done)
        res["receives_per_cmd"] = f"{counters['receives'] / max(1, total_cmds + len(fails)):.3f}"
        ts = sorted([w0] + [d[0] for d in win] + [w1])
        res["max_gap_s"] = f"{max(b - a for a, b in zip(ts, ts[1:])):.3f}"
    if fails:
        seen = []
        for _, msg in fails:
            if msg not in seen:
                seen.append(msg)
            if len(seen) == 3:
                break
        res["fail_first"] = " | ".join(m.replace("\n", " ") for m in seen)
    if log0 is not None and log1 is not None:
        res["log_bytes"] = log1 - log0
        try:
            with open(o["agent-log"], "rb") as f:
                f.seek(log0)
                res["log_lines"] = f.read(log1 - log0).count(b"\n")
        except OSError:
            pass
    for k, v in res.items():
        print(f"{pfx}_{k}={v}")


# ------------------------------------------------------------------ report

SCHEME_LABEL = {"http": "HTTP + Basic (--allow-unencrypted)", "https": "HTTPS + Basic"}


def table(path):
    r = read_results(path)

    def cell(key, fmt):
        x = num(r.get(key))
        if x is None:
            return r.get(key + "_err", "FAILED")
        return fmt.format(x)

    rows = []
    n = r.get("spawn_n", "?")
    rows.append((f"A. spawn rate, bash loop `for i in $(seq {n}); do /bin/true; done` [/s]",
                 cell("spawn_shell_rate", "{:.0f}"), "— (baseline)", "—"))
    rows.append((f"A. spawn rate, Python loop of os.fork + os.execv + os.waitpid, {n} × /bin/true [/s]",
                 cell("spawn_fork_rate", "{:.0f}"), "— (baseline)", "—"))
    rows.append((f"A. spawn rate, Python loop of os.posix_spawn + os.waitpid, {n} × /bin/true [/s]",
                 cell("spawn_posix_rate", "{:.0f}"), "— (baseline)", "—"))
    rows.append(("A. spawn rate of this machine: the fastest of the three [/s]",
                 cell("spawn_rate", "{:.0f}"), "— (baseline)", "—"))
    rows.append(("A. reference spawn CPU: the fork+exec loop's own CPU (user+sys, not its "
                 "children) per /bin/true [ms]",
                 cell("spawn_ref_cpu_ms", "{:.3f}"), "— (subtracted in 2.)", "—"))
    spawn_rate = num(r.get("spawn_rate"))
    ref = num(r.get("spawn_ref_cpu_ms"))
    for scheme in r.get("schemes", "").split():
        p = scheme + "_"
        label = SCHEME_LABEL.get(scheme, scheme)
        clients = r.get(p + "clients", "?")
        window = r.get(p + "window_s", "?")
        fw = int(num(r.get(p + "fail_window")) or 0)
        stuck = int(num(r.get(p + "stuck")) or 0)
        cmds = r.get(p + "cmds", "?")
        problem = None
        if fw or stuck:
            problem = f"no ({fw} round trips failed in the window" + (
                f", {stuck} worker(s) stuck" if stuck else "") + "; see notes)"
        rate = num(r.get(p + "rate"))
        rows.append((f"1. {label}: commands/s, {clients} clients, keep-alive, run_cmd('true') "
                     f"round trips completed in {window} s ({cmds})",
                     cell(p + "rate", "{:.1f}"), "— (see ratio)", "—"))
        if rate is not None and spawn_rate:
            q = rate / spawn_rate
            m = problem or ("yes" if q >= 0.5 else "no")
            rows.append((f"1. {label}: commands/s ÷ spawn rate", f"{q:.3f}", "≥ 0.5", m))
        else:
            rows.append((f"1. {label}: commands/s ÷ spawn rate", "n/a", "≥ 0.5",
                         "no (measurement failed)"))
        rows.append((f"2. {label}: agent CPU (utime+stime of the agent process) per command [ms]",
                     cell(p + "agent_cpu_ms", "{:.3f}"), "— (see difference)", "—"))
        cpu = num(r.get(p + "agent_cpu_ms"))
        if cpu is not None and ref is not None:
            d = cpu - ref
            m = problem or ("yes" if d < 1.0 else "no")
            rows.append((f"2. {label}: agent CPU per command − reference spawn CPU [ms]",
                         f"{d:.3f}", "< 1", m))
        else:
            rows.append((f"2. {label}: agent CPU per command − reference spawn CPU [ms]",
                         "n/a", "< 1", "no (measurement failed)"))
        rows.append((f"3. {label}: round trip latency p50 / p90, client side [ms]",
                     cell(p + "lat_p50", "{:.2f}") + " / " + cell(p + "lat_p90", "{:.2f}"),
                     "— (info)", "—"))
        rows.append((f"3. {label}: agent RSS after the window (peak) [MiB]",
                     cell(p + "rss_end_mib", "{:.1f}") + " (" + cell(p + "hwm_mib", "{:.1f}") + ")",
                     "— (info)", "—"))
    print_table(["metric", "value", "target", "met"], ["---", "---:", "---", "---"], rows)


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "spawn":
        spawn(args)
    elif cmd == "probe":
        probe(args)
    elif cmd == "load":
        load(args)
    elif cmd == "table":
        table(args[0])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
