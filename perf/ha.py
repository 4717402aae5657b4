"""The hot standby on etcd ([ha]): acknowledged sets against the local journal, and
takeover times, measured in one run.

    python -m perf.ha [--quick] [--rounds N] [--format table|json]

Every supervisor is a ``cmactor run CONFIG`` process in a session of its own, as an
operator runs it, with perf/agents/bench.py as module ``bench``; the sets go to its
persistent table ``pkv``. The cluster's etcd is three local members
(cmsupervisor.ha.localetcd: 50 ms heartbeat, 500 ms election timeout), so every
commit pays three fsyncs on this machine's one disk.

- Sets: a supervisor without [ha] (each set journaled and fsynced before its reply)
  against the active of a two-node cluster (each set journaled, then committed to
  etcd before its reply, while the standby applies it). Both are up for the whole
  group and their rounds interleave (perf._measure), so a drift of the machine hits
  both sides of the ratio alike.
- Takeover: SIGKILL of the active host's process group, at a random moment, to the
  first write that the other host acknowledges, seen by a client writing back to
  back through ``cmactor.connect(socket=[a, b])``; then the killed host is started
  again with the same command and the round ends once it is an in-sync standby (its
  time is the rejoin row). Each acknowledged write is read back from the new active:
  a write lost shows in the row's ``lost``. Measured with lease_ttl 1 and 2, a
  cluster each.
"""

import argparse
import contextlib
import itertools
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import psutil

import cmactor
from cmactor.errors import OperationalError
from cmsupervisor.ha.localetcd import ETCD, INSTALL_HINT, EtcdCluster

from . import CLIENTS, INFLIGHT, Step, _measure, baseline, print_progress, report, scenarios
from .baseline import pc, percentile

# rounds: interleaved rounds of the set rows (medians reported). sequential: sets per
# round, and warm-up, of the one client; pipelined: sets per round (and warm-up) of the
# CLIENTS clients together. takeovers: kills per lease_ttl.
QUICK = {"rounds": 3, "sequential": dict(n=200, warmup=50), "pipelined": dict(n=2000, warmup=400), "takeovers": 3}
FULL = {"rounds": 5, "sequential": dict(n=2000, warmup=200), "pipelined": dict(n=16000, warmup=2000), "takeovers": 20}
LEASE_TTLS = (1, 2)

SET = "set bench.pkv"
# Acknowledged writes the takeover client makes before each kill: the active is serving it.
WRITES_BEFORE_KILL = 20
# Seconds a host may take to be active, or an in-sync standby, after its start.
HOST_WAIT = 60


class Host:
    """A ``cmactor run CONFIG`` in a session of its own (its process group killed whole);
    what it writes goes to a log file beside its config, read when it fails."""

    def __init__(self, directory, name, ha=None):
        self.name = name
        self.socket = os.path.join(directory, f"{name}.sock")
        self.log = os.path.join(directory, f"{name}.log")
        self.config = os.path.join(directory, f"{name}.toml")
        lines = [
            "[supervisor]",
            f"state_dir = {json.dumps(os.path.join(directory, 'state-' + name))}",
            f"socket = {json.dumps(self.socket)}",
            "start_timeout = 60",
        ]
        if ha is not None:
            lines += ["", "[ha]", *(f"{key} = {json.dumps(value)}" for key, value in ha.items()), f'node = "{name}"']
        lines += ["", "[agents.bench]", f"entry = {json.dumps(scenarios.AGENT)}"]
        with open(self.config, "w") as f:
            f.write("\n".join(lines) + "\n")
        self.proc = None
        self._dying = []  # the processes of a killed host, until reap()

    def start(self):
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cmsupervisor", "run", self.config],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )

    def ha(self):
        """Its supervisor's ``ha`` answer ({"node", "role", "active", "in_sync", "revision"}),
        or None while it does not answer."""
        try:
            with cmactor.connect(socket=self.socket, timeout=5) as conn:
                return conn.request({"op": "ha"})["ha"]
        except OperationalError:
            return None

    def wait_until(self, test, what, timeout=HOST_WAIT):
        """Ask ``ha`` until ``test(answer)`` holds; else raise with the tail of its log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            state = self.ha()
            if state is not None and test(state):
                return state
            time.sleep(0.02)
        why = "it exited" if self.proc.poll() is not None else f"not within {timeout} s"
        with open(self.log, errors="replace") as f:
            tail = "".join(f.readlines()[-20:])
        raise RuntimeError(f"host {self.name} is not {what}: {why}; the end of {self.log}:\n{tail}")

    def kill(self):
        """SIGKILL its process group (supervisor and fork server); the time of the kill (ns).
        Its workers, each in a group of its own, end when they see their supervisor gone:
        reap() waits for them."""
        try:
            self._dying = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            self._dying = []
        killed_at = pc()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        return killed_at

    def reap(self):
        """Wait until the killed host's processes are all gone (SIGKILL any that lingers)."""
        self.proc.wait()
        _, alive = psutil.wait_procs(self._dying, timeout=10)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(alive, timeout=10)
        self._dying = []

    def close(self):
        """Kill and reap it, if it runs: nothing of it is left behind."""
        if self.proc is not None and self.proc.poll() is None:
            self.kill()
        if self.proc is not None:
            self.reap()


