"""Bringing modules up and down: start-up gated on config_deps, loading, quarantine, the orderly stop.

Once its worker is launched (recovery.py), a module's agent registers (Init) and
the module waits for its config_deps to be READY; then it is loaded (the saved
section plus the journal, or defaults) and goes READY once the load is done and
the agent called ready(). start() waits until every module is READY or settled
where it will stay. A stop goes dependents first, each module once its in-flight
requests are answered; end_worker ends one module's worker the same way while the
others run (an operator's stop or graceful restart of it, admin.py).
"""

import logging
import threading

from cmsupervisor.supervision import deps
from cmsupervisor.supervision.modules import runs
from cmsupervisor.supervision.states import (
    FAILED,
    LOADING,
    READY,
    RESTARTING,
    STARTING,
    STOPPED,
    STOPPING,
    WAITING_DEPS,
)

log = logging.getLogger("cmactor.supervisor")


class Lifecycle:
    """``on_stopped()`` is called once every worker is gone after a stop."""

    def __init__(self, modules, loop, workers, router, saver, logs, *, stop_timeout, on_stopped):
        self._modules = modules
        self._loop = loop
        self._workers = workers
        self._router = router
        self._saver = saver
        self._logs = logs  # logs.ModuleLogs: what is said of a module goes to its own log too
        self._stop_timeout = stop_timeout
        self._on_stopped = on_stopped
        self.starting = True  # start() has not returned yet: a crash then is a failed start
        self.stopping = False
        self.start_done = threading.Event()
        self.on_stop = None  # fn(), as a stop begins (notify.py's STOPPING=1)

    # -- up -------------------------------------------------------------

    def on_init(self, mod, init):
        """The agent called cmbackend_init(): check its config_deps, then wait for them."""
        if mod.state != STARTING:
            return
        mod.registered(init)
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
        mod.move(WAITING_DEPS)  # held calls it can now never serve are refused (the router is told)
        self._advance_waiting()

    def _advance_waiting(self):
        for mod in self._modules.values():
            if mod.state != WAITING_DEPS:
                continue
            not_ready = deps.not_ready(mod, self._modules)
            mod.waiting_for(not_ready[0] if not_ready else None)
            if not not_ready:
                self._load(mod)
        self.check_start()

    def _load(self, mod):
        """Replay the module's saved section, or have it generate defaults when it has none."""
        snapshot = mod.journal.snapshot  # newer than the config file when there is one
        section = self._saver.section(mod.name) if snapshot is None else snapshot
        journal = mod.journal.records
        # Changes replayed from the journal (or its snapshot) are not in the config file: still unsaved.
        mod.loading(
            "event_generate_default" if section is None and not journal else "event_load_start",
            bool(journal) or snapshot is not None,
        )
        mod.journal.set_base(0 if section is None else len(section))
        mod.channel.load(section, journal)
        self._loop.after(mod.options["load_timeout"], self._check_stuck, mod, mod.process)

    def on_loaded(self, mod, loaded):
        failed = loaded.failed
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
            mod.load_done(failed, None)
            self._start_failed(mod, f"{loaded.error}, before ready() was called", loaded.detail)
            return
        problem = None
        if loaded.error is not None:  # an event that raised after ready(): READY, and said so
            report(mod, logging.ERROR, "module %s: %s", mod.name, loaded.error)
            problem = loaded.error
        elif failed:
            first = failures[0]
            problem = f"{failed} saved rows did not load; first: table {first['table']}: {first['message']}"
        mod.load_done(failed, problem)
        self._maybe_ready(mod)

    def on_ready(self, mod, _ready):
        mod.called_ready()
        if mod.state == STARTING and not mod.fatal:  # ready() without cmbackend_init(): no tables, nothing to load
            # Said first, as quarantine() does: the line comes before those of what READY sets off.
            self._logs.report(
                mod, logging.INFO, "module %s READY (pid %d): a plain process, with no tables", mod.name, mod.pid
            )
            mod.plain()
            mod.became_ready()  # what is held for it is sent (the router is told)
            self._advance_waiting()
            return
        self._maybe_ready(mod)

    def on_fatal(self, mod, fatal):
        """The worker said it is ending (its entry raised, returned or exited): its exit follows."""
        mod.ending(fatal.message, fatal.detail or None)
        self._logs.report(
            mod, logging.ERROR, "module %s: %s%s", mod.name, fatal.message, f"\n{fatal.detail}" if fatal.detail else ""
        )

    def _start_failed(self, mod, reason, detail):
        """An event raised before the agent called ready(): the module cannot come up. Its
        worker is ended at once, and its exit is a crash like any other (recovery.py):
        quarantined during start(), else restarted as its restart policy says."""
        mod.ending(f"start failed: {reason}", detail)  # never READY, whatever its worker still sends
        self._logs.report(mod, logging.ERROR, "module %s: %s; ending its worker", mod.name, mod.error)
        self._workers.kill(mod)

    def _check_stuck(self, mod, process):
        if mod.process is process and mod.state == LOADING:
            reason = f"stuck: ready() not called within {mod.options['load_timeout']:g}s; last event {mod.last_event}"
            if mod.last_event == "event_load_complete":
                # The usual slip: ready() in event_generate_default alone, which runs only
                # while there is no saved config.
                reason += " (call ready() after event_load_complete too: it runs, not event_generate_default, once config is saved)"
            self._logs.report(mod, logging.WARNING, "module %s %s", mod.name, reason)
            mod.noted(reason)

    def _maybe_ready(self, mod):
        # A worker that reported it is ending never goes READY: its entry may fail just
        # after registering while its lane threads load the config, and the report
        # (on the main thread) may then arrive before their last word.
        if mod.state != LOADING or not (mod.loaded and mod.ready_called) or mod.fatal:
            return
        self._logs.report(mod, logging.INFO, "module %s READY (pid %d)", mod.name, mod.pid)  # first, as above
        mod.became_ready()  # what is held for it is sent (the router is told)
        self._advance_waiting()  # which ends with check_start()

    def quarantine(self, mod, reason):
        self._logs.report(mod, logging.ERROR, "module %s FAILED: %s", mod.name, reason)
        mod.failed(reason)  # what is held for it fails (the router is told)
        self._workers.kill(mod)
        self.check_start()

    # -- start() ----------------------------------------------------------

    def check_start(self):
        """Let start() return once every module is READY, or settled where it will stay
        (recovery calls it too, for a module its restart policy leaves STOPPED)."""
        if all(deps.settled(mod, self._modules) for mod in self._modules.values()):
            self.start_done.set()

    def not_ready(self):
        """Each module that is not READY, with why: what start() reports when it gives up.
        STOPPED ones are left out: they ended as their restart policy allows, or an operator
        stopped them."""
        return {
            mod.name: self.why_not_ready(mod)
            for mod in self._modules.values()
            if mod.state != READY and mod.state != STOPPED
        }

    def why_not_ready(self, mod):
        """Why ``mod`` is not READY: its state, and what keeps it there."""
        if mod.state == STOPPED:
            if mod.stays_stopped:
                return f"STOPPED: {mod.error}"
            return f"STOPPED: its worker ended ({mod.last_exit}) and restart = {mod.options['restart']!r} leaves it so"
        if mod.state == FAILED:
            return f"FAILED: {mod.error}"
        if mod.state == STARTING:
            return "STARTING: the entry has called neither cmbackend_init() nor ready()"
        if mod.state == WAITING_DEPS:
            return f"WAITING_DEPS on {mod.waiting_on!r} ({self._modules[mod.waiting_on].state})"
        if mod.state == LOADING and mod.loaded:
            return f"LOADING: {mod.last_event} returned but ready() was never called"
        if mod.state == RESTARTING and mod.error:  # a start waiting for descriptors, say
            return f"RESTARTING: {mod.error}"
        return f"{mod.state}: {mod.last_event or 'no event'} still running"

    def summary(self):
        """(one line on every module that is not READY, whether all are READY): what a start
        ends with, counting STOPPED and FAILED modules as what they are."""
        modules = self._modules
        others = self.not_ready()
        for mod in modules.values():
            if mod.state == STOPPED:
                others[mod.name] = self.why_not_ready(mod)
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
            if mod.leaving:
                continue
            if mod.inflight:
                self._router.when_idle(mod, self.continue_stop)  # its last answer goes on with the stop
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
        """A worker ended during the stop, or its module's own (end_worker, STOPPING)."""
        mod.move(STOPPED)
        if self.stopping:
            self.continue_stop()

    # -- one module down, the supervisor running -------------------------------

    def end_worker(self, mod):
        """End ``mod``'s worker in order, as the stop ends each: a Stop once its requests in
        flight are answered and no save walks it (what comes for it meanwhile is held or
        refused, as its state says: RESTARTING, STOPPING), SIGKILL if it has not ended
        within stop_timeout. Its exit goes through recovery.on_exit as any does."""
        process = mod.process
        self._router.when_idle(mod, self._send_stop, mod, process)
        self._loop.after(self._stop_timeout, self._kill_late, mod, process)

    def _send_stop(self, mod, process):
        if mod.process is process:  # else it ended meanwhile
            self._logs.report(mod, logging.INFO, "module %s: worker pid %d stopping", mod.name, mod.pid)
            mod.channel.stop()

    def _kill_late(self, mod, process):
        if mod.process is process:
            self._logs.report(mod, logging.WARNING, "module %s did not stop within stop_timeout; killing it", mod.name)
            self._workers.kill(mod)
