"""The supervisor's record of one module, and its lifecycle as one state machine.

    STOPPED ──spawn──▶ STARTING ──INIT──▶ WAITING_DEPS ──deps READY──▶ LOADING ──ready()──▶ READY
                          │  └───────────── ready() without INIT: a plain process ─────────────▶ READY
                          │                    │                          │                   │
                          └────────────────────┴──── worker exit ─────────┴───────────────────┴──▶ RESTARTING ──respawn──▶ STARTING
    any state ──quarantine──▶ FAILED ──operator restart──▶ RESTARTING
    any state with a worker ──stop──▶ STOPPING ──exit──▶ STOPPED
    any state with a worker ──exit the restart policy leaves alone──▶ STOPPED ──operator restart──▶ RESTARTING

Every state change goes through ``Module.move``, which refuses a change that is
not in ``TRANSITIONS``: that is a bug in the supervisor, raised as an
InternalError naming both states, and tells the module's ``observer`` of each
change it makes (notify.py's systemd STATUS lines). The predicates below stand
in for tuples of states repeated by the code that asks.
"""

import logging
import time

from cmactor.errors import InternalError
from cmactor.wire import figures as F
from cmactor.wire.protocol import DATA_OPS
from cmsupervisor.observability.stats import FSYNC_BOUNDS, Timed, request_stats, snapshot

log = logging.getLogger("cmactor.supervisor")

STARTING = "STARTING"
WAITING_DEPS = "WAITING_DEPS"
LOADING = "LOADING"
READY = "READY"
RESTARTING = "RESTARTING"
FAILED = "FAILED"
STOPPING = "STOPPING"
STOPPED = "STOPPED"

# state -> the states it may move to. FAILED and STOPPED are reachable from every
# state (a quarantine or a stop can come at any time); RESTARTING from every state
# that has or had a worker. A move to the same state is a no-op, and allowed.
TRANSITIONS = {
    STOPPED: {STARTING, RESTARTING, FAILED},
    STARTING: {WAITING_DEPS, READY, RESTARTING, FAILED, STOPPING, STOPPED},
    WAITING_DEPS: {LOADING, RESTARTING, FAILED, STOPPING, STOPPED},
    LOADING: {READY, RESTARTING, FAILED, STOPPING, STOPPED},
    READY: {RESTARTING, FAILED, STOPPING, STOPPED},
    RESTARTING: {STARTING, FAILED, STOPPED},
    FAILED: {RESTARTING, STOPPED},
    STOPPING: {STOPPED, FAILED},
}


_NOT_RUNNING = frozenset((STOPPED, FAILED, RESTARTING))
_LEAVING = frozenset((STOPPING, FAILED, RESTARTING))


class Pending:
    """A client request the supervisor has accepted and not yet answered."""

    __slots__ = (
        "client",
        "rid",
        "request",
        "hold",
        "timer",
        "sid",
        "issuer",
        "is_async",
        "dispatched_at",
        "received_at",
    )

    def __init__(self, client, rid, request, received_at):
        self.client = client
        self.rid = rid
        self.request = request
        self.received_at = received_at  # (monotonic) its latency, held or not, runs from here to its answer
        self.hold = None  # while held for its module: seconds it may wait, and the loop timer that ends it
        self.timer = None
        self.sid = None
        self.issuer = None  # the executor (deadlock.py) blocked waiting on this call, if an agent made it
        self.is_async = False  # the target action is an @async_action
        self.dispatched_at = None


class Held:
    """Requests held for a module, oldest first; any one of them removed at O(1) cost
    (each expires on its own timer, and 60k of them must not mean 60k scans)."""

    __slots__ = ("_requests",)

    def __init__(self):
        self._requests = {}  # Pending -> None: a dict keeps insertion order

    def append(self, pending):
        self._requests[pending] = None

    def extend(self, requests):
        self._requests.update(dict.fromkeys(requests))

    def prepend(self, requests):
        self._requests = {**dict.fromkeys(requests), **self._requests}

    def remove(self, pending):
        del self._requests[pending]

    def take_all(self):
        """Every held request, oldest first, leaving none."""
        requests, self._requests = list(self._requests), {}
        return requests

    def __contains__(self, pending):
        return pending in self._requests

    def __iter__(self):
        return iter(list(self._requests))

    def __len__(self):
        return len(self._requests)


