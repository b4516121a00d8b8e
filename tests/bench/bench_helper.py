#!/usr/bin/env python3
"""Helper for ssh_vs_sshd.sh (standard library only).

Subcommands:
  free-port                 print a TCP port that is free on 127.0.0.1 right now
  tree PID                  print PID and all its descendants (one per line)
  pss-tree PID              print "<sum of Pss KiB> <process count>" over PID and descendants
  rss PID                   print VmRSS of PID in KiB
  stats                     read numbers (one per line) on stdin, print "p50 min p90 max n"
  table RESULTS             render the results file (key=value lines) as a Markdown table
"""

import os
import socket
import sys

from benchlib import num, print_table, read_results, stats, stats_of, status_field  # noqa: F401


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        print(s.getsockname()[1])


def parent_map():
    """Map pid -> ppid for every process visible in /proc."""
    parents = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read().decode("utf-8", "replace")
        except OSError:
            continue
        # comm is in parentheses and may contain anything: split after the last ')'.
        rest = stat[stat.rfind(")") + 2:].split()
        parents[int(name)] = int(rest[1])
    return parents


def descendants(root):
    parents = parent_map()
    children = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid != root and pid not in parents:
            continue
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out




def pss(pid):
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    raise KeyError("Pss")


def pss_tree(root):
    total, count = 0, 0
    for pid in descendants(root):
        try:
            total += pss(pid)
            count += 1
        except (OSError, KeyError):
            pass  # exited meanwhile
    print(total, count)






def table(path):
    r = read_results(path)

    def cell(key, fmt):
        x = num(r.get(key))
        if x is None:
            return r.get(key + "_err", "FAILED")
        return fmt.format(x)

    rows = []

    def ratio_row(label, akey, skey, fmt, op, target):
        a, s = num(r.get(akey)), num(r.get(skey))
        if a is None or s is None or s == 0:
            ratio, met = "n/a", "no (measurement failed)"
        else:
            q = a / s
            ratio = f"{q:.3f}"
            met = "yes" if (q <= target if op == "<=" else q >= target) else "no"
        rows.append((label, cell(akey, fmt), cell(skey, fmt), ratio, f"{op.replace('<=', '≤').replace('>=', '≥')} {target}", met))

    n_exec = r.get("exec_runs", "?")
    ratio_row(f"exec latency p50, `ssh … true` ({n_exec} runs) [ms]",
              "agent_exec_p50", "sshd_exec_p50", "{:.1f}", "<=", 1.0)
    size = r.get("bytes", "?")
    try:
        size_label = f"{int(size) / 2**30:g} GiB" if int(size) >= 2**30 else f"{int(size) / 2**20:g} MiB"
    except ValueError:
        size_label = size
    xr = r.get("xfer_runs", "1")
    ratio_row(f"download {size_label}, aes128-gcm@openssh.com (median of {xr}) [MB/s]",
              "agent_down_mbs", "sshd_down_mbs", "{:.0f}", ">=", 1.0)
    ratio_row(f"upload {size_label}, aes128-gcm@openssh.com (median of {xr}) [MB/s]",
              "agent_up_mbs", "sshd_up_mbs", "{:.0f}", ">=", 1.0)
    fb = r.get("fallback_cipher")
    if fb:
        # Substitute measurement when the specified cipher failed: shown, but labelled.
        for d, word in (("down", "download"), ("up", "upload")):
            ratio_row(f"*info only:* {word} {size_label} with substitute cipher {fb} (median of {xr}) [MB/s]",
                      f"fb_agent_{d}_mbs", f"fb_sshd_{d}_mbs", "{:.0f}", ">=", 1.0)
            label, a, s_, ratio, target, met = rows[-1]
            rows[-1] = (label, a, s_, ratio, target + " (info only)", met + " (info only)")
    conns = r.get("conns", "?")
    ratio_row(f"memory per idle authenticated connection, {conns} × `ssh -N` [KiB PSS/conn]",
              "agent_kib_per_conn", "sshd_kib_per_conn", "{:.0f}", "<=", 0.1)
    a_rss = num(r.get("agent_idle_rss_mib"))
    s_rss = num(r.get("sshd_idle_rss_mib"))
    rows.append((
        "idle RSS after startup, no connections, SSH only [MiB] (sshd: listener, for reference)",
        cell("agent_idle_rss_mib", "{:.1f}"),
        cell("sshd_idle_rss_mib", "{:.1f}"),
        f"{a_rss / s_rss:.3f}" if a_rss is not None and s_rss else "n/a",
        "agent ≤ 10 MiB",
        ("yes" if a_rss <= 10.0 else "no") if a_rss is not None else "no (measurement failed)",
    ))
    rows.append((
        "*info:* idle RSS with the WinRM HTTP and HTTPS listeners too (`run`'s defaults) [MiB]",
        cell("agent_full_idle_rss_mib", "{:.1f}"),
        "—", "—", "— (info)", "—",
    ))

    print_table(["metric", "remote-agent", "sshd", "agent/sshd", "target", "met"],
                ["---", "---:", "---:", "---:", "---", "---"], rows)


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "free-port":
        free_port()
    elif cmd == "tree":
        print("\n".join(str(p) for p in descendants(int(args[0]))))
    elif cmd == "pss-tree":
        pss_tree(int(args[0]))
    elif cmd == "rss":
        print(status_field(int(args[0]), "VmRSS"))
    elif cmd == "stats":
        stats()
    elif cmd == "table":
        table(args[0])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
