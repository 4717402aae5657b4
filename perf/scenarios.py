"""cmactor scenarios through a real Supervisor running perf/agents/bench.py.

The supervisor runs in this process (its loop is a thread) and the agents in
forkserver workers, as with an embedded ``cmactor.Supervisor``. Most scenarios
share one supervisor (``supervisor()``), which runs with direct reads off so that
every request is brokered, as before direct reads existed; the direct-read
scenarios (``direct_clients()``) start one of their own with direct reads on, and
so do start-up, save and load (``own_supervisor()``, the default options).
Sequential scenarios use the public client (``sup.connect().cursor().execute``),
from this process or a client process of its own (``cursor_main``); pipelined
ones and the call chains use raw client processes (perf.baseline.clients),
because a Cursor has one request in flight per connection.

As in perf.baseline, each scenario is a context manager that warms up and
yields ``round()``, returning (rate, p50 ns, p99 ns) for one timed round
(latencies None where they mean nothing), or a baseline.Result. Derived rows
(``extra_cost``, ``admit_timing``) yield a ``round(latest)`` computed from the
other rows' results of the same round.
"""

import contextlib
import importlib.util
import itertools
import logging
import os
import random
import shutil
import signal
import socket
import statistics
import tempfile
import time
from array import array

from cmactor.wire import protocol as P

from . import baseline
from .baseline import Result, pc, percentile

AGENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "agents", "bench.py") + ":main"

# A supervisor's route for a module can be None for a moment after READY (until its
# worker has been told to serve): seconds to keep asking.
ROUTE_WAIT = 10.0


def direct_reads_available():
    """Whether this runtime has direct reads (the supervisor option ``direct_reads``)."""
    from cmsupervisor.config import SUPERVISOR_OPTIONS

    return "direct_reads" in SUPERVISOR_OPTIONS


def brokered_options():
    """The Supervisor options that send every request through the supervisor: direct
    reads off (nothing on a runtime that predates them, where every request is brokered)."""
    return {"direct_reads": False} if direct_reads_available() else {}


@contextlib.contextmanager
def supervisor():
    """A started supervisor running perf/agents/bench.py as every module the shared
    scenarios use, its state in a temporary directory:

    - ``bench``: the target of the request scenarios;
    - ``victim`` and ``jvictim``: the restart scenarios' modules (no restart delay,
      no quarantine); ``jvictim`` gets a journal of rows first;
    - ``chain_a``, ``chain_b``, ``chain_c``: agents that call each other.

    Direct reads are off (``brokered_options``): the Cursors' gets, the agents' own
    unchecked gets and the restart rows' gets all go through the supervisor, as
    they did before direct reads, so their rows stay comparable with older runs.
    """
    import cmactor

    # Start the fork server now, with the preload of perf.baseline.context()
    # (cmactor.worker.process and the floors' code): started by sup.start() it would lack the
    # floors' code, and every floor process would import it (~10 ms a start).
    baseline.start_once(baseline.context())
    state_dir = tempfile.mkdtemp(prefix="cmbench-")
    try:
        victim = {"entry": AGENT, "restart_delay": 0, "max_restarts": 1_000_000}
        agents = {"bench": AGENT, "victim": victim, "jvictim": dict(victim)}
        agents.update({f"chain_{x}": AGENT for x in "abc"})
        sup = cmactor.Supervisor(agents, state_dir=state_dir, log_level="WARNING", **brokered_options())
        try:
            sup.start(timeout=60)
            if sup.status()["bench"].get("direct") is not None:
                raise RuntimeError("the shared supervisor serves direct reads: its rows would not be brokered")
            yield sup
        finally:
            sup.stop()
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)


@contextlib.contextmanager
def own_supervisor(agents, state_dir, timer=None, **options):
    """A supervisor of its own on ``state_dir``, started (``timer``: a list to which
    the time of start() is appended, ns) and always stopped. ``options``: more
    Supervisor options (default: the runtime's defaults)."""
    import cmactor

    sup = cmactor.Supervisor(agents, state_dir=state_dir, log_level="WARNING", **options)
    try:
        t0 = pc()
        sup.start(timeout=60)
        if timer is not None:
            timer.append(pc() - t0)
        yield sup
    finally:
        sup.stop()


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