def sweep(directory):
    """SIGKILL the group of any host still running a config of ``directory``: one whose
    Popen a Ctrl-C interrupted after the fork is no Host's to close."""
    for proc in psutil.process_iter(["cmdline"]):
        argv = proc.info["cmdline"] or []
        if "cmsupervisor" in argv and any(directory in arg for arg in argv):
            with contextlib.suppress(OSError):
                if os.getpgid(proc.pid) == proc.pid:  # a host leads its group: never this one's
                    os.killpg(proc.pid, signal.SIGKILL)


def is_active(state):
    return state["role"] == "active"


def is_in_sync_standby(state):
    return state["role"] == "standby" and state["in_sync"]


@contextlib.contextmanager
def hosts(*started):
    """Close every host on the way out, whatever happens (Ctrl-C too): each one, even if
    closing another failed."""
    with contextlib.ExitStack() as stack:
        for host in started:
            stack.callback(host.close)
        yield started


@contextlib.contextmanager
def local_host(directory):
    """A supervisor without [ha], serving."""
    with hosts(Host(directory, "local")) as (host,):
        host.start()
        host.wait_until(lambda state: state["role"] == "single", "serving")
        yield host


@contextlib.contextmanager
def cluster(directory, endpoints, lease_ttl):
    """A two-node cluster: a (started first) active, b its in-sync standby."""
    ha = {"etcd": endpoints, "cluster": f"bench-ttl{lease_ttl}", "lease_ttl": lease_ttl}
    with hosts(*(Host(directory, f"ttl{lease_ttl}-{n}", ha) for n in "ab")) as (a, b):
        a.start()
        a.wait_until(is_active, "active")
        b.start()
        b.wait_until(is_in_sync_standby, "an in-sync standby")
        yield a, b


@contextlib.contextmanager
def sequential_sets(socket, sizes):
    """perf's sequential rounds: one Cursor (this process: the supervisors are processes of
    their own) setting the same row back to back."""
    with cmactor.connect(socket=socket, timeout=30) as conn:
        with scenarios.sequential(conn.cursor(), SET, {"key": "k", "value": "v"}, **sizes) as round_:
            yield round_


