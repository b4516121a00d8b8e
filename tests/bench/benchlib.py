"""Shared pieces of the benchmark helpers (stdlib only): /proc readings, summary statistics,
the KEY=VALUE result files the shell scripts write and the report tables read, and the
helpers' `--key value -- CMD` argument parsing."""
import statistics
import sys


def status_field(pid, field):
    """A numeric field of /proc/PID/status (in its unit, e.g. kB)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def stats_of(xs):
    """(median, min, p90, max, count) of numbers, or None when there are none."""
    xs = sorted(xs)
    if not xs:
        return None
    p90 = xs[min(len(xs) - 1, int(round(0.9 * (len(xs) - 1))))]
    return statistics.median(xs), xs[0], p90, xs[-1], len(xs)


def stats():
    """Print `median min p90 max count` of the numbers on stdin."""
    s = stats_of(float(x) for x in sys.stdin.read().split())
    if s is None:
        print("nan nan nan nan 0")
        return
    print("{:.3f} {:.3f} {:.3f} {:.3f} {}".format(*s))


def num(v):
    """A float from a result value; None when missing, not a number, or NaN."""
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if x == x else None


def read_results(path):
    """The KEY=VALUE lines of a result file, as a dict."""
    r = {}
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if "=" in line:
                k, v = line.split("=", 1)
                r[k] = v
    return r


def split_cmd(args):
    """`--key value ... -- CMD ARGS...` into ({key: value}, [CMD, ARGS...])."""
    if "--" not in args:
        sys.exit("missing -- CMD")
    i = args.index("--")
    opts, cmd = args[:i], args[i + 1:]
    if not cmd:
        sys.exit("empty command")
    return parse_opts(opts), cmd


def parse_opts(args):
    """`--key value ...` into {key: value}."""
    parsed = {}
    j = 0
    while j < len(args):
        if not args[j].startswith("--") or j + 1 >= len(args):
            sys.exit(f"bad option {args[j]}")
        parsed[args[j][2:]] = args[j + 1]
        j += 2
    return parsed


def print_table(header, aligns, rows):
    """A Markdown table: `header` cells, `aligns` the separator cells (`---`, `---:`), rows of
    cells (strings)."""
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(aligns) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