def back_to_back(cur, operation, params, n):
    """``n`` back-to-back ``cur.execute(operation, params)`` calls: (start ns, end ns, latencies ns)."""
    latencies = array("q", bytes(8 * n))
    start = prev = pc()
    for i in range(n):
        cur.execute(operation, params)
        now = pc()
        latencies[i] = now - prev  # one clock read per request: its end is the next one's start
        prev = now
    return start, prev, latencies


@contextlib.contextmanager
def sequential(cur, operation, params, n, warmup):
    """Rounds of ``n`` back-to-back ``cur.execute(operation, params)`` calls."""
    for _ in range(warmup):
        cur.execute(operation, params)
    if cur.fetchone() is None:
        raise RuntimeError(f"{operation} {params} returned no row")

    def round_():
        start, end, latencies = back_to_back(cur, operation, params, n)
        return n * 1e9 / (end - start), percentile(latencies, 50), percentile(latencies, 99)

    yield round_


def cursor_main(path, message, inflight, warmup, ctl):
    """Client process (``baseline.clients(main=cursor_main)``): the public client,
    ``connect(socket=path).cursor()``, running ``message`` = (operation, params) back
    to back (``inflight`` is 1: a Cursor has one request in flight). Same protocol
    on ``ctl`` as ``baseline.client_main``: each round returns (t0, t1, latencies ns)."""
    import cmactor

    baseline.quiet_child()
    operation, params = message
    with cmactor.connect("bench", socket=path) as conn:
        cur = conn.cursor()
        for _ in range(warmup):
            cur.execute(operation, params)
        result = "ready" if cur.fetchone() is not None else "no row"
        while True:
            try:
                ctl.send(result)
                n = ctl.recv()
            except (OSError, EOFError):  # the parent gave up: leave quietly
                break
            if n is None:
                break
            result = back_to_back(cur, operation, params, n)


# -- direct reads ------------------------------------------------------------------------


@contextlib.contextmanager
def direct_supervisor():
    """A supervisor of its own running bench.py as ``bench`` with direct reads on, once
    its worker serves them (its route is given out); state in a temporary directory."""
    state_dir = tempfile.mkdtemp(prefix="cmbench-direct-")
    try:
        with own_supervisor({"bench": AGENT}, state_dir, direct_reads=True) as sup:
            deadline = time.monotonic() + ROUTE_WAIT
            while not (sup.status()["bench"].get("direct") or {}).get("serving"):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"module bench serves no direct reads {ROUTE_WAIT:g}s after READY")
                time.sleep(0.01)
            yield sup
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)


@contextlib.contextmanager
def direct_clients(n_clients, message, n, inflight, warmup, main):
    """``baseline.clients`` (``n_clients`` processes running ``main``: ``cursor_main``
    or ``direct_client_main``) pointed at a ``direct_supervisor()``. After the
    clients' warm-up, checks that each holds a connection to the worker's own
    socket, i.e. that its reads did go direct."""
    with direct_supervisor() as sup:
        with baseline.clients(
            [sup.socket_path] * n_clients, message, n=n, inflight=inflight, warmup=warmup, main=main
        ) as round_:
            direct = sup.status()["bench"]["direct"]
            if direct["connections"] < n_clients:
                raise RuntimeError(
                    f"{direct['connections']} direct connections to bench's worker after the "
                    f"warm-up, expected {n_clients}: the reads went through the supervisor"
                )
            yield round_


def ask_route(path, module, timeout=ROUTE_WAIT):
    """Ask the supervisor at ``path`` where to read ``module`` from directly (the
    ``route`` op): {"path", "generation"}. Asks again while it says None (not serving
    yet), up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(baseline.TIMEOUT)
        sock.connect(path)
        reader = P.FrameReader(max_frame=None)
        for rid in itertools.count(1):
            sock.sendall(P.pack({"id": rid, "op": "route", "module": module, "user": "bench"}))
            reply = None
            while reply is None:
                data = sock.recv(P.READ_SIZE)
                if not data:
                    raise ConnectionError("the supervisor closed the connection")
                reply = next((m for m in reader.feed(data) if m.get("id") in (rid, None)), None)
            if not reply.get("ok"):
                raise RuntimeError(f"route {module}: {reply.get('error')}")
            if reply["route"] is not None:
                return reply["route"]
            if time.monotonic() > deadline:
                raise RuntimeError(f"the supervisor gave no route to {module} within {timeout:g}s")
            time.sleep(0.01)
    finally:
        sock.close()


def direct_client_main(path, message, inflight, warmup, ctl):
    """Client process (``baseline.clients(main=direct_client_main)``): ask the supervisor
    at ``path`` for the route of ``message``'s module once, then run
    ``baseline.client_main`` (the raw client) against the worker's own socket."""
    baseline.quiet_child()
    try:
        route = ask_route(path, message["module"])
    except Exception as exc:  # the parent raises it as "did not start"
        ctl.send(f"no route to module {message['module']!r}: {exc}")
        return
    baseline.client_main(route["path"], message, inflight, warmup, ctl)


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

    yield _walk_rounds(one, count, walks)


