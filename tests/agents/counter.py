"""A test agent whose change is not idempotent: a setop adds to a counter, so a record
replayed twice, or lost, shows in the count.

While the file named by COUNTER_CRASH_FILE exists, every start of it crashes: a crash
loop on one host of a cluster (its agent env sets the variable; the others do not)."""

import os
import time

from rowwalk import next_name

from cmactor import ready
from cmactor.cmbackend import CmAgent, cmbackend_init


class Counter(CmAgent):
    index_columns = {"ctr": ("name",)}

    def __init__(self):
        super().__init__()
        self.counts = {}

    def event_generate_default(self):
        _crash_if_asked()
        ready()

    def event_load_complete(self):
        _crash_if_asked()
        ready()

    def ctr_get(self, ctx):
        name = next_name(ctx, self.counts)
        if name is not None:
            ctx.fields = {"name": name, "count": self.counts.get(name, 0)}

    def ctr_set(self, ctx):  # a saved row, loaded back
        self.counts[ctx.params["name"]] = int(ctx.params["count"])

    def ctr_setop(self, ctx):  # add "by" (1), after "sleep" seconds
        time.sleep(float(ctx.params.get("sleep", "0")) if not ctx.is_load else 0)
        name = ctx.params["name"]
        self.counts[name] = self.counts.get(name, 0) + int(ctx.params.get("by", "1"))
        ctx.fields = {"name": name, "count": self.counts[name]}


def _crash_if_asked():
    path = os.environ.get("COUNTER_CRASH_FILE")
    if path and os.path.exists(path):
        os._exit(3)


def main():
    cmbackend_init(Counter(), persistent_list=["ctr"])
