"""What an operator asks of modules while the supervisor runs: stop, start or restart one,
restart them all (at once, or rolling), and reload the agents' config.

- **stop**: the module's worker ends in order, as the supervisor's own stop ends each
  (lifecycle.end_worker: once its requests in flight are answered, SIGKILL past
  stop_timeout), and it stays STOPPED, its error saying who stopped it and when. Requests
  to it fail at once (ModuleUnavailable, with how to start it). It stays so across
  restarts of the supervisor too, `cmactor run` included: the modules stopped, with who
  and when, are kept in state_dir/stopped.json (persistence/state.py), written before
  the stop begins, and again at each start of one.
- **start**: a stopped (or FAILED) module comes up as at its first start.
- **restart**: in order by default (its worker ends as in a stop, what comes meanwhile is
  held for the next one), or at once with ``kill`` (recovery.restart). A restart of a
  stopped module starts it. ``all``: every module but the stopped ones, all at once or
  (``rolling``) one at a time, dependencies first (config_deps), each READY before the
  next; a module that does not come up ends the roll.
- **reload**: the agents of the new config (read and checked by the caller, every error
  named, nothing changed when there is one) against the running ones: added ones start,
  removed ones stop in order and their records go, changed ones (any agent option
  differs) restart in order with their new options, unchanged ones are not touched.

Dependents are treated as in a crash (recovery.py): config_deps gate a module's start and
load only, so a dependent keeps running while a dependency stops, restarts or is
reloaded; its calls to one restarting are held (hold_timeout) and sent once it is READY
again, to one stopped they fail at once. A dependent that starts while its dependency is
stopped waits in WAITING_DEPS until the dependency is started. A reload that removes a
module others declared in their config_deps is refused.

Each request is answered once the modules it moved have settled: READY, or where they
will stay (FAILED, STOPPED, waiting on a dependency that is), or STOPPED for a stop; or
once stop_timeout and start_timeout have passed.
"""

import concurrent.futures
import datetime
import logging
import os

from cmactor.errors import OperationalError, ProgrammingError, StartupError
from cmsupervisor.persistence import state, store
from cmsupervisor.supervision import deps, fds
from cmsupervisor.supervision.modules import unknown_module
from cmsupervisor.supervision.states import ENDED, READY, STOPPED, STOPPING

log = logging.getLogger("cmactor.supervisor")

UP = "up"  # READY, or settled where it stays (deps.settled)
DOWN = "down"  # STOPPED
# What a reload did to a module: the keys of its answer that list them.
CHANGES = ("added", "removed", "restarted", "changed")
# Seconds between two looks at whether a save run has ended, for a removed module's record
# to go: a run names its modules until it ends (saving.py).
FORGET_RETRY = 0.05


class _Wait:
    """Modules an operator's request moved, each to settle (UP or DOWN) before ``then(timed_out)``."""

    __slots__ = ("goals", "then", "timer")

    def __init__(self, goals, then):
        self.goals = goals  # Module -> UP or DOWN
        self.then = then
        self.timer = None


