"""``python -m perf [--quick] [--format table|json]`` from the repository root."""

import argparse
import sys

from . import print_progress, report, run


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="cmactor bench",
        description="cmactor benchmarks: raw floors and cmactor scenarios measured in one run, with ratios.",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: the whole suite in well under a minute")
    parser.add_argument("--format", choices=("table", "json"), default="table", help="output format (default: table)")
    args = parser.parse_args(argv)
    return report(
        lambda: run(quick=args.quick, progress=print_progress),
        args.quick,
        args.format,
        "perf: interrupted; every benchmark process was stopped",
    )


if __name__ == "__main__":
    sys.exit(main())
