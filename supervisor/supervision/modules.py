"""The supervisor's record of one module, changed through its own methods alone.

Each method is named for what happened to the module (its worker started, its agent
registered, its load ended, a save began, it failed, its worker exited, ...) and
changes every field that event changes; the other parts read the fields, and write
none. A state change (states.py) goes through ``move``, which refuses one that is
not in TRANSITIONS (a bug in the supervisor, raised as an InternalError naming both
states) and then tells the module's subscribers: the router holds, fails or
releases the requests held for it, the systemd notifier sends a STATUS line.
"""

import logging
import time

from cmactor.errors import InternalError
from cmactor.wire import figures as F
from cmactor.wire.protocol import ACTION_SUFFIX, DATA_OPS
from cmsupervisor.observability.stats import FSYNC_BOUNDS, Timed, request_stats, snapshot
from cmsupervisor.supervision.states import (
    FAILED,
    GONE,
    LEAVING,
    LOADING,
    NOT_RUNNING,
    READY,
    RESTARTING,
    STARTING,
    STOPPED,
    TRANSITIONS,
    WAITING_DEPS,
)

log = logging.getLogger("cmactor.supervisor")


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
        self.issuer = None  # the executor blocked waiting on this call, if an agent made it (front/deadlock.py)
        self.is_async = False  # the target action is an @async_action (aim)
        self.dispatched_at = None

    def aim(self, mod):
        """Whether its action on ``mod`` is an @async_action, as ``mod`` registered them, noted
        in ``is_async``: as the deadlock detector admits an agent's call, and again as the
        router sends it (the module may have registered meanwhile, the call held)."""
        request = self.request
        method = request.method  # a read that runs <table>_<method> (exos_dbapi's request.method)
        if method is None:
            self.is_async = (request.table, request.op) in mod.async_ops
        else:
            self.is_async = f"{request.table}_{method}" in mod.async_actions
        return self.is_async


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
        "async_actions",
        "pool_size",
        "tables",
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
        "memory_max",
        "memory_kills",
        "stopped_by",
        "removed",
        "_subscribers",
    )

    def __init__(self, name, options, policy, memory_max=None):
        self.name = name
        self.options = options
        self.policy = policy
        self.memory_max = memory_max  # bytes its worker may use (config.memory_limit), or None: no limit
        self.memory_kills = 0  # workers of it that ended for passing memory_max (over_memory)
        self.stopped_by = None  # who stopped it, and when, if an operator did: it stays STOPPED until started
        self.removed = False  # a reload took it out of the config: it goes once its worker has ended
        self.state = STOPPED
        self.process = None
        self.channel = None  # workers.Channel of the current worker
        self.psutil = None
        self.slots = None  # the worker's progress slots (protocol.SLOT_*), in shared memory
        self.journal = None
        self.persistent_list = []
        self.config_deps = []
        self.async_ops = frozenset()  # (table, op) pairs served by an @async_action
        self.async_actions = frozenset()  # the names of its @async_action methods
        self.pool_size = None
        # The tables its agent declares (protocol.TableSchema by name), as its latest worker
        # registered them: kept across restarts until the next one registers; None before
        # any did, or once a worker is a plain process.
        self.tables = None
        self.unsaved = False
        self.inflight = {}  # sid -> Pending, in dispatch order
        self.held = Held()
        self.restarts = 0
        self.started_at = None
        self.last_exit = None
        self.request_stats = request_stats(DATA_OPS)  # op -> stats.Timed, recorded by the Router
        self.figures = None  # the current worker's direct read figures (cmactor/wire/figures.py), shared memory
        self._subscribers = []  # fn(module, the state it left), called after each change (subscribe)
        self._clear_start_up()

    # -- the state machine ----------------------------------------------

    def subscribe(self, fn):
        """Call ``fn(module, before)`` after each change of its state (``before``: the state it
        left), after a quarantine even of a module already FAILED, and when a save of it ends
        (``before`` is then its state): whenever what is held for it may have to be sent,
        failed or refused."""
        self._subscribers.append(fn)

    def move(self, state):
        """Change state, or raise InternalError if the table does not allow it."""
        if state == self.state:
            return
        self._check(state)
        if state == STARTING:
            self.started_at = time.monotonic()
            self._clear_start_up()
        self._enter(state)

    def _check(self, state):
        # Before an event changes any field: a refused move leaves the module as it was.
        if state != self.state and state not in TRANSITIONS[self.state]:
            message = f"module {self.name}: no transition from {self.state} to {state}"
            log.error("internal error: %s", message)
            raise InternalError(message)

    def _enter(self, state):
        before, self.state = self.state, state
        for fn in self._subscribers:
            fn(self, before)

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

    # -- what happens to it, in the order of a worker's life --------------

    def use_journal(self, journal):
        """Its changes since the last save are kept in ``journal`` (state.open_journals)."""
        self.journal = journal

    def started(self, process, channel, slots, psutil, figures):
        """A new worker runs for it (workers.Workers.spawn made these): STARTING."""
        self.process = process
        self.channel = channel
        self.slots = slots
        self.psutil = psutil
        self.figures = figures
        self.move(STARTING)

    def registered(self, init):
        """Its agent called cmbackend_init() (protocol.Init): its tables, dependencies and pool."""
        self.persistent_list = init.persistent_list
        self.config_deps = init.config_deps
        # (table, op) pairs served by an @async_action: looked up per request, not formatted.
        self.async_actions = frozenset(init.async_actions)
        self.async_ops = frozenset(
            (name[: -len(suffix) - 1], op)
            for name in init.async_actions
            for op, suffix in ACTION_SUFFIX.items()
            if name.endswith("_" + suffix)
        )
        self.pool_size = init.pool_size
        self.tables = init.tables

    def plain(self):
        """Its worker called ready() without cmbackend_init(): it serves, and declares, no tables."""
        self.tables = None

    @property
    def schema(self):
        """What its agent declares for RESTCONF: {"tables": {table: {"index", "columns", "config",
        "setop", "delete"}}} (cmbackend.declared_schema), a new copy each time; None if no worker
        of it has registered an agent."""
        tables = self.tables
        if tables is None:
            return None
        return {
            "tables": {
                name: {
                    "index": list(table.index),
                    "columns": list(table.columns),
                    "config": table.config,
                    "setop": table.setop,
                    "delete": table.delete,
                }
                for name, table in tables.items()
            }
        }

    def waiting_for(self, name):
        """WAITING_DEPS on module ``name`` (None: on none any more)."""
        self.waiting_on = name

    def loading(self, first_event, unsaved):
        """LOADING: its worker was sent its config, and runs ``first_event``. ``unsaved``: the load
        replays changes that are not in the config file (a journal, a snapshot)."""
        self._check(LOADING)
        self.last_event = first_event
        self.unsaved = unsaved
        self.move(LOADING)

    def load_done(self, failed, problem):
        """Its worker answered the load: ``failed`` saved rows did not load; ``problem``, what went
        wrong in a load that may still end READY (shown as its error), or None."""
        if self.last_event == "event_load_start":
            self.last_event = "event_load_complete"
        self.loaded = True
        self.load_errors = failed
        self.load_problem = problem
        if problem is not None:
            self.error = problem

    def called_ready(self):
        """Its agent called ready() (protocol.Ready)."""
        self.ready_called = True

    def noted(self, problem):
        """A problem of its start that does not end it (a load that takes too long), added to its error."""
        self.error = f"{self.error}; {problem}" if self.error else problem

    def ending(self, error, traceback):
        """Its worker is ending and will never be READY (it said so, or its start failed): its exit follows."""
        self.fatal = True
        self.error = error
        self.traceback = traceback

    def became_ready(self):
        """READY: its worker serves, on its channel and its own socket. What the load went
        through stays its error; a note that it was slow goes."""
        self._check(READY)
        self.error = self.load_problem
        self.move(READY)

    def mark_unsaved(self):
        """It has a change the config file does not have."""
        self.unsaved = True

    def save_began(self):
        """A save, compaction or export walks its tables: requests to it are held meanwhile."""
        self.saving = True

    def covered_by_save(self):
        """The save under way covers its changes so far (a change acknowledged from now on marks
        it again): whether it was unsaved, for a save that fails to mark it again."""
        was, self.unsaved = self.unsaved, False
        return was

    def save_ended(self):
        """The walk of its tables is over: it accepts requests again."""
        self.saving = False
        for fn in self._subscribers:
            fn(self, self.state)

    def hung(self, reason):
        """Its worker is killed as stuck, for ``reason``."""
        self.error = reason

    def over_memory(self, reason):
        """Its worker passed memory_max and is killed for it, by the RSS watchdog or (seen at
        its exit) by the kernel in its cgroup: ``reason`` says how much (memory.py)."""
        self.error = reason
        self.memory_kills += 1

    def failed(self, reason):
        """Quarantined (FAILED), for ``reason``, until an operator restarts it. The subscribers
        are told even if it was FAILED already: what was held for it fails with the new reason."""
        self._check(FAILED)
        self.error = reason
        self._enter(FAILED)

    def exited(self, reason):
        """Its worker was reaped, having ended for ``reason``: what was sent to it and not answered,
        in dispatch order, for the caller to fail or hold for the next worker."""
        self.process = None
        self.psutil = None
        self.last_exit = reason
        if self.figures is not None:  # the reads it served directly count in the module's figures
            for op, figures in F.read(self.figures).items():
                self.request_stats[op].add(*figures)
            self.figures = None
        unanswered, self.inflight = self.inflight, {}
        return unanswered

    def restarting(self, reason=None):
        """RESTARTING: a new worker is to start (after a backoff, or once the old one is reaped);
        ``reason``, if given, is why, shown as its error until then."""
        self._check(RESTARTING)
        if reason is not None:
            self.error = reason
        self.move(RESTARTING)

    def respawning(self):
        """A new worker is being started for it after a crash or an operator's restart."""
        self.restarts += 1

    def spawn_failed(self, reason):
        """No worker process could be started for it, for ``reason``."""
        self.last_exit = reason

    def held_stopped(self, who):
        """An operator stopped it (``who``: who and when): it stays STOPPED, across restarts of
        the supervisor too, until an operator starts it; shown as its error until then."""
        self.stopped_by = who
        self.error = f"stopped by {who}; `cmactor start {self.name}` starts it"

    def released(self):
        """An operator started it again: no longer held STOPPED."""
        self.stopped_by = None
        self.error = None

    def removing(self):
        """A reload took it out of the config: its worker is ended, then the record goes."""
        self.removed = True
        self.error = "removed from the config by a reload"

    def reconfigured(self, fresh):
        """A reload changed its agent options: take what a record holds of its config from
        ``fresh``, the record the new config makes (options, restart policy, memory_max). Its
        next worker starts with them; its crash count starts over, its journal takes the new
        bounds at once, and so do the timeouts, for the worker being ended."""
        self.options = fresh.options
        self.policy = fresh.policy
        self.memory_max = fresh.memory_max
        self.journal.bound(fresh.options["journal_max_records"], fresh.options["journal_max_bytes"])

    @property
    def accepting(self):
        """Requests go to the worker at once (else they are held, or fail)."""
        return self.state == READY and not self.saving

    @property
    def gone(self):
        """Stopping or stopped: requests fail, nothing is held."""
        return self.state in GONE

    @property
    def stays_stopped(self):
        """An operator stopped it, or a reload removed it: once its worker has ended it is
        STOPPED, whatever its restart policy would do."""
        return self.stopped_by is not None or self.removed

    @property
    def leaving(self):
        """Its worker, if it has one, was told to stop or was killed."""
        return self.state in LEAVING

    @property
    def running(self):
        """A worker is starting, serving or stopping: its uptime counts."""
        return self.state not in NOT_RUNNING

    @property
    def pid(self):
        return self.process.pid if self.process is not None else None

    def uptime(self):
        return time.monotonic() - self.started_at if self.running and self.started_at is not None else None

    def _direct(self, counts):
        """Where clients read from its worker, and what they have there now, from its figures
        ``counts`` (None: nowhere)."""
        channel = self.channel
        if channel is None or channel.route is None or channel.sock is None or counts is None:
            return None
        return {
            **channel.route,
            "serving": self.state == READY,  # READY means its worker serves its socket
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
            "memory_max": self.memory_max,
            "memory_kills": self.memory_kills,
            "unsaved": self.unsaved,
            "uptime": None if uptime is None else round(uptime, 3),
            # Direct reads count too: those waiting in the worker behind a save, and
            # those it is running (the "direct" entry has them on their own).
            "queue": len(self.held) + (direct["queue"] if direct else 0),
            "inflight": len(self.inflight) + (direct["inflight"] if direct else 0),
            "last_exit": self.last_exit,
            "error": self.error,
            "stopped_by": self.stopped_by,
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
