"""cmactor benchmarks: raw floors (perf.baseline) and cmactor scenarios (perf.scenarios),
measured in one run so that their ratios compare like with like.

``run(quick)`` returns one dict per measurement::

    {"key", "name", "kind": "baseline"|"scenario"|"derived",
     "unit": "ops/s", "rows/s", "starts/s", "chains/s", "modules/s", "us/set", "us/check",
     "rate" (None for a skipped measurement), "p50_us", "p99_us" (None where not
     meaningful), "rounds",
     "baseline": the key of the row it is compared with (a floor, or another scenario), or None,
     "ratio": median over rounds of rate / that row's rate in the same round (derived
              rows: a ratio of their own, see the note), or None,
     "note"}

Rates, p50 and p99 are medians over the timed rounds, except where a round gives
every sample (restarts, starts, saves, loads): p50 and p99 are then over all the
samples of all rounds. Derived rows are computed from the other rows' figures in
each round (e.g. the extra cost of a persistent set over a plain one).

Used by ``python -m perf`` (run it from the repository root) and by smoke tests.
Submodules are imported lazily: the fork server preloads perf.baseline, and should
not have to import the rest.
"""

import collections
import contextlib
import json
import os
import platform
import statistics
import sys

# rounds: timed rounds per measurement (the median is reported). pingpong/pipelined:
# requests per round and untimed warm-up requests (per client when there are several).
# chains: chains per client per round (and warm-up); calls: gets an agent makes per
# round. start_rounds: rounds of the process-start group (restarts x start_rounds =
# kills per restart row). startup: supervisor starts per round for each graph.
# journal: rows journaled before the journaled restarts. rows: rows saved and loaded;
# saves: saves (and loads) per round.
QUICK = {
    "rounds": 3,
    "pingpong": dict(n=1000, warmup=200),
    "pipelined": dict(n=4000, warmup=400),
    "starts": dict(n=3, warmup=1),
    "walks": (2, 1),  # walks per round: 10k rows, 100k rows
    "chains": dict(n=100, warmup=20),
    "calls": dict(count=1000, warmup=200),
    "start_rounds": 3,
    "restarts": dict(n=2, warmup=1),
    "startup": dict(starts=1, warmup=1),
    "journal": 10_000,
    "rows": 100_000,
    "saves": 1,
}
FULL = {
    "rounds": 9,
    "pingpong": dict(n=10000, warmup=2000),
    "pipelined": dict(n=40000, warmup=4000),
    "starts": dict(n=10, warmup=3),
    "walks": (5, 1),
    "chains": dict(n=500, warmup=50),
    "calls": dict(count=5000, warmup=500),
    "start_rounds": 10,
    "restarts": dict(n=2, warmup=2),  # 20 kills of each
    "startup": dict(starts=1, warmup=1),
    "journal": 10_000,
    "rows": 100_000,
    "saves": 1,
}

CLIENTS = 4
INFLIGHT = 32

# One measurement. setup() returns a context manager that yields round(), which runs
# one timed round and returns (rate, p50 ns or None, p99 ns or None), or a
# baseline.Result. note: text, or a function of the result row that returns text.
# kind: None for "scenario" when there is a baseline, else "baseline". derived:
# round() takes the results of the steps before it in the same round, by key.
Step = collections.namedtuple("Step", "key name unit baseline setup note kind derived", defaults=(None, False))