class Admin:
    """The operator's requests to modules, on the loop thread. ``make(name, options)`` is a
    new module record; ``adopt(mod)`` opens its journal and log and subscribes the parts
    that follow modules (StartupError if its files cannot be opened); ``let_go(mod)``
    closes them again. ``stopped``: module name -> who stopped it, as state_dir kept it."""

    def __init__(
        self, modules, loop, lifecycle, recovery, saver, audit, logs, state_dir, limits, stopped, make, adopt, let_go
    ):
        self._modules = modules
        self._loop = loop
        self._lifecycle = lifecycle
        self._recovery = recovery
        self._saver = saver
        self._audit = audit
        self._logs = logs
        self._state_dir = state_dir
        self._limit = limits["stop_timeout"] + limits["start_timeout"]  # the longest a request waits
        self._make = make
        self._adopt = adopt
        self._let_go = let_go
        self._waits = []  # _Wait, each until its modules have settled
        self._look_due = False  # a look at them is due (module_changed)
        self._busy = None  # "a reload", "a rolling restart": what runs and must end before another
        gone = sorted(set(stopped) - set(modules))
        if gone:
            log.info("%s: %s not in the config any more, no longer kept stopped", state.STOPPED_NAME, ", ".join(gone))
        self._stopped = {name: who for name, who in stopped.items() if name in modules}
        for name, who in self._stopped.items():
            modules[name].held_stopped(who)

    # -- one module -----------------------------------------------------------

    def stop(self, waiter, user, name):
        """Stop module ``name`` and keep it stopped; answered once it is STOPPED."""
        mod = self._module(name, "stop")
        if mod.stopped_by is None:
            who = _who(waiter, user)
            self._keep({**self._stopped, name: who})
            mod.held_stopped(who)
            self._logs.report(mod, logging.INFO, "module %s: stopped by %s", name, who)
            self._bring_down(mod)
        self._await_one(waiter, user, "stop", mod, DOWN)

    def start(self, waiter, user, name):
        """Start module ``name`` if it is stopped or FAILED; answered once it is READY (or
        settled elsewhere: the request then fails, saying why)."""
        mod = self._module(name, "start")
        if mod.stopped_by is not None:
            self._release(mod, waiter, user, "start")
        elif mod.state in ENDED:
            self._recovery.restart(name)
        self._await_one(waiter, user, "start", mod, UP)

    def restart(self, waiter, user, name, kill):
        """Restart module ``name`` (recovery.restart), or start it if it is stopped; answered
        once it is READY again (or settled elsewhere: the request then fails, saying why)."""
        mod = self._module(name, "restart")
        if mod.stopped_by is not None:
            self._release(mod, waiter, user, "restart")
        else:
            self._recovery.restart(name, kill)
        self._await_one(waiter, user, "restart", mod, UP)

    def _module(self, name, op):
        mod = self._modules.get(name)
        if mod is None:
            raise ProgrammingError(unknown_module(name, self._modules))
        if self._lifecycle.stopping:
            raise OperationalError(f"cannot {op} module {name!r}: the supervisor is stopping")
        if mod.removed:
            raise OperationalError(f"cannot {op} module {name!r}: {mod.error}")
        return mod

    def _release(self, mod, waiter, user, op):
        """An operator's start of the stopped ``mod``: it is no longer kept stopped, and comes up."""
        if mod.process is not None:
            raise OperationalError(
                f"cannot {op} module {mod.name!r}: its worker is still ending after its stop; {op} it once it is STOPPED"
            )
        self._keep({n: who for n, who in self._stopped.items() if n != mod.name})
        mod.released()
        self._logs.report(mod, logging.INFO, "module %s: started by %s", mod.name, _who(waiter, user))
        self._recovery.restart(mod.name)

    def _bring_down(self, mod):
        """End ``mod``'s worker, if it has one, in order; it is STOPPED after (it stays_stopped)."""
        if mod.process is None:
            mod.move(STOPPED)  # what is held for it fails; a restart's backoff timer finds it so
        elif not mod.leaving:
            mod.move(STOPPING)
            self._lifecycle.end_worker(mod)
        # else its worker is ending already (a restart, a quarantine): recovery.on_exit leaves it STOPPED

    def _keep(self, stopped):
        """Write ``stopped`` to state_dir before anything changes, then hold it."""
        try:
            state.write_stopped(self._state_dir, stopped)
        except OSError as exc:
            raise OperationalError(
                f"{state.stopped_path(self._state_dir)}, where the modules an operator stopped are kept, cannot be "
                f"written: {store.reason(exc)}; nothing was changed"
            ) from None
        self._stopped = stopped

    def _await_one(self, waiter, user, op, mod, goal):
        def then(timed_out):
            entry = self._entry(mod, goal)
            if entry["ok"]:
                self._answer(waiter, user, op, mod.name, {"module": entry})
                return
            late = f" after {self._limit:g}s" if timed_out else ""
            wanted, why = (
                ("STOPPED", entry["note"]) if goal == DOWN else ("READY", f"{entry['state']}: {entry['note']}")
            )
            self._refuse(waiter, user, op, mod.name, f"module {mod.name!r} is not {wanted}{late}: {why}")

        self._await({mod: goal}, then)

    # -- every module -----------------------------------------------------------

    def restart_all(self, waiter, user, rolling, kill):
        """Restart every module but the stopped ones: all at once, or (``rolling``) one at a
        time, dependencies first, each READY before the next. Answered with one entry a
        module, in that order, once they have settled."""
        if self._lifecycle.stopping or self._lifecycle.starting:
            raise OperationalError("cannot restart every module: the supervisor is " + self._phase())
        if self._busy is not None:
            raise OperationalError(f"cannot restart every module: {self._busy} is under way; try again once it ends")
        # A removed module's record stays until its worker has ended (module_changed).
        order = [mod for mod in deps.dependencies_first(self._modules) if not mod.removed]
        if rolling:
            self._busy = "a rolling restart"
            self._roll(waiter, user, order, kill, [])
            return
        goals = {}
        for mod in order:
            if mod.stopped_by is None:
                self._recovery.restart(mod.name, kill)
                goals[mod] = UP

        def then(_timed_out):
            self._answer_all(waiter, user, [self._entry(mod, UP) if mod in goals else _left(mod) for mod in order])

        self._await(goals, then)

    def _roll(self, waiter, user, order, kill, entries):
        """The rolling restart from ``order[len(entries)]`` on."""
        while len(entries) < len(order) and order[len(entries)].stopped_by is not None:
            entries.append(_left(order[len(entries)]))
        if len(entries) == len(order):
            self._busy = None
            self._answer_all(waiter, user, entries)
            return
        mod = order[len(entries)]
        try:
            self._recovery.restart(mod.name, kill)
        except OperationalError as exc:  # the supervisor began to stop meanwhile
            self._end_roll(waiter, user, order, entries, {**self._entry(mod, UP), "note": str(exc)})
            return

        def then(_timed_out):
            entry = self._entry(mod, UP)
            if entry["ok"]:
                entries.append(entry)
                self._roll(waiter, user, order, kill, entries)
            else:
                self._end_roll(waiter, user, order, entries, entry)

        self._await({mod: UP}, then)

    def _end_roll(self, waiter, user, order, entries, failed):
        entries.append(failed)
        for mod in order[len(entries) :]:
            note = f"not restarted: the rolling restart stopped at {failed['name']!r}"
            entries.append({**self._entry(mod, UP), "ok": False, "note": note})
        self._busy = None
        self._answer_all(waiter, user, entries)

    def _answer_all(self, waiter, user, entries):
        self._answer(waiter, user, "restart", None, {"modules": entries}, all(entry["ok"] for entry in entries))

    # -- reload -------------------------------------------------------------------

    def reload(self, waiter, user, agents, needs_restart):
        """Run the agents ``agents`` (name -> their checked options) from now on; answered once
        the modules started, restarted and removed have settled, with what changed.
        ``needs_restart``: the [supervisor] options that changed, which apply at the next
        start of the supervisor (the socket it listens on, the state_dir it holds, ...)."""
        if self._lifecycle.stopping or self._lifecycle.starting:
            raise OperationalError("reload refused: the supervisor is " + self._phase())
        if self._busy is not None:
            raise OperationalError(f"reload refused: {self._busy} is under way; try again once it ends")
        modules = self._modules
        # A module the last reload removed keeps its record until no save run names it
        # (_forget): read as present, it would be "unchanged" and then vanish.
        going = [name for name, mod in modules.items() if mod.removed]
        if going:
            raise OperationalError(
                f"reload refused: {', '.join(map(repr, going))}, removed by the last reload, is still being "
                "let go (a save is walking it); try again once the save ends; nothing was changed"
            )
        added = [name for name in agents if name not in modules]
        removed = [modules[name] for name in modules if name not in agents]
        changed = [modules[name] for name in agents if name in modules and agents[name] != modules[name].options]
        for mod in removed:
            users = [m.name for m in modules.values() if mod.name in m.config_deps and m not in removed]
            if users:
                raise OperationalError(
                    f"reload refused: module {mod.name!r} would be removed, but {', '.join(map(repr, users))} "
                    "declared it in config_deps; remove them too, or keep it; nothing was changed"
                )
        adopted = []
        try:
            fds.ensure(len(modules) + len(added))
            for name in added:
                mod = self._make(name, agents[name])
                self._adopt(mod)
                adopted.append(mod)
            stopped = {name: who for name, who in self._stopped.items() if name in agents}
            if stopped != self._stopped:
                self._keep(stopped)
        except (StartupError, OperationalError) as exc:
            for mod in adopted:
                self._let_go(mod)
            message = str(exc) if isinstance(exc, OperationalError) else f"{exc}; nothing was changed"
            raise OperationalError(f"reload refused: {message}") from None
        # From here on nothing can fail: the new config is the supervisor's.
        who = _who(waiter, user)
        log.info(
            "reload by %s: added %s; removed %s; changed %s",
            who,
            ", ".join(added) or "none",
            ", ".join(m.name for m in removed) or "none",
            ", ".join(m.name for m in changed) or "none",
        )
        if needs_restart:
            log.warning(
                "reload: [supervisor] %s changed; that applies at the supervisor's next start", ", ".join(needs_restart)
            )
        goals, changes = {}, {}
        for mod in adopted:
            modules[mod.name] = mod
            changes[mod] = "added"
        for mod in adopted:  # once all are in: their config_deps may name each other
            error = self._recovery.launch(mod)
            if error is not None:
                self._lifecycle.quarantine(mod, error)
            goals[mod] = UP
        for mod in changed:
            mod.reconfigured(self._make(mod.name, agents[mod.name]))
            self._logs.report(mod, logging.INFO, "module %s: its options changed (reload by %s)", mod.name, who)
            if mod.stopped_by is None:
                self._recovery.restart(mod.name)
                goals[mod], changes[mod] = UP, "restarted"
            else:  # it stays stopped: the new options apply when it is started
                goals[mod], changes[mod] = DOWN, "changed"
        for mod in removed:
            mod.removing()
            self._logs.report(mod, logging.INFO, "module %s: removed from the config (reload by %s)", mod.name, who)
            self._bring_down(mod)
            goals[mod] = DOWN
            changes[mod] = "removed"
        self._busy = "a reload"

        def then(_timed_out):
            self._busy = None
            entries = [{**self._entry(mod, goals[mod]), "change": change} for mod, change in changes.items()]
            result = {kind: [e["name"] for e in entries if e["change"] == kind] for kind in CHANGES}
            result["unchanged"] = [name for name in agents if modules[name] not in changes]
            result["needs_restart"] = needs_restart
            result["modules"] = entries
            self._answer(waiter, user, "reload", None, {"reload": result}, all(e["ok"] for e in entries))

        self._await(goals, then)

    def _forget(self, mod):
        """A removed module's worker has ended: its record goes, and its journal and log close
        (their files stay: a module added back gets its unsaved changes back, and the saved
        config keeps its section)."""
        if self._modules.get(mod.name) is not mod:
            return
        if self._saver.running:
            self._loop.after(FORGET_RETRY, self._forget, mod)
            return
        del self._modules[mod.name]
        self._let_go(mod)

    # -- waiting for modules to settle -------------------------------------------

    def module_changed(self, mod, _before):
        """(Subscribed to every Module.) Look again whether the requests waiting are done, once
        the event that moved it is over, at the loop's next round of timers: the record may be
        halfway through it (WAITING_DEPS before it is told on what), and the change may come
        from a walk over the modules, which must not see one of them go (_forget)."""
        if mod.removed and mod.state == STOPPED:
            self._loop.after(0, self._forget, mod)
        if mod.state == STOPPED and self._lifecycle.starting:
            # Stopped by an operator while the supervisor starts: settled, as one the restart
            # policy leaves STOPPED is, so start() need not wait out start_timeout for it.
            self._loop.after(0, self._lifecycle.check_start)
        if self._waits and not self._look_due:
            self._look_due = True
            self._loop.after(0, self._look)

    def _look(self):
        self._look_due = False
        for wait in list(self._waits):
            self._check(wait)

    def close(self):
        """(The supervisor's end.) Answer what still waits, with its modules as they are now:
        the loop runs no more timers, and a caller of the embedding API must not wait forever."""
        while self._waits:
            self._done(self._waits[0], False)

    def _await(self, goals, then):
        wait = _Wait(goals, then)
        self._waits.append(wait)
        wait.timer = self._loop.after(self._limit, self._done, wait, True)
        self._check(wait)

    def _check(self, wait):
        if all(self._settled(mod, goal) for mod, goal in wait.goals.items()):
            self._done(wait, False)

    def _done(self, wait, timed_out):
        if wait not in self._waits:
            return  # done already: its timer came in the same turn
        self._waits.remove(wait)
        self._loop.cancel(wait.timer)
        wait.then(timed_out)

    def _settled(self, mod, goal):
        if goal == DOWN:
            return mod.state == STOPPED
        return mod.state == READY or deps.settled(mod, self._modules)

    def _entry(self, mod, goal):
        """What became of ``mod``: ``ok`` if it reached ``goal``, else a ``note`` saying why not."""
        ok = mod.state == (STOPPED if goal == DOWN else READY)
        note = None
        if not ok:
            # The entry has the state: the note says the rest (why_not_ready starts with the state).
            note = (
                f"it is {mod.state}"
                if goal == DOWN
                else self._lifecycle.why_not_ready(mod).removeprefix(f"{mod.state}: ")
            )
        elif mod.stays_stopped:
            note = mod.error
        return {"name": mod.name, "state": mod.state, "pid": mod.pid, "ok": ok, "note": note}

    def _phase(self):
        return "stopping" if self._lifecycle.stopping else "still starting"

    # -- answers ---------------------------------------------------------------------

    def _answer(self, waiter, user, op, module, result, ok=True):
        """Answer ``waiter`` with ``result`` (a client's reply gets its keys), and audit it."""
        self._audit_line(waiter, user, op, module, "ok" if ok else "done, not every module came up")
        if isinstance(waiter, concurrent.futures.Future):
            waiter.set_result(result)
            return
        client, rid = waiter
        client.answer({"id": rid, "ok": True, **result})

    def _refuse(self, waiter, user, op, module, message):
        self._audit_line(waiter, user, op, module, f"OperationalError: {message}")
        if isinstance(waiter, concurrent.futures.Future):
            waiter.set_exception(OperationalError(message))
            return
        client, rid = waiter
        client.answer_error(rid, OperationalError, message)

    def _audit_line(self, waiter, user, op, module, outcome):
        uid, pid = _peer(waiter)
        self._audit.record(user, uid, pid, op, module, None, None, outcome)


def _left(mod):
    """The entry of a stopped module that a restart of every module leaves stopped."""
    return {"name": mod.name, "state": mod.state, "pid": mod.pid, "ok": True, "note": f"left so: {mod.error}"}


def _peer(waiter):
    """(uid, pid) of who asked: the client's, or this process's (the embedding API)."""
    if isinstance(waiter, concurrent.futures.Future):
        return os.getuid(), os.getpid()
    client = waiter[0]
    return client.peer_uid, client.peer_pid


def _who(waiter, user):
    """Who asks, and when, as a stopped module's note says it."""
    uid, _ = _peer(waiter)
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return f"{_printable(user) or 'a client'} (uid {uid}) at {now}"


def _printable(name):
    """A client's user name as the logs and notes may show it: whatever it holds that does not
    print (a newline forging a log line, an escape sequence for a terminal) written as an escape."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in name)
