#!/usr/bin/env python3
"""Helper for relay.sh (standard library only). The keystroke echo measurement and the CPU
and statistics helpers are sessions_helper.py's, called as they are.

Subcommands:
  rss PID         print VmRSS of PID in KiB
  table RESULTS   render the results file (key=value lines) as a Markdown table
"""

import sys

from benchlib import num, print_table, read_results, status_field


def table(path):
    r = read_results(path)

    def cell(key, fmt):
        x = num(r.get(key))
        if x is None:
            return r.get(key + "_err", "FAILED")
        return fmt.format(x)

    def met(x, op, target):
        if x is None:
            return "no (measurement failed)"
        return "yes" if (x <= target if op == "<=" else x >= target) else "no"

    rows = []
    # 1. idle tunnels
    if "e_enrolled" in r or "t_count" in r:
        n = r.get("t_count", "?")
        warm = r.get("t_warmup", "?")
        measured = (f"{num(n) - num(warm):.0f}"
                    if num(n) is not None and num(warm) is not None else "?")
        per = num(r.get("t_relay_kib_per_tunnel"))
        complete = r.get("t_failed") == "0" and r.get("t_dropped") == "0"
        m = met(per, "<=", 20.0)
        if per is not None and not complete:
            m = f"no ({r.get('t_failed')} failed, {r.get('t_dropped')} dropped)"
        rows.append((
            f"1. relay RSS per idle tunnel, {n} tunnels: (RSS with all idle − RSS with {warm}) "
            f"/ {measured} [KiB]",
            cell("t_relay_kib_per_tunnel", "{:.1f}"), "≤ 20", m))

        def mib(key):
            x = num(r.get(key))
            return "FAILED" if x is None else f"{x / 1024:.1f}"

        rows.append((
            "1. relay VmRSS: fresh process / with the warm-up tunnels / with all tunnels idle "
            "(info) [MiB]",
            " / ".join(mib(k) for k in ("t_relay_rss_start_kib", "t_relay_rss_before_kib",
                                        "t_relay_rss_after_kib")),
            "— (info)", "—"))
        enrolled = r.get("e_enrolled", "?")
        secs = num(r.get("e_enrol_secs"))
        rate = f" ({float(enrolled) / secs:.0f}/s)" if secs and num(enrolled) else ""
        if enrolled == "0":
            value = "— (all cached)"
        else:
            value = f"{secs:.1f}{rate}" if secs is not None else "FAILED"
        rows.append((
            f"1. enrolment of {enrolled} agents: join token made in the store + Enrol RPC, "
            f"{r.get('concurrency', '?')} at once (info) [s]", value, "— (info)", "—"))
        cs = num(r.get("t_connect_secs"))
        rows.append((
            f"1. connecting the {measured} tunnels after the warm-up: TCP + TLS + "
            f"TunnelOpen + AgentHello → RelayHello, {r.get('concurrency', '?')} at once (info) [s]",
            (f"{cs:.1f} ({r.get('t_connect_rate', '?')}/s)" if cs is not None else "FAILED"),
            "— (info)", "—"))
        if "d_count" in r:
            rows.append((
                "1. diagnosis: the same with the relay started with MALLOC_MMAP_THRESHOLD_=1048576 "
                "(argon2's 4 MiB buffers mapped and unmapped, not left in glibc's heap) (info) [KiB]",
                cell("d_relay_kib_per_tunnel", "{:.1f}"), "— (info)", "—"))
    # 2. spill
    if "s_spill_mbs" in r or "s_enrolled" in r or "dd_mbs" in r:
        size = num(r.get("s_spill_bytes"))
        rows.append((
            "2. journal persistence with spill: SpillBatch → store (segment files + SQLite index) → SpillAck, "
            + (f"{size / 1048576:.0f} MiB" if size else "?")
            + " in 64 KiB records, 4 per batch, "
            + f"{r.get('s_spill_in_flight', '?')} batches in flight [MB/s]",
            cell("s_spill_mbs", "{:.0f}"), "≥ 200", met(num(r.get("s_spill_mbs")), ">=", 200.0)))
        rows.append((
            "2. reference: `dd bs=1M conv=fdatasync` of the same size into the data dir (info) [MB/s]",
            cell("dd_mbs", "{:.0f}"), "— (info)", "—"))
    # 3. attach latency
    if "echo_keys" in r:
        keys = r.get("echo_keys", "?")
        ok = r.get("echo_ok") == "1"
        rp50, dp50 = num(r.get("echo_relay_p50")), num(r.get("echo_direct_p50"))
        rows.append((
            f"3. keystroke echo p50 / p90, `remote attach ID` through the relay ({keys} keys) [ms]",
            cell("echo_relay_p50", "{:.3f}") + " / " + cell("echo_relay_p90", "{:.3f}"),
            "— (see added)", "—"))
        rows.append((
            f"3. keystroke echo p50 / p90, `remote attach USER@127.0.0.1:PORT/ID` direct SSH ({keys} keys) [ms]",
            cell("echo_direct_p50", "{:.3f}") + " / " + cell("echo_direct_p90", "{:.3f}"),
            "— (see added)", "—"))
        if rp50 is not None and dp50 is not None:
            added = rp50 - dp50
            m = met(added, "<=", 1.0) if ok else "no (not every key echoed; see the notes)"
            rows.append(("3. added by the relay at p50 (relay p50 − direct p50) [ms]",
                         f"{added:.3f}", "≤ 1", m))
        else:
            rows.append(("3. added by the relay at p50 [ms]", "n/a", "≤ 1", "no (measurement failed)"))

    print_table(["metric", "value", "target", "met"], ["---", "---:", "---", "---"], rows)


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "rss":
        print(status_field(int(args[0]), "VmRSS"))
    elif cmd == "table":
        table(args[0])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