def _walk_rounds(one, count, walks):
    """The round function of a walk row: ``walks`` calls of ``one`` (one walk of ``count``
    rows, returning its time) after a warm-up walk; rows per second, no latencies."""
    one()

    def round_():
        times = [one() for _ in range(walks)]
        return count * walks * 1e9 / sum(times), None, None

    return round_


@contextlib.contextmanager
def dbapi_walk(conn, count, walks):
    """Rounds of ``walks`` walks of the table walk() reads, through cmactor.exos_dbapi
    on the cmfrontend connection ``conn``: a request with an open index column and two
    add_field columns, executed, and every row read with iterrow(), as an app ported
    from the original reads a table."""
    from cmactor import exos_dbapi as db

    cur = db.Connection(conn).cursor()
    cur.max_rows = count
    req = db.request(db.CM_OP_GET)
    req.add_index(db.Column("bench", "rows", "index"))
    req.add_param("count", count)
    req.add_field("index", db.Column("bench", "rows", "index"))
    req.add_field("value", db.Column("bench", "rows", "value"))

    def one():
        t0 = pc()
        cur.execute(req)
        rows = sum(1 for _ in cur.iterrow())
        elapsed = pc() - t0
        if rows != count:
            raise RuntimeError(f"exos_dbapi walk of bench.rows read {rows} rows, expected {count}")
        return elapsed

    yield _walk_rounds(one, count, walks)


@contextlib.contextmanager
def dbapi_first_row(conn, count, reads, calls):
    """Rounds of ``reads`` reads of the first row of a ``count``-row walk through
    cmactor.exos_dbapi (execute(), then one fetchrow(), as ezvxlan reads one row and
    stops); rows per second, and the agent calls one read cost appended to ``calls``."""
    from cmactor import exos_dbapi as db

    cur = db.Connection(conn).cursor()
    req = db.request(db.CM_OP_GET)
    req.add_index(db.Column("bench", "rows", "index"))
    req.add_param("count", count)
    counter = conn.cursor()

    def agent_calls():
        counter.execute("get bench.rowcalls")
        return int(counter.fetchone()[0])

    def round_():
        agent_calls()
        times = []
        for _ in range(reads):
            t0 = pc()
            cur.execute(req)
            if cur.fetchrow().field_values["index"] != "0":
                raise RuntimeError("exos_dbapi's first row of bench.rows is not row 0")
            times.append(pc() - t0)
        calls.append(agent_calls() / reads)
        return reads * 1e9 / sum(times), None, None

    round_()
    yield round_


@contextlib.contextmanager
def restart_to_ready(sup, conn, module, n, warmup, journal_rows=0):
    """SIGKILL ``module``'s worker, then time until a get is answered by its successor.

    The get is sent right after the kill: the supervisor either fails it at once
    (it reached the dying worker) and we send it again, or holds it until the
    module is READY again and then dispatches it, so its answer marks READY.
    ``journal_rows``: first set that many distinct rows on the module's persistent
    table, unsaved: every restart then replays them from the journal before READY.
    A round is ``n`` restarts; its rate is 1 / median time; p50 and p99 are taken
    over every kill of every round.
    """
    import cmactor

    cur = conn.cursor()
    if journal_rows:
        fill_journal(sup.socket_path, module, journal_rows)
    quiet = logging.getLogger("cmactor.supervisor")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # every kill would log an ERROR "restarting"

    def once():
        pid = sup.status()[module]["pid"]
        t0 = pc()
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + baseline.TIMEOUT
        while True:
            try:
                cur.execute(f"get {module}.kv")
                return pc() - t0
            except cmactor.OperationalError:
                if time.monotonic() > deadline:
                    raise

    def round_():
        times = [once() for _ in range(n)]
        median = statistics.median(times)
        return Result(1e9 / median, median, percentile(times, 99), samples=times)

    try:
        for _ in range(warmup):
            once()
        if journal_rows:  # the journal survived the warm-up kills, all of it
            cur.max_rows = journal_rows + 1
            cur.execute(f"getnext {module}.pkv")
            if cur.rowcount != journal_rows:
                raise RuntimeError(f"{module}.pkv has {cur.rowcount} rows after a restart, expected {journal_rows}")
        yield round_
    finally:
        quiet.setLevel(level)