def set_steps(sizes, local, active, standby):
    """The set rows, local journal then [ha] (compared with it), for the interleaved rounds."""
    # Each of the CLIENTS clients sends n/CLIENTS: as many sets per round as one client would.
    per_client = {k: v // CLIENTS for k, v in sizes["pipelined"].items()}
    pipelined = baseline.request("pkv", op="set", params={"key": "k", "value": "v"})
    fs = scenarios.filesystem(local.socket)

    def clients(path):
        return baseline.clients([path] * CLIENTS, pipelined, inflight=INFLIGHT, **per_client)

    return [
        Step(
            "local_set",
            "set, local journal, sequential (Cursor)",
            "ops/s",
            None,
            lambda: sequential_sets(local.socket, sizes["sequential"]),
            f"no [ha]: each set journaled and fsynced before its reply (state_dir on {fs})",
        ),
        Step(
            "ha_set",
            "set, [ha] active, sequential (Cursor)",
            "ops/s",
            "local_set",
            lambda: sequential_sets([active.socket, standby.socket], sizes["sequential"]),
            "journaled, then committed to the 3-member etcd before its reply; the client has both "
            "sockets (its sets carry a token); ratio: over the local journal",
        ),
        Step(
            "local_set_4x32",
            f"set, local journal, {CLIENTS} client procs x {INFLIGHT} in flight",
            "ops/s",
            None,
            lambda: clients(local.socket),
            "raw protocol: the sets of a loop turn share one fsync",
        ),
        Step(
            "ha_set_4x32",
            f"set, [ha] active, {CLIENTS} client procs x {INFLIGHT} in flight",
            "ops/s",
            "local_set_4x32",
            lambda: clients(active.socket),
            "raw protocol to the active's socket (no tokens): what piled up while a commit was under "
            "way goes in the next transaction; ratio: over the local journal",
        ),
    ]


class Writer(threading.Thread):
    """Sets rows ``<prefix>-<n>`` back to back through ``conn`` (which follows the active)
    until stopped; each acknowledgement is kept as (time ns, n, socket that gave it)."""

    def __init__(self, conn, prefix):
        super().__init__(name="perf-ha-writer", daemon=True)
        self.conn, self.prefix = conn, prefix
        self.acks = []
        self.error = None
        self._halt = threading.Event()
        self._changed = threading.Condition()

    def run(self):
        cur = self.conn.cursor()
        try:
            for n in itertools.count():
                if self._halt.is_set():
                    return
                cur.execute(SET, {"key": f"{self.prefix}-{n}", "value": str(n)})
                with self._changed:
                    self.acks.append((pc(), n, self.conn.socket_path))
                    self._changed.notify_all()
        except Exception as exc:  # the main thread raises it
            with self._changed:
                self.error = exc
                self._changed.notify_all()

    def first(self, test, timeout):
        """The first acknowledgement for which ``test(ack)`` holds, once there is one."""
        deadline = time.monotonic() + timeout
        with self._changed:
            seen = 0
            while True:
                for ack in self.acks[seen:]:
                    if test(ack):
                        return ack
                seen = len(self.acks)
                if self.error is not None:
                    raise RuntimeError(f"the takeover client's write failed: {self.error}") from self.error
                if not self._changed.wait(max(0.0, deadline - time.monotonic())):
                    raise RuntimeError(f"no write acknowledged as awaited within {timeout} s")

    def stop(self):
        """Stop after the write under way; every write it made was acknowledged."""
        self._halt.set()
        self.join(60)
        if self.error is not None:
            raise RuntimeError(f"the takeover client's write failed: {self.error}") from self.error


def pkv_rows(conn):
    """{key: value} of bench.pkv, walked through ``conn``."""
    cur = conn.cursor()
    cur.max_rows = 10_000_000
    cur.execute("getnext bench.pkv")
    return dict(cur.fetchall())


def takeovers(pair, rounds, lease_ttl, say):
    """``rounds`` kills of the active, alternately a and b; the takeover times, the rejoin
    times (ns), and the writes acknowledged before a takeover but missing after it."""
    times, rejoins, lost = [], [], 0
    # failover_timeout well above a takeover: a slow one is measured, not failed.
    with cmactor.connect(socket=[h.socket for h in pair], timeout=5, failover_timeout=60) as conn:
        for i in range(rounds):
            say(f"lease_ttl {lease_ttl}: takeover {i + 1}/{rounds}")
            active = next(h for h in pair if is_active(h.ha() or {"role": None}))
            survivor = pair[1] if active is pair[0] else pair[0]
            writer = Writer(conn, f"ttl{lease_ttl}-r{i}")
            writer.start()
            try:
                writer.first(lambda ack: ack[1] >= WRITES_BEFORE_KILL - 1, 30)
                # A kill at a fixed delay after the previous rejoin would fall at the same phase
                # of the survivor's lease ticks (every lease_ttl / 3 s, from its start) every round,
                # and so would its takeover: the kill comes at a random moment of a lease_ttl.
                time.sleep(random.uniform(0, lease_ttl))
                killed_at = active.kill()
                # The write under way when the host died goes again, with its token, to the
                # survivor: the first acknowledgement from it ends the takeover.
                acked_at = writer.first(lambda ack, t=killed_at, s=survivor.socket: ack[0] > t and ack[2] == s, 120)[0]
            finally:
                writer.stop()
            active.reap()
            times.append(acked_at - killed_at)
            rows = pkv_rows(conn)
            lost += sum(rows.get(f"{writer.prefix}-{n}") != str(n) for _, n, _ in writer.acks)
            started = pc()
            active.start()
            active.wait_until(is_in_sync_standby, "an in-sync standby again")
            rejoins.append(pc() - started)
        # The last host killed is a standby again: its copy must be the active's.
        with cmactor.connect(socket=active.socket, timeout=30) as standby:
            differ = pkv_rows(standby) != pkv_rows(conn)
    return times, rejoins, lost, differ


def time_row(key, name, samples, unit, note, **extra):
    """A row of times (ns samples): the median as its rate in ms, p50/p99 in us as perf shows them."""
    return {
        "key": key,
        "name": name,
        "kind": "scenario",
        "unit": unit,
        "rate": statistics.median(samples) / 1e6,
        "p50_us": statistics.median(samples) / 1e3,
        "p99_us": percentile(samples, 99) / 1e3,
        "baseline": None,
        "ratio": None,
        "rounds": len(samples),
        "max_us": max(samples) / 1e3,
        "note": note,
        **extra,
    }


def run(quick=False, rounds=None, progress=None):
    """Every row (perf.run()'s shape; takeover and rejoin rows add ``max_us``, and the
    takeover rows ``lease_ttl``, ``lost`` and ``replicas_differ``)."""
    sizes = QUICK if quick else FULL
    rounds = rounds or sizes["takeovers"]
    say = progress or (lambda line: None)
    rows, rejoins = [], []
    with tempfile.TemporaryDirectory(prefix="cmactor-ha-") as directory, contextlib.ExitStack() as stack:
        stack.callback(sweep, directory)
        say("starting a 3-member etcd")
        etcd = EtcdCluster(os.path.join(directory, "etcd"))
        stack.callback(etcd.stop)
        etcd.start()
        for lease_ttl in LEASE_TTLS:
            say(f"starting a two-node cluster, lease_ttl {lease_ttl}")
            with cluster(directory, etcd.endpoints, lease_ttl) as (a, b):
                if lease_ttl == LEASE_TTLS[0]:  # the sets, once: the lease plays no part in them
                    say("starting a supervisor without [ha]")
                    with local_host(directory) as local:
                        rows += _measure(set_steps(sizes, local, a, b), sizes["rounds"], say)
                times, rejoined, lost, differ = takeovers((a, b), rounds, lease_ttl, say)
            rejoins += rejoined
            rows.append(
                time_row(
                    f"takeover_ttl{lease_ttl}",
                    f"takeover after SIGKILL of the active, lease_ttl {lease_ttl}",
                    times,
                    "ms/takeover",
                    f"kill -9 of the active host's process group to the first write the other acknowledges, "
                    f"seen by a client writing back to back with both sockets; max {max(times) / 1e6:,.0f} ms; "
                    f"acknowledged writes lost: {lost}; the nodes' rows "
                    f"{'DIFFER' if differ else 'are the same'} at the end",
                    lease_ttl=lease_ttl,
                    lost=lost,
                    replicas_differ=differ,
                )
            )
    rows.append(
        time_row(
            "rejoin",
            "rejoin: killed host started again, to in-sync standby",
            rejoins,
            "ms/rejoin",
            f"the same `cmactor run` command: start, join from etcd, load; max {max(rejoins) / 1e6:,.0f} ms",
        )
    )
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m perf.ha",
        description="The hot standby on etcd: acknowledged sets against the local journal, and takeover times.",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes and 3 takeovers per lease_ttl")
    parser.add_argument("--rounds", type=int, help="takeovers per lease_ttl (default: 20; --quick: 3)")
    parser.add_argument("--format", choices=("table", "json"), default="table", help="output format (default: table)")
    args = parser.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if ETCD is None:
        print(f"perf.ha: {INSTALL_HINT}", file=sys.stderr)
        return 2
    return report(
        lambda: run(quick=args.quick, rounds=args.rounds, progress=print_progress),
        args.quick,
        args.format,
        "perf.ha: interrupted; every process it started was stopped",
    )


if __name__ == "__main__":
    sys.exit(main())
