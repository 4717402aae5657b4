"""cmactor benchmarks: raw floors (perf.baseline) and cmactor scenarios (perf.scenarios),
measured in one run so that their ratios compare like with like.

``run(quick)`` returns one dict per measurement::

    {"key", "name", "kind": "baseline"|"scenario", "unit": "ops/s"|"rows/s"|"starts/s",
     "rate", "p50_us", "p99_us" (None where not meaningful), "rounds",
     "baseline": the floor's key or None,
     "ratio": median over rounds of rate / the floor's rate in the same round, or None,
     "note"}

Rates, p50 and p99 are medians over the timed rounds.

Used by ``python -m perf`` (run it from the repository root) and by smoke tests.
Submodules are imported lazily: the fork server preloads perf.baseline, and should
not have to import the rest.
"""

import collections
import contextlib
import os
import platform
import statistics
import sys

# rounds: timed rounds per measurement (the median is reported). pingpong/pipelined:
# requests per round and untimed warm-up requests (per client when there are several).
QUICK = {
    "rounds": 3,
    "pingpong": dict(n=1000, warmup=200),
    "pipelined": dict(n=4000, warmup=400),
    "starts": dict(n=3, warmup=1),
    "walks": (2, 1),  # walks per round: 10k rows, 100k rows
    "restarts": dict(n=2, warmup=1),
}
FULL = {
    "rounds": 9,
    "pingpong": dict(n=10000, warmup=2000),
    "pipelined": dict(n=40000, warmup=4000),
    "starts": dict(n=10, warmup=3),
    "walks": (5, 1),
    "restarts": dict(n=5, warmup=2),
}

CLIENTS = 4
INFLIGHT = 32

# One measurement. setup() returns a context manager that yields round(), which runs
# one timed round and returns (rate, p50 ns or None, p99 ns or None). note: text, or
# a function of the result row that returns text.
Step = collections.namedtuple("Step", "key name unit baseline setup note")