def fill_journal(path, module, rows):
    """Set ``rows`` distinct rows of ``module``'s persistent table through the raw
    client, 32 in flight: each is journaled (and fsynced, one fsync per loop turn)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        message = baseline.request("pkv", module, "set", {"key": "", "value": "journaled"})
        baseline.drive(sock, P.FrameReader(None), message, itertools.count(1), rows, 32, distinct_keys=True)
    finally:
        sock.close()


# -- calls between agents -------------------------------------------------------------


@contextlib.contextmanager
def agent_calls(cur, module, target, mode, count, warmup):
    """Rounds of ``count`` gets of ``target`` made from inside ``module``'s
    ``calls`` action (perf/agents/bench.py), timed by the agent: ``mode`` "checked"
    (the gets carry the action as caller, the supervisor checks each) or "plain"
    (made from a thread the agent started: no caller, no check)."""

    def once(n):
        cur.execute(f"get {module}.calls", {"count": n, "mode": mode, "target": target})
        row = dict(zip((d[0] for d in cur.description), cur.fetchone()))
        return n * 1e9 / int(row["ns"]), int(row["p50"]), int(row["p99"])

    once(warmup)
    yield lambda: once(count)


@contextlib.contextmanager
def admit_timing(sup, plain):
    """Time the deadlock detector's check, ``WaitGraph.admit``, on every call it
    admits: the supervisor runs it on its loop thread for each request that carries
    a caller (made from inside an agent action). The method is wrapped on this
    supervisor's graph only; the wrapper's two clock reads (~0.1 us) are counted in.

    Yields a derived round: mean, p50 and p99 per check over the checks made since
    the last round (every step of the group before this one), and as ratio the mean
    check over the mean round trip of the same get unchecked (row ``plain``).
    """
    samples = array("q")
    graph = sup._graph
    admit = graph.admit

    def timed(mod, pending):
        t0 = pc()
        try:
            return admit(mod, pending)
        finally:
            samples.append(pc() - t0)

    def round_(latest):
        if not samples:
            raise RuntimeError("no call was checked: did the agents' calls carry their caller?")
        mean = sum(samples) / len(samples)
        result = Result(
            mean / 1000, percentile(samples, 50), percentile(samples, 99), ratio=mean * latest[plain].rate / 1e9
        )
        del samples[:]
        return result

    graph.admit = timed
    try:
        yield round_
    finally:
        del graph.admit


def extra_cost(slow, fast):
    """A derived round: the time ``slow`` takes over ``fast`` per request in the same
    round, in us (mean; p50 likewise), and as ratio the extra over ``fast``'s mean."""

    def round_(latest):
        a, b = latest[slow], latest[fast]
        extra_us = 1e6 / a.rate - 1e6 / b.rate
        return Result(extra_us, a.p50 - b.p50, None, ratio=extra_us * b.rate / 1e6)

    return contextlib.nullcontext(round_)


# -- start-up ---------------------------------------------------------------------------


def random_dag(n, seed):
    """``n`` module names, each depending on 0 to 2 modules named before it, in a
    shuffled order (the order in which the supervisor starts them): {name: deps}."""
    rng = random.Random(seed)
    names = [f"m{i:02d}" for i in range(n)]
    deps = {name: rng.sample(names[:i], min(i, rng.randint(0, 2))) for i, name in enumerate(names)}
    order = list(names)
    rng.shuffle(order)
    return {name: deps[name] for name in order}


def dag_depth(deps):
    """Modules on the longest dependency chain: loads along it run one after another."""
    level = {}

    def depth(name):
        if name not in level:
            level[name] = 1 + max((depth(d) for d in deps[name]), default=0)
        return level[name]

    return max(depth(name) for name in deps)


def median_rounds(once, count, items):
    """A ``round()`` of ``count`` calls of ``once`` (each returns its time, ns): ``items``
    per median time as the rate, every time as a sample."""

    def round_():
        times = [once() for _ in range(count)]
        median = statistics.median(times)
        return Result(items * 1e9 / median, median, None, samples=times)

    return round_


