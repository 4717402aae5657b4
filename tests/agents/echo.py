"""A test agent with one table per behaviour the runtime must handle.

Its config_deps come from the ECHO_DEPS environment variable (comma separated),
so one file can play several modules in a dependency graph.
"""

import bisect
import os
import threading
import time

import cmactor
from cmactor import async_action, ready
from cmactor.cmbackend import CmAgent, cmbackend_init


def _flags(ctx):
    return {
        "is_async": ctx.is_async,
        "is_getone": ctx.is_getone,
        "is_getnext": ctx.is_getnext,
        "is_save": ctx.is_save,
        "is_load": ctx.is_load,
        "vr_name": ctx.vr_name,
        "dirty": ctx.dirty,
        "params": ",".join(f"{k}={v}" for k, v in sorted(ctx.params.items())),
        "pid": os.getpid(),
        "thread": threading.current_thread().name,
    }


class Echo(CmAgent):
    def __init__(self):
        super().__init__()
        self.kv = {}
        self.order = []
        self.lock = threading.Lock()
        self.events = []  # (event or "load:<key>", time.time()) in the order they came
        self.save_fault = None  # set through ctl: "fail", "stop" or a delay in seconds
        self._sorted = None  # kv's keys in order, for getnext

    def _event(self, name):
        self.events.append((name, time.time()))

    def _ready(self):
        self._event("ready")
        ready()

    def event_generate_default(self):
        self._event("event_generate_default")
        self.kv = {"default": "yes"}
        self._sorted = None
        self._ready()

    def event_load_start(self):
        self._event("event_load_start")
        time.sleep(float(os.environ.get("ECHO_LOAD_DELAY", "0")))
        self.kv = {"default": "yes"}  # defaults first; the saved rows are deltas
        self._sorted = None

    def event_load_complete(self):
        self._event("event_load_complete")
        if os.environ.get("ECHO_NEVER_READY") != "1":
            self._ready()

    def event_save_start(self):
        self._event("event_save_start")
        if self.save_fault == "fail":
            raise RuntimeError("disk on fire")
        if self.save_fault not in (None, "stop"):
            time.sleep(float(self.save_fault))

    def event_save_complete(self):
        self._event("event_save_complete")

    # ctl: test controls; events: what happened, in order
    def ctl_set(self, ctx):
        self.save_fault = ctx.params.get("save_fault") or None
        ctx.dirty = False

    def events_get(self, ctx):
        ctx.fields = {
            "events": ",".join(name for name, _ in self.events),
            "times": ",".join(repr(t) for _, t in self.events),
        }

    # kv: a small key/value table
    def kv_get(self, ctx):
        if ctx.is_save and self.save_fault == "stop":
            ctx.raise_error("refusing to be saved")
        key = ctx.params.get("key")
        if ctx.is_getnext:
            if self._sorted is None:
                self._sorted = sorted(self.kv)  # kept until a key is added: walks of big tables stay linear
            keys = self._sorted
            index = 0 if key is None else bisect.bisect_right(keys, key)
            if index >= len(keys):
                return
            key = keys[index]
            if index + 1 < len(keys):
                ctx.more()
        elif key not in self.kv:
            ctx.raise_error(f"no key {key!r}")
        ctx.fields = {"key": key, "value": self.kv[key]}

    def kv_set(self, ctx):
        if ctx.is_load:
            self._event(f"load:{ctx.params['key']}")
            if ctx.params.get("value") == "fail-on-load":
                raise ValueError("cannot load this row")
        if ctx.params.get("clean") == "1":
            ctx.dirty = False
        if ctx.params["key"] not in self.kv:
            self._sorted = None
        self.kv[ctx.params["key"]] = ctx.params.get("value", "")
        ctx.fields = {"key": ctx.params["key"], "value": self.kv[ctx.params["key"]]}

    # ctx / actx: describe the context the action got
    def ctx_get(self, ctx):
        ctx.fields = _flags(ctx)

    def ctx_set(self, ctx):
        ctx.fields = _flags(ctx)

    @async_action
    def actx_get(self, ctx):
        ctx.fields = _flags(ctx)

    # boom: failures
    def boom_get(self, ctx):
        raise ValueError("kaboom")

    def boom_set(self, ctx):
        ctx.raise_error(f"refused: {ctx.params.get('why', 'no reason')}")
        self.kv["after_raise"] = "ran"  # must never run
        self._sorted = None

    def boom_setop(self, ctx):
        try:
            ctx.raise_error("stopped despite except Exception")
        except Exception:
            self.kv["swallowed"] = "yes"
            self._sorted = None

    # weird: replies that are not plain strings
    def weird_get(self, ctx):
        kind = ctx.params.get("kind", "values")
        if kind == "values":
            ctx.fields = {"int": 7, "float": 1.5, "none": None, "bool": True, "list": [1, 2], "str": "s"}
        elif kind == "badkey":
            ctx.fields = {3: "three"}
        elif kind == "notdict":
            ctx.fields = [1, 2]
        elif kind == "badstr":

            class Bad:
                def __str__(self):
                    raise RuntimeError("no str for you")

            ctx.fields = {"bad": Bad()}

    # log: the (self, ctx, logger=None) signature, and logging from an agent
    def log_get(self, ctx, logger=None):
        import logging

        logging.getLogger("echo.agent").warning("log_get called with %s", ctx.params.get("msg"))
        ctx.fields = {"logger": repr(logger)}

    # gen: a getnext table of `count` rows; forever: a walk that never ends
    def gen_get(self, ctx):
        count = int(ctx.params.get("count", "10"))
        index = int(ctx.params["index"]) + 1 if "index" in ctx.params else 0
        if index >= count:
            return
        ctx.fields = {"index": index, "square": index * index}
        if index + 1 < count:
            ctx.more()

    def forever_get(self, ctx):
        ctx.fields = {"n": int(ctx.params.get("n", "0")) + 1}
        ctx.more()

    # notify: notify_cli several times
    def notify_set(self, ctx):
        for i in range(int(ctx.params.get("times", "3"))):
            ctx.notify_cli(f"step {i}")
        ctx.fields = {"done": "1"}

    # order: serial lane keeps arrival order; sleep/asleep: slow actions
    def order_set(self, ctx):
        time.sleep(float(ctx.params.get("delay", "0")))
        self.order.append(ctx.params["n"])

    def order_get(self, ctx):
        ctx.fields = {"order": ",".join(self.order)}

    def sleep_get(self, ctx):
        time.sleep(float(ctx.params.get("secs", "0.2")))
        ctx.fields = {"thread": threading.current_thread().name}

    @async_action
    def asleep_get(self, ctx):
        time.sleep(float(ctx.params.get("secs", "0.2")))
        ctx.fields = {"thread": threading.current_thread().name}

    # exit, aexit, segv, spin: the worker dies or hangs in the middle of a request
    def exit_set(self, ctx):
        time.sleep(float(ctx.params.get("delay", "0")))
        os._exit(int(ctx.params.get("code", "3")))

    @async_action
    def aexit_set(self, ctx):
        time.sleep(float(ctx.params.get("delay", "0")))
        os._exit(4)

    def segv_set(self, ctx):
        import ctypes

        ctypes.string_at(0)  # a real segmentation fault, in this thread

    def spin_get(self, ctx):
        while True:
            pass

    # call: an async action querying another module through cmactor.connect()
    @async_action
    def call_get(self, ctx):
        with cmactor.connect(username="echo") as conn:
            cur = conn.cursor(vr_name=ctx.vr_name)
            cur.execute(f"get {ctx.params['module']}.kv", {"key": ctx.params.get("key", "default")})
            row = cur.fetchone()
        ctx.fields = {"value": row[1], "socket": os.environ["CMACTOR_SOCKET"]}


def main():
    deps = [d for d in os.environ.get("ECHO_DEPS", "").split(",") if d]
    cmbackend_init(Echo(), persistent_list=["kv"], config_deps=deps)
