"""Chaos for the hot standby: rounds of SIGKILL of the active host, SIGSTOP/SIGCONT of it,
kill of the etcd leader member and kill of the standby host, while clients keep writing.

Every write is a setop of the counter agent on a row of its own, so after each round the
active's rows say exactly what happened: a write acknowledged is there once, a write whose
outcome the client never learned is there at most once, and nothing is there twice. Some
clients follow the active (several sockets); others stick to one host, so that a paused
active, resumed, is asked to acknowledge writes it can no longer commit (anything it
acknowledged without etcd would be missing on the new active). Runs
CMACTOR_HA_CHAOS_ROUNDS rounds (default 8, two of each kind); CI runs it.
"""

import functools
import itertools
import os
import signal
import threading
import time

import pytest
from etcd_cluster import etcd_cluster  # noqa: F401
from processes import Run, cli
from test_ha import ha_state, host_config, wait_for

import cmactor
from cmactor.errors import Error

ROUNDS = int(os.environ.get("CMACTOR_HA_CHAOS_ROUNDS", "8"))
KINDS = ("kill active", "pause active", "kill etcd leader", "kill standby")
NODES = ("a", "b")

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(120 + 45 * ROUNDS)]


class Writers:
    """Client threads writing a row each time; what each write came to is recorded."""

    def __init__(self, sockets):
        self.acked = set()  # rows whose write was acknowledged
        self.unknown = set()  # rows whose write raised: applied or not, the client cannot know
        self._lock = threading.Lock()
        self._go = threading.Event()
        self._stop = threading.Event()
        self._idle = []
        self._threads = []
        # Two follow the active; one per host sticks to it (a standby refuses, a paused active is tested).
        for n, paths in enumerate([sockets, sockets, *([path] for path in sockets)]):
            idle = threading.Event()
            self._idle.append(idle)
            thread = threading.Thread(target=self._write, args=(f"w{n}", paths, idle), daemon=True)
            self._threads.append(thread)
            thread.start()
        self.resume()

    def _write(self, name, paths, idle):
        conn = None
        for i in itertools.count():
            idle.set()
            self._go.wait()
            if self._stop.is_set():
                break
            idle.clear()
            if not self._go.is_set():  # paused between the wait and the clear
                continue
            row = f"{name}-{i}"
            try:
                if conn is None:
                    conn = cmactor.connect(socket=paths, timeout=3, failover_timeout=15)
                conn.cursor().execute("setop counter.ctr", {"name": row, "by": "1"})
            except Error:
                with self._lock:
                    self.unknown.add(row)
                if conn is not None:
                    conn.close()
                    conn = None
                time.sleep(0.05)  # a standby refuses at once: no busy loop on it
            else:
                with self._lock:
                    self.acked.add(row)
        if conn is not None:
            conn.close()

    def pause(self):
        """Stop starting writes, and wait for those under way to end (each within its
        timeout and the failover's)."""
        self._go.clear()
        for idle in self._idle:
            assert idle.wait(60), "a client's write did not end within 60 s"
        time.sleep(0.05)  # a writer that saw go set just before the clear has passed its check

    def resume(self):
        self._go.set()

    def stop(self):
        self._stop.set()
        self._go.set()
        for thread in self._threads:
            thread.join(60)


def rows(socket_path):
    """Row name -> count, walked on the supervisor at ``socket_path``."""
    with cmactor.connect(socket=str(socket_path), timeout=30) as conn:
        cur = conn.cursor()
        cur.execute("getnext counter.ctr")
        return {name: int(count) for name, count in cur}


def has_rows(socket_path, expected):
    return rows(socket_path) == expected


def is_active(socket_path):
    return (ha_state(socket_path) or {}).get("role") == "active"


def roles(paths):
    return {node: (ha_state(path) or {}) for node, path in paths.items()}