# Modules in the start-up scenarios' graphs (each graph's random seed is its size: the same graph every run).
STARTUP_SIZES = (10, 50)


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
    """The measurements, in groups of (steps, rounds): a floor and the scenarios
    compared with it are set up together and their rounds interleave, so that the
    machine's drift (large on shared VMs) hits both sides of a ratio alike."""
    from . import baseline as b, scenarios as s

    ping, pipe = sizes["pingpong"], sizes["pipelined"]
    # Each of the CLIENTS clients sends n/CLIENTS: as many requests per round as one client.
    per_client = {k: v // CLIENTS for k, v in pipe.items()}
    small, big = sizes["walks"]
    path = sup.socket_path
    rounds = sizes["rounds"]

    def walk_note(rows):
        return lambda row: f"one walk: {rows / row['rate'] * 1000:.0f} ms; ratio: rows/s over the floor's round trips/s"

    first_row_calls = []  # agent calls one exos_dbapi first-row read cost, per round

    def chain(via):
        return b.clients(
            [path] * CLIENTS, b.request("chain", "chain_a", params={"via": via}), inflight=1, **sizes["chains"]
        )

    def cursor_procs(operation, params, n, warmup):
        return b.clients([path], (operation, params), n=n, inflight=1, warmup=warmup, main=s.cursor_main)

    # The direct-read rows (a supervisor of their own with direct reads on), on a
    # runtime that has them; _skipped_rows() says so otherwise.
    direct = s.direct_reads_available()

    def ms(row):
        return f"{row['p50_us'] / 1000:,.0f} ms"

    dags = {n: s.random_dag(n, seed=n) for n in STARTUP_SIZES}
    journal, rows = sizes["journal"], sizes["rows"]
    restarts = sizes["restarts"]
    groups = [
        (
            [
                Step(
                    "one_hop",
                    "floor: one hop, 1 in flight",
                    "ops/s",
                    None,
                    lambda: b.one_hop(**ping),
                    "client process <-> worker process, one socketpair",
                ),
                Step(
                    "two_hop",
                    "floor: two hops, 1 in flight",
                    "ops/s",
                    None,
                    lambda: b.two_hop(**ping),
                    "client -> broker -> worker -> back, selectors broker",
                ),
                Step(
                    "get",
                    "get, sequential (Cursor)",
                    "ops/s",
                    "two_hop",
                    lambda: cursor_procs("get bench.kv", {"key": "k"}, **ping),
                    "the public client in a process of its own, as the floor's client is",
                ),
                Step(
                    "set",
                    "set, sequential (Cursor)",
                    "ops/s",
                    "two_hop",
                    lambda: cursor_procs("set bench.kv", {"key": "k", "value": "v"}, **ping),
                    "",
                ),
                Step(
                    "set_journal",
                    "set, persistent table (Cursor)",
                    "ops/s",
                    "two_hop",
                    lambda: cursor_procs(
                        "set bench.pkv", {"key": "k", "value": "v"}, n=ping["n"] // 2, warmup=ping["warmup"] // 2
                    ),
                    "each set is journaled and fsynced before the reply (state_dir on " + s.filesystem() + ")",
                ),
                Step(
                    "journal_cost",
                    "journal cost per set (persistent - plain)",
                    "us/set",
                    "set",
                    lambda: s.extra_cost("set_journal", "set"),
                    "mean time per set on the persistent table minus a plain set's, same round (p50: same for "
                    "the p50s); ratio: that extra over a plain set's mean",
                    kind="derived",
                    derived=True,
                ),
                Step(
                    "get_inproc",
                    "get, sequential (Cursor in the supervisor's process)",
                    "ops/s",
                    "two_hop",
                    lambda: s.sequential(conn.cursor(), "get bench.kv", {"key": "k"}, **ping),
                    "sup.connect() from a thread of the process the supervisor is embedded in: it shares the GIL "
                    "with the supervisor's loop",
                ),
                Step(
                    "get_raw",
                    "get, raw client process, 1 in flight",
                    "ops/s",
                    "two_hop",
                    lambda: b.clients([path], b.request("kv"), inflight=1, **ping),
                    "same get from its own process, no Cursor: the floor's client",
                ),
                *(
                    [
                        Step(
                            "get_direct",
                            "get, direct, sequential (Cursor)",
                            "ops/s",
                            "one_hop",
                            lambda: s.direct_clients(
                                1, ("get bench.kv", {"key": "k"}), inflight=1, main=s.cursor_main, **ping
                            ),
                            "the get row's Cursor process against a supervisor of its own with direct reads on: the "
                            "Cursor asks for the route once, then reads from the worker's own socket",
                        )
                    ]
                    if direct
                    else []
                ),
                Step(
                    "getnext_10k",
                    "getnext walk, 10k rows (Cursor)",
                    "rows/s",
                    "two_hop",
                    lambda: s.walk(conn.cursor(), 10_000, small),
                    walk_note(10_000),
                ),
                Step(
                    "dbapi_walk_10k",
                    "exos_dbapi walk 10k rows (request, iterrow)",
                    "rows/s",
                    "getnext_10k",
                    lambda: s.dbapi_walk(conn, 10_000, small),
                    lambda row: (
                        f"one walk and its rows read: {10_000 / row['rate'] * 1000:.0f} ms; "
                        "ratio: over the Cursor's 10k walk"
                    ),
                ),
                Step(
                    "dbapi_first_row",
                    "exos_dbapi first row of a 100k walk (execute, fetchrow)",
                    "reads/s",
                    None,
                    lambda: s.dbapi_first_row(conn, 100_000, small, first_row_calls),
                    lambda row: (
                        f"agent calls per read: {statistics.median(first_row_calls):g} "
                        "(the walk fetches its rows as they are read)"
                    ),
                ),
                Step(
                    "getnext_100k",
                    "getnext walk, 100k rows (Cursor)",
                    "rows/s",
                    "two_hop",
                    lambda: s.walk(conn.cursor(), 100_000, big),
                    walk_note(100_000),
                ),
            ],
            rounds,
        ),
        (
            [
                Step(
                    "two_hop_32",
                    f"floor: two hops, 1 client x {INFLIGHT} in flight",
                    "ops/s",
                    None,
                    lambda: b.two_hop(**pipe, inflight=INFLIGHT),
                    "",
                ),
                Step(
                    "two_hop_4x32",
                    f"floor: two hops, {CLIENTS} clients x {INFLIGHT} in flight",
                    "ops/s",
                    None,
                    lambda: b.two_hop(**per_client, n_clients=CLIENTS, inflight=INFLIGHT),
                    "",
                ),
                Step(
                    "async_4x32",
                    f"async get, {CLIENTS} client procs x {INFLIGHT} in flight",
                    "ops/s",
                    "two_hop_4x32",
                    lambda: b.clients([path] * CLIENTS, b.request("akv"), inflight=INFLIGHT, **per_client),
                    "@async_action get, raw protocol",
                ),
                Step(
                    "one_hop_4x32",
                    f"floor: one hop, {CLIENTS} clients x {INFLIGHT} in flight",
                    "ops/s",
                    None,
                    lambda: b.one_hop(**per_client, n_clients=CLIENTS, inflight=INFLIGHT),
                    f"{CLIENTS} client processes <-> one worker process (a selectors loop), a socketpair each",
                ),
                *(
                    [
                        Step(
                            "async_4x32_direct",
                            f"async get, direct, {CLIENTS} client procs x {INFLIGHT} in flight",
                            "ops/s",
                            "one_hop_4x32",
                            lambda: s.direct_clients(
                                CLIENTS, b.request("akv"), inflight=INFLIGHT, main=s.direct_client_main, **per_client
                            ),
                            "@async_action get, raw protocol to the worker's own socket (each client asks the supervisor "
                            "for the route once); direct reads on",
                        )
                    ]
                    if direct
                    else []
                ),
            ],
            rounds,
        ),
        (
            [
                Step(
                    "chain_free",
                    f"chain A(async)->B->C, {CLIENTS} client procs",
                    "chains/s",
                    None,
                    lambda: chain("chain_b,chain_c"),
                    f"A's @async_action calls B's serial action, which calls C's; {CLIENTS} raw client processes, "
                    "1 chain in flight each",
                    kind="scenario",
                ),
                Step(
                    "chain_cycle",
                    f"chain A(async)->B->A, {CLIENTS} client procs",
                    "chains/s",
                    "chain_free",
                    lambda: chain("chain_b,chain_a"),
                    "deadlock-prone: B's serial action calls back into A's serial lane (fine: A's first action is "
                    "async); ratio: over the cycle-free chain",
                ),
                Step(
                    "calls_plain",
                    "get from an agent, unchecked",
                    "ops/s",
                    None,
                    lambda: s.agent_calls(conn.cursor(), "chain_a", "bench.kv", "plain", **sizes["calls"]),
                    "chain_a's @async_action gets bench.kv in a loop on a thread the agent started (no caller: "
                    "not checked); timed in the agent",
                    kind="scenario",
                ),
                Step(
                    "calls_checked",
                    "get from an agent, checked",
                    "ops/s",
                    "calls_plain",
                    lambda: s.agent_calls(conn.cursor(), "chain_a", "bench.kv", "checked", **sizes["calls"]),
                    "the same gets on the action's own thread: each carries its caller and is checked",
                ),
                Step(
                    "admit",
                    "deadlock check (WaitGraph.admit)",
                    "us/check",
                    "calls_plain",
                    lambda: s.admit_timing(sup, "calls_plain"),
                    "time in WaitGraph.admit per checked call (chains and checked gets of the round), wrapped on "
                    "the instance; ratio: over the mean round trip of an unchecked get",
                    kind="derived",
                    derived=True,
                ),
            ],
            rounds,
        ),
        (
            [
                Step(
                    "forkserver_start",
                    "floor: forkserver Process start",
                    "starts/s",
                    None,
                    lambda: b.forkserver_start(**sizes["starts"]),
                    "Process() to the child's first message",
                ),
                Step(
                    "restart",
                    "restart after SIGKILL, to answering",
                    "starts/s",
                    "forkserver_start",
                    lambda: s.restart_to_ready(sup, conn, "victim", **restarts),
                    lambda row: (
                        f"kill -9 the worker; time until a get is answered by the new one; "
                        f"p50/p99 over {row['rounds'] * restarts['n']} kills"
                    ),
                ),
                Step(
                    "restart_journal",
                    f"restart after SIGKILL, {journal // 1000}k journaled rows",
                    "starts/s",
                    "forkserver_start",
                    lambda: s.restart_to_ready(sup, conn, "jvictim", journal_rows=journal, **restarts),
                    lambda row: (
                        f"the same, the new worker replaying {journal:,} unsaved sets from the journal "
                        f"before READY; p50/p99 over {row['rounds'] * restarts['n']} kills"
                    ),
                ),
                *(
                    Step(
                        f"startup_{n}",
                        f"start {n} modules (deps DAG) to all READY",
                        "modules/s",
                        "forkserver_start",
                        lambda dag=dags[n]: s.startup(dag, **sizes["startup"]),
                        lambda row, n=n: (
                            f"Supervisor.start() until it returns, every module READY: {ms(row)} "
                            f"(p50); random config_deps DAG, {sum(map(len, dags[n].values()))} edges, "
                            f"longest chain {s.dag_depth(dags[n])} modules; ratio: {n} forkserver "
                            f"starts one after another / this"
                        ),
                    )
                    for n in STARTUP_SIZES
                ),
            ],
            sizes["start_rounds"],
        ),
        (
            [
                Step(
                    "save",
                    f"save {rows // 1000}k rows (Supervisor.save)",
                    "rows/s",
                    None,
                    lambda: s.save_rows(rows, sizes["saves"]),
                    lambda row: (
                        f"one save: {ms(row)} (p50): the agent's getnext walk, JSON, an atomic write with fsyncs"
                    ),
                    kind="scenario",
                ),
                Step(
                    "load",
                    f"load {rows // 1000}k rows (fresh start to READY)",
                    "rows/s",
                    None,
                    lambda: s.load_rows(rows, sizes["saves"]),
                    lambda row: (
                        f"one start: {ms(row)} (p50): read and check the file, start the worker, replay "
                        f"every row as pkv_set"
                    ),
                    kind="scenario",
                ),
            ],
            rounds,
        ),
    ]
    if s.ray_available():
        groups.append(
            (
                [
                    Step(
                        "ray_seq",
                        "peer: Ray actor get, 1 in flight",
                        "ops/s",
                        None,
                        lambda: s.ray_calls(inflight=1, **ping),
                        "ray.get(actor.get.remote()) back to back",
                    ),
                    Step(
                        "get_vs_ray",
                        "get, sequential (Cursor), vs Ray",
                        "ops/s",
                        "ray_seq",
                        lambda: s.sequential(conn.cursor(), "get bench.kv", {"key": "k"}, **ping),
                        "ratio: cmactor / Ray",
                    ),
                    Step(
                        "ray_32",
                        f"peer: Ray actor get, {INFLIGHT} in flight",
                        "ops/s",
                        None,
                        lambda: s.ray_calls(inflight=INFLIGHT, **pipe),
                        "ray.wait on the outstanding refs",
                    ),
                    Step(
                        "get_32_vs_ray",
                        f"get, raw client process, {INFLIGHT} in flight, vs Ray",
                        "ops/s",
                        "ray_32",
                        lambda: b.clients([path], b.request("kv"), inflight=INFLIGHT, **pipe),
                        "serial-lane get; ratio: cmactor / Ray",
                    ),
                ],
                rounds,
            )
        )
    return groups


def _skipped_rows(s):
    """Rows for measurements that cannot run here, with the reason as their note."""

    def skipped(key, name, kind, baseline, note):
        return {
            "key": key,
            "name": name,
            "kind": kind,
            "unit": "ops/s",
            "rate": None,
            "p50_us": None,
            "p99_us": None,
            "baseline": baseline,
            "ratio": None,
            "rounds": 0,
            "note": note,
        }

    rows = []
    if not s.direct_reads_available():
        why = "skipped: this runtime has no direct reads (no supervisor option direct_reads)"
        rows += [
            skipped("get_direct", "get, direct, sequential (Cursor)", "scenario", "one_hop", why),
            skipped(
                "async_4x32_direct",
                f"async get, direct, {CLIENTS} client procs x {INFLIGHT} in flight",
                "scenario",
                "one_hop_4x32",
                why,
            ),
        ]
    if not s.ray_available():
        rows.append(
            skipped(
                "ray",
                "peer: Ray actor get",
                "baseline",
                None,
                "skipped: ray is not importable here (not installed); the peer comparison runs when it is",
            )
        )
    return rows


def _measure(group, rounds, say):
    """Set up every step of a group, run their rounds interleaved, summarize (medians)."""
    from .baseline import Result, percentile

    results = {step.key: [] for step in group}
    with contextlib.ExitStack() as stack:
        round_fns = {}
        for step in group:
            say(f"setting up and warming up: {step.name}")
            round_fns[step.key] = stack.enter_context(step.setup())
        for i in range(rounds):
            latest = {}
            for step in group:
                say(f"round {i + 1}/{rounds}: {step.name}")
                fn = round_fns[step.key]
                latest[step.key] = Result(*(fn(latest) if step.derived else fn()))
                results[step.key].append(latest[step.key])
    rows = []
    for step in group:
        mine = results[step.key]
        samples = [x for r in mine for x in (r.samples or ())]

        def summary(field, q, mine=mine, samples=samples):
            if getattr(mine[0], field) is None:
                return None
            if samples:  # every sample of every round, pooled
                return (statistics.median(samples) if q == 50 else percentile(samples, q)) / 1000
            return statistics.median(getattr(r, field) for r in mine) / 1000

        if mine[0].ratio is not None:
            ratio = statistics.median(r.ratio for r in mine)
        elif step.baseline:  # paired: each round against the other row's round run just before it
            ratio = statistics.median(r.rate / f.rate for r, f in zip(mine, results[step.baseline]))
        else:
            ratio = None
        row = {
            "key": step.key,
            "name": step.name,
            "kind": step.kind or ("scenario" if step.baseline else "baseline"),
            "unit": step.unit,
            "rate": statistics.median(r.rate for r in mine),
            "p50_us": summary("p50", 50),
            "p99_us": summary("p99", 99),
            "baseline": step.baseline,
            "ratio": ratio,
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
        for group, rounds in _groups(sizes, sup, conn):
            rows += _measure(group, rounds, say)
    return rows + _skipped_rows(scenarios)


def format_table(rows, info):
    """The machine line and a plain-text table of ``run()``'s results."""
    lines = [
        f"machine: {info['cores']} cores ({info['usable_cores']} usable), {info['cpu']}, "
        f"{info['python']}, {info['os']}",
        "",
    ]
    header = ("scenario", "rate", "unit", "p50 us", "p99 us", "ratio", "compared with")
    table = [header]
    names = {row["key"]: row["name"] for row in rows}

    def num(value, fmt):
        return "-" if value is None else format(value, fmt)

    for row in rows:
        ratio = row["ratio"]
        table.append(
            (
                row["name"],
                num(row["rate"], ",.1f" if row["unit"].startswith("us/") else ",.0f"),
                row["unit"],
                num(row["p50_us"], ",.0f"),
                num(row["p99_us"], ",.0f"),
                num(ratio, ".3f" if ratio is not None and abs(ratio) < 0.1 else ".2f"),
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


def report(measure, quick, output, interrupted):
    """Run ``measure()`` (rows, as run() gives them) and print them as ``output`` ("table" or
    "json") with the machine: the exit status (130 after a Ctrl-C, which prints
    ``interrupted`` on stderr)."""
    info = machine()
    try:
        rows = measure()
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    if output == "json":
        json.dump({"machine": info, "quick": quick, "results": rows}, sys.stdout, indent=2)
        print()
    else:
        print(format_table(rows, info))
    return 0