@contextlib.contextmanager
def startup(deps, starts, warmup):
    """Rounds of ``starts`` supervisors of ``len(deps)`` modules (bench.py, whose
    config_deps come from BENCH_DEPS), each in a new state directory: the time from
    ``Supervisor.start()`` to its return, when every module is READY. Stops are not
    timed. Rate: modules / median time."""
    agents = {name: {"entry": AGENT, "env": {"BENCH_DEPS": ",".join(d)}} for name, d in deps.items()}

    def once():
        state_dir = tempfile.mkdtemp(prefix="cmbench-start-")
        try:
            timer = []
            with own_supervisor(agents, state_dir, timer):
                pass
            return timer[0]
        finally:
            shutil.rmtree(state_dir, ignore_errors=True)

    for _ in range(warmup):
        once()

    yield median_rounds(once, starts, len(deps))


# -- save and load ------------------------------------------------------------------------


@contextlib.contextmanager
def save_rows(rows, saves):
    """A supervisor of its own whose ``store`` module generates ``rows`` rows in its
    persistent table; rounds of ``saves`` timed ``sup.save()`` calls (walk, encode,
    atomic write with fsyncs). Rate: rows / median save time."""
    state_dir = tempfile.mkdtemp(prefix="cmbench-save-")
    try:
        agents = {"store": {"entry": AGENT, "env": {"BENCH_ROWS": str(rows)}}}
        with own_supervisor(agents, state_dir) as sup:

            def once():
                t0 = pc()
                saved = sup.save()
                elapsed = pc() - t0
                if saved["rows"] != rows:
                    raise RuntimeError(f"saved {saved['rows']} rows, expected {rows}")
                return elapsed

            once()  # warm up

            yield median_rounds(once, saves, rows)
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)


@contextlib.contextmanager
def load_rows(rows, loads):
    """A config file holding ``rows`` saved rows of module ``store`` (made once: generate,
    save, stop); rounds of ``loads`` fresh supervisors started on it, timed from
    ``start()`` to READY, which replays every saved row into the agent. Rate: rows /
    median time (it includes starting the worker process)."""
    state_dir = tempfile.mkdtemp(prefix="cmbench-load-")
    try:
        with own_supervisor({"store": {"entry": AGENT, "env": {"BENCH_ROWS": str(rows)}}}, state_dir) as sup:
            sup.save()
        last_key = f"k{rows - 1:07d}"

        def once():
            timer = []
            # BENCH_ROWS=0: had the rows not been loaded, the table would be empty.
            with own_supervisor({"store": {"entry": AGENT, "env": {"BENCH_ROWS": "0"}}}, state_dir, timer) as sup:
                with sup.connect("bench") as conn:
                    conn.cursor().execute("get store.pkv", {"key": last_key})  # raises if it was not loaded
            return timer[0]

        once()  # warm up

        yield median_rounds(once, loads, rows)
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)


# -- a peer: Ray ------------------------------------------------------------------------------


def ray_available():
    return importlib.util.find_spec("ray") is not None


@contextlib.contextmanager
def ray_calls(n, warmup, inflight):
    """The bench agent's plain get through a Ray actor: rounds of ``n`` calls with up
    to ``inflight`` outstanding (1: ``ray.get(actor.get.remote())`` back to back).
    Starts Ray (2 CPUs, no dashboard) unless it runs already, and shuts it down."""
    import ray

    class KV:  # defined here so that Ray ships it by value to its worker
        def __init__(self):
            self.kv = {"k": "v"}

        def get(self, key):
            return {"key": key, "value": self.kv.get(key, "")}

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    try:
        actor = ray.remote(KV).remote()

        def batch(count):
            latencies = array("q")
            pending = {}  # object ref -> when it was sent
            sent = 0
            t0 = pc()
            while sent < count or pending:
                while sent < count and len(pending) < inflight:
                    pending[actor.get.remote("k")] = pc()
                    sent += 1
                if inflight == 1:
                    done = list(pending)
                    ray.get(done[0])
                else:
                    done, _ = ray.wait(list(pending), num_returns=1)
                    ray.get(done)
                now = pc()
                for ref in done:
                    latencies.append(now - pending.pop(ref))
            return count * 1e9 / (pc() - t0), percentile(latencies, 50), percentile(latencies, 99)

        batch(warmup)
        yield lambda: batch(n)
        ray.kill(actor)
    finally:
        if started:
            ray.shutdown()