def settled(paths):
    """(active, standby) once one node is active and the other an in-sync standby following it."""
    seen = roles(paths)
    active = [n for n, s in seen.items() if s.get("role") == "active"]
    standby = [n for n, s in seen.items() if s.get("role") == "standby" and s.get("in_sync") and s.get("active")]
    if len(active) == 1 and len(standby) == 1 and seen[standby[0]]["active"] == active[0]:
        return active[0], standby[0]
    return None


def test_acknowledged_writes_survive_rounds_of_host_and_etcd_failures(tmp_path, etcd_cluster):  # noqa: F811
    configs = {node: host_config(tmp_path, node, etcd_cluster.endpoints) for node in NODES}
    paths = {node: tmp_path / f"{node}.sock" for node in NODES}
    runs = {}

    every = []  # each host run, killed ones too: their logs tell a failed round's story

    def start(node):
        runs[node] = Run(configs[node], cwd=tmp_path)
        every.append((node, runs[node]))

    def other(node):
        return NODES[1 - NODES.index(node)]

    start("a")
    wait_for(lambda: (ha_state(paths["a"]) or {}).get("role") == "active", 20, "a is active")
    start("b")
    wait_for(lambda: settled(paths), 30, "b is an in-sync standby")
    writers = Writers([str(paths[node]) for node in NODES])
    report = []
    try:
        for round_ in range(ROUNDS):
            kind = KINDS[round_ % len(KINDS)]
            active, standby = wait_for(lambda: settled(paths), 60, f"a settled cluster before round {round_}")
            time.sleep(0.5)  # writes under way when the failure strikes
            began = time.monotonic()
            if kind == "kill active":
                runs[active].kill()
                wait_for(functools.partial(is_active, paths[standby]), 15, f"{standby} took over")
                start(active)
            elif kind == "pause active":
                os.killpg(runs[active].pid, signal.SIGSTOP)
                try:
                    wait_for(functools.partial(is_active, paths[standby]), 15, f"{standby} took over")
                    time.sleep(0.5)  # the new active acknowledges writes while the old one sleeps
                finally:
                    os.killpg(runs[active].pid, signal.SIGCONT)
            elif kind == "kill etcd leader":
                leader = etcd_cluster.leader()
                etcd_cluster.kill(leader)
                time.sleep(1.0)
                etcd_cluster.restart(leader)
            else:
                runs[standby].kill()
                time.sleep(0.5)
                start(standby)
            active, standby = wait_for(lambda: settled(paths), 60, f"a settled cluster after round {round_} ({kind})")
            healed = time.monotonic() - began

            writers.pause()
            try:
                # A write under way as the pause began may have ended the term that just settled.
                active, standby = wait_for(lambda: settled(paths), 60, f"a settled cluster, round {round_} paused")
                acked, unknown = set(writers.acked), set(writers.unknown)
                on_active = rows(paths[active])
                missing = sorted(acked - on_active.keys())
                twice = sorted(name for name, count in on_active.items() if count != 1)
                stray = sorted(on_active.keys() - acked - unknown)
                assert (missing, twice, stray) == ([], [], []), f"round {round_} ({kind}): missing, twice, stray"
                wait_for(functools.partial(has_rows, paths[standby], on_active), 15, f"{standby} has the active's rows")
                report.append(f"{kind}: {healed:.1f}s, {len(acked)} acked, {len(unknown)} unknown")
            finally:
                writers.resume()
        writers.stop()
        exports = [cli("export", "--socket", paths[node]).stdout for node in NODES]
        assert exports[0] == exports[1]
    except BaseException:
        for node, run in every:
            if run.proc.poll() is None:
                os.killpg(run.pid, signal.SIGCONT)
                run.stop()
            else:
                run.lines += run.proc.stderr.readlines()
            print(f"--- host {node}, pid {run.pid}:\n{run.text}")
        raise
    finally:
        writers.stop()
        for run in runs.values():
            if run.proc.poll() is None:
                os.killpg(run.pid, signal.SIGCONT)
                run.stop()
    print("\nha chaos:\n  " + "\n  ".join(report))
    assert len(writers.acked) > 100 * ROUNDS / 8
