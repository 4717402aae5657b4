"""The benchmark agent: tables that answer at once, so the runtime's own cost shows.

- ``kv``: ``get`` answers a getone from a dict; ``set`` stores a value. Its columns
  are declared: a RESTCONF server exposes it as list ``kv`` of ``cmactor-bench``.
- ``pkv``: the same, but a persistent table: the supervisor journals (and fsyncs)
  each set before replying. Saved and loaded by the save/load scenario.
- ``akv``: the same get, marked ``@async_action`` (runs on the worker's pool).
- ``rows``: a getnext table of ``count`` rows (param, default 10); each next call
  receives the previous row's fields and continues from its ``index``.
- ``chain`` (@async_action) and ``hop`` (serial lane): calls between agents. Both
  take ``via``, a comma-separated list of modules: call ``get <first>.hop`` with
  the rest of the list, and answer ``depth``, the number of actions in the chain.
- ``calls`` (@async_action): ``count`` gets of ``target`` (``module.table``) made
  from inside the action, timed here. ``mode=checked`` makes them on the action's
  own thread, so they carry the action as their caller and the supervisor runs its
  deadlock check on each; ``mode=plain`` makes the same gets on a thread the agent
  started itself, which carries no caller (README: such calls are not checked).

Environment (set per module through the agent option ``env``):
- ``BENCH_DEPS``: config_deps, comma separated (the start-up scenario's graph);
- ``BENCH_ROWS``: rows ``pkv`` holds by default (the save/load scenario).
"""

import bisect
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import cmactor
from cmactor import async_action, ready
from cmactor.cmbackend import CmAgent, cmbackend_init


class Bench(CmAgent):
    # kv exposed to a RESTCONF server (perf/restconf.py): a list keyed by key, config true (kv_set).
    index_columns = {"kv": ("key",)}
    columns = {"kv": ("key", "value")}

    def __init__(self):
        super().__init__()
        self.kv = {"k": "v"}
        self.pkv = {}
        self._pkv_keys = None  # pkv's keys, sorted: built by the first getnext after a change
        self.rows_calls = 0  # rows_get calls since rowcalls was last read
        self.local = threading.local()  # one frontend connection per thread
        self.helper = None  # the thread for mode=plain calls, started on first use
        self.helper_lock = threading.Lock()

    def event_generate_default(self):
        rows = int(os.environ.get("BENCH_ROWS", "0"))
        self.pkv = {f"k{i:07d}": f"value {i}" for i in range(rows)}
        self._pkv_keys = None
        ready()

    def event_load_complete(self):  # a saved config or a journal was replayed
        ready()

    def kv_get(self, ctx):
        key = ctx.params.get("key", "k")
        ctx.fields = {"key": key, "value": self.kv.get(key, "")}

    def kv_set(self, ctx):
        key = ctx.params.get("key", "k")
        self.kv[key] = ctx.params.get("value", "")
        ctx.fields = {"key": key, "value": self.kv[key]}

    def pkv_get(self, ctx):
        key = ctx.params.get("key")
        if ctx.is_getnext:  # the save walk: every key in order
            # Sorting once per walk, not once per row: a walk of 100k rows would
            # otherwise cost 100k sorts.
            if self._pkv_keys is None:
                self._pkv_keys = sorted(self.pkv)
            keys = self._pkv_keys
            i = 0 if key is None else bisect.bisect_right(keys, key)
            if i >= len(keys):
                return
            key = keys[i]
            if i + 1 < len(keys):
                ctx.more()
        elif key not in self.pkv:
            ctx.raise_error(f"no key {key!r}")
        ctx.fields = {"key": key, "value": self.pkv[key]}

    def pkv_set(self, ctx):
        key = ctx.params.get("key", "k")
        if key not in self.pkv:
            self._pkv_keys = None
        self.pkv[key] = ctx.params.get("value", "")
        ctx.fields = {"key": key, "value": self.pkv[key]}

    @async_action
    def akv_get(self, ctx):
        # Only reads self.kv (a dict get is atomic under the GIL): no lock needed.
        key = ctx.params.get("key", "k")
        ctx.fields = {"key": key, "value": self.kv.get(key, "")}

    def rows_get(self, ctx):
        self.rows_calls += 1
        count = int(ctx.params.get("count", "10"))
        # First call: no index, start at row 0; next calls carry the previous row.
        index = int(ctx.params["index"]) + 1 if "index" in ctx.params else 0
        if index >= count:
            return  # no fields: no row
        ctx.fields = {"index": index, "value": "x"}
        if index + 1 < count:
            ctx.more()

    def rowcalls_get(self, ctx):
        """How many times rows_get ran since the last read of this: what a client's read cost the agent."""
        ctx.fields = {"calls": self.rows_calls}
        self.rows_calls = 0

    # -- calls between agents ------------------------------------------------------

    def _cursor(self):
        """A cursor on this thread's connection. cmactor.connect() with no socket
        reaches the supervisor that runs this agent ($CMACTOR_SOCKET)."""
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.local.conn = cmactor.connect(username="bench")
        return conn.cursor()

    def _hop(self, ctx):
        via = [m for m in ctx.params.get("via", "").split(",") if m]
        if not via:
            ctx.fields = {"depth": 1}
            return
        cur = self._cursor()
        cur.execute(f"get {via[0]}.hop", {"via": ",".join(via[1:])})
        ctx.fields = {"depth": int(cur.fetchone()[0]) + 1}

    @async_action
    def chain_get(self, ctx):
        self._hop(ctx)

    def hop_get(self, ctx):
        self._hop(ctx)

    @async_action
    def calls_get(self, ctx):
        count = int(ctx.params.get("count", "1000"))
        target = ctx.params.get("target", "bench.kv")
        if ctx.params.get("mode") == "plain":
            with self.helper_lock:
                if self.helper is None:
                    self.helper = ThreadPoolExecutor(1, thread_name_prefix="bench-plain")
            times = self.helper.submit(self._timed_gets, target, count).result()
        else:
            times = self._timed_gets(target, count)
        times.sort()
        ctx.fields = {
            "ns": sum(times),
            "p50": times[len(times) // 2],
            "p99": times[min(len(times) - 1, len(times) * 99 // 100)],
        }

    def _timed_gets(self, target, count):
        cur = self._cursor()
        operation = f"get {target}"
        params = {"key": "k"}
        times = []
        for _ in range(count):
            t0 = time.perf_counter_ns()
            cur.execute(operation, params)
            times.append(time.perf_counter_ns() - t0)
        return times


def main():
    deps = [d for d in os.environ.get("BENCH_DEPS", "").split(",") if d]
    cmbackend_init(Bench(), persistent_list=["pkv"], config_deps=deps)
