"""cmactor scenarios through a real Supervisor running perf/agents/bench.py.

The supervisor runs in this process (its loop is a thread) and the agent in a
forkserver worker, as with an embedded ``cmactor.Supervisor``. Sequential
scenarios use the public client (``sup.connect().cursor().execute``) from this
process; pipelined ones use raw client processes (perf.baseline.clients),
because a Cursor has one request in flight per connection.

As in perf.baseline, each scenario is a context manager that warms up and
yields ``round()``, returning (rate, p50 ns, p99 ns) for one timed round
(latencies None where they mean nothing).
"""

import contextlib
import logging
import os
import shutil
import signal
import statistics
import tempfile
import time
from array import array

from . import baseline
from .baseline import pc, percentile

AGENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "agents", "bench.py") + ":main"


@contextlib.contextmanager
def supervisor():
    """A started supervisor running ``bench`` and ``victim`` (the restart scenario's
    module: no restart delay, no quarantine), its state in a temporary directory."""
    import cmactor

    # Start the fork server now, with the preload of perf.baseline.context()
    # (cmactor.worker and the floors' code): started by sup.start() it would lack the
    # floors' code, and every floor process would import it (~10 ms a start).
    baseline.start_once(baseline.context())
    state_dir = tempfile.mkdtemp(prefix="cmbench-")
    try:
        victim = {"entry": AGENT, "restart_delay": 0, "max_restarts": 1_000_000}
        sup = cmactor.Supervisor({"bench": AGENT, "victim": victim}, state_dir=state_dir, log_level="WARNING")
        try:
            sup.start(timeout=60)
            yield sup
        finally:
            sup.stop()
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)


def filesystem(path=None):
    """The type of the filesystem holding ``path`` (default: the temporary directory)."""
    path = os.path.realpath(path or tempfile.gettempdir())
    best, kind = "", "unknown filesystem"
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                _, mount, fstype, *_ = line.split()
                if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) > len(best):
                    best, kind = mount, fstype
    except OSError:
        pass
    return kind


@contextlib.contextmanager
def sequential(cur, operation, params, n, warmup):
    """Rounds of ``n`` back-to-back ``cur.execute(operation, params)`` calls."""
    for _ in range(warmup):
        cur.execute(operation, params)
    if cur.fetchone() is None:
        raise RuntimeError(f"{operation} {params} returned no row")

    def round_():
        latencies = array("q", bytes(8 * n))
        start = prev = pc()
        for i in range(n):
            cur.execute(operation, params)
            now = pc()
            latencies[i] = now - prev  # one clock read per request: its end is the next one's start
            prev = now
        return n * 1e9 / (prev - start), percentile(latencies, 50), percentile(latencies, 99)

    yield round_


@contextlib.contextmanager
def walk(cur, count, walks):
    """Rounds of ``walks`` getnext walks of ``count`` rows through the Cursor (which
    asks for cur.batch_size rows per request). No latency figures: a walk is many
    requests, and the Cursor does not show them one by one."""
    cur.max_rows = count + 1

    def one():
        t0 = pc()
        cur.execute("getnext bench.rows", {"count": count})
        elapsed = pc() - t0
        if cur.rowcount != count:
            raise RuntimeError(f"getnext bench.rows returned {cur.rowcount} rows, expected {count}")
        return elapsed

    one()  # warm up

    def round_():
        times = [one() for _ in range(walks)]
        return count * walks * 1e9 / sum(times), None, None

    yield round_


@contextlib.contextmanager
def restart_to_ready(sup, conn, n, warmup):
    """SIGKILL the victim's worker, then time until a get is answered by its successor.

    The get is sent right after the kill: the supervisor either fails it at once
    (it reached the dying worker) and we send it again, or holds it until the
    module is READY again and then dispatches it, so its answer marks READY.
    A round is ``n`` restarts; its rate is 1 / median time.
    """
    import cmactor

    cur = conn.cursor()
    quiet = logging.getLogger("cmactor.supervisor")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # every kill would log an ERROR "restarting"

    def once():
        pid = sup.status()["victim"]["pid"]
        t0 = pc()
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + baseline.TIMEOUT
        while True:
            try:
                cur.execute("get victim.kv")
                return pc() - t0
            except cmactor.OperationalError:
                if time.monotonic() > deadline:
                    raise

    def round_():
        times = [once() for _ in range(n)]
        median = statistics.median(times)
        return 1e9 / median, median, percentile(times, 99)

    try:
        for _ in range(warmup):
            once()
        yield round_
    finally:
        quiet.setLevel(level)