def machine():
    """Cores, CPU model and Python version of this machine."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "cpu": model,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "os": f"{platform.system()} {platform.release()}",
    }


def _groups(sizes, sup, conn):
    """The measurements, in groups: a floor and the scenarios compared with it are
    set up together and their rounds interleave, so that the machine's drift (large
    on shared VMs) hits both sides of a ratio alike."""
    from . import baseline as b
    from . import scenarios as s

    ping, pipe = sizes["pingpong"], sizes["pipelined"]
    # Each of the CLIENTS clients sends n/CLIENTS: as many requests per round as one client.
    per_client = {k: v // CLIENTS for k, v in pipe.items()}
    small, big = sizes["walks"]
    path = sup.socket_path

    def walk_note(rows):
        return lambda row: f"one walk: {rows / row['rate'] * 1000:.0f} ms; ratio: rows/s over the floor's round trips/s"

    return [
        [
            Step("one_hop", "floor: one hop, 1 in flight", "ops/s", None,
                 lambda: b.one_hop(**ping), "client process <-> worker process, one socketpair"),
            Step("two_hop", "floor: two hops, 1 in flight", "ops/s", None,
                 lambda: b.two_hop(**ping), "client -> broker -> worker -> back, selectors broker"),
            Step("get", "get, sequential (Cursor)", "ops/s", "two_hop",
                 lambda: s.sequential(conn.cursor(), "get bench.kv", {"key": "k"}, **ping),
                 "client is a thread of the supervisor's process (sup.connect())"),
            Step("set", "set, sequential (Cursor)", "ops/s", "two_hop",
                 lambda: s.sequential(conn.cursor(), "set bench.kv", {"key": "k", "value": "v"}, **ping), ""),
            Step("set_journal", "set, persistent table (Cursor)", "ops/s", "two_hop",
                 lambda: s.sequential(conn.cursor(), "set bench.pkv", {"key": "k", "value": "v"},
                                      n=ping["n"] // 2, warmup=ping["warmup"] // 2),
                 "each set is journaled and fsynced before the reply (state_dir on " + s.filesystem() + ")"),
            Step("get_raw", "get, raw client process, 1 in flight", "ops/s", "two_hop",
                 lambda: b.clients([path], b.request("kv"), inflight=1, **ping),
                 "same get from its own process, no Cursor: the floor's client"),
            Step("getnext_10k", "getnext walk, 10k rows (Cursor)", "rows/s", "two_hop",
                 lambda: s.walk(conn.cursor(), 10_000, small), walk_note(10_000)),
            Step("getnext_100k", "getnext walk, 100k rows (Cursor)", "rows/s", "two_hop",
                 lambda: s.walk(conn.cursor(), 100_000, big), walk_note(100_000)),
        ],
        [
            Step("two_hop_32", f"floor: two hops, 1 client x {INFLIGHT} in flight", "ops/s", None,
                 lambda: b.two_hop(**pipe, inflight=INFLIGHT), ""),
            Step("two_hop_4x32", f"floor: two hops, {CLIENTS} clients x {INFLIGHT} in flight", "ops/s", None,
                 lambda: b.two_hop(**per_client, n_clients=CLIENTS, inflight=INFLIGHT), ""),
            Step("async_4x32", f"async get, {CLIENTS} client procs x {INFLIGHT} in flight", "ops/s", "two_hop_4x32",
                 lambda: b.clients([path] * CLIENTS, b.request("akv"), inflight=INFLIGHT, **per_client),
                 "@async_action get, raw protocol"),
        ],
        [
            Step("forkserver_start", "floor: forkserver Process start", "starts/s", None,
                 lambda: b.forkserver_start(**sizes["starts"]), "Process() to the child's first message"),
            Step("restart", "restart after SIGKILL, to answering", "starts/s", "forkserver_start",
                 lambda: s.restart_to_ready(sup, conn, **sizes["restarts"]),
                 "kill -9 the worker; time until a get is answered by the new one"),
        ],
    ]


def _measure(group, rounds, say):
    """Set up every step of a group, run their rounds interleaved, summarize (medians)."""
    results = {step.key: [] for step in group}
    with contextlib.ExitStack() as stack:
        round_fns = {}
        for step in group:
            say(f"setting up and warming up: {step.name}")
            round_fns[step.key] = stack.enter_context(step.setup())
        for i in range(rounds):
            for step in group:
                say(f"round {i + 1}/{rounds}: {step.name}")
                results[step.key].append(round_fns[step.key]())
    rows = []
    for step in group:
        mine = results[step.key]
        row = {
            "key": step.key,
            "name": step.name,
            "kind": "scenario" if step.baseline else "baseline",
            "unit": step.unit,
            "rate": statistics.median(r[0] for r in mine),
            "p50_us": None if mine[0][1] is None else statistics.median(r[1] for r in mine) / 1000,
            "p99_us": None if mine[0][2] is None else statistics.median(r[2] for r in mine) / 1000,
            "baseline": step.baseline,
            # Paired: each round against the floor's round run just before it.
            "ratio": None if not step.baseline else statistics.median(
                r[0] / f[0] for r, f in zip(mine, results[step.baseline])
            ),
            "rounds": len(mine),
        }
        row["note"] = step.note(row) if callable(step.note) else step.note
        rows.append(row)
    return rows


def run(quick=False, progress=None):
    """Run every floor and scenario; return one dict per measurement (see the module doc).

    ``progress``: called with a line of text naming each measurement as it runs
    (e.g. to print it on stderr); None for silence.
    """
    from . import scenarios

    sizes = QUICK if quick else FULL
    say = progress or (lambda line: None)
    rows = []
    say("starting a supervisor")
    with scenarios.supervisor() as sup, sup.connect("bench") as conn:
        for group in _groups(sizes, sup, conn):
            rows += _measure(group, sizes["rounds"], say)
    return rows


def format_table(rows, info):
    """The machine line and a plain-text table of ``run()``'s results."""
    lines = [
        f"machine: {info['cores']} cores ({info['usable_cores']} usable), {info['cpu']}, "
        f"{info['python']}, {info['os']}",
        "",
    ]
    header = ("scenario", "rate", "unit", "p50 us", "p99 us", "ratio", "vs floor")
    table = [header]
    names = {row["key"]: row["name"] for row in rows}

    def num(value, fmt):
        return "-" if value is None else format(value, fmt)

    for row in rows:
        table.append(
            (
                row["name"],
                num(row["rate"], ",.0f"),
                row["unit"],
                num(row["p50_us"], ",.0f"),
                num(row["p99_us"], ",.0f"),
                num(row["ratio"], ".2f"),
                names.get(row["baseline"], "").removeprefix("floor: ") if row["baseline"] else "",
            )
        )
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    right = {1, 3, 4, 5}  # numbers
    for r in table:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
    notes = [f"  {row['name']}: {row['note']}" for row in rows if row["note"]]
    if notes:
        lines += ["", "notes:", *notes]
    return "\n".join(lines)


def print_progress(line):
    """A ``progress`` for run(): one line on stderr."""
    print(f"perf: {line}", file=sys.stderr, flush=True)
