"""Run with `python examples/lanes/run.py`: shows a detected deadlock and its fix."""

import logging
import os
import tempfile

import cmactor

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    # The refused calls are also logged by the agents with their tracebacks; this
    # demo shows each outcome as one line instead.
    logging.getLogger("cmactor.agent").setLevel(logging.CRITICAL)
    agents = {"alpha": os.path.join(HERE, "agents.py:alpha"), "beta": os.path.join(HERE, "agents.py:beta")}
    with tempfile.TemporaryDirectory() as state, cmactor.Supervisor(agents, state_dir=state) as sup:
        cur = sup.connect().cursor()
        try:
            cur.execute("get alpha.total")
        except cmactor.DatabaseError as exc:
            print(f"serial lane: {exc}")
        cur.execute("get alpha.total_async")
        print(f"async lane:  total = {cur.fetchone()[0]}")


if __name__ == "__main__":
    main()
