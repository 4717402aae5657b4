"""A test agent that calls along a chain of modules: the deadlock detector's workload.

``get M.s`` (serial lane) and ``get M.a`` (@async_action) both take
``chain="b:s,c:a,..."``: call the first hop with the rest of the chain, and
answer ``depth`` (hops below and including this one), or pass up a refusal as
``deadlock`` with the DeadlockDetectedError's message.
"""

import os
import threading
import time

import cmactor
from cmactor import async_action, ready
from cmactor.cmbackend import CmAgent, cmbackend_init


class Caller(CmAgent):
    def __init__(self):
        super().__init__()
        self.local = threading.local()
        self.load_result = ""

    def _cursor(self):
        conn = getattr(self.local, "conn", None)
        if conn is None:
            # A bound on every call: a deadlock the detector missed fails the test, never hangs it.
            conn = self.local.conn = cmactor.connect(username="caller", timeout=30)
        return conn.cursor()

    def _call(self, module, table, chain):
        cur = self._cursor()
        try:
            cur.execute(f"get {module}.{table}", {"chain": chain})
        except cmactor.DeadlockDetectedError as exc:
            return {"deadlock": str(exc)}
        return dict(zip([d[0] for d in cur.description], cur.fetchone()))

    def _hop(self, ctx):
        hops = [h for h in ctx.params.get("chain", "").split(",") if h]
        if not hops:
            ctx.fields = {"depth": 1}
            return
        module, lane = hops[0].split(":")
        row = self._call(module, "a" if lane == "a" else "s", ",".join(hops[1:]))
        ctx.fields = row if "deadlock" in row else {"depth": int(row["depth"]) + 1}

    def s_get(self, ctx):
        self._hop(ctx)

    def z_get(self, ctx):
        """A slow serial action: the lane is busy for ``secs``."""
        time.sleep(float(ctx.params.get("secs", "0.5")))
        ctx.fields = {"slept": ctx.params.get("secs", "0.5")}

    @async_action
    def a_get(self, ctx):
        self._hop(ctx)

    def load_get(self, ctx):
        ctx.fields = {"result": self.load_result}

    def event_generate_default(self):
        # LOAD_QUERY=<module>: ask that module something while loading (serial lane).
        target = os.environ.get("LOAD_QUERY")
        if target:
            time.sleep(float(os.environ.get("LOAD_DELAY", "0")))
            row = self._call(target, "s", "")
            self.load_result = row.get("deadlock") or f"depth {row['depth']}"
        ready()


def main():
    # INIT_DELAY: register late, so that calls to this module arrive while it is STARTING.
    time.sleep(float(os.environ.get("INIT_DELAY", "0")))
    deps = [d for d in os.environ.get("CALLER_DEPS", "").split(",") if d]
    pool = os.environ.get("CALLER_POOL")
    agent = Caller()
    if pool:
        from concurrent.futures import ThreadPoolExecutor

        agent.pool = ThreadPoolExecutor(int(pool))
    cmbackend_init(agent, config_deps=deps)
