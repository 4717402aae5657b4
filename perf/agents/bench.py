"""The benchmark agent: tables that answer at once, so the runtime's own cost shows.

- ``kv``: ``get`` answers a getone from a dict; ``set`` stores a value.
- ``pkv``: the same, but a persistent table: the supervisor journals (and fsyncs)
  each set before replying.
- ``akv``: the same get, marked ``@async_action`` (runs on the worker's pool).
- ``rows``: a getnext table of ``count`` rows (param, default 10); each next call
  receives the previous row's fields and continues from its ``index``.
"""

from cmactor import async_action, ready
from cmactor.cmbackend import CmAgent, cmbackend_init


class Bench(CmAgent):
    def __init__(self):
        super().__init__()
        self.kv = {"k": "v"}
        self.pkv = {}

    def event_generate_default(self):
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
        keys = sorted(self.pkv)
        key = ctx.params.get("key")
        if ctx.is_getnext:  # the save walk: every key in order
            following = keys if key is None else [k for k in keys if k > key]
            if not following:
                return
            key = following[0]
            if key != keys[-1]:
                ctx.more()
        elif key not in self.pkv:
            ctx.raise_error(f"no key {key!r}")
        ctx.fields = {"key": key, "value": self.pkv[key]}

    def pkv_set(self, ctx):
        key = ctx.params.get("key", "k")
        self.pkv[key] = ctx.params.get("value", "")
        ctx.fields = {"key": key, "value": self.pkv[key]}

    @async_action
    def akv_get(self, ctx):
        # Only reads self.kv (a dict get is atomic under the GIL): no lock needed.
        key = ctx.params.get("key", "k")
        ctx.fields = {"key": key, "value": self.kv.get(key, "")}

    def rows_get(self, ctx):
        count = int(ctx.params.get("count", "10"))
        # First call: no index, start at row 0; next calls carry the previous row.
        index = int(ctx.params["index"]) + 1 if "index" in ctx.params else 0
        if index >= count:
            return  # no fields: no row
        ctx.fields = {"index": index, "value": "x"}
        if index + 1 < count:
            ctx.more()


def main():
    cmbackend_init(Bench(), persistent_list=["pkv"])
