"""Two agents that call each other: what a deadlock looks like, and the fix.

``alpha.total`` sums alpha's own items with beta's. beta's ``summary`` needs a
value from alpha in turn. Asked from alpha's serial lane, that call comes back
to alpha's serial lane, which is busy waiting: a cycle alpha → beta → alpha.
``alpha.total_async`` makes the same calls from an @async_action: alpha's serial
lane stays free to answer beta, and the request completes.
"""

import threading

import cmactor
from cmactor import async_action, ready
from cmactor.cmbackend import CmAgent, cmbackend_init


class Alpha(CmAgent):
    def __init__(self):
        super().__init__()
        self.items = 3
        self.lock = threading.Lock()  # total_async runs beside the serial lane

    def event_generate_default(self):
        ready()

    def items_get(self, ctx):
        with self.lock:
            ctx.fields = {"items": self.items}

    def _total(self, ctx):
        with cmactor.connect(username="alpha") as conn:
            cur = conn.cursor()
            cur.execute("get beta.summary")
            beta_items = int(cur.fetchone()[0])
        with self.lock:
            ctx.fields = {"total": self.items + beta_items}

    def total_get(self, ctx):
        """On the serial lane: refused with DeadlockDetectedError (beta calls back into alpha)."""
        self._total(ctx)

    @async_action
    def total_async_get(self, ctx):
        """The same calls from the async lane: completes."""
        self._total(ctx)


class Beta(CmAgent):
    def event_generate_default(self):
        ready()

    def summary_get(self, ctx):
        """beta's 4 items, and how many alpha has (asked from alpha)."""
        with cmactor.connect(username="beta") as conn:
            cur = conn.cursor()
            cur.execute("get alpha.items")
            ctx.fields = {"items": 4, "alpha_items": cur.fetchone()[0]}


def alpha():
    cmbackend_init(Alpha())


def beta():
    cmbackend_init(Beta())