class Module:
    """One module: its state, what its agent registered, its current worker, its requests."""

    __slots__ = (
        "name",
        "options",
        "policy",
        "state",
        "process",
        "channel",
        "psutil",
        "slots",
        "journal",
        "persistent_list",
        "config_deps",
        "async_ops",
        "pool_size",
        "unsaved",
        "inflight",
        "held",
        "restarts",
        "started_at",
        "last_exit",
        "error",
        "waiting_on",
        "last_event",
        "saving",
        "ready_called",
        "loaded",
        "load_errors",
        "load_problem",
        "fatal",
        "traceback",
        "request_stats",
        "figures",
        "observer",
    )

    def __init__(self, name, options, policy):
        self.name = name
        self.options = options
        self.policy = policy
        self.state = STOPPED
        self.process = None
        self.channel = None  # workers.Channel of the current worker
        self.psutil = None
        self.slots = None  # the worker's progress slots (protocol.SLOT_*), in shared memory
        self.journal = None
        self.persistent_list = []
        self.config_deps = []
        self.async_ops = frozenset()  # (table, op) pairs served by an @async_action
        self.pool_size = None
        self.unsaved = False
        self.inflight = {}  # sid -> Pending, in dispatch order
        self.held = Held()
        self.restarts = 0
        self.started_at = None
        self.last_exit = None
        self.request_stats = request_stats(DATA_OPS)  # op -> stats.Timed, recorded by the Router
        self.figures = None  # the current worker's direct read figures (cmactor/figures.py), shared memory
        self.observer = None  # fn(module), called after each state change
        self._clear_start_up()

    # -- the state machine ----------------------------------------------

    def move(self, state):
        """Change state, or raise InternalError if the table does not allow it."""
        if state == self.state:
            return
        if state not in TRANSITIONS[self.state]:
            message = f"module {self.name}: no transition from {self.state} to {state}"
            log.error("internal error: %s", message)
            raise InternalError(message)
        if state == STARTING:
            self.started_at = time.monotonic()
            self._clear_start_up()
        self.state = state
        if self.observer is not None:
            self.observer(self)

    def _clear_start_up(self):
        # A new worker starts with nothing carried over from the last one's start-up.
        self.error = None
        self.waiting_on = None
        self.last_event = None
        self.saving = False
        self.ready_called = False
        self.loaded = False
        self.load_errors = 0
        self.load_problem = None  # what went wrong in a load that still ended READY (rows, an event after ready())
        self.fatal = False  # the worker reported it is ending (protocol.Fatal)
        self.traceback = None  # of the exception that ended its start (an event's, or the entry's)

    @property
    def accepting(self):
        """Requests go to the worker at once (else they are held, or fail)."""
        return self.state == READY and not self.saving

    @property
    def gone(self):
        """Stopping or stopped: requests fail, nothing is held."""
        return self.state == STOPPING or self.state == STOPPED

    @property
    def leaving(self):
        """Its worker, if it has one, was told to stop or was killed."""
        return self.state in _LEAVING

    @property
    def running(self):
        """A worker is starting, serving or stopping: its uptime counts."""
        return self.state not in _NOT_RUNNING

    @property
    def pid(self):
        return self.process.pid if self.process is not None else None

    def uptime(self):
        return time.monotonic() - self.started_at if self.running and self.started_at is not None else None

    def fold_figures(self):
        """Its worker is gone: count the reads it served directly in the module's figures."""
        if self.figures is not None:
            for op, figures in F.read(self.figures).items():
                self.request_stats[op].add(*figures)
            self.figures = None

    def _direct(self, counts):
        """Where clients read from its worker, and what they have there now, from its figures
        ``counts`` (None: nowhere)."""
        channel = self.channel
        if channel is None or channel.route is None or channel.sock is None or counts is None:
            return None
        return {
            **channel.route,
            "serving": channel.serving,
            "connections": counts[F.CONNECTIONS],
            "inflight": F.inflight(counts),
            "queue": counts[F.QUEUED],
        }

    def copy_status(self):
        """(Loop thread.) The status entry of this module but for the psutil figures, with its
        request and fsync figures as they are kept, copied: finish_status() makes them what
        status shows, on another thread (the loop thread serves every client, and that work
        was most of a status of 200 modules)."""
        figures = (
            None if self.figures is None else memoryview(bytes(self.figures)).cast("q")
        )  # one copy of the worker's
        uptime = self.uptime()
        direct = self._direct(figures)
        return {
            "state": self.state,
            "pid": self.pid,
            "restarts": self.restarts,
            "unsaved": self.unsaved,
            "uptime": None if uptime is None else round(uptime, 3),
            # Direct reads count too: those waiting in the worker behind a save, and
            # those it is running (the "direct" entry has them on their own).
            "queue": len(self.held) + (direct["queue"] if direct else 0),
            "inflight": len(self.inflight) + (direct["inflight"] if direct else 0),
            "last_exit": self.last_exit,
            "error": self.error,
            "traceback": self.traceback,
            "waiting_on": self.waiting_on if self.state == WAITING_DEPS else None,
            "saving": self.saving,
            "load_errors": self.load_errors,
            "config_deps": list(self.config_deps),
            "persistent_list": list(self.persistent_list),
            "requests": ({op: timed.raw() for op, timed in self.request_stats.items()}, figures),
            "direct": direct,
            "journal_fsync": None if self.journal is None else self.journal.fsync_seconds.raw(),
        }

    def status(self):
        """The status entry of this module, but for the psutil figures."""
        return finish_status(self.copy_status())


def finish_status(entry):
    """(Any thread.) A copy_status() entry as status shows it: the request figures, the
    supervisor's and the reads the worker served directly together, and histogram snapshots."""
    raws, figures = entry["requests"]
    served = F.read(figures) if figures is not None else {}
    requests = {}
    for op, raw in raws.items():
        timed = Timed(F.REQUEST_BOUNDS)
        timed.add(*raw)
        if op in served:
            timed.add(*served[op])
        requests[op] = timed.snapshot()
    entry["requests"] = requests
    if entry["journal_fsync"] is not None:
        entry["journal_fsync"] = snapshot(FSYNC_BOUNDS, entry["journal_fsync"])
    return entry


def unknown_module(name, modules):
    """The error text for a module name the supervisor does not run."""
    return f"unknown module {name!r}; this supervisor runs: {runs(modules)}"


def runs(modules):
    return ", ".join(sorted(modules))
