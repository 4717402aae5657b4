"""``python -m perf [--quick] [--format table|json]`` from the repository root."""

import argparse
import json
import sys

from . import format_table, machine, print_progress, run


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="cmactor bench",
        description="cmactor benchmarks: raw floors and cmactor scenarios measured in one run, with ratios.",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: the whole suite in well under a minute")
    parser.add_argument("--format", choices=("table", "json"), default="table", help="output format (default: table)")
    args = parser.parse_args(argv)
    info = machine()
    try:
        rows = run(quick=args.quick, progress=print_progress)
    except KeyboardInterrupt:
        print("perf: interrupted; every benchmark process was stopped", file=sys.stderr)
        return 130
    if args.format == "json":
        json.dump({"machine": info, "quick": args.quick, "results": rows}, sys.stdout, indent=2)
        print()
    else:
        print(format_table(rows, info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
