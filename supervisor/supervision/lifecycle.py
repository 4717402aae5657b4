"""Bringing modules up and down: start-up gated on config_deps, loading, quarantine, the orderly stop.

A worker registers (Init) and its module waits for its config_deps to be READY;
then it is loaded (the saved section plus the journal, or defaults) and goes
READY once the load is done and the agent called ready(). start() waits until
every module is READY or settled where it will stay. A stop goes dependents
first, each module once its in-flight requests are answered.
"""

import logging
import threading

from cmactor.wire import protocol as P
from cmsupervisor.supervision import deps
from cmsupervisor.supervision.modules import (
    FAILED,
    LOADING,
    READY,
    RESTARTING,
    STARTING,
    STOPPED,
    STOPPING,
    WAITING_DEPS,
    runs,
)
from cmsupervisor.supervision.workers import SpawnFailed

log = logging.getLogger("cmactor.supervisor")

# Seconds before a start that failed for want of descriptors or processes is tried
# again, doubling up to the last.
RETRY_FIRST = 0.05
RETRY_MAX = 5.0


class Lifecycle:
    """``on_stopped()`` is called once every worker is gone after a stop."""

    def __init__(self, modules, loop, workers, router, saver, logs, *, stop_timeout, on_stopped):
        self._modules = modules
        self._loop = loop
        self._workers = workers
        self._router = router
        self._saver = saver
        self._logs = logs  # logs.ModuleLogs: what is said of a module goes to its own log too
        self._retries = {}  # module name -> the loop timer of its next try at a start (launch)
        self._stop_timeout = stop_timeout
        self._on_stopped = on_stopped
        self.starting = True  # start() has not returned yet: a crash then is a failed start
        self.stopping = False
        self.start_done = threading.Event()
        self.on_stop = None  # fn(), as a stop begins (notify.py's STOPPING=1)

    # -- up -------------------------------------------------------------

    def start_all(self):
        for mod in self._modules.values():
            error = self.launch(mod)
            if error is not None:
                self.quarantine(mod, error)

    def launch(self, mod, retry_in=RETRY_FIRST):
        """Start a worker for ``mod`` (STARTING); None, or why no process could be started.

        A start that fails for want of file descriptors or processes is no fault of the
        module's: it waits in RESTARTING and is tried again in ``retry_in`` seconds
        (doubling up to RETRY_MAX), as long as it takes, never counted as a crash."""
        retry = self._retries.pop(mod.name, None)
        if retry is not None:  # a launch asked for meanwhile (an operator's restart) replaces it
            self._loop.cancel(retry)
        try:
            self._workers.spawn(mod)
        except SpawnFailed as exc:
            if not exc.shortage:
                return str(exc)
            mod.move(RESTARTING)
            mod.error = f"{exc}; trying again in {retry_in:g}s"
            self._logs.report(mod, logging.WARNING, "module %s: %s", mod.name, mod.error)
            self._retries[mod.name] = self._loop.after(retry_in, self._retry_launch, mod, min(retry_in * 2, RETRY_MAX))
            return None
        mod.move(STARTING)
        return None

    def _retry_launch(self, mod, retry_in):
        del self._retries[mod.name]
        if mod.state == RESTARTING and mod.process is None and not self.stopping:
            self.launch(mod, retry_in)

    def on_init(self, mod, init):
        """The agent called cmbackend_init(): check its config_deps, then wait for them."""
        if mod.state != STARTING:
            return
        mod.persistent_list = init.persistent_list
        mod.config_deps = init.config_deps
        # (table, op) pairs served by an @async_action: looked up per request, not formatted.
        mod.async_ops = frozenset(
            (name[: -len(suffix) - 1], op)
            for name in init.async_actions
            for op, suffix in P.ACTION_SUFFIX.items()
            if name.endswith("_" + suffix)
        )
        mod.pool_size = init.pool_size
        missing = deps.unknown(mod.config_deps, self._modules)
        if missing:
            self.quarantine(
                mod,
                f"config_deps names {', '.join(map(repr, missing))}, which this supervisor does not run "
                f"(it runs: {runs(self._modules)})",
            )
            return
        cycle = deps.find_cycle(mod.name, {m.name: m.config_deps for m in self._modules.values()})
        if cycle:
            reason = f"config_deps cycle: {deps.format_cycle(cycle)}"
            for name in dict.fromkeys(cycle):
                self.quarantine(self._modules[name], reason)
            return
        mod.move(WAITING_DEPS)
        self._router.refuse_held_cycles(mod)
        self._advance_waiting()

    def _advance_waiting(self):
        for mod in self._modules.values():
            if mod.state != WAITING_DEPS:
                continue
            not_ready = deps.not_ready(mod, self._modules)
            mod.waiting_on = not_ready[0] if not_ready else None
            if not not_ready:
                self._load(mod)
        self.check_start()

    def _load(self, mod):
        """Replay the module's saved section, or have it generate defaults when it has none."""
        mod.move(LOADING)
        snapshot = mod.journal.snapshot  # newer than the config file when there is one
        section = self._saver.section(mod.name) if snapshot is None else snapshot
        journal = mod.journal.records
        mod.journal.set_base(0 if section is None else len(section))
        mod.last_event = "event_generate_default" if section is None and not journal else "event_load_start"
        mod.channel.load(section, journal)
        # Changes replayed from the journal (or its snapshot) are not in the config file: still unsaved.
        mod.unsaved = bool(journal) or snapshot is not None
        self._loop.after(mod.options["load_timeout"], self._check_stuck, mod, mod.process)

    def on_loaded(self, mod, loaded):
        if mod.last_event == "event_load_start":
            mod.last_event = "event_load_complete"
        mod.loaded = True
        mod.load_errors = failed = loaded.failed
        failures = loaded.failures
        report = self._logs.report
        for failure in failures:
            report(
                mod,
                logging.ERROR,
                "module %s: saved row of table %s did not load: %s; row: %s",
                mod.name,
                failure["table"],
                failure["message"],
                failure["row"],
            )
        if failed > len(failures):
            report(mod, logging.ERROR, "module %s: %d more saved rows did not load", mod.name, failed - len(failures))
        if loaded.error is not None and not mod.ready_called:
            self._start_failed(mod, f"{loaded.error}, before ready() was called", loaded.detail)
            return
        if loaded.error is not None:  # an event that raised after ready(): READY, and said so
            report(mod, logging.ERROR, "module %s: %s", mod.name, loaded.error)
            mod.load_problem = loaded.error
        elif failed:
            first = failures[0]
            mod.load_problem = f"{failed} saved rows did not load; first: table {first['table']}: {first['message']}"
        if mod.load_problem is not None:
            mod.error = mod.load_problem
        self._maybe_ready(mod)

    def on_ready(self, mod, _ready):
        mod.ready_called = True
        if mod.state == STARTING and not mod.fatal:  # ready() without cmbackend_init(): no tables, nothing to load
            mod.move(READY)
            mod.channel.serve()
            self._logs.report(
                mod, logging.INFO, "module %s READY (pid %d): a plain process, with no tables", mod.name, mod.pid
            )
            self._router.release_held(mod)
            self._advance_waiting()
            return
        self._maybe_ready(mod)

    def on_fatal(self, mod, fatal):
        """The worker said it is ending (its entry raised, returned or exited): its exit follows."""
        mod.fatal = True
        mod.error = fatal.message
        mod.traceback = fatal.detail or None
        self._logs.report(
            mod, logging.ERROR, "module %s: %s%s", mod.name, fatal.message, f"\n{fatal.detail}" if fatal.detail else ""
        )

    def _start_failed(self, mod, reason, detail):
        """An event raised before the agent called ready(): the module cannot come up. Its
        worker is ended at once, and its exit is a crash like any other (recovery.py):
        quarantined during start(), else restarted as its restart policy says."""
        mod.fatal = True  # never READY, whatever its worker still sends
        mod.error = f"start failed: {reason}"
        mod.traceback = detail
        self._logs.report(mod, logging.ERROR, "module %s: %s; ending its worker", mod.name, mod.error)
        self._workers.kill(mod)

    def _check_stuck(self, mod, process):
        if mod.process is process and mod.state == LOADING:
            reason = f"stuck: ready() not called within {mod.options['load_timeout']:g}s; last event {mod.last_event}"
            self._logs.report(mod, logging.WARNING, "module %s %s", mod.name, reason)
            mod.error = f"{mod.error}; {reason}" if mod.error else reason

    def _maybe_ready(self, mod):
        # A worker that reported it is ending never goes READY: its entry may fail just
        # after registering while its lane threads load the config, and the report
        # (on the main thread) may then arrive before their last word.
        if mod.state != LOADING or not (mod.loaded and mod.ready_called) or mod.fatal:
            return
        mod.move(READY)
        mod.channel.serve()  # reads from clients may now go to the worker's own socket
        mod.error = mod.load_problem  # what the load went through stays; a note that it was stuck goes
        self._logs.report(mod, logging.INFO, "module %s READY (pid %d)", mod.name, mod.pid)
        self._router.release_held(mod)
        self._advance_waiting()  # which ends with check_start()

    def quarantine(self, mod, reason):
        self._logs.report(mod, logging.ERROR, "module %s FAILED: %s", mod.name, reason)
        mod.move(FAILED)
        mod.error = reason
        self._workers.kill(mod)
        self._router.fail_held(mod)
        self.check_start()

    # -- start() ----------------------------------------------------------

    def check_start(self):
        """Let start() return once every module is READY, or settled where it will stay
        (recovery calls it too, for a module its restart policy leaves STOPPED)."""
        if all(deps.settled(mod, self._modules) for mod in self._modules.values()):
            self.start_done.set()

    def not_ready(self):
        """Each module that is not READY, with why: what start() reports when it gives up."""
        reasons = {}
        for mod in self._modules.values():
            if mod.state == READY or mod.state == STOPPED:  # STOPPED: it ended, as its restart policy allows
                continue
            if mod.state == FAILED:
                reasons[mod.name] = f"FAILED: {mod.error}"
            elif mod.state == STARTING:
                reasons[mod.name] = "STARTING: the entry has called neither cmbackend_init() nor ready()"
            elif mod.state == WAITING_DEPS:
                reasons[mod.name] = f"WAITING_DEPS on {mod.waiting_on!r} ({self._modules[mod.waiting_on].state})"
            elif mod.state == LOADING and mod.loaded:
                reasons[mod.name] = f"LOADING: {mod.last_event} returned but ready() was never called"
            elif mod.state == RESTARTING and mod.error:  # a start waiting for descriptors, say
                reasons[mod.name] = f"RESTARTING: {mod.error}"
            else:
                reasons[mod.name] = f"{mod.state}: {mod.last_event or 'no event'} still running"
        return reasons

    def summary(self):
        """(one line on every module that is not READY, whether all are READY): what a start
        ends with, counting STOPPED and FAILED modules as what they are."""
        modules = self._modules
        others = self.not_ready()
        for mod in modules.values():
            if mod.state == STOPPED:
                others[mod.name] = (
                    f"STOPPED: its worker ended ({mod.last_exit}) and restart = {mod.options['restart']!r} leaves it so"
                )
        if not others:
            return f"all {len(modules)} modules READY", True
        ready = len(modules) - len(others)
        return f"{ready} of {len(modules)} modules READY; " + "; ".join(
            f"{n}: {why}" for n, why in others.items()
        ), False

    def end_start(self):
        self.starting = False

    # -- down -------------------------------------------------------------

    def begin_stop(self):
        if self.stopping:
            return
        self.stopping = True
        if self.on_stop is not None:
            self.on_stop()
        self.start_done.set()
        self._saver.close()
        self._router.close()
        for mod in self._modules.values():
            if mod.process is None and mod.state != FAILED:
                mod.move(STOPPED)
        self._loop.after(self._stop_timeout, self._kill_remaining)
        self.continue_stop()

    def continue_stop(self):
        """Stop what can stop now: modules with no requests in flight and no live dependents."""
        if self._saver.running:
            return  # a save in progress finishes first (stop_timeout still bounds it)
        alive = [m for m in self._modules.values() if m.process is not None]
        if not alive:
            self._on_stopped()
            return
        for mod in alive:
            if mod.leaving or mod.inflight:
                continue
            if any(mod.name in other.config_deps for other in alive if other is not mod):
                continue  # dependents stop first
            self._logs.report(mod, logging.INFO, "module %s stopping", mod.name)
            mod.move(STOPPING)
            mod.channel.stop()

    def _kill_remaining(self):
        for mod in self._modules.values():
            if mod.process is not None:
                self._logs.report(
                    mod, logging.WARNING, "module %s did not stop within stop_timeout; killing it", mod.name
                )
                self._workers.kill(mod)

    def exited_while_stopping(self, mod):
        """A worker ended during the stop."""
        mod.move(STOPPED)
        self.continue_stop()
