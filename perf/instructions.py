"""Instructions per request, counted: sequential gets under valgrind's cachegrind.

    python -m perf.instructions [OTHER_PYTHON] [--gets 5000] [--path brokered|direct|both]

Timed rounds on a shared VM drift by a fifth between runs, so a paired A/B (perf.ab)
needs dozens of pairs to see a change of 2 %. The instructions a get costs do not
drift. Each side runs this file as a script (``--count N``) under cachegrind, with
its cache simulation, following every child process: a supervisor in the script's
process (as perf.scenarios runs it), its bench worker, and a Cursor client process
of its own sending N gets after a warm-up. Two runs, of a few gets and of that many
plus ``--gets``, differ by those gets alone; the difference over ``--gets`` is each
process's cost per get, with start-up and shut-down taken out.

Two paths, each counted so (``--path``, default both): the brokered get (client ->
supervisor -> worker -> back, the supervisor of perf.scenarios.supervisor(), direct
reads off) and the direct get (the same Cursor and get against a supervisor with
direct reads on, perf.scenarios.direct_supervisor(): after its first read asks the
supervisor for the route, every get goes to the worker's own socket and back). The
supervisor is counted on the direct path too: it serves none of those gets, and what
it shows is mostly this harness's own work in its process (sorting the round's
latencies in baseline.clients, ~1,500 instructions a get, on both paths).

Printed for each process: instructions, and the misses of the simulated first-level
instruction and data caches, per get; with OTHER_PYTHON (an interpreter of another
cmactor install, as perf.ab takes), both sides and the ratio of their instructions.
One table a path: the brokered one first, as it always was (headed "per get"), then
the direct one (headed "direct get"), after a blank line.

Not counted: the kernel (system calls, wake-ups, scheduling) and the real caches,
which the three processes share with each other and the machine. Fewer instructions
is a cheaper get, not by itself a faster round trip: confirm a change with perf.ab.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROLES = ("supervisor", "worker", "client")
PATHS = ("brokered", "direct")
# cachegrind's event names: instructions, and first-level instruction and data read misses.
EVENTS = ("Ir", "I1mr", "D1mr")
FEW = 500  # gets of the shorter run


def count(gets, path):
    """(Under valgrind.) Run ``gets`` sequential gets from a Cursor process, brokered or
    direct (``path``); print the pid of each process involved, as {role: pid}."""
    import psutil

    from cmactor_perf import baseline, scenarios

    me = psutil.Process()
    if path == "direct":
        # The fork server with the same preload as the brokered path's (supervisor()
        # starts it so), for the client process to start alike; then a supervisor of
        # its own with direct reads on, once bench's worker serves them.
        baseline.start_once(baseline.context())
        running = scenarios.direct_supervisor()
    else:
        running = scenarios.supervisor()  # direct reads off: every get is brokered
    with running as sup:
        before = {child.pid for child in me.children(recursive=True)}
        message = ("get bench.kv", {"key": "k"})
        with baseline.clients(
            [sup.socket_path], message, n=gets, inflight=1, warmup=200, main=scenarios.cursor_main
        ) as round_:
            (client,) = {child.pid for child in me.children(recursive=True)} - before
            # After the warm-up the direct client holds a connection to the worker's own
            # socket (as scenarios.direct_clients checks), or its gets went brokered.
            if path == "direct" and sup.status()["bench"]["direct"]["connections"] < 1:
                raise RuntimeError("no direct connection to bench's worker: the gets went through the supervisor")
            round_()
            pids = {"supervisor": os.getpid(), "worker": sup.status()["bench"]["pid"], "client": client}
    print(json.dumps(pids), flush=True)


def read_counts(path):
    """{event: total} from one cachegrind output file."""
    names = totals = None
    with open(path) as lines:
        for line in lines:
            if line.startswith("events:"):
                names = line.split()[1:]
            elif line.startswith("summary:"):
                totals = [int(value) for value in line.split()[1:]]
    if names is None or totals is None:
        raise RuntimeError(f"{path} is not a whole cachegrind output file (no events or summary line)")
    return dict(zip(names, totals))


def per_get(short, long, gets):
    """{role: {event: per get}} from the counts of a short run and of one ``gets`` longer."""
    return {role: {event: (long[role][event] - short[role][event]) / gets for event in EVENTS} for role in ROLES}


def _run(python, gets, path, workdir):
    """{role: {event: total}} of one counted run of ``gets`` gets by ``path`` under ``python``."""
    out = tempfile.mkdtemp(dir=workdir)
    argv = [
        "valgrind",
        "--tool=cachegrind",
        "--cache-sim=yes",
        "--trace-children=yes",
        f"--cachegrind-out-file={out}/%p",
        python,
        os.path.abspath(__file__),
        "--count",
        str(gets),
        "--path",
        path,
    ]
    # From the work directory: nothing of this checkout is on the other side's path.
    done = subprocess.run(argv, cwd=workdir, capture_output=True, text=True)
    said = done.stdout.strip().splitlines()
    if done.returncode != 0 or not said:
        raise RuntimeError(f"{python} under valgrind exited with {done.returncode}:\n{done.stderr[-3000:]}")
    pids = json.loads(said[-1])
    return {role: read_counts(os.path.join(out, str(pids[role]))) for role in ROLES}


def measure(python, gets, path, say):
    """{role: {event: per get}} of ``path``'s get for the cmactor that ``python`` runs."""
    workdir = tempfile.mkdtemp(prefix="cmactor-instructions-")
    try:
        say(f"perf.instructions: {python}: {path}: {FEW} gets, then {FEW + gets}")
        return per_get(_run(python, FEW, path, workdir), _run(python, FEW + gets, path, workdir), gets)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def table(sides, label="per get"):
    """The figures of each side ({name: {role: {event: per get}}}) as text, ``label``
    in the top left corner."""
    names = list(sides)
    head = f"{label:<12}" + "".join(f"{name + ' ' + event:>14}" for name in names for event in EVENTS)
    if len(names) == 2:
        head += f"{'Ir ' + names[0] + '/' + names[1]:>16}"
    rows = {role: {name: sides[name][role] for name in names} for role in ROLES}
    rows["total"] = {
        name: {event: sum(sides[name][role][event] for role in ROLES) for event in EVENTS} for name in names
    }
    lines = [head]
    for role, row in rows.items():
        line = f"{role:<12}" + "".join(f"{row[name][event]:>14,.0f}" for name in names for event in EVENTS)
        if len(names) == 2:
            line += f"{row[names[0]]['Ir'] / row[names[1]]['Ir']:>16.3f}"
        lines.append(line)
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m perf.instructions",
        description="instructions and first-level cache misses per sequential get, counted by valgrind",
    )
    parser.add_argument("other_python", nargs="?", help="another cmactor install's Python interpreter, to compare")
    parser.add_argument("--gets", type=int, default=5000, help="gets the two runs differ by (default: 5000)")
    parser.add_argument(
        "--path",
        choices=(*PATHS, "both"),
        default="both",
        help="the get counted: through the supervisor, from the worker's own socket, or both (default: both)",
    )
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.count is not None:
        count(args.count, args.path)
        return 0
    if args.gets < 1:
        parser.error("--gets must be at least 1")
    if args.other_python is not None and shutil.which(args.other_python) is None:
        print(
            f"perf.instructions: {args.other_python} is not an interpreter that can run; give another "
            "install's Python (its venv's bin/python)",
            file=sys.stderr,
        )
        return 2
    if shutil.which("valgrind") is None:
        print(
            "perf.instructions: valgrind is not on PATH; it counts the instructions (apt install valgrind)",
            file=sys.stderr,
        )
        return 2
    sides = {"this": sys.executable}
    if args.other_python is not None:
        sides["other"] = args.other_python
    paths = PATHS if args.path == "both" else (args.path,)
    # The label of each path's table: the brokered one keeps the one it always had.
    labels = {"brokered": "per get", "direct": "direct get"}
    tables = []
    try:
        for path in paths:
            figures = {
                name: measure(python, args.gets, path, lambda line: print(line, file=sys.stderr))
                for name, python in sides.items()
            }
            tables.append(table(figures, labels[path]))
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        print(f"perf.instructions: {exc}", file=sys.stderr)
        return 2
    print("\n\n".join(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
