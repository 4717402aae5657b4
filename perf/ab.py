"""Paired A/B rounds: rows of this checkout against the same rows of another cmactor.

    python -m perf.ab OTHER_PYTHON [--keys get,async_4x32] [--pairs 15] [--runs 4] [--quick]

OTHER_PYTHON is the interpreter of an environment with another cmactor installed:
an older commit's worktree installed editable in a venv of its own, say. Each side
runs this file as a script under its own interpreter (``--serve``: stdlib only at
the top, so an older cmactor_perf serves it), sets up the rows once, then runs one
round per line it is sent. The rounds of the two sides alternate, seconds apart,
the side that goes first swapping each pair: a drift of the machine hits both
alike. A run's processes keep their CPU placement for its length, which biases a
whole run one way; so there are several runs, each with fresh processes, and the
figure is the median over every pair of every run of this side's rate over the
other's.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

DEFAULT_KEYS = "get,async_4x32"


def serve(keys, quick):
    """(A side.) Set up the rows ``keys`` once; then, for each row key read from stdin,
    run one round of it and print {"key", "rate"}; an empty line ends it."""
    import contextlib

    import cmactor_perf as perf
    from cmactor_perf import scenarios

    sizes = dict(perf.QUICK if quick else perf.FULL)
    with scenarios.supervisor() as sup, sup.connect("bench") as conn, contextlib.ExitStack() as stack:
        steps = {step.key: step for group, _ in perf._groups(sizes, sup, conn) for step in group}
        unknown = [key for key in keys if key not in steps]
        if unknown:
            print(json.dumps({"error": f"no such row: {', '.join(unknown)}; rows: {', '.join(steps)}"}), flush=True)
            return 2
        rounds = {key: stack.enter_context(steps[key].setup()) for key in keys}
        print(json.dumps({"ready": keys}), flush=True)
        for line in sys.stdin:
            key = line.strip()
            if not key:
                break
            print(json.dumps({"key": key, "rate": rounds[key]()[0]}), flush=True)
    return 0


class _Side:
    """A runner process: ``python perf/ab.py --serve`` under one side's interpreter."""

    def __init__(self, name, python, keys, quick):
        self.name = name
        argv = [python, os.path.abspath(__file__), "--serve", ",".join(keys)] + (["--quick"] if quick else [])
        # Run from an empty directory: nothing of this checkout is on the other side's path.
        self._cwd = tempfile.mkdtemp(prefix="cmactor-ab-")
        self._proc = subprocess.Popen(argv, cwd=self._cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        said = self._read()
        if "ready" not in said:
            self.close()
            raise RuntimeError(f"the {name} side ({python}) did not start: {said.get('error', said)}")

    def _read(self):
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.name} side's runner exited (its traceback is above)")
        return json.loads(line)

    def round(self, key):
        self._proc.stdin.write(key + "\n")
        self._proc.stdin.flush()
        return self._read()["rate"]

    def close(self):
        try:
            self._proc.stdin.write("\n")
            self._proc.stdin.close()
        except OSError:
            pass
        try:
            self._proc.wait(60)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        os.rmdir(self._cwd)


def run(other_python, keys, pairs, runs, quick=False, say=print):
    """``runs`` runs of ``pairs`` pairs of rounds of each row; {key: [this / other, ...]}."""
    ratios = {key: [] for key in keys}
    for number in range(1, runs + 1):
        sides = {}
        try:
            for name, python in (("this", sys.executable), ("other", other_python)):
                sides[name] = _Side(name, python, keys, quick)
            mine = {key: [] for key in keys}
            for pair in range(pairs):
                for key in keys:
                    order = ("this", "other") if pair % 2 == 0 else ("other", "this")
                    rates = {name: sides[name].round(key) for name in order}
                    mine[key].append(rates["this"] / rates["other"])
        finally:
            for side in sides.values():
                side.close()
        for key in keys:
            ratios[key] += mine[key]
            say(f"run {number}/{runs}: {key} this/other median {statistics.median(mine[key]):.3f} ({pairs} pairs)")
    return ratios


def summary(ratios):
    """One line per row: the median of every pair's ratio, with the quartiles."""
    lines = []
    for key, values in ratios.items():
        ordered = sorted(values)
        quartile = len(ordered) // 4
        lines.append(
            f"{key}: this/other median {statistics.median(ordered):.3f} over {len(ordered)} pairs "
            f"(quartiles {ordered[quartile]:.3f}-{ordered[-1 - quartile]:.3f})"
        )
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m perf.ab", description="paired A/B rounds of benchmark rows against another cmactor install"
    )
    parser.add_argument("other_python", nargs="?", help="the other side's Python interpreter")
    parser.add_argument("--keys", default=DEFAULT_KEYS, help=f"row keys, comma-separated (default: {DEFAULT_KEYS})")
    parser.add_argument("--pairs", type=int, default=15, help="pairs of rounds per run (default: 15)")
    parser.add_argument("--runs", type=int, default=4, help="runs, each with fresh processes (default: 4)")
    parser.add_argument("--quick", action="store_true", help="the quick sizes (a smoke test, not a measurement)")
    parser.add_argument("--serve", metavar="KEYS", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        return serve(args.serve.split(","), args.quick)
    if args.other_python is None:
        parser.error("give the other side's Python interpreter")
    if args.pairs < 1 or args.runs < 1:
        parser.error("--pairs and --runs must be at least 1")
    keys = [key for key in args.keys.split(",") if key]
    try:
        ratios = run(
            args.other_python, keys, args.pairs, args.runs, args.quick, say=lambda line: print(line, file=sys.stderr)
        )
    except (OSError, RuntimeError) as exc:
        print(f"perf.ab: {exc}", file=sys.stderr)
        return 2
    print("\n".join(summary(ratios)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
